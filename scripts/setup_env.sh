#!/usr/bin/env bash
# Create (or reuse) .venv in the project root and install meditron_jax with the test, TPU and dask extras (CI runs the Dask-runner test).
# Re-running is cheap: the install is skipped while setup.cfg is unchanged.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${MEDITRON_VENV:-$root/.venv}"
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null 2>&1 || python=python3
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
stamp="$venv/.meditron_jax_installed"
want="$(cat "$root/setup.cfg" "$root/scripts/setup_env.sh" | sha256sum | cut -d' ' -f1)"  # pins and extras
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q -e "$root[test,tpu,dask]"
  echo "$want" > "$stamp"
fi
