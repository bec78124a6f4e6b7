"""Pieces every attention path shares: input checks, padding, the mask rule, the empty-row convention.

Conventions (all paths, the reference included):
- causal alignment is bottom-right: query ``i`` sits at key position ``i + kv_len - q_len``;
- segment ids have the keys' length; queries use the last ``q_len`` of them;
- a query row with no key to attend to (fully masked) outputs zeros and gets zero gradients.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

# Large negative instead of -inf so masked scores never make inf - inf = NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
# Log-sum-exp stored for a fully masked row: exp(anything - EMPTY_LSE) == 0 in the backward pass.
EMPTY_LSE = 0.7 * float(jnp.finfo(jnp.float32).max)


@dataclasses.dataclass(frozen=True)
class Problem:
    """Static description of one attention call, after validation."""

    batch: int
    q_len: int
    kv_len: int
    heads: int
    kv_heads: int
    head_dim: int
    causal: bool
    has_segments: bool

    @property
    def groups(self) -> int:
        return self.heads // self.kv_heads

    @property
    def offset(self) -> int:
        """Key position of query 0 under bottom-right causal alignment."""
        return self.kv_len - self.q_len


@dataclasses.dataclass(frozen=True)
class Target:
    platform: str  # "tpu", "gpu" or "cpu"
    device_kind: str | None
    from_mesh: bool = False  # True: an ambient mesh fixed the platform; False: the default backend's guess


def current_target() -> Target:
    """The backend being compiled for: the ambient mesh's devices if one is set, else the default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else mesh.abstract_device
    if device is not None:
        return Target(normalise_platform(device.platform), device.device_kind, from_mesh=True)
    return Target(normalise_platform(jax.default_backend()), jax.devices()[0].device_kind)


def normalise_platform(platform: str) -> str:
    platform = platform.lower()
    return "gpu" if platform in ("gpu", "cuda", "rocm") else platform


def check_inputs(q, k, v, segment_ids, *, causal: bool, who: str = "attention") -> Problem:
    """Shape/dtype checks with messages that name the caller and the offending shapes."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"{who}: q, k, v must be [batch, length, heads, head_dim]; "
            f"got q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)}"
        )
    b, q_len, heads, d = q.shape
    if k.shape != v.shape:
        raise ValueError(f"{who}: k{tuple(k.shape)} and v{tuple(v.shape)} must have the same shape")
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"{who}: k{tuple(k.shape)} does not match q{tuple(q.shape)} in batch or head_dim")
    kv_len, kv_heads = k.shape[1], k.shape[2]
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"{who}: query heads {heads} are not a multiple of kv heads {kv_heads}")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"{who}: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if not jnp.issubdtype(q.dtype, jnp.floating):
        raise ValueError(f"{who}: q, k, v must be floating point, got {q.dtype}")
    if segment_ids is not None:
        if tuple(segment_ids.shape) != (b, kv_len):
            raise ValueError(f"{who}: segment_ids{tuple(segment_ids.shape)} must be [batch, kv_len] = {(b, kv_len)}")
        if q_len > kv_len:
            raise ValueError(
                f"{who}: segment_ids need q_len <= kv_len (queries take the last q_len ids); "
                f"got q_len {q_len}, kv_len {kv_len}"
            )
        if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise ValueError(f"{who}: segment_ids must be integers, got {segment_ids.dtype}")
    return Problem(b, q_len, kv_len, heads, kv_heads, d, bool(causal), segment_ids is not None)


def accum_dtype(dtype):
    """Scores and softmax run in float32, or float64 for float64 inputs (the test reference)."""
    return jnp.promote_types(dtype, jnp.float32)


def default_scale(head_dim: int, softmax_scale) -> float:
    return 1.0 / math.sqrt(head_dim) if softmax_scale is None else float(softmax_scale)


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def pad_axis(x, axis: int, size: int, value=0):
    """Pad ``x`` with ``value`` along ``axis`` up to ``size`` (no-op when already that long)."""
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def split_segments(segment_ids, p: Problem, q_pad: int, kv_pad: int):
    """Query and key segment ids, padded to the padded lengths (padding is masked by position)."""
    if segment_ids is None:
        return None, None
    seg = segment_ids.astype(jnp.int32)
    q_seg = pad_axis(seg[:, p.kv_len - p.q_len :], 1, q_pad)
    kv_seg = pad_axis(seg, 1, kv_pad)
    return q_seg, kv_seg


def position_mask(rows, cols, *, causal: bool, offset: int, kv_len: int, kv_padded: bool):
    """Mask from absolute query rows and key columns (broadcastable int arrays), or None if all pass."""
    mask = None
    if causal:
        mask = cols <= rows + offset
    if kv_padded:
        valid = cols < kv_len
        mask = valid if mask is None else jnp.logical_and(mask, valid)
    return mask


def and_masks(a, b):
    if a is None:
        return b
    if b is None:
        return a
    return jnp.logical_and(a, b)


def finish_rows(acc, m, denom, *, empty_threshold=0.5 * MASK_VALUE):
    """Normalise an online-softmax accumulator. Rows that saw no valid key give 0 and lse EMPTY_LSE.

    acc: [..., rows, d]; m, denom: [..., rows] (or broadcast-compatible lane-replicated layouts).
    """
    empty = m < empty_threshold
    l_safe = jnp.where(jnp.logical_or(empty, denom == 0.0), 1.0, denom)
    out = jnp.where(empty[..., None], 0.0, acc / l_safe[..., None])
    lse = jnp.where(empty, EMPTY_LSE, m + jnp.log(l_safe))
    return out, lse


def causal_kv_blocks(q_block, block_q: int, block_kv: int, offset: int, num_kv_blocks: int):
    """Number of key blocks query block ``q_block`` needs under causal masking (traced-int safe)."""
    last_row = (q_block + 1) * block_q - 1 + offset
    needed = lax.div(jnp.maximum(last_row, -1) + 1 + block_kv - 1, block_kv)
    return jnp.minimum(needed, num_kv_blocks)


def causal_first_q_block(kv_block, block_q: int, block_kv: int, offset: int, num_q_blocks: int):
    """First query block that sees key block ``kv_block`` under causal masking (traced-int safe)."""
    first = lax.div(jnp.maximum(kv_block * block_kv - offset, 0), block_q)
    return jnp.minimum(first, num_q_blocks)


def flash_with_vjp(forward, backward):
    """A custom-VJP attention from a forward that can save its log-sum-exp and a backward that uses it.

    forward(cfg, q, k, v, segs, save_lse) -> (out, lse or None);
    backward(cfg, q, k, v, segs, out, lse, dout) -> (dq, dk, dv). ``segs`` (integers) get no cotangent.
    Only out and lse are saved, so the backward's memory stays linear in length.
    """

    @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
    def flash(cfg, q, k, v, segs):
        return forward(cfg, q, k, v, segs, save_lse=False)[0]

    def flash_fwd(cfg, q, k, v, segs):
        out, lse = forward(cfg, q, k, v, segs, save_lse=True)
        return out, (q, k, v, segs, out, lse)

    def flash_bwd(cfg, res, dout):
        return (*backward(cfg, *res, dout), None)

    flash.defvjp(flash_fwd, flash_bwd)
    return flash
