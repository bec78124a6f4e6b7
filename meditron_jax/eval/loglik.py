"""Log-likelihood of continuations given contexts: a jitted forward of :class:`meditron_jax.model.Llama`.

Each request is (context ids, continuation ids). The scorer feeds ``context + continuation[:-1]``,
sums the log-probabilities of the continuation tokens and says whether each was the argmax (the
lm-evaluation-harness ``(logprob, is_greedy)`` pair). Rows are right-padded to a power-of-two length
bucket and batches to a fixed size, so a whole benchmark compiles once per bucket, not once per item.
Requests longer than the context window are left-truncated (the continuation is kept whole) and the
number of dropped tokens is returned, never hidden.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from meditron_jax.config import ModelConfig
from meditron_jax.model import Llama
from meditron_jax.model.llama import vocab_logits


@dataclasses.dataclass(frozen=True)
class LoglikResult:
    logprob: float  # sum of log p(continuation token | prefix)
    is_greedy: bool  # every continuation token was the argmax
    truncated: int  # context tokens dropped from the left to fit the window


def length_buckets(max_length: int, smallest: int = 32) -> tuple[int, ...]:
    """Powers of two from ``smallest`` up to, and ending with, ``max_length``."""
    out, n = [], smallest
    while n < max_length:
        out.append(n)
        n *= 2
    out.append(max_length)
    return tuple(out)


# Positions whose logits exist at once. The whole row's float32 logits were [batch, length, vocab]: 1 GB at
# batch 8 × 1,024 positions × 32,017 tokens, several times over with log_softmax and argmax (8.6 GB resident
# for the quickstart's PubMedQA scoring; docs/performance.md).
POSITION_CHUNK = 128
# Batches whose logits take at most this many bytes are scored in one piece: small vocabularies and short
# buckets gain nothing from chunks and would compile a loop per bucket.
WHOLE_BATCH_BYTES = 64 << 20


def _scored(config: ModelConfig, head, x, targets, mask):
    """(Σ mask · log p(target), every masked target the argmax) per row of hidden states ``x``."""
    logits = vocab_logits(config, x, head).astype(jnp.float32)
    tok_logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), targets[..., None], axis=-1)[..., 0]
    greedy = (jnp.argmax(logits, axis=-1) == targets) | (mask == 0)
    return jnp.sum(tok_logp * mask, axis=-1), jnp.all(greedy, axis=-1)


def _continuation_sums(config: ModelConfig, x, head, targets, mask):
    """(Σ mask · log p(target), every masked target the argmax) per row, from the final hidden state ``x``
    [b, l, embed]: the head runs on chunks of positions, and not at all on chunks without a masked position
    (a continuation is the end of its row, so most chunks of a long context have none)."""
    b, length = targets.shape
    if b * length * config.vocab_size * 4 <= WHOLE_BATCH_BYTES or length <= POSITION_CHUNK:
        return _scored(config, head, x, targets, mask)
    chunk = POSITION_CHUNK
    n = -(-length // chunk)
    pad = n * chunk - length

    def chunks(a):  # [b, l, ...] -> [n, b, chunk, ...], padded positions masked out
        a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
        return jnp.swapaxes(a.reshape(b, n, chunk, *a.shape[2:]), 0, 1)

    def one(args):
        xc, tc, mc = args
        skipped = (jnp.zeros((b,), jnp.float32), jnp.ones((b,), bool))
        return jax.lax.cond(jnp.any(mc != 0), functools.partial(_scored, config, head), lambda *_: skipped, xc, tc, mc)

    sums, greedy = jax.lax.map(one, (chunks(x), chunks(targets), chunks(mask)))
    return jnp.sum(sums, axis=0), jnp.all(greedy, axis=0)


class LoglikScorer:
    def __init__(
        self,
        config: ModelConfig,
        params,
        *,
        batch_size: int = 8,
        max_length: int | None = None,
        buckets: Sequence[int] | None = None,
    ):
        self.config = config
        self.params = params
        self.batch_size = int(batch_size)
        self.max_length = int(max_length or config.max_position_embeddings)
        self.buckets = tuple(sorted(buckets)) if buckets else length_buckets(self.max_length)
        if self.buckets[-1] < self.max_length:
            raise ValueError(f"the largest bucket {self.buckets[-1]} is below max_length {self.max_length}")
        self.shapes_compiled: set[tuple[int, int]] = set()
        model = Llama(config)

        def score(params, tokens, targets, mask):
            x, head = model.apply({"params": params}, tokens, return_hidden=True)
            return _continuation_sums(config, x, head, targets, mask)

        self._score = jax.jit(score)

    def _bucket(self, length: int) -> int:
        for b in self.buckets:
            if b >= length:
                return b
        raise AssertionError("unreachable: requests are truncated to max_length")

    def score(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[LoglikResult]:
        """(logprob, is_greedy, truncated) per (context ids, continuation ids) request, in order."""
        prepared = []
        for i, (ctx, cont) in enumerate(requests):
            ctx, cont = [int(t) for t in ctx], [int(t) for t in cont]
            if not cont:
                raise ValueError(f"request {i}: empty continuation")
            if not ctx:
                raise ValueError(f"request {i}: empty context (start it with BOS)")
            if len(cont) > self.max_length:
                raise ValueError(
                    f"request {i}: continuation of {len(cont)} tokens exceeds the window {self.max_length}"
                )
            full = ctx + cont
            drop = max(0, len(full) - 1 - self.max_length)
            prepared.append((full[drop:], len(cont), drop))
        # Group by bucket so each batch has one shape; keep the caller's order in the output.
        results: list[LoglikResult | None] = [None] * len(prepared)
        by_bucket: dict[int, list[int]] = {}
        for i, (full, _, _) in enumerate(prepared):
            by_bucket.setdefault(self._bucket(len(full) - 1), []).append(i)
        for width, idx in sorted(by_bucket.items()):
            for start in range(0, len(idx), self.batch_size):
                chunk = idx[start : start + self.batch_size]
                tokens = np.zeros((self.batch_size, width), np.int32)
                targets = np.zeros((self.batch_size, width), np.int32)
                mask = np.zeros((self.batch_size, width), np.float32)
                for row, i in enumerate(chunk):
                    full, n_cont, _ = prepared[i]
                    n = len(full) - 1
                    tokens[row, :n] = full[:-1]
                    targets[row, :n] = full[1:]
                    mask[row, n - n_cont : n] = 1.0
                self.shapes_compiled.add((self.batch_size, width))
                sums, greedy = self._score(self.params, tokens, targets, mask)
                sums, greedy = np.asarray(sums), np.asarray(greedy)
                for row, i in enumerate(chunk):
                    results[i] = LoglikResult(float(sums[row]), bool(greedy[row]), prepared[i][2])
        return results  # type: ignore[return-value]
