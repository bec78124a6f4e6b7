#!/usr/bin/env bash
# Set up .venv, check lint/format/types (scripts/lint.sh), then run the whole test suite (extra arguments go
# to pytest, e.g. -m "not slow" for the quick inner loop). MEDITRON_SKIP_LINT=1 skips the lint step.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup_env.sh"
cd "$root"
if [ "${MEDITRON_SKIP_LINT:-0}" != 1 ]; then
  bash "$root/scripts/lint.sh"
fi
# Two workers, each taking whole test files (module fixtures are built once); MEDITRON_TEST_WORKERS=0 runs serially.
exec "$root/.venv/bin/python" -m pytest -n "${MEDITRON_TEST_WORKERS:-2}" --dist loadfile "$@"
