"""The training loop through scripts/train.py and the gin run files: it learns, checkpoints, and a run
stopped part-way resumes to exactly the parameters of an uninterrupted run."""

import json
import os

import gin
import jax
import numpy as np
import pytest

from .hf_utils import load_script

STEPS = 4


@pytest.fixture(scope="module")
def curated(tmp_path_factory, shared_data):
    """A curated-shard folder (the curation pipeline's output format) with real replay text."""
    root = tmp_path_factory.mktemp("curated")
    (root / "replay").mkdir()
    text = (shared_data / "gap_replay_sample" / "replay_general" / "input.txt").read_text()[:60_000]
    with open(root / "replay" / "train-00000-of-00001.jsonl", "w") as f:
        for i, doc in enumerate(d for d in text.split("\n\n") if d.strip()):
            f.write(json.dumps({"id": str(i), "source": "replay", "text": doc}) + "\n")
    return root


def _run(model_dir, curated, *extra):
    train_main = load_script("train").main
    gin.clear_config()
    try:
        return train_main([
            "--gin_file=runs/tiny_cpu.gin", f"--gin.MODEL_DIR='{model_dir}'",
            f"--gin.curated_data_dir.path='{curated}'", "--gin.TrainConfig.mixture='gap_replay_replay'",
            "--gin.SEQUENCE_LENGTH=64", f"--gin.TRAIN_STEPS={STEPS}", "--gin.TrainConfig.checkpoint_every=2",
            "--gin.TrainConfig.log_every=1", "--gin.OptimizerConfig.warmup_steps=1", *extra])
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
