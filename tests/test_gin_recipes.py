"""Gin as T5X users expect: model files bind ModelConfig, run files the run, required macros are required,
and the optimizer's schedule is checked against the run's own length."""

import dataclasses

import gin
import pytest

import meditron_jax.data.pipeline  # noqa: F401  (configurables the recipes bind)
import meditron_jax.data.tasks  # noqa: F401
from meditron_jax.cli.train import unused_macros
from meditron_jax.config import ModelConfig, get_config
from meditron_jax.resources import gin_dir
from meditron_jax.train import trainer
from meditron_jax.train.optimizer import OptimizerConfig, learning_rate_schedule


@pytest.fixture
def parse():
    def _parse(files, bindings=()):
        gin.clear_config()
        gin.add_config_file_search_path(str(gin_dir()))
        gin.parse_config_files_and_bindings(list(files), list(bindings))

    yield _parse
    gin.clear_config()


@pytest.mark.parametrize(
    "gin_file, preset",
    [
        ("models/meditron_7b.gin", "meditron-7b"),
        ("models/meditron_70b.gin", "meditron-70b"),
        ("models/llama2_7b.gin", "llama2-7b"),
        ("models/llama2_70b.gin", "llama2-70b"),
        ("models/tiny.gin", "tiny"),
    ],
)
def test_model_files_bind_modelconfig_equal_to_the_presets(parse, gin_file, preset):
    parse([gin_file, "runs/pretrain.gin"], ["MODEL_DIR='/x'", "SEQUENCE_LENGTH=8", "GLOBAL_BATCH=1", "TRAIN_STEPS=1"])
    model = trainer.TrainConfig().model
    assert isinstance(model, ModelConfig)
    # Llama-2 files carry MEDITRON's vocabulary (the curated corpus holds its markers); tiny.gin too.
    expected = get_config(preset, vocab_size=32017)
    arch = {f.name for f in dataclasses.fields(ModelConfig)} - {"param_dtype", "dtype", "scan_layers", "remat_policy"}
    assert {k: getattr(model, k) for k in arch} == {k: getattr(expected, k) for k in arch}


def test_direct_modelconfig_calls_ignore_gin(parse):
    parse(["models/tiny.gin"])
    assert ModelConfig().hidden_size == 4096  # only @ModelConfig() in gin sees the bindings


def test_run_macros_are_required(parse):
    with pytest.raises(Exception, match="model_dir|MODEL_DIR"):
        parse(["models/tiny.gin", "runs/pretrain_7b.gin"])
        trainer.TrainConfig()


def test_long_warmup_is_checked_against_the_runs_own_length(parse):
    """The trap: OptimizerConfig was validated with its default train_steps before the trainer set the run's."""
    parse([], ["OptimizerConfig.warmup_steps = 20000"])
    opt = OptimizerConfig()  # gin builds it before the trainer knows the run's length
    run = dataclasses.replace(opt, train_steps=30_000)
    lr = learning_rate_schedule(run)
    assert float(lr(20_000)) == pytest.approx(3e-4)
    with pytest.raises(ValueError, match="train_steps 10000.*shorter than warmup_steps 20000"):
        learning_rate_schedule(dataclasses.replace(opt, train_steps=10_000, horizon_factor=1.0))


def test_a_misspelled_macro_on_the_command_line_is_found(parse):
    parse(["runs/tiny_cpu.gin"], ["MODEL_DIR='/x'", "TRAIN_STEP=5"])
    assert unused_macros(gin.config_str(), ["MODEL_DIR='/x'", "TRAIN_STEP=5", "TrainConfig.log_every=3"]) == [
        "TRAIN_STEP"
    ]
