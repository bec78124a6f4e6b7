#!/usr/bin/env python
"""Where the CPU training step's time and bytes go: XLA's own accounting of the compiled step.

For the benchmark shape of ``bench/train_throughput.py`` (or ``--small``) this compiles meditron_jax's train
step and prints deterministic evidence that does not depend on the neighbours' load:

* ``cost_analysis()``: FLOPs and bytes accessed of the whole step against the model FLOPs (6·N + attention);
* ``memory_analysis()``: argument / output / temporary bytes;
* the optimised HLO's instruction histogram (dots, fusions, copies, transposes, ...), and the biggest
  non-dot buffers written, from ``compiled.as_text()``;
* ``--time N``: N timed steps, best and median, next to XLA's float32 4096² matmul in the same process;
* ``--trace DIR``: a ``jax.profiler`` trace of two steps (open with TensorBoard/xprof);
* ``--dump DIR``: XLA's dump (``--xla_dump_to``: HLO before/after optimisation, buffer assignment).

``--packed`` feeds the trainer's batch; ``--set field=value`` overrides ModelConfig (remat_policy,
attention_impl, scan_layers, loss_chunk_size, ...); set ``XLA_FLAGS`` in the environment for XLA:CPU options.

    nice -n 5 python bench/train_profile.py --time 3
    XLA_FLAGS=--xla_cpu_use_thunk_runtime=false python bench/train_profile.py --time 3
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Every row runs with freed memory reused (meditron_jax/host_memory.py; MEDITRON_HOST_MALLOC=default: off).
from meditron_jax.host_memory import reuse_freed_memory  # noqa: E402

HOST_MALLOC_REUSED = reuse_freed_memory()


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true")
    p.add_argument("--packed", action="store_true", help="the trainer's five-key batch (else tokens only)")
    p.add_argument("--set", action="append", default=[], help="ModelConfig override, e.g. loss_chunk_size=128")
    p.add_argument("--time", type=int, default=0, help="timed steps after one warm-up step")
    p.add_argument("--trace", default=None)
    p.add_argument("--dump", default=None)
    p.add_argument("--hlo", default=None, help="write the optimised HLO text here")
    p.add_argument("--json", default=None)
    p.add_argument(
        "--compare",
        action="append",
        default=[],
        help="NAME|field=value,...|xla_option=value,...: a variant (ModelConfig overrides, per-compile XLA "
        "options); with two or more, their steps take turns with a matmul in between and only timings print",
    )
    return p.parse_args(argv)


_OP = re.compile(r"^\s*(?:ROOT )?%?[\w.-]+ = (\w+)\[([^\]]*)\][^ ]* (\w[\w-]*)\(")


def hlo_histogram(text: str) -> dict:
    """Instruction counts and written bytes by opcode, over every computation of the optimised module."""
    sizes = {"f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "pred": 1, "s8": 1, "u8": 1}
    count: collections.Counter = collections.Counter()
    written: collections.Counter = collections.Counter()
    for line in text.splitlines():
        m = _OP.match(line)
        if not m:
            continue
        dtype, dims, op = m.groups()
        count[op] += 1
        n = 1
        for d in dims.split(","):
            if d.strip().isdigit():
                n *= int(d)
        written[op] += n * sizes.get(dtype, 4)
    return {"count": dict(count.most_common()), "written_bytes": dict(written.most_common())}


def trace_summary(trace_dir: str, top: int = 400) -> list:
    """Total time per event name over every thread of the newest trace under ``trace_dir`` (XLA:CPU records
    one event per executed thunk, named after its HLO instruction), biggest first."""
    from jax.profiler import ProfileData

    files = sorted(Path(trace_dir).rglob("*.xplane.pb"), key=lambda f: f.stat().st_mtime)
    data = ProfileData.from_file(str(files[-1]))
    totals: collections.Counter = collections.Counter()
    calls: collections.Counter = collections.Counter()
    skip = ("ThreadpoolListener", "ThunkExecutor", "end: ", "$")
    for plane in data.planes:
        for line in plane.lines:
            if line.name == "python":
                continue
            for event in line.events:
                if not event.name.startswith(skip):
                    totals[event.name] += event.duration_ns
                    calls[event.name] += 1
    grand = sum(totals.values())
    return [{"name": "(all ops, all threads)", "ms": round(grand / 1e6, 1), "calls": sum(calls.values())}] + [
        {"name": k, "ms": round(v / 1e6, 2), "calls": calls[k], "share": round(v / grand, 4)}
        for k, v in totals.most_common(top)
    ]


def _values(text: str) -> dict:
    out = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        out[key.strip()] = json.loads(value) if value and value[0] in "0123456789tfn[{-" else value
    return out


def compare(args) -> int:
    """Variants in one process, one step each in turn (and a 4096² matmul after every round)."""
    import train_throughput as tt

    shape = tt.SMALL if args.small else tt.DEFAULT
    steppers = {}
    for spec in args.compare:
        name, cfg_text, opt_text = (spec.split("|") + ["", ""])[:3]
        cfg = shape.model_config().replace(**_values(cfg_text))
        steppers[name] = tt.OursStepper(shape, args.packed, config=cfg, compiler_options=_values(opt_text) or None)
    for stepper in steppers.values():
        stepper()  # compile + first step
    load = [os.getloadavg()[0]]
    mm = []
    for _ in range(args.time or 3):
        for stepper in steppers.values():
            stepper()
        mm.append(tt.bench_matmul(repeats=1)["step_time_s"])
        load.append(os.getloadavg()[0])
    from meditron_jax.train.metrics import model_flops_per_token

    mm_rate = 2.0 * 4096**3 / min(mm) / 1e9
    result = {"matmul_gflops_best": round(mm_rate, 1), "load": [round(x, 1) for x in load], "variants": {}}
    for name, stepper in steppers.items():
        flops = model_flops_per_token(stepper.cfg, shape.seq_len) * shape.tokens
        times = stepper.times[1:]
        result["variants"][name] = {
            "best_s": round(min(times), 3),
            "median_s": round(statistics.median(times), 3),
            "best_ratio_to_matmul": round(flops / min(times) / 1e9 / mm_rate, 3),
            "loss": stepper.loss,
            "times": [round(t, 2) for t in times],
        }
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


def main(argv=None) -> int:
    args = _parse(argv)
    if len(args.compare) > 1:
        return compare(args)
    if args.dump:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={args.dump}").strip()
    import jax
    import numpy as np
    import train_throughput as tt

    from meditron_jax.train.metrics import model_flops_per_token

    shape = tt.SMALL if args.small else tt.DEFAULT
    base = shape.model_config()
    overrides = _values(",".join(args.set))
    cfg = base.replace(**overrides)
    stepper = tt.OursStepper(shape, packed=args.packed, config=cfg)
    t = time.perf_counter()
    keys = tuple(stepper.batch)
    lowered = stepper.step_fn.lower(shape.batch, shape.seq_len, keys)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    mem = compiled.memory_analysis()
    text = compiled.as_text()
    if args.hlo:
        Path(args.hlo).write_text(text)
    model_flops = model_flops_per_token(cfg, shape.seq_len) * shape.tokens
    out = {
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "overrides": overrides,
        "packed": args.packed,
        "compile_s": round(compile_s, 1),
        "xla_flops": cost.get("flops"),
        "model_flops": model_flops,
        "xla_flops_over_model": cost.get("flops", 0) / model_flops,
        "bytes_accessed": cost.get("bytes accessed"),
        "transcendentals": cost.get("transcendentals"),
        "temp_bytes": mem.temp_size_in_bytes,
        "argument_bytes": mem.argument_size_in_bytes,
        "output_bytes": mem.output_size_in_bytes,
        "alias_bytes": mem.alias_size_in_bytes,
        "hlo": hlo_histogram(text),
    }
    if args.time:
        mm = tt.bench_matmul()
        times = []
        mm_times = []
        faults = []
        stepper()  # warm-up (compiles through the jit cache)
        for _ in range(args.time):
            before = resource.getrusage(resource.RUSAGE_SELF)
            stepper()
            after = resource.getrusage(resource.RUSAGE_SELF)
            times.append(stepper.times[-1])
            faults.append((after.ru_minflt - before.ru_minflt, round(after.ru_stime - before.ru_stime, 2)))
            mm_times.append(tt.bench_matmul(repeats=1)["step_time_s"])
        best_mm = min([mm["step_time_s"], *mm_times])
        out["step_times_s"] = [round(x, 3) for x in times]
        # Page faults and kernel CPU seconds per step: what reusing freed memory removes (host_memory.py).
        out["page_faults_and_sys_s_per_step"] = faults
        out["host_malloc_reused"] = HOST_MALLOC_REUSED
        out["best_step_s"] = min(times)
        out["median_step_s"] = statistics.median(times)
        out["matmul_gflops_best"] = mm["flops"] / best_mm / 1e9
        out["step_gflops_best"] = model_flops / min(times) / 1e9
        out["ratio_to_matmul_best"] = out["step_gflops_best"] / out["matmul_gflops_best"]
        out["load"] = [round(x, 2) for x in os.getloadavg()]
    if args.trace:
        jax.profiler.start_trace(args.trace)
        for _ in range(2):
            stepper()
        jax.profiler.stop_trace()
        out["trace_top_ops"] = trace_summary(args.trace)
    np.set_printoptions(linewidth=200)
    counts = out["hlo"]["count"]
    print(
        json.dumps({k: v for k, v in out.items() if k != "hlo"}, indent=1, default=str),
        "\nHLO counts:",
        {k: counts[k] for k in list(counts)[:25]},
    )
    for row in out.get("trace_top_ops", []):
        print(f"{row['ms']:10.1f} ms {row['calls']:6d}x {row.get('share', 1):6.1%}  {row['name'][:100]}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
