"""Flash attention for NVIDIA GPUs as Pallas (Triton) kernels: forward, and a two-kernel backward.

Layout is the caller's [batch, length, heads, head_dim]; a program owns one query tile (forward, dQ) or
one key tile (dK/dV) of one head and loops over the other sequence in registers. Grouped-query attention
indexes key/value head ``h // groups``; the dK/dV program of a KV head loops over its ``groups`` query
heads (viewing q as [b, len, kv_heads, groups * d], a free reshape), so neither K/V nor their gradients
are ever repeated. Sequence lengths are padded to tile multiples and padded keys masked by position;
head_dim is zero-padded to a power of two (Triton's tile rule), which leaves q·k and the output unchanged.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from meditron_jax.kernels.common import (
    MASK_VALUE,
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

MIN_BLOCK = 16  # Triton's smallest dot tile
MAX_HEAD_DIM = 256  # larger tiles do not fit in shared memory with useful block sizes


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes (powers of two, >= 16). Untuned starting points; no GPU was available to tune them."""

    block_q: int = 128
    block_kv: int = 64
    block_q_bwd: int = 64
    block_kv_bwd: int = 64
    num_warps: int | None = None  # default: 4 for head_dim <= 64, else 8
    num_stages: int = 2

    def __post_init__(self):
        for name in ("block_q", "block_kv", "block_q_bwd", "block_kv_bwd"):
            value = getattr(self, name)
            if value < MIN_BLOCK or value & (value - 1):
                raise ValueError(f"pallas_gpu: {name}={value} must be a power of two >= {MIN_BLOCK}")


def check_supported(q, k, v, segment_ids, *, causal: bool):
    p = check_inputs(q, k, v, segment_ids, causal=causal, who="pallas_gpu")
    if p.head_dim > MAX_HEAD_DIM:
        raise ValueError(f"pallas_gpu: head_dim {p.head_dim} > {MAX_HEAD_DIM} is not supported")
    if q.dtype == jnp.float64:
        raise ValueError("pallas_gpu: float64 inputs are not supported (Triton dots are float32 at most)")
    return p


@dataclasses.dataclass(frozen=True)
class _Config:
    causal: bool
    scale: float
    offset: int
    kv_len: int
    kv_padded: bool
    groups: int
    head_dim: int  # padded
    block_q: int
    block_kv: int
    block_q_bwd: int
    block_kv_bwd: int
    num_warps: int
    num_stages: int
    interpret: bool


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def flash_attention(q, k, v, *, causal=True, segment_ids=None, softmax_scale, block_sizes=None, interpret=False):
    """q: [b, q_len, heads, d]; k, v: [b, kv_len, kv_heads, d] → [b, q_len, heads, d]."""
    p = check_supported(q, k, v, segment_ids, causal=causal)
    bs = block_sizes or BlockSizes()
    q_cap, kv_cap = max(MIN_BLOCK, _pow2(p.q_len)), max(MIN_BLOCK, _pow2(p.kv_len))
    bq, bk = min(bs.block_q, q_cap), min(bs.block_kv, kv_cap)
    bq_bwd, bk_bwd = min(bs.block_q_bwd, q_cap), min(bs.block_kv_bwd, kv_cap)
    q_pad = round_up(p.q_len, max(bq, bq_bwd))  # powers of two: the larger is a multiple of the smaller
    kv_pad = round_up(p.kv_len, max(bk, bk_bwd))
    d_pad = max(MIN_BLOCK, _pow2(p.head_dim))
    cfg = _Config(
        causal=p.causal,
        scale=float(softmax_scale),
        offset=p.offset,
        kv_len=p.kv_len,
        kv_padded=kv_pad != p.kv_len,
        groups=p.groups,
        head_dim=d_pad,
        block_q=bq,
        block_kv=bk,
        block_q_bwd=bq_bwd,
        block_kv_bwd=bk_bwd,
        num_warps=bs.num_warps or (4 if d_pad <= 64 else 8),
        num_stages=bs.num_stages,
        interpret=interpret,
    )
    segs = split_segments(segment_ids, p, q_pad, kv_pad) if segment_ids is not None else None

    def pad(x, length):
        return pad_axis(pad_axis(x, 1, length), 3, d_pad)

    out = _flash(cfg, pad(q, q_pad), pad(k, kv_pad), pad(v, kv_pad), segs)
    return out[:, : p.q_len, :, : p.head_dim]


def _dot(a, b, *, trans_b=False):
    # float32 inputs: full precision rather than TF32, so results match the reference to ~1e-6.
    return plgpu.dot(a, b, trans_b=trans_b, allow_tf32=False if a.dtype == jnp.float32 else None)


def _compiler_params(cfg: _Config):
    return plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _mask(cfg: _Config, q_idx, kv_idx, q_seg=None, kv_seg=None):
    mask = position_mask(
        q_idx, kv_idx, causal=cfg.causal, offset=cfg.offset, kv_len=cfg.kv_len, kv_padded=cfg.kv_padded
    )
    if q_seg is not None:
        mask = and_masks(mask, q_seg == kv_seg)
    return mask


# ------------------------------------------------------------------------------------------------ forward


def _fwd_kernel(*all_refs, cfg: _Config, has_seg: bool, save_lse: bool, num_kv: int):
    refs = list(all_refs)
    q_ref, k_ref, v_ref = refs[:3]
    qseg_ref, kvseg_ref = refs[3:5] if has_seg else (None, None)
    del refs[: 5 if has_seg else 3]
    o_ref = refs[0]
    lse_ref = refs[1] if save_lse else None
    bq, bk, d = cfg.block_q, cfg.block_kv, cfg.head_dim
    i = pl.program_id(0)
    q = q_ref[...]
    rows = i * bq + jnp.arange(bq)
    q_seg = None if qseg_ref is None else qseg_ref[...]

    def body(j, carry):
        acc, m, denom = carry
        start = pl.multiple_of(j * bk, bk)
        s = _dot(q, k_ref[pl.ds(start, bk), :], trans_b=True) * cfg.scale
        cols = start + jnp.arange(bk)
        mask = _mask(
            cfg,
            rows[:, None],
            cols[None, :],
            None if q_seg is None else q_seg[:, None],
            None if kvseg_ref is None else kvseg_ref[pl.ds(start, bk)][None, :],
        )
        if mask is not None:
            s = jnp.where(mask, s, MASK_VALUE)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp(m - m_new)
        pr = jnp.exp(s - m_new[:, None])
        denom = alpha * denom + jnp.sum(pr, axis=1)
        v = v_ref[pl.ds(start, bk), :]
        acc = acc * alpha[:, None] + _dot(pr.astype(v.dtype), v)
        return acc, m_new, denom

    hi = causal_kv_blocks(i, bq, bk, cfg.offset, num_kv) if cfg.causal else num_kv
    init = (jnp.zeros((bq, d), jnp.float32), jnp.full((bq,), MASK_VALUE, jnp.float32), jnp.zeros((bq,), jnp.float32))
    acc, m, denom = lax.fori_loop(0, hi, body, init)
    out, lse = finish_rows(acc, m, denom)
    o_ref[...] = out.astype(o_ref.dtype)
    if lse_ref is not None:
        lse_ref[...] = lse


def _forward(cfg: _Config, q, k, v, segs, save_lse: bool):
    b, q_pad, h, d = q.shape
    kv_pad = k.shape[1]
    bq, g = cfg.block_q, cfg.groups
    num_q, num_kv = q_pad // bq, kv_pad // cfg.block_kv
    has_seg = segs is not None
    in_specs = [
        pl.BlockSpec((None, bq, None, d), lambda i, bi, hi: (bi, i, hi, 0)),
        pl.BlockSpec((None, kv_pad, None, d), lambda i, bi, hi: (bi, 0, hi // g, 0)),
        pl.BlockSpec((None, kv_pad, None, d), lambda i, bi, hi: (bi, 0, hi // g, 0)),
    ]
    args = [q, k, v]
    if has_seg:
        in_specs += [
            pl.BlockSpec((None, bq), lambda i, bi, hi: (bi, i)),
            pl.BlockSpec((None, kv_pad), lambda i, bi, hi: (bi, 0)),
        ]
        args += list(segs)
    out_specs = [pl.BlockSpec((None, bq, None, d), lambda i, bi, hi: (bi, i, hi, 0))]
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
    if save_lse:
        out_specs.append(pl.BlockSpec((None, None, bq), lambda i, bi, hi: (bi, hi, i)))
        out_shape.append(jax.ShapeDtypeStruct((b, h, q_pad), jnp.float32))
    outs = pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg, has_seg=has_seg, save_lse=save_lse, num_kv=num_kv),
        grid=(num_q, b, h),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=_compiler_params(cfg),
        interpret=cfg.interpret,
        name="meditron_flash_fwd",
    )(*args)
    return outs[0], (outs[1] if save_lse else None)


# ------------------------------------------------------------------------------------------------ backward


def _dkv_kernel(*refs, cfg: _Config, has_seg: bool, num_q: int):
    """One key tile of one KV head; loops over the group's query heads and the query tiles.

    Tiles are computed transposed (keys as rows) so dK and dV are plain row-major products.
    """
    if has_seg:
        q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, qseg_ref, kvseg_ref, dk_ref, dv_ref = refs
    else:
        q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, dk_ref, dv_ref = refs
        qseg_ref = kvseg_ref = None
    bq, bk, d = cfg.block_q_bwd, cfg.block_kv_bwd, cfg.head_dim
    j = pl.program_id(0)
    k, v = k_ref[...], v_ref[...]
    kv_rows = j * bk + jnp.arange(bk)
    kv_seg = None if kvseg_ref is None else kvseg_ref[...][:, None]
    lo = causal_first_q_block(j, bq, bk, cfg.offset, num_q) if cfg.causal else 0

    def head(gi, carry):
        def q_tile(i, carry):
            dk, dv = carry
            start = pl.multiple_of(i * bq, bq)
            cols = pl.ds(start, bq)
            heads = pl.ds(pl.multiple_of(gi * d, d), d)
            q, do = q_ref[cols, heads], do_ref[cols, heads]
            st = _dot(k, q, trans_b=True) * cfg.scale  # (bk, bq)
            q_idx = start + jnp.arange(bq)
            mask = _mask(
                cfg, q_idx[None, :], kv_rows[:, None], None if qseg_ref is None else qseg_ref[cols][None, :], kv_seg
            )
            if mask is not None:
                st = jnp.where(mask, st, MASK_VALUE)
            pt = jnp.exp(st - lse_ref[gi, cols][None, :])
            dv = dv + _dot(pt.astype(do.dtype), do)
            dpt = _dot(v, do, trans_b=True)
            dst = pt * (dpt - di_ref[gi, cols][None, :]) * cfg.scale
            dk = dk + _dot(dst.astype(q.dtype), q)
            return dk, dv

        return lax.fori_loop(lo, num_q, q_tile, carry)

    zeros = jnp.zeros((bk, d), jnp.float32)
    dk, dv = lax.fori_loop(0, cfg.groups, head, (zeros, zeros))
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(*refs, cfg: _Config, has_seg: bool, num_kv: int):
    if has_seg:
        q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, qseg_ref, kvseg_ref, dq_ref = refs
    else:
        q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, dq_ref = refs
        qseg_ref = kvseg_ref = None
    bq, bk, d = cfg.block_q, cfg.block_kv, cfg.head_dim
    i = pl.program_id(0)
    q, do = q_ref[...], do_ref[...]
    lse, di = lse_ref[...][:, None], di_ref[...][:, None]
    rows = i * bq + jnp.arange(bq)
    q_seg = None if qseg_ref is None else qseg_ref[...][:, None]

    def body(j, dq):
        start = pl.multiple_of(j * bk, bk)
        k, v = k_ref[pl.ds(start, bk), :], v_ref[pl.ds(start, bk), :]
        s = _dot(q, k, trans_b=True) * cfg.scale
        cols = start + jnp.arange(bk)
        mask = _mask(
            cfg,
            rows[:, None],
            cols[None, :],
            q_seg,
            None if kvseg_ref is None else kvseg_ref[pl.ds(start, bk)][None, :],
        )
        if mask is not None:
            s = jnp.where(mask, s, MASK_VALUE)
        pr = jnp.exp(s - lse)
        ds = pr * (_dot(do, v, trans_b=True) - di)
        return dq + _dot(ds.astype(k.dtype), k)

    hi = causal_kv_blocks(i, bq, bk, cfg.offset, num_kv) if cfg.causal else num_kv
    dq = lax.fori_loop(0, hi, body, jnp.zeros((bq, d), jnp.float32))
    dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _backward(cfg: _Config, q, k, v, segs, out, lse, do):
    b, q_pad, h, d = q.shape
    kv_pad, kvh = k.shape[1], k.shape[2]
    g = cfg.groups
    has_seg = segs is not None
    di = jnp.einsum("bqhd,bqhd->bhq", do.astype(jnp.float32), out.astype(jnp.float32))

    # dK, dV: grid (kv tile, batch, kv head).
    bq, bk = cfg.block_q_bwd, cfg.block_kv_bwd
    num_q, num_kv = q_pad // bq, kv_pad // bk
    grouped = (b, q_pad, kvh, g * d)  # free view: a KV head's query heads side by side
    in_specs = [
        pl.BlockSpec((None, q_pad, None, g * d), lambda j, bi, hk: (bi, 0, hk, 0)),
        pl.BlockSpec((None, bk, None, d), lambda j, bi, hk: (bi, j, hk, 0)),
        pl.BlockSpec((None, bk, None, d), lambda j, bi, hk: (bi, j, hk, 0)),
        pl.BlockSpec((None, q_pad, None, g * d), lambda j, bi, hk: (bi, 0, hk, 0)),
        pl.BlockSpec((None, None, g, q_pad), lambda j, bi, hk: (bi, hk, 0, 0)),
        pl.BlockSpec((None, None, g, q_pad), lambda j, bi, hk: (bi, hk, 0, 0)),
    ]
    args = [q.reshape(grouped), k, v, do.reshape(grouped), lse.reshape(b, kvh, g, q_pad), di.reshape(b, kvh, g, q_pad)]
    if has_seg:
        in_specs += [
            pl.BlockSpec((None, q_pad), lambda j, bi, hk: (bi, 0)),
            pl.BlockSpec((None, bk), lambda j, bi, hk: (bi, j)),
        ]
        args += list(segs)
    kv_out = pl.BlockSpec((None, bk, None, d), lambda j, bi, hk: (bi, j, hk, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg, has_seg=has_seg, num_q=num_q),
        grid=(num_kv, b, kvh),
        in_specs=in_specs,
        out_specs=[kv_out, kv_out],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_compiler_params(cfg),
        interpret=cfg.interpret,
        name="meditron_flash_dkv",
    )(*args)

    # dQ: grid (q tile, batch, head).
    bq, bk = cfg.block_q, cfg.block_kv
    num_q, num_kv = q_pad // bq, kv_pad // bk
    q_spec = pl.BlockSpec((None, bq, None, d), lambda i, bi, hi: (bi, i, hi, 0))
    kv_spec = pl.BlockSpec((None, kv_pad, None, d), lambda i, bi, hi: (bi, 0, hi // g, 0))
    row_spec = pl.BlockSpec((None, None, bq), lambda i, bi, hi: (bi, hi, i))
    in_specs = [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec]
    args = [q, k, v, do, lse, di]
    if has_seg:
        in_specs += [
            pl.BlockSpec((None, bq), lambda i, bi, hi: (bi, i)),
            pl.BlockSpec((None, kv_pad), lambda i, bi, hi: (bi, 0)),
        ]
        args += list(segs)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg, has_seg=has_seg, num_kv=num_kv),
        grid=(num_q, b, h),
        in_specs=in_specs,
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_compiler_params(cfg),
        interpret=cfg.interpret,
        name="meditron_flash_dq",
    )(*args)
    return dq, dk, dv


_flash = flash_with_vjp(_forward, _backward)
