#!/usr/bin/env python
"""Attention forward + backward on CPU: the kernels side by side, taking turns call by call.

* ``cpu_native``: the compiled kernel (``kernels/cpu_native.cc``), ``impl="auto"``'s choice on CPU for float32
  when it builds; with segments each 128-row block multiplies only its documents' keys;
* ``cpu_attention``: XLA's path, "auto"'s fallback up to 64 MiB of float32 scores (head-major, batch ×
  KV heads merged, flash attention's backward on the saved probabilities, causal queries in blocks of
  ``xla.CPU_CAUSAL_BLOCK_Q`` rows against only the keys they see);
* ``cpu_attention, whole scores``: the same in one block, as before the causal split;
* ``reference`` (``impl="xla"``): the token-major reference, differentiated by autodiff;
* ``blockwise`` (``impl="xla_blockwise"``): the memory-bounded loop, "auto"'s choice beyond 64 MiB.

Default shape: one layer of the CPU training bench (batch 4, 512 tokens, 12 heads of 64, causal, float32).
``--packed``: with the segment ids of the training bench's packed batch (documents of 32-255 tokens).

    python bench/cpu_attention.py                  # the table in docs/performance.md
    python bench/cpu_attention.py --packed --rounds 11
    python bench/cpu_attention.py --batch 1 --seq 2048
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from meditron_jax.kernels import cpu_native, xla


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--kv_heads", type=int, default=12)
    ap.add_argument("--head_dim", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--packed", action="store_true", help="the training bench's packed segment ids")
    args = ap.parse_args(argv)

    rng = np.random.default_rng(0)
    b, seq, h, kvh, d = args.batch, args.seq, args.heads, args.kv_heads, args.head_dim
    q, dout = (jnp.asarray(rng.standard_normal((b, seq, h, d)), jnp.float32) for _ in range(2))
    k, v = (jnp.asarray(rng.standard_normal((b, seq, kvh, d)), jnp.float32) for _ in range(2))
    scale = d**-0.5
    seg = None
    if args.packed:  # the import also turns on freed-memory reuse, as in every bench (meditron_jax/host_memory.py)
        from train_throughput import Shape, packed_batch

        seg = jnp.asarray(packed_batch(Shape(layers=1, batch=b, seq_len=seq))["decoder_segment_ids"])
    paths = {}
    if cpu_native.available():
        paths["cpu_native"] = cpu_native.cpu_native_attention
    else:
        print(f"cpu_native not run: {cpu_native.why_unavailable()}")
    paths |= {
        "cpu_attention": xla.cpu_attention,
        "cpu_attention, whole scores": functools.partial(xla.cpu_attention, block_q=seq),
        "reference": xla.reference_attention,
        "blockwise": xla.blockwise_attention,
    }

    def step_of(fn):
        def step(q, k, v, dout):
            _, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, causal=True, segment_ids=seg, softmax_scale=scale), q, k, v)
            return vjp(dout)

        return jax.jit(step)

    steps = {name: step_of(fn) for name, fn in paths.items()}
    grads = {name: jax.block_until_ready(step(q, k, v, dout)) for name, step in steps.items()}  # compile
    worst = max(
        float(jnp.max(jnp.abs(a - r)) / jnp.max(jnp.abs(r)))
        for name in paths
        if name != "reference"
        for a, r in zip(grads[name], grads["reference"], strict=True)
    )
    times: dict[str, list[float]] = {name: [] for name in steps}
    load = os.getloadavg()[0]
    for _ in range(args.rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            jax.block_until_ready(step(q, k, v, dout))
            times[name].append(time.perf_counter() - start)
    score_mib = b * h * seq * seq * 4 / 2**20
    print(
        f"batch {b}, {seq} tokens, {h} heads ({kvh} KV) of {d}, causal, "
        f"{'packed segments' if args.packed else 'no segments'}, "
        f"float32: {score_mib:.0f} MiB of scores; "
        f"{args.rounds} rounds taking turns; load average {load:.1f} -> {os.getloadavg()[0]:.1f}; "
        f"largest gradient difference from the reference {worst:.1e} (relative to its max)"
    )
    ref = statistics.median(times["blockwise"])
    print("| path | forward + backward ms, median (best) | blockwise ÷ this (median) |")
    print("|---|---|---|")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {med * 1e3:.1f} ({min(ts) * 1e3:.1f}) | {ref / med:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
