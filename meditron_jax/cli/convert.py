"""Convert between Hugging Face Llama directories and meditron_jax orbax model directories.

meditron-convert --to orbax --input HF_DIR --output ORBAX_DIR
meditron-convert --to hf --input ORBAX_DIR --output HF_DIR [--dtype bfloat16]
"""

import argparse
import os
import sys

from meditron_jax.cli.common import run

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # conversion is host work


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--to", choices=("orbax", "hf"), required=True, help="output format")
    parser.add_argument("--input", required=True, help="source model directory")
    parser.add_argument("--output", required=True, help="destination directory (replaced atomically)")
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default=None,
        help="storage dtype of the output (default: as loaded)",
    )
    parser.add_argument("--max_shard_gb", type=float, default=5.0, help="safetensors shard size for --to hf")
    args = parser.parse_args(argv)

    from meditron_jax.convert import hf, orbax

    if args.to == "orbax":
        config = hf.read_hf_config(args.input, **({"param_dtype": args.dtype} if args.dtype else {}))
        params = hf.load_hf_params(args.input, config)
        orbax.save_orbax(params, config, args.output, tokenizer_dir=args.input)
    else:
        params, config = orbax.load_orbax(args.input)
        hf.save_hf(
            params,
            config,
            args.output,
            dtype=args.dtype,
            tokenizer_dir=args.input,
            max_shard_bytes=int(args.max_shard_gb * 2**30),
        )
    print(f"wrote {args.output} ({config.num_params():,} parameters)")
    return 0


def console(argv=None) -> int:
    return run(main, argv)


if __name__ == "__main__":
    sys.exit(console())
