"""The GAP-REPLAY Beam pipeline end to end (DirectRunner), through the CLI, on the real sample plus planted
records: duplicates, a near duplicate, benchmark-contaminated documents, malformed and unsafe inputs.

The sample files are symlinked into a temporary input folder next to the planted files (nothing is copied
into the project); ``--max_docs_per_file 10`` keeps the run to about a minute on two cores. The full-sample
run is the CLI command recorded in docs/data.md.
"""

import glob
import importlib.util
import json
import os
import pathlib
import zipfile

import pytest

from meditron_jax.data.benchmarks import load_benchmark
from meditron_jax.data.curation import SOURCES

pytestmark = pytest.mark.slow  # multi-second runs: excluded from the quick `-m "not slow"` loop

ROOT = pathlib.Path(__file__).resolve().parents[1]
CDC_URL = "https://www.cdc.gov/mmwr/preview/mmwrhtml/00001773.htm"  # 3rd article: inside the cap of 10
CDC_ID = f"guidelines:cdc:{CDC_URL}"
CAP = 10


def _cli():
    spec = importlib.util.spec_from_file_location("prepare_gap_replay", ROOT / "scripts" / "prepare_gap_replay.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _citation(pmid, abstract="", title="A synthetic title."):
    body = f"<Abstract>{abstract}</Abstract>" if abstract else ""
    return (
        f'<MedlineCitation Status="MEDLINE">\n<PMID Version="1">{pmid}</PMID>\n<Article>\n'
        f"<ArticleTitle>{title}</ArticleTitle>\n{body}\n</Article>\n</MedlineCitation>\n"
    )


def _plant(sample: pathlib.Path, inp: pathlib.Path) -> dict:
    """Symlink the sample, add planted files; returns what the test expects to find."""
    for sub in ("guidelines_cdc", "pubmed_abstracts", "pmc_papers", "replay_general"):
        (inp / sub).mkdir(parents=True)
        for f in (sample / sub).iterdir():
            if f.name not in ("LICENSE", "README"):
                os.symlink(f, inp / sub / f.name)
    with zipfile.ZipFile(sample / "guidelines_cdc" / "mmsu_art_en_txt_json.zip") as z:
        raw = json.loads(z.read("mmsu_art_en_txt.json"))[CDC_URL]
    words = raw.split(" ")
    near = " ".join("mortality" if (i % 150 == 7 and w.isalpha()) else w for i, w in enumerate(words))
    medqa = load_benchmark("medqa_4opt", "test")[0]["question"]
    planted = [
        {"id": "zz-exact-copy", "text": raw},  # line 1: exact duplicate of CDC_URL
        {"id": "zz-near-copy", "text": near},  # line 2: ~0.7% of the words changed
        {
            "id": "zz-medqa",
            "title": "Disclosure of surgical errors",  # line 3: holds a MedQA test question
            "text": "Teaching case for residents.\n" + medqa + "\nDiscuss with the attending physician.",
        },
    ]
    lines = [json.dumps(r) for r in planted] + ['{"id": "zz-broken", "text": "unterminated', json.dumps({"id": "x"})]
    (inp / "guidelines_cdc" / "planted.jsonl").write_text("\n".join(lines) + "\n")

    pqa = next(
        x for s in ("test", "train", "validation") for x in load_benchmark("pubmedqa", s) if x["id"] == "21645374"
    )
    (inp / "replay_general" / "planted.jsonl").write_text(
        json.dumps({"id": "zz-pubmedqa", "text": "Blog post about plants.\n" + pqa["context"]}) + "\n" + "{oops\n"
    )

    head = '<?xml version="1.0"?>\n<MedlineCitationSet>\n'
    records = [
        _citation(23029536, "<AbstractText>Abstract of pone.0046493, whose full text is in pmc_papers.</AbstractText>"),
        _citation(99000001, "<AbstractText>Never closed <i>here.</AbstractText>"),
        _citation(99000002),  # no abstract
        _citation(
            99000003,
            '<AbstractText Label="BACKGROUND">Synthetic background sentence about sepsis care.'
            '</AbstractText><AbstractText Label="RESULTS">Mortality fell by a third after the '
            "bundle was adopted.</AbstractText>",
            title="Sepsis bundles in rural hospitals.",
        ),
    ]
    (inp / "pubmed_abstracts" / "planted.xml").write_text(head + "".join(records) + "</MedlineCitationSet>\n")

    lol = (
        '<?xml version="1.0"?>\n<!DOCTYPE article [\n <!ENTITY a "aaaaaaaaaa">\n'
        ' <!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">\n]>\n<article><body><p>&b;</p></body></article>\n'
    )
    (inp / "pmc_papers" / "zz_billion_laughs.nxml").write_text(lol)
    (inp / "pmc_papers" / "zz_truncated.nxml").write_bytes(
        (sample / "pmc_papers" / "pone.0000217.nxml").read_bytes()[:4000]
    )
    return {"medqa": medqa}


@pytest.fixture(scope="module")
def run(shared_data, tmp_path_factory):
    base = tmp_path_factory.mktemp("gap")
    inp, out = base / "in", base / "out"
    expected = _plant(shared_data / "gap_replay_sample", inp)
    rc = _cli().main(
        [
            "--input_dir",
            str(inp),
            "--output_dir",
            str(out),
            "--num_shards",
            "2",
            "--max_docs_per_file",
            str(CAP),
            "--runner",
            "DirectRunner",
        ]
    )
    assert rc == 0
    stats = json.loads((out / "stats.json").read_text())
    docs = {}
    for f in glob.glob(str(out / "*" / "*.jsonl")):
        for line in open(f, encoding="utf-8"):
            rec = json.loads(line)
            assert set(rec) == {"id", "source", "text"} and rec["source"] in f
            docs[rec["id"]] = rec
    removed = [json.loads(x) for x in (out / "removed.jsonl").read_text().splitlines()]
    malformed = [json.loads(x) for x in (out / "malformed.jsonl").read_text().splitlines()]
    return {"out": out, "stats": stats, "docs": docs, "removed": removed, "malformed": malformed, **expected}


def _removed(run, filt):
    return {r["id"]: r for r in run["removed"] if r["filter"] == filt}


def test_shards_layout(run):
    out = run["out"]
    for src in SOURCES:
        assert sorted(p.name for p in (out / src).glob("train-*.jsonl")) == [
            "train-00000-of-00002.jsonl",
            "train-00001-of-00002.jsonl",
        ]
    assert (out / "guidelines" / "validation-00000-of-00001.jsonl").exists()
    assert not (out / "replay" / "validation-00000-of-00001.jsonl").exists()  # MEDITRON: no replay validation


def test_exact_and_near_duplicates_removed_and_counted(run):
    exact, near = _removed(run, "exact_duplicate"), _removed(run, "near_duplicate")
    assert exact["guidelines:cdc:zz-exact-copy"]["duplicate_of"] == CDC_ID
    assert near["guidelines:cdc:zz-near-copy"]["duplicate_of"] == CDC_ID
    assert near["guidelines:cdc:zz-near-copy"]["similarity"] >= 0.8
    assert CDC_ID in run["docs"] and "guidelines:cdc:zz-exact-copy" not in run["docs"]
    g = run["stats"]["sources"]["guidelines"]["removed"]
    assert g["exact_duplicate"]["docs"] == 1 and g["near_duplicate"]["docs"] == 1


def test_contaminated_documents_removed(run):
    cont = _removed(run, "contaminated")
    assert any(b.startswith("medqa_") for b in cont["guidelines:cdc:zz-medqa"]["benchmarks"])
    assert cont["replay:zz-pubmedqa"]["benchmarks"] and all(
        b.startswith("pubmedqa/") and b.endswith(":21645374") for b in cont["replay:zz-pubmedqa"]["benchmarks"]
    )
    assert not any(run["medqa"][:200] in d["text"] for d in run["docs"].values())
    s = run["stats"]
    assert s["sources"]["guidelines"]["removed"]["contaminated"]["docs"] == 1
    assert s["sources"]["replay"]["removed"]["contaminated"]["docs"] == 1
    assert s["contamination_index"]["checked_references"] > 6000


def test_malformed_records_reported_with_position(run):
    by_file = {}
    for m in run["malformed"]:
        by_file.setdefault(os.path.basename(m["file"]), []).append(m)
    assert sorted(m["position"]["line"] for m in by_file["planted.jsonl"] if m["source"] == "guidelines") == [4, 5]
    assert [m["position"]["line"] for m in by_file["planted.jsonl"] if m["source"] == "replay"] == [2]
    (xml,) = by_file["planted.xml"]
    assert xml["position"] == {"record": 1, "byte_offset": 310, "line": 10, "error_line": 14}
    assert "mismatched tag" in xml["error"]
    (lol,) = by_file["zz_billion_laughs.nxml"]
    assert lol["error"].startswith("unsafe XML") and lol["position"]["line"] == 3
    (cut,) = by_file["zz_truncated.nxml"]
    assert cut["error"].startswith("malformed XML") and "line" in cut["position"]
    src = run["stats"]["sources"]
    assert [src[s]["malformed"] for s in SOURCES] == [2, 1, 2, 1]
    assert len(run["stats"]["malformed_examples"]) == 6
    # The records after each broken one survived.
    assert "pubmed:99000003" in run["docs"] and "pmc:PMC3460867" in run["docs"]


def test_abstract_filters(run):
    assert "pubmed:23029536" in _removed(run, "abstract_has_full_text")
    assert "pubmed:99000002" in _removed(run, "no_abstract")
    assert run["docs"]["pubmed:99000003"]["text"] == (
        "Sepsis bundles in rural hospitals.\nBACKGROUND: Synthetic background sentence about sepsis care.\n"
        "RESULTS: Mortality fell by a third after the bundle was adopted."
    )


def test_paper_cleaning_survives_pipeline(run):
    text = run["docs"]["pmc:PMC3460867"]["text"]
    assert "[bib_ref] Drug-resistant tuberculosis: an insurmountable epidemic?, Chakroborty [/bib_ref]" in text
    assert "Inflammopharmacology" not in text
    assert "The proposed mechanism of action involves the opening of the cycle" not in text


def test_statistics_are_consistent(run):
    s = run["stats"]
    for src in SOURCES:
        node = s["sources"][src]
        removed = sum(v["docs"] for v in node["removed"].values())
        out = sum(v["docs"] for v in node["output"].values())
        assert node["input"]["docs"] == removed + out, src
        assert out == sum(1 for d in run["docs"].values() if d["source"] == src)
        for split in node["output"].values():
            assert split["tokens"] > split["docs"] and split["chars"] > 0
    assert s["sources"]["pmc_papers"]["input"] == {"files": 8, "records": 8, "docs": 6, "raw_chars": 527980}
    assert s["sources"]["pmc_papers"]["cleaning_items"]["reference_entries"] == 276
    assert s["sources"]["guidelines"]["cleaning_chars"]["reference_list"] > 0
    assert s["sources"]["guidelines"]["input"]["docs"] == CAP + 3
    assert len(run["removed"]) == sum(v["docs"] for v in s["totals"]["removed"].values())
