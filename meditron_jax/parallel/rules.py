"""THE logical-axis → mesh-axis rules, their validation against a model, and a per-parameter sharding report.

The model names every parameter and activation dimension with a logical axis (``batch length embed heads
kv_heads head_dim mlp vocab layers``; the pipeline adds ``stages repeats``). One ordered list maps them to
mesh axes (`meditron_jax.parallel.mesh.MESH_AXES`). As in T5X/flax, rules are tried in order and a mesh axis
is used at most once per array, so order is precedence: ``batch`` comes first so that activations
``(batch, length, embed)`` put FSDP on the batch and leave ``embed`` whole, while parameters (which have no
``batch``) shard ``embed`` over FSDP.

Default (FSDP + tensor parallelism, the MaxText/Megatron layout):

* batch → (data, fsdp); length → sequence
* embed → (fsdp, sequence) (ZeRO-3 parameter sharding; sequence-parallel devices also hold a shard)
* heads, kv_heads, mlp, vocab → tensor (Megatron column/row splits)
* stages → stage (pipeline); layers, repeats, head_dim → unsharded
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, cast

import gin
import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from meditron_jax.config import ModelConfig
from meditron_jax.parallel.mesh import MESH_AXES, MeshError

Rule = tuple[str, "str | tuple[str, ...] | None"]

DEFAULT_RULES: tuple[Rule, ...] = (
    ("batch", ("data", "fsdp")),
    ("length", "sequence"),
    ("embed", ("fsdp", "sequence")),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("head_dim", None),
    ("stages", "stage"),
    ("repeats", None),
    ("layers", None),
)


@gin.configurable
def logical_axis_rules(rules: Sequence[Sequence[Any]] = DEFAULT_RULES) -> tuple[Rule, ...]:
    """The rules in force; gin: ``logical_axis_rules.rules = [("batch", ("data", "fsdp")), ...]``."""
    out = []
    for rule in rules:
        if len(rule) != 2 or not isinstance(rule[0], str):
            raise ValueError(f"logical axis rule {rule!r} must be (logical_name, mesh_axes)")
        name, axes = rule
        if isinstance(axes, list):
            axes = tuple(axes)
        for a in _axes_tuple(axes):
            if a not in MESH_AXES:
                raise ValueError(f"logical axis rule {rule!r} names mesh axis {a!r}; mesh axes are {MESH_AXES}")
        out.append((name, axes))
    return tuple(out)


def _axes_tuple(axes) -> tuple[str, ...]:
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def mesh_axis_size(mesh_shape: dict[str, int], axes) -> int:
    return math.prod(mesh_shape.get(a, 1) for a in _axes_tuple(axes))


def model_dims(config: ModelConfig) -> dict[str, tuple[int, str]]:
    """Size of each logical parameter dimension, and the config field it comes from (for error messages)."""
    return {
        "embed": (config.hidden_size, "hidden_size"),
        "heads": (config.num_heads, "num_heads"),
        "kv_heads": (config.num_kv_heads, "num_kv_heads"),
        "head_dim": (cast(int, config.head_dim), "head_dim"),  # set by __post_init__
        "mlp": (config.intermediate_size, "intermediate_size"),
        "vocab": (config.padded_vocab_size, "padded_vocab_size"),
        "layers": (config.num_layers, "num_layers"),
    }


@dataclasses.dataclass(frozen=True)
class ResolvedRules:
    rules: tuple[Rule, ...]
    notes: tuple[str, ...]  # how conflicts were resolved (e.g. KV heads replicated over part of tensor)


def resolve_rules(
    rules: Sequence[Rule], config: ModelConfig, mesh_shape: dict[str, int], model_name: str = "the model"
) -> ResolvedRules:
    """Check every parameter dimension divides by its mesh axes; resolve what can be resolved.

    * ``kv_heads`` over more tensor shards than there are KV heads (70B: 8 KV heads, tensor=16) is resolved
      the Megatron way: the K/V projections are not split over ``tensor`` but replicated, so each KV head is
      held by tensor/num_kv_heads devices (query heads stay split; GQA needs every query shard to see its KV
      head). Only when tensor is a multiple of num_kv_heads; anything else is an error.
    * Any other dimension that does not divide (e.g. llama2-13b's 40 heads over tensor=16) is an error that
      names the field, the mesh axes and the sizes that would work.
    """
    rules = tuple(rules)
    dims = model_dims(config)
    notes = []
    out = []
    used_for: dict[str, Any] = {}
    for name, axes in rules:
        if name not in dims or name in used_for:
            out.append((name, axes))
            continue
        size, field = dims[name]
        ways = mesh_axis_size(mesh_shape, axes)
        if size % ways == 0:
            used_for[name] = axes
            out.append((name, axes))
            continue
        mesh_desc = "×".join(f"{a}={mesh_shape.get(a, 1)}" for a in _axes_tuple(axes))
        if name == "kv_heads" and ways % size == 0:
            notes.append(
                f"{mesh_desc} > {field}={size} of {model_name}: K/V projections are replicated over "
                f"{mesh_desc} (each KV head held by {ways // size} tensor shards), query heads stay split"
            )
            used_for[name] = None
            out.append((name, None))
            continue
        fits = [d for d in range(1, 2 * ways + 1) if size % d == 0]
        raise MeshError(
            f"{mesh_desc} does not divide {field}={size} of {model_name} (logical axis {name!r} → "
            f"mesh {axes!r}); sizes up to {2 * ways} that divide it: {fits}"
        )
    return ResolvedRules(tuple(out), tuple(notes))


def logical_to_spec(names: Sequence[str | None], rules: Sequence[Rule]) -> PartitionSpec:
    """Flax's translation (same precedence semantics as `nn.with_logical_constraint`)."""
    # flax types the result Optional; it is None only for a None input
    return cast(PartitionSpec, nn.logical_to_mesh_axes(tuple(names), tuple(rules)))


# ---------------------------------------------------------------------------------------------------------
# Sharding report


@dataclasses.dataclass(frozen=True)
class LeafReport:
    path: str
    shape: tuple[int, ...]
    dtype: str
    spec: str
    bytes_total: int
    bytes_per_device: int
    shard_ways: int


@dataclasses.dataclass(frozen=True)
class ShardingReport:
    leaves: tuple[LeafReport, ...]
    num_devices: int
    sharding_ways: int  # devices that can hold distinct parameter shards: every mesh axis except `data`
    notes: tuple[str, ...] = ()

    @property
    def bytes_total(self) -> int:
        return sum(leaf.bytes_total for leaf in self.leaves)

    @property
    def bytes_per_device(self) -> int:
        return sum(leaf.bytes_per_device for leaf in self.leaves)

    @property
    def ideal_bytes_per_device(self) -> float:
        return self.bytes_total / self.sharding_ways

    @property
    def replication_overhead(self) -> float:
        """Per-device bytes over the ideal (everything split over all non-data axes); 0 means none."""
        return self.bytes_per_device / max(self.ideal_bytes_per_device, 1) - 1.0

    def check(self, max_overhead: float = 0.10) -> None:
        """Fail when replicated parameters cost more than ``max_overhead`` × the ideal per-device bytes."""
        if self.replication_overhead > max_overhead:
            worst = sorted(
                self.leaves, key=lambda x: x.bytes_per_device - x.bytes_total / self.sharding_ways, reverse=True
            )[:5]
            lines = "; ".join(
                f"{w.path} {w.shape} spec {w.spec} ({w.shard_ways}/{self.sharding_ways} ways)" for w in worst
            )
            raise MeshError(
                f"too much of the model is replicated: {_fmt(self.bytes_per_device)} per device vs "
                f"{_fmt(self.ideal_bytes_per_device)} if fully sharded over {self.sharding_ways} "
                f"devices (+{self.replication_overhead:.0%} > allowed +{max_overhead:.0%}); "
                f"largest replicated: {lines}"
            )

    def table(self, max_rows: int | None = None) -> str:
        rows = [f"{'parameter':<44} {'shape':<24} {'dtype':<9} {'mesh spec':<36} {'per device':>11} {'ways':>5}"]
        leaves = self.leaves if max_rows is None else self.leaves[:max_rows]
        for leaf in leaves:
            rows.append(
                f"{leaf.path:<44} {str(leaf.shape):<24} {leaf.dtype:<9} {leaf.spec:<36} "
                f"{_fmt(leaf.bytes_per_device):>11} {leaf.shard_ways:>5}"
            )
        rows.append(
            f"total {_fmt(self.bytes_total)}; per device {_fmt(self.bytes_per_device)} "
            f"(ideal {_fmt(self.ideal_bytes_per_device)} over {self.sharding_ways} sharding devices of "
            f"{self.num_devices}; replication overhead {self.replication_overhead:+.1%})"
        )
        rows.extend(f"note: {n}" for n in self.notes)
        return "\n".join(rows)


def _fmt(n: float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def sharding_report(tree, shardings, mesh: Mesh, notes: Sequence[str] = ()) -> ShardingReport:
    """Bytes per device of every leaf of ``tree`` (arrays or ShapeDtypeStructs) under ``shardings``."""
    mesh_shape = dict(mesh.shape)
    leaves = []
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    flat_sh = jax.tree_util.tree_leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    if len(flat) != len(flat_sh):
        raise ValueError(f"tree has {len(flat)} leaves but shardings has {len(flat_sh)}")
    for (path, leaf), sh in zip(flat, flat_sh, strict=True):
        shape = tuple(leaf.shape)
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
        spec = sh.spec
        ways = 1
        per_dev = nbytes
        if shape:
            shard_shape = sh.shard_shape(shape)
            per_dev = int(np.prod(shard_shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
            ways = math.prod(mesh_axis_size(mesh_shape, a) for a in spec)
        leaves.append(
            LeafReport(
                jax.tree_util.keystr(path, simple=True, separator="/"),
                shape,
                np.dtype(leaf.dtype).name,
                str(tuple(spec)),
                nbytes,
                per_dev,
                ways,
            )
        )
    sharding_ways = math.prod(n for a, n in mesh_shape.items() if a != "data")
    return ShardingReport(tuple(leaves), mesh.devices.size, sharding_ways, tuple(notes))
