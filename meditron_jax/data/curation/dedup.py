"""Exact and near-duplicate detection: a normalised-text hash, and MinHash signatures with LSH banding.

- Exact: SHA-1 of the lower-cased word tokens (punctuation, case and whitespace differences ignored).
  MEDITRON's guideline code hashed only the first 500 alphanumeric characters; the whole text is used here
  so that documents sharing a boilerplate opening are not merged.
- Near: Jaccard similarity of word 5-gram shingles, estimated from a 128-permutation MinHash over 32-bit
  shingle hashes; permutation i is the multiply-shift hash ``h_i(x) = ((a_i x + b_i) mod 2^64) >> 32`` with
  a_i odd (Dietzfelbinger et al.'s universal family; cheaper in numpy than a Mersenne-prime modulus).
  LSH with 16 bands x 8 rows makes pairs above ~0.7 candidates (P(candidate) = 1 - (1 - J^8)^16: 0.95 at
  J = 0.8, 0.9999 at J = 0.9); a candidate pair is a duplicate when the signatures agree on at least
  ``threshold`` (0.8) of the permutations.
Which copy survives is decided by a sort key (source rank, id): a document is dropped when it has a
verified near-duplicate with a smaller key. In a chain A~B~C with A !~ C this drops B and C (slightly
more than one-per-cluster, but needs no global connected-components pass).
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np

from . import hashing
from .text import words

_MASK32 = np.uint64(0xFFFFFFFF)
_SHIFT = np.uint64(32)


def exact_key(text: str) -> str:
    return hashlib.sha1(" ".join(words(text)).encode("utf-8")).hexdigest()


@dataclasses.dataclass(frozen=True)
class MinHashConfig:
    num_perm: int = 128
    bands: int = 16
    shingle: int = 5
    threshold: float = 0.8
    seed: int = 1
    max_compare: int = 64  # per LSH bucket: compare a document with at most this many smaller-key members

    def __post_init__(self):
        if self.num_perm % self.bands:
            raise ValueError(f"num_perm {self.num_perm} is not a multiple of bands {self.bands}")


class MinHasher:
    def __init__(self, config: MinHashConfig = MinHashConfig()):
        self.config = config
        rng = np.random.default_rng(config.seed)
        self.a = rng.integers(0, 1 << 63, size=config.num_perm, dtype=np.uint64)[:, None] * np.uint64(2) + np.uint64(1)
        self.b = rng.integers(0, 1 << 63, size=config.num_perm, dtype=np.uint64)[:, None]

    def shingles(self, text: str) -> np.ndarray:
        toks = words(text)
        n = min(self.config.shingle, max(1, len(toks)))
        return np.unique(hashing.text_ngram_hashes(toks, n) & _MASK32)

    def signature(self, text: str) -> np.ndarray:
        sh = self.shingles(text)
        if not len(sh):
            return np.zeros(self.config.num_perm, dtype=np.uint32)
        sig = np.full(self.config.num_perm, 0xFFFFFFFF, dtype=np.uint64)
        with np.errstate(over="ignore"):
            for i in range(0, len(sh), 4096):
                x = sh[None, i : i + 4096]
                sig = np.minimum(sig, ((self.a * x + self.b) >> _SHIFT).min(axis=1))
        return sig.astype(np.uint32)

    def band_keys(self, sig: np.ndarray) -> list[str]:
        rows = self.config.num_perm // self.config.bands
        return [
            f"{b}:{hashlib.blake2b(sig[b * rows : (b + 1) * rows].tobytes(), digest_size=8).hexdigest()}"
            for b in range(self.config.bands)
        ]


def estimated_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(a == b))


def near_duplicate_pairs(members: list[tuple[str, np.ndarray]], config: MinHashConfig) -> list[tuple[str, str, float]]:
    """Within one LSH bucket: ``(dropped_key, kept_key, similarity)`` for each member that matches a
    member with a smaller key."""
    members = sorted(members, key=lambda m: m[0])
    out = []
    for j in range(1, len(members)):
        kj, sj = members[j]
        for ki, si in members[max(0, j - config.max_compare) : j]:
            sim = estimated_jaccard(si, sj)
            if sim >= config.threshold:
                out.append((kj, ki, sim))
                break
    return out
