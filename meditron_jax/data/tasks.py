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

Supervised finetuning (MEDITRON.md §4)
    ``medqa_sft`` (5-option train), ``medmcqa_sft`` (train rows with an explanation),
    ``pubmedqa_sft`` (PQA-A 200k): ``inputs`` = the ChatML question turn, ``targets`` = the answer turn,
    32,019-token vocabulary. Pack them with :class:`meditron_jax.data.pipeline.CausalSFTFeatureConverter`
    (loss on the answer turn only, causal attention throughout).
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
from collections.abc import Callable, Mapping, Sequence

import gin
import seqio
import tensorflow as tf

from meditron_jax.data import benchmarks as bm
from meditron_jax.data.curation import SOURCES
from meditron_jax.data.curation.manifest import manifest_shards
from meditron_jax.data.seqio_vocab import meditron_vocabulary

# ----------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------

CURATED_ENV = "MEDITRON_CURATED_DATA"
GAP_REPLAY_SOURCES = SOURCES
# MEDITRON.md §2: share of train tokens per source.
MEDITRON_TOKEN_SHARES = {"guidelines": 0.002, "pubmed_abstracts": 0.117, "pmc_papers": 0.872, "replay": 0.009}


@gin.configurable
def curated_data_dir(path: str | None = None) -> pathlib.Path:
    """Folder of the curated GAP-REPLAY shards: gin ``curated_data_dir.path``, else $MEDITRON_CURATED_DATA."""
    path = path or os.environ.get(CURATED_ENV)
    if not path:
        raise ValueError(f"no curated GAP-REPLAY folder: set gin curated_data_dir.path or ${CURATED_ENV}")
    return pathlib.Path(path)


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
    table = {**DEFAULT_FEWSHOT_POOLS, **{k: tuple(v) for k, v in (overrides or {}).items()}}
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


def _read_jsonl(path: tf.Tensor, compression: str) -> tf.data.Dataset:
    lines = tf.data.TextLineDataset(path, compression_type=compression).enumerate()

    def parse(i, line):
        rid, src, text = tf.py_function(_parse_json_line, [path, i, line], [tf.string] * 3)
        for t in (rid, src, text):
            t.set_shape([])
        return {"id": rid, "source": src, "text": text}

    # Skip blank lines (a trailing newline), as the benchmark readers do.
    return lines.filter(lambda i, line: tf.strings.length(tf.strings.strip(line)) > 0).map(parse)


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
            {str(p) for pat in curated_shard_patterns(self._source, split) for p in root.glob(pat) if p.is_file()}
        )
        if not files:
            raise FileNotFoundError(
                f"no curated shards for {self._source!r} split {split!r} under {root} "
                f"(patterns {curated_shard_patterns(self._source, split)})"
            )
        if all(os.path.getsize(f) == 0 for f in files):
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


def _exemplars(benchmark: str, shots: int, seed: int) -> list[dict]:
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


def _eval_variants() -> list[tuple[str, dict]]:
    out = [("", {}), ("_cot", {"cot": True}), ("_chat", {"chat": True}), ("_chat_cot", {"chat": True, "cot": True})]
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


# name -> (benchmark of the train split, benchmark of the validation split, row filter)
SFT_SOURCES: dict[str, tuple[str, str, Callable[[Mapping], bool] | None]] = {
    "medqa": ("medqa_5opt", "medqa_5opt", None),
    "medmcqa": ("medmcqa", "medmcqa", bm.has_explanation),
    "pubmedqa": ("pubmedqa_artificial", "pubmedqa", None),
}


def sft_rows(name: str, split: str) -> list[dict[str, str]]:
    """``inputs`` = ChatML question turn, ``targets`` = answer turn, for SFT task ``{name}_sft``."""
    train_bench, val_bench, keep = SFT_SOURCES[name]
    bench = train_bench if split == "train" else val_bench
    records = bm.load_benchmark(bench, split)
    if keep is not None and split == "train":
        records = [r for r in records if keep(r)]
    rows = []
    for r in records:
        prompt, target = bm.render_sft(r, bench)
        rows.append({"id": r["id"], "inputs": prompt, "targets": target})
    return rows


def _register_sft() -> None:
    vocab = chat_vocabulary()
    features = {
        "inputs": seqio.Feature(vocabulary=vocab, add_eos=False),
        "targets": seqio.Feature(vocabulary=vocab, add_eos=False),
    }
    for name in SFT_SOURCES:

        def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None, _name=name) -> tf.data.Dataset:
            del shuffle_files, seed
            return _examples_dataset(sft_rows(_name, split), ("id", "inputs", "targets"))

        seqio.TaskRegistry.add(
            f"{name}_sft",
            source=seqio.FunctionDataSource(dataset_fn, splits=("train", "validation")),
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
