"""Run a bench process on N cores: pin it before jax starts.

XLA:CPU sizes its thread pool from the process's CPU affinity, and has no flag for it:
``--xla_cpu_multi_thread_eigen=false`` leaves YNNPACK's matmuls on the whole pool (a 4096² matmul used 1.96
cores with it, 1.00 pinned; docs/performance.md, Decode, fourth round).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def threads_from_argv(argv: list[str], default: int = 1) -> int:
    """The value of ``--threads`` in ``argv`` (read before argparse runs, since pinning must precede jax)."""
    for i, a in enumerate(argv):
        if a == "--threads" and i + 1 < len(argv):
            return int(argv[i + 1])
        if a.startswith("--threads="):
            return int(a.split("=", 1)[1])
    return default


def bind_cores(n: int) -> list[int]:
    """Pin this process to its first ``n`` allowed cores (0: leave it); the cores it may use."""
    cores = sorted(os.sched_getaffinity(0))
    if n:
        cores = cores[:n]
        os.sched_setaffinity(0, cores)
    return cores


def cpu_bench_process(default_threads: int = 1, turns_of_milliseconds: bool = False) -> list[int]:
    """A CPU bench's first step, before it imports jax: the project importable from a checkout, jax on the CPU
    and quiet, the process pinned to ``--threads`` cores. Returns the cores it may use.

    ``turns_of_milliseconds``: the bench times calls of a few ms, taking turns with torch's. torch's OpenMP
    workers then keep spinning about 10 ms after each call, on the cores the next form is timed on (two
    cores, bench-134m's decode attention at batch 16: ours 1.47-1.94 ms taking turns against 1.18-1.36 alone).
    ``OMP_WAIT_POLICY=PASSIVE`` puts them to sleep instead; torch's own times were level or better with it
    (docs/performance.md, Decode, eleventh round). Not for benches whose forms run for seconds."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if turns_of_milliseconds:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read when torch's OpenMP starts
    return bind_cores(threads_from_argv(sys.argv[1:], default_threads))
