#!/usr/bin/env python
"""Decode's attention over the KV cache at the real models' shapes: the compiled kernel, XLA, torch.

One decode step's attention for one layer (one new token per row, the cache filled to ``--filled`` of its
slots) at four head layouts:

* ``bench-134m``: 12 heads of 64 (the decode bench's model; its cache at the bench's 160 filled slots);
* Llama-2 7B (MEDITRON-7B): 32 heads of 128;
* Llama-2 70B (MEDITRON-70B): 64 query heads sharing 8 KV heads (GQA, groups of 8), head_dim 128;
* Falcon-7B: 71 query heads sharing one KV head (MQA), head_dim 64.

Forms, taking turns call by call in one process pinned to ``--threads`` cores:

* ``kernels.decode_attention`` with "auto": the `cpu_native` kernel the engine runs on one CPU device;
* the same with impl "xla": `xla.head_major_attention`, two batched dots over every slot with the mask
  (the fallback, and what ran before the kernel);
* torch's ``scaled_dot_product_attention`` over the filled slots (what transformers' Llama runs on CPU, the
  decode bench's peer); for GQA and MQA each KV head's group of queries as the rows of one product, as
  transformers' SDPA path packs them for one new token (``pack_gqa``).

Each form reads the filled part of the cache (or all of it, for XLA) from memory, not from cache: every
call gets another of enough distinct caches to exceed the last-level cache. Reported: the median time over
``--rounds`` rounds, GB/s of the filled K and V (the bytes any form must read), and each form's time over the
first form's (the kernel's, unless ``--forms`` leaves it out). Outputs are checked against the first form's
(5e-5: float32 in different orders). torch's idle OpenMP workers sleep (``OMP_WAIT_POLICY=PASSIVE``, see
bench/cores.py): spinning, they took one of two cores from the next form's calls.

    python bench/decode_attention.py                 # one core
    python bench/decode_attention.py --threads 2 --batch 16
    python bench/decode_attention.py --threads 2 --batch 16 --layouts bench-134m --forms kernel   # alone
"""

from __future__ import annotations

import argparse
import statistics
import time

from cores import cpu_bench_process

CORES = cpu_bench_process(turns_of_milliseconds=True)  # before jax starts: XLA sizes its pool from it

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from meditron_jax import kernels  # noqa: E402
from meditron_jax.kernels import cpu_native  # noqa: E402

try:
    import torch
except ImportError:  # the peer's form is skipped
    torch = None

# name → (query heads, KV heads, head_dim, cache slots, filled slots by default)
LAYOUTS = {
    "bench-134m": (12, 12, 64, 192, 160),
    "llama2-7b": (32, 32, 128, 4096, 2048),
    "llama2-70b": (64, 8, 128, 4096, 2048),
    "falcon-7b": (71, 1, 64, 2048, 1024),
}
# --forms name → the form's row label
FORMS = {"kernel": "decode_attention, auto", "xla": "decode_attention, xla", "torch": "torch sdpa (the peer)"}
LAST_LEVEL_CACHE = 64 << 20  # distinct caches until the calls' bytes exceed this


def forms(batch: int, layout: str, filled: int | None, rng):
    heads, kv_heads, d, slots, default_filled = LAYOUTS[layout]
    filled = min(filled or default_filled, slots)
    copies = max(2, -(-LAST_LEVEL_CACHE // (batch * kv_heads * filled * d * 8)))
    q = jnp.asarray(rng.standard_normal((batch, 1, heads, d), np.float32))
    caches = []
    for _ in range(copies):
        k, v = (jnp.asarray(rng.standard_normal((batch, kv_heads, slots, d), np.float32)) for _ in range(2))
        caches.append((k, v))
    valid = jnp.asarray(np.arange(slots)[None, :].repeat(batch, 0) < filled)
    first = jnp.int32(filled - 1)
    scale = d**-0.5
    out = {}
    for impl in ("auto", "xla"):
        fn = jax.jit(
            lambda q, k, v, impl=impl: kernels.decode_attention(q, k, v, valid, first, softmax_scale=scale, impl=impl)
        )
        out[f"decode_attention, {impl}"] = (fn, [(q, k, v) for k, v in caches])
    if torch is not None:
        # a group's queries as the rows of one product per KV head, as transformers packs them for one new token
        tq = torch.from_numpy(np.array(q)).reshape(batch, kv_heads, heads // kv_heads, d)
        tcaches = [tuple(torch.from_numpy(np.array(x[:, :, :filled])) for x in kv) for kv in caches]

        def sdpa(k, v):
            o = torch.nn.functional.scaled_dot_product_attention(tq, k, v, scale=scale)
            return o.reshape(batch, 1, heads, d).numpy()

        out["torch sdpa (the peer)"] = (sdpa, tcaches)
    filled_bytes = batch * kv_heads * filled * d * 4 * 2
    return out, filled, filled_bytes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1, help="cores to pin the process to (0: all)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--filled", type=int, default=None, help="filled slots (default: per layout, half or more)")
    ap.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument(
        "--forms",
        nargs="+",
        default=list(FORMS),
        choices=list(FORMS),
        help="forms to time (default: all, taking turns); one alone is timed without the others' idle threads "
        "spinning on the same cores",
    )
    args = ap.parse_args(argv)
    if torch is not None:
        torch.set_num_threads(len(CORES))
    print(
        f"jax {jax.__version__}, {len(CORES)} core(s); cpu_native: {cpu_native.available()}; "
        f"torch {torch.__version__ if torch else 'absent'}; batch {args.batch}, one new token"
    )
    header = ("layout", "heads / KV heads × head_dim", "filled / slots", "form", "ms (best)", "GB/s of filled K, V",
              "÷ first form")  # fmt: skip
    print("| " + " | ".join(header) + " |")
    print("|---" * len(header) + "|")
    rng = np.random.default_rng(0)
    wanted = {FORMS[f] for f in args.forms}
    for layout in args.layouts:
        cases, filled, filled_bytes = forms(args.batch, layout, args.filled, rng)
        cases = {label: case for label, case in cases.items() if label in wanted}
        reference = None
        for name, (fn, inputs) in cases.items():
            got = np.asarray(fn(*inputs[0]))
            if reference is None:
                reference = got
            np.testing.assert_allclose(got, reference, rtol=5e-5, atol=5e-5, err_msg=f"{layout}: {name}")
        times: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(args.rounds):
            for name, (fn, inputs) in cases.items():
                start = time.perf_counter()
                for x in inputs:
                    jax.block_until_ready(fn(*x))
                times[name].append((time.perf_counter() - start) / len(inputs))
        heads, kv_heads, d, slots, _ = LAYOUTS[layout]
        base = statistics.median(next(iter(times.values())))
        for name, ts in times.items():
            med = statistics.median(ts)
            print(
                f"| {layout} | {heads} / {kv_heads} × {d} | {filled} / {slots} | {name} | {med * 1e3:.3f} "
                f"({min(ts) * 1e3:.3f}) | {filled_bytes / med / 1e9:.1f} | {med / base:.2f} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
