"""Falcon through the unchanged MEDITRON job: continued pretraining from a Hugging Face Falcon (the trainer,
FSDP over 8 fake CPU devices, the vocabulary grown to MEDITRON's), ``meditron_jax.load`` of the run with its
engine, the evaluation CLI, and export back to a folder transformers loads with the same logits (1e-4)."""

import json

import gin
import numpy as np
import pytest
import transformers

import meditron_jax
from meditron_jax.config import MEDITRON_VOCAB_SIZE
from meditron_jax.convert.hf import save_hf
from meditron_jax.convert.model_dir import load_model_dir
from meditron_jax.eval import cli as eval_cli
from meditron_jax.infer.sampling import SamplingParams

from .hf_utils import hf_logits, load_script
from .test_falcon import random_hf_falcon

pytestmark = pytest.mark.slow  # a short training run, an evaluation and an export


def test_continued_pretraining_of_a_falcon_then_load_evaluate_export(tmp_path, curated, shared_data):
    src, hf = random_hf_falcon(tmp_path, "40b-new", tied=False)
    run = tmp_path / "run"
    gin.clear_config()
    try:
        rc = load_script("train").main(
            [
                "--gin_file=runs/pretrain.gin",
                f"--gin.MODEL_DIR='{run}'",
                f"--gin.TrainConfig.init_from='{src}'",
                f"--gin.TrainConfig.model_overrides={{'vocab_size': {MEDITRON_VOCAB_SIZE}}}",
                f"--gin.curated_data_dir.path='{curated}'",
                "--gin.TrainConfig.mixture='gap_replay_replay'",
                "--gin.SEQUENCE_LENGTH=64",
                "--gin.GLOBAL_BATCH=8",
                "--gin.TRAIN_STEPS=3",
                "--gin.TrainConfig.checkpoint_every=3",
                "--gin.TrainConfig.log_every=1",
                "--gin.OptimizerConfig.warmup_steps=1",
            ]
        )
    finally:
        gin.clear_config()
    assert rc == 0
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3] and all(np.isfinite(m["loss"]) for m in metrics)

    # load(): the run's newest checkpoint, with the Llama tokenizer its data was tokenized with
    lm = meditron_jax.load(run, tokenizer_path=str(shared_data / "llama2_tokenizer"))
    assert lm.config.family == "falcon" and lm.config.vocab_size == MEDITRON_VOCAB_SIZE
    prompt = [1, 450, 22884, 338]
    (out,) = lm.engine().generate_ids([prompt], SamplingParams(max_new_tokens=6, temperature=0.0))
    # the engine's KV-cache decode is greedy: each new token is the argmax of one full forward's logits
    full = lm.logits([prompt + out[0][:-1]])[0]
    assert out[0] == [int(t) for t in np.argmax(full[len(prompt) - 1 :], axis=-1)]

    # evaluation, unchanged
    res = tmp_path / "eval"
    argv = ["--checkpoint", str(run), "--tokenizer_path", str(shared_data / "llama2_tokenizer")]
    argv += ["--benchmark", "pubmedqa", "--strategy", "top_token", "--limit", "4", "--output", str(res)]
    assert eval_cli.main([*argv, "--no_progress"], process_index=0, process_count=1) == 0
    (row,) = json.loads((res / "results.json").read_text())["results"]
    assert row["n"] == 4 and 0.0 <= row["accuracy"] <= 1.0

    # export: transformers' Falcon reads the trained model and computes the same logits
    params, cfg = load_model_dir(run)
    save_hf(params, cfg, str(tmp_path / "hf_out"))
    back = transformers.FalconForCausalLM.from_pretrained(str(tmp_path / "hf_out")).eval()
    tokens = np.random.RandomState(2).randint(0, MEDITRON_VOCAB_SIZE, (1, 48))
    assert np.abs(lm.logits(tokens) - hf_logits(back, tokens)).max() <= 1e-4
    assert hf is not None
