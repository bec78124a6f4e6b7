"""Deterministic, resumable, host-sharded batches of packed sequences from a SeqIO task or mixture.

Batches follow the T5X decoder convention the model consumes: ``decoder_input_tokens``,
``decoder_target_tokens``, ``decoder_loss_weights``, ``decoder_segment_ids``, ``decoder_positions``,
each ``[per_host_batch, sequence_length]`` int32.

* Pretraining (tasks with only ``targets``): ``seqio.LMFeatureConverter(pack=True)``.
* SFT (``inputs`` + ``targets``): the prompt and the answer concatenated into one causal sequence with
  loss weights only on the answer, one example per row (``pack=False``, MEDITRON's way) or packed, see
  :mod:`meditron_jax.data.sft`. :class:`CausalSFTFeatureConverter` states the packed semantics as a SeqIO
  converter: SeqIO's ``PrefixLMFeatureConverter`` computes the same tokens and weights but adds
  ``decoder_causal_attention`` (bidirectional attention over the prompt), which a Llama model must not
  use; ours never produces it.
* The decoder input of every segment starts with Llama's BOS (``bos_id=1``), where SeqIO's default is 0.

Mixtures are sampled after packing (one packed row comes from one source), so mixing rates are
shares of tokens, as MEDITRON's table states them (MEDITRON.md §2), not of documents.

Determinism: everything is seeded (file order, shuffle buffers, mixture sampling) and tf.data runs
with ``deterministic=True``. Resumption: :class:`BatchIterator` saves the tf.data iterator with
``tf.train.Checkpoint`` (the SeqIO/T5X way), so a restored run continues with exactly the batches it
would have produced.
"""

from __future__ import annotations

import gc
import json
import os
import weakref
from collections.abc import Iterator, Mapping

import gin
import numpy as np
import seqio
import tensorflow as tf

from meditron_jax.data import sft
from meditron_jax.data.features import BATCH_KEYS

LLAMA_BOS_ID = 1
MODEL_FEATURES = BATCH_KEYS


class CausalSFTFeatureConverter(seqio.FeatureConverter):
    """``inputs`` + ``targets`` -> one causal decoder sequence; loss only on ``targets`` tokens.

    Task lengths ``{"inputs": Li, "targets": Lt}`` give rows of ``Li + Lt`` tokens (as SeqIO's
    PrefixLM converter does). Example, packed::

        inputs [7, 8], targets [3, 9]; inputs [4], targets [5]; length 4 + 3
        decoder_target_tokens [7, 8, 3, 9, 4, 5, 0]
        decoder_input_tokens  [B, 7, 8, 3, B, 4, B]     (B = bos_id; padding is ignored)
        decoder_loss_weights  [0, 0, 1, 1, 0, 1, 0]
        decoder_segment_ids   [1, 1, 1, 1, 2, 2, 0]
        decoder_positions     [0, 1, 2, 3, 0, 1, 0]
    """

    TASK_FEATURES = {
        "inputs": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
        "targets": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
    }
    MODEL_FEATURES = {
        "decoder_target_tokens": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
        "decoder_input_tokens": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
        "decoder_loss_weights": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
    }
    PACKING_FEATURE_DTYPES = {"decoder_segment_ids": tf.int32, "decoder_positions": tf.int32}

    def _convert_features(self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
        length = task_feature_lengths["inputs"] + task_feature_lengths["targets"]
        ds = ds.map(sft.concat_turns, num_parallel_calls=tf.data.AUTOTUNE)
        lengths = {"tokens": length, "role": length}
        if self.pack:
            ds = seqio.utils.trim_and_pack_dataset(ds, lengths, self._use_custom_packing_ops)
        else:
            ds = seqio.utils.trim_and_pad_dataset(ds, lengths)
        return ds.map(lambda ex: sft.to_model(ex, self.pack, self.bos_id), num_parallel_calls=tf.data.AUTOTUNE)

    def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]) -> dict[str, int]:
        length = task_feature_lengths["inputs"] + task_feature_lengths["targets"]
        names = list(self.MODEL_FEATURES) + (list(self.PACKING_FEATURE_DTYPES) if self.pack else [])
        return {k: length for k in names}


def _is_sft(provider: seqio.DatasetProviderBase) -> bool:
    return "inputs" in provider.output_features


def task_feature_lengths(provider: seqio.DatasetProviderBase, sequence_length: int) -> dict[str, int]:
    """Per-feature lengths of pretraining rows (SFT examples are measured whole, see :mod:`.sft`)."""
    if _is_sft(provider):
        raise ValueError(f"{provider.name} is an SFT task: its rows are built by make_dataset's SFT path")
    return {"targets": sequence_length}


def feature_converter(provider: seqio.DatasetProviderBase, pack: bool = True) -> seqio.FeatureConverter:
    if _is_sft(provider):
        return CausalSFTFeatureConverter(pack=pack, bos_id=LLAMA_BOS_ID)
    return seqio.LMFeatureConverter(pack=pack, bos_id=LLAMA_BOS_ID)


# AutoGraph would rewrite each of the task's map functions (SeqIO's tokenizer, EOS, trimming; ours) for Python
# control flow over tensors, which none of them has: ~1.2 s of every process's start-up. A function that had
# some would fail loudly at tracing (a tensor used as a Python bool), not change the examples. The feature
# converters stay converted: SeqIO's packing loops over a tensor.
@tf.autograph.experimental.do_not_convert
def _task_dataset(task: seqio.Task, *, sequence_length, split, shuffle, seed, shard, num_epochs, shuffle_buffer_size):
    return task.get_dataset(
        sequence_length=sequence_length,
        split=split,
        shuffle=shuffle,
        seed=seed,
        shard_info=shard,
        num_epochs=num_epochs,
        try_in_mem_cache=False,
        shuffle_buffer_size=shuffle_buffer_size,
    )


def _packed(task: seqio.Task, *, lengths: Mapping[str, int], pack: bool, **kwargs) -> tf.data.Dataset:
    ds = _task_dataset(task, sequence_length=dict(lengths), **kwargs)
    return feature_converter(task, pack)(ds, lengths)


# Length reports of SFT splits already counted in this process (the same files give the same counts): a
# resumed or validation iterator over a split does not tokenize it twice.
_LENGTH_REPORTS: dict[tuple, dict[str, int]] = {}


def _sft_examples(task: seqio.Task, *, length: int, overlong: str, **kwargs) -> tf.data.Dataset:
    """A task's {tokens, role} examples, whole (no SeqIO trimming), fitted to ``length`` by the policy.

    Before the stream is built, one in-order pass over the split (this host's part) counts the examples
    longer than ``length`` and logs them: nothing is cut or dropped without a count."""
    from meditron_jax.data.tasks import sft_data_key

    shard = kwargs["shard"]
    key = (task.name, kwargs["split"], shard.index, shard.num_shards, length, sft_data_key())
    if key not in _LENGTH_REPORTS:
        one_pass = dict(kwargs, shuffle=False, num_epochs=1)
        whole = _task_dataset(task, sequence_length=None, **one_pass).map(sft.concat_turns)
        _LENGTH_REPORTS[key] = sft.length_report(whole, length)
    sft.report_overlong(task.name, kwargs["split"], _LENGTH_REPORTS[key], length, overlong)
    ds = _task_dataset(task, sequence_length=None, **kwargs).map(sft.concat_turns, num_parallel_calls=tf.data.AUTOTUNE)
    return sft.fit_to_length(ds, length, overlong)


def _sample(parts: list[tf.data.Dataset], rates: np.ndarray, seed: int) -> tf.data.Dataset:
    # With a finite epoch count every part is drained (validation reads all of it).
    return tf.data.Dataset.sample_from_datasets(
        parts, weights=(rates / rates.sum()).tolist(), seed=seed, stop_on_empty_dataset=False
    )


def _tasks_and_rates(provider: seqio.DatasetProviderBase, name: str, split: str):
    if not isinstance(provider, seqio.Mixture):
        return [provider], None
    tasks = [t for t in provider.tasks if split in t.splits]
    rates = np.array([provider.get_rate(t) for t in tasks], dtype=np.float64)
    keep = rates > 0
    tasks, rates = [t for t, k in zip(tasks, keep, strict=True) if k], rates[keep]
    if not tasks:
        raise ValueError(f"mixture {name} has no task with split {split!r} and a positive rate")
    return tasks, rates


@gin.configurable(denylist=["host_index", "host_count"])
def make_dataset(
    name: str,
    *,
    sequence_length: int = 2048,
    batch_size: int = 8,
    split: str = "train",
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    host_index: int = 0,
    host_count: int = 1,
    pack: bool = True,
    shuffle_buffer_size: int | None = None,
    drop_remainder: bool = True,
    examples_per_batch: int | None = None,
    sft_overlong: str = "drop",
) -> tf.data.Dataset:
    """Batches of task or mixture ``name`` for host ``host_index`` of ``host_count``.

    ``batch_size`` is the global batch in rows; each host gets ``batch_size // host_count`` rows, built only
    from its own part of the data (files, or examples when there are fewer files than hosts).
    ``num_epochs=None`` repeats forever (training). ``shuffle_buffer_size``: examples (document pieces)
    shuffled per task before packing; None keeps SeqIO's 1000.

    SFT tasks (``inputs`` + ``targets``, see :mod:`meditron_jax.data.sft`): ``pack=False`` gives one example
    per row (MEDITRON: ``batch_size`` examples a step). ``pack=True`` with ``examples_per_batch`` packs each
    step's ``examples_per_batch`` examples into its ``batch_size`` rows (the same examples a step as unpacked,
    in fewer rows); ``pack=True`` alone packs the example stream into rows. ``sft_overlong``: what happens to
    examples longer than ``sequence_length`` (always counted and logged): ``drop``, ``truncate_prompt_left``
    or ``error``.
    """
    import meditron_jax.data.tasks  # noqa: F401  (registers the tasks)

    if batch_size % host_count:
        raise ValueError(f"global batch {batch_size} is not divisible by {host_count} hosts")
    if not 0 <= host_index < host_count:
        raise ValueError(f"host_index {host_index} outside 0..{host_count - 1}")
    provider = seqio.get_mixture_or_task(name)
    shard = seqio.ShardInfo(index=host_index, num_shards=host_count)
    common = dict(
        split=split, shuffle=shuffle, shard=shard, num_epochs=num_epochs, shuffle_buffer_size=shuffle_buffer_size
    )
    tasks, rates = _tasks_and_rates(provider, name, split)
    # Distinct seeds per mixture part: equal seeds would shuffle same-sized sources identically.
    seeds = [seed] if rates is None else [seed + 1000 * (i + 1) for i in range(len(tasks))]
    rows = batch_size // host_count
    if _is_sft(provider):
        sft.check_policy(sft_overlong)
        if not pack and examples_per_batch not in (None, batch_size):
            raise ValueError(
                f"examples_per_batch={examples_per_batch} with pack=False: unpacked rows hold one example each, so a "
                f"batch is batch_size={batch_size} examples; set pack=True to pack {examples_per_batch} examples"
            )
        parts = [
            _sft_examples(t, length=sequence_length, overlong=sft_overlong, seed=s, **common)
            for t, s in zip(tasks, seeds, strict=True)
        ]
        # SFT mixtures sample examples (the original blended documents), then make rows.
        examples = parts[0] if rates is None else _sample(parts, rates, seed)
        if pack and examples_per_batch:
            if examples_per_batch % host_count:
                raise ValueError(f"examples_per_batch {examples_per_batch} is not divisible by {host_count} hosts")
            ds = sft.packed_steps(
                examples, sequence_length, rows, examples_per_batch // host_count, LLAMA_BOS_ID, drop_remainder
            )
        else:
            if pack:
                ds = sft.stream_packed_rows(examples, sequence_length, LLAMA_BOS_ID)
            else:
                ds = sft.unpacked_rows(examples, sequence_length, LLAMA_BOS_ID)
            ds = ds.batch(rows, drop_remainder=drop_remainder)
    else:
        if examples_per_batch:
            raise ValueError(f"examples_per_batch is for SFT tasks; {name} is a pretraining task or mixture")
        lengths = task_feature_lengths(provider, sequence_length)
        parts = [_packed(t, lengths=lengths, pack=pack, seed=s, **common) for t, s in zip(tasks, seeds, strict=True)]
        ds = parts[0] if rates is None else _sample(parts, rates, seed)
        ds = ds.batch(rows, drop_remainder=drop_remainder)
    options = tf.data.Options()
    options.deterministic = True
    # Curated JSONL is parsed by a py_function and packed SFT steps by a numpy_function: both stateless, so
    # saving the iterator may ignore them.
    options.experimental_external_state_policy = tf.data.experimental.ExternalStatePolicy.IGNORE
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)


class BatchIterator(Iterator[dict[str, np.ndarray]]):
    """Numpy batches with a checkpointable position.

    ``save(directory)`` writes the tf.data iterator state (shuffle buffers, file offsets, sampler RNG)
    and the number of batches served; ``restore(directory)`` on an iterator over the same dataset
    definition continues exactly where the saved one stopped. One directory per host.
    """

    def __init__(self, dataset: tf.data.Dataset):
        self._iterator = iter(dataset)
        self._checkpoint = tf.train.Checkpoint(iterator=self._iterator)
        self.batches_served = 0

    def close(self) -> None:
        """Release the tf.data iterator now. Left to interpreter shutdown (e.g. after an error, when a traceback
        cycle keeps it alive), its parallel-map stages wait forever for their workers and the process hangs."""
        iterator = weakref.ref(self._iterator) if self._iterator is not None else None
        self._iterator = None
        self._checkpoint = None
        # Usually that was the last reference. A full collection only when something still holds it: it costs
        # 0.4-1.7 s in a process that has imported TensorFlow and run a curation (docs/performance.md).
        if iterator is not None and iterator() is not None:
            gc.collect()

    def __next__(self) -> dict[str, np.ndarray]:
        if self._iterator is None:
            raise ValueError("this BatchIterator was closed")
        batch = next(self._iterator)
        self.batches_served += 1
        return {k: v.numpy() for k, v in batch.items()}

    def save(self, directory: str | os.PathLike) -> str:
        directory = os.fspath(directory)
        tf.io.gfile.makedirs(directory)
        prefix = self._checkpoint.write(os.path.join(directory, "iterator"))
        with tf.io.gfile.GFile(os.path.join(directory, "position.json"), "w") as f:
            json.dump({"batches_served": self.batches_served, "prefix": os.path.basename(prefix)}, f)
        return prefix

    def restore(self, directory: str | os.PathLike) -> None:
        directory = os.fspath(directory)
        with tf.io.gfile.GFile(os.path.join(directory, "position.json")) as f:
            position = json.load(f)
        self._checkpoint.read(os.path.join(directory, position["prefix"])).assert_consumed()
        self.batches_served = int(position["batches_served"])


@gin.configurable(denylist=["host_index", "host_count"])
def make_iterator(
    name: str, *, host_index: int = 0, host_count: int = 1, restore_from: str | None = None, **dataset_kwargs
) -> BatchIterator:
    """:func:`make_dataset` wrapped in a :class:`BatchIterator`, optionally restored from a save."""
    it = BatchIterator(make_dataset(name, host_index=host_index, host_count=host_count, **dataset_kwargs))
    if restore_from:
        it.restore(restore_from)
    return it


def host_dir(checkpoint_dir: str | os.PathLike, host_index: int, host_count: int) -> str:
    """Where a host keeps its iterator state inside a training checkpoint (T5X: one per host)."""
    return os.path.join(os.fspath(checkpoint_dir), f"input_pipeline-{host_index:05d}-of-{host_count:05d}")
