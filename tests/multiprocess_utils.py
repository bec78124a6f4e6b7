"""Run a worker script as two jax.distributed processes of CPU devices and collect each one's RESULT line."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_two_processes(script: Path, cwd: Path, *args: str, devices_per_process: int = 4, timeout: int = 300):
    """Start ``script ADDRESS PROCESS_ID *args`` twice; return the JSON after ``RESULT `` of each, in order.

    The workers see ``devices_per_process`` CPU devices each and no inherited jax.distributed settings."""
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_per_process}",
        "PYTHONPATH": str(ROOT),
        "JAX_NUM_PROCESSES": "",
        "JAX_PROCESS_ID": "",
        "JAX_COORDINATOR_ADDRESS": "",
    }
    with socket.socket() as s:
        s.bind(("localhost", 0))
        address = f"localhost:{s.getsockname()[1]}"
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), address, str(i), *args],
            env=env,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    results = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("multi-process workers timed out")
        assert p.returncode == 0, out[-3000:]
        results.append(json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:]))
    return results


ISOLATED = "MEDITRON_ISOLATED_TEST"  # set in the fresh interpreter that run_alone starts


def run_alone(test_file: str, test_name: str, env: dict[str, str] | None = None, timeout: int = 600) -> None:
    """Run one test alone in a fresh interpreter (``env``, default this one's, plus ``ISOLATED``) and assert it
    passed; for measurements that threads or memory left behind by earlier tests in the worker would distort."""
    node = f"{test_file}::{test_name}"
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", node],
        env={**(os.environ if env is None else env), ISOLATED: "1"},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "1 passed" in run.stdout, run.stdout[-2000:]
