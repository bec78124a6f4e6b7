"""bench/compile_stats.py, the pytest plugin that sums compile time per process, function and test."""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]

SAMPLE = """
import jax, jax.numpy as jnp

def test_compiles_a_named_function():
    def doubled_sine(x):
        return 2 * jnp.sin(x)
    assert float(jax.jit(doubled_sine)(jnp.float32(0.0))) == 0.0
"""


def test_the_plugin_names_the_compiled_function_and_the_test(tmp_path):
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    out = tmp_path / "stats.txt"
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(ROOT / "bench"), os.environ.get("PYTHONPATH", "")]),
        MEDITRON_COMPILE_STATS=str(out),
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR="",  # compile for real, not from the session's cache
    )
    env.pop("PYTEST_XDIST_WORKER", None)
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "compile_stats", "-p", "no:cacheprovider", "test_sample.py"]
    done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    text = out.read_text()
    assert text.startswith("== process ") and "(main)" in text.splitlines()[0]
    assert "backend_compile_duration" in text
    assert "compiling jit(doubled_sine)" in text
    assert "compiling in test_sample.py::test_compiles_a_named_function" in text
