"""Load a model (Hugging Face, meditron_jax orbax, or a training run's MODEL_DIR) and continue prompts.

Default: the real tiny trained Llama in the shared data (stories260K), greedy. Example:

    meditron-generate --model_dir /path/to/meditron-7b --prompt "A 45-year-old man" --dtype bfloat16
    meditron-generate --model_dir RUN_DIR --tokenizer_path /path/to/tokenizer_folder   # a training run
"""

import argparse
import sys

from meditron_jax import compilation_cache
from meditron_jax.cli.common import add_verbose, check_utf8, quiet_startup, run


def main(argv=None) -> int:
    from meditron_jax.data.paths import shared_data_dir

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model_dir",
        default=str(shared_data_dir() / "stories260K_hf"),
        help="HF, orbax or training-run folder, or a Hugging Face hub id (epfl-llm/meditron-7b)",
    )
    parser.add_argument("--prompt", action="append", help="repeatable; default: 'Once upon a time'")
    parser.add_argument("--max_new_tokens", type=int, default=100)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top_p", type=float, default=None)
    parser.add_argument("--top_k", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default=None, help="compute dtype: float32 or bfloat16")
    parser.add_argument(
        "--tokenizer_path", default=None, help="folder with tokenizer.model (default: --model_dir; a run has none)"
    )
    compilation_cache.add_flag(parser)
    add_verbose(parser)
    args = parser.parse_args(argv)
    quiet_startup(args.verbose)
    compilation_cache.use_compilation_cache(args.compilation_cache_dir)
    prompts = args.prompt or ["Once upon a time"]
    for i, prompt in enumerate(prompts, 1):
        check_utf8(prompt, f"--prompt #{i}")

    import meditron_jax

    lm = meditron_jax.load(args.model_dir, dtype=args.dtype, tokenizer_path=args.tokenizer_path)
    if lm.tokenizer is None:
        raise FileNotFoundError(
            f"{args.model_dir} has no tokenizer.model; pass --tokenizer_path DIR (the folder holding tokenizer.model)"
        )
    outs = lm.generate(
        prompts,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    )
    for prompt, out in zip(prompts, outs, strict=True):
        print(f"=== {prompt!r}\n{prompt}{out}\n")
    return 0


def console(argv=None) -> int:
    return run(main, argv)


if __name__ == "__main__":
    sys.exit(console())
