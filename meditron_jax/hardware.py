"""Accelerator facts used for memory-fit checks and MFU: HBM per chip and peak dense bf16 FLOP/s.

Sources: Cloud TPU system-architecture pages (v4, v5e, v5p, v6e) and NVIDIA data sheets (dense, not sparse,
bf16 tensor-core throughput). Cloud TPU pages write HBM sizes as "GB" but the stacks are binary-sized, so
they are stored in GiB. ``usable_hbm_bytes`` is what libtpu 0.0.42 itself reports as "available HBM" when a
program does not fit (measured with scripts/aot_compile.py, see docs/parallelism.md): the runtime keeps the
rest. Fit checks compare against the usable figure.
"""

from __future__ import annotations

import dataclasses

GiB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    hbm_bytes: int
    peak_bf16_flops: float
    usable_hbm_bytes: int | None = None  # None: all of it
    # TPU v4 and v5p chips have two TensorCores presented as one device ("megacore"); accelerator-type names
    # such as v5p-128 count TensorCores, so v5p-128 is 64 chips.
    cores_per_chip: int = 1
    # Cloud TPU topology dimensionality (3 = 3D torus, 2 = 2D torus); 0 for GPUs.
    torus_dims: int = 0
    kind: str = "tpu"

    @property
    def usable_hbm(self) -> int:
        return self.hbm_bytes if self.usable_hbm_bytes is None else self.usable_hbm_bytes


CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", 32 * GiB, 275e12, int(30.75 * GiB), cores_per_chip=2, torus_dims=3),
    "v5e": Chip("v5e", 16 * GiB, 197e12, int(15.75 * GiB), cores_per_chip=1, torus_dims=2),
    # Published as "95 GB"; libtpu reports 95.74 GiB available, so the stacks hold 96 GiB.
    "v5p": Chip("v5p", 96 * GiB, 459e12, int(95.74 * GiB), cores_per_chip=2, torus_dims=3),
    "v6e": Chip("v6e", 32 * GiB, 918e12, int(31.25 * GiB), cores_per_chip=1, torus_dims=2),
    # GPUs: MEDITRON itself trained on A100-80GB (MEDITRON.md §3).
    "a100-80gb": Chip("a100-80gb", 80 * GiB, 312e12, kind="gpu"),
    "h100-80gb": Chip("h100-80gb", 80 * GiB, 989e12, kind="gpu"),
    "h200": Chip("h200", 141 * 10**9, 989e12, kind="gpu"),
    # A CPU has no data-sheet peak here (and no HBM): MFU on CPU is measured against a jitted float32 matmul
    # timed at start-up (meditron_jax.train.metrics.measured_cpu_flops); 0 means "measure".
    "cpu": Chip("cpu", 0, 0.0, kind="cpu"),
}

# Aliases people use for the same chip (GCE accelerator types and JAX device_kind strings).
ALIASES = {
    "v5litepod": "v5e",
    "v5lite": "v5e",
    "tpu v5 lite": "v5e",
    "tpu v5e": "v5e",
    "tpu v5": "v5p",
    "tpu v5p": "v5p",
    "v5": "v5p",
    "tpu v4": "v4",
    "tpu v6 lite": "v6e",
    "tpu v6e": "v6e",
    "trillium": "v6e",
    "a100": "a100-80gb",
    "nvidia a100-sxm4-80gb": "a100-80gb",
    "h100": "h100-80gb",
    "nvidia h100 80gb hbm3": "h100-80gb",
    "nvidia h200": "h200",
}


def get_chip(name: str) -> Chip:
    """Look a chip up by short name ("v5p"), alias ("v5litepod") or JAX ``device_kind`` ("TPU v5 lite")."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in CHIPS:
        raise KeyError(f"unknown chip {name!r}; known: {', '.join(sorted(CHIPS))}")
    return CHIPS[key]
