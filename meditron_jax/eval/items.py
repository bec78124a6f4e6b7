"""Evaluation items: the benchmark records of MEDITRON.md §5 rendered into prompts, with gold answers.

Records and prompts come from :mod:`meditron_jax.data.benchmarks` (MEDITRON's ``format_mcq``,
instructions, few-shot block and ChatML turn); this module only picks the split, the few-shot pool and
the rows, and attaches what scoring needs.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence

from meditron_jax.data import benchmarks as bm

# Our benchmark names -> (load_benchmark name, evaluation split). MEDITRON.md §5: MedQA test (5 and 4
# options), MedMCQA validation, PubMedQA test, MMLU-Medical test (9 subjects).
BENCHMARKS: dict[str, tuple[str, str]] = {
    "medqa": ("medqa_5opt", "test"),
    "medqa_4opt": ("medqa_4opt", "test"),
    "medmcqa": ("medmcqa", "validation"),
    "pubmedqa": ("pubmedqa", "test"),
    "mmlu_medical": ("mmlu_medical", "test"),
}
ALL = tuple(BENCHMARKS)


@dataclasses.dataclass(frozen=True)
class EvalItem:
    id: str
    benchmark: str
    seed: int | None  # the few-shot seed; None at zero shots
    prompt: str
    gold: str  # an upper-case letter, or yes/no/maybe
    options: dict[str, str]  # letter -> text; empty for PubMedQA
    subject: str = ""

    @property
    def key(self) -> str:
        """Unique within a run: the item id, plus the seed when several seeds run."""
        return self.id if self.seed is None else f"{self.id}@{self.seed}"

    @property
    def labels(self) -> tuple[str, ...]:
        """The answers a model may give: option letters, or PubMedQA's yes/no/maybe."""
        return tuple(self.options) if self.options else bm.PUBMEDQA_LABELS


def expand(benchmark: str) -> tuple[str, ...]:
    if benchmark == "all":
        return ALL
    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; expected one of {', '.join(ALL)} or all")
    return (benchmark,)


def drop_first_row_per_subject(records: Sequence[Mapping]) -> list[dict]:
    """The paper's MMLU rows: the ``lukaemon/mmlu`` loader it used read each subject CSV's first row as a
    header (MEDITRON.md §5), so 1,871 test items became 1,862 and the 55-row few-shot pool 44."""
    seen: set[str] = set()
    out = []
    for r in records:
        subject = r.get("subject", "")
        if subject not in seen:
            seen.add(subject)
            continue
        out.append(dict(r))
    return out


def records(benchmark: str, *, mmlu_paper_rows: bool = False, data_dir: str | os.PathLike | None = None) -> list[dict]:
    name, split = BENCHMARKS[benchmark]
    rows = bm.load_benchmark(name, split, data_dir=data_dir)
    if mmlu_paper_rows and benchmark == "mmlu_medical":
        rows = drop_first_row_per_subject(rows)
    return rows


def fewshot_exemplars(
    benchmark: str, shots: int, seed: int, *, mmlu_paper_rows: bool = False, data_dir=None
) -> list[Mapping]:
    """The first ``shots`` rows of the benchmark's few-shot pool after MEDITRON's seeded shuffle."""
    from meditron_jax.data.tasks import fewshot_pool  # imports TensorFlow: only when few-shot is asked

    pool_name, pool_split = fewshot_pool(BENCHMARKS[benchmark][0])
    pool = bm.load_benchmark(pool_name, pool_split, data_dir=data_dir)
    if mmlu_paper_rows and benchmark == "mmlu_medical":
        pool = drop_first_row_per_subject(pool)
    return bm.select_exemplars(pool, shots, seed)


def load_items(
    benchmark: str,
    *,
    shots: int = 0,
    seed: int | None = None,
    cot: bool = False,
    chat: bool = False,
    mmlu_paper_rows: bool = False,
    data_dir: str | os.PathLike | None = None,
) -> list[EvalItem]:
    """Every item of ``benchmark``'s evaluation split with its prompt (raw-model or ChatML)."""
    if chat and shots:
        raise ValueError("--chat prompts a finetuned model zero-shot (MEDITRON.md §4); use --shots 0")
    if shots < 0:
        raise ValueError(f"shots must be >= 0, got {shots}")
    exemplars: Sequence[Mapping] = ()
    if shots:
        if seed is None:
            raise ValueError("few-shot items need a seed")
        exemplars = fewshot_exemplars(benchmark, shots, seed, mmlu_paper_rows=mmlu_paper_rows, data_dir=data_dir)
    name = BENCHMARKS[benchmark][0]
    out = []
    for r in records(benchmark, mmlu_paper_rows=mmlu_paper_rows, data_dir=data_dir):
        if chat:
            prompt = bm.render_chat_prompt(r, name, cot=cot)
        else:
            prompt = bm.render_prompt(r, name, exemplars=exemplars, cot=cot)
        out.append(
            EvalItem(
                id=str(r["id"]),
                benchmark=benchmark,
                seed=seed if shots else None,
                prompt=prompt,
                gold=str(r["answer"]),
                options=dict(r["options"]),
                subject=r.get("subject", ""),
            )
        )
    return out


def host_share(items: Sequence, process_index: int, process_count: int) -> list:
    """The items one host evaluates: every ``process_count``-th, starting at ``process_index``."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is outside 0..{process_count - 1}")
    return list(items[process_index::process_count])
