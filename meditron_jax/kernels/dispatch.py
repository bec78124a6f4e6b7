"""One attention entry point: picks a kernel by backend and shape, or runs the one the caller forces.

Backend: inside ``jax.set_mesh(mesh)`` the mesh's devices decide, so compiling for a TPU topology from a
CPU host selects (and shards) the TPU kernel; otherwise ``jax.default_backend()``.

A forced Pallas kernel is checked against the backend twice: at trace time when a mesh says what the
backend is, and always when the program is lowered (a ``platform_dependent`` guard whose other branch
raises). So ``eval_shape`` of a model configured for TPU works on any host, an AOT compile for a TPU
topology works without a mesh, and running the same program on CPU still fails with a clear message.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from meditron_jax.config import ATTENTION_IMPLS, MATMUL_IMPLS
from meditron_jax.kernels import cpu_native, cudnn, pallas_gpu, pallas_tpu, sharding, xla
from meditron_jax.kernels.common import Problem, Target, check_inputs, current_target, default_scale, normalise_platform

# Queries shorter than this (decode steps, short prompts) use the reference: one [q, kv] score tile is
# small, and a kernel launch plus padding to a 128-row tile would only add work.
MIN_KERNEL_Q_LEN = 128
# On CPU, float32 attention runs `cpu_native` (a compiled kernel on all cores, memory linear in length).
# Without it (other dtypes, or no compiler), whole-score attention (head-major, `xla.cpu_attention`) is
# faster than the blockwise loop while its float32 scores stay this small (bytes of batch * heads * q_len *
# kv_len); beyond, the blockwise loop's memory wins. Timings in docs/kernels.md and docs/performance.md.
CPU_REFERENCE_MAX_SCORE_BYTES = 64 * 2**20
# "auto" runs a dense product through `cpu_native.matmul` from these sizes on: measured faster than XLA:CPU's
# dots for the MLP's and the output head's weights and training's rows, not for attention's 768 × 768
# projections, nor for decode's few rows (docs/performance.md, ninth round) ...
CPU_NATIVE_MATMUL_MIN_ROWS = 256
CPU_NATIVE_MATMUL_MIN_WEIGHT = 2**20  # elements of w
# ... Thin products, 2 to 32 rows with a weight of CPU_NATIVE_THIN_MIN_WEIGHT elements or more, go to its
# register-tiled kernel: 1.0–2.4× XLA:CPU's dots with the weights streamed from memory. One row (a
# matrix-vector product) stays XLA's (docs/performance.md, decode, seventh round); the engine's panel-major
# weights (`panels`) take the kernel for any number of rows. The upper bound is cpu_native.cc's kThinMaxRows.
CPU_NATIVE_THIN_ROWS = (2, 32)
CPU_NATIVE_THIN_MIN_WEIGHT = 2**18

_SIZES_TYPES = {
    "pallas_tpu": pallas_tpu.BlockSizes,
    "pallas_gpu": pallas_gpu.BlockSizes,
    "xla_blockwise": xla.BlockwiseSizes,
}
# Platforms (as lax.platform_dependent names them) each kernel lowers for.
_KERNEL_PLATFORMS = {"pallas_tpu": ("tpu",), "pallas_gpu": ("cuda", "rocm"), "cudnn": ("cuda",)}
_BACKEND_OF = {"pallas_tpu": "tpu", "pallas_gpu": "gpu", "cudnn": "gpu"}


def attention(
    q, k, v, *, causal=True, segment_ids=None, softmax_scale=None, impl="auto", interpret=False, block_sizes=None
):
    """Multi-head / grouped-query attention.

    q: [batch, q_len, heads, head_dim]; k, v: [batch, kv_len, kv_heads, head_dim];
    segment_ids: [batch, kv_len] int, tokens attend only within their own segment (queries use the
    last q_len ids). Causal alignment is bottom-right. softmax_scale defaults to 1/sqrt(head_dim).
    impl: one of ``ATTENTION_IMPLS``; "auto" picks by backend and shape. interpret=True runs the Pallas
    kernels in the Pallas interpreter (any backend, slow; for tests). block_sizes: the chosen kernel's
    BlockSizes, or a mapping {impl: BlockSizes}; None uses the per-backend defaults.
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention impl {impl!r} is not one of {ATTENTION_IMPLS}")
    p = check_inputs(q, k, v, segment_ids, causal=causal, who=f"attention[{impl}]")
    scale = default_scale(p.head_dim, softmax_scale)
    target = current_target()
    chosen = select_impl(p, q.dtype, target) if impl == "auto" else impl
    if impl == "auto" and chosen == "cpu_native" and not cpu_native.available():
        chosen = _cpu_xla_impl(p)
    if impl != "auto":
        check_runnable(chosen, q, k, v, segment_ids, causal=causal, target=target, interpret=interpret)
    sizes = _block_sizes_for(chosen, block_sizes, target)
    kwargs = dict(causal=causal, segment_ids=segment_ids, softmax_scale=scale)
    if chosen == "xla":
        if impl == "auto" and target.platform == "cpu":
            return xla.cpu_attention(q, k, v, **kwargs)
        return xla.reference_attention(q, k, v, **kwargs)
    if chosen == "cpu_native":

        def native(q, k, v, segment_ids):
            return cpu_native.cpu_native_attention(q, k, v, causal=causal, segment_ids=segment_ids, softmax_scale=scale)

        return _per_shard(native, q, k, v, segment_ids, p)
    if chosen == "xla_blockwise":
        return xla.blockwise_attention(q, k, v, block_sizes=sizes, **kwargs)
    if chosen == "cudnn":
        return cudnn.cudnn_attention(q, k, v, **kwargs)
    if not interpret:
        q = _require_platform(q, chosen)
    flash = pallas_tpu.flash_attention if chosen == "pallas_tpu" else pallas_gpu.flash_attention

    def kernel(q, k, v, segment_ids):
        return flash(
            q, k, v, causal=causal, segment_ids=segment_ids, softmax_scale=scale, block_sizes=sizes, interpret=interpret
        )

    return _per_shard(kernel, q, k, v, segment_ids, p, whole=interpret)


def decode_attention(q, k_cache, v_cache, valid, first_slot, *, softmax_scale: float, impl: str = "auto"):
    """Decode's attention over the head-major KV cache (`model.layers.Attention`).

    q: [b, new, heads, d]; k_cache, v_cache: [b, kv_heads, slots, d], or [kv_heads, slots, d] for one row;
    valid: bool [b, slots]; first_slot: the first new token's slot. New token t sees slot j when
    ``valid[:, j]`` and j <= first_slot + t. On one CPU device in float32, with impl "auto" or "cpu_native",
    the compiled kernel (`cpu_native.decode_attention`: (batch, KV head) split between the cores, only the
    filled slots read); otherwise `xla.head_major_attention` with that mask.
    """
    if impl in ("auto", "cpu_native") and _native_decode_runs(q, k_cache):
        return cpu_native.decode_attention(q, k_cache, v_cache, valid, first_slot, softmax_scale=softmax_scale)
    b = q.shape[0]
    keys, values = k_cache.reshape(b, *k_cache.shape[-3:]), v_cache.reshape(b, *v_cache.shape[-3:])
    slots = jnp.arange(k_cache.shape[-2])
    q_slots = first_slot + jnp.arange(q.shape[1])
    mask = valid[:, None, :] & (slots[None, None, :] <= q_slots[None, :, None])
    return xla.head_major_attention(q, keys, values, mask, softmax_scale)


def _native_decode_runs(q, k_cache) -> bool:
    return _on_one_cpu_device() and q.dtype == k_cache.dtype == jnp.float32 and cpu_native.available()


def _on_one_cpu_device() -> bool:
    """The compiled kernels have no sharding rule: they run where the program has one device, a CPU."""
    mesh = jax.sharding.get_abstract_mesh()
    return (mesh.empty or math.prod(mesh.axis_sizes) == 1) and current_target().platform == "cpu"


def matmul(x, w, *, impl: str = "auto", preferred_element_type=None, panels: int = 0):
    """x [m, k] @ w [k, n]: the dense layers' product (`model.layers.dense`).

    impl "auto": `cpu_native.matmul` on one CPU device for float32, with at least ``CPU_NATIVE_MATMUL_MIN_ROWS``
    rows and ``CPU_NATIVE_MATMUL_MIN_WEIGHT`` weight elements (the product cut between the cores, each piece
    through sgemm), or ``CPU_NATIVE_THIN_ROWS`` rows and ``CPU_NATIVE_THIN_MIN_WEIGHT`` (the thin-product
    kernel); otherwise XLA. "xla": always XLA. "cpu_native": the kernel, or a ValueError saying why
    it cannot run here.

    ``panels``: ``w`` holds the weight packed by `pack_panels` with that width; the kernel takes it whatever
    its size (`cpu_native.matmul_panels`) unless impl is "xla" or the kernel cannot run here, and then XLA
    unpacks it first (a copy of the weight per call).
    """
    if impl not in MATMUL_IMPLS:
        raise ValueError(f"matmul impl {impl!r} is not one of {MATMUL_IMPLS}")
    rows = x.shape[0]
    if panels:
        if impl != "xla" and not _native_matmul_refusal(x, w, preferred_element_type):
            return cpu_native.matmul_panels(x, w, panels)
        w = unpack_panels(w, panels)
    forced = impl == "cpu_native"
    large = rows >= CPU_NATIVE_MATMUL_MIN_ROWS and w.size >= CPU_NATIVE_MATMUL_MIN_WEIGHT
    thin = CPU_NATIVE_THIN_ROWS[0] <= rows <= CPU_NATIVE_THIN_ROWS[1] and w.size >= CPU_NATIVE_THIN_MIN_WEIGHT
    if forced or (impl == "auto" and (large or thin)):
        why_not = _native_matmul_refusal(x, w, preferred_element_type)
        if not why_not:
            return cpu_native.matmul(x, w)
        if forced:
            raise ValueError(f"matmul impl 'cpu_native' cannot run here: {why_not}")
    return jnp.matmul(x, w, preferred_element_type=preferred_element_type)


def _matrix_shape(w, contract: int) -> tuple[int, int]:
    """(k, n) of a weight's 2-D view: k the product of its first ``contract`` axes."""
    k = math.prod(w.shape[:contract])
    return k, (w.size // k if k else 0)


def pack_panels(w, panels: int, contract: int = 1):
    """A dense weight in the thin kernel's panel-major layout, same shape: its 2-D view W [k, n] (k the first
    ``contract`` axes) stored as n / ``panels`` panels, each the k rows of ``panels`` consecutive columns.
    Streamed panel by panel, no two rows of W share an L1 set (docs/performance.md, decode, eighth round)."""
    k, n = _matrix_shape(w, contract)
    if panels < 1 or n % panels:
        raise ValueError(
            f"pack_panels: {n} output columns of a weight {tuple(w.shape)} do not split into panels of {panels}"
        )
    return jnp.reshape(jnp.reshape(w, (k, n // panels, panels)).transpose(1, 0, 2), w.shape)


def unpack_panels(w, panels: int, contract: int = 1):
    """The inverse of `pack_panels`: the weight as stored."""
    k, n = _matrix_shape(w, contract)
    return jnp.reshape(jnp.reshape(w, (n // panels, k, panels)).transpose(1, 0, 2), w.shape)


def _native_matmul_refusal(x, w, preferred_element_type) -> str:
    """Why `cpu_native.matmul` cannot compute this product here; "" when it can."""
    if x.ndim != 2 or w.ndim != 2:
        return f"it takes 2-D operands, got x{tuple(x.shape)} and w{tuple(w.shape)}"
    out = jnp.dtype(preferred_element_type or x.dtype)
    if not x.dtype == w.dtype == out == jnp.float32:
        return f"it computes in float32, got x {x.dtype}, w {w.dtype}, output {out}"
    if not _on_one_cpu_device():
        return "it runs on one CPU device (no mesh, or a mesh of one), not on this backend or mesh"
    if not cpu_native.available():
        return cpu_native.why_unavailable()
    return ""


def _per_shard(kernel, q, k, v, segment_ids, p: Problem, whole: bool = False):
    """``kernel(q, k, v, segment_ids)``, per shard of the current mesh's batch and heads (``shard_map``), or on
    the whole arrays without a mesh or when ``whole``."""
    mesh = jax.sharding.get_abstract_mesh()
    partition = None if whole else sharding.kernel_partition(mesh, p.batch, p.heads, p.kv_heads)
    if partition is None:
        return kernel(q, k, v, segment_ids)
    return sharding.shard_kernel(kernel, q, k, v, segment_ids, partition, mesh)


def _wrong_backend(impl: str, platform: str) -> str:
    if impl == "cudnn":
        return (
            f"attention impl 'cudnn' needs an NVIDIA GPU backend, but the backend is {platform!r} "
            "(cuDNN has no interpreter)"
        )
    return (
        f"attention impl {impl!r} needs a {_BACKEND_OF[impl].upper()} backend, but the backend is "
        f"{platform!r}; use interpret=True to run it in the Pallas interpreter"
    )


def check_runnable(impl: str, q, k, v, segment_ids, *, causal: bool, target: Target, interpret: bool):
    """Raise ValueError, naming the kernel and the reason, if ``impl`` cannot run here on these shapes.

    Pallas kernels without a mesh are only shape-checked here; the backend check happens at lowering.
    """
    if impl == "cpu_native":
        if target.platform != "cpu":
            raise ValueError(f"attention impl 'cpu_native' needs the CPU backend, not {target.platform!r}")
        if not cpu_native.supports(q, k, v):
            raise ValueError(
                f"attention impl 'cpu_native' takes float32 q, k, v with q_len <= kv_len, got {q.dtype}, "
                f"q_len {q.shape[1]}, kv_len {k.shape[1]}"
            )
        if not cpu_native.available():
            raise ValueError(f"attention impl 'cpu_native' is unavailable here: {cpu_native.why_unavailable()}")
    elif impl == "cudnn":
        # cuDNN's own checks query the local GPU while tracing, so the backend must be known now.
        if target.platform != "gpu":
            raise ValueError(_wrong_backend(impl, target.platform))
        cudnn.check_supported(q, k, v, segment_ids, causal=causal)
    elif impl in ("pallas_tpu", "pallas_gpu"):
        if target.from_mesh and target.platform != _BACKEND_OF[impl] and not interpret:
            raise ValueError(_wrong_backend(impl, target.platform))
        module = pallas_tpu if impl == "pallas_tpu" else pallas_gpu
        module.check_supported(q, k, v, segment_ids, causal=causal)


# An identity that refuses to lower or run: the "any other platform" branch of the backend guard.
_unavailable_p = Primitive("meditron_attention_kernel_unavailable")
_unavailable_p.def_abstract_eval(lambda x, *, impl: x)


def _refuse_to_run(x, *, impl):
    raise ValueError(_wrong_backend(impl, normalise_platform(jax.default_backend())))


def _refuse_to_lower(ctx, x, *, impl):
    raise ValueError(_wrong_backend(impl, "/".join(normalise_platform(p) for p in ctx.module_context.platforms)))


_unavailable_p.def_impl(_refuse_to_run)
mlir.register_lowering(_unavailable_p, _refuse_to_lower)
ad.deflinear2(_unavailable_p, lambda ct, x, *, impl: [_unavailable_p.bind(ct, impl=impl)])
batching.primitive_batchers[_unavailable_p] = lambda args, dims, **kw: (_unavailable_p.bind(args[0], **kw), dims[0])


def _identity(x):
    return x


def _require_platform(x, impl: str):
    """``x`` on the kernel's platforms; on any other, a ValueError when the program is lowered or run."""
    branches = dict.fromkeys(_KERNEL_PLATFORMS[impl], _identity)
    return lax.platform_dependent(x, default=functools.partial(_unavailable_p.bind, impl=impl), **branches)


def select_impl(p: Problem, dtype, target: Target) -> str:
    """The "auto" choice for a problem on a backend (never the interpreter)."""
    if p.q_len < MIN_KERNEL_Q_LEN:
        return "xla"
    if target.platform == "tpu":
        return "pallas_tpu" if p.head_dim <= pallas_tpu.MAX_HEAD_DIM else "xla_blockwise"
    if target.platform == "gpu":
        half = jnp.dtype(dtype) in cudnn.SUPPORTED_DTYPES
        if half and p.head_dim % 8 == 0 and p.head_dim <= cudnn.MAX_HEAD_DIM and not cudnn.needs_dense_mask(p):
            return "cudnn"
        if p.head_dim <= pallas_gpu.MAX_HEAD_DIM and jnp.dtype(dtype) != jnp.float64:
            return "pallas_gpu"
        return "xla_blockwise"
    if jnp.dtype(dtype) == jnp.float32 and p.q_len <= p.kv_len:
        return "cpu_native"  # when it cannot be built, `attention` falls back to `_cpu_xla_impl`
    return _cpu_xla_impl(p)


def _cpu_xla_impl(p: Problem) -> str:
    score_bytes = p.batch * p.heads * p.q_len * p.kv_len * 4
    return "xla" if score_bytes <= CPU_REFERENCE_MAX_SCORE_BYTES else "xla_blockwise"


def _block_sizes_for(impl: str, block_sizes, target: Target):
    if isinstance(block_sizes, Mapping):
        block_sizes = block_sizes.get(impl)
    expected = _SIZES_TYPES.get(impl)
    if block_sizes is not None:
        if expected is None or not isinstance(block_sizes, expected):
            wanted = "no block sizes" if expected is None else f"{expected.__module__}.{expected.__name__}"
            raise ValueError(f"attention impl {impl!r} takes {wanted}, got {type(block_sizes).__name__}")
        return block_sizes
    if impl == "pallas_tpu":
        return pallas_tpu.default_block_sizes(target.device_kind)
    return None


__all__ = [
    "CPU_NATIVE_MATMUL_MIN_ROWS",
    "CPU_NATIVE_MATMUL_MIN_WEIGHT",
    "CPU_REFERENCE_MAX_SCORE_BYTES",
    "MIN_KERNEL_Q_LEN",
    "Target",
    "attention",
    "check_runnable",
    "current_target",
    "matmul",
    "pack_panels",
    "unpack_panels",
    "select_impl",
]
