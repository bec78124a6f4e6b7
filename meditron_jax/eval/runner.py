"""Run one benchmark under one strategy: prompts -> engine or scorer -> parsed, scored rows on disk.

Strategies (MEDITRON.md §5; epfLLM/meditron ``evaluation/inference.py`` @ a7c7cda3):

* ``top_token``: greedy generation over the whole vocabulary, frequency penalty 1.0, stop on ``###``,
  EOS and PAD. ``max_new_tokens`` is the gold answer's length in tokens (+8 with few-shot). The original
  computed it from the *first* gold of each batch of 16 items (``tokenizer_param(tokenizer,
  batch['gold'])`` reads ``target[0]``), so the default ``answer_tokens="meditron"`` replays that on
  groups of 16 in dataset order, whatever ``batch_size`` is; ``"labels"`` uses the longest answer label
  instead, which never depends on the gold.
* ``cot``: greedy, up to 1,024 new tokens; ``sc_cot``: ``sc_branches`` samples at temperature 0.8, voted.
* ``loglik``: the answer label whose continuation has the highest summed log-probability (our addition,
  the lm-evaluation-harness way; immune to parsing).
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys
import time
import zlib
from collections.abc import Sequence

import numpy as np

from meditron_jax.data.benchmarks import MEDITRON_SEEDS
from meditron_jax.eval import items as items_mod
from meditron_jax.eval import output
from meditron_jax.eval.parsers import PARSERS, Parsed, parse, vote

STRATEGIES = ("top_token", "cot", "sc_cot", "loglik")
ANSWER_TOKENS = ("meditron", "labels")
TOO_LONG = ("truncate", "empty")
MEDITRON_BATCH = 16  # inference.py's --batch_size default, which grouped items for max_new_tokens
FEWSHOT_EXTRA_TOKENS = 8  # inference.py tokenizer_param: +8 new tokens when shots > 0
STOP_STRINGS = ("###",)


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything that decides predictions (and so must match when a run is resumed)."""

    strategy: str = "top_token"
    shots: int = 0
    seeds: tuple[int, ...] = MEDITRON_SEEDS
    sc_branches: int = 5  # the paper's 5; the released inference.py defaults to 10
    chat: bool = False
    parser: str = "meditron"
    answer_tokens: str = "meditron"
    # prompts longer than the context: left-truncate (keeping BOS), or "empty": no generation, an empty
    # (unparseable) output, as vLLM gave MEDITRON for prompts over max_model_len
    too_long: str = "truncate"
    mmlu_paper_rows: bool = False
    cot_max_new_tokens: int = 1024
    sc_temperature: float = 0.8
    frequency_penalty: float = 1.0
    sample_seed: int = 0

    def __post_init__(self):
        def bad(field, allowed):
            raise ValueError(f"{field}={getattr(self, field)!r}: expected {allowed}")

        if self.strategy not in STRATEGIES:
            bad("strategy", " | ".join(STRATEGIES))
        if self.parser not in PARSERS:
            bad("parser", " | ".join(PARSERS))
        if self.answer_tokens not in ANSWER_TOKENS:
            bad("answer_tokens", " | ".join(ANSWER_TOKENS))
        if self.too_long not in TOO_LONG:
            bad("too_long", " | ".join(TOO_LONG))
        if self.shots < 0:
            bad("shots", "a count >= 0")
        if self.sc_branches < 1:
            bad("sc_branches", "at least 1")
        if self.cot_max_new_tokens < 1:
            bad("cot_max_new_tokens", "at least 1")
        if self.shots and not self.seeds:
            bad("seeds", "at least one seed for few-shot")
        if self.shots and self.strategy in ("cot", "sc_cot"):
            raise ValueError(
                "few-shot chain of thought is not supported: MEDITRON's used separate hand-written CoT "
                "exemplars (evaluation/prompt_cot), and the paper's CoT rows are zero-shot; use --shots 0"
            )
        if self.chat and self.shots:
            raise ValueError("--chat (a finetuned model's ChatML prompt) is zero-shot in MEDITRON; use --shots 0")

    @property
    def cot(self) -> bool:
        return self.strategy in ("cot", "sc_cot")

    @property
    def run_seeds(self) -> tuple[int | None, ...]:
        return tuple(self.seeds) if self.shots else (None,)

    def to_config(self) -> dict:
        d = dataclasses.asdict(self)
        d["seeds"] = list(self.run_seeds)
        return d


def predictions_path(out: pathlib.Path, benchmark: str, process_index: int, process_count: int) -> pathlib.Path:
    if process_count == 1:
        return out / f"predictions_{benchmark}.jsonl"
    return out / f"predictions_{benchmark}.host{process_index}of{process_count}.jsonl"


class Evaluator:
    """Evaluates items with a generation ``engine`` (``generate(prompts, SamplingParams)``) or a
    log-likelihood ``scorer`` (``score([(ctx_ids, cont_ids)])``), a ``tokenizer`` and a context window.

    Prompts longer than ``max_length`` (minus the new tokens) are left-truncated, keeping BOS; each
    row records how many tokens were dropped and the report counts the items truncated.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        tokenizer,
        max_length: int | None,
        engine=None,
        scorer=None,
        batch_size: int = 16,
        progress: bool = True,
    ):
        self.settings = settings
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.engine = engine
        self.scorer = scorer
        self.batch_size = int(batch_size)
        self.progress = progress
        if settings.strategy == "loglik" and scorer is None:
            raise ValueError("strategy loglik needs a scorer")
        if settings.strategy != "loglik" and engine is None:
            raise ValueError(f"strategy {settings.strategy} needs a generation engine")
        stop_ids = [tokenizer.eos_id]
        extra = tuple(getattr(tokenizer, "extra_tokens", ()))
        if "<PAD>" in extra:  # MEDITRON's tokenizer has a real PAD token; the original stopped on it too
            stop_ids.append(tokenizer.base_vocab_size + extra.index("<PAD>"))
        self.stop_token_ids = tuple(stop_ids)
        self._new_tokens: dict[str, int] = {}
        self._items: dict[tuple, tuple[items_mod.EvalItem, ...]] = {}

    # -- items ----------------------------------------------------------------------------------------

    def items(
        self, benchmark: str, *, limit: int | None = None, limit_seed: int | None = None, data_dir=None
    ) -> list[items_mod.EvalItem]:
        """Every item (per few-shot seed), or ``limit`` of them: the first ones, or with ``limit_seed`` a
        seeded random sample kept in file order (benchmark files can be sorted by label, as PubMedQA's
        test ids are, so the first N would all share one answer)."""
        cache_key = (benchmark, limit, limit_seed, None if data_dir is None else str(data_dir))
        if cache_key in self._items:
            return list(self._items[cache_key])
        s = self.settings
        out = []
        for seed in s.run_seeds:
            seed_items = items_mod.load_items(
                benchmark,
                shots=s.shots,
                seed=seed,
                cot=s.cot,
                chat=s.chat,
                mmlu_paper_rows=s.mmlu_paper_rows,
                data_dir=data_dir,
            )
            self._set_answer_lengths(seed_items)
            if limit is not None and limit_seed is not None and limit < len(seed_items):
                keep = np.sort(np.random.default_rng(limit_seed).choice(len(seed_items), limit, replace=False))
                seed_items = [seed_items[int(i)] for i in keep]
            out.extend(seed_items[:limit] if limit is not None else seed_items)
        self._items[cache_key] = tuple(out)
        return out

    def _set_answer_lengths(self, items: Sequence[items_mod.EvalItem]) -> None:
        """Top-token ``max_new_tokens`` per item key (see the module docstring)."""
        s = self.settings
        extra = FEWSHOT_EXTRA_TOKENS if s.shots else 0

        def n_tokens(text: str) -> int:
            return len(self.tokenizer.encode(text, bos=False))

        for start in range(0, len(items), MEDITRON_BATCH):
            group = items[start : start + MEDITRON_BATCH]
            if s.answer_tokens == "meditron":
                n = n_tokens(group[0].gold)
            else:
                n = max(n_tokens(label) for label in group[0].labels)
            for it in group:
                self._new_tokens[it.key] = n + extra

    def max_new_tokens(self, item: items_mod.EvalItem) -> int:
        if self.settings.cot:
            return self.settings.cot_max_new_tokens
        return self._new_tokens[item.key]

    # -- prompts --------------------------------------------------------------------------------------

    def prompt_ids(self, prompt: str, new_tokens: int) -> tuple[list[int], int]:
        """Token ids of ``prompt`` (with BOS) left-truncated to fit ``new_tokens``; (ids, tokens dropped)."""
        ids = self.tokenizer.encode(prompt, bos=True)
        if self.max_length is None or len(ids) + new_tokens <= self.max_length:
            return ids, 0
        keep = self.max_length - new_tokens
        if keep < 2:
            raise ValueError(
                f"the context window of {self.max_length} tokens leaves no room for a prompt "
                f"after {new_tokens} new tokens"
            )
        kept = [ids[0]] + ids[len(ids) - (keep - 1) :]
        return kept, len(ids) - len(kept)

    def encode_pairs(self, context: str, continuations: Sequence[str]) -> list[tuple[list[int], list[int]]]:
        """lm-evaluation-harness ``TemplateLM._encode_pair`` for one context and several continuations:
        trailing whitespace of the context moves to the continuation; each pair is encoded whole and
        split at the context's length (the context is encoded once)."""
        n = len(context) - len(context.rstrip())
        head, tail = (context[:-n], context[-n:]) if n else (context, "")
        ctx = self.tokenizer.encode(head, bos=True)
        return [(ctx, self.tokenizer.encode(head + tail + c, bos=True)[len(ctx) :]) for c in continuations]

    # -- evaluation -----------------------------------------------------------------------------------

    def _sampling(self, new_tokens: int, first_key: str):
        from meditron_jax.infer.engine import SamplingParams

        s = self.settings
        # The engine draws per (seed, prompt position, sample); mixing in the call's first item keeps
        # different calls from reusing the same random streams, and a rerun with the same batching the same.
        seed = (s.sample_seed * 1_000_003 + zlib.crc32(first_key.encode())) % (2**31)
        return SamplingParams(
            max_new_tokens=new_tokens,
            temperature=s.sc_temperature if s.strategy == "sc_cot" else 0.0,
            top_p=1.0,
            frequency_penalty=s.frequency_penalty,
            n=s.sc_branches if s.strategy == "sc_cot" else 1,
            stop_token_ids=self.stop_token_ids,
            stop_strings=STOP_STRINGS,
            seed=seed,
        )

    def _row(self, item, outputs: list[str], truncated: int, scores: dict | None = None) -> dict:
        s = self.settings
        if scores is not None:
            best = max(scores, key=lambda label: scores[label])  # ties: the first label (option order)
            final = Parsed(best.lower(), best)
            parsed = [final]
        else:
            parsed = [parse(s.parser, o, options=item.options, shots=s.shots, cot=s.cot) for o in outputs]
            final = vote(parsed) if s.strategy == "sc_cot" else parsed[0]
        row = {
            "key": item.key,
            "id": item.id,
            "benchmark": item.benchmark,
            "seed": item.seed,
            "subject": item.subject,
            "prompt": item.prompt,
            "outputs": outputs,
            "parsed": [p.answer for p in parsed],
            "answer": final.answer,
            "gold": item.gold,
            "correct": final.answer is not None and final.answer == item.gold,
            "truncated_tokens": truncated,
        }
        if scores is not None:
            row["scores"] = scores
        return row

    def _evaluate_chunk(self, chunk: Sequence[items_mod.EvalItem]) -> list[dict]:
        if self.settings.strategy == "loglik":
            return self._loglik_chunk(chunk)
        rows: dict[str, dict] = {}
        by_len: dict[int, list] = {}
        for it in chunk:
            by_len.setdefault(self.max_new_tokens(it), []).append(it)
        n_out = self.settings.sc_branches if self.settings.strategy == "sc_cot" else 1
        for new_tokens, group in by_len.items():
            prompts = [self.prompt_ids(it.prompt, new_tokens) for it in group]
            if self.settings.too_long == "empty":
                for it, (_, dropped) in zip(group, prompts, strict=True):
                    if dropped:
                        rows[it.key] = self._row(it, [""] * n_out, dropped)
                keep = [(it, p) for it, p in zip(group, prompts, strict=True) if not p[1]]
                group, prompts = [it for it, _ in keep], [p for _, p in keep]
            if not group:
                continue
            completions = self.engine.generate([p for p, _ in prompts], self._sampling(new_tokens, group[0].key))
            if len(completions) != len(group):
                raise RuntimeError(f"the engine returned {len(completions)} results for {len(group)} prompts")
            for it, (_, dropped), comps in zip(group, prompts, completions, strict=True):
                rows[it.key] = self._row(it, [c.text for c in comps], dropped)
        return [rows[it.key] for it in chunk]

    def _loglik_chunk(self, chunk: Sequence[items_mod.EvalItem]) -> list[dict]:
        requests: list[tuple[list[int], list[int]]] = []
        owners: list[tuple[str, str]] = []
        for it in chunk:
            sep = "" if it.prompt[-1:].isspace() else " "
            requests.extend(self.encode_pairs(it.prompt, [sep + label for label in it.labels]))
            owners.extend((it.key, label) for label in it.labels)
        results = self.scorer.score(requests)
        scores: dict[str, dict[str, float]] = {}
        dropped: dict[str, int] = {}
        for (key, label), res in zip(owners, results, strict=True):
            scores.setdefault(key, {})[label] = res.logprob
            dropped[key] = max(dropped.get(key, 0), res.truncated)
        return [self._row(it, [], dropped[it.key], scores=scores[it.key]) for it in chunk]

    def run(
        self,
        benchmark: str,
        out: pathlib.Path,
        *,
        limit: int | None = None,
        limit_seed: int | None = None,
        process_index: int = 0,
        process_count: int = 1,
        data_dir=None,
        shard_wait_s: float = 3600.0,
    ) -> list[dict] | None:
        """Evaluate this host's share of ``benchmark``, resuming from its predictions file. Returns every
        host's rows (in item order) on process 0, None on the others."""
        all_items = self.items(benchmark, limit=limit, limit_seed=limit_seed, data_dir=data_dir)
        mine = items_mod.host_share(all_items, process_index, process_count)
        path = predictions_path(out, benchmark, process_index, process_count)
        have = {r["key"]: r for r in output.read_rows(path)}
        todo = [it for it in mine if it.key not in have]
        bar = _progress(len(mine), len(mine) - len(todo), f"{benchmark} {self.settings.strategy}", self.progress)
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start : start + self.batch_size]
            rows = self._evaluate_chunk(chunk)
            output.append_rows(path, rows)
            have.update((r["key"], r) for r in rows)
            bar.update(len(chunk))
        bar.close()
        done = path.with_name(path.name + ".done")
        if process_count > 1:
            output.write_atomic(done, f"{len(mine)}\n")
        if process_index != 0:
            return None
        for i in range(1, process_count):
            other = predictions_path(out, benchmark, i, process_count)
            _wait_for(other.with_name(other.name + ".done"), shard_wait_s)
            have.update((r["key"], r) for r in output.read_rows(other))
        missing = [it.key for it in all_items if it.key not in have]
        if missing:
            raise RuntimeError(f"{benchmark}: {len(missing)} items have no prediction (first: {missing[0]})")
        return [have[it.key] for it in all_items]


def _wait_for(path: pathlib.Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout_s:.0f} s: has that host finished its share?")
        time.sleep(2.0)


class _Line:
    """Progress on stderr without tqdm: items done, items/s and ETA, at most every 5 s."""

    def __init__(self, total, initial, desc):
        self.total, self.n, self.desc, self.t0, self.n0, self.last = (
            total,
            initial,
            desc,
            time.monotonic(),
            initial,
            0.0,
        )

    def update(self, k):
        self.n += k
        now = time.monotonic()
        if now - self.last >= 5 or self.n >= self.total:
            rate = (self.n - self.n0) / max(now - self.t0, 1e-9)
            eta = (self.total - self.n) / rate if rate > 0 else float("inf")
            print(f"{self.desc}: {self.n}/{self.total} items, {rate:.2f} items/s, ETA {eta:.0f} s", file=sys.stderr)
            self.last = now

    def close(self):
        pass


def _progress(total: int, initial: int, desc: str, enabled: bool):
    if not enabled:
        return _Null()
    try:
        from tqdm import tqdm
    except ImportError:
        return _Line(total, initial, desc)
    return tqdm(total=total, initial=initial, desc=desc, unit="item", file=sys.stderr, dynamic_ncols=True)


class _Null:
    def update(self, k):
        pass

    def close(self):
        pass
