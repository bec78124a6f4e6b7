#!/usr/bin/env python
"""The CPU training step under three host-allocator settings, each in its own process, taking turns step by step.

* ``default``: glibc's malloc as the process starts (``MEDITRON_HOST_MALLOC=default``): XLA:CPU's large
  per-step buffers are ``mmap``-ed and ``munmap``-ed every step, so their pages fault again each step;
* ``reuse``: ``meditron_jax.host_memory.reuse_freed_memory`` (what the command-line tools and benchmarks do):
  one arena, no ``mmap`` chunks, no trimming;
* ``reuse+thp``: the same plus ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` (transparent huge pages for the
  heap; a start-up setting, so only in a fresh process).

The settings act when a process starts, so each runs in a child; the parent asks each child for one step in
turn, so slow drifts in the neighbours' load hit every setting alike. Each child warms up with two steps (the
first compiles; reused memory settles after the heap has grown to its high-water mark). Columns: median and
best step time, page faults and kernel CPU seconds per step (``getrusage``), and the median ratio to
``default``.

    python bench/host_malloc.py --steps 4            # the benchmark shape of bench/train_throughput.py
    python bench/host_malloc.py --small --steps 3    # 4 layers, 2 x 256 tokens

``--growth N`` instead runs N steps back to back in this one process (freed memory reused) and lists the
steps that page-faulted, with the resident set's high-water mark after each: where the heap grew.
``--pause S`` sleeps S seconds after each step (docs/performance.md, fifth round: the growth is mostly a
race between freeing one step's temporaries and allocating the next's).

    python bench/host_malloc.py --small --growth 45
    python bench/host_malloc.py --small --growth 45 --pause 0.02
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {
    "default": {"MEDITRON_HOST_MALLOC": "default"},
    "reuse": {},
    "reuse+thp": {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"},
}


def child(small: bool, packed: bool, warmup: int) -> int:
    import resource

    sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
    import train_throughput as tt  # applies reuse_freed_memory() unless MEDITRON_HOST_MALLOC=default

    stepper = tt.OursStepper(tt.SMALL if small else tt.DEFAULT, packed=packed)
    for _ in range(warmup):
        stepper()
    print(json.dumps({"ready": True, "reused": tt.HOST_MALLOC_REUSED}), flush=True)
    for _ in sys.stdin:
        before = resource.getrusage(resource.RUSAGE_SELF)
        stepper()
        after = resource.getrusage(resource.RUSAGE_SELF)
        row = {
            "step_s": stepper.times[-1],
            "faults": after.ru_minflt - before.ru_minflt,
            "sys_s": after.ru_stime - before.ru_stime,
            "loss": stepper.loss,
        }
        print(json.dumps(row), flush=True)
    return 0


def growth(small: bool, packed: bool, steps: int, pause: float) -> int:
    import resource
    import time

    sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
    import train_throughput as tt  # applies reuse_freed_memory() unless MEDITRON_HOST_MALLOC=default

    stepper = tt.OursStepper(tt.SMALL if small else tt.DEFAULT, packed=packed)
    print(f"{steps} steps back to back, {pause} s pause after each; freed memory reused: {tt.HOST_MALLOC_REUSED}")
    print("| step | s | page faults | resident high-water mark GiB |")
    print("|---|---|---|---|")
    grew = 0
    for step in range(1, steps + 1):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        stepper()
        after = resource.getrusage(resource.RUSAGE_SELF)
        faults = after.ru_minflt - before
        if faults > 10_000 or step == 1:  # the first step compiles and first touches everything
            grew += step > 1
            print(f"| {step} | {stepper.times[-1]:.2f} | {faults:,} | {after.ru_maxrss / 2**20:.2f} |", flush=True)
        time.sleep(pause)
    print(f"\nsteps after the first with more than 10,000 page faults: {grew}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--small", action="store_true")
    p.add_argument("--tokens_only", action="store_true", help="tokens and targets only (default: packed batch)")
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--growth", type=int, metavar="N", help="N steps back to back in this process: where the heap grew")
    p.add_argument("--pause", type=float, default=0.0, help="with --growth: seconds of sleep after each step")
    args = p.parse_args(argv)
    if args.growth:
        return growth(args.small, not args.tokens_only, args.growth, args.pause)
    if args.child:
        return child(args.small, not args.tokens_only, warmup=2)

    sys.path.insert(0, str(ROOT))
    from meditron_jax.host_memory import GLIBC_SETTINGS, OPT_OUT

    cleared = {*GLIBC_SETTINGS, OPT_OUT, "GLIBC_TUNABLES"}  # each child starts from its own setting only
    base = {k: v for k, v in os.environ.items() if k not in cleared}
    cmd = [sys.executable, __file__, "--child"] + (["--small"] if args.small else [])
    cmd += ["--tokens_only"] if args.tokens_only else []
    procs = {}
    for name in args.settings:
        procs[name] = subprocess.Popen(
            cmd, env={**base, **SETTINGS[name]}, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        line = procs[name].stdout.readline()  # one at a time: compiles do not overlap
        if not line:
            raise SystemExit(f"{name}: the child process failed to start (see its stderr above)")
        print(f"{name}: ready {json.loads(line)}", file=sys.stderr, flush=True)
    rows: dict[str, list[dict]] = {name: [] for name in procs}
    load = [os.getloadavg()[0]]
    for _ in range(args.steps):
        for name, proc in procs.items():
            proc.stdin.write("step\n")
            proc.stdin.flush()
            rows[name].append(json.loads(proc.stdout.readline()))
        load.append(os.getloadavg()[0])
    for proc in procs.values():
        proc.stdin.close()
        proc.wait()

    losses = {name: [r["loss"] for r in rs] for name, rs in rows.items()}
    same = len({tuple(v) for v in losses.values()}) == 1
    med = {name: statistics.median(r["step_s"] for r in rs) for name, rs in rows.items()}
    ref = med.get("default")
    print("| setting | step s, median (best) | page faults / step | kernel CPU s / step | default ÷ this |")
    print("|---|---|---|---|---|")
    for name, rs in rows.items():
        best = min(r["step_s"] for r in rs)
        faults = statistics.median(r["faults"] for r in rs)
        sys_s = statistics.median(r["sys_s"] for r in rs)
        ratio = f"{ref / med[name]:.2f}" if ref else "—"
        print(f"| {name} | {med[name]:.2f} ({best:.2f}) | {faults:,.0f} | {sys_s:.2f} | {ratio} |")
    print(f"\nsame losses in every process: {same}; load average (1 min) per round: {[round(x, 1) for x in load]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
