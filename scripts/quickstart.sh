#!/usr/bin/env bash
# Set up .venv and run the main job on the embedded default: load the real tiny trained Llama
# (stories260K, Hugging Face format, from the shared data) and generate greedily from a prompt.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup_env.sh"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}" TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
exec "$root/.venv/bin/python" "$root/scripts/generate.py" "$@"
