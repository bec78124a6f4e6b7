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
