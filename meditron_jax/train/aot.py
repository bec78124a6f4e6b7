"""Compile the full training step for a real TPU topology without a TPU and report per-chip memory against
the chip's HBM (MaxText keeps the same tool, ``train_compile``, beside its trainer)."""

from __future__ import annotations

import dataclasses
import time

import jax

from meditron_jax.config import ModelConfig, get_config
from meditron_jax.parallel.mesh import MeshConfig, create_mesh, describe
from meditron_jax.parallel.pipeline import PipelineConfig
from meditron_jax.parallel.topology import CompiledMemory, parse_oom_message, parse_topology, shard_bytes
from meditron_jax.train.optimizer import make_optimizer
from meditron_jax.train.step import TrainStep


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
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown ModelConfig field(s) {unknown}; fields are {sorted(fields)}")
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
    compiler_options: dict | None = None,
) -> AotResult:
    """Lower and compile forward + backward + optimizer update for ``topology``; memory from XLA's analysis.

    ``compiler_options``: XLA options for this compile, e.g. ``{"xla_dump_to": DIR}`` for the buffer assignment.
    """
    for name, value in (
        ("seq_len", seq_len),
        ("global_batch", global_batch),
        ("num_slices", num_slices),
        ("grad_accum_steps", grad_accum_steps),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer")
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
        compiled = lowered.compile(compiler_options)
    except jax.errors.JaxRuntimeError as e:
        # libtpu refuses programs that exceed HBM: report its numbers instead of memory_analysis().
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        compiled = None
        oom = parse_oom_message(str(e))
        notes.append("XLA: " + oom["message"])
        state_bytes = params_bytes + opt_bytes + 4  # + the step counter
        batch_bytes = sum(shard_bytes(x) for x in step.abstract_batch(global_batch, seq_len).values())
        # Arguments: state + batch; outputs alias the donated state.
        mem = CompiledMemory(
            argument_size_in_bytes=state_bytes + batch_bytes,
            output_size_in_bytes=state_bytes,
            alias_size_in_bytes=state_bytes,
            temp_size_in_bytes=oom.get("required", -1),
            generated_code_size_in_bytes=0,
        )
        if oom.get("available") and abs(oom["available"] - hbm) > (64 << 20):
            notes.append(
                f"libtpu reports {oom['available'] / (1 << 30):.2f} GiB usable HBM per chip "
                f"(meditron_jax/hardware.py says {hbm / (1 << 30):.2f} GiB)"
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
