"""Checkpoints that survive a pod: keep policy, restore onto other device counts, damaged checkpoints,
the MODEL_DIR lock, and runs stopped by SIGTERM / SIGKILL that resume to the same losses."""

import functools
import gc
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meditron_jax.config import get_config
from meditron_jax.parallel.mesh import MeshConfig, create_mesh
from meditron_jax.train import OptimizerConfig, TrainState, TrainStep, make_optimizer
from meditron_jax.train.checkpoints import Checkpoints, fingerprint
from meditron_jax.train.run_lock import RunLock, RunLockedError

from .hf_utils import load_script

# Orbax leaves its failed read coroutines un-awaited when a damaged file raises (reported whenever they are
# garbage-collected); harmless here.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FakeIterator:
    """What Checkpoints needs of the input pipeline: a position it can write."""

    def __init__(self, served=0):
        self.batches_served = served

    def save(self, directory):
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "position.json"), "w") as f:
            json.dump({"batches_served": self.batches_served}, f)


def _small_state(step, seed=0):
    rng = np.random.default_rng(seed)
    params = {"w": jnp.asarray(rng.normal(size=(64, 32)), jnp.float32), "b": jnp.asarray(rng.normal(size=32))}
    return TrainState(step=jnp.int32(step), params=params, opt_state={"mu": jax.tree.map(jnp.zeros_like, params)})


def _abstract(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)


def _steps(path):
    return sorted(int(n) for n in os.listdir(path) if n.isdigit())


def test_keep_policy_is_last_k_plus_every_mth(tmp_path):
    ckpts = Checkpoints(str(tmp_path), every=1, keep=2, keep_every=4)
    for step in range(1, 14):
        assert ckpts.save(step, _small_state(step), FakeIterator(step))
    ckpts.wait()
    saved = list(range(1, 14))
    expected = set(saved[-2:]) | {s for s in saved if s % 4 == 0}  # {4, 8, 12, 13}
    assert sorted(ckpts.all_steps()) == sorted(expected)
    assert _steps(tmp_path / "checkpoints") == sorted(expected)
    assert _steps(tmp_path / "input_state") == sorted(expected)  # positions of deleted steps go too
    ckpts.close()


def test_saves_every_n_steps_and_when_forced(tmp_path):
    ckpts = Checkpoints(str(tmp_path), every=3, keep=10)
    made = [s for s in range(1, 11) if ckpts.save(s, _small_state(s), FakeIterator(s), force=s == 10)]
    ckpts.wait()
    assert made == [3, 6, 9, 10]
    assert not ckpts.save(10, _small_state(10), FakeIterator(10), force=True)  # already there: not twice
    ckpts.close()


def _damage(model_dir, step, how):
    item = os.path.join(model_dir, "checkpoints", str(step), "default")
    if how in ("truncate", "flip"):
        path = max(glob.glob(os.path.join(item, "ocdbt.process_0", "d", "*")), key=os.path.getsize)
        size = os.path.getsize(path)
        with open(path, "r+b") as f:
            if how == "truncate":
                f.truncate(size // 2)
            else:  # orbax itself restores this without complaint; the fingerprint must catch it
                f.seek(size // 2)
                f.write(bytes(64))
    elif how == "metadata":
        with open(os.path.join(item, "_METADATA"), "w") as f:
            f.write("{not json")
    elif how == "delete_array_files":
        for path in glob.glob(os.path.join(item, "ocdbt.process_0", "d", "*")):
            os.remove(path)
    elif how == "no_input_position":
        import shutil

        shutil.rmtree(os.path.join(model_dir, "input_state", str(step)))


# What the warning says for each kind of damage (the flipped bytes are only caught by the fingerprint).
DAMAGE = {
    "truncate": "checkpoints/4: ",
    "flip": "checkpoints/4: ",  # orbax notices or not, depending on where the bytes land; the fingerprint does
    "swapped_arrays": "arrays differ from what was saved",  # valid files of other values: only the fingerprint
    "metadata": "unreadable metadata",
    "delete_array_files": "checkpoints/4: ",
    "no_input_position": "has no input-pipeline position",
}


@pytest.mark.parametrize("how", sorted(DAMAGE))
def test_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path, how, caplog):
    ckpts = Checkpoints(str(tmp_path), every=2, keep=5)
    states = {s: _small_state(s, seed=s) for s in (2, 4)}
    for s, st in states.items():
        ckpts.save(s, st, FakeIterator(10 * s))
    ckpts.close()
    if how == "swapped_arrays":  # well-formed array files that hold other values (e.g. a botched copy)
        import shutil

        other = Checkpoints(str(tmp_path / "other"), every=2, keep=5)
        other.save(4, _small_state(4, seed=99), FakeIterator(40))
        other.close()
        item = tmp_path / "checkpoints" / "4" / "default"
        shutil.rmtree(item)
        shutil.copytree(tmp_path / "other" / "checkpoints" / "4" / "default", item)
    else:
        _damage(str(tmp_path), 4, how)

    ckpts = Checkpoints(str(tmp_path), every=2, keep=5)
    opened = []
    with caplog.at_level("WARNING"):
        step, state, it = ckpts.restore_latest(_abstract(states[2]), lambda p: opened.append(p) or p)
    assert step == 2 and it == ckpts.input_path(2)
    for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(states[2]), strict=True):
        np.testing.assert_array_equal(got, want)
    warning = [r.getMessage() for r in caplog.records if "damaged checkpoint" in r.getMessage()]
    assert len(warning) == 1 and os.path.join(str(tmp_path), "checkpoints", "4") in warning[0], warning
    assert DAMAGE[how] in warning[0], warning
    # Moved aside (kept for inspection), so the step can be written again.
    assert ckpts.all_steps() == [2] and glob.glob(str(tmp_path / "damaged_checkpoints" / "4-*" / "state"))
    assert ckpts.save(4, states[4], FakeIterator(40), force=True)
    ckpts.close()
    gc.collect()  # orbax's abandoned reads, while this module's warning filter applies


def test_a_different_model_is_an_error_not_damage(tmp_path):
    ckpts = Checkpoints(str(tmp_path), every=1, keep=2)
    ckpts.save(1, _small_state(1), FakeIterator(1))
    ckpts.wait()
    other = _abstract(_small_state(1))
    other = other.replace(params={**other.params, "w": jax.ShapeDtypeStruct((64, 16), jnp.float32)})
    with pytest.raises(ValueError, match=r"does not match this run's model.*params/w has shape \(64, 32\)"):
        ckpts.restore_latest(other, lambda p: p)
    assert ckpts.all_steps() == [1]  # not moved aside
    ckpts.close()


def test_another_host_count_is_an_error_not_damage(tmp_path):
    # Input positions are per host: a restart on more or fewer hosts used to find "no position", move every
    # checkpoint aside as damaged and start again from step 0.
    ckpts = Checkpoints(str(tmp_path), every=1, keep=2)
    ckpts.save(1, _small_state(1), FakeIterator(1))
    ckpts.wait()
    saved = os.path.dirname(ckpts.input_path(1))
    (only,) = os.listdir(saved)
    assert only == "input_pipeline-00000-of-00001"
    for host in range(2):  # as if two hosts had saved it
        shutil.copytree(os.path.join(saved, only), os.path.join(saved, f"input_pipeline-{host:05d}-of-00002"))
    shutil.rmtree(os.path.join(saved, only))
    with pytest.raises(ValueError, match=r"was saved by 2 host\(s\) and this run has 1.*INIT_FROM="):
        ckpts.restore_latest(_abstract(_small_state(1)), lambda p: p)
    assert ckpts.all_steps() == [1] and not os.path.exists(tmp_path / "damaged_checkpoints")
    ckpts.close()


def test_fingerprint_does_not_depend_on_the_sharding():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(16, 24)), jnp.float32)
    mesh = create_mesh(MeshConfig(ici_fsdp=-1))
    sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp")))
    assert fingerprint({"x": x}) == fingerprint({"x": sharded})
    y = x.at[3, 5].set(x[3, 5] + 1e-6)  # one element, one ulp-ish change
    assert fingerprint({"x": y}) != fingerprint({"x": x})
    swapped = x.at[0, 0].set(x[0, 1]).at[0, 1].set(x[0, 0])  # same values, other places
    assert fingerprint({"x": swapped}) != fingerprint({"x": x})


# -- restore onto another mesh ----------------------------------------------------------------------------


@functools.cache
def _step(n):
    """The tiny model's step on the first ``n`` devices (fast CPU compile: the numbers, not speed, matter)."""
    mesh = create_mesh(MeshConfig(ici_fsdp=-1), devices=jax.devices()[:n])
    fast = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
    opt = make_optimizer(OptimizerConfig(warmup_steps=1, train_steps=10))
    return TrainStep(get_config("tiny"), mesh, opt, donate=False, compiler_options=fast)


def _batch(seed):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, 512, (8, 65))
    return {"decoder_input_tokens": tokens[:, :-1], "decoder_target_tokens": tokens[:, 1:]}


def _restore_on(path, n):
    dst = _step(n)
    reader = Checkpoints(str(path), every=1, keep=2)
    step, restored, _ = reader.restore_latest(dst.abstract_state, lambda p: p)
    reader.close()
    assert step == 1
    leaf = restored.params["embedding"]
    assert leaf.sharding == dst.state_shardings.params["embedding"] and len(leaf.sharding.device_set) == n
    return restored


def _next_loss(n, state):
    return float(_step(n)(state, _step(n).shard_batch(_batch(2)))[1]["loss"])


@pytest.mark.slow
def test_restore_onto_other_device_counts(tmp_path):
    """Saved on 8 devices, restored on 4 and 1; saved on 1, restored on 4 and 8. Orbax reads each device's
    slice of the stored arrays into the new mesh's shardings: the restored arrays are bit-identical, and the
    next loss agrees to 1e-6 relative (float32 sums reduce in another order over another number of shards,
    so not bitwise)."""
    assert len(jax.devices()) == 8
    src = _step(8)
    state, _ = src(src.init_state(jax.random.PRNGKey(0)), src.shard_batch(_batch(1)))
    want = _next_loss(8, state)
    ckpts = Checkpoints(str(tmp_path / "from8"), every=1, keep=2)
    ckpts.save(1, state, FakeIterator(1))
    ckpts.close()
    on1 = None
    for n in (4, 1):
        restored = _restore_on(tmp_path / "from8", n)
        for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        np.testing.assert_allclose(_next_loss(n, restored), want, rtol=1e-6)
        on1 = restored
    ckpts = Checkpoints(str(tmp_path / "from1"), every=1, keep=2)
    ckpts.save(1, on1, FakeIterator(1))
    ckpts.close()
    for n in (4, 8):
        restored = _restore_on(tmp_path / "from1", n)
        np.testing.assert_allclose(_next_loss(n, restored), want, rtol=1e-6)


# -- the MODEL_DIR lock -------------------------------------------------------------------------------


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _write_lock(model_dir, pid, host=None):
    import socket

    os.makedirs(model_dir, exist_ok=True)
    holder = {"host": host or socket.gethostname(), "pid": pid, "start_time": "2026-01-01T00:00:00+00:00"}
    with open(os.path.join(model_dir, "run.lock"), "w") as f:
        json.dump(holder, f)


def test_second_live_run_is_refused_naming_the_holder(tmp_path, capsys):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write_lock(tmp_path, holder.pid)
        with pytest.raises(RunLockedError, match=rf"in use by another run \(pid {holder.pid} on host"):
            RunLock(str(tmp_path)).acquire()
        # Through the command: one clear line, exit status 1, before any work is done.
        gin.clear_config()
        try:
            rc = load_script("train").console(
                ["--gin_file=runs/tiny_cpu.gin", f"--gin.MODEL_DIR='{tmp_path}'", "--gin.SEQUENCE_LENGTH=64"]
            )
        finally:
            gin.clear_config()
        assert rc == 1
        assert f"error: MODEL_DIR {tmp_path} is in use by another run (pid {holder.pid}" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()


def test_stale_lock_is_taken_over_and_other_hosts_are_refused(tmp_path, caplog):
    pid = _dead_pid()
    _write_lock(tmp_path, pid)
    with caplog.at_level("WARNING"), RunLock(str(tmp_path)) as lock:
        assert json.load(open(lock.path))["pid"] == os.getpid()
    assert any(f"pid {pid}" in r.getMessage() and "taking over" in r.getMessage() for r in caplog.records)
    assert not os.path.exists(tmp_path / "run.lock")  # released
    _write_lock(tmp_path, pid, host="another-host")  # cannot be checked from here: refuse
    with pytest.raises(RunLockedError, match="pid .* on host 'another-host'"):
        RunLock(str(tmp_path)).acquire()


# -- whole runs: SIGTERM, SIGKILL, damaged newest checkpoint ---------------------------------------------

STEPS = 8


def _flags(model_dir, curated):
    return [
        "--gin_file=runs/tiny_cpu.gin",
        f"--gin.MODEL_DIR='{model_dir}'",
        f"--gin.curated_data_dir.path='{curated}'",
        "--gin.TrainConfig.mixture='gap_replay_replay'",
        "--gin.SEQUENCE_LENGTH=64",
        f"--gin.TRAIN_STEPS={STEPS}",
        "--gin.TrainConfig.checkpoint_every=2",
        "--gin.TrainConfig.keep_checkpoints=10",
        "--gin.TrainConfig.log_every=1",
        "--gin.OptimizerConfig.warmup_steps=1",
    ]


def _run_inprocess(model_dir, curated):
    gin.clear_config()
    try:
        return load_script("train").main(_flags(model_dir, curated))
    finally:
        gin.clear_config()


def _train_records(model_dir):
    lines = [json.loads(line) for line in open(os.path.join(model_dir, "metrics.jsonl"))]
    return [r for r in lines if r.get("kind", "train") == "train"]


def _by_step(records):
    """Step -> (loss, tokens); a step logged twice (recomputed after a kill) must agree with itself."""
    out = {}
    for r in records:
        value = (r["loss"], r["tokens"])
        assert out.setdefault(r["step"], value) == value, (r["step"], out[r["step"]], value)
    return out


def _final_params(model_dir, step=STEPS):
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(os.path.join(model_dir, "checkpoints", str(step), "default"))["params"]


def _assert_same_run(model_dir, reference):
    got, want = _by_step(_train_records(model_dir)), _by_step(_train_records(reference))
    assert sorted(got) == list(range(1, STEPS + 1)) and got == want  # bitwise: the same floats
    for x, y in zip(jax.tree.leaves(_final_params(model_dir)), jax.tree.leaves(_final_params(reference)), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, curated):
    path = tmp_path_factory.mktemp("reference") / "run"
    assert _run_inprocess(path, curated) == 0
    return path


def _start(model_dir, curated):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    log = open(f"{model_dir}.log", "w")  # a file, not a pipe nobody drains
    return subprocess.Popen(
        [sys.executable, "-m", "meditron_jax.cli.train", *_flags(model_dir, curated)],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def _output(model_dir):
    return open(f"{model_dir}.log").read()


def _wait_for_step(proc, model_dir, step, timeout=240):
    path = os.path.join(model_dir, "metrics.jsonl")
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"training exited early ({proc.returncode}):\n{_output(model_dir)[-3000:]}")
        if os.path.exists(path) and any(r["step"] >= step for r in _train_records(model_dir)):
            return
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"step {step} was not logged within {timeout} s")


@pytest.mark.slow
def test_sigterm_saves_exits_0_and_resumes_exactly(tmp_path, curated, reference):
    run = tmp_path / "run"
    proc = _start(run, curated)
    _wait_for_step(proc, run, 2)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=240)
    out = _output(run)
    assert proc.returncode == 0, out[-3000:]
    stopped = max(r["step"] for r in _train_records(run))
    assert 2 <= stopped < STEPS, "the SIGTERM landed after the run ended: nothing was tested"
    assert "(preempted: run the same command again to resume)" in out and f"checkpoint of step {stopped} saved" in out
    assert _steps(run / "checkpoints")[-1] == stopped  # saved at the step boundary, not at the interval
    assert _run_inprocess(run, curated) == 0
    _assert_same_run(run, reference)


@pytest.mark.slow
def test_sigkill_resumes_from_the_last_checkpoint(tmp_path, curated, reference, capfd):
    run = tmp_path / "run"
    proc = _start(run, curated)
    _wait_for_step(proc, run, 4)
    # The save of step 2 commits in the background; under load it can still be in flight at step 4.
    deadline = time.time() + 120
    while not (os.path.isdir(run / "checkpoints") and _steps(run / "checkpoints")) and time.time() < deadline:
        assert proc.poll() is None, _output(run)[-3000:]
        time.sleep(0.05)
    assert _steps(run / "checkpoints"), "no checkpoint committed before the kill: nothing to resume from"
    proc.kill()
    proc.wait()
    assert os.path.exists(run / "run.lock")  # left behind by the killed run
    capfd.readouterr()
    assert _run_inprocess(run, curated) == 0
    err = capfd.readouterr().err  # the command's console (its logging set-up replaces pytest's handlers)
    assert f"taking over the lock {run / 'run.lock'} of a run that is gone (pid {proc.pid}" in err
    assert "resumed from step " in err
    _assert_same_run(run, reference)


@pytest.mark.slow  # needs the reference run
def test_training_continues_from_the_previous_checkpoint_when_the_newest_is_damaged(tmp_path, reference, curated):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(reference, run)
    _damage(str(run), STEPS, "truncate")
    shutil.rmtree(run / "tensorboard")
    assert _run_inprocess(run, curated) == 0  # resumes from STEPS - 2 and recomputes the last two steps
    gc.collect()
    records = _train_records(run)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1)) + [STEPS - 1, STEPS]
    _assert_same_run(run, reference)


def test_keep_settings_are_checked():
    from meditron_jax.train.trainer import TrainConfig

    with pytest.raises(ValueError, match="keep_checkpoints must be >= 1"):
        TrainConfig(model_dir="/unused", keep_checkpoints=0)
    with pytest.raises(ValueError, match="keep_every must be >= 0"):
        TrainConfig(model_dir="/unused", keep_every=-1)
