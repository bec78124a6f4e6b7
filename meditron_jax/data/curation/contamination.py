"""Benchmark contamination: drop training documents that share word n-grams with evaluation items.

Choice: 13-grams of lower-cased word tokens (punctuation ignored), as GPT-3 did (Brown et al. 2020, App. C);
a document is contaminated when it contains at least ``min_hits`` (default 1) reference n-grams.
- A reference shorter than 13 words but at least ``min_ref_words`` (8) long is matched as a whole
  (many MedMCQA / MMLU questions are short); shorter ones cannot be checked reliably and are counted.
- An n-gram found in more than ``max_ref_df`` distinct references is exam boilerplate ("which of the
  following is the most appropriate next step in management") rather than a specific item, and is ignored.
The core (``ContaminationIndex``) takes ``(label, text)`` pairs; ``benchmark_references`` is the thin
adapter that reads the benchmark test sets with ``meditron_jax.data.benchmarks.load_benchmark``: MedQA
(4 and 5 options) test questions, MedMCQA validation (MEDITRON's test) questions, MMLU-medical test
questions, and PubMedQA question + contexts + long answer for all 1000 PQA-L items (the contexts are
PubMed abstracts: SOURCES.md §7 says they must not be pretraining text).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np

from . import hashing
from .text import words

NGRAM = 13
DEFAULT_REFERENCES = (
    "medqa_4opt/test",
    "medqa_5opt/test",
    "medmcqa/validation",
    "mmlu_medical/test",
    "pubmedqa/test",
    "pubmedqa/train",
    "pubmedqa/validation",
)


@dataclasses.dataclass
class ContaminationIndex:
    n: int
    lengths: tuple[int, ...]  # window lengths to scan: n, plus whole-reference lengths below n
    hashes: dict[int, np.ndarray]  # window length -> sorted unique n-gram hashes
    owners: dict[int, np.ndarray]  # window length -> index into ``labels`` (first reference with that gram)
    labels: list[str]
    stats: dict[str, int]
    min_hits: int = 1

    @classmethod
    def build(
        cls,
        references: Iterable[tuple[str, str]],
        n: int = NGRAM,
        min_ref_words: int = 8,
        max_ref_df: int = 10,
        min_hits: int = 1,
    ) -> ContaminationIndex:
        labels: list[str] = []
        seen: set[str] = set()
        stats: Counter = Counter()
        tokens: list[str] = []
        spans: list[tuple[int, int]] = []  # (start, length) of each kept reference in ``tokens``
        for label, text in references:
            toks = words(text)
            key = " ".join(toks)
            stats["references"] += 1
            if key in seen:  # MedQA 4- and 5-option sets share their questions
                stats["duplicate_references"] += 1
                continue
            seen.add(key)
            if len(toks) < min_ref_words:
                stats["too_short_to_check"] += 1
                continue
            labels.append(label)
            spans.append((len(tokens), len(toks)))
            tokens.extend(toks)
        # All references in one array: hash each distinct word once, n-grams in one vectorised pass.
        wh = hashing.word_hashes(tokens)
        owner_of = np.repeat(np.arange(len(spans), dtype=np.int64), [ln for _, ln in spans])
        grams: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        h = hashing.ngram_hashes(wh, n)
        valid = owner_of[: len(h)] == owner_of[n - 1 :]  # windows inside one reference
        grams[n] = (h[valid], owner_of[: len(h)][valid])
        for i, (start, ln) in enumerate(spans):  # shorter than n: the whole reference is one gram
            if ln < n:
                g = hashing.ngram_hashes(wh[start : start + ln], ln)
                hs, os_ = grams.get(ln, (np.empty(0, np.uint64), np.empty(0, np.int64)))
                grams[ln] = (np.append(hs, g), np.append(os_, i))
        hashes, owners = {}, {}
        for k, (hs, os_) in grams.items():
            if not len(hs):
                continue
            order = np.lexsort((os_, hs))
            hs, os_ = hs[order], os_[order]
            pair_new = np.r_[True, (hs[1:] != hs[:-1]) | (os_[1:] != os_[:-1])]
            hs, os_ = hs[pair_new], os_[pair_new]  # distinct (gram, reference) pairs
            starts = np.flatnonzero(np.r_[True, hs[1:] != hs[:-1]])
            df = np.diff(np.r_[starts, len(hs)])  # number of references holding the gram
            keep = df <= max_ref_df
            stats["common_ngrams_ignored"] += int((~keep).sum())
            hashes[k], owners[k] = hs[starts][keep], os_[starts][keep]
            stats[f"ngrams_{k}"] = int(keep.sum())
        stats["checked_references"] = len(labels)
        return cls(
            n=n,
            lengths=tuple(sorted(hashes, reverse=True)),
            hashes=hashes,
            owners=owners,
            labels=labels,
            stats=dict(stats),
            min_hits=min_hits,
        )

    def find(self, text: str) -> tuple[int, list[str]]:
        """``(hits, labels of matched references)`` for one document."""
        wh = hashing.word_hashes(words(text))
        hits, found = 0, set()
        for k in self.lengths:
            doc = hashing.ngram_hashes(wh, k)
            if not len(doc):
                continue
            ref = self.hashes[k]
            idx = np.searchsorted(ref, doc)
            idx[idx == len(ref)] = 0
            match = ref[idx] == doc
            if match.any():
                hits += int(match.sum())
                found.update(self.owners[k][idx[match]].tolist())
        return hits, sorted(self.labels[i] for i in found)

    def is_contaminated(self, text: str) -> tuple[bool, list[str]]:
        hits, labels = self.find(text)
        return hits >= self.min_hits, labels


def benchmark_references(
    specs: Sequence[str] = DEFAULT_REFERENCES, data_dir: str | None = None
) -> list[tuple[str, str]]:
    """``(label, text)`` for every item of the ``name/split`` benchmark sets (label ``name/split:id``)."""
    from meditron_jax.data.benchmarks import load_benchmark

    out = []
    for spec in specs:
        name, split = spec.split("/")
        for item in load_benchmark(name, split, data_dir=data_dir):
            parts = [item.get("question") or ""]
            if name.startswith("pubmedqa"):
                parts += [item.get("context") or "", item.get("long_answer") or ""]
            out.append((f"{spec}:{item['id']}", "\n".join(p for p in parts if p)))
    return out
