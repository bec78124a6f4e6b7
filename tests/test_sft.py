"""Supervised finetuning (MEDITRON.md §4): rows of one example each with the loss on the answer turn only,
packing that keeps a step's examples and its loss, chain-of-thought targets as the original wrote them,
a MedMCQA validation set that is not its benchmark set, the recipes' schedule, and a tiny SFT run."""

import dataclasses
import json
import logging
import os

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meditron_jax.data import benchmarks as bm
from meditron_jax.data import pipeline, sft, tasks

N_TRAIN = 200  # synthetic MedMCQA train rows with an explanation (plus some without)
LETTERS = "ABCD"


def _medmcqa_row(i, *, exp="x", question=None):
    # The original release's format (MedMCQA GitHub / the shared dev.json): cop is 1-based.
    return {
        "question": question or f"Which option is number {i} in the synthetic list",
        "exp": exp if exp != "x" else f"Option {LETTERS[i % 4]} is right for item {i}",
        "cop": i % 4 + 1,
        "opa": "first option",
        "opb": "second option",
        "opc": "third option",
        "opd": "fourth option",
        "subject_name": "Anatomy",
        "topic_name": None,
        "id": f"synthetic-{i:04d}",
        "choice_type": "single",
    }


@pytest.fixture(scope="module")
def train_dir(tmp_path_factory):
    """A folder in the shared data's layout holding a synthetic MedMCQA train.json."""
    root = tmp_path_factory.mktemp("sft_train")
    (root / "medmcqa").mkdir()
    rows = [_medmcqa_row(i) for i in range(N_TRAIN)]
    rows += [_medmcqa_row(N_TRAIN + i, exp=None) for i in range(5)]  # no explanation: not in MEDITRON's set
    rows.append(_medmcqa_row(N_TRAIN + 5, exp="None"))
    with open(root / "medmcqa" / "train.json", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return root


@pytest.fixture
def sft_train_data(train_dir):
    gin.clear_config()
    gin.bind_parameter("sft_train_data.data_dir", str(train_dir))
    yield train_dir
    gin.clear_config()


def _first(ds):
    return {k: v.numpy() for k, v in next(iter(ds)).items()}


@pytest.mark.slow
def test_unpacked_rows_hold_one_example_and_weigh_only_the_answer_turn(sft_train_data, shared_data):
    ds = pipeline.make_dataset(
        "medmcqa_sft", sequence_length=192, batch_size=64, pack=False, shuffle=False, num_epochs=1
    )
    batch = _first(ds)
    assert all(v.shape == (64, 192) for v in batch.values())
    seg = batch["decoder_segment_ids"]
    assert (seg.max(1) == 1).all()  # one example per row
    lengths = (seg > 0).sum(1)
    np.testing.assert_array_equal(batch["decoder_positions"][0, : lengths[0]], np.arange(lengths[0]))
    vocab = tasks.chat_vocabulary()
    train_ids = sorted(tasks.megatron_split(N_TRAIN)[0])  # in file order when not shuffled
    instruction = bm.instruction("medmcqa")["system"]
    for r in range(64):
        n, i = lengths[r], train_ids[r]
        target, weights = batch["decoder_target_tokens"][r], batch["decoder_loss_weights"][r]
        assert not target[n:].any() and not weights[n:].any()  # padding: no tokens, no loss
        answer = vocab.decode(target[weights == 1].tolist())
        assert answer == f"<|im_start|>answer\n{LETTERS[i % 4]}<|im_end|>\n"
        # The loss covers one contiguous span, the end of the example; the rest is the question turn.
        assert weights[:n].tolist() == [0] * (n - len(target[weights == 1])) + [1] * len(target[weights == 1])
        question = vocab.decode(target[:n][weights[:n] == 0].tolist())
        assert question == (
            f"<|im_start|>question\n{instruction}\nQuestion: Which option is number {i} in the synthetic list?\n\n"
            "Options:\nA. first option\nB. second option\nC. third option\nD. fourth option\n"
            "The answer is:\n<|im_end|>\n"
        )
        # Teacher forcing: the input is BOS then the targets shifted right.
        assert batch["decoder_input_tokens"][r, 0] == pipeline.LLAMA_BOS_ID
        np.testing.assert_array_equal(batch["decoder_input_tokens"][r, 1:n], target[: n - 1])


def _loss(params, cfg, batch):
    from meditron_jax.model import Llama
    from meditron_jax.train.step import cross_entropy_sums

    logits = Llama(cfg).apply(
        {"params": params},
        jnp.asarray(batch["decoder_input_tokens"]),
        jnp.asarray(batch["decoder_positions"]),
        jnp.asarray(batch["decoder_segment_ids"]),
    )
    num, den = cross_entropy_sums(
        logits, jnp.asarray(batch["decoder_target_tokens"]), jnp.asarray(batch["decoder_loss_weights"])
    )
    return num / den, den


def _examples_of(batch):
    """The examples of a batch: (target tokens, loss weights) per segment, sorted."""
    out = []
    for r in range(batch["decoder_segment_ids"].shape[0]):
        seg = batch["decoder_segment_ids"][r]
        for s in range(1, seg.max() + 1):
            m = seg == s
            out.append((tuple(batch["decoder_target_tokens"][r][m]), tuple(batch["decoder_loss_weights"][r][m])))
    return sorted(out)


@pytest.mark.slow
def test_packed_step_holds_the_same_examples_and_gives_the_same_loss(sft_train_data, shared_data):
    from meditron_jax.config import get_config
    from meditron_jax.model import init_params

    common = dict(sequence_length=320, seed=3, shuffle=True)
    unpacked = _first(pipeline.make_dataset("medmcqa_sft", batch_size=4, pack=False, **common))
    packed = _first(pipeline.make_dataset("medmcqa_sft", batch_size=2, pack=True, examples_per_batch=4, **common))
    assert packed["decoder_segment_ids"].shape == (2, 320)
    assert packed["decoder_segment_ids"].max() == 2  # two ~140-token examples per row
    assert _examples_of(packed) == _examples_of(unpacked)
    # Positions restart and the input starts with BOS at every packed example.
    seg = packed["decoder_segment_ids"][0]
    second = np.argmax(seg == 2)
    assert packed["decoder_positions"][0, second] == 0
    assert packed["decoder_input_tokens"][0, second] == pipeline.LLAMA_BOS_ID

    # Without examples_per_batch the example stream is packed: rows hold whole examples, each weighted only on
    # its answer turn.
    stream = _first(pipeline.make_dataset("medmcqa_sft", batch_size=2, pack=True, **common))
    vocab = tasks.chat_vocabulary()
    for target, weights in _examples_of(stream):
        turns = vocab.decode([t for t, w in zip(target, weights, strict=True) if w])
        assert turns.startswith("<|im_start|>answer\n") and turns.endswith("<|im_end|>\n") and len(turns) == 31
        assert vocab.decode(list(target)).startswith("<|im_start|>question\n")
    assert stream["decoder_segment_ids"].max() == 2

    cfg = get_config("tiny", vocab_size=32019, dtype="float32")
    params = init_params(cfg, seed=0)
    # Two empty rows (segment 0, no weight) give the packed batch the unpacked shape: one compile serves both.
    padded = {k: np.concatenate([v, np.zeros_like(v)]) for k, v in packed.items()}
    loss = jax.jit(lambda p, b: _loss(p, cfg, b))
    loss_u, tokens_u = (float(x) for x in loss(params, unpacked))
    loss_p, tokens_p = (float(x) for x in loss(params, padded))
    assert tokens_u == tokens_p == 4 * 7  # 7 answer-turn tokens per example
    # Same tokens, same causal context per example (segment-masked): equal up to float32 summation order.
    assert loss_p == pytest.approx(loss_u, rel=1e-5)
    assert np.isfinite(loss_u) and loss_u > 1.0  # a random model: near ln(32019) ≈ 10.4, not a trivial 0


def test_pack_examples_refuses_a_step_that_does_not_fit():
    tok = [np.arange(3, 9, dtype=np.int32)] * 3  # three 6-token examples
    role = [np.array([1, 1, 1, 2, 2, 2])] * 3
    rows = sft.pack_examples(tok, role, rows=2, length=12, bos_id=1)
    assert rows["decoder_segment_ids"].tolist() == [[1] * 6 + [2] * 6, [1] * 6 + [0] * 6]
    assert rows["decoder_input_tokens"][0].tolist() == [1, 3, 4, 5, 6, 7, 1, 3, 4, 5, 6, 7]
    assert rows["decoder_loss_weights"][1].tolist() == [0, 0, 0, 1, 1, 1] + [0] * 6
    with pytest.raises(ValueError, match="example 2 of 3 .* does not fit in 1 rows of 12 tokens"):
        sft.pack_examples(tok, role, rows=1, length=12, bos_id=1)


@pytest.mark.slow
def test_overlong_examples_are_counted_then_dropped_or_cut_left(tmp_path, shared_data, caplog):
    (tmp_path / "medmcqa").mkdir()
    rows = [_medmcqa_row(i) for i in range(40)]
    rows[7]["question"] = "why " * 300  # far longer than the 192-token rows
    with open(tmp_path / "medmcqa" / "train.json", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    gin.clear_config()
    gin.bind_parameter("sft_train_data.data_dir", str(tmp_path))
    try:
        n_train = len(tasks.megatron_split(40)[0])
        assert 7 in tasks.megatron_split(40)[0]

        def rows_of(policy):
            ds = pipeline.make_dataset(
                "medmcqa_sft",
                sequence_length=192,
                batch_size=1,
                pack=False,
                shuffle=False,
                num_epochs=1,
                drop_remainder=False,
                sft_overlong=policy,
            )
            return [{k: v.numpy()[0] for k, v in b.items()} for b in ds]

        with caplog.at_level(logging.WARNING, logger="meditron_jax.data.sft"):
            dropped = rows_of("drop")
        assert len(dropped) == n_train - 1
        assert f"1 of {n_train} examples are longer than 192 tokens" in caplog.text and "dropped" in caplog.text
        cut = rows_of("truncate_prompt_left")
        assert len(cut) == n_train
        long_row = [r for r in cut if r["decoder_segment_ids"].all()]
        assert len(long_row) == 1  # the long example fills its row exactly, its answer turn whole at the end
        vocab = tasks.chat_vocabulary()
        target = long_row[0]["decoder_target_tokens"]
        assert vocab.decode(target[long_row[0]["decoder_loss_weights"] == 1].tolist()) == (
            "<|im_start|>answer\nD<|im_end|>\n"
        )
        assert vocab.decode(target[-30:].tolist()).endswith(
            "The answer is:\n<|im_end|>\n<|im_start|>answer\nD<|im_end|>\n"
        )
        with pytest.raises(ValueError, match="1 of .* examples are longer than the sequence length 192"):
            rows_of("error")
    finally:
        gin.clear_config()


def test_cot_targets_are_the_originals_strings(shared_data):
    # epfLLM/meditron evaluation/benchmarks.py add_instruction: '{}.\nThe answer is: {} ###'.format(cot, gold).
    medmcqa = {r["id"]: r for r in bm.load_benchmark("medmcqa", "dev")}["f6829756-2e11-47cb-85a8-3ba40ecb3332"]
    prompt, target = bm.render_sft(medmcqa, "medmcqa", cot=True)
    assert target == "<|im_start|>answer\nAns. D. All.\nThe answer is: D ###<|im_end|>\n"
    assert prompt.endswith("D. All\nLet's think step by step.\n<|im_end|>\n")
    pubmedqa = {r["id"]: r for r in bm.load_benchmark("pubmedqa", "train")}["16564683"]
    prompt, target = bm.render_sft(pubmedqa, "pubmedqa", cot=True)
    # LONG_ANSWER ends in a period and the original adds one more.
    assert target == (
        "<|im_start|>answer\nSonography has no place in the diagnosis of undescended testis..\n"
        "The answer is: no ###<|im_end|>\n"
    )
    assert prompt.endswith(
        "in boys with undescended testis?\nLet\u2019s think step by step.\n<|im_end|>\n"
    )  # instructions.json's pubmedqa_cot cue has a typographic apostrophe
    with pytest.raises(ValueError, match="has no explanation"):
        bm.render_sft({**medmcqa, "explanation": None}, "medmcqa", cot=True)
    rows = tasks.sft_rows("pubmedqa_cot", "validation")
    assert len(rows) == 50 and all(r["targets"].endswith(" ###<|im_end|>\n") for r in rows)


def test_medmcqa_validation_is_held_out_of_train_not_the_dev_set(sft_train_data, shared_data):
    # Megatron-LLM's 969/30/1 split, hand-computed for MEDITRON's 159,669 rows: round(.969 n), round(.03 n), rest.
    assert [len(p) for p in tasks.megatron_split(159_669)] == [154_719, 4_790, 160]
    train = tasks.sft_rows("medmcqa", "train")
    validation = tasks.sft_rows("medmcqa", "validation")
    dev = {r["id"] for r in bm.load_benchmark("medmcqa", "dev")}
    train_ids, val_ids = {r["id"] for r in train}, {r["id"] for r in validation}
    assert (len(train), len(validation)) == (194, 6)  # round(.969·200), round(.03·200)
    assert not train_ids & val_ids and not (train_ids | val_ids) & dev
    assert train_ids | val_ids == {f"synthetic-{i:04d}" for i in range(N_TRAIN)}  # rows without exp are out
    assert tasks.sft_rows("medmcqa", "validation") == validation  # deterministic
    assert {r["id"] for r in tasks.sft_rows("medmcqa", "test")} == dev  # the benchmark set, under its own name
    # The CoT task holds out the same rows.
    assert {r["id"] for r in tasks.sft_rows("medmcqa_cot", "validation")} == val_ids


def test_pqal_task_trains_on_the_non_test_fold(shared_data):
    test = {r["id"] for r in bm.load_benchmark("pubmedqa", "test")}
    train = {r["id"] for r in tasks.sft_rows("pubmedqa_pqal", "train")}
    validation = {r["id"] for r in tasks.sft_rows("pubmedqa_pqal", "validation")}
    assert (len(train), len(validation), len(test)) == (450, 50, 500)
    assert not train & validation and not (train | validation) & test


@pytest.mark.parametrize(
    "run_file, steps, warmup",
    [
        ("runs/sft_medqa.gin", 480, 48),
        ("runs/sft_medmcqa.gin", 7490, 749),
        ("runs/sft_pubmedqa.gin", 9380, 938),
        ("runs/sft_pubmedqa_pqal.gin", 30, 3),
    ],
)
def test_recipes_schedule_2e5_to_2e6_over_the_run(run_file, steps, warmup):
    from meditron_jax.resources import gin_dir
    from meditron_jax.train import trainer
    from meditron_jax.train.optimizer import OptimizerConfig, learning_rate_schedule

    gin.clear_config()
    gin.add_config_file_search_path(str(gin_dir()))
    try:
        gin.parse_config_files_and_bindings([run_file], ["MODEL_DIR='/x'", "INIT_FROM='/y'"])
        cfg = trainer.TrainConfig()
        opt = dataclasses.replace(OptimizerConfig(), train_steps=cfg.train_steps)
        assert (cfg.train_steps, cfg.global_batch, cfg.sequence_length) == (steps, 64, 2048)
        assert cfg.model_overrides == {"vocab_size": 32019} and cfg.init_from == "/y"
        assert (cfg.eval_every, cfg.eval_steps) == (100, 10)  # finetune_sft.sh --eval_interval 100 --eval_iters 10
        assert (opt.b1, opt.b2, opt.eps, opt.weight_decay, opt.clip_norm) == (0.9, 0.95, 1e-5, 0.1, 1.0)
        assert gin.query_parameter("pipeline.make_dataset.pack") is False  # one example per row
        lr = learning_rate_schedule(opt)
        assert opt.warmup_steps == warmup == round(0.1 * steps)
        assert float(lr(warmup)) == pytest.approx(2e-5)
        assert float(lr(steps)) == pytest.approx(2e-6)
        # Megatron's cosine: min + (max - min)·½(1 + cos(π·(t - warmup)/(steps - warmup))), by hand.
        t = (warmup + steps) // 2
        want = 2e-6 + 1.8e-5 * 0.5 * (1 + np.cos(np.pi * (t - warmup) / (steps - warmup)))
        assert float(lr(t)) == pytest.approx(want, rel=1e-4)
    finally:
        gin.clear_config()


def test_no_decontaminate_flag_empties_the_reference_list(monkeypatch, tmp_path, shared_data):
    from meditron_jax.cli import prepare_data

    seen = {}

    def fake_run(config, beam_args, **kwargs):
        seen["refs"] = config.contamination_refs
        return {"sources": {}}

    monkeypatch.setattr(prepare_data, "run", fake_run)
    base = [
        "--input_dir",
        str(shared_data / "gap_replay_sample"),
        "--output_dir",
        str(tmp_path / "out"),
        "--tokenizer_model",
        "none",
    ]
    prepare_data.main(base)
    assert len(seen["refs"]) > 0  # decontamination is on by default
    prepare_data.main(base + ["--no_decontaminate"])
    assert seen["refs"] == ()
    with pytest.raises(SystemExit):
        prepare_data.main(base + ["--no_decontaminate", "--contamination_refs", "pubmedqa/test"])


@pytest.mark.slow
def test_tiny_sft_run_from_a_32000_token_checkpoint(tmp_path, shared_data):
    """runs/sft_pubmedqa_pqal.gin + models/tiny.gin from a random HF Llama with Llama-2's 32,000 tokens."""
    import orbax.checkpoint as ocp

    from meditron_jax.cli.train import main

    from .hf_utils import random_hf_llama

    src, _ = random_hf_llama(tmp_path / "hf", heads=8, kv_heads=4, hidden=64, inter=172, vocab=32000)
    run = tmp_path / "run"
    gin.clear_config()
    try:
        main(
            [
                "--gin_file=runs/sft_pubmedqa_pqal.gin",
                "--gin_file=models/tiny.gin",
                f"--gin.MODEL_DIR='{run}'",
                f"--gin.INIT_FROM='{src}'",
                "--gin.SEQUENCE_LENGTH=256",  # 20 of the 450 fit; the rest are counted and dropped
                "--gin.GLOBAL_BATCH=8",  # the 8 test devices
                "--gin.TRAIN_STEPS=3",
                "--gin.WARMUP_STEPS=1",
                "--gin.OptimizerConfig.peak_lr=1e-3",
                "--gin.TrainConfig.log_every=1",
                "--gin.TrainConfig.eval_every=0",  # PQA-L's 50 validation items hold less than a batch at 256
            ]
        )
    finally:
        gin.clear_config()
    metrics = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert all(np.isfinite(m["loss"]) and m["tokens"] > 0 for m in metrics)
    assert json.loads((run / "model_config.json").read_text())["vocab_size"] == 32019
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(os.fspath(run / "checkpoints" / "3" / "default"))["params"]
    assert params["embedding"].shape[0] >= 32019 and jax.tree.leaves(params)


@pytest.mark.slow
def test_packed_sft_iterator_resumes_exactly(tmp_path, sft_train_data, shared_data):
    kwargs = dict(sequence_length=320, batch_size=3, pack=True, examples_per_batch=6, seed=7)
    first = pipeline.make_iterator("medmcqa_sft", **kwargs)
    next(first)
    first.save(tmp_path / "it")
    want = [next(first) for _ in range(2)]
    again = pipeline.make_iterator("medmcqa_sft", restore_from=str(tmp_path / "it"), **kwargs)
    for a, b in zip(want, [next(again) for _ in range(2)], strict=True):
        assert (a["decoder_segment_ids"].max(1) >= 1).any()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.slow
def test_hosts_read_disjoint_examples(sft_train_data, shared_data):
    kwargs = dict(sequence_length=192, batch_size=8, pack=False, seed=5, host_count=2)
    parts = [_first(pipeline.make_dataset("medmcqa_sft", host_index=h, **kwargs)) for h in range(2)]
    assert all(p["decoder_target_tokens"].shape == (4, 192) for p in parts)  # 8 examples a step, 4 per host
    a, b = (set(_examples_of(p)) for p in parts)
    assert len(a) == len(b) == 4 and not a & b
    with pytest.raises(ValueError, match="examples_per_batch=16 with pack=False"):
        pipeline.make_dataset("medmcqa_sft", pack=False, batch_size=8, examples_per_batch=16)


def test_a_meditron_checkpoint_grows_to_the_chat_vocabulary():
    from meditron_jax.config import get_config
    from meditron_jax.model import init_params
    from meditron_jax.train.trainer import extend_vocab

    vocab = tasks.chat_vocabulary()
    # MEDITRON.md §1: the 32,017 pretraining tokens, then <|im_start|> and <|im_end|>.
    assert vocab.vocab_size == 32019
    assert vocab.encode("<|im_start|>") == [32017] and vocab.encode("<|im_end|>") == [32018]
    old, new = get_config("tiny", vocab_size=32017), get_config("tiny", vocab_size=32019)
    params = init_params(old, seed=0)
    grown = extend_vocab(params, old, new)
    emb = np.asarray(params["embedding"])[:32017]
    np.testing.assert_array_equal(grown["embedding"][:32017], emb)
    np.testing.assert_allclose(grown["embedding"][32017:32019], np.stack([emb.mean(0)] * 2), rtol=1e-6)
    assert grown["lm_head"].shape[1] == new.padded_vocab_size
