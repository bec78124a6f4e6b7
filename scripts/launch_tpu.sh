#!/usr/bin/env bash
# Launch meditron-train (or meditron-eval) on a Cloud TPU pod slice, or on several slices (multi-slice).
#
#   bash scripts/launch_tpu.sh --name meditron-70b --zone us-east5-a --slice meditron-70b-pretrain \
#       --repo git+https://github.com/ORG/meditron_jax@v0.1.0 -- \
#       --gin.MODEL_DIR="'gs://BUCKET/runs/70b'" --gin.curated_data_dir.path="'gs://BUCKET/gap_replay'"
#
# 1. creates the queued resource NAME (or reuses it when it exists) and waits until it is ACTIVE;
# 2. installs the package on every host of every slice (pip, from --repo);
# 3. runs the same command on every host: meditron-train with the --slice's gin files (configs/tpu_slices.json)
#    followed by the arguments after `--`; or meditron-eval with --eval.
# JAX finds the other hosts (and, with --num_slices > 1, the other slices) from the TPU VM metadata:
# meditron_jax.parallel.distributed.initialize() needs no flags there. Checkpoints, TensorBoard logs and the
# curated data can be gs:// paths (docs/training.md, "Launching on a TPU pod").
# --dry_run prints every gcloud command instead of running it (nothing is created).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() {
  cat <<'EOF'
usage: launch_tpu.sh --name NAME --zone ZONE [options] [-- ARGS for meditron-train / meditron-eval]

  --name NAME              queued resource (and TPU node) name; with --num_slices N the nodes are NAME-0..NAME-(N-1)
  --zone ZONE              e.g. us-east5-a
  --project PROJECT        default: gcloud's configured project
  --slice PRESET           a preset of configs/tpu_slices.json: sets the accelerator, runtime and gin files
  --accelerator_type TYPE  e.g. v5p-256 (overrides the preset)
  --runtime_version V      e.g. v2-alpha-tpuv5 (overrides the preset)
  --num_slices N           multi-slice: N slices of the accelerator type (default 1)
  --spot | --reserved      provisioning model (default: on-demand)
  --repo PIP_SPEC          what pip installs on each host (default: git+https://github.com/YOUR_ORG/meditron_jax);
                           the [tpu] extra is added
  --stage_data GS_DIR      copy a shared-data folder (tokenizer, benchmarks) to each host and point
                           MEDITRON_SHARED_DATA at it
  --env KEY=VALUE          export on every host before the command (repeatable)
  --eval                   run meditron-eval instead of meditron-train (no gin files are added)
  --detach                 start the command with nohup (log: ~/meditron_NAME.log on each host) and return
  --skip_create            the slice exists: do not create or wait
  --skip_install           the package is installed: do not pip install
  --dry_run                print the commands, run nothing
EOF
}

die() {
  echo "launch_tpu.sh: error: $*" >&2
  exit 2
}

# POSIX-shell quoting of one word: bare when safe, else in single quotes, else (it holds a single quote) in double
# quotes when nothing in it is special there, else single quotes with '\'' for each quote inside.
quote() {
  local s=$1
  if [[ -n $s && $s =~ ^[A-Za-z0-9_./=:,@%+~-]+$ && $s != \~* ]]; then
    printf '%s' "$s"
  elif [[ $s != *\'* ]]; then
    printf "'%s'" "$s"
  elif [[ $s != *[\"\$\`\\!]* ]]; then
    printf '"%s"' "$s"
  else
    printf "'%s'" "${s//\'/\'\\\'\'}"
  fi
}

quote_all() {
  local out="" w
  for w in "$@"; do
    out+="${out:+ }$(quote "$w")"
  done
  printf '%s' "$out"
}

dry_run=0
name="" zone="" project="" preset="" accelerator="" runtime="" num_slices=1 provisioning=""
repo="git+https://github.com/YOUR_ORG/meditron_jax" stage_data="" run_eval=0 detach=0 skip_create=0 skip_install=0
envs=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --name) name=${2:?--name needs a value}; shift 2 ;;
    --zone) zone=${2:?--zone needs a value}; shift 2 ;;
    --project) project=${2:?--project needs a value}; shift 2 ;;
    --slice) preset=${2:?--slice needs a value}; shift 2 ;;
    --accelerator_type) accelerator=${2:?--accelerator_type needs a value}; shift 2 ;;
    --runtime_version) runtime=${2:?--runtime_version needs a value}; shift 2 ;;
    --num_slices) num_slices=${2:?--num_slices needs a value}; shift 2 ;;
    --spot) provisioning=--spot; shift ;;
    --reserved) provisioning=--reserved; shift ;;
    --repo) repo=${2:?--repo needs a value}; shift 2 ;;
    --stage_data) stage_data=${2:?--stage_data needs a value}; shift 2 ;;
    --env) envs+=("${2:?--env needs KEY=VALUE}"); shift 2 ;;
    --eval) run_eval=1; shift ;;
    --detach) detach=1; shift ;;
    --skip_create) skip_create=1; shift ;;
    --skip_install) skip_install=1; shift ;;
    --dry_run) dry_run=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; break ;;
    *) usage >&2; die "unknown option $1 (arguments for the command go after --)" ;;
  esac
done
cmd_args=("$@")

[[ -n $name ]] || die "--name is required"
[[ -n $zone ]] || die "--zone is required"
[[ $num_slices =~ ^[1-9][0-9]*$ ]] || die "--num_slices must be a positive integer (got '$num_slices')"
[[ $name =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] || die "--name '$name': lower-case letters, digits and hyphens"
for kv in ${envs[@]+"${envs[@]}"}; do
  [[ $kv =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env '$kv' is not KEY=VALUE"
done

gin_files=()
if [[ -n $preset ]]; then
  slices_json="$root/configs/tpu_slices.json"
  [[ -f $slices_json ]] || die "$slices_json not found"
  # One line per field: accelerator, runtime, then the gin files.
  mapfile -t fields < <(python3 - "$slices_json" "$preset" <<'PY'
import json, sys
path, name = sys.argv[1], sys.argv[2]
table = json.load(open(path))
if name not in table or name.startswith("_"):
    known = ", ".join(k for k in table if not k.startswith("_"))
    sys.exit(f"launch_tpu.sh: error: --slice {name!r} is not in {path} (known: {known})")
entry = table[name]
print(entry["accelerator_type"])
print(entry["runtime_version"])
for g in entry.get("gin", []):
    print(g)
PY
  ) || exit 2
  [[ ${#fields[@]} -ge 2 ]] || die "--slice $preset: could not read $slices_json"
  accelerator=${accelerator:-${fields[0]}}
  runtime=${runtime:-${fields[1]}}
  gin_files=("${fields[@]:2}")
fi
[[ -n $accelerator ]] || die "--accelerator_type (or --slice) is required"
[[ -n $runtime ]] || die "--runtime_version (or --slice) is required"

# The package needs Python 3.11 (setup.cfg) and TPU VM images ship 3.10: it goes into a 3.11 virtual environment
# on each host, whose python runs `-m meditron_jax.cli.train`, the meditron-train console script's main().
venv="~/meditron_venv"
if [[ $run_eval -eq 1 ]]; then
  program=(-m meditron_jax.eval.cli)
else
  program=(-m meditron_jax.cli.train)
  for g in ${gin_files[@]+"${gin_files[@]}"}; do program+=("--gin_file=$g"); done
  has_gin=0
  for a in ${cmd_args[@]+"${cmd_args[@]}"}; do [[ $a == --gin_file=* ]] && has_gin=1; done
  [[ ${#gin_files[@]} -gt 0 || $has_gin -eq 1 ]] || die "no gin file: pass --slice PRESET or --gin_file=... after --"
fi
program+=(${cmd_args[@]+"${cmd_args[@]}"})

common=(--zone="$zone")
[[ -n $project ]] && common+=(--project="$project")

nodes=()
if [[ $num_slices -eq 1 ]]; then
  nodes=("$name")
else
  for ((i = 0; i < num_slices; i++)); do nodes+=("$name-$i"); done
fi

# Run (or, with --dry_run, print) one command given as words.
run() {
  echo "+ $(quote_all "$@")"
  if [[ $dry_run -eq 0 ]]; then
    "$@"
  fi
}

# --- 1. the slice(s) ----------------------------------------------------------------------------------
if [[ $skip_create -eq 0 ]]; then
  state=""
  if [[ $dry_run -eq 0 ]]; then
    state=$(gcloud compute tpus queued-resources describe "$name" "${common[@]}" --format='value(state.state)' \
      2>/dev/null || true)
  else
    echo "+ $(quote_all gcloud compute tpus queued-resources describe "$name" "${common[@]}" \
      --format='value(state.state)')  # reused when it exists"
  fi
  if [[ -n $state ]]; then
    echo "queued resource $name exists ($state): reusing it"
    # A slice of another size would run the recipe on the wrong topology: refuse it.
    have=$(gcloud compute tpus queued-resources describe "$name" "${common[@]}" \
      --format='value(tpu.nodeSpec[0].node.acceleratorType)' 2>/dev/null || true)
    if [[ -n $have && $have != "$accelerator" ]]; then
      die "queued resource $name is a $have, not the $accelerator asked for: delete it or choose another --name"
    fi
  else
    create=(gcloud compute tpus queued-resources create "$name" "${common[@]}"
      --accelerator-type="$accelerator" --runtime-version="$runtime")
    if [[ $num_slices -eq 1 ]]; then
      create+=(--node-id="$name")
    else
      create+=(--node-count="$num_slices" --node-prefix="$name")
    fi
    [[ -n $provisioning ]] && create+=("$provisioning")
    run "${create[@]}"
  fi
  if [[ $dry_run -eq 0 ]]; then
    echo "waiting for $name to be ACTIVE (queued resources can wait for capacity) ..."
    while true; do
      state=$(gcloud compute tpus queued-resources describe "$name" "${common[@]}" --format='value(state.state)')
      case $state in
        ACTIVE) break ;;
        FAILED | SUSPENDED | SUSPENDING) die "queued resource $name is $state (gcloud compute tpus queued-resources describe $name)" ;;
        *) sleep 30 ;;
      esac
    done
  else
    echo "# wait until 'queued-resources describe $name' says ACTIVE"
  fi
fi

# --- 2. install on every host --------------------------------------------------------------------------
ssh_all() { # node, remote command: on every worker of that node
  run gcloud compute tpus tpu-vm ssh "$1" "${common[@]}" --worker=all --command="$2"
}

on_every_node() { # remote command; the slices in parallel, each slice's hosts in parallel (--worker=all)
  local node pids=() failed=0
  for node in "${nodes[@]}"; do
    if [[ $dry_run -eq 1 || ${#nodes[@]} -eq 1 ]]; then
      ssh_all "$node" "$1" || failed=1
    else
      ssh_all "$node" "$1" &
      pids+=($!)
    fi
  done
  for pid in ${pids[@]+"${pids[@]}"}; do wait "$pid" || failed=1; done
  [[ $failed -eq 0 ]] || die "the remote command failed on at least one slice"
}

if [[ $skip_install -eq 0 ]]; then
  spec=$repo
  [[ $spec == git+* ]] && spec="meditron_jax[tpu] @ $repo"
  install="{ command -v python3.11 >/dev/null || { sudo apt-get update -qq && sudo apt-get install -y -qq python3.11 python3.11-venv; }; }"
  install+=" && python3.11 -m venv $venv && $venv/bin/python -m pip install -q --upgrade pip"
  install+=" && $venv/bin/python -m pip install -q $(quote "$spec")"
  if [[ -n $stage_data ]]; then
    install+=" && mkdir -p ~/meditron_shared_data && gcloud storage cp -r $(quote "${stage_data%/}/*") ~/meditron_shared_data/"
  fi
  on_every_node "$install"
fi

# --- 3. the same command on every host -----------------------------------------------------------------
exports=""
[[ -n $stage_data ]] && exports+='export MEDITRON_SHARED_DATA=~/meditron_shared_data && '
for kv in ${envs[@]+"${envs[@]}"}; do exports+="export $(quote "$kv") && "; done
remote="$exports$venv/bin/python $(quote_all "${program[@]}")"
if [[ $detach -eq 1 ]]; then
  remote="nohup bash -c $(quote "$remote") > ~/meditron_$name.log 2>&1 < /dev/null &"
fi
on_every_node "$remote"
