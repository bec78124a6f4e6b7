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


def cpu_bench_process(default_threads: int = 1) -> list[int]:
    """A CPU bench's first step, before it imports jax: the project importable from a checkout, jax on the CPU
    and quiet, the process pinned to ``--threads`` cores. Returns the cores it may use."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    return bind_cores(threads_from_argv(sys.argv[1:], default_threads))
