"""Compile the decode program for a TPU topology without a TPU (libtpu's topology API) and report per-chip
memory: parameters, KV cache, temporaries, against the chip's usable HBM.

The decode program is what runs for every generated token (a ``while_loop`` of one-token steps over the
donated decode state), so its memory is the steady-state memory of generation; the prefill of a full-length
prompt needs more temporaries and can be compiled too (``prefill=True``).
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
from flax import linen as nn

from meditron_jax.config import ModelConfig, get_config
from meditron_jax.infer import sampling
from meditron_jax.infer.programs import MAX_STOP_IDS, Programs
from meditron_jax.model import abstract_params
from meditron_jax.parallel.mesh import MeshConfig, create_mesh, describe
from meditron_jax.parallel.topology import CompiledMemory, parse_oom_message, parse_topology, shard_bytes


@dataclasses.dataclass
class DecodeAotResult:
    model: str
    topology: str
    num_chips: int
    mesh: str
    batch: int
    max_len: int  # KV cache length (prompt + new tokens)
    program: str  # "decode" or "prefill"
    argument_bytes: int
    output_bytes: int
    alias_bytes: int  # outputs written in place of donated inputs (the decode state, KV cache included)
    temp_bytes: int
    generated_code_bytes: int
    total_bytes: int
    hbm_bytes: int
    fits: bool
    params_bytes_per_chip: int
    cache_bytes_per_chip: int
    compile_seconds: float
    notes: list[str]

    def summary(self) -> str:
        gib = 1 << 30
        cache_role = " written as an output" if self.program == "prefill" else ""
        return "\n".join(
            [
                f"{self.program} of {self.model} on {self.topology} ({self.num_chips} chips), mesh {self.mesh}",
                f"batch {self.batch}, KV cache {self.max_len} tokens",
                f"per chip: arguments {self.argument_bytes / gib:.2f} GiB "
                f"(params {self.params_bytes_per_chip / gib:.2f}, "
                f"KV cache {self.cache_bytes_per_chip / gib:.2f}{cache_role}), "
                f"outputs {self.output_bytes / gib:.2f} GiB "
                f"(aliased {self.alias_bytes / gib:.2f}), temporaries {self.temp_bytes / gib:.2f} GiB",
                f"total {self.total_bytes / gib:.2f} GiB of {self.hbm_bytes / gib:.2f} GiB usable HBM "
                f"({self.total_bytes / self.hbm_bytes:.0%}) -> {'fits' if self.fits else 'DOES NOT FIT'}",
                *(f"note: {n}" for n in self.notes),
                f"compiled in {self.compile_seconds:.0f} s",
            ]
        )


def inference_config(model: str | ModelConfig, **overrides) -> ModelConfig:
    """bf16 weights and compute, scanned layers, no remat: how a model is served."""
    base = dict(dtype="bfloat16", param_dtype="bfloat16", scan_layers=True, remat_policy="none")
    base.update(overrides)
    if isinstance(model, ModelConfig):
        return model.replace(**base)
    return get_config(model, **base)


def compile_decode_step(
    model: str | ModelConfig,
    topology: str,
    *,
    batch: int,
    max_len: int,
    mesh: MeshConfig | None = None,
    rules=None,
    num_slices: int = 1,
    model_overrides: dict | None = None,
    prefill: bool = False,
    greedy: bool = True,
    stacked_params: str = "split",
) -> DecodeAotResult:
    """Lower and compile the decode loop (or the prefill) for ``topology``; memory from XLA's analysis.

    ``max_len`` is the cache length; for prefill the prompt is ``max_len - 16`` tokens (16 new tokens).
    ``stacked_params``: "split" (an engine built from host parameters) or "slice" (from stacked device
    arrays), see `meditron_jax.infer.engine.Engine`.
    """
    topo = parse_topology(topology, num_slices)
    config = inference_config(model, **(model_overrides or {}))
    device_mesh = create_mesh(mesh or MeshConfig(), topo.devices())
    programs = Programs(config, device_mesh, rules, stacked_params=stacked_params)
    programs.check_batch(batch)
    params = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        nn.meta.unbox(abstract_params(programs.param_config)),
        programs.param_shardings,
    )
    start = time.perf_counter()
    max_steps = 16
    if prefill:
        width = max_len - max_steps
        fn = programs.prefill_fn(batch, max_len, max_steps, greedy, not greedy)
        b2 = jax.ShapeDtypeStruct((batch, width), jnp.int32, sharding=programs._sharding("batch", None))
        b1 = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=programs._sharding("batch"))
        done = jax.ShapeDtypeStruct((batch,), jnp.bool_, sharding=programs._sharding("batch"))
        knobs = jax.eval_shape(lambda: sampling.SamplingParams().arrays(config.vocab_size))
        scalar = jax.ShapeDtypeStruct((), jnp.int32)
        stop = jax.ShapeDtypeStruct((MAX_STOP_IDS,), jnp.int32)
        seed = jax.ShapeDtypeStruct((), jnp.uint32)
        with programs._context():
            lowered = fn.lower(params, b2, b2, b2, b1, b1, done, None, knobs, stop, scalar, seed)
    else:
        lowered = programs.lower_decode(params, batch, max_len, max_steps, greedy=greedy, filtered=not greedy)
    cache = programs.abstract_state(batch, max_len, max_steps).cache
    params_bytes = sum(shard_bytes(x) for x in jax.tree.leaves(params))
    cache_bytes = sum(shard_bytes(x) for x in jax.tree.leaves(cache))
    notes = list(programs.notes)
    try:
        mem = lowered.compile().memory_analysis()
        fits = None
    except jax.errors.JaxRuntimeError as e:
        # libtpu refuses programs that exceed HBM; keep its numbers instead of memory_analysis().
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        oom = parse_oom_message(str(e))
        notes.append("XLA: " + oom["message"])
        temp = oom.get("required", -1)
        mem = CompiledMemory(params_bytes + cache_bytes, cache_bytes, cache_bytes, temp, 0)
        fits = False
    seconds = time.perf_counter() - start
    total = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
    hbm = topo.chip.usable_hbm
    return DecodeAotResult(
        model=model if isinstance(model, str) else "custom",
        topology=topo.name,
        num_chips=topo.num_chips,
        mesh=describe(device_mesh),
        batch=batch,
        max_len=max_len,
        program="prefill" if prefill else "decode",
        argument_bytes=int(mem.argument_size_in_bytes),
        output_bytes=int(mem.output_size_in_bytes),
        alias_bytes=int(mem.alias_size_in_bytes),
        temp_bytes=int(mem.temp_size_in_bytes),
        generated_code_bytes=int(mem.generated_code_size_in_bytes),
        total_bytes=int(total),
        hbm_bytes=int(hbm),
        fits=bool(total <= hbm) if fits is None else fits,
        params_bytes_per_chip=params_bytes,
        cache_bytes_per_chip=cache_bytes,
        compile_seconds=round(seconds, 1),
        notes=notes,
    )


def main(argv=None) -> int:
    """``python -m meditron_jax.infer.aot --model meditron-70b --topology v5p-64 --mesh fsdp=4,tensor=8``."""
    import argparse
    import json

    ap = argparse.ArgumentParser(description="Compile the decode (or prefill) program for a TPU topology.")
    ap.add_argument("--model", required=True, help="a preset name, e.g. meditron-70b")
    ap.add_argument("--topology", required=True, help="e.g. v5p-64, v5e-32, v5e:2x2")
    ap.add_argument("--mesh", default="fsdp=-1", help="ICI axes, e.g. fsdp=4,tensor=8")
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--max-len", type=int, required=True, help="KV cache length (prompt + new tokens)")
    ap.add_argument("--prefill", action="store_true", help="compile the prefill instead of the decode loop")
    ap.add_argument("--sampling", action="store_true", help="the top-k/top-p sampling program, not greedy")
    ap.add_argument(
        "--stacked-params",
        choices=("split", "slice"),
        default="split",
        help="layer weights as per-layer arrays (split) or sliced from stacked arrays in the program",
    )
    args = ap.parse_args(argv)
    result = compile_decode_step(
        args.model,
        args.topology,
        batch=args.batch,
        max_len=args.max_len,
        mesh=MeshConfig.from_flags(args.mesh),
        prefill=args.prefill,
        greedy=not args.sampling,
        stacked_params=args.stacked_params,
    )
    print(result.summary())
    print(json.dumps(dataclasses.asdict(result)))
    return 0 if result.fits else 3


if __name__ == "__main__":
    raise SystemExit(main())
