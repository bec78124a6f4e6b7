"""Test setup: 8 fake CPU devices for the sharding tests, and the shared data folder."""

import json
import os
import shutil
import tempfile

# Must be set before jax initialises its backends. XLA:CPU's older loop emitters compile the suite's
# programs in about half the time (backend compile 610 -> 343 s over the suite; docs/performance.md, "Where
# the suite's time goes: compiling"); a test whose claim depends on the default code generation (bit-exact
# equality of two different programs) asks for it back per compilation.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_cpu_use_fusion_emitters=false")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Several processes (pytest, the multi-process tests) may load libtpu to compile for TPU topologies.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
# One scratch folder for the session, its pytest-xdist workers and the processes the tests start (they
# inherit TMPDIR): the compilation cache below, and what libraries leave in the temporary folder
# (TensorFlow's AutoGraph files, Beam's and Dask's scratch, the datasets cache). Removed when the session
# ends (pytest_unconfigure): before, every run left ~40 MB in /tmp. pytest's own tmp_path folders stay in
# the usual place, for looking at after a failure.
_SCRATCH = None
if "MEDITRON_TEST_SCRATCH" not in os.environ:  # the first process; workers inherit the variable
    os.environ.setdefault("PYTEST_DEBUG_TEMPROOT", tempfile.gettempdir())
    _SCRATCH = tempfile.mkdtemp(prefix="meditron-jax-tests-")
    os.environ["MEDITRON_TEST_SCRATCH"] = os.environ["TMPDIR"] = _SCRATCH
    tempfile.tempdir = None  # recomputed from TMPDIR
# A compilation cache for this session only (fresh every run): tests that rebuild the same jitted step,
# such as a training run and its resumption, compile it once.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(os.environ["MEDITRON_TEST_SCRATCH"], "jax-cache")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import pytest  # noqa: E402

from meditron_jax.data.paths import ENV_VAR, shared_data_dir  # noqa: E402

# The files that take longest (pytest --durations, 2026-12-03), started first: `--dist loadfile` hands files
# to the two workers in collection order, so a long file collected last would run alone at the end.
# This changes only the order; every test still runs.
LONGEST_FIRST = (
    "test_doc_commands.py",
    "test_checkpoints.py",
    "test_quickstart.py",
    "test_notebook.py",
    "test_sft.py",
    "test_data_pipeline.py",
    "test_cpu_native.py",
    "test_falcon_parallel.py",
    "test_layer_scan.py",
    "test_kernels.py",
    "test_engine.py",
    "test_parallel_equivalence.py",
    "test_model_card.py",
    "test_orbax_sharded_restore.py",
    "test_eval_oracle.py",
    "test_reliability_cli.py",
    "test_eval_lm_eval.py",
    "test_metrics.py",
)


def pytest_unconfigure(config):
    if _SCRATCH is not None:
        shutil.rmtree(_SCRATCH, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: within a file, order is kept


@pytest.fixture(scope="session")
def shared_data():
    """The shared data folder. Missing data is a failure, not a skip: CI always has it."""
    path = shared_data_dir()
    if not path.is_dir():
        pytest.fail(f"shared data folder {path} is missing; set {ENV_VAR}")
    return path


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
