"""The whole MEDITRON job, end to end, on a tiny Llama-2 and the embedded sample, in a few minutes on a CPU:
curate a GAP-REPLAY sample, continue pretraining, fine-tune on PubMedQA's training fold, evaluate top-token
on PubMedQA's test set (and with the log-likelihood scorer), export to Hugging Face and reload the export in
transformers. Every artefact lands
under one folder; the last lines summarise the run.

    meditron-quickstart                          # -> runs/quickstart/
    meditron-quickstart --output /tmp/qs --pretrain_steps 200 --sft_steps 100 --eval_limit 500

Data: the 1.9 MB sample shipped in the package (meditron_jax/embedded_data/), or --data_dir (a folder laid
out like the project's shared data). The model is tiny and trained for minutes: top-token generation,
MEDITRON's strategy, rarely emits a parseable answer yet, while the log-likelihood scorer, which only
compares yes/no/maybe, lands near the majority-class rate. The point is that every stage of the real
recipe runs, with the real formats.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import pathlib
import shutil
import sys
import time

from meditron_jax.cli.common import add_verbose, quiet_startup, run
from meditron_jax.host_memory import release_freed_memory

EMBEDDED = pathlib.Path(__file__).resolve().parents[1] / "embedded_data"
MARKER = ".meditron_quickstart"
STAGES = ("curated", "pretrain", "sft", "eval_top_token", "eval_loglik", "hf")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="runs/quickstart", help="folder for every artefact (created)")
    p.add_argument("--data_dir", default=None, help="shared-data layout to read (default: the embedded sample)")
    p.add_argument("--pretrain_steps", type=int, default=40)
    p.add_argument("--sft_steps", type=int, default=30)
    p.add_argument("--sequence_length", type=int, default=256, help="pretraining rows")
    p.add_argument("--sft_sequence_length", type=int, default=512, help="fine-tuning rows (one example each)")
    p.add_argument("--sft_batch", type=int, default=8, help="examples per fine-tuning step (MEDITRON: 64)")
    p.add_argument("--eval_limit", type=int, default=60, help="PubMedQA test items to score (of 500; a seeded sample)")
    p.add_argument("--overwrite", action="store_true", help="reuse an --output that holds other files")
    add_verbose(p)
    return p


def prepare_output(path: str, overwrite: bool) -> pathlib.Path:
    """A new folder, or one a previous quickstart made (its stage folders are redone); anything else is
    refused unless --overwrite, and even then only the stage folders are replaced."""
    out = pathlib.Path(path).resolve()
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--output {out} is a file")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).exists() and not overwrite:
        raise FileExistsError(
            f"--output {out} holds files that a quickstart did not write; choose another folder or pass --overwrite"
        )
    out.mkdir(parents=True, exist_ok=True)
    for stage in STAGES:
        shutil.rmtree(out / stage, ignore_errors=True)
    (out / MARKER).write_text(json.dumps({"created_by": "meditron-quickstart"}) + "\n")
    return out


class _Stages:
    """Prints each stage's heading and keeps the seconds each one took, for the summary."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._name: str | None = None
        self._start = 0.0

    def begin(self, name: str, title: str) -> None:
        self.end()
        print(f"\n[{len(self.seconds) + 1}/6] {title}", flush=True)
        self._name, self._start = name, time.perf_counter()

    def end(self) -> None:
        if self._name is not None:
            self.seconds[self._name] = time.perf_counter() - self._start
            self._name = None
            # The stages share one process: hand a finished stage's freed buffers back (host_memory.py).
            gc.collect()
            release_freed_memory()


def _losses(model_dir: pathlib.Path) -> list[float]:
    path = model_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r["loss"] for r in rows if "loss" in r]


def _curation_summary(report: str, curated: pathlib.Path) -> str:
    """One line for meditron-prepare-data's JSON report (the report itself if its layout is not the expected)."""
    try:
        sources = json.loads(report)["sources"]
        splits = [split for source in sources.values() for split in source["output"].values()]
        docs, tokens = sum(s["docs"] for s in splits), sum(s["tokens"] for s in splits)
    except (ValueError, KeyError, TypeError, AttributeError):
        return report.rstrip()
    return (
        f"kept {docs} documents ({tokens:,} tokens) from {len(sources)} sources; per source: {curated / 'stats.json'}"
    )


def _train(argv: list[str]) -> None:
    import gin

    from meditron_jax.cli import train

    gin.clear_config()
    try:
        train.main(argv)
    finally:
        gin.clear_config()


def _reload_in_transformers(hf_dir: pathlib.Path) -> str:
    """Load the export with transformers and compare its logits with ours on one prompt."""
    try:
        import torch
        from transformers import LlamaForCausalLM
    except ImportError:
        return "transformers is not installed (pip install '.[test]'): reload skipped"
    import numpy as np
    from transformers.utils import logging as hf_logging

    import meditron_jax

    hf_logging.disable_progress_bar()  # its weight-loading bar, for a 20 MB model
    lm = meditron_jax.load(hf_dir)
    ids = lm.tokenizer.encode("Do statins reduce mortality in elderly patients?", bos=True)
    ours = lm.logits([ids])[0]
    model = LlamaForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = model(torch.tensor([ids])).logits[0].numpy()
    diff = float(np.max(np.abs(ours - theirs)))
    return f"transformers reloads it: max |logit difference| {diff:.2e} over {len(ids)} positions"


def main(argv=None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    quiet_startup(args.verbose)
    data_dir = pathlib.Path(args.data_dir or EMBEDDED).resolve()
    if not (data_dir / "pubmedqa").is_dir() or not (data_dir / "gap_replay_sample").is_dir():
        raise FileNotFoundError(f"--data_dir {data_dir} lacks pubmedqa/ or gap_replay_sample/ (shared-data layout)")
    # The data modules read this setting when they are first imported: set it before importing them.
    os.environ["MEDITRON_SHARED_DATA"] = str(data_dir)
    out = prepare_output(args.output, args.overwrite)
    start = time.perf_counter()
    stages = _Stages()
    seq = f"--gin.SEQUENCE_LENGTH={args.sequence_length}"

    def loss_chunks(length: int) -> str:  # the vocabulary's logits 64 positions at a time (runs/tiny_cpu.gin)
        return f"--gin.ModelConfig.loss_chunk_size={64 if length % 64 == 0 else 0}"

    stages.begin("curated", f"curating the GAP-REPLAY sample in {data_dir / 'gap_replay_sample'}")
    from meditron_jax.cli import prepare_data

    pubmedqa_sets = "pubmedqa/test,pubmedqa/train,pubmedqa/validation"  # what this run fine-tunes and scores on
    stats = io.StringIO()  # the command's per-source JSON report: summed up below, kept whole in stats.json
    with contextlib.redirect_stdout(stats):
        prepare_data.main(
            [
                "--input_dir",
                str(data_dir / "gap_replay_sample"),
                "--output_dir",
                str(out / "curated"),
                "--num_shards",
                "1",
                "--contamination_refs",
                pubmedqa_sets,
                "--tokenizer_model",
                str(data_dir / "llama2_tokenizer" / "tokenizer.model"),
            ]
        )
    print(_curation_summary(stats.getvalue(), out / "curated"))

    stages.begin("pretrain", f"continued pretraining of a tiny Llama-2 for {args.pretrain_steps} steps")
    _train(
        [
            "--gin_file=runs/tiny_cpu.gin",
            f"--gin.MODEL_DIR='{out / 'pretrain'}'",
            f"--gin.curated_data_dir.path='{out / 'curated'}'",
            f"--gin.TRAIN_STEPS={args.pretrain_steps}",
            f"--gin.OptimizerConfig.warmup_steps={max(1, min(20, args.pretrain_steps // 4))}",
            seq,
            loss_chunks(args.sequence_length),
            f"--gin.TrainConfig.checkpoint_every={args.pretrain_steps}",
            "--gin.TrainConfig.log_every=10",
        ]
    )

    stages.begin("sft", f"fine-tuning on PubMedQA's training fold for {args.sft_steps} steps")
    _train(
        [
            "--gin_file=models/tiny.gin",
            "--gin_file=runs/sft_pubmedqa_pqal.gin",
            f"--gin.MODEL_DIR='{out / 'sft'}'",
            f"--gin.INIT_FROM='{out / 'pretrain'}'",
            f"--gin.TRAIN_STEPS={args.sft_steps}",
            f"--gin.WARMUP_STEPS={max(1, args.sft_steps // 10)}",
            f"--gin.SEQUENCE_LENGTH={args.sft_sequence_length}",
            loss_chunks(args.sft_sequence_length),
            f"--gin.GLOBAL_BATCH={args.sft_batch}",
            "--gin.OptimizerConfig.peak_lr=5e-3",  # a tiny model from minutes of pretraining, not 7B weights
            f"--gin.TrainConfig.checkpoint_every={args.sft_steps}",
            "--gin.TrainConfig.log_every=10",
        ]
    )

    stages.begin(
        "eval", f"evaluating on {args.eval_limit} PubMedQA test items: top-token (MEDITRON's) and log-likelihood"
    )
    from meditron_jax.eval import cli as eval_cli
    from meditron_jax.eval.output import RESULTS_JSON, RESULTS_MD

    rows = {}
    for strategy in ("top_token", "loglik"):
        eval_cli.main(
            [
                "--checkpoint",
                str(out / "sft"),
                "--benchmark",
                "pubmedqa",
                "--strategy",
                strategy,
                "--chat",
                "--limit",
                str(args.eval_limit),
                "--limit_seed",
                "0",  # PubMedQA's test ids are sorted by label: sample, do not take the first N
                "--output",
                str(out / f"eval_{strategy}"),
            ]
        )
        rows[strategy] = json.loads((out / f"eval_{strategy}" / RESULTS_JSON).read_text())["results"][0]

    stages.begin("hf", "exporting to Hugging Face format, with a model card (README.md) holding the evaluation")
    from meditron_jax.cli import convert

    evals = [arg for strategy in rows for arg in ("--eval_results", str(out / f"eval_{strategy}"))]
    convert.main(["--to", "hf", "--input", str(out / "sft"), "--output", str(out / "hf"), *evals])

    stages.begin("reload", "reloading the export in transformers")
    reload_note = _reload_in_transformers(out / "hf")
    print(reload_note)
    stages.end()

    pre, sft = _losses(out / "pretrain"), _losses(out / "sft")
    print("\n=== meditron-quickstart summary ===")
    if pre:
        print(f"pretraining loss   {pre[0]:.3f} -> {pre[-1]:.3f} ({len(pre)} logged steps)")
    if sft:
        print(f"fine-tuning loss   {sft[0]:.3f} -> {sft[-1]:.3f} ({len(sft)} logged steps)")
    for strategy, row in rows.items():
        print(
            f"PubMedQA {strategy:9s} accuracy {100 * row['accuracy']:5.1f}% on n = {row['n']} "
            f"(parse rate {100 * row['parse_rate']:.0f}%); {out / f'eval_{strategy}' / RESULTS_MD}"
        )
    print(f"Hugging Face export {out / 'hf'}; {reload_note}")
    per_stage = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in stages.seconds.items())
    print(f"every artefact under {out} ({time.perf_counter() - start:.0f} s: {per_stage})")
    return 0


def console(argv=None) -> int:
    return run(main, argv)


if __name__ == "__main__":
    sys.exit(console())
