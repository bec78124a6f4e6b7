"""meditron_jax.host_memory: with freed memory reused, a jitted program's large temporary stops page-faulting
on every call; without it (the control), it faults about once per 4 KiB page of the temporary each call."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from meditron_jax import host_memory

# A fresh interpreter: the arena setting must be made before XLA's threads exist.
PROBE = r"""
import json, resource, sys
from meditron_jax.host_memory import reuse_freed_memory
applied = reuse_freed_memory()
import jax, jax.numpy as jnp

@jax.jit
def f(a, b, v):
    return jnp.exp(a[:, None] * b[None, :]) @ v  # a [4096, 4096] float32 temporary: 64 MiB, 16,384 pages

a = jnp.linspace(0.0, 1.0, 4096)
v = jnp.ones((4096, 8))
for _ in range(40):  # warm-up: glibc's heap settles into blocks that fit (docs/performance.md, third round)
    f(a, a, v).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    f(a, a, v).block_until_ready()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"applied": applied, "faults_in_20_calls": faults}))
"""
PAGES = 4096 * 4096 * 4 // 4096


def _probe(opt_out: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in host_memory.GLIBC_SETTINGS and k != host_memory.OPT_OUT}
    env["JAX_PLATFORMS"] = "cpu"
    if opt_out:
        env[host_memory.OPT_OUT] = "default"
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


GLIBC = host_memory.platform.libc_ver()[0] == "glibc"


def test_reused_memory_removes_the_per_call_page_faults():
    reused, default = _probe(opt_out=False), _probe(opt_out=True)
    if not GLIBC:  # another C library: the function leaves malloc alone and says so
        assert reused["applied"] is False
        return
    assert reused["applied"] is True and default["applied"] is False
    # Default malloc: the temporary is mmap'd afresh on each call, so each of its pages faults again.
    assert default["faults_in_20_calls"] > 18 * PAGES, default
    # Reused: the freed block is handed back without touching the kernel. The call's small output can still
    # split the freed block and make the heap grow once more (seen on up to 3 of 10 calls after the warm-up),
    # so up to a quarter of the calls may fault.
    assert reused["faults_in_20_calls"] < 5 * PAGES, reused


def test_opt_out_leaves_malloc_and_the_environment_alone(monkeypatch):
    monkeypatch.setenv(host_memory.OPT_OUT, "default")
    for key in host_memory.GLIBC_SETTINGS:
        monkeypatch.delenv(key, raising=False)
    assert host_memory.reuse_freed_memory() is False
    assert not any(key in os.environ for key in host_memory.GLIBC_SETTINGS)


def test_the_command_line_tools_apply_it_on_import():
    env = {k: v for k, v in os.environ.items() if k not in host_memory.GLIBC_SETTINGS and k != host_memory.OPT_OUT}
    code = "import os, meditron_jax.cli; print(os.environ.get('MALLOC_ARENA_MAX'), os.environ.get('MALLOC_MMAP_MAX_'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == (["1", "0"] if GLIBC else ["None", "None"])
