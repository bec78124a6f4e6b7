"""MEDITRON's published accuracies (%), to print beside ours.

Source: Chen et al. 2023, "MEDITRON-70B: Scaling Medical Pretraining for Large Language Models",
Tables 4 (in-context, raw models) and 5 (finetuned), as summarised in ../shared/MEDITRON.md §6.
In-context rows are 3-shot for 7B and 5-shot for 70B, mean of seeds 1234/432/32.
"""

from __future__ import annotations

SOURCE = "MEDITRON paper (arXiv:2311.16079) Tables 4-5, via MEDITRON.md §6"

BENCHMARKS = ("mmlu_medical", "pubmedqa", "medmcqa", "medqa", "medqa_4opt")


def _row(*values: float) -> dict[str, float]:
    return dict(zip(BENCHMARKS, values, strict=True))


# (model, setting) -> benchmark -> accuracy %. setting: "fewshot" (raw model, in-context) or the
# finetuned model's decoding ("top_token", "cot", "sc_cot").
PUBLISHED: dict[tuple[str, str], dict[str, float]] = {
    ("llama-2-7b", "fewshot"): _row(41.4, 49.1, 37.9, 29.1, 35.4),
    ("meditron-7b", "fewshot"): _row(42.3, 69.3, 36.3, 28.7, 37.4),
    ("llama-2-70b", "fewshot"): _row(71.3, 72.8, 52.4, 49.0, 58.4),
    ("meditron-70b", "fewshot"): _row(71.5, 79.8, 53.3, 52.0, 59.8),
    ("meditron-7b", "top_token"): _row(55.6, 74.4, 59.2, 47.9, 52.0),
    ("meditron-70b", "top_token"): _row(73.6, 80.0, 65.1, 60.7, 65.4),
    ("meditron-70b", "cot"): _row(74.9, 81.0, 63.2, 61.5, 67.8),
    ("meditron-70b", "sc_cot"): _row(77.6, 81.6, 66.0, 64.4, 70.2),
}

# The paper's shot count per size for in-context rows.
PAPER_SHOTS = {"7b": 3, "70b": 5}


def model_size(hidden_size: int, num_layers: int) -> str | None:
    """ "7b" / "70b" for Llama-2's two shapes (MEDITRON.md §1), else None."""
    return {(4096, 32): "7b", (8192, 80): "70b"}.get((hidden_size, num_layers))


def lookup(
    benchmark: str, strategy: str, *, size: str | None, chat: bool, shots: int, family: str = "meditron"
) -> tuple[float | None, str]:
    """(published accuracy % or None, the row it comes from) for a run of ours.

    A raw model at the paper's shot count with top-token decoding compares with Table 4; a finetuned
    (ChatML) model at zero shots with top-token / CoT / SC-CoT compares with Table 5. Anything else
    (log-likelihood scoring, other shot counts, tiny models) has no published counterpart.
    """
    if size is None or benchmark not in BENCHMARKS:
        return None, ""
    model = f"{'llama-2' if family == 'llama-2' else 'meditron'}-{size}"
    if not chat and strategy == "top_token" and shots == PAPER_SHOTS[size]:
        key = (model, "fewshot")
        label = f"{model} {shots}-shot (Table 4)"
    elif chat and shots == 0 and strategy in ("top_token", "cot", "sc_cot"):
        key = (model, strategy)
        label = f"{model} finetuned, {strategy} (Table 5)"
    else:
        return None, ""
    value = PUBLISHED.get(key, {}).get(benchmark)
    return (value, label) if value is not None else (None, "")
