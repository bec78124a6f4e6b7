"""Parsers on hand-written outputs: MEDITRON's evaluate.py quirks kept, the robust parser's forms, the vote."""

import pytest

from meditron_jax.eval.parsers import Parsed, parse, parse_meditron, parse_robust, vote
from meditron_jax.eval.stats import mean_std, wilson_interval

MCQ = {"A": "Aspirin", "B": "Lung cancer", "C": "Cancer", "D": "I"}


@pytest.mark.parametrize(
    "output, answer",
    [
        ("B", "B"),
        (" b", "B"),
        ("(C) because", "C"),  # non-alphanumerics become spaces, then the first character
        ("because", "B"),  # first character, whatever the word: the original's bug
        ("Answer: B", "A"),  # "answer b" -> "a": the first character again
        ("\n## D\nmore", "D"),  # text after "\n##" up to the line end
        ("1", None),
        ("", None),
        ("é", None),
        ("yes", None),  # "y" is not an option letter
    ],
)
def test_meditron_mcq(output, answer):
    assert parse_meditron(output, answer_type="mcq").answer == answer


@pytest.mark.parametrize(
    "output, answer",
    [
        ("yes", "yes"),
        ("No", "no"),
        (" yes.", "yes"),
        ("maybe", None),  # never valid
        ("yes, because", None),  # the whole cleaned output must be exactly yes or no
        ("yesno", "yes"),  # clean_double_answer
        ("noyes", "no"),
        ("a", "A"),  # valid (a-e are accepted for every benchmark) but never equal to a yes/no gold
    ],
)
def test_meditron_boolean(output, answer):
    assert parse_meditron(output, answer_type="boolean").answer == answer


def test_meditron_fewshot_cuts_at_blank_line():
    out = " B\n\nQuestion: next one\nA. x"
    assert parse_meditron(out, answer_type="mcq", shots=3).answer == "B"
    assert parse_meditron(" yes\n\nContext", answer_type="boolean", shots=3).answer == "yes"
    # zero-shot does not cut: "yes  context" is not exactly yes
    assert parse_meditron("yes\n\nContext", answer_type="boolean", shots=0).answer is None


def test_meditron_cot():
    assert parse_meditron("Let's see... so the answer is (C).", answer_type="mcq", cot=True).answer == "C"
    # the last "answer is" wins
    assert parse_meditron("the answer is A. No wait, the answer is D", answer_type="mcq", cot=True).answer == "D"
    # no "answer is": the first word's first character
    assert parse_meditron("Dementia is likely.", answer_type="mcq", cot=True).answer == "D"
    assert parse_meditron("Thus the answer is yes.", answer_type="boolean", cot=True).answer == "yes"
    assert parse_meditron("Thus the answer is maybe.", answer_type="boolean", cot=True).answer is None
    assert parse_meditron("the answer is", answer_type="mcq", cot=True).answer is None  # nothing after it
    bad = parse_meditron("The answer is ...", answer_type="mcq", cot=True)
    assert bad == Parsed("the answer is ...", None)  # the vote key is the whole lower-cased output


@pytest.mark.parametrize(
    "output, answer",
    [
        ("B", "B"),
        ("(B)", "B"),
        ("B.", "B"),
        ("B) Lung cancer", "B"),
        ("Answer: B", "B"),
        ("The answer is b", "B"),
        ("I think the correct option is (D).", "D"),
        ("option C", "C"),
        ("Lung cancer", "B"),  # the option's text
        ("It is lung cancer, clearly.", "B"),  # longer text beats the "Cancer" it contains
        ("aspirin.", "A"),
        ("A patient like this needs aspirin", "A"),  # the article "A" is not read as a letter...
        ("A patient like this", None),  # ...and without an option text nothing is found
        ("I cannot tell", None),  # option D's text "I" is too short to match inside words
        ("I", "D"),  # but an exact answer still matches
        ("", None),
        ("E", None),  # not an option
    ],
)
def test_robust_mcq(output, answer):
    assert parse_robust(output, options=MCQ).answer == answer


@pytest.mark.parametrize(
    "output, answer",
    [
        ("maybe", "maybe"),
        ("Yes.", "yes"),
        ("The answer is: no", "no"),
        ("Answer: maybe, since", "maybe"),
        ("nope", None),
    ],
)
def test_robust_pubmedqa(output, answer):
    assert parse_robust(output, options={}).answer == answer


def test_robust_cot_and_fewshot():
    cot = "Option A is wrong because of yes-no confusion.\nSo the answer is (C)."
    assert parse_robust(cot, options=MCQ, cot=True).answer == "C"
    assert parse_robust("Reasoning about B...\nFinal: D.", options=MCQ, cot=True).answer == "D"  # last line
    assert parse_robust(" no\n\nContext: yes", options={}, shots=3).answer == "no"


def test_parse_dispatch():
    assert parse("meditron", "maybe", options={}).answer is None
    assert parse("robust", "maybe", options={}).answer == "maybe"
    with pytest.raises(ValueError, match="unknown parser"):
        parse("other", "A", options=MCQ)


def test_vote_majority_ties_and_garbage():
    P = Parsed
    assert vote([P("a", "A"), P("b", "B"), P("b", "B")]).answer == "B"
    assert vote([P("b", "B"), P("a", "A"), P("a", "A"), P("b", "B")]).answer == "B"  # tie: first seen
    assert vote([P("a", "A"), P("b", "B")]).answer == "A"
    # unparseable branches vote with their raw text: two identical garbage outputs beat one answer
    g = P("i don't know", None)
    assert vote([P("c", "C"), g, g]).answer is None
    assert vote([g, P("c", "C")]).answer is None  # tie: the garbage came first
    with pytest.raises(ValueError):
        vote([])


def test_vote_matches_meditron_counter():
    from collections import Counter

    keys = ["b", "junk one", "a", "junk one", "a", "b"]
    # the original: Counter(pred_pool).most_common(1)[0][0]
    want = Counter(keys).most_common(1)[0][0]
    assert vote([Parsed(k, k.upper() if len(k) == 1 else None) for k in keys]).key == want == "b"


def test_wilson_interval():
    # reference values: statsmodels proportion_confint(8, 10, method="wilson") = (0.4902, 0.9433)
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    assert wilson_interval(0, 20)[0] == 0.0 and wilson_interval(0, 20)[1] == pytest.approx(0.1611, abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def test_mean_std():
    assert mean_std([0.5]) == (0.5, 0.0)
    m, s = mean_std([0.2, 0.4, 0.6])
    assert m == pytest.approx(0.4) and s == pytest.approx(0.2)  # sample std (ddof=1)


def test_published_table_matches_meditron_md(shared_data):
    """published.PUBLISHED against the tables of ../shared/MEDITRON.md §6, parsed here from the Markdown."""
    from meditron_jax.eval import published

    text = (shared_data.parent / "MEDITRON.md").read_text()
    section = text.split("## 6.")[1].split("## 7.")[0]
    names = {
        "Llama-2-7B": ("llama-2-7b", "fewshot"),
        "MEDITRON-7B": ("meditron-7b", "fewshot"),
        "Llama-2-70B": ("llama-2-70b", "fewshot"),
        "MEDITRON-70B": ("meditron-70b", "fewshot"),
        "MEDITRON-7B, top-token": ("meditron-7b", "top_token"),
        "MEDITRON-70B, top-token": ("meditron-70b", "top_token"),
        "MEDITRON-70B, CoT": ("meditron-70b", "cot"),
        "MEDITRON-70B, SC-CoT": ("meditron-70b", "sc_cot"),
    }
    seen = set()
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] in names:
            key = names[cells[0]]
            values = [float(c) for c in cells[1:6]]  # MMLU-Med, PubMedQA, MedMCQA, MedQA, MedQA-4 (then avg)
            want = dict(zip(("mmlu_medical", "pubmedqa", "medmcqa", "medqa", "medqa_4opt"), values, strict=True))
            assert published.PUBLISHED[key] == want
            seen.add(key)
    assert seen == set(published.PUBLISHED)
    assert published.lookup("pubmedqa", "top_token", size="7b", chat=False, shots=3)[0] == 69.3
    assert published.lookup("pubmedqa", "top_token", size="7b", chat=False, shots=5)[0] is None
    assert published.lookup("medqa", "sc_cot", size="70b", chat=True, shots=0)[0] == 64.4
    assert published.lookup("medqa", "cot", size="7b", chat=True, shots=0)[0] is None  # no 7B CoT row
    assert published.lookup("medqa", "loglik", size="7b", chat=True, shots=0)[0] is None
    assert published.model_size(4096, 32) == "7b" and published.model_size(64, 5) is None
