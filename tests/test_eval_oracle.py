"""Oracle tests on the real benchmark files: forced answers score exactly what counting the files says.

A model forced to emit the gold answer scores 100% (MEDITRON's parser: 100% minus PubMedQA's "maybe"
items, which that parser never accepts); one forced to a fixed answer scores that answer's share of
the gold labels, counted here straight from the raw files (json/csv), not through our readers.
"""

import collections
import csv
import json

import pytest

from meditron_jax.eval import report
from meditron_jax.eval.parsers import parse, vote
from meditron_jax.eval.runner import Evaluator, Settings
from tests.eval_fakes import ForcedEngine, ForcedScorer, WordTokenizer

BENCHMARKS = ("medqa", "medqa_4opt", "medmcqa", "pubmedqa", "mmlu_medical")
STRATEGIES = ("top_token", "cot", "sc_cot", "loglik")
MMLU_NINE = (
    "anatomy",
    "clinical_knowledge",
    "college_biology",
    "college_medicine",
    "high_school_biology",
    "medical_genetics",
    "nutrition",
    "professional_medicine",
    "virology",
)


def gold_counts(benchmark, root):
    """Counter of gold labels, read from the raw files."""
    if benchmark in ("medqa", "medqa_4opt"):
        name = "test.jsonl" if benchmark == "medqa" else "phrases_no_exclude_test.jsonl"
        with open(root / "medqa" / name) as f:
            return collections.Counter(json.loads(line)["answer_idx"] for line in f if line.strip())
    if benchmark == "medmcqa":
        with open(root / "medmcqa" / "dev.json") as f:
            return collections.Counter("ABCD"[json.loads(line)["cop"] - 1] for line in f if line.strip())
    if benchmark == "pubmedqa":
        with open(root / "pubmedqa" / "test_ground_truth.json") as f:
            return collections.Counter(json.load(f).values())
    counts = collections.Counter()
    for subject in MMLU_NINE:
        with open(root / "mmlu_medical" / "test" / f"{subject}_test.csv", newline="") as f:
            counts.update(row[5] for row in csv.reader(f))
    return counts


def fixed_answer(benchmark):
    return "yes" if benchmark == "pubmedqa" else "A"


def wrong(item):
    return next(label for label in item.labels if label != item.gold)


def _gold_text(strategy, item, branch):
    g = item.gold
    if strategy == "top_token":
        return g
    if strategy == "cot":
        return f"First, consider each option carefully.\nTherefore, the answer is {g}."
    # sc_cot: 2 gold votes beat 1 wrong, 1 other wrong and 1 garbage
    return [f"So the answer is {wrong(item)}.", f"the answer is {g}", "I cannot tell.", f"The answer is {g}.", "?"][
        branch
    ]


def _fixed_text(strategy, benchmark, branch):
    a = fixed_answer(benchmark)
    return a if strategy == "top_token" else f"Reasoning ... the answer is {a}"


def run_oracle(benchmark, strategy, parser, mode, tmp_path, shots=0, seeds=(1234,), limit=None):
    tok = WordTokenizer()
    settings = Settings(strategy=strategy, parser=parser, shots=shots, seeds=seeds, sc_branches=5)
    by_prompt, by_ctx = {}, {}
    engine = scorer = None
    if strategy == "loglik":

        def choose(ctx):
            item = by_ctx[tuple(ctx)]
            return item.gold if mode == "gold" else fixed_answer(benchmark)

        scorer = ForcedScorer(tok, choose)
    else:

        def respond(ids, branch, sampling):
            item = by_prompt[tuple(ids)]
            if shots:  # a raw model runs on into a next exemplar, which the parser cuts off
                return f" {item.gold if mode == 'gold' else fixed_answer(benchmark)}\n\nQuestion: what next?"
            if mode == "gold":
                return _gold_text(strategy, item, branch)
            return _fixed_text(strategy, benchmark, branch)

        engine = ForcedEngine(respond)
    ev = Evaluator(
        settings, tokenizer=tok, max_length=None, engine=engine, scorer=scorer, batch_size=512, progress=False
    )
    items = ev.items(benchmark, limit=limit)
    for item in items:
        by_prompt[tuple(tok.encode(item.prompt, bos=True))] = item
        by_ctx[tuple(tok.encode(item.prompt.rstrip(), bos=True))] = item
    tmp_path.mkdir(parents=True, exist_ok=True)
    rows = ev.run(benchmark, tmp_path, limit=limit)
    return rows, engine, items


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("benchmark", BENCHMARKS)
def test_gold_and_fixed_oracles(benchmark, strategy, tmp_path, shared_data):
    counts = gold_counts(benchmark, shared_data)
    n = sum(counts.values())
    assert n == {"medqa": 1273, "medqa_4opt": 1273, "medmcqa": 4183, "pubmedqa": 500, "mmlu_medical": 1871}[benchmark]

    rows, _, items = run_oracle(benchmark, strategy, "robust", "gold", tmp_path / "gold_robust")
    assert len(rows) == n and len({r["key"] for r in rows}) == n
    assert report.score_rows(rows)["accuracy"] == 1.0

    # MEDITRON's parser on the same outputs (loglik does not parse)
    if strategy != "loglik":
        options = {it.key: it.options for it in items}
        for r in rows:
            parsed = [
                parse("meditron", o, options=options[r["key"]], cot=strategy != "top_token") for o in r["outputs"]
            ]
            final = vote(parsed) if strategy == "sc_cot" else parsed[0]
            r["answer"], r["correct"] = final.answer, final.answer == r["gold"]
    got = report.score_rows(rows)
    if benchmark == "pubmedqa" and strategy != "loglik":
        # MEDITRON's parser accepts only exactly yes/no: the maybe items are unparseable, so wrong
        assert got["accuracy"] == pytest.approx((n - counts["maybe"]) / n)
        # SC-CoT: the maybe branches' raw texts differ, so each has one vote and the tie goes to the
        # first branch, a parseable (wrong) "yes"
        parsed = n if strategy == "sc_cot" else n - counts["maybe"]
        assert got["parse_rate"] == pytest.approx(parsed / n)
    else:
        assert got["accuracy"] == 1.0 and got["parse_rate"] == 1.0

    rows, _, _ = run_oracle(benchmark, strategy, "meditron", "fixed", tmp_path / "fixed")
    got = report.score_rows(rows)
    assert got["correct"] == counts[fixed_answer(benchmark)]
    assert got["accuracy"] == pytest.approx(counts[fixed_answer(benchmark)] / n)
    assert got["parse_rate"] == 1.0


@pytest.mark.parametrize("benchmark", ("pubmedqa", "medqa_4opt", "mmlu_medical"))
def test_fewshot_oracle_and_seeds(benchmark, tmp_path, shared_data):
    rows, engine, _ = run_oracle(
        benchmark, "top_token", "meditron", "fixed", tmp_path, shots=3, seeds=(1234, 432), limit=150
    )
    assert len(rows) == 300
    # few-shot: the gold's token length + 8 new tokens (inference.py tokenizer_param)
    assert {s.max_new_tokens for _, s in engine.calls} <= {9, 10}
    by_seed = {s: [r for r in rows if r["seed"] == s] for s in (1234, 432)}
    assert by_seed[1234][0]["prompt"] != by_seed[432][0]["prompt"]  # different exemplars per seed
    table = report.table({benchmark: rows}, strategy="top_token", shots=3, chat=False, model_size="7b")
    assert [r["seed"] for r in table] == [1234, 432, "mean"]
    fixed = fixed_answer(benchmark)
    share = sum(r["gold"] == fixed for r in by_seed[1234]) / 150
    assert table[0]["accuracy"] == pytest.approx(share)
    assert table[2]["accuracy"] == pytest.approx(share) and table[2]["accuracy_std"] == pytest.approx(0.0)
    published = {"pubmedqa": 0.693, "medqa_4opt": 0.374, "mmlu_medical": 0.423}[benchmark]
    assert table[2]["published_accuracy"] == pytest.approx(published)


def test_medmcqa_fewshot_names_the_missing_train_split(tmp_path):
    with pytest.raises(FileNotFoundError, match="medmcqa.*train"):
        run_oracle("medmcqa", "top_token", "meditron", "fixed", tmp_path, shots=3, seeds=(1234,), limit=5)


def test_mmlu_paper_rows(shared_data):
    tok = WordTokenizer()
    ev = Evaluator(Settings(mmlu_paper_rows=True), tokenizer=tok, max_length=None, engine=object(), progress=False)
    items = ev.items("mmlu_medical")
    assert len(items) == 1862
    # the dropped rows are each subject CSV's first row
    firsts = set()
    for subject in MMLU_NINE:
        with open(shared_data / "mmlu_medical" / "test" / f"{subject}_test.csv", newline="") as f:
            firsts.add(next(csv.reader(f))[0])
    kept_questions = {it.prompt.split("Question: ", 1)[1].split("\n\nOptions:")[0].rstrip("?") for it in items}
    assert not any(q.rstrip("?") in kept_questions for q in firsts)
    from meditron_jax.eval.items import fewshot_exemplars

    pool = fewshot_exemplars("mmlu_medical", 44, 1234, mmlu_paper_rows=True)
    assert len(pool) == 44
    with pytest.raises(ValueError, match="45 exemplars requested from a pool of 44"):
        fewshot_exemplars("mmlu_medical", 45, 1234, mmlu_paper_rows=True)


def test_sampling_settings_follow_meditron(tmp_path):
    _, engine, _ = run_oracle("medqa_4opt", "top_token", "meditron", "fixed", tmp_path / "t", limit=20)
    ((_, s),) = engine.calls
    assert (s.max_new_tokens, s.temperature, s.frequency_penalty, s.n) == (1, 0.0, 1.0, 1)
    assert s.stop_strings == ("###",) and s.stop_token_ids == (WordTokenizer.eos_id,) and s.top_p == 1.0
    _, engine, _ = run_oracle("medqa_4opt", "cot", "meditron", "fixed", tmp_path / "c", limit=20)
    assert {(s.max_new_tokens, s.temperature, s.n) for _, s in engine.calls} == {(1024, 0.0, 1)}
    _, engine, _ = run_oracle("medqa_4opt", "sc_cot", "meditron", "fixed", tmp_path / "s", limit=20)
    assert {(s.max_new_tokens, s.temperature, s.n) for _, s in engine.calls} == {(1024, 0.8, 5)}


def test_real_llama_tokenizer_answer_lengths(shared_data):
    """With Llama-2's tokenizer every gold (a letter, yes, no, maybe) is one token: top-token generates 1
    token zero-shot and 9 few-shot, as MEDITRON's tokenizer_param."""
    from meditron_jax.data.vocabulary import Tokenizer

    tok = Tokenizer(shared_data / "llama2_tokenizer" / "tokenizer.model")
    assert all(len(tok.encode(w, bos=False)) == 1 for w in ("A", "E", "yes", "no", "maybe"))
    ev = Evaluator(Settings(), tokenizer=tok, max_length=4096, engine=object(), progress=False)
    items = ev.items("pubmedqa")
    assert {ev.max_new_tokens(it) for it in items} == {1}
    few = Evaluator(Settings(shots=3, seeds=(1234,)), tokenizer=tok, max_length=4096, engine=object())
    assert {few.max_new_tokens(it) for it in few.items("medqa_4opt", limit=40)} == {9}
    # prompts through the real tokenizer fit Llama-2's 4096 context untruncated, and round-trip
    ids, dropped = ev.prompt_ids(items[0].prompt, 1)
    assert dropped == 0 and ids[0] == tok.bos_id and tok.decode(ids) == items[0].prompt


@pytest.mark.parametrize("benchmark, limit", [("pubmedqa", None), ("medqa", 200)])
def test_gold_oracle_through_llama_tokenizer(benchmark, limit, shared_data, tmp_path):
    """The same oracle with Llama-2's real SentencePiece tokenizer between prompt and engine."""
    from meditron_jax.data.vocabulary import Tokenizer

    tok = Tokenizer(shared_data / "llama2_tokenizer" / "tokenizer.model")
    by_prompt = {}
    engine = ForcedEngine(lambda ids, branch, sampling: " " + by_prompt[tuple(ids)].gold)
    ev = Evaluator(Settings(parser="robust"), tokenizer=tok, max_length=4096, engine=engine, progress=False)
    for it in ev.items(benchmark, limit=limit):
        by_prompt[tuple(tok.encode(it.prompt, bos=True))] = it
    rows = ev.run(benchmark, tmp_path, limit=limit)
    got = report.score_rows(rows)
    assert got["n"] == (limit or 500) and got["accuracy"] == 1.0 and got["truncated_items"] == 0


class SplitMaybe(WordTokenizer):
    """ "maybe" is two tokens (as in stories260K's 512-piece vocabulary)."""

    def encode(self, text, *, bos=True, eos=False):
        ids = super().encode(text, bos=bos, eos=eos)
        return ids + [ids[-1]] if text == "maybe" else ids


def test_answer_length_is_the_first_gold_of_each_16():
    """inference.py computed max_tokens from batch['gold'][0] with batches of 16: replayed by default."""
    tok = SplitMaybe()
    ev = Evaluator(Settings(), tokenizer=tok, max_length=None, engine=object(), progress=False)
    items = ev.items("pubmedqa")
    for start in range(0, len(items), 16):
        first = items[start].gold
        assert {ev.max_new_tokens(it) for it in items[start : start + 16]} == {2 if first == "maybe" else 1}
    assert {ev.max_new_tokens(it) for it in items} == {1, 2}  # both happen on the real file
    labels = Evaluator(Settings(answer_tokens="labels"), tokenizer=tok, max_length=None, engine=object())
    assert {labels.max_new_tokens(it) for it in labels.items("pubmedqa")} == {2}


def test_chat_prompts(tmp_path):
    tok = WordTokenizer()
    ev = Evaluator(Settings(chat=True), tokenizer=tok, max_length=None, engine=object(), progress=False)
    items = ev.items("pubmedqa", limit=5)
    assert all(it.prompt.startswith("<|im_start|>question\n") for it in items)
    assert all(it.prompt.endswith("The answer is:\n<|im_end|>\n<|im_start|>answer\n") for it in items)
    with pytest.raises(ValueError, match="zero-shot"):
        Settings(chat=True, shots=3)
    with pytest.raises(ValueError, match="few-shot chain of thought"):
        Settings(strategy="sc_cot", shots=3)
