"""Compiled XLA:CPU kernels as FFI handlers: attention that splits (batch, heads) between the cores, decode's
attention over the KV cache, and the dense layers' product cut into one piece per core.

XLA:CPU splits a batched product's matrices between its threads, not its batch, so the small per-head
products of causal attention ran on one core of two (docs/performance.md, fifth round). ``cpu_native.cc``
splits the (batch, KV head) units between threads instead, each running its causal blocks' products through
a single-threaded sgemm: numpy's bundled OpenBLAS, so nothing beyond numpy is needed at run time. The same
sgemm runs the MLP's and the output head's products faster than XLA:CPU's dots (`matmul`; ninth round), and
a register-tiled kernel runs decode's thin ones (2 to 32 rows; decode, seventh round).

The C++ is compiled on first use with the system's C++ compiler (``$CXX``, else ``g++``) into
``$MEDITRON_JAX_CACHE`` (default ``~/.cache/meditron_jax``), one library per source, flags and CPU, written
atomically; libraries unused for a week are removed (`prune_unused`). Where that cannot happen (no compiler,
no OpenBLAS in numpy, not Linux, or ``MEDITRON_CPU_NATIVE=off``), `available()` is False, says why once in
the log, and "auto" falls back to XLA (`xla.cpu_attention`, or the blockwise loop for long sequences, and
XLA's dots).
"""

from __future__ import annotations

import ctypes
import functools
import glob
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_native.cc")
FLAGS = ("-O3", "-march=native", "-ffast-math", "-std=c++17", "-shared", "-fPIC")
_FORWARD, _BACKWARD = "meditron_cpu_attention_fwd", "meditron_cpu_attention_bwd"
_DECODE = "meditron_cpu_decode_attention"
_MATMUL = "meditron_cpu_matmul"


def _openblas() -> str | None:
    libs = Path(np.__file__).resolve().parent.parent / "numpy.libs"
    found = sorted(glob.glob(str(libs / "libscipy_openblas64_*.so")))
    return found[0] if found else None


def _cpu_key() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    lines = [line for line in text.splitlines() if line.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(lines)))


def cache_dir() -> Path:
    return Path(os.environ.get("MEDITRON_JAX_CACHE") or Path.home() / ".cache" / "meditron_jax")


def _build(compiler: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        cmd = [compiler, *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", str(out), "-ldl", "-lpthread"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
        os.replace(out, target)  # atomic: a concurrent build or a killed one never leaves half a library


# A library no process has loaded for this long is removed from the cache (each load marks its own library
# used). Libraries of other sources, flags, CPUs or jax versions would otherwise pile up with every change.
UNUSED_FOR_S = 7 * 24 * 3600


def prune_unused(current: Path, now: float | None = None) -> list[Path]:
    """Marks ``current`` as used now and deletes the cache's other libraries unused for ``UNUSED_FOR_S``.
    A process that has one loaded keeps it (the file is only unlinked); one that starts later rebuilds it.
    Returns what was deleted; errors (a read-only cache, a concurrent delete) are ignored."""
    now = time.time() if now is None else now
    deleted = []
    try:
        os.utime(current, (now, now))
        for lib in current.parent.glob("cpu_native-*.so"):
            if lib != current and now - lib.stat().st_mtime > UNUSED_FOR_S:
                lib.unlink()
                deleted.append(lib)
    except OSError:
        pass
    return deleted


_LIBRARY: list[ctypes.CDLL] = []  # the loaded library, once `_load` succeeded


@functools.cache
def _load() -> tuple[bool, str]:
    """(loaded, why not). Compiles and registers the handlers once per process."""
    if os.environ.get("MEDITRON_CPU_NATIVE", "").lower() in ("0", "off", "false", "no"):
        return False, "turned off by MEDITRON_CPU_NATIVE"
    if not sys.platform.startswith("linux"):
        return False, f"not on Linux ({sys.platform})"
    blas = _openblas()
    if blas is None:
        return False, "numpy has no bundled OpenBLAS (numpy.libs/libscipy_openblas64_*.so)"
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        return False, f"no C++ compiler ({os.environ.get('CXX', 'g++')!r} not found; set CXX)"
    key = hashlib.sha256(
        b"\0".join([SOURCE.read_bytes(), " ".join(FLAGS).encode(), _cpu_key().encode(), jax.__version__.encode()])
    ).hexdigest()[:16]
    target = cache_dir() / f"cpu_native-{key}.so"
    try:
        if not target.exists():
            _build(compiler, target)
        lib = ctypes.CDLL(str(target))
    except (OSError, RuntimeError) as e:
        return False, f"could not build or load {target}: {e}"
    prune_unused(target)
    status = lib.mj_init(blas.encode())
    if status != 0:
        return False, f"could not load sgemm from {blas} (mj_init returned {status})"
    jax.ffi.register_ffi_target(_FORWARD, jax.ffi.pycapsule(lib.MjAttentionForward), platform="cpu")
    jax.ffi.register_ffi_target(_BACKWARD, jax.ffi.pycapsule(lib.MjAttentionBackward), platform="cpu")
    jax.ffi.register_ffi_target(_DECODE, jax.ffi.pycapsule(lib.MjDecodeAttention), platform="cpu")
    jax.ffi.register_ffi_target(_MATMUL, jax.ffi.pycapsule(lib.MjMatmul), platform="cpu")
    _LIBRARY.append(lib)
    return True, ""


def available() -> bool:
    """Whether the kernel is built and registered (building it on the first call)."""
    ok, why = _load()
    if not ok:
        _warn_once(why)
    return ok


def why_unavailable() -> str:
    return _load()[1]


@functools.cache
def _warn_once(why: str) -> None:
    log.warning("cpu_native attention unavailable, using XLA's: %s", why)


def supports(q, k, v) -> bool:
    """Float32 (the kernel's products are float32 sgemm), and no more queries than keys."""
    return all(x.dtype == jnp.float32 for x in (q, k, v)) and q.shape[1] <= k.shape[1]


def cpu_native_attention(q, k, v, *, causal=True, segment_ids=None, softmax_scale):
    """Same contract as `xla.reference_attention` (token-major q [b, q_len, heads, d], k, v [b, kv_len,
    kv_heads, d]); float32. Call `available()` first."""
    if q.shape[1] > k.shape[1]:
        raise ValueError(f"cpu_native attention: q_len {q.shape[1]} must not exceed kv_len {k.shape[1]}")
    has_segments = segment_ids is not None
    seg = segment_ids.astype(jnp.int32) if has_segments else jnp.zeros((1,), jnp.int32)
    return _attention(q, k, v, seg, bool(causal), has_segments, float(softmax_scale))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _attention(q, k, v, seg, causal, has_segments, scale):
    return _forward(q, k, v, seg, causal, has_segments, scale)[0]


def _forward(q, k, v, seg, causal, has_segments, scale):
    b, s, h, _ = q.shape  # token-major; the log-sum-exp is [b, heads, q_len]
    outs = (jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct((b, h, s), jnp.float32))
    call = jax.ffi.ffi_call(_FORWARD, outs, vmap_method="sequential")
    return call(q, k, v, seg, causal=causal, has_segments=has_segments, scale=np.float32(scale))


def _attention_fwd(q, k, v, seg, causal, has_segments, scale):
    out, lse = _forward(q, k, v, seg, causal, has_segments, scale)
    return out, (q, k, v, seg, out, lse)


def _attention_bwd(causal, has_segments, scale, res, dout):
    q, k, v, seg, out, lse = res
    shapes = tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v))
    call = jax.ffi.ffi_call(_BACKWARD, shapes, vmap_method="sequential")
    dq, dk, dv = call(q, k, v, seg, out, lse, dout, causal=causal, has_segments=has_segments, scale=np.float32(scale))
    return dq, dk, dv, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def decode_attention(q, k_cache, v_cache, valid, first_slot, *, softmax_scale):
    """Decode's attention over the head-major cache, the (batch, KV head) units split between the cores and
    only the filled slots read. q: [b, new, heads, d]; k_cache, v_cache: [b, kv_heads, slots, d] (or
    [kv_heads, slots, d] for one row); valid: bool [b, slots]; first_slot: int32 scalar, the first new
    token's slot. New token t sees slot j when ``valid[:, j]`` and j <= first_slot + t; one that sees none
    gives zeros. The same result as `xla.head_major_attention` with that mask; float32, no gradient."""
    call = jax.ffi.ffi_call(_DECODE, jax.ShapeDtypeStruct(q.shape, jnp.float32), vmap_method="sequential")
    return call(q, k_cache, v_cache, valid, jnp.asarray(first_slot, jnp.int32), scale=np.float32(softmax_scale))


def _product(a, b, trans_a=False, trans_b=False, panels=0):
    m = a.shape[1] if trans_a else a.shape[0]
    n = b.shape[0] if trans_b else b.shape[1]
    call = jax.ffi.ffi_call(_MATMUL, jax.ShapeDtypeStruct((m, n), jnp.float32), vmap_method="sequential")
    return call(a, b, trans_a=trans_a, trans_b=trans_b, panels=np.int64(panels))


def panel_width() -> int:
    """Columns per panel of the thin kernel as built here (16 with AVX2, 32 with AVX-512): the width that
    `matmul_panels` takes (`kernels.pack_panels`). Call `available()` first."""
    _load()
    return int(_LIBRARY[0].mj_thin_panel_cols())


def matmul_panels(x, w, panels: int):
    """x [m, k] @ W [k, n] in float32, with ``w`` holding W panel-major (`kernels.pack_panels` with width
    ``panels``, which must be `panel_width()`): up to 128 rows the thin kernel, in blocks of 32 rows each
    streaming the panels once; beyond, the kernel unpacks w into a row-major copy for the sgemm pieces.
    No gradient (the layout is the inference engine's)."""
    if panels != panel_width():
        raise ValueError(f"cpu_native: weights packed in panels of {panels} columns; this build takes {panel_width()}")
    return _product(x, w, panels=panels)


@jax.custom_vjp
def matmul(x, w):
    """x [m, k] @ w [k, n] in float32: up to 32 rows, a register-tiled kernel with the columns split between
    the cores; beyond, the product cut into one piece per core (single-threaded sgemm). Its gradients are
    the same kind of call: dx = dy wᵀ, dw = xᵀ dy. Call `available()` first."""
    return _product(x, w)


def _matmul_fwd(x, w):
    return _product(x, w), (x, w)


def _matmul_bwd(res, dy):
    x, w = res
    return _product(dy, w, trans_b=True), _product(x, dy, trans_a=True)


matmul.defvjp(_matmul_fwd, _matmul_bwd)
