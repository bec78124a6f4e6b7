"""Convert between Hugging Face Llama folders, meditron_jax orbax model folders and training runs.

meditron-convert --to orbax --input HF_DIR --output ORBAX_DIR
meditron-convert --to hf --input ORBAX_DIR --output HF_DIR [--dtype bfloat16]
meditron-convert --to hf --input RUN_DIR --output HF_DIR --tokenizer_dir TOKENIZER_DIR [--step N]

--input may be any of the three (a training run's MODEL_DIR: its newest checkpoint, or --step). The output
folder must be new, empty, or an earlier output of the same format (then it is replaced atomically);
anything else needs --overwrite. The output is never the input, inside it, or around it. A converted model
needs tokenizer.model to generate text: it is copied from --tokenizer_dir (default: the input), and a
conversion without one is refused unless --no_tokenizer says the weights alone are wanted.
"""

import argparse
import logging
import os
import sys

from meditron_jax.cli.common import add_verbose, quiet_startup, run

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # conversion is host work
log = logging.getLogger("meditron-convert")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--to", choices=("orbax", "hf"), required=True, help="output format")
    parser.add_argument("--input", required=True, help="source: HF folder, orbax model folder, or a run's MODEL_DIR")
    parser.add_argument("--output", required=True, help="destination folder (new, or an earlier output: replaced)")
    parser.add_argument("--overwrite", action="store_true", help="replace an --output folder that holds other files")
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default=None,
        help="storage dtype of the output (default: as loaded)",
    )
    parser.add_argument("--step", type=int, default=None, help="training-run input: checkpoint step (default: newest)")
    parser.add_argument("--tokenizer_dir", default=None, help="where tokenizer.model comes from (default: --input)")
    parser.add_argument("--no_tokenizer", action="store_true", help="convert without tokenizer files")
    parser.add_argument("--max_shard_gb", type=float, default=5.0, help="safetensors shard size for --to hf")
    add_verbose(parser)
    args = parser.parse_args(argv)
    quiet_startup(args.verbose)

    from meditron_jax.convert import hf, orbax
    from meditron_jax.convert.files import check_output_dir
    from meditron_jax.convert.model_dir import load_model_dir, model_dir_kind

    if not args.max_shard_gb > 0:  # also refuses NaN
        raise ValueError(f"--max_shard_gb {args.max_shard_gb} must be a positive number of GiB")
    if args.step is not None and args.step < 0:
        raise ValueError(f"--step {args.step} must be a checkpoint step (>= 0)")
    kind = model_dir_kind(args.input)
    if args.step is not None and kind != "run":
        raise ValueError(f"--step applies to a training run's MODEL_DIR; {args.input} is a {kind} model folder")
    tok_dir = None if args.no_tokenizer else (args.tokenizer_dir or args.input)
    if tok_dir is not None and not os.path.isfile(os.path.join(tok_dir, "tokenizer.model")):
        hint = " (this training run's MODEL_DIR has none: pass the tokenizer's folder)" if kind == "run" else ""
        raise FileNotFoundError(
            f"{os.path.join(tok_dir, 'tokenizer.model')} does not exist{hint}; without it the converted model "
            "cannot generate text. Pass --tokenizer_dir DIR, or --no_tokenizer to convert the weights alone"
        )
    kind_out = hf.HF_OUTPUT if args.to == "hf" else orbax.ORBAX_OUTPUT
    inputs = [args.input, *([tok_dir] if tok_dir else [])]
    check_output_dir(args.output, kind_out, inputs=inputs, overwrite=args.overwrite)  # before the slow part

    log.info("reading %s (%s)", args.input, kind)
    overrides = {"param_dtype": args.dtype} if args.dtype and args.to == "orbax" else {}
    params, config = load_model_dir(args.input, step=args.step, **overrides)
    record = {"source_kind": kind, "tokenizer": None if tok_dir is None else os.path.abspath(tok_dir)}
    if args.step is not None:
        record["step"] = args.step
    log.info("writing %s (%s)", args.output, args.to)
    common = dict(tokenizer_dir=tok_dir, inputs=[args.input], overwrite=args.overwrite, record=record)
    if args.to == "orbax":
        orbax.save_orbax(params, config, args.output, **common)
    else:
        hf.save_hf(
            params, config, args.output, dtype=args.dtype, max_shard_bytes=int(args.max_shard_gb * 2**30), **common
        )
    if tok_dir is None:
        print(
            f"warning: {args.output} has no tokenizer (--no_tokenizer); pass --tokenizer_path when generating",
            file=sys.stderr,
        )
    print(f"wrote {args.output} ({config.num_params():,} parameters)")
    return 0


def console(argv=None) -> int:
    return run(main, argv)


if __name__ == "__main__":
    sys.exit(console())
