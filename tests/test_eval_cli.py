"""scripts/evaluate.py end to end: the real tiny model, resumption, output-folder safety, a 2-host split."""

import json
import subprocess
import sys

import pytest

from meditron_jax.eval import cli
from tests.eval_fakes import ForcedEngine, WordTokenizer


@pytest.mark.slow
def test_cli_stories260k_pubmedqa(shared_data, tmp_path):
    """The real checkpoint, tokenizer and generation engine; 512-token context, so prompts are truncated."""
    out = tmp_path / "out"
    argv = ["--checkpoint", str(shared_data / "stories260K_hf"), "--benchmark", "pubmedqa", "--strategy", "top_token"]
    assert (
        cli.main([*argv, "--limit", "20", "--output", str(out), "--no_progress"], process_index=0, process_count=1) == 0
    )
    results = json.loads((out / "results.json").read_text())
    (row,) = results["results"]
    assert row["benchmark"] == "pubmedqa" and row["strategy"] == "top_token" and row["n"] == 20
    assert 0.0 <= row["accuracy"] <= 1.0 and row["ci95_low"] <= row["accuracy"] <= row["ci95_high"]
    preds = [json.loads(line) for line in (out / "predictions_pubmedqa.jsonl").read_text().splitlines()]
    assert len(preds) == 20 and len({p["key"] for p in preds}) == 20
    for p in preds:
        assert {"id", "prompt", "outputs", "answer", "gold", "correct"} <= set(p)
        assert p["gold"] in ("yes", "no", "maybe") and len(p["outputs"]) == 1
    # every PubMedQA prompt is longer than 512 tokens: all truncated, and said so
    assert row["truncated_items"] == sum(p["truncated_tokens"] > 0 for p in preds) == 20
    assert "| pubmedqa | top_token |" in (out / "results.md").read_text()


@pytest.mark.slow
def test_cli_stories260k_sc_cot_and_loglik(shared_data, tmp_path):
    """The real engine with several samples per prompt, and the real log-likelihood scorer, through the CLI."""
    ckpt = str(shared_data / "stories260K_hf")
    base = ["--checkpoint", ckpt, "--benchmark", "medqa_4opt", "--limit", "3", "--no_progress"]
    sc = [
        *base,
        "--strategy",
        "sc_cot",
        "--sc_branches",
        "3",
        "--cot_max_new_tokens",
        "8",
        "--output",
        str(tmp_path / "sc"),
    ]
    cli.main(sc, process_index=0, process_count=1)
    preds = [json.loads(line) for line in (tmp_path / "sc" / "predictions_medqa_4opt.jsonl").read_text().splitlines()]
    assert len(preds) == 3 and all(len(p["outputs"]) == 3 and len(p["parsed"]) == 3 for p in preds)
    assert any(len(set(p["outputs"])) > 1 for p in preds)  # temperature 0.8: the branches differ
    cli.main([*base, "--strategy", "loglik", "--output", str(tmp_path / "ll")], process_index=0, process_count=1)
    preds = [json.loads(line) for line in (tmp_path / "ll" / "predictions_medqa_4opt.jsonl").read_text().splitlines()]
    for p in preds:
        assert set(p["scores"]) == {"A", "B", "C", "D"} and all(v < 0 for v in p["scores"].values())
        assert p["answer"] == max(p["scores"], key=p["scores"].get)
    row = json.loads((tmp_path / "ll" / "results.json").read_text())["results"][0]
    assert row["n"] == 3 and row["parse_rate"] == 1.0


def test_help_shows_an_example():
    proc = subprocess.run(
        [sys.executable, "scripts/evaluate.py", "--help"], capture_output=True, text=True, timeout=120, check=True
    )
    assert "examples:" in proc.stdout and "--checkpoint" in proc.stdout and "--mmlu_paper_rows" in proc.stdout


class FakeBackend:
    """A forced model: answers the gold on about half the items (by prompt), a wrong letter elsewhere."""

    def __init__(self, max_length=None):
        self.tok = WordTokenizer()
        self.max_length = max_length
        self.prompts = []

        def respond(ids, branch, sampling):
            self.prompts.append(tuple(ids))
            return "A" if len(self.tok.decode(ids)) % 2 else "yes"  # a function of the text, not of ids

        self.engine = ForcedEngine(respond)

    def __call__(self, checkpoint, settings, dtype, batch_size):
        return self.tok, self.max_length, self.engine, None, None


def _run(tmp_path, out, *extra, backend=None, **kw):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir(exist_ok=True)
    argv = ["--checkpoint", str(ckpt), "--benchmark", "medqa_4opt", "--output", str(out), "--no_progress", *extra]
    backend = backend or FakeBackend()
    cli.main(argv, backend=backend, process_index=kw.get("process_index", 0), process_count=kw.get("process_count", 1))
    return backend


def _preds(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_resume_after_interruption(tmp_path):
    fresh = tmp_path / "fresh"
    _run(tmp_path, fresh, "--limit", "20", "--batch_size", "3")
    out = tmp_path / "resumed"
    _run(tmp_path, out, "--limit", "7", "--batch_size", "3")  # "interrupted" after 7 items
    # a torn last line, as a kill mid-write leaves
    with open(out / "predictions_medqa_4opt.jsonl", "a") as f:
        f.write('{"key": "test-00007", "id": ')
    second = _run(tmp_path, out, "--limit", "20", "--batch_size", "3")
    assert len(second.prompts) == 13  # only the missing items were generated
    got, want = _preds(out / "predictions_medqa_4opt.jsonl"), _preds(fresh / "predictions_medqa_4opt.jsonl")
    assert [r["key"] for r in got] == [r["key"] for r in want]  # no duplicates, same order
    assert got == want
    assert json.loads((out / "results.json").read_text())["results"][0]["n"] == 20
    # nothing left to do: a third run generates nothing and writes the same table
    third = _run(tmp_path, out, "--limit", "20")
    assert third.prompts == []


def test_resume_refuses_other_settings(tmp_path):
    out = tmp_path / "out"
    _run(tmp_path, out, "--limit", "3")
    with pytest.raises(SystemExit, match="different settings.*strategy: was 'top_token', now 'cot'"):
        _run(tmp_path, out, "--limit", "3", "--strategy", "cot")
    backend = _run(tmp_path, out, "--limit", "3", "--strategy", "cot", "--overwrite")
    assert len(backend.prompts) == 3
    assert json.loads((out / "eval_config.json").read_text())["strategy"] == "cot"


def test_output_folder_safety(tmp_path):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit, match="not empty and is not an evaluation output"):
        _run(tmp_path, user, "--limit", "2")
    _run(tmp_path, user, "--limit", "2", "--overwrite")
    assert (user / "notes.txt").read_text() == "keep me" and (user / "results.json").exists()
    with pytest.raises(SystemExit, match="inside the checkpoint"):
        _run(tmp_path, tmp_path / "ckpt" / "eval", "--limit", "2", "--overwrite")
    assert not (tmp_path / "ckpt" / "eval").exists()


def test_two_hosts_split_the_items(tmp_path):
    single = tmp_path / "single"
    _run(tmp_path, single, "--limit", "21")
    out = tmp_path / "multi"
    b1 = _run(tmp_path, out, "--limit", "21", process_index=1, process_count=2)
    assert not (out / "results.json").exists()  # only process 0 writes the table
    b0 = _run(tmp_path, out, "--limit", "21", process_index=0, process_count=2)
    assert len(b0.prompts) == 11 and len(b1.prompts) == 10 and not set(b0.prompts) & set(b1.prompts)
    host0 = _preds(out / "predictions_medqa_4opt.host0of2.jsonl")
    host1 = _preds(out / "predictions_medqa_4opt.host1of2.jsonl")
    assert len(host0) == 11 and len(host1) == 10
    want = json.loads((single / "results.json").read_text())["results"]
    got = json.loads((out / "results.json").read_text())["results"]
    assert got == want


def test_truncation_is_counted(tmp_path):
    out = tmp_path / "out"
    backend = FakeBackend(max_length=40)
    _run(tmp_path, out, "--limit", "4", backend=backend)
    preds = _preds(out / "predictions_medqa_4opt.jsonl")
    assert all(p["truncated_tokens"] > 0 for p in preds)
    # BOS kept, then the prompt's last tokens; room left for the 1 new token
    for ids, p in zip(backend.prompts, preds, strict=True):
        full = backend.tok.encode(p["prompt"], bos=True)
        assert ids[0] == 1 and len(ids) == 39 and list(ids[1:]) == full[-38:]
        assert p["truncated_tokens"] == len(full) - 39
    assert json.loads((out / "results.json").read_text())["results"][0]["truncated_items"] == 4


def test_too_long_empty_answers_without_generating(tmp_path):
    out = tmp_path / "out"
    backend = FakeBackend(max_length=40)
    _run(tmp_path, out, "--limit", "4", "--too_long", "empty", backend=backend)
    preds = _preds(out / "predictions_medqa_4opt.jsonl")
    assert backend.prompts == []  # nothing generated
    assert all(p["outputs"] == [""] and p["answer"] is None and not p["correct"] for p in preds)
    row = json.loads((out / "results.json").read_text())["results"][0]
    assert row["truncated_items"] == 4 and row["parse_rate"] == 0.0


def test_missing_fewshot_pool_fails_before_any_generation(tmp_path):
    out = tmp_path / "out"
    backend = FakeBackend()
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    argv = ["--checkpoint", str(ckpt), "--benchmark", "all", "--shots", "3", "--output", str(out), "--no_progress"]
    with pytest.raises(SystemExit, match="meditron-eval: medmcqa: .*medmcqa.*train"):
        cli.main(argv, backend=backend, process_index=0, process_count=1)
    assert backend.prompts == [] and not list(out.glob("predictions_*"))


def test_limit_seed_samples_across_a_label_sorted_file(tmp_path, shared_data):
    """PubMedQA's test ids are sorted by label: the first 60 are all "yes"; a seeded sample is not."""
    truth = json.loads((shared_data / "pubmedqa" / "test_ground_truth.json").read_text())
    assert set(list(truth.values())[:60]) == {"yes"}  # why --limit alone would mislead
    runs = {}
    (tmp_path / "ckpt").mkdir()
    for name, extra in (("a", ("--limit_seed", "0")), ("b", ("--limit_seed", "0")), ("c", ("--limit_seed", "1"))):
        out = tmp_path / name
        argv = [
            "--checkpoint",
            str(tmp_path / "ckpt"),
            "--benchmark",
            "pubmedqa",
            "--output",
            str(out),
            "--no_progress",
        ]
        cli.main([*argv, "--limit", "60", *extra], backend=FakeBackend(), process_index=0, process_count=1)
        runs[name] = [(r["id"], r["gold"]) for r in _preds(out / "predictions_pubmedqa.jsonl")]
    ids = [i for i, _ in runs["a"]]
    assert len(ids) == len(set(ids)) == 60 and set(ids) <= set(truth)
    assert ids == sorted(ids, key=list(truth).index)  # kept in file order
    assert {g for _, g in runs["a"]} == {"yes", "no", "maybe"} and all(truth[i] == g for i, g in runs["a"])
    assert runs["a"] == runs["b"] and runs["a"] != runs["c"]  # the seed decides the sample
