"""The device mesh: named axes, shapes from gin, ICI (within a slice) × DCN (between slices), validation.

Axes, outermost (slowest links) first, the MaxText convention:

* ``data``     — pure data parallelism: parameters replicated, gradients all-reduced. The usual DCN axis.
* ``stage``    — pipeline stages (`meditron_jax.parallel.pipeline`).
* ``fsdp``     — data parallelism with parameters and optimizer state sharded (ZeRO-3).
* ``sequence`` — context/sequence parallelism: activations split along ``length``.
* ``tensor``   — Megatron tensor parallelism: heads and MLP columns; wants the fastest (ICI) links.

Each axis has an ICI size and a DCN size; the mesh axis size is their product. One ICI axis and one DCN
axis may be ``-1``: "the rest of the devices" (of a slice, or the rest of the slices).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import gin
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

MESH_AXES = ("data", "stage", "fsdp", "sequence", "tensor")


class MeshError(ValueError):
    """A mesh shape that does not fit the devices or the model."""


@gin.configurable
@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh shape. Gin: ``MeshConfig.ici_fsdp = -1``, ``MeshConfig.ici_tensor = 4``, ``MeshConfig.dcn_data = 2``."""

    ici_data: int = 1
    ici_stage: int = 1
    ici_fsdp: int = -1
    ici_sequence: int = 1
    ici_tensor: int = 1
    dcn_data: int = -1
    dcn_stage: int = 1
    dcn_fsdp: int = 1
    dcn_sequence: int = 1
    dcn_tensor: int = 1
    # TPU only: let an axis span several physical torus dimensions when no clean assignment exists.
    allow_split_physical_axes: bool = False

    def __post_init__(self):
        for kind in ("ici", "dcn"):
            shape = self.shape(kind)
            bad = {f"{kind}_{a}": n for a, n in shape.items() if n == 0 or n < -1}
            if bad:
                raise MeshError(f"mesh sizes must be positive or -1, got {bad}")
            rest = [f"{kind}_{a}" for a, n in shape.items() if n == -1]
            if len(rest) > 1:
                raise MeshError(f"only one {kind} axis may be -1 ('the rest of the devices'), got {rest}")

    def shape(self, kind: str) -> dict[str, int]:
        return {a: getattr(self, f"{kind}_{a}") for a in MESH_AXES}

    @classmethod
    def from_flags(
        cls, ici: str | Mapping[str, int] | None = None, dcn: str | Mapping[str, int] | None = None, **kwargs
    ) -> MeshConfig:
        """From ``"fsdp=-1,tensor=4"``-style strings (the CLI). Axes not named are 1 (ICI) / 1 (DCN).

        With an ICI string and no -1 in it, nothing takes the rest: the product must match exactly.
        DCN defaults to ``data=-1`` (slices become data-parallel replicas).
        """
        fields: dict[str, Any] = {}  # Any: mypy checks **fields against every field, the bool one too
        ici_map = parse_axes(ici) if ici is not None else {"fsdp": -1}
        dcn_map = parse_axes(dcn) if dcn is not None else {"data": -1}
        for a in MESH_AXES:
            fields[f"ici_{a}"] = ici_map.get(a, 1)
            fields[f"dcn_{a}"] = dcn_map.get(a, 1)
        return cls(**fields, **kwargs)

    def describe(self) -> str:
        ici = ",".join(f"{a}={n}" for a, n in self.shape("ici").items() if n != 1)
        dcn = ",".join(f"{a}={n}" for a, n in self.shape("dcn").items() if n != 1)
        return f"ici[{ici or '1'}] dcn[{dcn or '1'}]"


def parse_axes(spec: str | Mapping[str, int]) -> dict[str, int]:
    """``"data=2,fsdp=-1"`` → ``{"data": 2, "fsdp": -1}``; names must be mesh axes."""
    if isinstance(spec, Mapping):
        out = dict(spec)
    else:
        out = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            if "=" not in part:
                raise MeshError(f"mesh entry {part!r} must look like axis=size (axes: {', '.join(MESH_AXES)})")
            name, value = (s.strip() for s in part.split("=", 1))
            try:
                out[name] = int(value)
            except ValueError:
                raise MeshError(f"mesh entry {part!r}: size {value!r} is not an integer") from None
    unknown = sorted(set(out) - set(MESH_AXES))
    if unknown:
        raise MeshError(f"unknown mesh axes {unknown}; axes are {', '.join(MESH_AXES)}")
    return out


def _fill(shape: dict[str, int], total: int, kind: str, what: str) -> dict[str, int]:
    """Replace a -1 by what is left of ``total``; check the product."""
    fixed = math.prod(n for n in shape.values() if n != -1)
    named = " × ".join(f"{kind}_{a}={n}" for a, n in shape.items() if n != 1) or f"all {kind} sizes 1"
    if -1 in shape.values():
        axis = next(a for a, n in shape.items() if n == -1)
        if total % fixed:
            raise MeshError(
                f"{named}: the fixed sizes multiply to {fixed}, which does not divide the {total} "
                f"{what}, so {kind}_{axis}=-1 cannot take the rest"
            )
        return {a: (total // fixed if n == -1 else n) for a, n in shape.items()}
    if fixed != total:
        raise MeshError(
            f"{named} multiplies to {fixed}, but there are {total} {what}; "
            f"make the product {total} or set one {kind} axis to -1"
        )
    return dict(shape)


def resolve_shape(config: MeshConfig, num_devices: int, num_slices: int = 1) -> tuple[dict, dict]:
    """(ICI shape, DCN shape) with -1 resolved, or a `MeshError` naming the fields and numbers."""
    if num_devices % num_slices:
        raise MeshError(f"{num_devices} devices do not split evenly into {num_slices} slices")
    dcn = _fill(config.shape("dcn"), num_slices, "dcn", "slices (DCN granules)")
    ici = _fill(
        config.shape("ici"),
        num_devices // num_slices,
        "ici",
        f"devices per slice ({num_devices} devices in {num_slices} slice{'s' if num_slices > 1 else ''})",
    )
    return ici, dcn


def num_slices_of(devices: Sequence) -> int:
    """Distinct TPU slices among ``devices`` (multi-slice); 1 when devices carry no slice index."""
    ids = {getattr(d, "slice_index", None) for d in devices}
    ids.discard(None)
    return max(1, len(ids))


def create_mesh(
    config: MeshConfig | None = None, devices: Sequence | None = None, *, dcn_granule: str = "auto"
) -> Mesh:
    """A `Mesh` over ``devices`` (default: all) with axes `MESH_AXES`.

    Slow links go on the outside: with several slices (TPU multi-slice) or, for ``dcn_granule="process"``,
    several processes (multi-host GPU/CPU), DCN sizes place whole slices/processes along each axis and ICI
    sizes lay out each slice's devices along the physical torus (`mesh_utils`).
    """
    config = MeshConfig() if config is None else config
    devices = list(jax.devices() if devices is None else devices)
    if dcn_granule not in ("auto", "slice", "process"):
        raise MeshError(f"dcn_granule {dcn_granule!r} must be auto, slice or process")
    by_process = dcn_granule == "process" or (
        dcn_granule == "auto"
        and num_slices_of(devices) == 1
        and math.prod(n for n in config.shape("dcn").values() if n != -1) > 1
    )
    if by_process:
        granules = len({d.process_index for d in devices})
    else:
        granules = num_slices_of(devices)
    ici, dcn = resolve_shape(config, len(devices), granules)
    ici_shape = [ici[a] for a in MESH_AXES]
    dcn_shape = [dcn[a] for a in MESH_AXES]
    if granules > 1:
        grid = mesh_utils.create_hybrid_device_mesh(
            ici_shape,
            dcn_shape,
            devices,
            process_is_granule=by_process,
            allow_split_physical_axes=config.allow_split_physical_axes,
        )
    else:
        try:
            grid = mesh_utils.create_device_mesh(
                ici_shape, devices, allow_split_physical_axes=config.allow_split_physical_axes
            )
        except (AssertionError, NotImplementedError, ValueError) as e:
            raise MeshError(
                f"cannot lay mesh {dict(zip(MESH_AXES, ici_shape, strict=True))} onto the physical "
                f"topology of {len(devices)} {devices[0].device_kind} devices ({e}); try another "
                "shape or MeshConfig.allow_split_physical_axes = True"
            ) from e
    return Mesh(np.asarray(grid), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def mesh_shape(mesh: Mesh) -> dict[str, int]:
    return dict(mesh.shape)


def describe(mesh: Mesh) -> str:
    """``data=2 stage=1 fsdp=4 sequence=1 tensor=1 (8 devices)``."""
    return " ".join(f"{a}={n}" for a, n in mesh.shape.items()) + f" ({mesh.devices.size} devices)"
