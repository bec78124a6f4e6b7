#!/usr/bin/env bash
# Set up .venv, then run the main job on the embedded default: the whole MEDITRON recipe (curate GAP-REPLAY,
# continue pretraining, fine-tune on PubMedQA, evaluate top-token, export to Hugging Face and reload it in
# transformers) on a tiny Llama-2 and the sample shipped in the package. Works without ../shared.
# Arguments go to meditron-quickstart (see --help), e.g. --output /tmp/qs --eval_limit 500.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup_env.sh"
# A laptop job: stay on the CPU even where libtpu is installed (set JAX_PLATFORMS to change it).
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
cd "$root"
exec "$root/.venv/bin/meditron-quickstart" "$@"
