"""Cloud TPU slices as abstract devices (libtpu's topology API), for compiling without a TPU.

Topology names follow Cloud TPU accelerator types: ``v4-256`` and ``v5p-128`` count TensorCores (two per
chip, so 128 and 64 chips), ``v5e-16`` / ``v5litepod-16`` and ``v6e-64`` count chips. An explicit shape such
as ``v5p:4x4x8`` is accepted too.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

import numpy as np

from meditron_jax.hardware import Chip, get_chip

# Chip grid by chip count: 3D tori (v4, v5p) and 2D tori (v5e, v6e); the Cloud TPU standard slice shapes.
SHAPES_3D = {
    4: (2, 2, 1),
    8: (2, 2, 2),
    16: (2, 2, 4),
    32: (2, 4, 4),
    64: (4, 4, 4),
    128: (4, 4, 8),
    192: (4, 4, 12),
    256: (4, 8, 8),
    384: (4, 8, 12),
    512: (8, 8, 8),
    768: (8, 8, 12),
    1024: (8, 8, 16),
    1536: (8, 12, 16),
    2048: (8, 16, 16),
    3072: (12, 16, 16),
    4096: (16, 16, 16),
    6144: (16, 16, 24),
}
SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}
# libtpu's name for each chip in a topology string.
LIBTPU_NAMES = {"v4": "v4", "v5p": "v5", "v5e": "v5e", "v6e": "v6e"}


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str
    chip: Chip
    shape: tuple[int, ...]
    num_slices: int = 1

    @property
    def chips_per_slice(self) -> int:
        return math.prod(self.shape)

    @property
    def num_chips(self) -> int:
        return self.chips_per_slice * self.num_slices

    @property
    def libtpu_name(self) -> str:
        return f"{LIBTPU_NAMES[self.chip.name]}:{'x'.join(map(str, self.shape))}"

    def devices(self) -> list:
        """Abstract TPU devices of this topology (one per chip; v4/v5p as megacore), for lowering/compiling."""
        from jax.experimental import topologies

        # libtpu takes a machine-wide lock file unless told otherwise; compiling for TPU needs no exclusive
        # access to anything, and two compiles (or a compile and a test) may well run side by side.
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        megacore = self.chip.cores_per_chip == 2
        wrap: tuple[bool, ...]
        if len(self.shape) == 3:
            wrap = (all(d >= 4 for d in self.shape),) * 3
        else:
            wrap = tuple(d == 16 for d in self.shape) + (False,)
        desc = topologies.get_topology_desc(
            platform="tpu",
            topology_name=self.libtpu_name,
            chip_config_name="megacore" if megacore else "default",
            chips_per_host_bounds=(2, 2, 1),
            num_slices=self.num_slices,
            wrap=wrap,
        )
        devices = list(desc.devices)
        if len(devices) != self.num_chips:
            raise RuntimeError(f"libtpu gave {len(devices)} devices for {self.name}, expected {self.num_chips}")
        return devices


def parse_topology(name: str, num_slices: int = 1) -> Topology:
    """``v5p-128`` → 64 v5p chips as 4x4x4; ``v4-256`` → 128 chips 4x4x8; ``v5e-16`` → 4x4; ``v5p:4x4x8``."""
    text = name.strip().lower()
    m = re.fullmatch(r"([a-z0-9]+?)(?:p?od)?:(\d+(?:x\d+)*)", text)
    if m:
        chip = get_chip(m.group(1))
        shape = tuple(int(d) for d in m.group(2).split("x"))
    else:
        m = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", text)
        if not m:
            raise ValueError(
                f"topology {name!r}: expected an accelerator type like v5p-128, v4-256, v5e-16, "
                "v6e-64 or an explicit shape like v5p:4x4x8"
            )
        chip = get_chip(m.group(1))
        count = int(m.group(2))
        if count % chip.cores_per_chip:
            raise ValueError(
                f"topology {name!r}: {chip.name} names count TensorCores ({chip.cores_per_chip} per "
                f"chip); {count} is not a multiple of {chip.cores_per_chip}"
            )
        chips = count // chip.cores_per_chip
        table = SHAPES_3D if chip.torus_dims == 3 else SHAPES_2D
        if chips not in table:
            raise ValueError(
                f"topology {name!r} ({chips} chips): no standard {chip.name} slice shape known; "
                f"give it explicitly, e.g. {chip.name}:{'x'.join(['4'] * chip.torus_dims)}. "
                f"Known chip counts: {sorted(table)}"
            )
        shape = table[chips]
    if chip.kind != "tpu":
        raise ValueError(f"topology {name!r}: AOT compilation through libtpu needs a TPU chip, not {chip.name}")
    if len(shape) != chip.torus_dims:
        raise ValueError(f"topology {name!r}: {chip.name} slices are {chip.torus_dims}-D, got shape {shape}")
    if num_slices < 1:
        raise ValueError(f"num_slices must be >= 1, got {num_slices}")
    return Topology(name, chip, shape, num_slices)


# ---------------------------------------------------------------------------------------------------------
# What a compiled program needs per chip (shared by the train-step and decode-step AOT tools)


@dataclasses.dataclass
class CompiledMemory:
    """The fields of XLA's ``memory_analysis()``, for when libtpu refused the program and only its error
    message says how much it needed."""

    argument_size_in_bytes: int
    output_size_in_bytes: int
    alias_size_in_bytes: int
    temp_size_in_bytes: int
    generated_code_size_in_bytes: int


def shard_bytes(x) -> int:
    """Bytes of one device's shard of an abstract array."""
    return math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize


_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_oom_message(text: str) -> dict:
    """Numbers from libtpu's "Ran out of memory in memory space hbm" compile error, where present.

    e.g. "the total memory required for HLO temporaries (24.24G) exceeds available HBM (15.75G)".
    """
    first = text.strip().splitlines()[0] if text.strip() else text
    out: dict = {"message": first[:400]}
    m = re.search(r"required for ([\w ]+?) \(([\d.]+)([KMGT]?)i?B?\)", text)
    if m:
        out["required"] = int(float(m.group(2)) * _UNITS[m.group(3)])
        out["required_for"] = m.group(1)
    m = re.search(r"available HBM \(([\d.]+)([KMGT]?)i?B?\)", text)
    if m:
        out["available"] = int(float(m.group(1)) * _UNITS[m.group(2)])
    return out
