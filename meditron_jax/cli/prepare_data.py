"""Curate GAP-REPLAY: raw guideline / MEDLINE / PMC / replay dumps -> clean, deduplicated, sharded JSONL.

    meditron-prepare-data --input_dir ../shared/data/gap_replay_sample --output_dir /tmp/gap

Beam pipeline options go in --beam_options (one string) or as unknown arguments, passed through
(e.g. two local worker processes: --beam_options="--direct_running_mode=multi_processing --direct_num_workers=2";
Dask: --runner DaskRunner --beam_options="--dask_client_address=tcp://HOST:8786"; Dataflow: --project,
--region, --temp_location gs://..., --sdk_container_image or --setup_file ./pyproject.toml;
Flink: --flink_master, --environment_type).
Every runner writes the same bytes. See docs/data.md, "Running curation on a cluster".
Outputs: {output_dir}/{source}/{split}-{i:05d}-of-{n:05d}.jsonl ({"id","source","text"} per line),
stats.json, malformed.jsonl, removed.jsonl. See docs/data.md, "Curation (GAP-REPLAY)".
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import time

from meditron_jax.cli import common
from meditron_jax.data.curation import SOURCES
from meditron_jax.data.curation.contamination import DEFAULT_REFERENCES
from meditron_jax.data.curation.pipeline import (
    MEDITRON_VALIDATION,
    CurationConfig,
    beam_args,
    check_output,
    check_runner_paths,
    run,
)


def _fractions(value: str) -> dict[str, float]:
    """ "0.03" (every source) or "guidelines=0.05,pubmed_abstracts=0.03,..." (unnamed sources keep MEDITRON's)."""
    if "=" not in value:
        return {s: float(value) for s in SOURCES}
    out = dict(MEDITRON_VALIDATION)
    for part in value.split(","):
        name, frac = part.split("=")
        if name not in SOURCES:
            raise argparse.ArgumentTypeError(f"unknown source {name!r}; sources are {SOURCES}")
        out[name] = float(frac)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--input_dir",
        required=True,
        help="folder with guidelines*/, pubmed_abstracts/, pmc_papers/, replay_general/ (local path or gs://...)",
    )
    ap.add_argument(
        "--output_dir",
        required=True,
        help="replaced as a whole when the run succeeds; must be new, empty or an earlier curation output",
    )
    ap.add_argument("--overwrite", action="store_true", help="replace an --output_dir that holds other files")
    ap.add_argument(
        "--runner",
        default="DirectRunner",
        help="DirectRunner | DaskRunner (the 'dask' extra) | DataflowRunner | FlinkRunner | PrismRunner | ...",
    )
    ap.add_argument(
        "--beam_options",
        default="",
        help="more Beam pipeline options, one shell-quoted string, e.g. "
        "'--direct_running_mode=multi_processing --direct_num_workers=2'",
    )
    ap.add_argument("--num_shards", type=int, default=4, help="train shards per source")
    ap.add_argument("--num_validation_shards", type=int, default=1, help="validation shards per source")
    ap.add_argument(
        "--validation_fraction",
        type=_fractions,
        default=",".join(f"{k}={v}" for k, v in MEDITRON_VALIDATION.items()),
        help="one fraction for all sources, or source=fraction pairs (default: MEDITRON's)",
    )
    ap.add_argument("--seed", type=int, default=0, help="seed of the split and replay-sampling hashes")
    ap.add_argument(
        "--keep_captions",
        action="store_true",
        help="keep figure/table captions as [fig]/[table] blocks (MEDITRON's setting) instead of removing",
    )
    ap.add_argument("--replay_keep_fraction", type=float, default=1.0, help="MEDITRON used 0.0004 of RedPajama")
    ap.add_argument("--english_threshold", type=float, default=0.08)
    ap.add_argument("--min_chars", type=int, default=10)
    ap.add_argument("--near_dup_threshold", type=float, default=0.8)
    ap.add_argument(
        "--contamination_refs",
        default=None,
        help=f"benchmark/split sets whose items must not occur in training text ('' disables; default "
        f"{','.join(DEFAULT_REFERENCES)})",
    )
    ap.add_argument(
        "--no_decontaminate",
        action="store_true",
        help="keep benchmark items in the corpus, as MEDITRON did (MEDITRON.md §2); same as --contamination_refs=''",
    )
    ap.add_argument("--ngram", type=int, default=13)
    ap.add_argument(
        "--tokenizer_model",
        default=None,
        help="Llama-2 tokenizer.model for token counts (default: the shared one; 'none' disables)",
    )
    ap.add_argument("--max_docs_per_file", type=int, default=None, help="cap for quick runs (CI)")
    for src in SOURCES:
        ap.add_argument(
            f"--{src}_glob",
            default=None,
            help=f"comma-separated patterns for {src} (relative to --input_dir unless absolute)",
        )
    common.add_verbose(ap)
    args, unknown = ap.parse_known_args(argv)
    common.quiet_startup(args.verbose)
    if not args.verbose:
        # Beam logs a worker's error with its whole traceback before re-raising it; the error line says it all.
        logging.getLogger("apache_beam").setLevel(logging.WARNING)
        logging.getLogger("apache_beam.runners.common").setLevel(logging.CRITICAL)
        logging.getLogger("distributed").setLevel(logging.WARNING)  # the Dask runner's cluster chatter
        os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")  # ... and its worker processes

    if args.no_decontaminate and args.contamination_refs:
        ap.error("--no_decontaminate and --contamination_refs contradict each other: give one")
    refs = ",".join(DEFAULT_REFERENCES) if args.contamination_refs is None else args.contamination_refs
    if args.no_decontaminate:
        refs = ""

    from meditron_jax.data.curation.dedup import MinHashConfig
    from meditron_jax.data.paths import shared_path

    tok = args.tokenizer_model
    if tok is None:
        tok = str(shared_path("llama2_tokenizer", "tokenizer.model"))
    elif tok.lower() == "none":
        tok = None
    config = CurationConfig(
        input_dir=args.input_dir,
        output_dir=args.output_dir,
        num_shards=args.num_shards,
        num_validation_shards=args.num_validation_shards,
        validation_fraction=args.validation_fraction,
        seed=args.seed,
        keep_captions=args.keep_captions,
        min_chars=args.min_chars,
        english_threshold=args.english_threshold,
        replay_keep_fraction=args.replay_keep_fraction,
        minhash=MinHashConfig(threshold=args.near_dup_threshold),
        contamination_refs=tuple(s for s in refs.split(",") if s),
        ngram=args.ngram,
        tokenizer_model=tok,
        max_docs_per_file=args.max_docs_per_file,
    )
    for src in SOURCES:
        pat = getattr(args, f"{src}_glob")
        if pat is not None:
            config.patterns[src] = tuple(p for p in pat.split(",") if p)
    logging.basicConfig(level=logging.WARNING)
    # Settings and inputs are checked here, before Beam starts (its errors come wrapped in worker tracebacks).
    config.validate()
    check_output(config, args.overwrite)
    pipeline_args = beam_args([f"--runner={args.runner}", *shlex.split(args.beam_options), *unknown])
    check_runner_paths(config, pipeline_args)
    n_files = sum(len(v) for v in config.input_files().values())
    print(f"curating {n_files} input files of {args.input_dir} into {args.output_dir} ({args.runner})", file=sys.stderr)
    start = time.time()
    stats = run(config, pipeline_args, overwrite=args.overwrite)
    summary = {
        src: {
            "malformed": s["malformed"],
            "output": s["output"],
            "removed": {k: v["docs"] for k, v in s["removed"].items()},
        }
        for src, s in stats["sources"].items()
    }
    print(json.dumps({"seconds": round(time.time() - start, 1), "sources": summary}, indent=1))
    return 0


def console(argv=None) -> int:
    return common.run(main, argv)


if __name__ == "__main__":
    sys.exit(console())
