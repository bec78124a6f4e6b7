"""The accuracy table: per benchmark (and per few-shot seed, with mean ± std), JSON and Markdown.

Each row: benchmark, strategy, shots, seed, n, correct, accuracy, the 95% Wilson score interval,
parse rate, items whose prompt was truncated, and MEDITRON's published number for the same model
size / benchmark / strategy (:mod:`meditron_jax.eval.published`) when one exists.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping, Sequence

from meditron_jax.eval import published
from meditron_jax.eval.output import RESULTS_JSON, RESULTS_MD, write_atomic
from meditron_jax.eval.stats import mean_std, wilson_interval


def by_subject(rows: Sequence[Mapping]) -> dict[str, dict]:
    """MMLU per-subject n and accuracy (evaluate.py printed these too); empty when rows have no subject."""
    subjects = list(dict.fromkeys(r.get("subject") or "" for r in rows))
    if subjects == [""]:
        return {}
    out = {}
    for subject in subjects:
        sub = [r for r in rows if (r.get("subject") or "") == subject]
        out[subject] = {"n": len(sub), "accuracy": sum(bool(r["correct"]) for r in sub) / len(sub)}
    return out


def score_rows(rows: Sequence[Mapping]) -> dict:
    n = len(rows)
    correct = sum(bool(r["correct"]) for r in rows)
    parsed = sum(r["answer"] is not None for r in rows)
    lo, hi = wilson_interval(correct, n)
    return {
        "n": n,
        "correct": correct,
        "accuracy": correct / n if n else 0.0,
        "ci95_low": lo,
        "ci95_high": hi,
        "ci_method": "wilson",
        "parse_rate": parsed / n if n else 0.0,
        "truncated_items": sum(int(r.get("truncated_tokens", 0)) > 0 for r in rows),
    }


def table(
    rows_by_benchmark: Mapping[str, Sequence[Mapping]],
    *,
    strategy: str,
    shots: int,
    chat: bool,
    model_size: str | None,
    published_family: str = "meditron",
) -> list[dict]:
    out = []
    for benchmark, rows in rows_by_benchmark.items():
        value, source = published.lookup(
            benchmark, strategy, size=model_size, chat=chat, shots=shots, family=published_family
        )
        base = {"benchmark": benchmark, "strategy": strategy, "shots": shots, "chat": chat}
        extra = {"published_accuracy": None if value is None else value / 100.0, "published_source": source}
        seeds = list(dict.fromkeys(r["seed"] for r in rows if r["seed"] is not None))
        if not seeds:
            out.append({**base, "seed": None, **score_rows(rows), **extra, **_subjects(rows)})
            continue
        per_seed = []
        for seed in seeds:
            seed_rows = [r for r in rows if r["seed"] == seed]
            row = {**base, "seed": seed, **score_rows(seed_rows), **_subjects(seed_rows)}
            per_seed.append(row)
            out.append({**row, "published_accuracy": None, "published_source": ""})
        mean, std = mean_std([r["accuracy"] for r in per_seed])
        out.append(
            {
                **base,
                "seed": "mean",
                "n": per_seed[0]["n"],
                "accuracy": mean,
                "accuracy_std": std,
                "seeds": seeds,
                "parse_rate": sum(r["parse_rate"] for r in per_seed) / len(per_seed),
                "truncated_items": max(r["truncated_items"] for r in per_seed),
                **extra,
            }
        )
    return out + _average(out, rows_by_benchmark)


def _subjects(rows) -> dict:
    subjects = by_subject(rows)
    return {"by_subject": subjects} if subjects else {}


def _average(results: Sequence[Mapping], rows_by_benchmark: Mapping) -> list[dict]:
    """The papers' "avg" column: the mean of the five benchmarks' accuracies (the seed means with few-shot),
    only when all five were run."""
    if set(rows_by_benchmark) != set(published.BENCHMARKS):
        return []
    final = [r for r in results if r["seed"] in (None, "mean")]
    pubs = [r["published_accuracy"] for r in final]
    first = final[0]
    return [
        {
            "benchmark": "average",
            "strategy": first["strategy"],
            "shots": first["shots"],
            "chat": first["chat"],
            "seed": first["seed"],
            "n": sum(r["n"] for r in final),
            "accuracy": sum(r["accuracy"] for r in final) / len(final),
            "accuracy_std": None,
            "parse_rate": sum(r["parse_rate"] * r["n"] for r in final) / sum(r["n"] for r in final),
            "truncated_items": sum(r["truncated_items"] for r in final),
            "published_accuracy": None if None in pubs else sum(pubs) / len(pubs),
            "published_source": "mean of the five published numbers" if None not in pubs else "",
        }
    ]


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def markdown(results: Sequence[Mapping]) -> str:
    lines = [
        "| benchmark | strategy | shots | seed | n | accuracy % | 95% CI (Wilson) | parse rate % | truncated | "
        "MEDITRON published % |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if r["benchmark"] == "average":
            acc, ci = _pct(r["accuracy"]), "— (mean of the five benchmarks)"
        elif r["seed"] == "mean":
            acc = f"{_pct(r['accuracy'])} ± {100 * r['accuracy_std']:.1f}"
            ci = "— (mean ± std over seeds)"
        else:
            acc = _pct(r["accuracy"])
            ci = f"{_pct(r['ci95_low'])}–{_pct(r['ci95_high'])}"
        pub = _pct(r.get("published_accuracy"))
        if r.get("published_source"):
            pub += f" ({r['published_source']})"
        seed = "—" if r["seed"] is None else str(r["seed"])
        lines.append(
            f"| {r['benchmark']} | {r['strategy']}{' (chat)' if r['chat'] else ''} | {r['shots']} | {seed} | "
            f"{r['n']} | {acc} | {ci} | {_pct(r['parse_rate'])} | {r['truncated_items']} | {pub} |"
        )
    return "\n".join(lines) + "\n"


def write(out: pathlib.Path, results: Sequence[Mapping], config: Mapping) -> None:
    payload = {"config": dict(config), "source_of_published": published.SOURCE, "results": list(results)}
    write_atomic(out / RESULTS_JSON, json.dumps(payload, indent=2) + "\n")
    write_atomic(out / RESULTS_MD, markdown(results))
