#!/usr/bin/env python
"""Where the CPU training step's time goes, part by part: each part of the model against its matmuls alone.

A trace of XLA:CPU's step cannot say this: its thunk executor runs independent instructions at the same time,
so an event's span includes waits (docs/performance.md, third round). Here each part of the bench model
(``bench/train_throughput.py``'s shape) is its own jitted forward + backward, next to a "skeleton" that does
only the same matmuls on the same shapes (no norms, RoPE, softmax, SiLU, masks or loss). The parts and the
4096² reference matmul take turns, round by round, in one process.

* real − skeleton: what the part's non-matmul work costs;
* skeleton ÷ reference rate: how fast XLA runs the part's matmul shapes (the attention's batched products
  are small, [batch·heads, 128–512, 64]);
* the sum of the parts against the whole step (``--step``): what lies outside them (embedding, layer scan,
  optimizer).

    python bench/step_components.py --rounds 5
    python bench/step_components.py --rounds 5 --step     # also the whole train step (tokens only)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
from meditron_jax.host_memory import reuse_freed_memory  # noqa: E402

reuse_freed_memory()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import train_throughput as tt  # noqa: E402

from meditron_jax.model.layers import MLP, Attention  # noqa: E402
from meditron_jax.model.llama import vocab_logits  # noqa: E402
from meditron_jax.model.loss import head_cross_entropy_sums  # noqa: E402
from meditron_jax.train.metrics import model_flops_per_token  # noqa: E402


def parts(shape: tt.Shape) -> dict:
    """name → (jitted forward + backward of (params, x), params, x, model FLOPs of forward + backward)."""
    cfg = shape.model_config()
    b, s, d, f, v, n = shape.batch, shape.seq_len, shape.hidden, shape.mlp, shape.vocab, shape.layers
    h = shape.heads
    t, hd = b * s, d // h
    rng = np.random.default_rng(0)

    def w(*dims):
        return jnp.asarray(rng.standard_normal(dims, np.float32) * 0.02)

    x = jnp.asarray(rng.standard_normal((b, s, d), np.float32))
    sink = w(b, s, d)  # a random cotangent: the loss is <out, sink>, so nothing folds away
    pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    targets = jnp.asarray(rng.integers(0, v, (b, s)), jnp.int32)
    weights = jnp.ones((b, s), jnp.float32)

    def chained(block):  # n residual blocks, each with its own parameters: x → x + block(p_i, x)
        def loss(ps, x):
            for p in ps:
                x = x + block(p, x)
            return jnp.sum(x * sink)

        return loss

    def heads(y):  # [t, d] → [b·h, s, hd], as cpu_attention lays them out
        return y.reshape(b, s, h, hd).transpose(0, 2, 1, 3).reshape(b * h, s, hd)

    def attention_matmuls(p, x):
        x2 = x.reshape(t, d)
        q, k, vv = (heads(x2 @ p[name]) for name in "qkv")
        o = jnp.einsum("bqk,bkd->bqd", jnp.einsum("bqd,bkd->bqk", q, k), vv)
        return (o.reshape(b, h, s, hd).transpose(0, 2, 1, 3).reshape(t, d) @ p["o"]).reshape(b, s, d)

    def mlp_matmuls(p, x):
        x2 = x.reshape(t, d)
        return (((x2 @ p["gate"]) * (x2 @ p["up"])) @ p["down"]).reshape(b, s, d)

    attention, mlp = Attention(cfg), MLP(cfg)
    key = jax.random.PRNGKey
    attn_flops = n * (8 * t * d * d + 4 * b * h * s * s * hd) * 3  # forward + backward: 3× the forward
    mlp_flops = n * 6 * t * d * f * 3
    head_flops = 2 * t * d * v * 3
    head_sink = w(t, v)
    table = {
        "attention": (
            chained(lambda p, x: attention.apply(p, x, pos, None)),
            [attention.init(key(i), x, pos, None) for i in range(n)],
            attn_flops,
        ),
        "attention, matmuls only": (
            chained(attention_matmuls),
            [{k: w(d, d) for k in "qkvo"} for _ in range(n)],
            attn_flops,
        ),
        "MLP": (chained(lambda p, x: mlp.apply(p, x)), [mlp.init(key(i), x) for i in range(n)], mlp_flops),
        "MLP, matmuls only": (
            chained(mlp_matmuls),
            [dict(gate=w(d, f), up=w(d, f), down=w(f, d)) for _ in range(n)],
            mlp_flops,
        ),
        "head + cross-entropy": (
            lambda p, x: head_cross_entropy_sums(cfg, x, p, targets, weights, vocab_logits)[0],
            w(d, v),
            head_flops,
        ),
        # squared, so that the backward needs the forward product (with a linear loss XLA drops it)
        "head, matmul only": (lambda p, x: jnp.sum(jnp.square(x.reshape(t, d) @ p) * head_sink), w(d, v), head_flops),
    }
    return {
        name: (jax.jit(jax.grad(fn, argnums=(0, 1))), params, x, flops) for name, (fn, params, flops) in table.items()
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--step", action="store_true", help="also time the whole train step (tokens only)")
    args = ap.parse_args(argv)
    shape = tt.DEFAULT
    runs = parts(shape)
    calls = {name: (lambda fn=fn, p=p, x=x: fn(p, x)) for name, (fn, p, x, _) in runs.items()}
    step_flops = model_flops_per_token(shape.model_config(), shape.seq_len) * shape.tokens
    if args.step:
        stepper = tt.OursStepper(shape, packed=False)
        calls["whole train step"] = stepper  # one blocking step per call; it donates and replaces its state
    for call in calls.values():  # compile, then one more call each: the heap grows in the first ones
        jax.block_until_ready(call())
        jax.block_until_ready(call())
    times: dict[str, list[float]] = {name: [] for name in calls}
    reference = []
    load = os.getloadavg()[0]
    for _ in range(args.rounds):
        reference.append(tt.bench_matmul(repeats=1)["step_time_s"])
        for name, call in calls.items():
            start = time.perf_counter()
            jax.block_until_ready(call())
            times[name].append(time.perf_counter() - start)
    ref_rate = 2.0 * 4096**3 / min(reference)
    print(
        f"{shape.batch} × {shape.seq_len} tokens, {shape.layers} layers, float32, forward + backward; "
        f"{args.rounds} rounds taking turns; "
        f"load average {load:.1f} -> {os.getloadavg()[0]:.1f}; XLA 4096² matmul (best) {ref_rate / 1e9:.1f} GFLOP/s"
    )
    print("| part | ms, median (best) | model GFLOP | ÷ matmul rate (median) |")
    print("|---|---|---|---|")
    flops = {name: f for name, (*_, f) in runs.items()} | {"whole train step": step_flops}
    for name, ts in times.items():
        med = statistics.median(ts)
        print(
            f"| {name} | {med * 1e3:.0f} ({min(ts) * 1e3:.0f}) | {flops[name] / 1e9:.1f} | "
            f"{flops[name] / med / ref_rate:.2f} |"
        )
    med = {name: statistics.median(ts) for name, ts in times.items()}
    real = ("attention", "MLP", "head + cross-entropy")
    skeleton = ("attention, matmuls only", "MLP, matmuls only", "head, matmul only")
    print(
        "\nnon-matmul work (real − matmuls only, medians): "
        + ", ".join(f"{r} {1e3 * (med[r] - med[k]):+.0f} ms" for r, k in zip(real, skeleton, strict=True))
    )
    if args.step:
        rest = med["whole train step"] - sum(med[r] for r in real)
        print(
            f"whole step − the three parts: {rest * 1e3:+.0f} ms (embedding, layer scan, norms outside, optimizer); "
            f"the matmuls alone would run the step at {step_flops / sum(med[k] for k in skeleton) / ref_rate:.2f} "
            "of the matmul rate"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
