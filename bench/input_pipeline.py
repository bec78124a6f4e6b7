"""Tokens per second the packed GAP-REPLAY input pipeline delivers on this machine, against what a
training step consumes per host.

    python bench/input_pipeline.py                      # corpus made from ../shared/data/gap_replay_sample
    python bench/input_pipeline.py --curated DIR        # curated shards (scripts/prepare_gap_replay.py)

Consumption per host (the assumptions are printed with the table):
* MEDITRON-70B as published: 40,200 tokens/s on 128 A100s (MEDITRON.md §3), i.e. per 8-GPU host.
* 7B and the other rows: model FLOPs utilisation arithmetic, tokens/s = MFU x peak / FLOPs per token,
  FLOPs per token = 6 N + 12 n_layers d_model seq (forward + backward, attention included), at the 42.3%
  MFU MEDITRON reports for 70B.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import pathlib
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
import zipfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

MFU = 0.423
# name: (parameters, layers, d_model, sequence length)
MODELS = {"7B": (6.74e9, 32, 4096, 2048), "70B": (68.98e9, 80, 8192, 4096)}
# accelerator: (peak dense bf16 FLOP/s per chip, chips per host)
HOSTS = {"A100 x8": (312e12, 8), "H200 x8": (989e12, 8), "TPU v5p x4": (459e12, 4)}


def flops_per_token(model: str) -> float:
    n, layers, d, seq = MODELS[model]
    return 6 * n + 12 * layers * d * seq


def consumption_rows() -> list[tuple[str, str, float, str]]:
    rows = [("70B", "A100 x8", 40_200 / 16, "published: 40,200 tok/s / 16 hosts")]
    for model in MODELS:
        for host, (peak, chips) in HOSTS.items():
            rate = MFU * peak * chips / flops_per_token(model)
            rows.append((model, host, rate, f"MFU {MFU:.1%}, {flops_per_token(model):.3g} FLOP/token"))
    return rows


def sample_corpus(shared: pathlib.Path, out: pathlib.Path, shards: int = 4) -> dict[str, int]:
    """Crude text of the shared GAP-REPLAY sample, as curated shards (the real cleaning is the curation
    pipeline's; throughput does not depend on it)."""
    sample = shared / "gap_replay_sample"
    docs: dict[str, list[str]] = {}
    with zipfile.ZipFile(sample / "guidelines_cdc" / "mmsu_art_en_txt_json.zip") as z:
        docs["guidelines"] = [t for t in json.loads(z.read(z.namelist()[0])).values() if t.strip()]
    abstracts = []
    with gzip.open(sample / "pubmed_abstracts" / "medline16n0902.xml.gz") as f:
        for _, el in ET.iterparse(f):
            if el.tag == "MedlineCitation":
                text = " ".join("".join(a.itertext()) for a in el.iter("AbstractText"))
                if text:
                    abstracts.append(f"{el.findtext('.//ArticleTitle') or ''}\n{text}")
                el.clear()
    docs["pubmed_abstracts"] = abstracts
    papers = sorted((sample / "pmc_papers").glob("*.nxml"))
    docs["pmc_papers"] = [" ".join(ET.parse(p).getroot().itertext()) for p in papers]
    replay = []
    for name in ("valid.txt", "test.txt"):
        replay += [
            a.strip()
            for a in (sample / "replay_general" / name).read_text(encoding="utf-8").split("\n = ")
            if a.strip()
        ]
    docs["replay"] = replay
    for source, texts in docs.items():
        (out / source).mkdir(parents=True, exist_ok=True)
        files = [
            open(out / source / f"train-{i:05d}-of-{shards:05d}.jsonl", "w", encoding="utf-8") for i in range(shards)
        ]
        for i, text in enumerate(texts):
            files[i % shards].write(json.dumps({"id": f"{source}-{i}", "source": source, "text": text}) + "\n")
        for f in files:
            f.close()
    return {s: sum(len(t) for t in texts) for s, texts in docs.items()}


def measure(name: str, seq: int, batch: int, batches: int, warmup: int) -> dict[str, float]:
    """SeqIO packs windows of ``seq`` document pieces at a time and every source prefetches its own, so
    the first batch pays for a window per source; the measurement must span several windows, or it only
    reads rows packed during the warm-up."""
    from meditron_jax.data import pipeline

    t0 = time.perf_counter()
    it = pipeline.make_iterator(name, sequence_length=seq, batch_size=batch, seed=0)
    built = time.perf_counter()
    for _ in range(warmup):
        next(it)
    started = time.perf_counter()
    cpu0 = time.process_time()
    slots = real = 0
    for _ in range(batches):
        b = next(it)
        slots += b["decoder_target_tokens"].size
        real += int((b["decoder_segment_ids"] > 0).sum())
    wall = time.perf_counter() - started
    return {
        "build_s": built - t0,
        "warmup_s": started - built,
        "wall_s": wall,
        "cpu_s": time.process_time() - cpu0,
        "slots_per_s": slots / wall,
        "tokens_per_s": real / wall,
        "tokens_per_cpu_s": real / (time.process_time() - cpu0),
        "fill": real / slots,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--curated", help="curated shard folder; default: build one from the shared sample")
    parser.add_argument("--mixture", default="gap_replay")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batches", type=int, help="measured batches; default: 3 packing windows (3 x seq rows)")
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()
    if args.batches is None:
        args.batches = -(-3 * args.seq // args.batch)

    from meditron_jax.data.paths import shared_data_dir

    with tempfile.TemporaryDirectory(prefix="meditron_bench_") as tmp:
        if args.curated:
            os.environ["MEDITRON_CURATED_DATA"] = args.curated
        else:
            chars = sample_corpus(shared_data_dir(), pathlib.Path(tmp))
            os.environ["MEDITRON_CURATED_DATA"] = tmp
            print(f"sample corpus (characters per source): {chars}")
        r = measure(args.mixture, args.seq, args.batch, args.batches, args.warmup)

    print(f"\ncpus visible: {os.cpu_count()}, load average: {os.getloadavg()[0]:.1f}")
    print(
        f"pipeline {args.mixture}: seq {args.seq}, batch {args.batch}, {args.batches} batches after "
        f"{args.warmup} warm-up; build {r['build_s']:.1f} s, warm-up {r['warmup_s']:.1f} s, "
        f"steady {r['wall_s']:.1f} s wall / {r['cpu_s']:.1f} s CPU, rows {r['fill']:.1%} filled\n"
    )
    print("| delivered by this machine | tokens/s |")
    print("|---|---|")
    print(f"| packed slots (batch x seq) | {r['slots_per_s']:,.0f} |")
    print(f"| real tokens (segment id > 0) | {r['tokens_per_s']:,.0f} |")
    print(f"| real tokens per CPU-second (scales with cores) | {r['tokens_per_cpu_s']:,.0f} |")
    print("\n| consumed per host: model | host | tokens/s | assumption | this machine / need | CPU cores needed |")
    print("|---|---|---|---|---|---|")
    for model, host, rate, note in consumption_rows():
        print(
            f"| {model} | {host} | {rate:,.0f} | {note} | {r['tokens_per_s'] / rate:.2f}x "
            f"| {rate / r['tokens_per_cpu_s']:.2f} |"
        )


if __name__ == "__main__":
    main()
