#!/usr/bin/env python
"""The parts of a decode step on the bench shape (``bench-134m``), each timed alone, forms side by side.

What `bench/decode_throughput.py`'s profile found a batch-16 step made of, and the forms tried for each
(docs/performance.md, Decode, fourth round), all taking turns call by call in one process pinned to
``--threads`` cores (default 1, as the decode bench):

* the greedy argmax over [batch, 32000] logits: ``jnp.argmax`` against ``sampling.greedy_tokens``;
* attention over the cache, [batch, 12 heads, 192 slots, 64]: the engine's ``kernels.decode_attention``
  (the `cpu_native` kernel), XLA's ``head_major_attention`` (two batched dots, the fallback), the same as
  multiply + reduce, and the dots in two independent batch halves (`bench/decode_attention.py`: the kernel
  at the 7B, 70B and Falcon head layouts);
* the thin matmuls, x [batch, in] against weights [in, out] (as stored), through ``kernels.matmul`` as the
  model calls it (the thin kernel for 2 to 32 rows on one CPU device), and torch's ``x @ W`` on the same
  cores (the decode bench's peer), and packed in panels as the engine holds them (`kernels.pack_panels`);
  for the wide outputs also weights [out, in] contracted on their last
  axis, and weights as compile-time constants (which XLA:CPU lets YNNPACK pack once). The output head's
  weights are 98 MB, so consecutive calls find them in memory, not in cache, as a decode step does.

    python bench/decode_parts.py                 # one core, batch 16 and 1
    python bench/decode_parts.py --threads 2
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time

from cores import cpu_bench_process

CORES = cpu_bench_process(turns_of_milliseconds=True)  # before jax starts: XLA sizes its pool from it

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from meditron_jax import kernels  # noqa: E402
from meditron_jax.config import get_config  # noqa: E402
from meditron_jax.infer.sampling import greedy_tokens  # noqa: E402
from meditron_jax.kernels import cpu_native  # noqa: E402
from meditron_jax.kernels.xla import head_major_attention  # noqa: E402

try:
    import torch
except ImportError:  # the peer's form is skipped
    torch = None

CONFIG = get_config("bench-134m")


def cases_for(batch: int, cache_len: int, rng) -> dict[str, tuple]:
    """name → (jitted function, inputs); names are "part | form"."""
    c = CONFIG
    heads, d = c.num_heads, c.hidden_size // c.num_heads

    def rand(*shape):
        return jnp.asarray(rng.standard_normal(shape, np.float32))

    cases = {}
    logits = rand(batch, c.vocab_size)
    cases["argmax | jnp.argmax"] = (jax.jit(lambda x: jnp.argmax(x, -1).astype(jnp.int32)), (logits,))
    cases["argmax | greedy_tokens"] = (jax.jit(greedy_tokens), (logits,))

    q, k, v = rand(batch, 1, heads, d), rand(batch, heads, cache_len, d), rand(batch, heads, cache_len, d)
    mask = jnp.ones((batch, 1, cache_len), bool)
    scale = d**-0.5

    def multiply_reduce(q, k, v, mask):
        scores = jnp.sum(q.transpose(0, 2, 1, 3) * k, -1) * scale  # [b, h, slots]
        p = jax.nn.softmax(jnp.where(mask, scores, -jnp.inf), -1)
        return jnp.sum(p[..., None] * v, 2)[:, None]  # [b, 1, h, d]

    def halves(q, k, v, mask):
        parts = (slice(0, batch // 2), slice(batch // 2, None))
        return jnp.concatenate([head_major_attention(q[s], k[s], v[s], mask[s], scale) for s in parts])

    where = f"cache attention [{batch}, {heads}, {cache_len}, {d}]"
    if cpu_native.available():
        valid, first = mask[:, 0], jnp.int32(cache_len - 1)
        cases[f"{where} | kernels.decode_attention (the engine's)"] = (
            jax.jit(lambda q, k, v: kernels.decode_attention(q, k, v, valid, first, softmax_scale=scale)),
            (q, k, v),
        )
    cases[f"{where} | two batched dots (XLA, the fallback)"] = (
        jax.jit(lambda q, k, v, m: head_major_attention(q, k, v, m, scale)),
        (q, k, v, mask),
    )
    cases[f"{where} | multiply + reduce"] = (jax.jit(multiply_reduce), (q, k, v, mask))
    if batch > 1:
        cases[f"{where} | dots in two batch halves"] = (jax.jit(halves), (q, k, v, mask))

    shapes = (
        (c.hidden_size, c.hidden_size),
        (c.hidden_size, c.intermediate_size),
        (c.intermediate_size, c.hidden_size),
        (c.hidden_size, c.vocab_size),
    )
    for n_in, n_out in shapes:
        x = rand(batch, n_in)
        w = rand(n_in, n_out)
        constant = np.asarray(w)
        where = f"x [{batch}, {n_in}] · W → {n_out}"
        cases[f"{where} | W [in, out] (stored)"] = (jax.jit(lambda x, w: x @ w), (x, w))
        cases[f"{where} | kernels.matmul (auto, W as stored)"] = (jax.jit(kernels.matmul), (x, w))
        if cpu_native.available() and n_out % cpu_native.panel_width() == 0:
            width = cpu_native.panel_width()
            cases[f"{where} | kernels.matmul, W in panels (the engine's)"] = (
                jax.jit(functools.partial(kernels.matmul, panels=width)),
                (x, kernels.pack_panels(w, width)),
            )
        if torch is not None:
            tx, tw = torch.from_numpy(np.array(x)), torch.from_numpy(constant.copy())
            cases[f"{where} | torch x @ W (the peer)"] = (lambda tx=tx, tw=tw: (tx @ tw).numpy(), ())
        if n_out == c.hidden_size:  # the other forms were measured in the fourth round, on the wide outputs
            continue
        cases[f"{where} | W [out, in], contracted last"] = (
            jax.jit(lambda x, wt: jnp.einsum("mk,nk->mn", x, wt)),
            (x, jnp.asarray(constant.T.copy())),
        )
        cases[f"{where} | W a compile-time constant"] = (jax.jit(lambda x, w=constant: x @ w), (x,))
    return cases


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1, help="cores to pin the process to (0: all)")
    ap.add_argument("--batches", type=int, nargs="+", default=[16, 1])
    ap.add_argument("--cache_len", type=int, default=192, help="cache slots (the decode bench: 128 + 64)")
    ap.add_argument("--rounds", type=int, default=30)
    args = ap.parse_args(argv)
    if torch is not None:
        torch.set_num_threads(len(CORES))
    rng = np.random.default_rng(0)
    cases = {}
    for batch in args.batches:
        cases.update({f"batch {batch} | {k}": fn for k, fn in cases_for(batch, args.cache_len, rng).items()})
    first = {}  # each part's forms must agree with its first form
    for name, (fn, inputs) in cases.items():
        out = np.asarray(fn(*inputs))
        part = name.rsplit(" | ", 1)[0]
        if part in first:
            np.testing.assert_allclose(out, first[part], rtol=1e-4, atol=1e-3, err_msg=name)
        else:
            first[part] = out
    times: dict[str, list[float]] = {name: [] for name in cases}
    load = os.getloadavg()[0]
    for _ in range(args.rounds):
        for name, (fn, inputs) in cases.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*inputs))
            times[name].append(time.perf_counter() - start)
    print(
        f"{len(CORES)} core(s); {args.rounds} rounds taking turns; load average {load:.1f} -> {os.getloadavg()[0]:.1f}"
    )
    print("| batch | part | form | ms, median (best) |")
    print("|---|---|---|---|")
    for name, t in times.items():
        batch, part, form = name.split(" | ")
        print(f"| {batch.split()[1]} | {part} | {form} | {statistics.median(t) * 1e3:.3f} ({min(t) * 1e3:.3f}) |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
