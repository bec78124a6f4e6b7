"""scripts/launch_tpu.sh: the gcloud commands it prints with --dry_run (one v5p-256 slice, two slices), the
quoting of gin flags through two shells, and the real flow against a stand-in gcloud."""

import json
import os
import pathlib
import shlex
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "launch_tpu.sh"

# Gin flags as a user types them after `--`: quotes inside, a space, a dict, a literal $ that no shell may expand.
USER_ARGS = [
    "--gin.MODEL_DIR='gs://meditron-bucket/runs/70b'",
    "--gin.curated_data_dir.path='gs://meditron-bucket/gap replay'",
    "--gin.TrainConfig.model_overrides={'dtype': 'bfloat16'}",
    '--gin.TrainConfig.model_dir="$HOME/not-expanded"',
]
ZONE = ["--zone=us-east5-a", "--project=meditron-proj"]


@pytest.fixture(autouse=True)
def no_real_gcloud(tmp_path_factory, monkeypatch):
    """A gcloud that fails on any call comes first on PATH: a dry run must never reach a real one."""
    fake = tmp_path_factory.mktemp("guard")
    (fake / "gcloud").write_text('#!/bin/sh\necho "real gcloud called: $*" >&2\nexit 99\n')
    (fake / "gcloud").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")


def launch(*args, env=None):
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60, env=env, cwd=ROOT)


def commands(stdout: str) -> list[list[str]]:
    """The printed commands ('+ ...' lines), split as a POSIX shell would (comments dropped)."""
    return [shlex.split(line[2:], comments=True) for line in stdout.splitlines() if line.startswith("+ ")]


def remote_command(cmd: list[str]) -> str:
    flags = [w for w in cmd if w.startswith("--command=")]
    assert len(flags) == 1, cmd
    return flags[0][len("--command=") :]


def dry_run(*extra):
    out = launch("--dry_run", "--name", "meditron-70b", "--zone", "us-east5-a", "--project", "meditron-proj", *extra)
    assert out.returncode == 0, out.stderr
    return commands(out.stdout)


def test_one_v5p_256_slice():
    cmds = dry_run("--slice", "meditron-70b-pretrain", "--", *USER_ARGS)
    qr = ["gcloud", "compute", "tpus", "queued-resources"]
    assert cmds[0] == [*qr, "describe", "meditron-70b", *ZONE, "--format=value(state.state)"]
    assert cmds[1] == [
        *qr,
        "create",
        "meditron-70b",
        *ZONE,
        "--accelerator-type=v5p-256",
        "--runtime-version=v2-alpha-tpuv5",
        "--node-id=meditron-70b",
    ]
    ssh = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "meditron-70b", *ZONE, "--worker=all"]
    install, train = cmds[2], cmds[3]
    assert install[: len(ssh)] == ssh and train[: len(ssh)] == ssh
    assert "python3.11 -m venv ~/meditron_venv" in remote_command(install)
    assert "~/meditron_venv/bin/python -m pip install -q 'meditron_jax[tpu] @ git+" in remote_command(install)
    # The remote shell splits --command back into exactly the program, the preset's gin files and the user's flags.
    assert shlex.split(remote_command(train)) == [
        "~/meditron_venv/bin/python",
        "-m",
        "meditron_jax.cli.train",
        "--gin_file=models/meditron_70b.gin",
        "--gin_file=runs/pretrain_70b.gin",
        *USER_ARGS,
    ]
    assert len(cmds) == 4


def test_two_slices():
    cmds = dry_run("--accelerator_type", "v5p-256", "--runtime_version", "v2-alpha-tpuv5", "--num_slices", "2",
                   "--spot", "--", "--gin_file=runs/pretrain_70b.gin", *USER_ARGS)  # fmt: skip
    create = cmds[1]
    assert create[4:6] == ["create", "meditron-70b"]
    assert "--node-count=2" in create and "--node-prefix=meditron-70b" in create and "--spot" in create
    assert not any(w.startswith("--node-id") for w in create)
    ssh = [c for c in cmds if c[3:5] == ["tpu-vm", "ssh"]]
    assert [c[5] for c in ssh] == ["meditron-70b-0", "meditron-70b-1"] * 2  # install on both, then run on both
    runs = [shlex.split(remote_command(c)) for c in ssh[2:]]
    expected = [
        "~/meditron_venv/bin/python",
        "-m",
        "meditron_jax.cli.train",
        "--gin_file=runs/pretrain_70b.gin",
        *USER_ARGS,
    ]
    assert runs == [expected, expected]
    assert all("--worker=all" in c for c in ssh)


def test_remote_command_runs_in_a_real_shell(tmp_path):
    """bash, not shlex, runs the remote --command (~ expanded): a stand-in python records the argv it receives."""
    cmds = dry_run("--slice", "meditron-7b-pretrain", "--env", "XLA_FLAGS=--xla_dump_to=/tmp/a b", "--", *USER_ARGS)
    remote = remote_command(cmds[-1])
    fake = tmp_path / "meditron_venv" / "bin"  # ~/meditron_venv/bin with HOME=tmp_path
    fake.mkdir(parents=True)
    log = tmp_path / "argv.json"
    (fake / "python").write_text(
        f'#!/bin/sh\nprintf "%s\\n" "$XLA_FLAGS" > {tmp_path}/env.txt\n'
        f"exec {sys.executable} -c "
        f'"import json, sys; json.dump(sys.argv[1:], open({str(log)!r}, \'w\'))" "$@"\n'
    )
    (fake / "python").chmod(0o755)
    env = dict(os.environ, HOME=str(tmp_path))
    subprocess.run(["bash", "-c", remote], check=True, env=env, timeout=30)
    argv = json.loads(log.read_text())
    assert argv[:2] == ["-m", "meditron_jax.cli.train"]
    assert argv[2:4] == ["--gin_file=models/meditron_7b.gin", "--gin_file=runs/pretrain_7b.gin"]
    assert argv[4:] == USER_ARGS
    assert (tmp_path / "env.txt").read_text() == "--xla_dump_to=/tmp/a b\n"


def test_eval_and_staged_data():
    cmds = dry_run("--accelerator_type", "v5p-8", "--runtime_version", "v2-alpha-tpuv5", "--eval",
                   "--stage_data", "gs://meditron-bucket/shared_data/", "--",
                   "--checkpoint", "gs://meditron-bucket/runs/7b", "--benchmark", "medqa_4opt")  # fmt: skip
    assert "gcloud storage cp -r 'gs://meditron-bucket/shared_data/*' ~/meditron_shared_data/" in remote_command(
        cmds[2]
    )
    run = remote_command(cmds[3])
    assert run.startswith("export MEDITRON_SHARED_DATA=~/meditron_shared_data && ")
    assert shlex.split(run.split(" && ", 1)[1]) == [
        "~/meditron_venv/bin/python", "-m", "meditron_jax.eval.cli",
        "--checkpoint", "gs://meditron-bucket/runs/7b", "--benchmark", "medqa_4opt",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--zone", "z", "--slice", "meditron-70b-pretrain"], "--name is required"),
        (["--name", "n", "--slice", "meditron-70b-pretrain"], "--zone is required"),
        (["--name", "n", "--zone", "z", "--slice", "nope"], "--slice 'nope' is not in"),
        (["--name", "n", "--zone", "z", "--accelerator_type", "v5p-8"], "--runtime_version (or --slice) is required"),
        (["--name", "n", "--zone", "z", "--slice", "meditron-70b-pretrain", "--num_slices", "0"], "--num_slices"),
        (["--name", "N_1", "--zone", "z", "--slice", "meditron-70b-pretrain"], "lower-case letters"),
        (["--name", "n", "--zone", "z", "--accelerator_type", "v5p-8", "--runtime_version", "r"], "no gin file"),
        (["--name", "n", "--zone", "z", "--env", "no-equals", "--slice", "meditron-70b-pretrain"], "KEY=VALUE"),
        (["--name", "n", "--zone", "z", "--gin_file=x.gin"], "unknown option --gin_file=x.gin"),
    ],
)
def test_bad_arguments_are_named(args, message):
    out = launch("--dry_run", *args)
    assert out.returncode == 2
    assert message in out.stderr
    assert "+ gcloud" not in out.stdout or "create" not in out.stdout


def _stand_in_gcloud(tmp_path, accelerator):
    """A gcloud that logs its calls; the queued resource exists, ACTIVE, with ``accelerator``."""
    fake = tmp_path / "bin"
    fake.mkdir()
    calls = tmp_path / "calls.txt"
    (fake / "gcloud").write_text(
        f'#!/bin/sh\nprintf "%s\\n" "$*" >> {calls}\n'
        'case "$*" in\n'
        f'  *"queued-resources describe"*acceleratorType*) echo {accelerator} ;;\n'
        '  *"queued-resources describe"*) echo ACTIVE ;;\n'
        "esac\n"
    )
    (fake / "gcloud").chmod(0o755)
    return dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}"), calls


def test_an_existing_slice_of_another_size_is_refused(tmp_path):
    env, calls = _stand_in_gcloud(tmp_path, "v5p-128")
    out = launch("--name", "meditron-70b", "--zone", "z", "--slice", "meditron-70b-pretrain", env=env)
    assert out.returncode == 2
    assert "meditron-70b is a v5p-128, not the v5p-256 asked for" in out.stderr
    assert "tpu-vm ssh" not in calls.read_text()


def test_reuses_an_active_slice_with_a_stand_in_gcloud(tmp_path):
    """Without --dry_run: an existing ACTIVE queued resource is reused (no create), then install and run."""
    env, calls = _stand_in_gcloud(tmp_path, "v5p-128")
    out = launch("--name", "meditron-7b", "--zone", "us-east5-a", "--slice", "meditron-7b-pretrain",
                 "--", "--gin.MODEL_DIR='gs://b/r'", env=env)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "reusing it" in out.stdout
    lines = calls.read_text().splitlines()
    assert not any("queued-resources create" in line for line in lines)
    ssh = [line for line in lines if "tpu-vm ssh meditron-7b" in line]
    assert len(ssh) == 2 and "pip install" in ssh[0] and "meditron_jax.cli.train" in ssh[1]
