"""Packed batches: checked against SeqIO's own converters and a plain-numpy statement of the semantics;
determinism, resumption from a saved iterator, host sharding and mixture proportions."""

import json

import gin
import jax
import numpy as np
import pytest
import seqio

from meditron_jax.config import get_config
from meditron_jax.data import pipeline, tasks
from meditron_jax.data.pipeline import LLAMA_BOS_ID, MODEL_FEATURES
from meditron_jax.parallel.mesh import MeshConfig, create_mesh
from meditron_jax.train import OptimizerConfig, TrainStep, make_optimizer

pytestmark = pytest.mark.slow  # multi-second runs: excluded from the quick `-m "not slow"` loop

L = 64  # short rows keep the tests quick; the code does not depend on the length
WORDS = {  # each source its own words, so a packed row tells which source it came from
    "guidelines": "guideline recommend dose adults children screening",
    "pubmed_abstracts": "randomized trial cohort patients outcome mortality",
    "pmc_papers": "protein kinase receptor expression cells mice",
    "replay": "castle river king army village music",
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("curated_synthetic")
    rng = np.random.default_rng(0)
    for source, words in WORDS.items():
        words = words.split()
        (root / source).mkdir()
        splits = [("train", 2), ("validation", 1)] if source != "replay" else [("train", 2)]
        for split, shards in splits:
            for shard in range(shards):
                with open(root / source / f"{split}-{shard:05d}-of-{shards:05d}.jsonl", "w") as f:
                    for i in range(12):
                        n = int(rng.integers(3, 90))  # some documents are longer than a row
                        text = " ".join(rng.choice(words, n))
                        f.write(json.dumps({"id": f"{source}-{shard}-{i}", "source": source, "text": text}) + "\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(tasks.CURATED_ENV, str(root))
        yield root


@pytest.fixture(scope="module")
def source_tokens(corpus):
    vocab = tasks.pretrain_vocabulary()
    out = {s: set(vocab.encode(w)) for s, w in WORDS.items()}
    for a in out:
        for b in out:
            assert a == b or not out[a] & out[b]
    return out


def _source_of(row, source_tokens):
    tokens = set(row[row > 0].tolist()) - {LLAMA_BOS_ID, 2}
    (source,) = [s for s, t in source_tokens.items() if tokens <= t]
    return source


def _rows(ds):
    """All rows of a batched dataset, one dict of 1-D arrays per row."""
    out = []
    for batch in ds.as_numpy_iterator():
        for i in range(len(batch["decoder_target_tokens"])):
            out.append({k: v[i] for k, v in batch.items()})
    return out


def _reference_pack(sequences, length, bos):
    """SeqIO's packing stated in numpy: windows of ``length`` examples, each packed first-come into rows;
    per segment, inputs are the targets shifted right with BOS first, positions count from 0."""
    rows = []
    for start in range(0, len(sequences), length):
        current = []
        for seq in sequences[start : start + length]:
            seq = list(seq[:length])
            if sum(map(len, current)) + len(seq) > length:
                rows.append(current)
                current = []
            current.append(seq)
        if current:
            rows.append(current)
    out = []
    for segments in rows:
        r = {k: np.zeros(length, np.int32) for k in MODEL_FEATURES}
        offset = 0
        for j, seq in enumerate(segments, start=1):
            n = len(seq)
            sl = slice(offset, offset + n)
            r["decoder_target_tokens"][sl] = seq
            r["decoder_input_tokens"][sl] = [bos] + seq[:-1]
            r["decoder_segment_ids"][sl] = j
            r["decoder_positions"][sl] = np.arange(n)
            r["decoder_loss_weights"][sl] = 1
            offset += n
        out.append(r)
    return out


def _assert_rows_equal(got, want, compare_padding_inputs=True):
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        for k in MODEL_FEATURES:
            if k == "decoder_input_tokens" and not compare_padding_inputs:
                real = w["decoder_segment_ids"] > 0
                np.testing.assert_array_equal(g[k][real], w[k][real], err_msg=k)
            else:
                np.testing.assert_array_equal(g[k], w[k], err_msg=k)


def test_lm_packing_matches_seqio_and_the_stated_semantics(corpus):
    task = seqio.get_mixture_or_task("gap_replay_pubmed_abstracts")
    unpacked = task.get_dataset(sequence_length={"targets": L}, split="train", shuffle=False)
    sequences = [ex["targets"] for ex in unpacked.as_numpy_iterator()]
    assert max(map(len, sequences)) == L and len(sequences) > 24  # long documents were cut into rows
    ours = _rows(
        pipeline.make_dataset(
            "gap_replay_pubmed_abstracts",
            sequence_length=L,
            batch_size=4,
            shuffle=False,
            num_epochs=1,
            drop_remainder=False,
        )
    )
    seqio_packed = seqio.LMFeatureConverter(pack=True, bos_id=LLAMA_BOS_ID)(unpacked, {"targets": L})
    theirs = [{k: ex[k] for k in MODEL_FEATURES} for ex in seqio_packed.as_numpy_iterator()]
    _assert_rows_equal(ours, theirs)
    _assert_rows_equal(ours, _reference_pack(sequences, L, LLAMA_BOS_ID), compare_padding_inputs=False)
    # Every token of the split is in exactly one segment, in order.
    stream = [t for r in ours for t in r["decoder_target_tokens"][r["decoder_segment_ids"] > 0]]
    assert stream == [t for s in sequences for t in s]


def test_sft_packing_equals_prefix_lm_without_bidirectional_prompt(shared_data):
    task = seqio.get_mixture_or_task("medmcqa_sft")
    lengths = {"inputs": 448, "targets": 64}
    unpacked = task.get_dataset(
        sequence_length=lengths, split="test", shuffle=False, shard_info=seqio.ShardInfo(0, 200)
    )  # 21 examples of the dev set (the task's "test" split: its validation split is a train holdout)
    ours = list(
        pipeline.CausalSFTFeatureConverter(pack=True, bos_id=LLAMA_BOS_ID)(unpacked, lengths).as_numpy_iterator()
    )
    prefix_lm = seqio.PrefixLMFeatureConverter(pack=True, bos_id=LLAMA_BOS_ID, loss_on_targets_only=True)
    theirs = list(prefix_lm(unpacked, lengths).as_numpy_iterator())
    assert len(ours) == len(theirs) > 1
    for o, t in zip(ours, theirs, strict=True):
        assert "decoder_causal_attention" not in o and "decoder_causal_attention" in t
        for k in MODEL_FEATURES:
            np.testing.assert_array_equal(o[k], t[k], err_msg=k)
    # The loss covers exactly the answer turn of every segment: "<|im_start|>answer\nX<|im_end|>\n".
    vocab = tasks.chat_vocabulary()
    examples = list(unpacked.as_numpy_iterator())
    answers = [
        vocab.decode(
            o["decoder_target_tokens"][(o["decoder_segment_ids"] == j) & (o["decoder_loss_weights"] == 1)].tolist()
        )
        for o in ours
        for j in range(1, o["decoder_segment_ids"].max() + 1)
    ]
    assert answers == [vocab.decode(ex["targets"].tolist()) for ex in examples]
    assert all(a.startswith("<|im_start|>answer\n") and a.endswith("<|im_end|>\n") for a in answers)


def test_every_source_and_pipeline_reuses_one_traced_tokenizer(corpus, monkeypatch):
    # Tracing the tokenizer per source was most of a pipeline's build time (docs/performance.md, Start-up).
    from meditron_jax.data.seqio_vocab import AddedTokensVocabulary

    traced = []
    original = AddedTokensVocabulary._encode_flat

    def counted(self, batch):
        traced.append(self)
        return original(self, batch)

    monkeypatch.setattr(AddedTokensVocabulary, "_encode_flat", counted)
    mixture = seqio.get_mixture_or_task("gap_replay")
    assert len({id(t.output_features["targets"].vocabulary) for t in mixture.tasks}) == 1
    for split in ("train", "validation"):  # 4 + 3 sources
        pipeline.make_dataset("gap_replay", split=split, sequence_length=L, batch_size=4, num_epochs=1)
    assert len(traced) <= 1  # 0 when an earlier test of this process traced it


def test_same_seed_same_batches_and_resumption(corpus, tmp_path):
    kwargs = dict(sequence_length=L, batch_size=4, seed=5, shuffle_buffer_size=16)
    first = pipeline.make_iterator("gap_replay", **kwargs)
    seen = [next(first) for _ in range(3)]
    first.save(tmp_path / "ckpt")
    after = [next(first) for _ in range(3)]
    # A fresh pipeline with the same seed gives the same six batches.
    again = pipeline.make_iterator("gap_replay", **kwargs)
    for a, b in zip(seen + after, [next(again) for _ in range(6)], strict=True):
        assert a.keys() == set(MODEL_FEATURES)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    # A fresh iterator restored from the save continues with exactly the batches that followed it.
    resumed = pipeline.make_iterator("gap_replay", restore_from=str(tmp_path / "ckpt"), **kwargs)
    assert resumed.batches_served == 3
    for a, b in zip(after, [next(resumed) for _ in range(3)], strict=True):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


def test_hosts_get_disjoint_parts_that_cover_the_split(corpus):
    def segments(host_index, host_count):
        ds = pipeline.make_dataset(
            "gap_replay_pmc_papers",
            sequence_length=L,
            batch_size=4,
            shuffle=False,
            num_epochs=1,
            drop_remainder=False,
            host_index=host_index,
            host_count=host_count,
        )
        rows = _rows(ds)
        out = []
        for r in rows:
            for j in range(1, r["decoder_segment_ids"].max() + 1):
                out.append(tuple(r["decoder_target_tokens"][r["decoder_segment_ids"] == j].tolist()))
        return out, ds.element_spec

    whole, _ = segments(0, 1)
    host0, spec0 = segments(0, 2)
    host1, _ = segments(1, 2)
    assert spec0["decoder_target_tokens"].shape.as_list() == [None, L]  # per-host batch 2 of global 4
    # Together the hosts see every piece of every document exactly once (a multiset: short pieces such as
    # a lone EOS can repeat across documents); neither sees it all.
    assert sorted(host0 + host1) == sorted(whole)
    assert 0 < len(host0) < len(whole) and 0 < len(host1) < len(whole)
    with pytest.raises(ValueError, match="not divisible"):
        pipeline.make_dataset("gap_replay", batch_size=3, host_count=2)


def test_mixture_rates_are_shares_of_packed_rows(corpus, source_tokens):
    with gin.unlock_config():
        gin.bind_parameter("gap_replay_rates.guidelines", 0.4)
        gin.bind_parameter("gap_replay_rates.pubmed_abstracts", 0.3)
        gin.bind_parameter("gap_replay_rates.pmc_papers", 0.2)
        gin.bind_parameter("gap_replay_rates.replay", 0.1)
    try:
        it = pipeline.make_iterator("gap_replay", sequence_length=L, batch_size=32, seed=1, shuffle_buffer_size=16)
        rows = [row for _ in range(10) for row in next(it)["decoder_target_tokens"]]
    finally:
        gin.clear_config()
    counts = {s: 0 for s in WORDS}
    for row in rows:
        counts[_source_of(row, source_tokens)] += 1
    shares = {s: c / len(rows) for s, c in counts.items()}
    # 320 rows: a binomial standard deviation is at most 0.028; allow about 3 of them.
    for source, rate in (("guidelines", 0.4), ("pubmed_abstracts", 0.3), ("pmc_papers", 0.2), ("replay", 0.1)):
        assert abs(shares[source] - rate) < 0.085, shares


def test_validation_mixture_skips_replay(corpus, source_tokens):
    ds = pipeline.make_dataset(
        "gap_replay",
        split="validation",
        sequence_length=L,
        batch_size=4,
        seed=0,
        num_epochs=1,
        shuffle=False,
        drop_remainder=False,
    )
    sources = {_source_of(r["decoder_target_tokens"], source_tokens) for r in _rows(ds)}
    assert sources == {"guidelines", "pubmed_abstracts", "pmc_papers"}


def test_batches_are_int32_and_the_seed_matters(corpus):
    def first_batches(seed):
        it = pipeline.make_iterator(
            "gap_replay_guidelines", sequence_length=L, batch_size=2, seed=seed, shuffle_buffer_size=8
        )
        return [next(it) for _ in range(3)]

    batches = first_batches(0)
    assert set(batches[0]) == set(MODEL_FEATURES)
    assert all(v.dtype == np.int32 and v.shape == (2, L) for v in batches[0].values())
    # An ahead-of-time compile (meditron-aot, bench/aot_memory.py) lowers the step for these very inputs.
    mesh = create_mesh(MeshConfig(), devices=jax.devices()[:1])
    step = TrainStep(get_config("tiny"), mesh, make_optimizer(OptimizerConfig()))
    abstract = step.abstract_batch(2, L)
    assert {k: (v.dtype, v.shape) for k, v in abstract.items()} == {
        k: (v.dtype, v.shape) for k, v in batches[0].items()
    }
    other = first_batches(1)
    assert not all(
        np.array_equal(a["decoder_target_tokens"], b["decoder_target_tokens"])
        for a, b in zip(batches, other, strict=True)
    )


def test_gin_files_bind_data_settings():
    from pathlib import Path

    gin_dir = Path(__file__).resolve().parents[1] / "gin" / "data"
    order = ["gap_replay.gin", "ablation_pmc_replay.gin", "ablation_no_replay.gin", "sft.gin", "fewshot_from_train.gin"]
    assert sorted(order) == sorted(f.name for f in gin_dir.glob("*.gin"))
    try:
        for name in order:
            gin.parse_config_file(str(gin_dir / name))
        assert tasks.gap_replay_rates() == {
            "guidelines": 0.0,
            "pubmed_abstracts": 0.0,
            "pmc_papers": 0.872,
            "replay": 0.0,
        }  # the two ablations, applied last
        assert tasks.fewshot_pool("medqa_4opt") == ("medqa_4opt", "train")
        gin.clear_config()
        gin.parse_config_file(str(gin_dir / "gap_replay.gin"))
        assert tasks.gap_replay_rates() == tasks.MEDITRON_TOKEN_SHARES
    finally:
        gin.clear_config()


def test_task_map_functions_are_traced_without_autograph():
    """A preprocessor that branches on a tensor fails at tracing under _task_dataset (AutoGraph off, ~1 s of
    start-up saved), while the same function passes where AutoGraph converts it (a plain tf.data map)."""
    import tensorflow as tf

    def branches_on_a_tensor(ds):
        def fn(ex):
            if tf.reduce_sum(ex["targets"]) > 0:  # Python control flow over a tensor: needs AutoGraph
                return {"targets": ex["targets"] + 1}
            return ex

        return ds.map(fn)

    def source(split, shuffle_files, seed=None):
        return tf.data.Dataset.from_tensor_slices({"targets": [[1, 2], [3, 4]]})

    features = {"targets": seqio.Feature(vocabulary=seqio.PassThroughVocabulary(100), add_eos=False, dtype=tf.int32)}
    name = "test_autograph_probe_task"
    if name in seqio.TaskRegistry.names():
        seqio.TaskRegistry.remove(name)
    task = seqio.TaskRegistry.add(
        name,
        source=seqio.FunctionDataSource(source, splits=["train"]),
        preprocessors=[branches_on_a_tensor],
        output_features=features,
        metric_fns=[],
    )
    try:
        assert [int(x["targets"][0]) for x in branches_on_a_tensor(source("train", False))] == [2, 4]  # converted
        with pytest.raises(tf.errors.OperatorNotAllowedInGraphError):
            pipeline._task_dataset(
                task,
                sequence_length={"targets": 4},
                split="train",
                shuffle=False,
                seed=0,
                shard=seqio.ShardInfo(0, 1),
                num_epochs=1,
                shuffle_buffer_size=None,
            )
    finally:
        seqio.TaskRegistry.remove(name)


def test_close_releases_the_iterator_and_collects_only_when_a_cycle_holds_it(monkeypatch):
    import gc
    import weakref

    import tensorflow as tf

    collections = []
    real_collect = gc.collect
    monkeypatch.setattr(pipeline.gc, "collect", lambda *a: collections.append(a) or real_collect(*a))
    ds = tf.data.Dataset.range(8).map(lambda x: {"x": x}, num_parallel_calls=2)
    gc.disable()  # no automatic collection may free the cycle below before close() does
    try:
        plain = pipeline.BatchIterator(ds)
        next(plain)
        released = weakref.ref(plain._iterator)
        plain.close()
        assert released() is None and collections == []  # the last reference went: nothing to collect

        held = pipeline.BatchIterator(ds)
        next(held)
        released = weakref.ref(held._iterator)
        cycle = [held._iterator]
        cycle.append(cycle)  # as a traceback's frames hold it after an error
        del cycle
        held.close()
        assert released() is None and len(collections) == 1
    finally:
        gc.enable()
