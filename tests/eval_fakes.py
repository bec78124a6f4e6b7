"""Fakes for evaluation tests: a word tokenizer, an engine and a scorer that emit forced answers."""

from __future__ import annotations

import re

from meditron_jax.eval.loglik import LoglikResult
from meditron_jax.infer.engine import Completion

_WORDS = re.compile(r"\s+|\S+")


class WordTokenizer:
    """One id per word or whitespace run: prefixes of a text encode to prefixes of its ids (as the
    lm-eval split needs), and it is fast enough to tokenize whole benchmarks."""

    bos_id, eos_id, base_vocab_size, extra_tokens = 1, 2, 3, ()

    def __init__(self):
        self.ids: dict[str, int] = {}
        self.words: list[str] = []
        self._cache: dict[str, list[int]] = {}

    def encode(self, text: str, *, bos: bool = True, eos: bool = False) -> list[int]:
        ids = self._cache.get(text)
        if ids is None:
            table = self.ids
            ids = [table.get(w) or self._new(w) for w in _WORDS.findall(text)]
            self._cache[text] = ids
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def _new(self, word: str) -> int:
        self.ids[word] = 3 + len(self.words)
        self.words.append(word)
        return self.ids[word]

    def decode(self, ids) -> str:
        return "".join(self.words[i - 3] for i in ids if i >= 3)


class ForcedEngine:
    """``generate`` returns ``respond(prompt_ids, branch, sampling)`` for each of ``sampling.n`` branches."""

    def __init__(self, respond):
        self.respond = respond
        self.calls = []

    def generate(self, prompts, sampling):
        self.calls.append((len(prompts), sampling))
        return [
            [
                Completion(token_ids=[], text=self.respond(list(p), b, sampling), finish_reason="stop")
                for b in range(sampling.n)
            ]
            for p in prompts
        ]


class ForcedScorer:
    """``score`` gives 0 to the continuation ``choose(context_ids)`` names (after stripping), -5 otherwise."""

    def __init__(self, tokenizer, choose):
        self.tokenizer, self.choose = tokenizer, choose

    def score(self, requests):
        out = []
        for ctx, cont in requests:
            label = self.tokenizer.decode(cont).strip()
            out.append(LoglikResult(0.0 if label == self.choose(list(ctx)) else -5.0, False, 0))
        return out
