"""meditron_jax imports triton (when installed) before anything imports TensorFlow: the other order segfaults
(triton 3.7.1 with TF 2.21, reproduced on Python 3.11 and 3.12; CONTRIBUTING.md). CI's environment has no
triton, so a stand-in records what was already imported when it loaded."""

import subprocess
import sys


def test_triton_is_imported_before_tensorflow(tmp_path):
    fake = tmp_path / "triton"
    fake.mkdir()
    (fake / "__init__.py").write_text(
        "import sys\nTF_ALREADY_IMPORTED = 'tensorflow' in sys.modules\n"
        "print('triton loaded; tensorflow already imported:', TF_ALREADY_IMPORTED)\n"
    )
    code = "import meditron_jax, meditron_jax.data.tasks, tensorflow, triton\nprint(triton.TF_ALREADY_IMPORTED)\n"
    run = subprocess.run(
        [sys.executable, "-c", code],
        env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin", "TF_CPP_MIN_LOG_LEVEL": "3"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.splitlines()[0] == "triton loaded; tensorflow already imported: False", run.stdout
    assert run.stdout.splitlines()[-1] == "False"


def test_the_data_pipeline_loads_without_keras_and_keras_still_works_after():
    """meditron_jax/lean_imports.py: TensorFlow's and tensorflow_text's first imports skip Keras (and the
    scikit-learn, pandas and matplotlib it brings); tensorflow_text.keras and Keras itself load when used."""
    code = (
        "import sys\n"
        "import meditron_jax.data.tasks, seqio, tensorflow, tensorflow_text\n"
        "print(sorted(m for m in ('keras', 'sklearn', 'pandas', 'matplotlib') if m in sys.modules))\n"
        "print(tensorflow_text.keras.layers.ToDense.__module__)\n"
        "import keras\n"
        "print(type(keras.optimizers.Adam()).__name__, tensorflow.keras.layers.Dense.__name__)\n"
    )
    env = {"PATH": "/usr/bin:/bin", "TF_CPP_MIN_LOG_LEVEL": "3", "JAX_PLATFORMS": "cpu"}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    want = ["[]", "tensorflow_text.python.keras.layers.todense", "Adam Dense"]
    assert run.stdout.splitlines()[-3:] == want, run.stdout
