"""Running the Pallas kernels on a sharded mesh.

XLA cannot partition a Mosaic (or Triton) custom call, so on a multi-device mesh the kernel runs under
``shard_map``: batch and heads are split (attention is independent across both), length and head_dim are
whole on every device. The split follows the model's logical axis rules when flax rules are active
(the same names the model constrains q/k/v with), else batch goes over every mesh axis that divides it.
Inputs laid out differently are resharded by XLA at the shard_map boundary, so the result is right
whatever the incoming sharding.
"""

from __future__ import annotations

import math
from typing import cast

import jax
from flax import linen as nn
from jax.sharding import PartitionSpec as P

Q_AXES = ("batch", "length", "heads", "head_dim")
KV_AXES = ("batch", "length", "kv_heads", "head_dim")


def _as_tuple(entry) -> tuple:
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def _fit(axes: tuple, sizes: dict, dim: int) -> tuple:
    """The leading mesh axes whose combined size divides ``dim`` (unsplittable ones are dropped)."""
    kept: list = []
    for axis in axes:
        if dim % (math.prod(sizes[a] for a in kept) * sizes[axis]) == 0:
            kept.append(axis)
    return tuple(kept)


def kernel_partition(mesh, batch: int, heads: int, kv_heads: int):
    """(batch_axes, head_axes) to split the kernel over, or None when the mesh is a single device.

    Both may be empty: the kernel then runs replicated, which is slow but still correct.
    """
    if mesh.empty:
        return None
    manual = set(getattr(mesh, "manual_axes", ()))
    sizes = {a: s for a, s in zip(mesh.axis_names, mesh.axis_sizes, strict=True) if a not in manual}
    if math.prod(sizes.values()) == 1:
        return None
    if nn.get_logical_axis_rules():
        # flax types the result Optional; it is None only for a None input
        q_spec = cast(P, nn.logical_to_mesh_axes(Q_AXES))
        kv_spec = cast(P, nn.logical_to_mesh_axes(KV_AXES))
        batch_axes = tuple(a for a in _as_tuple(q_spec[0]) if a in sizes)
        head_axes = tuple(a for a in _as_tuple(q_spec[2]) if a in sizes)
        if _as_tuple(kv_spec[2]) != _as_tuple(q_spec[2]):
            head_axes = ()  # q and kv heads split differently: grouping would not line up per shard
    else:
        batch_axes, head_axes = tuple(sizes), ()
    batch_axes = _fit(batch_axes, sizes, batch)
    head_axes = _fit(tuple(a for a in head_axes if a not in batch_axes), sizes, math.gcd(heads, kv_heads))
    return batch_axes, head_axes


def shard_kernel(kernel, q, k, v, segment_ids, partition, mesh):
    """Run ``kernel(q, k, v, segment_ids)`` per shard of ``partition`` = (batch_axes, head_axes)."""
    batch_axes, head_axes = partition
    b_spec = batch_axes or None
    h_spec = head_axes or None
    qkv_spec = P(b_spec, None, h_spec, None)
    in_specs = [qkv_spec, qkv_spec, qkv_spec]
    args = [q, k, v]
    if segment_ids is not None:
        in_specs.append(P(b_spec, None))
        args.append(segment_ids)

    def local(*xs):
        q, k, v = xs[:3]
        return kernel(q, k, v, xs[3] if len(xs) > 3 else None)

    # Every not-yet-manual axis goes manual: XLA rejects a Mosaic call left with any automatic axis.
    manual = set(getattr(mesh, "manual_axes", ()))
    free = frozenset(a for a in mesh.axis_names if a not in manual)
    return jax.shard_map(
        local, mesh=mesh, in_specs=tuple(in_specs), out_specs=qkv_spec, axis_names=free, check_vma=False
    )(*args)
