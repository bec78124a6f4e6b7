#!/usr/bin/env bash
# Lint, format check and type check, as CI runs them (tools pinned in setup.cfg's test extra).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${MEDITRON_VENV:-$root/.venv}/bin"
"$py/ruff" check .
"$py/ruff" format --check .
"$py/mypy" meditron_jax
