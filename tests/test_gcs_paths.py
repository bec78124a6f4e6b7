"""gs:// paths reach the file system layer untouched: MODEL_DIR and the curated data may be bucket URLs.

TensorFlow's in-memory file system (``ram://``) stands in for a bucket: it is served by the same tf.io.gfile
calls as ``gs://``, and a path that was mangled on the way (``os.path.abspath``, ``pathlib.Path``, ``open``)
would land in a local folder named ``ram:`` instead, which the tests look for. Orbax writes the train state
itself (through etils.epath and TensorStore, which take gs:// but not ram://), so its CheckpointManager is
replaced by a recorder that checks the directory it is given.
"""

import json
import os

import gin
import pytest
import tensorflow as tf

from meditron_jax import fs
from meditron_jax.data import tasks


def test_urls_are_left_alone(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert fs.absolute("gs://bucket/runs/7b") == "gs://bucket/runs/7b"
    assert fs.absolute("runs/7b") == str(tmp_path / "runs" / "7b")
    assert fs.join("gs://bucket/runs", "7b", "checkpoints") == "gs://bucket/runs/7b/checkpoints"
    assert fs.is_url("gs://b") and fs.is_url("s3://b/x") and not fs.is_url("/gs:/b") and not fs.is_url("gs:b")
    assert tasks.curated_data_dir("gs://bucket/gap_replay") == "gs://bucket/gap_replay"


def test_file_operations_on_a_url(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = "ram://fs_test/run"
    fs.makedirs(fs.join(root, "a", "b"))
    fs.write_text(fs.join(root, "a", "x.json"), '{"k": 1}')
    with fs.open_file(fs.join(root, "log.jsonl"), "a") as f:
        f.write("1\n")
    with fs.open_file(fs.join(root, "log.jsonl"), "a") as f:
        f.write("2\n")
    assert fs.read_text(fs.join(root, "log.jsonl")) == "1\n2\n"
    assert sorted(fs.listdir(root)) == ["a", "log.jsonl"]
    assert fs.isdir(fs.join(root, "a")) and fs.exists(fs.join(root, "a", "x.json"))
    assert fs.size(fs.join(root, "a", "x.json")) == 8
    assert fs.glob(fs.join(root, "a", "*.json")) == [fs.join(root, "a", "x.json")]
    fs.move(fs.join(root, "a", "x.json"), fs.join(root, "a", "y.json"))
    assert not fs.exists(fs.join(root, "a", "x.json")) and fs.exists(fs.join(root, "a", "y.json"))
    fs.rmtree(fs.join(root, "a"))
    assert not fs.exists(fs.join(root, "a"))
    assert not (tmp_path / "ram:").exists()


class RecordingManager:
    """Stands in for orbax's CheckpointManager: records its directory and the steps saved."""

    directories: list[str] = []

    def __init__(self, directory, options=None, item_handlers=None):
        RecordingManager.directories.append(directory)
        self.steps: list[int] = []

    def all_steps(self):
        return list(self.steps)

    def latest_step(self):
        return max(self.steps, default=None)

    def should_save(self, step):
        return False

    def reached_preemption(self, step):
        return False

    def save(self, step, args=None, custom_metadata=None, force=False):
        self.steps.append(step)
        return True

    def wait_until_finished(self):
        pass

    def reload(self):
        pass

    def close(self):
        pass


def _copy_tree(src, dst):
    for dirpath, _, names in os.walk(src):
        rel = os.path.relpath(dirpath, src)
        target = dst if rel == "." else fs.join(dst, rel)
        tf.io.gfile.makedirs(target)
        for name in names:
            tf.io.gfile.copy(os.path.join(dirpath, name), fs.join(target, name), overwrite=True)


@pytest.mark.slow
def test_training_writes_under_a_url_model_dir_and_reads_url_data(tmp_path, monkeypatch, curated):
    import orbax.checkpoint as ocp

    from meditron_jax.cli import train

    monkeypatch.chdir(tmp_path)  # a mangled URL would become a relative local folder here
    monkeypatch.setattr(ocp, "CheckpointManager", RecordingManager)
    RecordingManager.directories = []
    data, model_dir = "ram://bucket/gap_replay", "ram://bucket/runs/tiny"
    _copy_tree(curated, data)
    gin.clear_config()
    try:
        train.main(
            [
                "--gin_file=runs/tiny_cpu.gin",
                f"--gin.MODEL_DIR='{model_dir}'",
                f"--gin.curated_data_dir.path='{data}'",
                "--gin.TrainConfig.mixture='gap_replay_replay'",
                "--gin.SEQUENCE_LENGTH=64",
                "--gin.TRAIN_STEPS=2",
                "--gin.TrainConfig.checkpoint_every=2",
                "--gin.TrainConfig.log_every=1",
                "--gin.OptimizerConfig.warmup_steps=1",
            ]
        )
    finally:
        gin.clear_config()

    assert RecordingManager.directories == [f"{model_dir}/checkpoints"]
    rows = [json.loads(line) for line in fs.read_text(f"{model_dir}/metrics.jsonl").splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for name in ("model_config.json", "operative_config.gin", "tokenizer.model", "added_tokens.json"):
        assert fs.exists(f"{model_dir}/{name}"), name
    assert json.loads(fs.read_text(f"{model_dir}/model_config.json"))["hidden_size"] == 64
    assert fs.exists(f"{model_dir}/input_state/2/input_pipeline-00000-of-00001/position.json")
    assert tf.io.gfile.glob(f"{model_dir}/tensorboard/events.out.tfevents.*")
    assert not fs.exists(f"{model_dir}/run.lock")  # no lock on a bucket (documented)
    assert not (tmp_path / "ram:").exists() and os.listdir(tmp_path) == []
