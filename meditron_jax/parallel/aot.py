"""Compile the full training step for a real TPU topology without a TPU (libtpu's topology API) and report
per-chip memory against the chip's HBM.

Topology names follow Cloud TPU accelerator types: ``v4-256`` and ``v5p-128`` count TensorCores (two per
chip, so 128 and 64 chips), ``v5e-16`` / ``v5litepod-16`` and ``v6e-64`` count chips. An explicit shape such
as ``v5p:4x4x8`` is accepted too.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time

import jax

from configs.hardware import Chip, get_chip
from meditron_jax.config import ModelConfig, get_config
from meditron_jax.parallel.mesh import MeshConfig, create_mesh, describe
from meditron_jax.parallel.pipeline import PipelineConfig
from meditron_jax.train.optimizer import make_optimizer
from meditron_jax.train.step import TrainStep

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


@dataclasses.dataclass
class AotResult:
    model: str
    topology: str
    num_chips: int
    num_slices: int
    mesh: str
    seq_len: int
    global_batch: int
    grad_accum_steps: int
    pipeline: str | None
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    generated_code_bytes: int
    total_bytes: int
    hbm_bytes: int  # usable HBM per chip, what "fits" compares against
    hbm_physical_bytes: int
    fits: bool
    params_bytes_per_chip: int
    opt_state_bytes_per_chip: int
    compile_seconds: float
    notes: list[str]
    sharding_table: str = dataclasses.field(default="", repr=False)

    def summary(self) -> str:
        gib = 1 << 30
        return "\n".join(
            [
                f"model {self.model}  topology {self.topology} ({self.num_chips} chips, {self.num_slices} slice(s))",
                f"mesh {self.mesh}",
                f"sequence {self.seq_len}  global batch {self.global_batch}  grad accumulation {self.grad_accum_steps}"
                + (f"  pipeline {self.pipeline}" if self.pipeline else ""),
                f"per-chip memory: arguments {self.argument_bytes / gib:.2f} GiB (params "
                f"{self.params_bytes_per_chip / gib:.2f}, optimizer {self.opt_state_bytes_per_chip / gib:.2f}), "
                f"outputs {self.output_bytes / gib:.2f} GiB (aliased {self.alias_bytes / gib:.2f}), "
                f"temporaries {self.temp_bytes / gib:.2f} GiB, code {self.generated_code_bytes / gib:.3f} GiB",
                f"total {self.total_bytes / gib:.2f} GiB of {self.hbm_bytes / gib:.2f} GiB usable HBM "
                f"({self.total_bytes / self.hbm_bytes:.0%}) -> {'fits' if self.fits else 'DOES NOT FIT'}",
                *(f"note: {n}" for n in self.notes),
                f"compiled in {self.compile_seconds:.0f} s",
            ]
        )

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out.pop("sharding_table")
        return out


def training_config(model: str, **overrides) -> ModelConfig:
    """The configuration one trains at scale: bf16 compute, float32 master weights, scanned + rematerialised."""
    base = dict(dtype="bfloat16", param_dtype="float32", scan_layers=True, remat_policy="full")
    base.update(overrides)
    return get_config(model, **base)


def compile_train_step(
    model: str,
    topology: str,
    *,
    seq_len: int,
    global_batch: int,
    mesh: MeshConfig | None = None,
    num_slices: int = 1,
    grad_accum_steps: int = 1,
    pipeline: PipelineConfig | None = None,
    model_overrides: dict | None = None,
    optimizer=None,
    rules=None,
    dump_hlo: str | None = None,
) -> AotResult:
    """Lower and compile forward + backward + optimizer update for ``topology``; memory from XLA's analysis."""
    topo = parse_topology(topology, num_slices)
    config = training_config(model, **(model_overrides or {}))
    mesh_cfg = MeshConfig() if mesh is None else mesh
    device_mesh = create_mesh(mesh_cfg, topo.devices())
    step = TrainStep(
        config,
        device_mesh,
        optimizer or make_optimizer(),
        rules=rules,
        pipeline=pipeline,
        grad_accum_steps=grad_accum_steps,
        model_name=model,
    )
    report = step.report(include_optimizer=True)
    n_params = len(jax.tree.leaves(step.abstract_state.params))
    params_bytes = sum(leaf.bytes_per_device for leaf in report.leaves[:n_params])
    opt_bytes = sum(leaf.bytes_per_device for leaf in report.leaves[n_params:])
    start = time.perf_counter()
    lowered = step.lower(global_batch, seq_len)
    notes = list(step.notes)
    hbm = topo.chip.usable_hbm
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        # libtpu refuses programs that exceed HBM: report its numbers instead of memory_analysis().
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        compiled = None
        oom = parse_oom_message(str(e))
        notes.append("XLA: " + oom["message"])
        state_bytes = params_bytes + opt_bytes + 4  # + the step counter
        batch_bytes = sum(_shard_bytes(x) for x in step.abstract_batch(global_batch, seq_len).values())
        # Arguments: state + batch; outputs alias the donated state.
        mem = _Memory(
            argument_size_in_bytes=state_bytes + batch_bytes,
            output_size_in_bytes=state_bytes,
            alias_size_in_bytes=state_bytes,
            temp_size_in_bytes=oom.get("required", -1),
            generated_code_size_in_bytes=0,
        )
        if oom.get("available") and abs(oom["available"] - hbm) > (64 << 20):
            notes.append(
                f"libtpu reports {oom['available'] / (1 << 30):.2f} GiB usable HBM per chip "
                f"(configs/hardware.py says {hbm / (1 << 30):.2f} GiB)"
            )
    seconds = time.perf_counter() - start
    if dump_hlo and compiled is not None:
        with open(dump_hlo, "w") as f:
            f.write(compiled.as_text())
    if compiled is not None:
        mem = compiled.memory_analysis()
    # MaxText's accounting (train_compile): arguments + outputs − aliased (donated state) + temporaries.
    total = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
    return AotResult(
        model=model,
        topology=topo.name,
        num_chips=topo.num_chips,
        num_slices=num_slices,
        mesh=describe(device_mesh),
        seq_len=seq_len,
        global_batch=global_batch,
        grad_accum_steps=grad_accum_steps,
        pipeline=None if pipeline is None else pipeline.describe(dict(device_mesh.shape)["stage"]),
        argument_bytes=int(mem.argument_size_in_bytes),
        output_bytes=int(mem.output_size_in_bytes),
        alias_bytes=int(mem.alias_size_in_bytes),
        temp_bytes=int(mem.temp_size_in_bytes),
        generated_code_bytes=int(mem.generated_code_size_in_bytes),
        total_bytes=int(total),
        hbm_bytes=int(hbm),
        hbm_physical_bytes=topo.chip.hbm_bytes,
        fits=compiled is not None and bool(total <= hbm),
        params_bytes_per_chip=int(params_bytes),
        opt_state_bytes_per_chip=int(opt_bytes),
        compile_seconds=round(seconds, 1),
        notes=notes,
        sharding_table=step.report().table(),
    )


@dataclasses.dataclass
class _Memory:
    argument_size_in_bytes: int
    output_size_in_bytes: int
    alias_size_in_bytes: int
    temp_size_in_bytes: int
    generated_code_size_in_bytes: int


def _shard_bytes(x: jax.ShapeDtypeStruct) -> int:
    return math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize


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
