#!/usr/bin/env python
"""How fast XLA:CPU runs the CPU training step's attention products, against its own 4096² matmul.

``cpu_attention`` (``meditron_jax/kernels/xla.py``) runs batch × heads small products: per layer of the CPU
bench, 48 of them for each of the six products (scores, probabilities · values, and four in the backward), in
causal blocks of 128 query rows against 128–512 keys. This prints, for each product form and block shape,
which library XLA:CPU gave it (a YNNPACK fusion or an Eigen ``dot``) and its rate as a share of the 4096²
reference matmul, all taking turns in one process.

* ``two independent``: the same product twice in one program, on different inputs. If XLA:CPU ran the two at
  once (one per core), it would take about the time of one.

    python bench/attention_products.py
    taskset -c 0 python bench/attention_products.py     # one core: the small products run as fast as on two
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
from meditron_jax.host_memory import reuse_freed_memory  # noqa: E402

reuse_freed_memory()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

# The three product forms of cpu_attention's forward and backward (head-major, batch × heads merged).
FORMS = {
    "q·kᵀ (scores; dO·vᵀ)": "bqd,bkd->bqk",
    "p·v (output; dS·k)": "bqk,bkd->bqd",
    "pᵀ·dO (dV; dSᵀ·q)": "bqk,bqd->bkd",
}


def library(fn, *args) -> str:
    entry = fn.lower(*args).compile().as_text().split("ENTRY", 1)[1]
    return "YNNPACK" if "ynn_fusion" in entry else "Eigen" if " dot(" in entry else "other"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--batch_heads", type=int, default=48, help="batch × heads (the bench: 4 × 12)")
    ap.add_argument("--head_dim", type=int, default=64)
    ap.add_argument("--block_q", type=int, default=128)
    ap.add_argument("--seq", type=int, default=512)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    n, d = args.batch_heads, args.head_dim

    def rand(*shape):
        return jnp.asarray(rng.standard_normal(shape, np.float32))

    cases = {}  # name → (jitted, inputs, flops)
    shapes = [(args.block_q, kv) for kv in range(args.block_q, args.seq + 1, args.block_q)] + [(args.seq, args.seq)]
    for label, form in FORMS.items():
        for q_len, kv_len in shapes:
            sizes = {"b": n, "q": q_len, "k": kv_len, "d": d}
            lhs, rhs = form.split("->")[0].split(",")
            inputs = (rand(*(sizes[c] for c in lhs)), rand(*(sizes[c] for c in rhs)))
            fn = jax.jit(lambda x, y, form=form: jnp.einsum(form, x, y))
            cases[f"{label} | [{n}, {q_len}, {kv_len}]"] = (fn, inputs, 2.0 * n * q_len * kv_len * d)
    q_len, kv_len = args.block_q, args.seq - args.block_q
    one = (rand(n, q_len, d), rand(n, kv_len, d))
    two = jax.jit(lambda x, y, x2, y2: (jnp.einsum("bqd,bkd->bqk", x, y), jnp.einsum("bqd,bkd->bqk", x2, y2)))
    cases[f"two independent q·kᵀ | 2 × [{n}, {q_len}, {kv_len}]"] = (
        two,
        one + (rand(n, q_len, d), rand(n, kv_len, d)),
        2 * 2.0 * n * q_len * kv_len * d,
    )
    reference = jax.jit(lambda a: a @ a)
    big = rand(4096, 4096)
    libs = {name: library(fn, *inputs) for name, (fn, inputs, _) in cases.items()}
    for fn, inputs, _ in cases.values():
        jax.block_until_ready(fn(*inputs))
    jax.block_until_ready(reference(big))
    times: dict[str, list[float]] = {name: [] for name in cases}
    ref_times = []
    load = os.getloadavg()[0]
    for _ in range(args.rounds):
        start = time.perf_counter()
        jax.block_until_ready(reference(big))
        ref_times.append(time.perf_counter() - start)
        for name, (fn, inputs, _) in cases.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*inputs))
            times[name].append(time.perf_counter() - start)
    ref_rate = 2.0 * 4096**3 / min(ref_times)
    print(
        f"{len(os.sched_getaffinity(0))} CPU(s) usable; {args.rounds} rounds taking turns; load average {load:.1f} -> "
        f"{os.getloadavg()[0]:.1f}; XLA 4096² matmul (best) {ref_rate / 1e9:.1f} GFLOP/s"
    )
    print("| product | [batch·heads, rows, keys] | library | ms, median | ÷ matmul rate |")
    print("|---|---|---|---|---|")
    for name, (_, _, flops) in cases.items():
        label, shape = name.split(" | ")
        med = statistics.median(times[name])
        print(f"| {label} | {shape} | {libs[name]} | {med * 1e3:.2f} | {flops / med / ref_rate:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
