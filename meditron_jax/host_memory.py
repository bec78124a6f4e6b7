"""Keep freed host memory in the process, so that XLA:CPU's per-step buffers do not page-fault every step.

XLA:CPU allocates each execution's buffers (a training step's temporaries: ~4 GB for the CPU benchmark model)
from glibc's malloc and frees them when the step ends. Allocations that large are served by ``mmap`` and given
back with ``munmap``, so the next step touches fresh pages: about 1.1 million page faults (each a kernel entry
and a zeroed 4 KiB page) per step of ``bench/train_throughput.py``, several seconds of a 7-10 s step on a
2-core machine (docs/performance.md, "Third round"). Raising the mmap threshold is not enough: glibc's
per-thread arenas cannot grow past 64 MiB and fall back to ``mmap`` for anything larger, and XLA allocates
from its worker threads. So this asks glibc for one arena, no ``mmap`` chunks and no trimming: freed blocks
stay in the heap and the next step reuses them without a fault. The resident set then stays at its high-water
mark instead of shrinking between steps, as with jemalloc/tcmalloc, which PyTorch's CPU guides recommend for
the same reason. It can also grow, by one step's temporaries, when a step starts before the previous step's
temporaries are freed (they appear to be freed asynchronously, after the outputs are ready): measured up to about
twice the first step's resident set in the first tens of steps, then flat (docs/performance.md, "Fifth round").

The settings must be made before the threads that allocate exist (glibc fixes the arena limit on first use),
so the command-line tools apply them when ``meditron_jax.cli`` is imported and the benchmarks first thing; in
a notebook, call :func:`reuse_freed_memory` before the first JAX computation (or start Python with the
environment variables of :data:`GLIBC_SETTINGS`). ``MEDITRON_HOST_MALLOC=default`` leaves malloc alone.
"""

from __future__ import annotations

import ctypes
import os
import platform

# glibc's mallopt parameters (malloc.h) and the environment variables glibc reads at start-up for the same.
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
GLIBC_SETTINGS = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 62)}
OPT_OUT = "MEDITRON_HOST_MALLOC"

_applied = False


def reuse_freed_memory(*, children: bool = True) -> bool:
    """Make glibc keep and reuse freed memory (see the module docstring). Returns whether it is in effect.

    ``children``: also export :data:`GLIBC_SETTINGS` so that subprocesses (test workers, a peer's benchmark
    run) start with the same allocator behaviour. A no-op off glibc, or when ``MEDITRON_HOST_MALLOC=default``."""
    global _applied
    if os.environ.get(OPT_OUT, "").lower() == "default" or platform.libc_ver()[0] != "glibc":
        return False
    if not _applied:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        # A trim threshold of -1 turns trimming off (mallopt(3)).
        for param, value in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)):
            if libc.mallopt(param, value) != 1:
                raise OSError(f"glibc mallopt({param}, {value}) failed; set {OPT_OUT}=default to skip it")
        _applied = True
    if children:
        for key, setting in GLIBC_SETTINGS.items():
            os.environ.setdefault(key, setting)
    return True


def release_freed_memory() -> bool:
    """Give the heap's free pages back to the system now (glibc's ``malloc_trim``). For a process that runs
    several jobs one after another (the quickstart's stages): :func:`reuse_freed_memory` keeps a finished
    job's freed buffers for its next step, which will not come, and the next job's buffers do not always fit
    in them. Returns whether memory was released (False off glibc)."""
    if platform.libc_ver()[0] != "glibc":
        return False
    return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
