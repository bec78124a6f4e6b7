"""`pip install .` (not editable) gives a package that works from any folder: the commands import, find their
gin recipes and the embedded sample, and no script patches sys.path."""

import os
import pathlib
import shutil
import site
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A fresh venv holding a wheel-style install of this checkout; the pinned dependencies come from the
    current environment through a .pth file (nothing is downloaded)."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    target = subprocess.run(
        [py, "-c", "import site; print(site.getsitepackages()[0])"], check=True, capture_output=True, text=True
    ).stdout.strip()
    pathlib.Path(target, "deps.pth").write_text(site.getsitepackages()[0] + "\n")
    # Build from a copy of the checkout's files, so setuptools' build/ and egg-info stay out of the checkout.
    src = tmp_path_factory.mktemp("src")
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    subprocess.run(
        [py, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index", str(src)],
        check=True,
        cwd=src,
        env={**os.environ, "PIP_NO_CACHE_DIR": "1"},
    )
    return venv


def _run(venv, *cmd, **kw):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PATH": f"{venv / 'bin'}:{os.environ['PATH']}"}
    return subprocess.run(list(cmd), cwd="/", env=env, capture_output=True, text=True, timeout=600, **kw)


def test_installed_package_is_not_the_checkout(installed):
    proc = _run(installed, str(installed / "bin" / "python"), "-c", "import meditron_jax; print(meditron_jax.__file__)")
    assert proc.returncode == 0, proc.stderr
    assert str(installed) in proc.stdout and str(ROOT) not in proc.stdout


def test_commands_run_from_the_root_folder(installed, shared_data, tmp_path):
    for name in ("meditron-quickstart", "meditron-train", "meditron-eval", "meditron-convert", "meditron-generate"):
        proc = _run(installed, str(installed / "bin" / name), "--help")
        assert proc.returncode == 0 and "usage" in proc.stdout.lower(), (name, proc.stderr[-2000:])
    # The AOT tool compiles a tiny step for a TPU slice with the gin layout file of the installed package.
    proc = _run(
        installed,
        str(installed / "bin" / "meditron-aot"),
        "--model=tiny",
        "--topology=v5e-4",
        "--seq_len=64",
        "--global_batch=4",
        "--gin_file=parallel/fsdp.gin",
    )
    assert proc.returncode == 0 and '"fits": true' in proc.stdout, proc.stderr[-2000:]
    out = tmp_path / "orbax"
    proc = _run(
        installed,
        str(installed / "bin" / "meditron-convert"),
        "--to=orbax",
        f"--input={shared_data / 'stories260K_hf'}",
        f"--output={out}",
    )
    assert proc.returncode == 0 and (out / "meditron_config.json").is_file(), proc.stderr[-2000:]
    # The gin recipes and the embedded sample were installed with the package.
    proc = _run(
        installed,
        str(installed / "bin" / "python"),
        "-c",
        "from meditron_jax.resources import gin_dir; from meditron_jax.cli.quickstart import EMBEDDED;"
        "print(gin_dir()); print((gin_dir() / 'runs' / 'pretrain_7b.gin').is_file(),"
        " (EMBEDDED / 'pubmedqa' / 'ori_pqal.json.gz').is_file())",
    )
    assert proc.returncode == 0 and proc.stdout.split()[-2:] == ["True", "True"], proc.stdout + proc.stderr
    assert str(installed) in proc.stdout.split()[0]


def test_no_script_touches_sys_path():
    offenders = [p for p in (ROOT / "scripts").glob("*.py") if "sys.path" in p.read_text()]
    offenders += [p for p in (ROOT / "meditron_jax").rglob("*.py") if "sys.path.insert" in p.read_text()]
    assert not offenders
