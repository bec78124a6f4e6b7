"""Choose an attention implementation by backend and shape, or as forced by the caller."""

from __future__ import annotations

import math

from meditron_jax.config import ATTENTION_IMPLS
from meditron_jax.kernels import xla


def attention(q, k, v, *, causal=True, segment_ids=None, softmax_scale=None, impl="auto", interpret=False):
    """Multi-head / grouped-query attention.

    q: [batch, q_len, heads, head_dim]; k, v: [batch, kv_len, kv_heads, head_dim];
    segment_ids: [batch, length] int, tokens attend only within their own segment.
    softmax_scale defaults to 1/sqrt(head_dim).
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention impl {impl!r} is not one of {ATTENTION_IMPLS}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads {q.shape[2]} are not a multiple of kv heads {k.shape[2]}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    return xla.reference_attention(q, k, v, causal=causal, segment_ids=segment_ids, softmax_scale=scale)
