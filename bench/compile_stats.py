"""A pytest plugin: how long each test process spends tracing, lowering and compiling with XLA.

    PYTHONPATH=bench bash scripts/test.sh -q -p compile_stats

JAX reports each compile through ``jax.monitoring``. At the end of the session every process (the main one and
each pytest-xdist worker) appends its totals, the jitted functions that took longest to compile and the tests
that compiled longest to ``$MEDITRON_COMPILE_STATS`` (default ``compile_stats.txt`` in the current folder).
Processes the tests start themselves are not counted. docs/performance.md, "Where the suite's time goes".
"""

from __future__ import annotations

import collections
import os

import jax

_PREFIX = "/jax/core/compile/"
_BACKEND = _PREFIX + "backend_compile_duration"

_seconds: collections.Counter = collections.Counter()
_counts: collections.Counter = collections.Counter()
_by_function: collections.Counter = collections.Counter()
_by_test: collections.Counter = collections.Counter()
_current_test = ["(no test)"]


def _on_duration(event: str, duration: float, fun_name: str | None = None, **_) -> None:
    if not event.startswith(_PREFIX):
        return
    _seconds[event] += duration
    _counts[event] += 1
    if event == _BACKEND:
        _by_function[fun_name or "?"] += duration
        _by_test[_current_test[0]] += duration


jax.monitoring.register_event_duration_secs_listener(_on_duration)


def pytest_runtest_setup(item):
    _current_test[0] = item.nodeid


def pytest_sessionfinish(session):
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    lines = [f"== process {os.getpid()} ({worker})"]
    lines += [f"{s:9.2f} s {_counts[e]:6d}  {e[len(_PREFIX) :]}" for e, s in _seconds.most_common()]
    lines += [f"{s:9.2f} s  compiling {name}" for name, s in _by_function.most_common(20)]
    lines += [f"{s:9.2f} s  compiling in {test}" for test, s in _by_test.most_common(20)]
    with open(os.environ.get("MEDITRON_COMPILE_STATS", "compile_stats.txt"), "a") as f:
        f.write("\n".join(lines) + "\n")
