"""Batched generation with a KV cache: one prefill, then a scanned loop of single-token decode steps.

Prompts of different lengths are left-padded; padding is masked out of attention and positions count
only real tokens, so each row computes exactly what it would alone.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from meditron_jax.config import ModelConfig
from meditron_jax.model import Llama, init_cache


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0):
    """tokens [b, P], real-token mask [b, P] (int32), positions [b, P] for left-padded prompts."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (e.g. BOS)")
    width = max(len(p) for p in prompts)
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    real = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, width - len(p) :] = p
        real[i, width - len(p) :] = 1
    positions = np.maximum(np.cumsum(real, axis=1) - 1, 0).astype(np.int32)
    return tokens, real, positions


def sample_logits(logits, rng, temperature: float, top_k: int | None, top_p: float | None):
    """Greedy when temperature == 0; else temperature / top-k / nucleus sampling. logits: [b, vocab]."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None and top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p
        cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "temperature", "top_k", "top_p"))
def _generate(
    params,
    tokens,
    real,
    positions,
    rng,
    *,
    config: ModelConfig,
    max_new_tokens: int,
    temperature: float,
    top_k,
    top_p,
    eos_id,
):
    model = Llama(config)
    b, width = tokens.shape
    cache = init_cache(config, b, width + max_new_tokens)
    logits, state = model.apply(
        {"params": params, "cache": cache}, tokens, positions, real, mode="prefill", mutable=["cache"]
    )
    next_pos = positions[:, -1:] + 1

    def step(carry, _):
        cache, last_logits, pos, done, rng = carry
        rng, sub = jax.random.split(rng)
        tok = sample_logits(last_logits, sub, temperature, top_k, top_p)
        tok = jnp.where(done, eos_id, tok)
        done = done | (tok == eos_id)
        logits, state = model.apply(
            {"params": params, "cache": cache}, tok[:, None], pos, jnp.ones_like(pos), mode="decode", mutable=["cache"]
        )
        return (state["cache"], logits[:, -1], pos + 1, done, rng), tok

    init = (state["cache"], logits[:, -1], next_pos, jnp.zeros((b,), jnp.bool_), rng)
    _, out = jax.lax.scan(step, init, None, length=max_new_tokens)
    return out.T  # [b, max_new_tokens]


def generate_ids(
    config: ModelConfig,
    params,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_id: int | None = None,
    pad_id: int = 0,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
) -> list[list[int]]:
    """New token ids per prompt, cut after the first EOS (which is kept)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1 (got {max_new_tokens})")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (got {temperature})")
    eos_id = config.eos_token_id if eos_id is None else eos_id
    tokens, real, positions = left_pad(prompts, pad_id)
    total = tokens.shape[1] + max_new_tokens
    if total > config.max_position_embeddings:
        raise ValueError(
            f"prompt ({tokens.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
            f"model's context of {config.max_position_embeddings}"
        )
    out = _generate(
        params,
        jnp.asarray(tokens),
        jnp.asarray(real),
        jnp.asarray(positions),
        jax.random.PRNGKey(seed),
        config=config,
        max_new_tokens=max_new_tokens,
        temperature=float(temperature),
        top_k=top_k,
        top_p=top_p,
        eos_id=eos_id,
    )
    result = []
    for row in np.asarray(out).tolist():
        result.append(row[: row.index(eos_id) + 1] if eos_id in row else row)
    return result
