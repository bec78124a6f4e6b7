#!/usr/bin/env python
"""Compile MEDITRON's full training step (forward, backward, AdamW update) for a TPU topology, with no TPU,
and report per-chip memory against HBM. Exit status 0: fits; 3: does not fit; 1: invalid configuration.

The last line printed is one JSON object (per-chip bytes, hbm_bytes, "fits").

    python scripts/aot_compile.py --model meditron-7b --topology v5p-128 --seq-len 2048 --global-batch 1600
    python scripts/aot_compile.py --model meditron-70b --topology v5p-256 --seq-len 4096 --global-batch 512 \\
        --mesh fsdp=-1,tensor=8 --grad-accum 4
    # MEDITRON-70B's own layout, TP8 × PP8 × DP2 (MEDITRON.md §3):
    python scripts/aot_compile.py --model meditron-70b --topology v5p-256 --seq-len 4096 --global-batch 512 \\
        --mesh data=2,stage=8,tensor=8 --pipeline-microbatches 16 --grad-accum 8
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Compile for TPU through libtpu's topology API; the host backend itself stays CPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model preset, e.g. meditron-7b, meditron-70b, llama2-7b")
    p.add_argument("--topology", required=True, help="e.g. v5p-128, v4-256, v5e-256, v6e-64, v5p:4x4x8")
    p.add_argument("--num-slices", type=int, default=1, help="multi-slice: slices joined over DCN")
    p.add_argument("--seq-len", type=int, required=True)
    p.add_argument("--global-batch", type=int, required=True, help="sequences per optimizer step")
    p.add_argument("--mesh", default="fsdp=-1", help="ICI mesh, e.g. 'fsdp=-1,tensor=4' (-1: the rest)")
    p.add_argument("--dcn-mesh", default="data=-1", help="DCN mesh across slices, e.g. 'data=2'")
    p.add_argument("--grad-accum", type=int, default=1, help="gradient-accumulation microsteps per step")
    p.add_argument("--pipeline-microbatches", type=int, default=0, help="> 0 turns on pipeline parallelism")
    p.add_argument("--pipeline-schedule", default="gpipe", choices=["gpipe", "circular"])
    p.add_argument("--pipeline-repeats", type=int, default=2, help="circular schedule: rounds per microbatch")
    p.add_argument("--remat", default="full", help="remat policy: none, full, dots, dots_with_no_batch_dims, minimal")
    p.add_argument("--attention-impl", default=None, help="override ModelConfig.attention_impl")
    p.add_argument("--param-dtype", default="float32")
    p.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="ModelConfig override, e.g. num_layers=2 (a quick proxy of a big model)",
    )
    p.add_argument("--gin-file", action="append", default=[], help="gin files (e.g. gin/parallel/*.gin)")
    p.add_argument("--gin", action="append", default=[], help="gin bindings")
    p.add_argument("--report", action="store_true", help="print the per-parameter sharding table")
    p.add_argument("--dump-hlo", default=None, help="write the compiled HLO text here")
    args = p.parse_args(argv)

    import gin

    from meditron_jax.parallel.aot import compile_train_step, training_config
    from meditron_jax.parallel.mesh import MeshConfig, MeshError
    from meditron_jax.parallel.pipeline import PipelineConfig

    if args.gin_file or args.gin:
        gin.parse_config_files_and_bindings(args.gin_file, args.gin, finalize_config=False)
    overrides = {"remat_policy": args.remat, "param_dtype": args.param_dtype}
    if args.attention_impl:
        overrides["attention_impl"] = args.attention_impl
    for item in args.override:
        field, _, value = item.partition("=")
        try:
            overrides[field] = json.loads(value)
        except json.JSONDecodeError:
            overrides[field] = value
    try:
        # Gin bindings of MeshConfig / PipelineConfig win over --mesh/--dcn-mesh and the pipeline defaults.
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


if __name__ == "__main__":
    sys.exit(main())
