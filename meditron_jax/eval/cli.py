"""``meditron-eval`` / ``scripts/evaluate.py``: one command per row of MEDITRON's Tables 4-5."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from meditron_jax import compilation_cache
from meditron_jax.convert.hub import parse_hub_id
from meditron_jax.data.benchmarks import MEDITRON_SEEDS
from meditron_jax.eval import items as items_mod
from meditron_jax.eval import output, published, report
from meditron_jax.eval.output import OutputError
from meditron_jax.eval.parsers import PARSERS
from meditron_jax.eval.runner import ANSWER_TOKENS, STRATEGIES, Evaluator, Settings

EXAMPLES = """\
examples:
  # MEDITRON-7B raw, 3-shot top-token, 3 seeds (Table 4 row):
  python scripts/evaluate.py --checkpoint /ckpt/meditron-7b --benchmark all --shots 3 --output runs/eval/m7b-3shot
  # a finetuned model (ChatML prompt), top-token (Table 5 row):
  python scripts/evaluate.py --checkpoint /ckpt/meditron-7b-pubmedqa --benchmark pubmedqa --chat \\
      --output runs/eval/m7b-ft-pubmedqa
  # quick smoke test on the tiny model:
  python scripts/evaluate.py --checkpoint $MEDITRON_SHARED_DATA/stories260K_hf --benchmark pubmedqa \\
      --limit 20 --output /tmp/eval
"""


def _seeds(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--seeds takes comma-separated integers, got {text!r}") from e


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="meditron-eval",
        description="Evaluate a checkpoint on MEDITRON's benchmarks (MedQA, MedMCQA, PubMedQA, MMLU-Medical) "
        "with MEDITRON's strategies and parser; writes per-item predictions and an accuracy table.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--verbose", action="store_true", help="library logs and tracebacks (meditron-eval command)")
    p.add_argument("--checkpoint", required=True, help="HF, orbax or training-run folder, or a hub id (owner/name)")
    p.add_argument("--benchmark", default="all", choices=(*items_mod.ALL, "all"))
    p.add_argument("--strategy", default="top_token", choices=STRATEGIES)
    p.add_argument("--shots", type=int, default=0, help="few-shot exemplars (raw models; paper: 3 for 7B, 5 for 70B)")
    p.add_argument("--seeds", type=_seeds, default=MEDITRON_SEEDS, help="few-shot seeds (default 1234,432,32)")
    p.add_argument("--sc_branches", type=int, default=5, help="SC-CoT samples (paper 5; released code 10)")
    p.add_argument("--chat", action="store_true", help="ChatML prompt of a finetuned model (MEDITRON.md §4)")
    p.add_argument("--parser", default="meditron", choices=PARSERS)
    p.add_argument(
        "--answer_tokens",
        default="meditron",
        choices=ANSWER_TOKENS,
        help="top-token length: the gold's tokens as MEDITRON (first item of each 16), or the longest label",
    )
    p.add_argument(
        "--too_long",
        default="truncate",
        choices=("truncate", "empty"),
        help="prompts over the context: left-truncate keeping BOS (counted), or an empty answer as vLLM gave",
    )
    p.add_argument(
        "--mmlu_paper_rows", action="store_true", help="drop each MMLU subject CSV's first row (1,862 items)"
    )
    p.add_argument("--limit", type=int, default=None, help="only the first N items of each benchmark (per seed)")
    p.add_argument(
        "--limit_seed",
        type=int,
        default=None,
        help="with --limit: a seeded random sample of N items instead of the first N (files may be sorted by label)",
    )
    p.add_argument("--output", required=True, help="output folder (refused if it holds other files)")
    p.add_argument("--batch_size", type=int, default=16, help="items per engine call (and per resume checkpoint)")
    p.add_argument("--overwrite", action="store_true", help="discard a previous evaluation in --output")
    p.add_argument(
        "--cot_max_new_tokens", type=int, default=1024, help="CoT / SC-CoT generation budget (MEDITRON: 1024)"
    )
    p.add_argument("--sample_seed", type=int, default=0, help="sampling seed for SC-CoT")
    p.add_argument("--model_size", choices=("7b", "70b", "none"), default=None, help="for the published column")
    p.add_argument("--published_family", choices=("meditron", "llama-2"), default="meditron")
    p.add_argument("--dtype", default=None, help="compute dtype override (float32, bfloat16)")
    p.add_argument("--tokenizer_path", default=None, help="folder with tokenizer.model (default: --checkpoint)")
    p.add_argument("--no_progress", action="store_true")
    compilation_cache.add_flag(p)
    return p


def default_backend(
    checkpoint: str, settings: Settings, dtype: str | None, batch_size: int, tokenizer_path: str | None = None
):
    """(tokenizer, max_length, engine, scorer, config) for a checkpoint, loaded with meditron_jax.api.load."""
    from meditron_jax import api

    lm = api.load(checkpoint, dtype=dtype, tokenizer_path=tokenizer_path)
    if lm.tokenizer is None:
        raise ValueError(f"{checkpoint} has no tokenizer.model; evaluation needs the tokenizer")
    engine = scorer = None
    if settings.strategy == "loglik":
        from meditron_jax.eval.loglik import LoglikScorer

        scorer = LoglikScorer(lm.config, lm.params, batch_size=max(1, batch_size))
    else:
        engine = lm.engine()
    return lm.tokenizer, lm.config.max_position_embeddings, engine, scorer, lm.config


def main(
    argv: Sequence[str] | None = None,
    *,
    backend: Callable | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> int:
    """Run an evaluation; returns 0. ``backend`` replaces model loading (tests pass a fake engine);
    ``process_index``/``process_count`` simulate hosts (default: jax's)."""
    args = build_parser().parse_args(argv)
    if backend is None:  # a fake engine compiles nothing
        compilation_cache.use_compilation_cache(args.compilation_cache_dir)
    if args.limit is not None and args.limit < 1:
        raise SystemExit("--limit must be at least 1")
    if args.batch_size < 1:
        raise SystemExit("--batch_size must be at least 1")
    try:
        settings = Settings(
            strategy=args.strategy,
            shots=args.shots,
            seeds=tuple(args.seeds),
            sc_branches=args.sc_branches,
            chat=args.chat,
            parser=args.parser,
            answer_tokens=args.answer_tokens,
            too_long=args.too_long,
            mmlu_paper_rows=args.mmlu_paper_rows,
            sample_seed=args.sample_seed,
            cot_max_new_tokens=args.cot_max_new_tokens,
        )
    except ValueError as e:
        raise SystemExit(f"meditron-eval: {e}") from e
    if process_index is None or process_count is None:
        import jax

        process_index, process_count = jax.process_index(), jax.process_count()
    benchmarks = items_mod.expand(args.benchmark)
    config = {
        **settings.to_config(),
        "checkpoint": args.checkpoint if parse_hub_id(args.checkpoint) else os.path.realpath(args.checkpoint),
        "benchmarks": list(benchmarks),
        "process_count": process_count,
        "limit_seed": args.limit_seed,
    }
    try:
        out = output.prepare(
            args.output, config, checkpoint=args.checkpoint, overwrite=args.overwrite, process_index=process_index
        )
    except OutputError as e:
        raise SystemExit(f"meditron-eval: {e}") from e
    if backend is None:
        loaded = default_backend(args.checkpoint, settings, args.dtype, args.batch_size, args.tokenizer_path)
    else:
        loaded = backend(args.checkpoint, settings, args.dtype, args.batch_size)
    tokenizer, max_length, engine, scorer, model_config = loaded
    evaluator = Evaluator(
        settings,
        tokenizer=tokenizer,
        max_length=max_length,
        engine=engine,
        scorer=scorer,
        batch_size=args.batch_size,
        progress=not args.no_progress,
    )
    # Every benchmark's items (and few-shot pool) first: a missing or malformed file stops the run before
    # any model time is spent.
    for b in benchmarks:
        try:
            evaluator.items(b, limit=args.limit, limit_seed=args.limit_seed)
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"meditron-eval: {b}: {e}") from e
    rows_by_benchmark = {}
    for b in benchmarks:
        rows = evaluator.run(
            b,
            out,
            limit=args.limit,
            limit_seed=args.limit_seed,
            process_index=process_index,
            process_count=process_count,
        )
        if rows is not None:
            rows_by_benchmark[b] = rows
            trunc = sum(r["truncated_tokens"] > 0 for r in rows)
            if trunc:
                what = "left-truncated (BOS kept)" if settings.too_long == "truncate" else "answered empty (wrong)"
                print(
                    f"meditron-eval: {b}: {trunc} of {len(rows)} prompts were longer than the {max_length}-token "
                    f"context and were {what}; see truncated_tokens in the predictions",
                    file=sys.stderr,
                )
    if process_index != 0:
        return 0
    size = args.model_size
    if size is None and model_config is not None:
        size = published.model_size(model_config.hidden_size, model_config.num_layers)
    results = report.table(
        rows_by_benchmark,
        strategy=settings.strategy,
        shots=settings.shots,
        chat=settings.chat,
        model_size=None if size == "none" else size,
        published_family=args.published_family,
    )
    report.write(out, results, config)
    print(report.markdown(results))
    print(f"meditron-eval: wrote {out / output.RESULTS_JSON} and {out / output.RESULTS_MD}", file=sys.stderr)
    return 0


def console() -> None:
    """Console-script entry point (``meditron-eval``)."""
    sys.exit(main())


if __name__ == "__main__":
    console()
