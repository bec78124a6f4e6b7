"""Plain-XLA attention: the reference every other path is measured against, and a blockwise
(online-softmax, memory linear in sequence length) version for CPU and wherever no kernel applies."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from meditron_jax.kernels.common import (
    MASK_VALUE,
    accum_dtype,
    and_masks,
    causal_first_q_block,
    causal_kv_blocks,
    check_inputs,
    finish_rows,
    flash_with_vjp,
    pad_axis,
    position_mask,
    round_up,
    split_segments,
)

__all__ = [
    "MASK_VALUE",
    "BlockwiseSizes",
    "blockwise_attention",
    "cpu_attention",
    "head_major_attention",
    "make_mask",
    "masked_attention",
    "reference_attention",
]


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
    Rows whose mask is all False output zeros (and pass no gradient).
    """
    b, q_len, heads, d = q.shape
    kv_heads = k.shape[2]
    groups = heads // kv_heads
    adt = accum_dtype(q.dtype)
    qg = q.reshape(b, q_len, kv_heads, groups, d)
    scores = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=adt)
    scores = scores * softmax_scale
    if mask is not None:
        scores = jnp.where(mask[:, None, None, :, :], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", probs.astype(v.dtype), v, preferred_element_type=adt)
    if mask is not None:
        # Zero on the [b, q, h, d] output, not on the probabilities: keeps the reference's memory as is.
        has_key = jnp.broadcast_to(jnp.any(mask, axis=-1), (b, q_len))
        out = out * has_key[:, :, None, None, None].astype(out.dtype)
    return out.reshape(b, q_len, heads, d).astype(q.dtype)


def head_major_attention(q, k, v, mask, softmax_scale: float, merge_batch: bool = False):
    """`masked_attention` against head-major K/V: decode's cache, and training's attention on CPU.

    q: [b, q_len, heads, d]; k, v: [b, kv_heads, kv_len, d]; mask: bool, broadcastable to [b, q_len, kv_len],
    or None. Same result as `masked_attention`. Head-major, both products are plain batched matmuls over
    (batch, heads); token-major, XLA:CPU transposed a copy of the whole KV cache per layer and decode step.
    ``merge_batch``: batch and heads as one batch dimension (free reshapes), for XLA:CPU's training step,
    where with two its dot canonicalisation adds transposes around the backward's products
    (docs/performance.md); not for the decode cache, which XLA:CPU then copies every step.
    """
    b, q_len, heads, d = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    groups = heads // kv_heads
    adt = accum_dtype(q.dtype)
    lead = (b * kv_heads,) if merge_batch else (b, kv_heads)
    # [.., groups × q_len, d]: the query heads sharing a KV head share its matmul.
    qg = q.reshape(b, q_len, kv_heads, groups, d).transpose(0, 2, 3, 1, 4).reshape(*lead, groups * q_len, d)
    k, v = k.reshape(*lead, kv_len, d), v.reshape(*lead, kv_len, d)
    if mask is not None:
        # Masked in the products' own shape: a 5-D view here made XLA:CPU's backward 1.5× slower.
        mask = jnp.broadcast_to(mask[:, None, None], (b, kv_heads, groups, q_len, kv_len))
        mask = mask.reshape(*lead, groups * q_len, kv_len)
    out = _softmax_products(qg, k, v, mask, softmax_scale).astype(adt)
    out = out.reshape(b, kv_heads, groups, q_len, d).transpose(0, 3, 1, 2, 4)  # [b, q, kv_heads, groups, d]
    if mask is not None:
        has_key = jnp.any(mask.reshape(b, kv_heads, groups, q_len, kv_len)[:, 0, 0], axis=-1)
        out = out * has_key[:, :, None, None, None].astype(out.dtype)
    return out.reshape(b, q_len, heads, d).astype(q.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _softmax_products(q, k, v, mask, scale):
    """softmax(q kᵀ · scale, masked) v over leading batch dims, in float32 (``accum_dtype``)."""
    return _softmax_forward(q, k, v, mask, scale)[0]


def _softmax_forward(q, k, v, mask, scale):
    adt = accum_dtype(q.dtype)
    scores = jnp.einsum("...qd,...kd->...qk", q, k, preferred_element_type=adt) * scale
    if mask is not None:
        scores = jnp.where(mask, scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("...qk,...kd->...qd", probs.astype(v.dtype), v, preferred_element_type=adt)
    return out, (q, k, v, probs, out)  # no mask: masked probabilities are already 0


def _softmax_backward(scale, saved, dout):
    """Flash attention's backward on the saved probabilities: the softmax's row term is rowsum(dO·O), a
    [.., q, d] reduction, where autodiff reduces dP·P over [.., q, k] (4% of the CPU step)."""
    q, k, v, probs, out = saved
    adt = probs.dtype
    dout = dout.astype(adt)
    dv = jnp.einsum("...qk,...qd->...kd", probs, dout)
    dp = jnp.einsum("...qd,...kd->...qk", dout, v, preferred_element_type=adt)
    delta = jnp.sum(dout * out, axis=-1, keepdims=True)
    ds = probs * (dp - delta) * scale
    dq = jnp.einsum("...qk,...kd->...qd", ds, k, preferred_element_type=adt)
    dk = jnp.einsum("...qk,...qd->...kd", ds, q, preferred_element_type=adt)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_softmax_products.defvjp(_softmax_forward, _softmax_backward)


# Query rows per block of `cpu_attention`'s causal split (fastest of 64 to 256 at the CPU bench's 512 tokens).
CPU_CAUSAL_BLOCK_Q = 128


def cpu_attention(q, k, v, *, causal=True, segment_ids=None, softmax_scale, block_q=None):
    """What "auto" runs on CPU while the scores are small: `head_major_attention` on K/V transposed once.

    Causal, the queries go in blocks of ``block_q`` rows (default ``CPU_CAUSAL_BLOCK_Q``), each against the
    prefix of keys it can see, so the products and softmax passes over the masked upper triangle are never
    computed: at 512 tokens, 4 blocks do 5/8 of the work of whole scores, and one layer's attention forward
    and backward took 0.54–0.67× the time (docs/performance.md). Masked keys get probability 0 either way.
    """
    q_len, kv_len = q.shape[1], k.shape[1]
    block_q = block_q or CPU_CAUSAL_BLOCK_Q
    mask = make_mask(q_len, kv_len, causal=causal, segment_ids=segment_ids)
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    if not causal or q_len <= block_q:
        return head_major_attention(q, kh, vh, mask, softmax_scale, merge_batch=True)
    offset = kv_len - q_len  # bottom-right alignment: query i sees keys up to offset + i
    outs = []
    for start in range(0, q_len, block_q):
        stop = min(q_len, start + block_q)
        seen = min(kv_len, max(1, offset + stop))  # at least one key: rows that see none are zeroed by the mask
        outs.append(
            head_major_attention(
                q[:, start:stop], kh[:, :, :seen], vh[:, :, :seen], mask[:, start:stop, :seen], softmax_scale, True
            )
        )
    return jnp.concatenate(outs, axis=1)


def reference_attention(q, k, v, *, causal=True, segment_ids=None, softmax_scale):
    mask = make_mask(q.shape[1], k.shape[1], causal=causal, segment_ids=segment_ids)
    return masked_attention(q, k, v, mask, softmax_scale)


# --------------------------------------------------------------------------------------------------
# Blockwise attention: loops over query blocks and key blocks, never holding more than one
# [block_q, block_kv] tile of scores per head. The backward pass is written by hand (flash-attention
# style recomputation from the saved log-sum-exp), so its memory is linear in length too.


@dataclasses.dataclass(frozen=True)
class BlockwiseSizes:
    block_q: int = 512
    block_kv: int = 512


@dataclasses.dataclass(frozen=True)
class _Static:
    causal: bool
    scale: float
    offset: int
    kv_len: int
    kv_padded: bool
    block_q: int
    block_kv: int


def blockwise_attention(q, k, v, *, causal=True, segment_ids=None, softmax_scale, block_sizes=None):
    """Memory-efficient attention in plain XLA; same contract as :func:`reference_attention`."""
    p = check_inputs(q, k, v, segment_ids, causal=causal, who="xla_blockwise")
    bs = block_sizes or BlockwiseSizes()
    if bs.block_q <= 0 or bs.block_kv <= 0:
        raise ValueError(f"xla_blockwise: block sizes must be positive, got {bs}")
    # Never tile beyond the (padded) length: short inputs become one block.
    block_q = min(bs.block_q, round_up(p.q_len, 8))
    block_kv = min(bs.block_kv, round_up(p.kv_len, 8))
    q_pad, kv_pad = round_up(p.q_len, block_q), round_up(p.kv_len, block_kv)
    st = _Static(
        causal=p.causal,
        scale=float(softmax_scale),
        offset=p.offset,
        kv_len=p.kv_len,
        kv_padded=kv_pad != p.kv_len,
        block_q=block_q,
        block_kv=block_kv,
    )
    q_seg, kv_seg = split_segments(segment_ids, p, q_pad, kv_pad)
    qg = pad_axis(q, 1, q_pad).reshape(p.batch, q_pad, p.kv_heads, p.groups, p.head_dim)
    segs = None if q_seg is None else (q_seg, kv_seg)
    out = _blockwise(st, qg, pad_axis(k, 1, kv_pad), pad_axis(v, 1, kv_pad), segs)
    return out.reshape(p.batch, q_pad, p.heads, p.head_dim)[:, : p.q_len]


def _tile_mask(st: _Static, q_start, kv_start, q_seg_blk, kv_seg_blk):
    """[b or 1, 1, 1, block_q, block_kv] mask for one tile, or None."""
    rows = q_start + jnp.arange(st.block_q)[:, None]
    cols = kv_start + jnp.arange(st.block_kv)[None, :]
    mask = position_mask(rows, cols, causal=st.causal, offset=st.offset, kv_len=st.kv_len, kv_padded=st.kv_padded)
    if mask is not None:
        mask = mask[None]
    if q_seg_blk is not None:
        mask = and_masks(mask, q_seg_blk[:, :, None] == kv_seg_blk[:, None, :])
    return None if mask is None else mask[:, None, None]


def _slice(x, start, size, axis=1):
    return lax.dynamic_slice_in_dim(x, start, size, axis=axis)


def _seg_slice(seg, start, size):
    return None if seg is None else _slice(seg, start, size)


def _kv_range(st: _Static, i, num_kv):
    if not st.causal:
        return 0, num_kv
    return 0, causal_kv_blocks(i, st.block_q, st.block_kv, st.offset, num_kv)


def _q_range(st: _Static, j, num_q):
    if not st.causal:
        return 0, num_q
    return causal_first_q_block(j, st.block_q, st.block_kv, st.offset, num_q), num_q


def _forward(st: _Static, qg, k, v, segs, save_lse: bool):
    del save_lse  # the log-sum-exp is a by-product here; dropping it costs nothing
    q_seg, kv_seg = (None, None) if segs is None else segs
    b, q_pad, kvh, g, d = qg.shape
    num_q, num_kv = q_pad // st.block_q, k.shape[1] // st.block_kv
    adt = accum_dtype(qg.dtype)

    def q_block(i):
        q_start = i * st.block_q
        qb = _slice(qg, q_start, st.block_q)
        qs = _seg_slice(q_seg, q_start, st.block_q)

        def kv_step(j, carry):
            m, denom, acc = carry
            kv_start = j * st.block_kv
            s = (
                jnp.einsum("bqhgd,bkhd->bhgqk", qb, _slice(k, kv_start, st.block_kv), preferred_element_type=adt)
                * st.scale
            )
            mask = _tile_mask(st, q_start, kv_start, qs, _seg_slice(kv_seg, kv_start, st.block_kv))
            if mask is not None:
                s = jnp.where(mask, s, MASK_VALUE)
            m_new = jnp.maximum(m, s.max(axis=-1))
            alpha = jnp.exp(m - m_new)
            pr = jnp.exp(s - m_new[..., None])
            denom = alpha * denom + pr.sum(axis=-1)
            vb = _slice(v, kv_start, st.block_kv)
            acc = alpha[..., None] * acc + jnp.einsum(
                "bhgqk,bkhd->bhgqd", pr.astype(v.dtype), vb, preferred_element_type=adt
            )
            return m_new, denom, acc

        init = (
            jnp.full((b, kvh, g, st.block_q), MASK_VALUE, adt),
            jnp.zeros((b, kvh, g, st.block_q), adt),
            jnp.zeros((b, kvh, g, st.block_q, d), adt),
        )
        lo, hi = _kv_range(st, i, num_kv)
        m, denom, acc = lax.fori_loop(lo, hi, kv_step, init)
        out, lse = finish_rows(acc, m, denom)
        return out.transpose(0, 3, 1, 2, 4).astype(qg.dtype), lse

    outs, lses = lax.map(q_block, jnp.arange(num_q))
    # [num_q, b, block_q, kvh, g, d] -> [b, q_pad, kvh, g, d]; lse -> [b, kvh, g, q_pad]
    out = jnp.moveaxis(outs, 0, 1).reshape(b, q_pad, kvh, g, d)
    lse = jnp.moveaxis(lses, 0, 3).reshape(b, kvh, g, q_pad)
    return out, lse


def _backward(st: _Static, qg, k, v, segs, out, lse, dout):
    q_seg, kv_seg = (None, None) if segs is None else segs
    b, q_pad, kvh, g, d = qg.shape
    num_q, num_kv = q_pad // st.block_q, k.shape[1] // st.block_kv
    adt = accum_dtype(qg.dtype)
    # di = rowsum(dO * O): the softmax-Jacobian term, [b, kvh, g, q_pad].
    di = jnp.einsum("bqhgd,bqhgd->bhgq", dout.astype(adt), out.astype(adt))

    def kv_block(dq, j):
        kv_start = j * st.block_kv
        kb, vb = _slice(k, kv_start, st.block_kv), _slice(v, kv_start, st.block_kv)
        ks = _seg_slice(kv_seg, kv_start, st.block_kv)

        def q_step(i, carry):
            dq, dk, dv = carry
            q_start = i * st.block_q
            qb, dob = _slice(qg, q_start, st.block_q), _slice(dout, q_start, st.block_q)
            s = jnp.einsum("bqhgd,bkhd->bhgqk", qb, kb, preferred_element_type=adt) * st.scale
            mask = _tile_mask(st, q_start, kv_start, _seg_slice(q_seg, q_start, st.block_q), ks)
            if mask is not None:
                s = jnp.where(mask, s, MASK_VALUE)
            pr = jnp.exp(s - _slice(lse, q_start, st.block_q, axis=3)[..., None])
            dv = dv + jnp.einsum("bhgqk,bqhgd->bkhd", pr.astype(dout.dtype), dob, preferred_element_type=adt)
            dp = jnp.einsum("bqhgd,bkhd->bhgqk", dob, vb, preferred_element_type=adt)
            ds = pr * (dp - _slice(di, q_start, st.block_q, axis=3)[..., None]) * st.scale
            dk = dk + jnp.einsum("bhgqk,bqhgd->bkhd", ds.astype(qg.dtype), qb, preferred_element_type=adt)
            dq_blk = jnp.einsum("bhgqk,bkhd->bqhgd", ds.astype(k.dtype), kb, preferred_element_type=adt)
            dq = lax.dynamic_update_slice_in_dim(dq, _slice(dq, q_start, st.block_q) + dq_blk, q_start, axis=1)
            return dq, dk, dv

        zeros = jnp.zeros((b, st.block_kv, kvh, d), adt)
        lo, hi = _q_range(st, j, num_q)
        dq, dk, dv = lax.fori_loop(lo, hi, q_step, (dq, zeros, zeros))
        return dq, (dk.astype(k.dtype), dv.astype(v.dtype))

    dq, (dks, dvs) = lax.scan(kv_block, jnp.zeros(qg.shape, adt), jnp.arange(num_kv))
    dk = jnp.moveaxis(dks, 0, 1).reshape(k.shape)
    dv = jnp.moveaxis(dvs, 0, 1).reshape(v.shape)
    return dq.astype(qg.dtype), dk, dv


_blockwise = flash_with_vjp(_forward, _backward)
