"""Flash attention for TPU as Pallas (Mosaic) kernels: forward, and a two-kernel backward (dK/dV, dQ).

Layout inside the kernels is [batch, heads, length, head_dim] so every tile's last two dimensions are
(sequence block, head_dim), as Mosaic wants. Grouped-query attention maps query head ``h`` to key/value
head ``h // groups`` in the BlockSpec index maps, so K/V are never repeated in memory; the dK/dV kernel
walks the ``groups`` query heads of a KV head in its grid and accumulates their contributions in VMEM.

Causal tiles above the diagonal are skipped and their index maps point at an already-resident block, so
skipped steps cost no DMA. Lengths are padded to block multiples and padded keys masked by position.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from meditron_jax.kernels.common import (
    EMPTY_LSE,
    MASK_VALUE,
    and_masks,
    causal_first_q_block,
    check_inputs,
    flash_with_vjp,
    pad_axis,
    position_mask,
    round_up,
    split_segments,
)

NUM_LANES = 128
NUM_SUBLANES = 8
MAX_HEAD_DIM = 512
NT_DIMS = (((1,), (1,)), ((), ()))  # a @ b.T
NN_DIMS = (((1,), (0,)), ((), ()))  # a @ b


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes (multiples of 128). Forward and dQ use (block_q, block_kv); dK/dV use the _bwd pair."""

    block_q: int = 512
    block_kv: int = 512
    block_q_bwd: int = 512
    block_kv_bwd: int = 512

    def __post_init__(self):
        for name in ("block_q", "block_kv", "block_q_bwd", "block_kv_bwd"):
            value = getattr(self, name)
            if value <= 0 or value % NUM_LANES:
                raise ValueError(f"pallas_tpu: {name}={value} must be a positive multiple of {NUM_LANES}")


# Starting points per generation (device_kind strings as JAX reports them), not tuned on hardware here.
# v4 has 16 MiB of scoped VMEM by default, so its forward key tile stays at 512; v5e/v5p/v6e have more.
DEFAULT_BLOCK_SIZES = {
    "TPU v4": BlockSizes(512, 512, 512, 512),
    "TPU v5 lite": BlockSizes(512, 1024, 512, 512),
    "TPU v5": BlockSizes(512, 1024, 512, 512),
    "TPU v5p": BlockSizes(512, 1024, 512, 512),
    "TPU v6 lite": BlockSizes(512, 1024, 512, 1024),
}


def default_block_sizes(device_kind: str | None) -> BlockSizes:
    return DEFAULT_BLOCK_SIZES.get(device_kind or "", BlockSizes())


def padded_head_dim(head_dim: int) -> int:
    """Head dims Mosaic tiles directly: multiples of 128, and 64. Others are zero-padded up to 128s."""
    if head_dim % NUM_LANES == 0 or head_dim == 64:
        return head_dim
    return round_up(head_dim, NUM_LANES)


def check_supported(q, k, v, segment_ids, *, causal: bool):
    p = check_inputs(q, k, v, segment_ids, causal=causal, who="pallas_tpu")
    if p.head_dim > MAX_HEAD_DIM:
        raise ValueError(
            f"pallas_tpu: head_dim {p.head_dim} > {MAX_HEAD_DIM} is not supported (tiles would not fit in VMEM)"
        )
    return p


def flash_attention(q, k, v, *, causal=True, segment_ids=None, softmax_scale, block_sizes=None, interpret=False):
    """q: [b, q_len, heads, d]; k, v: [b, kv_len, kv_heads, d] → [b, q_len, heads, d]."""
    p = check_supported(q, k, v, segment_ids, causal=causal)
    bs = block_sizes or BlockSizes()
    q_pad, (bq, bq_bwd) = _tiles(p.q_len, bs.block_q, bs.block_q_bwd)
    kv_pad, (bk, bk_bwd) = _tiles(p.kv_len, bs.block_kv, bs.block_kv_bwd)
    d_pad = padded_head_dim(p.head_dim)
    cfg = _Config(
        causal=p.causal,
        scale=float(softmax_scale),
        offset=p.offset,
        kv_len=p.kv_len,
        kv_padded=kv_pad != p.kv_len,
        groups=p.groups,
        block_q=bq,
        block_kv=bk,
        block_q_bwd=bq_bwd,
        block_kv_bwd=bk_bwd,
        interpret=interpret,
    )

    def to_kernel_layout(x, length):
        return pad_axis(pad_axis(x, 1, length), 3, d_pad).transpose(0, 2, 1, 3)

    segs = None
    if segment_ids is not None:
        q_seg, kv_seg = split_segments(segment_ids, p, q_pad, kv_pad)
        segs = _segment_layouts(q_seg, kv_seg)
    out = _flash(cfg, to_kernel_layout(q, q_pad), to_kernel_layout(k, kv_pad), to_kernel_layout(v, kv_pad), segs)
    return out.transpose(0, 2, 1, 3)[:, : p.q_len, :, : p.head_dim]


def _tiles(length: int, *blocks: int):
    """Padded length and tiles for it: padding only to the smallest tile, and every tile divides it.

    A tile that would not divide the padded length shrinks to the largest multiple of 128 that does
    (e.g. 1500 tokens with tiles 1024 and 512 pad to 1536 and use tiles 768 and 512, not 2048).
    """
    padded = round_up(length, min(min(blocks), round_up(length, NUM_LANES)))
    tiles = tuple(max(t for t in range(NUM_LANES, min(b, padded) + 1, NUM_LANES) if padded % t == 0) for b in blocks)
    return padded, tiles


def _segment_layouts(q_seg, kv_seg):
    """Segment ids replicated along lanes (for ids that index tile rows) or sublanes (tile columns)."""
    b, q_pad = q_seg.shape
    kv_pad = kv_seg.shape[1]
    return (
        lax.broadcast_in_dim(q_seg, (b, q_pad, NUM_LANES), (0, 1)),  # q as rows
        lax.broadcast_in_dim(kv_seg, (b, NUM_SUBLANES, kv_pad), (0, 2)),  # kv as columns
        lax.broadcast_in_dim(kv_seg, (b, kv_pad, NUM_LANES), (0, 1)),  # kv as rows (dK/dV kernel)
        lax.broadcast_in_dim(q_seg, (b, NUM_SUBLANES, q_pad), (0, 2)),  # q as columns (dK/dV kernel)
    )


@dataclasses.dataclass(frozen=True)
class _Config:
    causal: bool
    scale: float
    offset: int
    kv_len: int
    kv_padded: bool
    groups: int
    block_q: int
    block_kv: int
    block_q_bwd: int
    block_kv_bwd: int
    interpret: bool


# ------------------------------------------------------------------------------------------------ helpers


def _lanes(x, n: int):
    """(rows, 128) lane-replicated → (rows, n)."""
    if n == NUM_LANES:
        return x
    if n % NUM_LANES == 0:
        return jnp.tile(x, (1, n // NUM_LANES))
    return x[:, :n]


def _tile_mask(cfg: _Config, row_start, col_start, shape, row_seg=None, col_seg=None, *, transposed=False):
    """Mask of one (rows, cols) tile. Normally rows are queries; ``transposed`` tiles have keys as rows."""
    rows = lax.broadcasted_iota(jnp.int32, shape, 0) + row_start
    cols = lax.broadcasted_iota(jnp.int32, shape, 1) + col_start
    q_idx, kv_idx = (cols, rows) if transposed else (rows, cols)
    mask = position_mask(
        q_idx, kv_idx, causal=cfg.causal, offset=cfg.offset, kv_len=cfg.kv_len, kv_padded=cfg.kv_padded
    )
    if row_seg is not None:
        ids_rows = _lanes(row_seg, shape[1])  # (rows, cols), from (rows, 128)
        ids_cols = col_seg[:1, :]  # (1, cols), from (8, cols)
        mask = and_masks(mask, ids_rows == ids_cols)
    return mask


def _runs(cfg: _Config, q_block, kv_block, bq: int, bk: int):
    """Whether tile (q_block, kv_block) has any unmasked causal entry."""
    if not cfg.causal:
        return True
    return kv_block * bk <= (q_block + 1) * bq - 1 + cfg.offset


def _kv_index(cfg: _Config, i, j, bq: int, bk: int):
    """Key block to fetch at step (i, j): j itself, or block 0 (next row's first) if the tile is skipped."""
    if not cfg.causal:
        return j
    return lax.select(_runs(cfg, i, j, bq, bk), j, 0)


def _q_index(cfg: _Config, i, j, bq: int, bk: int, num_q: int):
    """Query block to fetch in the dK/dV kernel: skipped leading tiles point at the first needed block."""
    if not cfg.causal:
        return i
    first = jnp.minimum(causal_first_q_block(j, bq, bk, cfg.offset, num_q), num_q - 1)
    return jnp.maximum(i, first)


def _params(*semantics):
    return pltpu.CompilerParams(dimension_semantics=semantics)


# ------------------------------------------------------------------------------------------------ forward


def _fwd_kernel(*all_refs, cfg: _Config, has_seg: bool, save_lse: bool, num_kv: int):
    refs = list(all_refs)
    q_ref, k_ref, v_ref = refs[:3]
    qseg_ref, kvseg_ref = refs[3:5] if has_seg else (None, None)
    del refs[: 5 if has_seg else 3]
    o_ref = refs.pop(0)
    lse_ref = refs.pop(0) if save_lse else None
    m_scr, l_scr, acc_scr = refs
    bq, bk = cfg.block_q, cfg.block_kv
    d = q_ref.shape[-1]
    i, j = pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        m_scr[...] = jnp.full(m_scr.shape, MASK_VALUE, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    @pl.when(_runs(cfg, i, j, bq, bk))
    def _step():
        s = lax.dot_general(q_ref[...], k_ref[...], NT_DIMS, preferred_element_type=jnp.float32) * cfg.scale
        mask = _tile_mask(
            cfg,
            i * bq,
            j * bk,
            (bq, bk),
            None if qseg_ref is None else qseg_ref[...],
            None if kvseg_ref is None else kvseg_ref[...],
        )
        if mask is not None:
            s = jnp.where(mask, s, MASK_VALUE)
        m_prev = m_scr[...]  # (bq, 128), lane-replicated
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        alpha = jnp.exp(m_prev - m_next)
        pr = jnp.exp(s - _lanes(m_next, bk))
        l_scr[...] = alpha * l_scr[...] + jnp.sum(pr, axis=1, keepdims=True)
        m_scr[...] = m_next
        pv = lax.dot_general(pr.astype(v_ref.dtype), v_ref[...], NN_DIMS, preferred_element_type=jnp.float32)
        acc_scr[...] = _lanes(alpha, d) * acc_scr[...] + pv

    @pl.when(j == num_kv - 1)
    def _finish():
        m, denom = m_scr[...], l_scr[...]
        empty = m < 0.5 * MASK_VALUE  # no valid key seen: output 0 (see common.finish_rows)
        l_safe = jnp.where(jnp.logical_or(empty, denom == 0.0), 1.0, denom)
        out = acc_scr[...] / _lanes(l_safe, d)
        o_ref[...] = jnp.where(_lanes(empty, d), 0.0, out).astype(o_ref.dtype)
        if lse_ref is not None:
            lse = jnp.where(empty, EMPTY_LSE, m + jnp.log(l_safe))  # (bq, 128), lane-replicated
            lse_ref[...] = jnp.transpose(lse)[:1, :]  # stored lane-dense as one (1, bq) row


def _forward(cfg: _Config, q, k, v, segs, save_lse: bool):
    """Output [b, h, q_pad, d] and, if ``save_lse``, the log-sum-exp rows [b, h, 1, q_pad] (float32)."""
    b, h, q_pad, d = q.shape
    kv_pad = k.shape[2]
    bq, bk, g = cfg.block_q, cfg.block_kv, cfg.groups
    num_q, num_kv = q_pad // bq, kv_pad // bk
    has_seg = segs is not None

    def q_map(bi, hi, i, j):
        return bi, hi, i, 0

    def kv_map(bi, hi, i, j):
        return bi, lax.div(hi, g), _kv_index(cfg, i, j, bq, bk), 0

    in_specs = [
        pl.BlockSpec((None, None, bq, d), q_map),
        pl.BlockSpec((None, None, bk, d), kv_map),
        pl.BlockSpec((None, None, bk, d), kv_map),
    ]
    args = [q, k, v]
    if has_seg:
        in_specs += [
            pl.BlockSpec((None, bq, NUM_LANES), lambda bi, hi, i, j: (bi, i, 0)),
            pl.BlockSpec((None, NUM_SUBLANES, bk), lambda bi, hi, i, j: (bi, 0, _kv_index(cfg, i, j, bq, bk))),
        ]
        args += [segs[0], segs[1]]
    out_specs = [pl.BlockSpec((None, None, bq, d), q_map)]
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
    if save_lse:
        out_specs.append(pl.BlockSpec((None, None, 1, bq), lambda bi, hi, i, j: (bi, hi, 0, i)))
        out_shape.append(jax.ShapeDtypeStruct((b, h, 1, q_pad), jnp.float32))
    outs = pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg, has_seg=has_seg, save_lse=save_lse, num_kv=num_kv),
        grid=(b, h, num_q, num_kv),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=[
            pltpu.VMEM((bq, NUM_LANES), jnp.float32),
            pltpu.VMEM((bq, NUM_LANES), jnp.float32),
            pltpu.VMEM((bq, d), jnp.float32),
        ],
        compiler_params=_params("parallel", "parallel", "parallel", "arbitrary"),
        interpret=cfg.interpret,
        name="meditron_flash_fwd",
    )(*args)
    return outs[0], (outs[1] if save_lse else None)


# ------------------------------------------------------------------------------------------------ backward


def _dkv_kernel(*refs, cfg: _Config, has_seg: bool, num_q: int):
    """Tiles are transposed (keys as rows) so the per-query lse/di vectors are lane-dense rows."""
    if has_seg:
        (q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, kvseg_ref, qseg_ref, dk_ref, dv_ref, dk_scr, dv_scr) = refs
    else:
        q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, dk_ref, dv_ref, dk_scr, dv_scr = refs
        kvseg_ref = qseg_ref = None
    bq, bk, g = cfg.block_q_bwd, cfg.block_kv_bwd, cfg.groups
    j, gi, i = pl.program_id(2), pl.program_id(3), pl.program_id(4)

    @pl.when(jnp.logical_and(gi == 0, i == 0))
    def _init():
        dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
        dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

    @pl.when(_runs(cfg, i, j, bq, bk))
    def _step():
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        st = lax.dot_general(k, q, NT_DIMS, preferred_element_type=jnp.float32) * cfg.scale  # (bk, bq)
        mask = _tile_mask(
            cfg,
            j * bk,
            i * bq,
            (bk, bq),
            None if kvseg_ref is None else kvseg_ref[...],
            None if qseg_ref is None else qseg_ref[...],
            transposed=True,
        )
        if mask is not None:
            st = jnp.where(mask, st, MASK_VALUE)
        pt = jnp.exp(st - lse_ref[...])  # lse: (1, bq)
        dv_scr[...] += lax.dot_general(pt.astype(do.dtype), do, NN_DIMS, preferred_element_type=jnp.float32)
        dpt = lax.dot_general(v, do, NT_DIMS, preferred_element_type=jnp.float32)
        dst = pt * (dpt - di_ref[...]) * cfg.scale
        dk_scr[...] += lax.dot_general(dst.astype(q.dtype), q, NN_DIMS, preferred_element_type=jnp.float32)

    @pl.when(jnp.logical_and(gi == g - 1, i == num_q - 1))
    def _finish():
        dk_ref[...] = dk_scr[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def _dq_kernel(*refs, cfg: _Config, has_seg: bool, num_kv: int):
    if has_seg:
        q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, qseg_ref, kvseg_ref, dq_ref, dq_scr = refs
    else:
        q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, dq_ref, dq_scr = refs
        qseg_ref = kvseg_ref = None
    bq, bk = cfg.block_q, cfg.block_kv
    i, j = pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

    @pl.when(_runs(cfg, i, j, bq, bk))
    def _step():
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        s = lax.dot_general(q, k, NT_DIMS, preferred_element_type=jnp.float32) * cfg.scale
        mask = _tile_mask(
            cfg,
            i * bq,
            j * bk,
            (bq, bk),
            None if qseg_ref is None else qseg_ref[...],
            None if kvseg_ref is None else kvseg_ref[...],
        )
        if mask is not None:
            s = jnp.where(mask, s, MASK_VALUE)
        lse = jnp.expand_dims(lse_ref[0], -1)  # (1, bq) row -> (bq, 1) column
        di = jnp.expand_dims(di_ref[0], -1)
        pr = jnp.exp(s - lse)
        dp = lax.dot_general(do, v, NT_DIMS, preferred_element_type=jnp.float32)
        ds = pr * (dp - di)
        dq_scr[...] += lax.dot_general(ds.astype(k.dtype), k, NN_DIMS, preferred_element_type=jnp.float32)

    @pl.when(j == num_kv - 1)
    def _finish():
        dq_ref[...] = (dq_scr[...] * cfg.scale).astype(dq_ref.dtype)


def _backward(cfg: _Config, q, k, v, segs, out, lse, do):
    b, h, q_pad, d = q.shape
    kvh, kv_pad = k.shape[1], k.shape[2]
    g = cfg.groups
    has_seg = segs is not None
    # [b, h, 1, q_pad]: per-query vectors kept lane-dense.
    di_rows = jnp.einsum("bhqd,bhqd->bhq", do.astype(jnp.float32), out.astype(jnp.float32))[:, :, None, :]
    lse_rows = lse

    # dK, dV: grid (batch, kv head, kv block, group member, q block); the last two accumulate.
    bq, bk = cfg.block_q_bwd, cfg.block_kv_bwd
    num_q, num_kv = q_pad // bq, kv_pad // bk

    def q_map(bi, hk, j, gi, i):
        return bi, hk * g + gi, _q_index(cfg, i, j, bq, bk, num_q), 0

    def row_map(bi, hk, j, gi, i):
        return bi, hk * g + gi, 0, _q_index(cfg, i, j, bq, bk, num_q)

    def kv_map(bi, hk, j, gi, i):
        return bi, hk, j, 0

    in_specs = [
        pl.BlockSpec((None, None, bq, d), q_map),
        pl.BlockSpec((None, None, bk, d), kv_map),
        pl.BlockSpec((None, None, bk, d), kv_map),
        pl.BlockSpec((None, None, bq, d), q_map),
        pl.BlockSpec((None, None, 1, bq), row_map),
        pl.BlockSpec((None, None, 1, bq), row_map),
    ]
    args = [q, k, v, do, lse_rows, di_rows]
    if has_seg:
        in_specs += [
            pl.BlockSpec((None, bk, NUM_LANES), lambda bi, hk, j, gi, i: (bi, j, 0)),
            pl.BlockSpec(
                (None, NUM_SUBLANES, bq), lambda bi, hk, j, gi, i: (bi, 0, _q_index(cfg, i, j, bq, bk, num_q))
            ),
        ]
        args += [segs[2], segs[3]]
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg, has_seg=has_seg, num_q=num_q),
        grid=(b, kvh, num_kv, g, num_q),
        in_specs=in_specs,
        out_specs=[pl.BlockSpec((None, None, bk, d), kv_map), pl.BlockSpec((None, None, bk, d), kv_map)],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)],
        compiler_params=_params("parallel", "parallel", "parallel", "arbitrary", "arbitrary"),
        interpret=cfg.interpret,
        name="meditron_flash_dkv",
    )(*args)

    # dQ: grid (batch, head, q block, kv block); the last accumulates.
    bq, bk = cfg.block_q, cfg.block_kv
    num_q, num_kv = q_pad // bq, kv_pad // bk

    def dq_q_map(bi, hi, i, j):
        return bi, hi, i, 0

    def dq_row_map(bi, hi, i, j):
        return bi, hi, 0, i

    def dq_kv_map(bi, hi, i, j):
        return bi, lax.div(hi, g), _kv_index(cfg, i, j, bq, bk), 0

    in_specs = [
        pl.BlockSpec((None, None, bq, d), dq_q_map),
        pl.BlockSpec((None, None, bk, d), dq_kv_map),
        pl.BlockSpec((None, None, bk, d), dq_kv_map),
        pl.BlockSpec((None, None, bq, d), dq_q_map),
        pl.BlockSpec((None, None, 1, bq), dq_row_map),
        pl.BlockSpec((None, None, 1, bq), dq_row_map),
    ]
    args = [q, k, v, do, lse_rows, di_rows]
    if has_seg:
        in_specs += [
            pl.BlockSpec((None, bq, NUM_LANES), lambda bi, hi, i, j: (bi, i, 0)),
            pl.BlockSpec((None, NUM_SUBLANES, bk), lambda bi, hi, i, j: (bi, 0, _kv_index(cfg, i, j, bq, bk))),
        ]
        args += [segs[0], segs[1]]
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg, has_seg=has_seg, num_kv=num_kv),
        grid=(b, h, num_q, num_kv),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, None, bq, d), dq_q_map),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)],
        compiler_params=_params("parallel", "parallel", "parallel", "arbitrary"),
        interpret=cfg.interpret,
        name="meditron_flash_dq",
    )(*args)
    return dq, dk, dv


_flash = flash_with_vjp(_forward, _backward)
