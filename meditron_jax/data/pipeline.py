"""Deterministic, resumable, host-sharded batches of packed sequences from a SeqIO task or mixture.

Batches follow the T5X decoder convention the model consumes: ``decoder_input_tokens``,
``decoder_target_tokens``, ``decoder_loss_weights``, ``decoder_segment_ids``, ``decoder_positions``,
each ``[per_host_batch, sequence_length]`` int32.

* Pretraining (tasks with only ``targets``): ``seqio.LMFeatureConverter(pack=True)``.
* SFT (``inputs`` + ``targets``): :class:`CausalSFTFeatureConverter`, i.e. the prompt and the answer
  concatenated into one causal sequence with loss weights only on the answer. SeqIO's
  ``PrefixLMFeatureConverter`` computes the same tokens and weights but adds
  ``decoder_causal_attention`` (bidirectional attention over the prompt), which a Llama model must not
  use; this converter never produces it.
* The decoder input of every segment starts with Llama's BOS (``bos_id=1``), where SeqIO's default is 0.

Mixtures are sampled after packing (one packed row comes from one source), so mixing rates are
shares of tokens, as MEDITRON's table states them (MEDITRON.md §2), not of documents.

Determinism: everything is seeded (file order, shuffle buffers, mixture sampling) and tf.data runs
with ``deterministic=True``. Resumption: :class:`BatchIterator` saves the tf.data iterator with
``tf.train.Checkpoint`` (the SeqIO/T5X way), so a restored run continues with exactly the batches it
would have produced.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping

import gin
import numpy as np
import seqio
import tensorflow as tf

from meditron_jax.data.features import BATCH_KEYS

LLAMA_BOS_ID = 1
MODEL_FEATURES = BATCH_KEYS

# Packing drops zeros from the end of a row to find its length, so the mask must never be 0 on tokens.
_PROMPT, _ANSWER = 1, 2


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

        def concat(ex):
            return {
                "tokens": tf.concat([ex["inputs"], ex["targets"]], 0),
                "role": tf.concat(
                    [tf.fill(tf.shape(ex["inputs"]), _PROMPT), tf.fill(tf.shape(ex["targets"]), _ANSWER)], 0
                ),
            }

        ds = ds.map(concat, num_parallel_calls=tf.data.AUTOTUNE)
        lengths = {"tokens": length, "role": length}
        if self.pack:
            ds = seqio.utils.trim_and_pack_dataset(ds, lengths, self._use_custom_packing_ops)
        else:
            ds = seqio.utils.trim_and_pad_dataset(ds, lengths)

        def to_model(ex):
            tokens = ex["tokens"]
            segments = ex["tokens_segment_ids"] if self.pack else None
            out = {
                "decoder_target_tokens": tokens,
                "decoder_input_tokens": seqio.utils.make_autoregressive_inputs(
                    tokens, sequence_id=segments, bos_id=self.bos_id
                ),
                "decoder_loss_weights": tf.cast(tf.equal(ex["role"], _ANSWER), tf.int32),
            }
            if self.pack:
                out["decoder_segment_ids"] = segments
                out["decoder_positions"] = ex["tokens_positions"]
            return out

        return ds.map(to_model, num_parallel_calls=tf.data.AUTOTUNE)

    def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]) -> dict[str, int]:
        length = task_feature_lengths["inputs"] + task_feature_lengths["targets"]
        names = list(self.MODEL_FEATURES) + (list(self.PACKING_FEATURE_DTYPES) if self.pack else [])
        return {k: length for k in names}


def _is_sft(provider: seqio.DatasetProviderBase) -> bool:
    return "inputs" in provider.output_features


def task_feature_lengths(
    provider: seqio.DatasetProviderBase, sequence_length: int, answer_length: int
) -> dict[str, int]:
    """Per-feature lengths whose packed rows are ``sequence_length`` long."""
    if _is_sft(provider):
        if not 0 < answer_length < sequence_length:
            raise ValueError(f"answer_length {answer_length} must be in (0, {sequence_length})")
        return {"inputs": sequence_length - answer_length, "targets": answer_length}
    return {"targets": sequence_length}


def feature_converter(provider: seqio.DatasetProviderBase, pack: bool = True) -> seqio.FeatureConverter:
    if _is_sft(provider):
        return CausalSFTFeatureConverter(pack=pack, bos_id=LLAMA_BOS_ID)
    return seqio.LMFeatureConverter(pack=pack, bos_id=LLAMA_BOS_ID)


def _packed(
    task: seqio.Task,
    *,
    lengths: Mapping[str, int],
    split: str,
    shuffle: bool,
    seed: int,
    shard: seqio.ShardInfo,
    num_epochs: int | None,
    pack: bool,
    shuffle_buffer_size: int | None,
) -> tf.data.Dataset:
    ds = task.get_dataset(
        sequence_length=dict(lengths),
        split=split,
        shuffle=shuffle,
        seed=seed,
        shard_info=shard,
        num_epochs=num_epochs,
        try_in_mem_cache=False,
        shuffle_buffer_size=shuffle_buffer_size,
    )
    return feature_converter(task, pack)(ds, lengths)


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
    answer_length: int = 64,
    shuffle_buffer_size: int | None = None,
    drop_remainder: bool = True,
) -> tf.data.Dataset:
    """Batches of task or mixture ``name`` for host ``host_index`` of ``host_count``.

    ``batch_size`` is the global batch; each host gets ``batch_size // host_count`` rows, built only
    from its own part of the data (files, or examples when there are fewer files than hosts).
    ``num_epochs=None`` repeats forever (training). ``answer_length``: SFT token budget of the answer
    turn; the prompt gets the rest of ``sequence_length``. ``shuffle_buffer_size``: examples (document
    pieces) shuffled per task before packing; None keeps SeqIO's 1000.
    """
    import meditron_jax.data.tasks  # noqa: F401  (registers the tasks)

    if batch_size % host_count:
        raise ValueError(f"global batch {batch_size} is not divisible by {host_count} hosts")
    if not 0 <= host_index < host_count:
        raise ValueError(f"host_index {host_index} outside 0..{host_count - 1}")
    provider = seqio.get_mixture_or_task(name)
    lengths = task_feature_lengths(provider, sequence_length, answer_length)
    shard = seqio.ShardInfo(index=host_index, num_shards=host_count)
    common = dict(
        lengths=lengths,
        split=split,
        shuffle=shuffle,
        shard=shard,
        num_epochs=num_epochs,
        pack=pack,
        shuffle_buffer_size=shuffle_buffer_size,
    )
    if isinstance(provider, seqio.Mixture):
        tasks = [t for t in provider.tasks if split in t.splits]
        rates = np.array([provider.get_rate(t) for t in tasks], dtype=np.float64)
        keep = rates > 0
        tasks, rates = [t for t, k in zip(tasks, keep, strict=True) if k], rates[keep]
        if not tasks:
            raise ValueError(f"mixture {name} has no task with split {split!r} and a positive rate")
        # Distinct seeds per task: equal seeds would shuffle same-sized sources identically.
        parts = [_packed(t, seed=seed + 1000 * (i + 1), **common) for i, t in enumerate(tasks)]
        # With a finite epoch count every part is drained (validation reads all of it).
        ds = tf.data.Dataset.sample_from_datasets(
            parts, weights=(rates / rates.sum()).tolist(), seed=seed, stop_on_empty_dataset=False
        )
    else:
        ds = _packed(provider, seed=seed, **common)
    ds = ds.batch(batch_size // host_count, drop_remainder=drop_remainder)
    options = tf.data.Options()
    options.deterministic = True
    # Curated JSONL is parsed by a py_function: stateless, so saving the iterator may ignore it.
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

    def __next__(self) -> dict[str, np.ndarray]:
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
