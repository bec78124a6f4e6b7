"""Deterministic 64-bit word and n-gram hashes, vectorised with numpy.

Python's ``hash(str)`` is salted per process, so it cannot be used for dedup buckets or contamination
n-grams that are computed on different Beam workers: words are hashed with BLAKE2b (8 bytes) and n-grams
are combined with a polynomial rolling hash (wrapping uint64 arithmetic).
"""

from __future__ import annotations

import hashlib

import numpy as np

_BASE = np.uint64(0x100000001B3)  # FNV-64 prime as the polynomial base


def word_hashes(tokens: list[str]) -> np.ndarray:
    # Hash each distinct word once, then gather: per-token numpy assignment would dominate the run time.
    ids: dict[str, int] = {}
    pos = np.fromiter((ids.setdefault(w, len(ids)) for w in tokens), dtype=np.int64, count=len(tokens))
    uniq = np.fromiter(
        (int.from_bytes(hashlib.blake2b(w.encode("utf-8"), digest_size=8).digest(), "little") for w in ids),
        dtype=np.uint64,
        count=len(ids),
    )
    return uniq[pos]


def ngram_hashes(wh: np.ndarray, n: int) -> np.ndarray:
    """Hash of every window of ``n`` consecutive word hashes (empty when there are fewer than ``n`` words)."""
    m = len(wh) - n + 1
    if m <= 0:
        return np.empty(0, dtype=np.uint64)
    acc = np.zeros(m, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in range(n):
            acc = acc * _BASE + wh[k : k + m]
    return acc


def text_ngram_hashes(tokens: list[str], n: int) -> np.ndarray:
    return ngram_hashes(word_hashes(tokens), n)
