"""Plain-XLA attention: the reference every other path is measured against."""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Large negative instead of -inf so fully masked rows (padding) give a uniform softmax, not NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def make_mask(q_len: int, kv_len: int, *, causal: bool, segment_ids=None, kv_segment_ids=None):
    """Boolean mask [batch or 1, q_len, kv_len]; True where a query may attend to a key.

    Causal alignment is bottom-right: query i sits at key position ``kv_len - q_len + i``.
    """
    mask = None
    if causal:
        q_pos = jnp.arange(q_len)[:, None] + (kv_len - q_len)
        mask = (q_pos >= jnp.arange(kv_len)[None, :])[None]
    if segment_ids is not None:
        kv_seg = segment_ids if kv_segment_ids is None else kv_segment_ids
        seg = segment_ids[:, -q_len:, None] == kv_seg[:, None, :]
        mask = seg if mask is None else jnp.logical_and(mask, seg)
    return mask


def masked_attention(q, k, v, mask, softmax_scale: float):
    """Softmax attention with an explicit mask, GQA without repeating K/V.

    q: [b, q_len, heads, d]; k, v: [b, kv_len, kv_heads, d]; mask: bool, broadcastable to
    [b, q_len, kv_len], or None. Scores and softmax in float32; output in q's dtype.
    """
    b, q_len, heads, d = q.shape
    kv_heads = k.shape[2]
    groups = heads // kv_heads
    qg = q.reshape(b, q_len, kv_heads, groups, d)
    scores = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=jnp.float32)
    scores = scores * softmax_scale
    if mask is not None:
        scores = jnp.where(mask[:, None, None, :, :], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, q_len, heads, d).astype(q.dtype)


def reference_attention(q, k, v, *, causal=True, segment_ids=None, softmax_scale):
    mask = make_mask(q.shape[1], k.shape[1], causal=causal, segment_ids=segment_ids)
    return masked_attention(q, k, v, mask, softmax_scale)
