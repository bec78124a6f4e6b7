#!/usr/bin/env python
"""Per-chip training memory from ahead-of-time TPU compilation: meditron_jax next to MaxText.

For each case (7B and 70B at MEDITRON's sequence length and global batch, on a v5p and a v4 slice) this
compiles the full training step with ``scripts/aot_compile.py`` and, when a MaxText installation is given,
the same model, topology, batch, sequence length, gradient accumulation and mesh with MaxText's
``train_compile``, and prints the two per-chip memory figures side by side. Both sides count memory the
same way (arguments + outputs − aliased + temporaries, from XLA's ``memory_analysis``).

Compiles take minutes each (the 70B ones on a 2-core machine ~10+ minutes), so results are cached in
``bench/aot_memory_results.json`` and ``--table`` prints the table from the cache.

    python bench/aot_memory.py                       # run every case not yet cached, then print the table
    python bench/aot_memory.py --only 7b-v5p --force # re-run one case
    python bench/aot_memory.py --table               # print from the cache
    MAXTEXT_PYTHON=/tmp/maxtext-venv/bin/python python bench/aot_memory.py   # MaxText in its own venv

With MaxText given, our side compiles with MaxText's libtpu (``--libtpu maxtext``: MaxText 0.2.5 does not compile
with our pinned libtpu 0.0.42.1, and the two libtpu versions report different memory for the same program), so
the ratio compares programs, not compilers; ``--libtpu pinned`` measures ours on our own pin (``ours_pinned*``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(os.environ.get("AOT_BENCH_RESULTS", ROOT / "bench" / "aot_memory_results.json"))
GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Case:
    key: str
    model: str  # meditron_jax preset
    maxtext_model: str  # MaxText model_name (vocab overridden to ours)
    topology: str
    seq_len: int
    global_batch: int
    grad_accum: int
    chips: int
    overrides: tuple[str, ...] = ()  # ModelConfig overrides for our side (FIELD=VALUE), see below

    @property
    def per_device_batch(self) -> float:
        """MaxText's per_device_batch_size: sequences per chip per accumulation microstep."""
        return self.global_batch / self.chips / self.grad_accum


# MEDITRON.md §3: 7B at sequence 2,048 and global batch 1,600; 70B at 4,096 and 512. Pure FSDP over every chip
# (MaxText's default mesh too); gradient accumulation where the activations of a full per-chip batch do not fit.
# Our side's ModelConfig options, per case, the measured best on libtpu 0.0.52 (docs/performance.md "Training
# memory ahead of time"): the chunked output head + loss (loss_chunk_size) and RoPE's rotation in bf16, as
# transformers and MaxText do it (rope_in_compute_dtype). Both are off by default in the model and change results
# by rounding only. On v4 (5 and 1 sequences per chip and microstep) they did not pay (70B: 19.02 ->
# 19.11 GiB; since the layer gradients accumulate in the backward scan, 17.10 -> 17.09), so those cases have
# none. --plain compiles every case without them (ours_unchunked).
_7B = ("loss_chunk_size=256", "rope_in_compute_dtype=true")
_70B = ("loss_chunk_size=512", "rope_in_compute_dtype=true")
CASES = [
    Case("7b-v5p", "meditron-7b", "llama2-7b", "v5p-128", 2048, 1600, 1, 64, _7B),
    Case("7b-v4", "meditron-7b", "llama2-7b", "v4-128", 2048, 1600, 5, 64),
    Case("70b-v5p", "meditron-70b", "llama2-70b", "v5p-256", 4096, 512, 1, 128, _70B),
    Case("70b-v4", "meditron-70b", "llama2-70b", "v4-256", 4096, 512, 4, 128),
]


def versions(python: str, env: dict | None = None) -> dict:
    """jax and libtpu versions as ``python`` imports them (MaxText 0.2.5 needs a newer libtpu than ours)."""
    code = (
        "import json, importlib.metadata as m, libtpu, os; print(json.dumps({'jax': m.version('jax'), "
        "'libtpu': m.version('libtpu'), 'libtpu_dir': os.path.dirname(libtpu.__file__)}))"
    )
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    return json.loads(proc.stdout) if proc.returncode == 0 else {"error": proc.stderr[-300:]}


def _ours_env(libtpu: str | None) -> dict:
    """Our environment, with ``libtpu`` (a `pip install --target` folder holding another libtpu) first on the path."""
    env = dict(os.environ)
    if libtpu:
        env["PYTHONPATH"] = os.pathsep.join([libtpu, *filter(None, [env.get("PYTHONPATH")])])
    return env


def run_ours(
    case: Case, timeout: int, plain: bool = False, extra: list[str] | None = None, libtpu: str | None = None
) -> dict:
    cmd = [
        sys.executable,
        str(ROOT / "scripts" / "aot_compile.py"),
        "--model",
        case.model,
        "--topology",
        case.topology,
        "--seq_len",
        str(case.seq_len),
        "--global_batch",
        str(case.global_batch),
        "--mesh",
        "fsdp=-1",
        "--grad_accum",
        str(case.grad_accum),
    ]
    for item in (() if plain else case.overrides) + tuple(extra or []):
        cmd += ["--override", item]
    env = _ours_env(libtpu)
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    lines = proc.stdout.strip().splitlines()
    if not lines:
        return {"error": f"exit {proc.returncode}: {proc.stderr[-2000:]}", "command": " ".join(cmd)}
    out = json.loads(lines[-1])
    out["command"] = " ".join(["python"] + cmd[1:]).replace(str(ROOT) + "/", "")
    out["wall_seconds"] = round(time.time() - start)
    out["versions"] = versions(sys.executable, env)
    return out


def maxtext_command(case: Case, python: str, workdir: str) -> list[str]:
    import_root = subprocess.run(
        [python, "-c", "import maxtext, os; print(os.path.dirname(maxtext.__file__))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    pdbs = case.per_device_batch
    return [
        python,
        "-m",
        "maxtext.trainers.pre_train.train_compile",
        f"{import_root}/configs/base.yml",
        f"model_name={case.maxtext_model}",
        "override_model_config=True",
        f"vocab_size={_padded_vocab(case.model)}",
        f"compile_topology={case.topology}",
        "compile_topology_num_slices=1",
        f"per_device_batch_size={int(pdbs) if pdbs == int(pdbs) else pdbs}",
        f"gradient_accumulation_steps={case.grad_accum}",
        f"max_target_length={case.seq_len}",
        "ici_fsdp_parallelism=-1",
        "remat_policy=full",
        "scan_layers=True",
        "weight_dtype=float32",
        "dtype=bfloat16",
        f"run_name=bench_{case.key}",
        f"base_output_directory={workdir}",
        "enable_checkpointing=False",
        "dataset_type=synthetic",
    ]


def _padded_vocab(model: str) -> int:
    sys.path.insert(0, str(ROOT))
    from meditron_jax.config import get_config

    return get_config(model).padded_vocab_size


_STATS = re.compile(r"(\w+_size_in_bytes)=(\d+)")


def run_maxtext(case: Case, python: str | None, timeout: int) -> dict:
    if not python:
        return {"error": "not measured: no MaxText installation given (MAXTEXT_PYTHON / --maxtext-python)"}
    if not Path(python).exists():
        return {"error": f"not measured: {python} does not exist"}
    workdir = f"/tmp/maxtext_bench_{case.key}"
    try:
        cmd = maxtext_command(case, python, workdir)
    except subprocess.CalledProcessError as e:
        return {"error": f"not measured: cannot import maxtext with {python}: {e.stderr[-500:]}"}
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    os.makedirs(workdir, exist_ok=True)
    start = time.time()
    try:
        # cwd: a folder of our own; in a shared /tmp a stray module (say attr.py) shadows MaxText's imports.
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=workdir)
    except subprocess.TimeoutExpired:
        return {"error": f"not measured: MaxText compile exceeded {timeout} s", "command": " ".join(cmd)}
    log = proc.stdout + proc.stderr
    stats = {}
    if "Memory analysis:" in log:
        stats = {k: int(v) for k, v in _STATS.findall(log.split("Memory analysis:")[-1])}
    out = {
        "command": " ".join(cmd[1:]),
        "wall_seconds": round(time.time() - start),
        "returncode": proc.returncode,
        "versions": versions(python, env),
    }
    if stats:
        out.update(
            argument_bytes=stats["argument_size_in_bytes"],
            output_bytes=stats["output_size_in_bytes"],
            alias_bytes=stats["alias_size_in_bytes"],
            temp_bytes=stats["temp_size_in_bytes"],
        )
        out["total_bytes"] = out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"]
    else:
        oom = re.search(r"RESOURCE_EXHAUSTED[^\n]*", log)
        tail = oom.group(0) if oom else "\n".join(log.strip().splitlines()[-5:])
        out["error"] = f"no memory analysis (exit {proc.returncode}): {tail[:600]}"
    return out


def _gib(x) -> str:
    return "—" if x is None else f"{x / GIB:.1f}"


def _libtpu(d: dict) -> str | None:
    return d.get("versions", {}).get("libtpu")


def table(results: dict) -> str:
    """ours ÷ MaxText compares the two sides only when both compiled with the same libtpu."""
    head = (
        "| case | model | topology (chips) | seq × batch (accum) | meditron_jax args / temp / total GiB | "
        "no options: total GiB | on our pinned libtpu: total GiB (no options) | MaxText args / temp / total GiB | "
        "libtpu (ours / MaxText) | ours ÷ MaxText | usable HBM GiB | fits (ours / MaxText) |"
    )
    rows = [head, "|" + "---|" * 12]
    for case in CASES:
        r = results.get(case.key, {})
        ours, mt, plain = r.get("ours", {}), r.get("maxtext", {}), r.get("ours_unchunked", {})
        pinned, pinned_plain = r.get("ours_pinned", {}), r.get("ours_pinned_unchunked", {})

        def cell(d):
            if not d:
                return "not run"
            if "total_bytes" not in d:
                return d.get("error", "error")[:120]
            return f"{_gib(d['argument_bytes'])} / {_gib(d['temp_bytes'])} / **{_gib(d['total_bytes'])}**"

        hbm = ours.get("hbm_bytes") or pinned.get("hbm_bytes")
        fits_mt = "—" if "total_bytes" not in mt or hbm is None else str(mt["total_bytes"] <= hbm).lower()
        same = _libtpu(ours) is not None and _libtpu(ours) == _libtpu(mt)
        ratio = "—"
        if "total_bytes" in ours and "total_bytes" in mt:
            ratio = f"{ours['total_bytes'] / mt['total_bytes']:.2f}" + ("" if same else " (libtpu differs)")
        plain_cell = _gib(plain.get("total_bytes")) if plain else "not run"
        pinned_cell = f"{_gib(pinned.get('total_bytes'))} ({_gib(pinned_plain.get('total_bytes'))})"
        rows.append(
            f"| {case.key} | {case.model} / {case.maxtext_model} | {case.topology} ({case.chips}) | "
            f"{case.seq_len} × {case.global_batch} ({case.grad_accum}) | {cell(ours)} | {plain_cell} | {pinned_cell} | "
            f"{cell(mt)} | {_libtpu(ours) or '—'} / {_libtpu(mt) or '—'} | {ratio} | {_gib(hbm)} | "
            f"{str(ours.get('fits', '—')).lower()} / {fits_mt} |"
        )
    return "\n".join(rows)


def libtpu_folder(spec: str | None, maxtext_python: str | None) -> str | None:
    """A folder to put first on our PYTHONPATH so that our side compiles with another libtpu; None: our own.

    spec: "pinned" (ours, setup.cfg's), "maxtext" (the libtpu of MaxText's venv, linked into a folder of its
    own: its site-packages also hold a jax our code does not run on), or a folder from
    ``pip install --no-deps --target DIR libtpu==X``.
    """
    if spec in (None, "", "pinned"):
        return None
    if spec != "maxtext":
        if not (Path(spec) / "libtpu").is_dir():
            raise SystemExit(f"--libtpu {spec}: no libtpu package in that folder")
        return spec
    if not maxtext_python:
        raise SystemExit("--libtpu maxtext needs a MaxText installation (MAXTEXT_PYTHON / --maxtext-python)")
    v = versions(maxtext_python)
    if "error" in v:
        raise SystemExit(f"--libtpu maxtext: cannot import libtpu with {maxtext_python}: {v['error']}")
    package = Path(v["libtpu_dir"])
    folder = Path(tempfile.gettempdir()) / f"aot_bench_libtpu_{v['libtpu']}"
    folder.mkdir(exist_ok=True)
    for target in (package, *package.parent.glob(f"libtpu-{v['libtpu']}.dist-info")):
        link = folder / target.name
        if not link.exists():
            link.symlink_to(target)
    return str(folder)


def result_key(side: str, plain: bool, libtpu: str | None) -> str:
    """ours / ours_unchunked: compiled with MaxText's (or a given) libtpu; ours_pinned*: with our pinned one."""
    if side == "maxtext":
        return "maxtext"
    return ("ours" if libtpu else "ours_pinned") + ("_unchunked" if plain else "")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", action="append", help=f"case keys: {', '.join(c.key for c in CASES)}")
    p.add_argument("--side", choices=["both", "ours", "maxtext"], default="both")
    p.add_argument("--force", action="store_true", help="re-run cached cases")
    p.add_argument("--table", action="store_true", help="only print the cached table")
    p.add_argument(
        "--maxtext-python",
        default=os.environ.get("MAXTEXT_PYTHON"),
        help="python of a venv with `pip install maxtext[tpu]` (Python 3.12)",
    )
    p.add_argument("--timeout", type=int, default=3600)
    p.add_argument(
        "--plain", action="store_true", help="our side without the per-case options (stored as ours_unchunked)"
    )
    p.add_argument("--override", action="append", default=[], help="extra ModelConfig override for our side")
    p.add_argument(
        "--libtpu",
        default=os.environ.get("OURS_LIBTPU"),
        help="libtpu for our side: 'maxtext' (default when MaxText is given: both sides on one compiler; MaxText "
        "0.2.5 needs libtpu >= 0.0.46), 'pinned' (setup.cfg's, stored as ours_pinned*), or a folder from "
        "`pip install --no-deps --target DIR libtpu==X`",
    )
    args = p.parse_args(argv)
    spec = args.libtpu or ("maxtext" if args.maxtext_python else "pinned")
    libtpu = libtpu_folder(spec, args.maxtext_python) if args.side != "maxtext" and not args.table else None
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    if not args.table:
        for case in CASES:
            if args.only and case.key not in args.only:
                continue
            entry = results.setdefault(case.key, {})
            for side in ("ours", "maxtext"):
                if args.side not in ("both", side):
                    continue
                key = result_key(side, args.plain, libtpu)
                if key in entry and not args.force:
                    continue
                print(f"[{case.key}] compiling ({key}) ...", file=sys.stderr, flush=True)
                entry[key] = (
                    run_ours(case, args.timeout, plain=args.plain, extra=args.override, libtpu=libtpu)
                    if side == "ours"
                    else run_maxtext(case, args.maxtext_python, args.timeout)
                )
                # Merge into what is on disk now: the two sides may run as two processes at once.
                on_disk = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
                on_disk.setdefault(case.key, {})[key] = entry[key]
                if side == "ours" and not case.overrides and not args.override:  # one program: both columns
                    on_disk[case.key][result_key(side, not args.plain, libtpu)] = entry[key]
                RESULTS.write_text(json.dumps(on_disk, indent=1, sort_keys=True))
                results = on_disk
    print(table(json.loads(RESULTS.read_text()) if RESULTS.exists() else results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
