"""Issue 12, items 2 and 7 (curation): a rerun replaces the whole output set and training reads only the
manifest's shards; a missing or empty input folder is an error before Beam starts; a failure inside Beam is
one error line, not a worker traceback.

Runs the real pipeline (DirectRunner) on a dozen synthetic guideline documents, a few seconds a run.
"""

import json
import os
import random

import pytest

from meditron_jax.data import tasks
from meditron_jax.data.curation import pipeline

from .hf_utils import load_script
from .reliability_utils import snapshot, user_folder

WORDS = "patient clinical treatment the of and with in hospital care disease therapy dose trial results for".split()


@pytest.fixture
def corpus(tmp_path):
    """12 guideline documents: 6 long (~80 words) and 6 short (~20 words)."""
    rng = random.Random(0)
    inp = tmp_path / "in"
    (inp / "guidelines_x").mkdir(parents=True)
    docs = {}
    with open(inp / "guidelines_x" / "g.jsonl", "w") as f:
        for i in range(12):
            text = " ".join(rng.choice(WORDS) for _ in range(80 if i % 2 == 0 else 20))
            docs[f"doc{i}"] = text
            f.write(json.dumps({"id": f"doc{i}", "title": f"Guideline {i}", "text": text}) + "\n")
    return inp, docs


def curate(capsys, inp, out, *extra):
    argv = ["--input_dir", str(inp), "--output_dir", str(out), "--contamination_refs", ""]
    rc = load_script("prepare_gap_replay").console([*argv, "--tokenizer_model", "none", *extra])
    return rc, capsys.readouterr().err


def _training_docs(root, monkeypatch, source="guidelines", split="train"):
    """Document ids as training sees them: the shard files the task's data source lists."""
    monkeypatch.setenv(tasks.CURATED_ENV, str(root))
    ids = []
    for f in tasks.CuratedShardsSource(source).list_shards(split):
        ids += [json.loads(line)["id"].split(":")[-1] for line in open(f) if line.strip()]
    return ids


@pytest.mark.slow
def test_a_rerun_replaces_the_output_set(corpus, tmp_path, capsys, monkeypatch):
    """Used to leave the 3 old shards beside the 2 new ones: every document twice, and the documents the
    stricter rerun removed (here the short ones) survived."""
    inp, docs = corpus
    out = tmp_path / "out"
    assert curate(capsys, inp, out, "--num_shards", "3")[0] == 0
    assert sorted(_training_docs(out, monkeypatch)) == sorted(docs)
    assert curate(capsys, inp, out, "--num_shards", "2", "--min_chars", "300")[0] == 0
    assert sorted(p.name for p in (out / "guidelines").glob("train-*")) == [
        "train-00000-of-00002.jsonl",
        "train-00001-of-00002.jsonl",
    ]
    long_docs = sorted(k for k, v in docs.items() if len(v) > 300)
    assert len(long_docs) == 6 and sorted(_training_docs(out, monkeypatch)) == long_docs
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["shards"]["guidelines"]["train"]["docs"] == 6
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.slow
def test_shards_beside_the_manifest_are_not_read(corpus, tmp_path, capsys, monkeypatch):
    inp, docs = corpus
    out = tmp_path / "out"
    assert curate(capsys, inp, out, "--num_shards", "2")[0] == 0
    # A stray shard copied in by hand (e.g. from an older run) matches the glob but is not in the manifest.
    (out / "guidelines" / "train-00007-of-00009.jsonl").write_text(
        json.dumps({"id": "guidelines:stray", "source": "guidelines", "text": "old text"}) + "\n"
    )
    assert sorted(_training_docs(out, monkeypatch)) == sorted(docs)


def test_an_empty_split_is_an_error_when_training_starts(corpus, tmp_path, capsys, monkeypatch):
    """A split that kept nothing used to end training in a bare StopIteration."""
    inp, _ = corpus
    out = tmp_path / "out"
    assert curate(capsys, inp, out, "--min_chars", "100000")[0] == 0
    with pytest.raises(ValueError, match="the curation kept no 'train' documents of 'guidelines'"):
        _training_docs(out, monkeypatch)
    # Shards made by hand, without a manifest, that are all empty.
    hand = tmp_path / "hand"
    (hand / "replay").mkdir(parents=True)
    (hand / "replay" / "train-00000-of-00001.jsonl").write_text("")
    with pytest.raises(ValueError, match="the curated shards for 'replay' split 'train' .* are all empty"):
        _training_docs(hand, monkeypatch, "replay")


@pytest.mark.parametrize("case", ["missing", "empty", "no_matching_files"])
def test_a_missing_or_empty_input_folder_fails_before_beam(corpus, tmp_path, capsys, monkeypatch, case):
    """Used to exit 0 with empty shards."""
    inp = tmp_path / "raw"
    if case != "missing":
        inp.mkdir()
    if case == "no_matching_files":
        (inp / "guidelines_x").mkdir()
        (inp / "guidelines_x" / "notes.txt").write_text("not a guideline dump")

    def beam_must_not_start(*a, **k):
        raise AssertionError("Beam started")

    monkeypatch.setattr(pipeline.beam, "Pipeline", beam_must_not_start)
    rc, err = curate(capsys, inp, tmp_path / "out")
    assert rc == 1
    want = "does not exist or is not a folder" if case == "missing" else "holds no input files (looked for"
    assert f"error: --input_dir {inp} {want}" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_a_foreign_output_folder_is_refused_and_kept(corpus, tmp_path, capsys):
    inp, _ = corpus
    out = tmp_path / "mine"
    before = user_folder(out)
    rc, err = curate(capsys, inp, out)
    assert rc == 1 and f"error: output {out} is not empty (2 entries: data, notes.txt)" in err
    assert snapshot(out) == before
    rc, err = curate(capsys, inp, inp / "curated")
    assert rc == 1 and "lies inside the input" in err and not (inp / "curated").exists()


def test_a_failure_inside_beam_is_one_error_line(corpus, tmp_path, capsys, monkeypatch):
    """Used to print the worker's traceback (156 lines) before the error."""
    inp, _ = corpus

    def broken(text):
        raise ValueError("language model file is corrupt")

    monkeypatch.setattr(pipeline, "english_score", broken)
    rc, err = curate(capsys, inp, tmp_path / "out")
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 1 and "Traceback" not in err
    assert lines[-1].startswith("error: the curation pipeline failed: ValueError: language model file is corrupt")
    assert "[while running 'Filter" in lines[-1]
    assert sorted(os.listdir(tmp_path)) == ["in"]  # no output, no temporary folder
