"""All SeqIO tasks and mixtures of the project. Importing this module registers them.

GAP-REPLAY pretraining (MEDITRON.md §2)
    ``gap_replay_guidelines``, ``gap_replay_pubmed_abstracts``, ``gap_replay_pmc_papers``,
    ``gap_replay_replay``: curated shards of one source (``train`` and ``validation``; replay has only
    ``train``, as in MEDITRON), tokenized with MEDITRON's 32,017-token vocabulary, EOS appended per
    document, documents longer than the training length cut into pieces of at most that length (SeqIO
    would otherwise trim them and lose most of a paper). Mixture ``gap_replay``: the sources at
    MEDITRON's shares of train tokens, settable from gin (``gap_replay_rates``).

Benchmarks (MEDITRON.md §5), prompts from :mod:`meditron_jax.data.benchmarks`
    ``{b}_eval`` (zero-shot), ``{b}_{k}shot_eval`` (seed 1234) and ``{b}_{k}shot_seed{s}_eval``
    (k = 3, 5; s = 1234, 432, 32), ``{b}_cot_eval``, and for finetuned models ``{b}_chat_eval`` /
    ``{b}_chat_cot_eval``; b is ``medqa_4opt``, ``medqa_5opt``, ``medmcqa``, ``pubmedqa`` or
    ``mmlu_medical_<subject>`` (all 11 subjects). Mixtures ``mmlu_medical{variant}_eval`` hold the 9
    subjects MEDITRON scores. Features: ``inputs`` (prompt), ``targets`` (gold answer), plus ``id`` and
    ``answer`` strings for scoring.

Supervised finetuning (MEDITRON.md §4), see ``SFT_SOURCES``
    ``medqa_sft`` (5-option train), ``medmcqa_sft`` (train rows with an explanation; validation is a
    seeded holdout of them, MedMCQA's dev set being its test set), ``pubmedqa_sft`` (PQA-A 200k),
    ``pubmedqa_pqal_sft`` (PQA-L's 450 + 50 non-test items), and chain-of-thought ``medmcqa_cot_sft`` /
    ``pubmedqa_cot_sft``: ``inputs`` = the ChatML question turn, ``targets`` = the answer turn, 32,019-token
    vocabulary. Splits ``train``, ``validation`` and ``test`` (the benchmark's scored rows, to watch the loss
    only). Train rows: :func:`sft_train_data`. :func:`meditron_jax.data.pipeline.make_dataset` batches them one
    example per row (MEDITRON) or packed (loss on the answer turn only, causal attention throughout).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import gin
import numpy as np
import seqio
import tensorflow as tf

from meditron_jax import fs
from meditron_jax.data import benchmarks as bm
from meditron_jax.data.curation import SOURCES
from meditron_jax.data.curation.manifest import manifest_shards
from meditron_jax.data.paths import shared_data_dir
from meditron_jax.data.seqio_vocab import meditron_vocabulary

# ----------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------

CURATED_ENV = "MEDITRON_CURATED_DATA"
GAP_REPLAY_SOURCES = SOURCES
# MEDITRON.md §2: share of train tokens per source.
MEDITRON_TOKEN_SHARES = {"guidelines": 0.002, "pubmed_abstracts": 0.117, "pmc_papers": 0.872, "replay": 0.009}


@gin.configurable
def curated_data_dir(path: str | None = None) -> str:
    """Folder of the curated GAP-REPLAY shards: gin ``curated_data_dir.path``, else $MEDITRON_CURATED_DATA.
    Local, or a URL (``gs://bucket/gap_replay``) returned as given: pathlib would turn ``gs://`` into ``gs:/``."""
    path = path or os.environ.get(CURATED_ENV)
    if not path:
        raise ValueError(f"no curated GAP-REPLAY folder: set gin curated_data_dir.path or ${CURATED_ENV}")
    return os.fspath(path)


@gin.configurable
def curated_shard_patterns(
    source: str, split: str, patterns: Sequence[str] = ("{source}/{split}-*", "{source}/{split}.*")
) -> list[str]:
    """Glob patterns (relative to the curated folder) of one source's split; the curation pipeline's
    layout is ``{source}/{split}-NNNNN-of-NNNNN.jsonl`` (``.jsonl.gz`` and ``.tfrecord`` also read)."""
    return [p.format(source=source, split=split) for p in patterns]


@gin.configurable
def gap_replay_rates(
    guidelines: float = MEDITRON_TOKEN_SHARES["guidelines"],
    pubmed_abstracts: float = MEDITRON_TOKEN_SHARES["pubmed_abstracts"],
    pmc_papers: float = MEDITRON_TOKEN_SHARES["pmc_papers"],
    replay: float = MEDITRON_TOKEN_SHARES["replay"],
) -> dict[str, float]:
    """Mixing rates of the ``gap_replay`` mixture (normalised when sampling)."""
    rates = {"guidelines": guidelines, "pubmed_abstracts": pubmed_abstracts, "pmc_papers": pmc_papers, "replay": replay}
    if any(r < 0 for r in rates.values()) or sum(rates.values()) <= 0:
        raise ValueError(f"mixing rates must be non-negative with a positive sum, got {rates}")
    return rates


# Where few-shot exemplars come from. MEDITRON drew them from each benchmark's train split; MedQA's
# train split (10,178 rows) is not in the shared data, so its dev split stands in by default.
DEFAULT_FEWSHOT_POOLS = {
    "medqa_4opt": ("medqa_4opt", "dev"),
    "medqa_5opt": ("medqa_5opt", "dev"),
    "medmcqa": ("medmcqa", "train"),
    "pubmedqa": ("pubmedqa", "train"),
    "mmlu": ("mmlu_medical_all", "dev"),
}


@gin.configurable
def fewshot_pool(benchmark: str, overrides: Mapping[str, Sequence[str]] | None = None) -> tuple[str, str]:
    """(benchmark, split) that exemplars of ``benchmark`` are drawn from. MMLU: MEDITRON aggregated the
    5 dev rows of all 11 medical subjects into one pool (its lukaemon/mmlu "train" split)."""
    key = "mmlu" if benchmark.startswith("mmlu") else benchmark
    table = dict(DEFAULT_FEWSHOT_POOLS)
    for k, v in (overrides or {}).items():
        if len(v) != 2:
            raise ValueError(f"fewshot_pool.overrides[{k!r}] = {v!r}: expected (benchmark, split)")
        table[k] = (v[0], v[1])
    return table[key]


def pretrain_vocabulary() -> seqio.Vocabulary:
    return meditron_vocabulary(chatml=False)


def chat_vocabulary() -> seqio.Vocabulary:
    return meditron_vocabulary(chatml=True)


# ----------------------------------------------------------------------------------------------
# GAP-REPLAY: curated shards
# ----------------------------------------------------------------------------------------------

_FIELDS = ("id", "source", "text")


def _parse_json_line(path, line_no, line):
    """py_function body: one curated JSONL line -> (id, source, text); errors name file, line, field."""
    path_s, n = path.numpy().decode(), int(line_no.numpy()) + 1
    try:
        obj = json.loads(line.numpy().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path_s}:{n}: not valid JSON ({e})") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path_s}:{n}: a JSON {type(obj).__name__}, expected an object")
    out = []
    for field in _FIELDS:
        value = obj.get(field)
        if field == "id" and isinstance(value, int):
            value = str(value)
        if not isinstance(value, str):
            raise ValueError(f"{path_s}:{n}: field {field!r} is {'missing' if value is None else repr(value)[:40]}")
        out.append(value.encode("utf-8"))
    if not obj["text"].strip():
        raise ValueError(f"{path_s}:{n}: field 'text' is empty")
    return out


@tf.autograph.experimental.do_not_convert  # plain TF ops: AutoGraph's conversion is start-up time for nothing
def _read_jsonl(path: tf.Tensor, compression: str) -> tf.data.Dataset:
    lines = tf.data.TextLineDataset(path, compression_type=compression).enumerate()

    def parse(i, line):
        rid, src, text = tf.py_function(_parse_json_line, [path, i, line], [tf.string] * 3)
        for t in (rid, src, text):
            t.set_shape([])
        return {"id": rid, "source": src, "text": text}

    # Skip blank lines (a trailing newline), as the benchmark readers do.
    return lines.filter(lambda i, line: tf.strings.length(tf.strings.strip(line)) > 0).map(parse)


@tf.autograph.experimental.do_not_convert
def _read_tfrecord(path: tf.Tensor) -> tf.data.Dataset:
    spec = {f: tf.io.FixedLenFeature([], tf.string, default_value="") for f in _FIELDS}

    def parse(i, record):
        ex = tf.io.parse_single_example(record, spec)
        ok = tf.strings.length(tf.strings.strip(ex["text"])) > 0
        check = tf.debugging.Assert(ok, [path, "record", i, "field 'text' is missing or empty"])
        with tf.control_dependencies([check]):
            return {k: tf.identity(v) for k, v in ex.items()}

    return tf.data.TFRecordDataset(path).enumerate().map(parse)


class CuratedShardsSource(seqio.FileDataSource):
    """One GAP-REPLAY source's curated shards (JSONL, JSONL.gz or TFRecord of tf.Example).

    The folder is looked up when a dataset is built, so tasks can be registered before it exists and
    gin can set it.
    """

    def __init__(self, source: str, splits: Sequence[str] = ("train", "validation")):
        self._source = source
        super().__init__(read_file_fn=_read_jsonl, split_to_filepattern={s: "" for s in splits})

    def list_shards(self, split: str) -> list[str]:
        root = curated_data_dir()
        # A curation output's manifest.json names its shards: read exactly those, never an older run's.
        listed = manifest_shards(root, self._source, split)
        if listed is not None:
            return listed
        files = sorted(
            {
                f
                for pat in curated_shard_patterns(self._source, split)
                for f in fs.glob(fs.join(root, pat))
                if not fs.isdir(f)
            }
        )
        if not files:
            raise FileNotFoundError(
                f"no curated shards for {self._source!r} split {split!r} under {root} "
                f"(patterns {curated_shard_patterns(self._source, split)})"
            )
        if all(fs.size(f) == 0 for f in files):
            raise ValueError(f"the curated shards for {self._source!r} split {split!r} under {root} are all empty")
        return files

    def get_dataset(
        self,
        split: str = "train",
        shuffle: bool = True,
        seed: int | None = None,
        shard_info: seqio.ShardInfo | None = None,
        **kwargs,
    ) -> tf.data.Dataset:
        kinds = {_shard_kind(f) for f in self.list_shards(split)}
        if len(kinds) != 1:
            raise ValueError(f"{self._source} {split}: shards mix formats {sorted(kinds)}")
        kind = kinds.pop()
        self._reader = {
            "jsonl": functools.partial(_read_jsonl, compression=""),
            "jsonl.gz": functools.partial(_read_jsonl, compression="GZIP"),
            "tfrecord": _read_tfrecord,
        }[kind]
        return super().get_dataset(split=split, shuffle=shuffle, seed=seed, shard_info=shard_info, **kwargs)


def _shard_kind(path: str) -> str:
    name = os.path.basename(path)
    if name.endswith(".jsonl.gz"):
        return "jsonl.gz"
    if name.endswith(".jsonl"):
        return "jsonl"
    if ".tfrecord" in name:
        return "tfrecord"
    raise ValueError(f"{path}: unknown shard format (expected .jsonl, .jsonl.gz or .tfrecord*)")


@seqio.map_over_dataset
def _text_to_targets(ex: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    return {"targets": ex["text"]}


def split_to_sequence_length(dataset: tf.data.Dataset, sequence_length: Mapping[str, int] | None) -> tf.data.Dataset:
    """Cut each document's tokens into consecutive pieces of at most ``sequence_length["targets"]``.

    Every piece becomes its own packed segment (positions restart), so no token is trimmed away. A
    last piece would be the lone EOS when the length divides the rest exactly; that cut moves one token
    earlier so the EOS is still predicted from text.
    """
    length = (sequence_length or {}).get("targets")
    if not length:
        return dataset

    @tf.autograph.experimental.do_not_convert
    def pieces(ex):
        tokens = ex["targets"]
        n = tf.size(tokens)
        count = (n + length - 1) // length
        bounds = tf.minimum(tf.range(count + 1) * length, n)
        lone_eos = tf.cast(tf.logical_and(tf.equal(n % length, 1), count > 1), tf.int32)
        bounds = bounds - lone_eos * tf.one_hot(count - 1, count + 1, dtype=tf.int32)
        return tf.data.Dataset.range(tf.cast(count, tf.int64)).map(
            lambda i: {"targets": tokens[bounds[tf.cast(i, tf.int32)] : bounds[tf.cast(i, tf.int32) + 1]]}
        )

    return dataset.flat_map(pieces)


def _register_gap_replay() -> None:
    features = {"targets": seqio.Feature(vocabulary=pretrain_vocabulary(), add_eos=True, dtype=tf.int32)}
    for source in GAP_REPLAY_SOURCES:
        # MEDITRON held out no replay validation data (MEDITRON.md §2), and the curation writes none.
        splits = ("train",) if source == "replay" else ("train", "validation")
        seqio.TaskRegistry.add(
            f"gap_replay_{source}",
            source=CuratedShardsSource(source, splits),
            preprocessors=[
                _text_to_targets,
                seqio.preprocessors.tokenize,
                seqio.preprocessors.append_eos,
                split_to_sequence_length,
            ],
            output_features=features,
            metric_fns=[],
        )
    seqio.MixtureRegistry.add(
        "gap_replay",
        [(f"gap_replay_{s}", _rate_of(s)) for s in GAP_REPLAY_SOURCES],
    )


def _rate_of(source: str) -> Callable[[seqio.Task], float]:
    # Evaluated when the mixture is read, so gin bindings made after import take effect.
    return lambda task: gap_replay_rates()[source]


# ----------------------------------------------------------------------------------------------
# Benchmarks: evaluation and SFT
# ----------------------------------------------------------------------------------------------

BENCHMARK_SPLITS = {
    "medqa_4opt": ("test", "validation"),
    "medqa_5opt": ("test", "validation"),
    "medmcqa": ("validation",),
    "pubmedqa": ("test", "validation", "train"),
}
EVAL_SPLIT = {"medqa_4opt": "test", "medqa_5opt": "test", "medmcqa": "validation", "pubmedqa": "test"}
for _subject in bm.MMLU_MEDICAL_SUBJECTS:
    BENCHMARK_SPLITS[f"mmlu_medical_{_subject}"] = ("test", "validation")
    EVAL_SPLIT[f"mmlu_medical_{_subject}"] = "test"
SHOTS = (3, 5)


def _examples_dataset(rows: Sequence[Mapping[str, str]], keys: Sequence[str]) -> tf.data.Dataset:
    # Constant tensors: deterministic, cheap to shuffle, and checkpointable with the iterator.
    return tf.data.Dataset.from_tensor_slices({k: tf.constant([r[k] for r in rows], tf.string) for k in keys})


def _exemplars(benchmark: str, shots: int, seed: int) -> list[Mapping]:
    pool_name, pool_split = fewshot_pool(benchmark)
    return bm.select_exemplars(bm.load_benchmark(pool_name, pool_split), shots, seed)


def eval_rows(
    benchmark: str, split: str, *, shots: int = 0, seed: int = 1234, cot: bool = False, chat: bool = False
) -> list[dict[str, str]]:
    """Rendered evaluation examples: ``id``, ``inputs`` (prompt), ``targets`` and ``answer`` (gold)."""
    records = bm.load_benchmark(benchmark, split)
    exemplars = _exemplars(benchmark, shots, seed) if shots else ()
    rows = []
    for r in records:
        if chat:
            prompt = bm.render_chat_prompt(r, benchmark, cot=cot)
        else:
            prompt = bm.render_prompt(r, benchmark, exemplars=exemplars, cot=cot)
        rows.append({"id": r["id"], "inputs": prompt, "targets": str(r["answer"]), "answer": str(r["answer"])})
    return rows


def _eval_dataset_fn(benchmark: str, **render) -> Callable:
    def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
        del shuffle_files, seed  # the Task shuffles examples when asked
        return _examples_dataset(eval_rows(benchmark, split, **render), ("id", "inputs", "targets", "answer"))

    return dataset_fn


def _eval_variants() -> list[tuple[str, dict[str, Any]]]:
    out: list[tuple[str, dict[str, Any]]] = [
        ("", {}),
        ("_cot", {"cot": True}),
        ("_chat", {"chat": True}),
        ("_chat_cot", {"chat": True, "cot": True}),
    ]
    for k in SHOTS:
        out.append((f"_{k}shot", {"shots": k, "seed": bm.MEDITRON_SEEDS[0]}))
        out.extend((f"_{k}shot_seed{s}", {"shots": k, "seed": s}) for s in bm.MEDITRON_SEEDS)
    return out


def _register_benchmarks() -> None:
    for suffix, render in _eval_variants():
        vocab = chat_vocabulary() if render.get("chat") else pretrain_vocabulary()
        features = {
            "inputs": seqio.Feature(vocabulary=vocab, add_eos=False),
            "targets": seqio.Feature(vocabulary=vocab, add_eos=False),
        }
        for benchmark, splits in BENCHMARK_SPLITS.items():
            seqio.TaskRegistry.add(
                f"{benchmark}{suffix}_eval",
                source=seqio.FunctionDataSource(_eval_dataset_fn(benchmark, **render), splits=splits),
                preprocessors=[seqio.preprocessors.tokenize],
                output_features=features,
                metric_fns=[],
            )
        seqio.MixtureRegistry.add(
            f"mmlu_medical{suffix}_eval",
            [f"mmlu_medical_{s}{suffix}_eval" for s in bm.MMLU_MEDICAL_SCORED],
            default_rate=1.0,
        )


# ----------------------------------------------------------------------------------------------
# Supervised finetuning (MEDITRON.md §4)
# ----------------------------------------------------------------------------------------------

# Megatron-LLM's defaults when finetune.py gets one --data_path and no --valid_data_path, as MEDITRON's
# finetuning/sft.py ran it: --split "969, 30, 1" over np.random.RandomState(--seed 1234).permutation(documents)
# (megatron/data/instruction_dataset.py, dataset_utils.get_train_valid_test_split_). So the original
# trained on 96.9% of each train set; 3% was its validation set, 0.1% an unused test sliver.
MEGATRON_SPLIT = (969, 30, 1)
MEGATRON_SEED = 1234


def megatron_split(n: int, weights: Sequence[float] = MEGATRON_SPLIT, seed: int = MEGATRON_SEED) -> list[list[int]]:
    """Row indices of Megatron's train / validation / test parts of ``n`` documents (same boundaries, same
    permutation as Megatron-LLM, so the same rows when the input order is the original's)."""
    if len(weights) != 3 or min(weights) < 0 or sum(weights) <= 0:
        raise ValueError(f"split weights must be three non-negative numbers with a positive sum, got {weights}")
    total = float(sum(weights))
    bounds = [0]
    for w in weights:
        bounds.append(bounds[-1] + int(round(w / total * n)))
    bounds = [b - (bounds[-1] - n) if i else b for i, b in enumerate(bounds)]
    order = np.random.RandomState(seed=seed).permutation(n)
    return [sorted(order[bounds[i] : bounds[i + 1]].tolist()) for i in range(3)]


@dataclasses.dataclass(frozen=True)
class SFTSource:
    """Where the rows of SFT task ``{name}_sft`` come from.

    ``train``: benchmark whose ``train_split`` gives the train rows (``keep`` filters them).
    ``validation``: benchmark whose ``validation`` split validates, or None for a Megatron-style holdout
    of the train rows (:func:`megatron_split`; train then keeps its 96.9% part, as the original did).
    ``test``: benchmark whose evaluation split is offered as the task's ``test`` split, to watch the SFT
    loss on the rows that are scored; never trained or validated on.
    """

    train: str
    validation: str | None
    keep: Callable[[Mapping], bool] | None = None
    cot: bool = False
    train_split: str = "train"
    test: str | None = None

    @property
    def splits(self) -> tuple[str, ...]:
        return ("train", "validation") + (("test",) if self.test else ())


SFT_SOURCES: dict[str, SFTSource] = {
    # 5-option train (10,178 rows); MedQA-4-option is scored with this model (MEDITRON.md §4).
    "medqa": SFTSource("medqa_5opt", "medqa_5opt", test="medqa_5opt"),
    # MedMCQA's dev set is its benchmark test set (MEDITRON.md §5): validation is a holdout of train.
    "medmcqa": SFTSource("medmcqa", None, keep=bm.has_explanation, test="medmcqa"),
    # PQA-A, the 200,000 artificially labelled items; validation = PQA-L fold-0 dev (50 items, not test).
    "pubmedqa": SFTSource("pubmedqa_artificial", "pubmedqa", test="pubmedqa"),
    # PQA-L's 500 non-test expert-labelled items as bigbio's fold 0 splits them (random.Random(0) in
    # pubmedqa's split_dataset.py): train 450, validation 50. In the shared data, unlike PQA-A.
    "pubmedqa_pqal": SFTSource("pubmedqa", "pubmedqa", test="pubmedqa"),
    # Chain-of-thought targets (finetune_preprocessing.py --cot): MedMCQA's `exp`, PubMedQA's LONG_ANSWER.
    "medmcqa_cot": SFTSource("medmcqa", None, keep=bm.has_explanation, cot=True, test="medmcqa"),
    "pubmedqa_cot": SFTSource("pubmedqa_artificial", "pubmedqa", cot=True, test="pubmedqa"),
}


@gin.configurable
def sft_train_data(data_dir: str | None = None, from_hub: bool = False) -> tuple[str | None, bool]:
    """Where SFT *train* rows are read: ``data_dir``, a folder in the shared data's layout
    (``medqa/train.jsonl``, ``medmcqa/train.json``, ``pubmedqa/ori_pqaa.json``), else the shared data; or
    ``from_hub``: the Hugging Face copies MEDITRON loaded (``benchmarks.load_benchmark_from_hub``).
    Validation and test rows of a benchmark's own splits always come from the shared data."""
    if data_dir and from_hub:
        raise ValueError("sft_train_data: set data_dir or from_hub, not both")
    return data_dir, from_hub


def sft_data_key() -> tuple:
    """What SFT rows depend on besides the task and split: where train and benchmark files are read."""
    return sft_train_data(), str(shared_data_dir())


def _train_records(bench: str, split: str) -> list[dict]:
    data_dir, from_hub = sft_train_data()
    if from_hub:
        return bm.load_benchmark_from_hub(bench, split)
    return bm.load_benchmark(bench, split, data_dir=data_dir)


def sft_records(name: str, split: str) -> tuple[str, list[dict]]:
    """(benchmark, records) of split ``train`` / ``validation`` / ``test`` of SFT task ``{name}_sft``."""
    if name not in SFT_SOURCES:
        raise KeyError(f"unknown SFT task {name}_sft; known: {sorted(SFT_SOURCES)}")
    spec = SFT_SOURCES[name]
    if split not in spec.splits:
        raise KeyError(f"{name}_sft has splits {list(spec.splits)}, not {split!r}")
    if split == "test" and spec.test is not None:
        return spec.test, bm.load_benchmark(spec.test, EVAL_SPLIT[spec.test])
    if split == "validation" and spec.validation is not None:
        return spec.validation, bm.load_benchmark(spec.validation, "validation")
    records = _train_records(spec.train, spec.train_split)
    if spec.keep is not None:
        records = [r for r in records if spec.keep(r)]
    if spec.validation is None:
        part = megatron_split(len(records))[0 if split == "train" else 1]
        records = [records[i] for i in part]
    return spec.train, records


def sft_rows(name: str, split: str) -> list[dict[str, str]]:
    """``inputs`` = ChatML question turn, ``targets`` = answer turn, for SFT task ``{name}_sft``."""
    bench, records = sft_records(name, split)
    cot = SFT_SOURCES[name].cot
    rows = []
    for r in records:
        prompt, target = bm.render_sft(r, bench, cot=cot)
        rows.append({"id": r["id"], "inputs": prompt, "targets": target})
    return rows


def _shuffled_examples(rows: Sequence[Mapping[str, str]], keys: Sequence[str], seed: int) -> tf.data.Dataset:
    """Rows in a new seeded permutation each epoch (as Megatron permuted its documents per epoch).

    Only row indices go through the shuffle buffer, so a saved iterator holds 8 bytes per row, not the
    tokens of the whole train set."""
    columns = {k: tf.constant([r[k] for r in rows], tf.string) for k in keys}
    order = tf.data.Dataset.range(len(rows)).shuffle(max(len(rows), 1), seed=seed, reshuffle_each_iteration=True)
    return order.map(lambda i: {k: tf.gather(v, i) for k, v in columns.items()})


def _register_sft() -> None:
    vocab = chat_vocabulary()
    features = {
        "inputs": seqio.Feature(vocabulary=vocab, add_eos=False),
        "targets": seqio.Feature(vocabulary=vocab, add_eos=False),
    }
    for name, spec in SFT_SOURCES.items():

        def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None, _name=name) -> tf.data.Dataset:
            rows = sft_rows(_name, split)
            if shuffle_files:
                return _shuffled_examples(rows, ("id", "inputs", "targets"), 0 if seed is None else seed)
            return _examples_dataset(rows, ("id", "inputs", "targets"))

        seqio.TaskRegistry.add(
            f"{name}_sft",
            source=seqio.FunctionDataSource(dataset_fn, splits=spec.splits),
            preprocessors=[seqio.preprocessors.tokenize],
            output_features=features,
            metric_fns=[],
        )


def _register_all() -> None:
    if "gap_replay" in seqio.MixtureRegistry.names():
        return  # imported twice (e.g. under another module name): already registered
    _register_gap_replay()
    _register_benchmarks()
    _register_sft()


_register_all()
