"""Convenience entry points over the engine: ``left_pad`` (the batch layout) and ``generate_ids``.

Prompts of different lengths are left-padded; padding is masked out of attention and positions count only
real tokens, so each row computes exactly what it would alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from meditron_jax.config import ModelConfig
from meditron_jax.infer.engine import Engine
from meditron_jax.infer.sampling import SamplingParams


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
    frequency_penalty: float = 0.0,
    seed: int = 0,
    **engine_kwargs,
) -> list[list[int]]:
    """New token ids per prompt, cut after the first EOS (kept). ``eos_id=-1``: no stop token.
    ``pad_id`` is accepted for compatibility; padding is masked out, so its value changes nothing.

    Builds a one-off `Engine`; keep an `Engine` to generate repeatedly without recompiling.
    """
    eos_id = config.eos_token_id if eos_id is None else eos_id
    sampling = SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=1.0 if top_p is None else top_p,
        frequency_penalty=frequency_penalty,
        stop_token_ids=() if eos_id < 0 else (eos_id,),
        seed=seed,
    )
    engine = Engine(config, params, **engine_kwargs)
    return [per[0] for per in engine.generate_ids([list(p) for p in prompts], sampling)]
