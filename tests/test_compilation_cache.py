"""Training runs keep JAX's persistent compilation cache in the user's cache folder unless told otherwise."""

import os
import stat
import subprocess
import sys

import jax
import pytest

from meditron_jax import compilation_cache
from meditron_jax.train.trainer import TrainConfig


@pytest.fixture
def no_configured_cache():
    saved = jax.config.values["jax_compilation_cache_dir"], jax.config.values["jax_compilation_cache_max_size"]
    jax.config.update("jax_compilation_cache_dir", None)  # the test session sets one for itself
    jax.config.update("jax_compilation_cache_max_size", -1)
    yield
    jax.config.update("jax_compilation_cache_dir", saved[0])
    jax.config.update("jax_compilation_cache_max_size", saved[1])


def test_a_run_without_a_configured_cache_gets_a_private_bounded_one(tmp_path, no_configured_cache):
    where = tmp_path / "home" / "cache"
    assert compilation_cache.use_compilation_cache(str(where)) == str(where)
    assert jax.config.values["jax_compilation_cache_dir"] == str(where)
    assert jax.config.values["jax_compilation_cache_max_size"] == 8 << 30
    assert stat.S_IMODE(os.stat(where).st_mode) == 0o700


def test_the_users_own_setting_wins_and_none_turns_it_off(tmp_path, no_configured_cache):
    assert compilation_cache.use_compilation_cache(None) is None
    assert jax.config.values["jax_compilation_cache_dir"] is None
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "mine"))
    jax.config.update("jax_compilation_cache_max_size", 123)
    assert compilation_cache.use_compilation_cache(str(tmp_path / "ours")) == str(tmp_path / "mine")
    assert jax.config.values["jax_compilation_cache_max_size"] == 123
    assert not (tmp_path / "ours").exists()


@pytest.mark.parametrize("xdg", ["", "cache"])
def test_the_default_folder_follows_xdg_cache_home(tmp_path, monkeypatch, no_configured_cache, xdg):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / xdg) if xdg else "")
    assert TrainConfig(model_dir="r").compilation_cache_dir == compilation_cache.DEFAULT_DIR
    expected = tmp_path / (xdg or ".cache") / "meditron_jax" / "xla"
    assert compilation_cache.use_compilation_cache() == str(expected) and expected.is_dir()


def test_a_bucket_cache_is_used_as_given_without_eviction(no_configured_cache):
    # JAX's eviction locks a file inside the folder, which it cannot do on gs://; nothing is created here.
    assert compilation_cache.use_compilation_cache("gs://bucket/xla") == "gs://bucket/xla"
    assert jax.config.values["jax_compilation_cache_dir"] == "gs://bucket/xla"
    assert jax.config.values["jax_compilation_cache_max_size"] == -1


@pytest.mark.slow  # three fresh processes load stories260K and generate
def test_generate_caches_in_the_folder_given_by_default_and_nowhere_when_turned_off(tmp_path, shared_data):
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}  # the session's own cache
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="", JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    env["XDG_CACHE_HOME"] = str(tmp_path / "xdg")
    command = [sys.executable, "-m", "meditron_jax.cli.generate", "--model_dir", str(shared_data / "stories260K_hf")]
    command += ["--max_new_tokens", "2"]

    def generate(*flags):
        proc = subprocess.run([*command, *flags], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]

    generate("--compilation_cache_dir", str(tmp_path / "given"))
    assert len(list((tmp_path / "given").iterdir())) >= 2  # at least the prefill and the decode step
    generate("--compilation_cache_dir", "")
    assert not (tmp_path / "xdg").exists()
    generate()
    assert len(list((tmp_path / "xdg" / "meditron_jax" / "xla").iterdir())) >= 2
