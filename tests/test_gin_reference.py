"""docs/gin_reference.md is generated from the code (scripts/gen_gin_reference.py); it must match a fresh render."""

import dataclasses
import importlib.util
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gen():
    spec = importlib.util.spec_from_file_location("gen_gin_reference", ROOT / "scripts" / "gen_gin_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_reference_is_fresh(gen):
    committed = (ROOT / "docs" / "gin_reference.md").read_text(encoding="utf-8")
    fresh = gen.render()
    assert committed == fresh, (
        "docs/gin_reference.md is stale (a configurable, parameter, default or gin macro changed); "
        "regenerate it with: python scripts/gen_gin_reference.py"
    )


def test_reference_covers_every_configurable_and_field(gen):
    """Independent of the renderer's own walk: hand-picked configurables and every TrainConfig/ModelConfig field."""
    from meditron_jax.config import ModelConfig
    from meditron_jax.train.trainer import TrainConfig

    text = gen.render()
    for name in ["TrainConfig", "ModelConfig", "OptimizerConfig", "MeshConfig", "PipelineConfig", "make_dataset"]:
        assert f"\n## {name}\n" in text
    for cls in (TrainConfig, ModelConfig):
        section = text.split(f"\n## {cls.__name__}\n", 1)[1].split("\n## ", 1)[0]
        for field in dataclasses.fields(cls):
            assert f"| `{field.name}` |" in section, f"{cls.__name__}.{field.name} missing"
    # Defaults as written in the source, spot-checked by hand.
    assert "| `peak_lr` | `0.0003` |" in text
    assert "| `ici_fsdp` | `-1` |" in text
    assert "| `config` | `required` |" in text  # train(config=gin.REQUIRED)
    assert "| `MODEL_DIR` | `gin/runs/pretrain.gin` | `%gin.REQUIRED` |" in text


def test_every_registering_module_is_found(gen):
    found = set(gen.registering_modules())
    assert {"meditron_jax.config", "meditron_jax.train.trainer", "meditron_jax.data.tasks"} <= found
