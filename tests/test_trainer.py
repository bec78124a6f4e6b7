"""The training loop through scripts/train.py and the gin run files: it learns, checkpoints, and a run
stopped part-way resumes to exactly the parameters of an uninterrupted run."""

import json
import os

import gin
import jax
import numpy as np
import pytest

from .hf_utils import load_script

pytestmark = pytest.mark.slow  # multi-second runs: excluded from the quick `-m "not slow"` loop

STEPS = 4


def _run(model_dir, curated, *extra):
    train_main = load_script("train").main
    gin.clear_config()
    try:
        return train_main(
            [
                "--gin_file=runs/tiny_cpu.gin",
                f"--gin.MODEL_DIR='{model_dir}'",
                f"--gin.curated_data_dir.path='{curated}'",
                "--gin.TrainConfig.mixture='gap_replay_replay'",
                "--gin.SEQUENCE_LENGTH=64",
                f"--gin.TRAIN_STEPS={STEPS}",
                "--gin.TrainConfig.checkpoint_every=2",
                "--gin.TrainConfig.log_every=1",
                "--gin.OptimizerConfig.warmup_steps=1",
                *extra,
            ]
        )
    finally:
        gin.clear_config()


def _final_params(model_dir):
    import orbax.checkpoint as ocp

    path = os.path.join(model_dir, "checkpoints", str(STEPS), "default")
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(path)["params"]


def _metrics(model_dir):
    return [json.loads(line) for line in open(os.path.join(model_dir, "metrics.jsonl"))]


def test_interrupted_run_resumes_exactly(tmp_path, curated):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert _run(whole, curated) == 0
    assert _run(parts, curated, "--gin.train.max_steps_this_run=2") == 0
    assert sorted(os.listdir(parts / "checkpoints")) == ["2"]
    # A crash after the input position of step 4 was written but before its state was: resume must
    # ignore the orphan and continue from step 2.
    os.makedirs(parts / "input_state" / "4" / "orphan")
    assert _run(parts, curated) == 0

    m_whole, m_parts = _metrics(whole), _metrics(parts)
    assert [m["step"] for m in m_whole] == [1, 2, 3, 4]
    assert [m["step"] for m in m_parts] == [1, 2, 3, 4]
    for a, b in zip(m_whole, m_parts, strict=True):
        assert a["loss"] == b["loss"] and a["tokens"] == b["tokens"], (a, b)
    assert m_whole[-1]["loss"] < m_whole[0]["loss"]  # it learns
    for x, y in zip(jax.tree.leaves(_final_params(whole)), jax.tree.leaves(_final_params(parts)), strict=True):
        np.testing.assert_array_equal(x, y)
    assert "SEQUENCE_LENGTH = 64" in (whole / "operative_config.gin").read_text()


def test_flag_errors():
    parse = load_script("train").parse_flags
    with pytest.raises(SystemExit):
        parse(["--gin.MODEL_DIR"])  # no '='
    with pytest.raises(SystemExit):
        parse(["--gin.MODEL_DIR='x'"])  # no gin file
    args, bindings = parse(["--gin_file=a.gin", "--gin_file=b.gin", "--gin.A=1", "--gin.B='x'"])
    assert args.gin_file == ["a.gin", "b.gin"] and bindings == ["A=1", "B='x'"]


def test_missing_model_dir_is_named():
    from meditron_jax.train.trainer import TrainConfig

    with pytest.raises(ValueError, match="model_dir is empty: pass --gin.MODEL_DIR"):
        TrainConfig()


def test_init_from_hf_extends_the_vocabulary(tmp_path):
    from meditron_jax.convert.hf import load_hf_params, read_hf_config
    from meditron_jax.train.trainer import TrainConfig, _initial_params, model_config

    from .hf_utils import random_hf_llama

    src, _ = random_hf_llama(tmp_path / "hf", vocab=200)
    cfg = TrainConfig(model_dir=str(tmp_path / "run"), init_from=src, model_overrides={"vocab_size": 217})
    model_cfg = model_config(cfg)
    assert (model_cfg.vocab_size, model_cfg.padded_vocab_size, model_cfg.num_kv_heads) == (217, 256, 2)
    params = _initial_params(cfg, model_cfg)
    original = load_hf_params(src, read_hf_config(src))
    np.testing.assert_array_equal(params["embedding"][:200], original["embedding"][:200])
    np.testing.assert_allclose(
        params["embedding"][200:217], np.broadcast_to(original["embedding"][:200].mean(0), (17, 64)), rtol=1e-6
    )
    np.testing.assert_array_equal(params["lm_head"][:, :200], original["lm_head"][:, :200])
    assert not params["embedding"][217:].any()
    shrink = TrainConfig(model_dir=str(tmp_path / "run"), init_from=src, model_overrides={"vocab_size": 100})
    with pytest.raises(ValueError, match="vocab_size 100 is smaller than the checkpoint's 200"):
        _initial_params(shrink, model_config(shrink))


def test_out_of_range_token_ids_are_refused():
    from meditron_jax.train.trainer import check_token_ids

    batch = {"decoder_input_tokens": np.array([[1, 32005]]), "decoder_target_tokens": np.array([[32005, 2]])}
    with pytest.raises(
        ValueError, match="produced token id 32005 in decoder_input_tokens, but the model's vocabulary has 32000 tokens"
    ):
        check_token_ids(batch, 32000, "gap_replay")
    check_token_ids(batch, 32017, "gap_replay")


def test_a_tokenizer_larger_than_the_model_is_refused_before_training():
    from meditron_jax.train.trainer import check_vocabulary

    with pytest.raises(ValueError, match="'gap_replay' is tokenized with 32017 tokens, but the model's vocabulary has"):
        check_vocabulary("gap_replay", 32000)
    check_vocabulary("gap_replay", 32017)
    with pytest.raises(ValueError, match="'pubmedqa_pqal_sft' is tokenized with 32019 tokens"):  # ChatML's two
        check_vocabulary("pubmedqa_pqal_sft", 32017)
