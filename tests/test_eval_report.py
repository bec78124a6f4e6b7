"""The accuracy table on hand-made rows: seeds, mean ± std, MMLU subjects, the five-benchmark average."""

import pytest

from meditron_jax.eval import report


def _rows(n_correct, n, seed=None, subject=""):
    return [
        {"key": f"{i}@{seed}", "seed": seed, "subject": subject, "correct": i < n_correct, "answer": "A", "gold": "A"}
        for i in range(n)
    ]


def test_average_row_and_subjects():
    rows = {
        "mmlu_medical": _rows(3, 4, 1234, "anatomy") + _rows(1, 4, 1234, "virology") + _rows(2, 8, 432, "anatomy"),
        "pubmedqa": _rows(5, 10, 1234) + _rows(7, 10, 432),
        "medmcqa": _rows(1, 2, 1234) + _rows(1, 2, 432),
        "medqa": _rows(0, 5, 1234) + _rows(5, 5, 432),
        "medqa_4opt": _rows(2, 4, 1234) + _rows(2, 4, 432),
    }
    table = report.table(rows, strategy="top_token", shots=3, chat=False, model_size="7b")
    assert [(r["benchmark"], r["seed"]) for r in table[:3]] == [
        ("mmlu_medical", 1234),
        ("mmlu_medical", 432),
        ("mmlu_medical", "mean"),
    ]
    assert table[0]["by_subject"] == {"anatomy": {"n": 4, "accuracy": 0.75}, "virology": {"n": 4, "accuracy": 0.25}}
    means = {r["benchmark"]: r for r in table if r["seed"] == "mean"}
    assert means["pubmedqa"]["accuracy"] == pytest.approx(0.6)
    assert means["pubmedqa"]["accuracy_std"] == pytest.approx(0.1414213, abs=1e-6)  # sample std of 0.5, 0.7
    assert means["medqa"]["accuracy"] == pytest.approx(0.5)
    avg = table[-1]
    assert avg["benchmark"] == "average"
    # by hand: mmlu (0.5 + 0.25)/2, pubmedqa 0.6, medmcqa 0.5, medqa 0.5, medqa_4opt 0.5
    assert avg["accuracy"] == pytest.approx((0.375 + 0.6 + 0.5 + 0.5 + 0.5) / 5)
    assert avg["published_accuracy"] == pytest.approx(0.428)  # Table 4's MEDITRON-7B avg, 42.8
    md = report.markdown(table)
    assert "| average |" in md and "| pubmedqa | top_token | 3 | mean | 10 | 60.0 ± 14.1 |" in md


def test_no_average_for_a_subset_and_zero_shot_rows():
    table = report.table({"pubmedqa": _rows(1, 4)}, strategy="loglik", shots=0, chat=False, model_size=None)
    (row,) = table
    assert row["seed"] is None and row["accuracy"] == 0.25 and row["published_accuracy"] is None
    assert "by_subject" not in row
