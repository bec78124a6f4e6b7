#!/usr/bin/env python
"""Rebuild meditron_jax/embedded_data/ (the small sample the quickstart runs on without ../shared) from the
shared data, deterministically. The output mirrors the shared data's layout, so every loader reads it as it
reads ../shared/data (point MEDITRON_SHARED_DATA at it). Licenses are kept beside each part.

    python scripts/build_embedded_data.py --shared ../shared/data [--overwrite]
"""

import argparse
import gzip
import io
import json
import pathlib
import re
import shutil
import sys
import zipfile

OUT = pathlib.Path(__file__).resolve().parents[1] / "meditron_jax" / "embedded_data"
N_GUIDELINES = 12  # CDC MMWR Supplements articles
N_CITATIONS = 120  # MEDLINE citations
PAPERS = ("1472-6831-8-11.nxml", "pone.0000217.nxml")  # CC-BY (per-article <license> tags)
REPLAY_CHARS = 120_000


def _write(path: pathlib.Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _gzip(data: bytes) -> bytes:
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as f:  # mtime 0: byte-identical rebuilds
        f.write(data)
    return buf.getvalue()


def build(shared: pathlib.Path, out: pathlib.Path) -> None:
    gap = shared / "gap_replay_sample"
    # Guidelines: the first N articles of the CDC JSON dict, in the same zip-of-JSON form.
    with zipfile.ZipFile(gap / "guidelines_cdc" / "mmsu_art_en_txt_json.zip") as z:
        articles = json.loads(z.read("mmsu_art_en_txt.json"))
    subset = dict(list(articles.items())[:N_GUIDELINES])
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        info = zipfile.ZipInfo("mmsu_art_en_txt.json", date_time=(2025, 1, 1, 0, 0, 0))
        z.writestr(info, json.dumps(subset, ensure_ascii=False), compress_type=zipfile.ZIP_DEFLATED)
    _write(out / "gap_replay_sample" / "guidelines_cdc" / "mmsu_art_en_txt_json.zip", buf.getvalue())
    shutil.copy(gap / "guidelines_cdc" / "LICENSE", out / "gap_replay_sample" / "guidelines_cdc" / "LICENSE")
    # MEDLINE: the header, the first N citations, the closing tag.
    xml = gzip.decompress((gap / "pubmed_abstracts" / "medline16n0902.xml.gz").read_bytes()).decode("utf-8")
    head = xml[: xml.index("<MedlineCitation ")]
    records = re.findall(r"<MedlineCitation .*?</MedlineCitation>\n", xml, flags=re.S)[:N_CITATIONS]
    medline = head + "".join(records) + "</MedlineCitationSet>\n"
    _write(out / "gap_replay_sample" / "pubmed_abstracts" / "medline16n0902.xml.gz", _gzip(medline.encode()))
    shutil.copy(gap / "pubmed_abstracts" / "LICENSE", out / "gap_replay_sample" / "pubmed_abstracts" / "LICENSE")
    for name in PAPERS:
        _write(out / "gap_replay_sample" / "pmc_papers" / name, (gap / "pmc_papers" / name).read_bytes())
    # Replay: the start of Tiny Shakespeare (public domain), cut at a blank line.
    text = (gap / "replay_general" / "input.txt").read_text(encoding="utf-8")
    cut = text.rfind("\n\n", 0, REPLAY_CHARS)
    _write(out / "gap_replay_sample" / "replay_general" / "input.txt", text[: cut + 1].encode())
    # PubMedQA: all 1000 expert-labelled items (the official split is replayed from the whole file).
    _write(out / "pubmedqa" / "ori_pqal.json.gz", _gzip((shared / "pubmedqa" / "ori_pqal.json").read_bytes()))
    for name in ("test_ground_truth.json", "LICENSE"):
        shutil.copy(shared / "pubmedqa" / name, out / "pubmedqa" / name)
    (out / "meditron_eval").mkdir(parents=True, exist_ok=True)
    for name in ("instructions.json", "LICENSE"):
        shutil.copy(shared / "meditron_eval" / name, out / "meditron_eval" / name)
    (out / "llama2_tokenizer").mkdir(parents=True, exist_ok=True)
    shutil.copy(shared / "llama2_tokenizer" / "tokenizer.model", out / "llama2_tokenizer" / "tokenizer.model")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", default=str(pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--overwrite", action="store_true", help="replace the data files under embedded_data/")
    args = ap.parse_args(argv)
    parts = ("gap_replay_sample", "pubmedqa", "meditron_eval", "llama2_tokenizer")
    if any((OUT / p).exists() for p in parts) and not args.overwrite:
        print(f"error: {OUT} already holds the sample; pass --overwrite to rebuild it", file=sys.stderr)
        return 1
    for p in parts[:3]:  # folders this script writes whole; llama2_tokenizer/NOTICE is hand-written and stays
        shutil.rmtree(OUT / p, ignore_errors=True)
    build(pathlib.Path(args.shared), OUT)
    total = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    print(f"wrote {OUT} ({total / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
