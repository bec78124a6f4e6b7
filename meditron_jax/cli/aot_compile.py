"""Compile MEDITRON's full training step (forward, backward, AdamW update) for a TPU topology, with no TPU,
and report per-chip memory against HBM. Exit status 0: fits; 3: does not fit; 1: invalid configuration.

The last line printed is one JSON object (per-chip bytes, hbm_bytes, "fits").

    meditron-aot --model meditron-7b --topology v5p-128 --seq_len 2048 --global_batch 1600
    meditron-aot --model meditron-70b --topology v5p-256 --seq_len 4096 --global_batch 512 \\
        --mesh fsdp=-1,tensor=8 --grad_accum 4
    # MEDITRON-70B's own layout, TP8 × PP8 × DP2 (MEDITRON.md §3):
    meditron-aot --model meditron-70b --topology v5p-256 --seq_len 4096 --global_batch 512 \\
        --mesh data=2,stage=8,tensor=8 --pipeline_microbatches 16 --grad_accum 8
"""

import argparse
import json
import os
import sys

from meditron_jax.cli.common import add_verbose, run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model preset, e.g. meditron-7b, meditron-70b, llama2-7b")
    p.add_argument("--topology", required=True, help="e.g. v5p-128, v4-256, v5e-256, v6e-64, v5p:4x4x8")
    p.add_argument("--num_slices", type=int, default=1, help="multi-slice: slices joined over DCN")
    p.add_argument("--seq_len", type=int, required=True)
    p.add_argument("--global_batch", type=int, required=True, help="sequences per optimizer step")
    p.add_argument("--mesh", default="fsdp=-1", help="ICI mesh, e.g. 'fsdp=-1,tensor=4' (-1: the rest)")
    p.add_argument("--dcn_mesh", default="data=-1", help="DCN mesh across slices, e.g. 'data=2'")
    p.add_argument("--grad_accum", type=int, default=1, help="gradient-accumulation microsteps per step")
    p.add_argument("--pipeline_microbatches", type=int, default=0, help="> 0 turns on pipeline parallelism")
    p.add_argument("--pipeline_schedule", default="gpipe", choices=["gpipe", "circular"])
    p.add_argument("--pipeline_repeats", type=int, default=2, help="circular schedule: rounds per microbatch")
    p.add_argument("--remat", default="full", help="remat policy: none, full, dots, dots_with_no_batch_dims, minimal")
    p.add_argument("--attention_impl", default=None, help="override ModelConfig.attention_impl")
    p.add_argument("--param_dtype", default="float32")
    p.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="ModelConfig override, e.g. num_layers=2 (a quick proxy of a big model)",
    )
    p.add_argument("--gin_file", action="append", default=[], help="gin files (e.g. gin/parallel/*.gin)")
    add_verbose(p)
    p.add_argument("--report", action="store_true", help="print the per-parameter sharding table")
    p.add_argument("--dump_hlo", default=None, help="write the compiled HLO text here")
    args, rest = p.parse_known_args(argv)
    bad = [x for x in rest if not x.startswith("--gin.")]
    if bad:
        p.error(f"unrecognised arguments {bad} (gin bindings are --gin.NAME=VALUE)")
    args.gin = [x[len("--gin.") :] for x in rest]
    # Compile for TPU through libtpu's topology API; the host backend itself stays CPU.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    import gin

    from meditron_jax.parallel.mesh import MeshConfig, MeshError
    from meditron_jax.parallel.pipeline import PipelineConfig
    from meditron_jax.resources import gin_dir
    from meditron_jax.train.aot import compile_train_step, training_config

    # A gin file is a path, or a name under the project's gin/ folder (e.g. parallel/fsdp.gin).
    args.gin_file = [f if os.path.exists(f) else str(gin_dir() / f) for f in args.gin_file]
    if args.gin_file or args.gin:
        gin.parse_config_files_and_bindings(args.gin_file, args.gin, finalize_config=False)
    overrides = {"remat_policy": args.remat, "param_dtype": args.param_dtype}
    if args.attention_impl:
        overrides["attention_impl"] = args.attention_impl
    try:
        for item in args.override:
            field, eq, value = item.partition("=")
            if not eq or not field:
                raise ValueError(f"--override {item!r} is not FIELD=VALUE (e.g. num_layers=2)")
            try:
                overrides[field] = json.loads(value)  # 2 -> int, true -> bool, "x" -> str
            except json.JSONDecodeError:
                overrides[field] = value
        for flag, value, least in (
            ("--seq_len", args.seq_len, 1),
            ("--global_batch", args.global_batch, 1),
            ("--num_slices", args.num_slices, 1),
            ("--grad_accum", args.grad_accum, 1),
            ("--pipeline_microbatches", args.pipeline_microbatches, 0),
            ("--pipeline_repeats", args.pipeline_repeats, 1),
        ):
            if value < least:
                raise ValueError(f"{flag} {value} is invalid: must be at least {least}")
        # Gin bindings of MeshConfig / PipelineConfig win over --mesh/--dcn_mesh and the pipeline defaults.
        gin_text = "\n".join([open(f).read() for f in args.gin_file] + args.gin)
        mesh = MeshConfig() if "MeshConfig." in gin_text else MeshConfig.from_flags(args.mesh, args.dcn_mesh)
        pipeline = PipelineConfig() if "PipelineConfig." in gin_text else None
        if args.pipeline_microbatches > 0:
            pipeline = PipelineConfig(
                num_microbatches=args.pipeline_microbatches,
                schedule=args.pipeline_schedule,
                num_repeats=args.pipeline_repeats,
            )
        training_config(args.model, **overrides)  # fail fast on a bad model/override
        result = compile_train_step(
            args.model,
            args.topology,
            seq_len=args.seq_len,
            global_batch=args.global_batch,
            mesh=mesh,
            num_slices=args.num_slices,
            grad_accum_steps=args.grad_accum,
            pipeline=pipeline,
            model_overrides=overrides,
            dump_hlo=args.dump_hlo,
        )
    except (MeshError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        print(json.dumps({"model": args.model, "topology": args.topology, "error": str(e), "fits": False}))
        return 1
    if args.report:
        print(result.sharding_table)
    print(result.summary())
    print(json.dumps(result.to_json()))
    return 0 if result.fits else 3


def console(argv=None) -> int:
    return run(main, argv)


if __name__ == "__main__":
    sys.exit(console())
