"""Attention: the float64 references, the XLA paths, and dispatch (selection and error messages).

Also holds the helpers the other ``test_kernels_*`` files import. Tolerances: max |error| / max |reference|
at most 1e-5 for float32 inputs and 2e-2 for bfloat16, forward and all three gradients, against the XLA
reference run in float64 (itself checked against an independent numpy float64 implementation).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meditron_jax import kernels
from meditron_jax.kernels import cpu_native, dispatch, pallas_gpu, pallas_tpu, xla
from meditron_jax.kernels.common import Problem

F32_TOL = 1e-5  # max |error| / max |reference|, float32 inputs
BF16_TOL = 2e-2  # the same for bfloat16 inputs (8-bit mantissa on q, k, v, p and the output)


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    batch: int
    q_len: int
    kv_len: int
    heads: int
    kv_heads: int
    head_dim: int
    causal: bool
    segments: str | None  # None, "packed" (contiguous runs), "scattered" (ids in any order)
    dtype: str = "float32"

    def __str__(self):
        return self.name


def make_inputs(case: Case, seed: int = 0):
    """q, k, v, output cotangent (all ``case.dtype``) and int32 segment ids (or None)."""
    rng = np.random.default_rng(seed)
    dt = jnp.dtype(case.dtype)
    q = rng.standard_normal((case.batch, case.q_len, case.heads, case.head_dim))
    k = rng.standard_normal((case.batch, case.kv_len, case.kv_heads, case.head_dim))
    v = rng.standard_normal((case.batch, case.kv_len, case.kv_heads, case.head_dim))
    ct = rng.standard_normal((case.batch, case.q_len, case.heads, case.head_dim))
    seg = None
    if case.segments == "packed":
        seg = np.sort(rng.integers(0, 4, (case.batch, case.kv_len)), axis=1)
    elif case.segments == "scattered":
        seg = rng.integers(0, 3, (case.batch, case.kv_len))
    arrays = [jnp.asarray(x, dt) for x in (q, k, v, ct)]
    return (*arrays, None if seg is None else jnp.asarray(seg, jnp.int32))


def numpy_attention(q, k, v, *, causal, segment_ids, scale):
    """Independent float64 attention written from the definition (loops, -inf masking)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, q_len, heads, d = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    groups = heads // kv_heads
    out = np.zeros((b, q_len, heads, d))
    for bi in range(b):
        allowed = np.ones((q_len, kv_len), bool)
        if causal:
            allowed &= np.arange(kv_len)[None, :] <= np.arange(q_len)[:, None] + (kv_len - q_len)
        if segment_ids is not None:
            seg = np.asarray(segment_ids[bi])
            allowed &= seg[kv_len - q_len :][:, None] == seg[None, :]
        for hi in range(heads):
            s = np.where(allowed, q[bi, :, hi] @ k[bi, :, hi // groups].T * scale, -np.inf)
            has_key = allowed.any(axis=1, keepdims=True)
            p = np.where(allowed, np.exp(s - np.where(has_key, s.max(axis=1, keepdims=True), 0.0)), 0.0)
            p = p / np.where(has_key, p.sum(axis=1, keepdims=True), 1.0)
            out[bi, :, hi] = p @ v[bi, :, hi // groups]
    return out


def reference_vjp(q, k, v, ct, segment_ids, *, causal, scale):
    """Output and (dq, dk, dv) of the XLA reference in float64, as numpy arrays."""
    with jax.enable_x64(True):
        q64, k64, v64, ct64 = (jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v, ct))
        seg = None if segment_ids is None else jnp.asarray(np.asarray(segment_ids))

        @jax.jit
        def both(q, k, v, ct, seg):
            out, vjp = jax.vjp(
                lambda q, k, v: xla.reference_attention(q, k, v, causal=causal, segment_ids=seg, softmax_scale=scale),
                q,
                k,
                v,
            )
            return out, vjp(ct)

        out, grads = both(q64, k64, v64, ct64, seg)
        return np.asarray(out), [np.asarray(g) for g in grads]


def path_vjp(fn, q, k, v, ct, segment_ids, *, fast_compile=False):
    """Output and (dq, dk, dv) of ``fn(q, k, v, segment_ids)`` under one jit, as float64 numpy arrays.

    fast_compile: XLA backend optimisation off; interpreted Pallas kernels compile ~2x faster.
    """

    def both(q, k, v, ct, seg):
        out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, seg), q, k, v)
        return out, vjp(ct)

    lowered = jax.jit(both).lower(q, k, v, ct, segment_ids)
    compiled = lowered.compile({"xla_backend_optimization_level": 0} if fast_compile else None)
    out, grads = compiled(q, k, v, ct, segment_ids)
    return np.asarray(out, np.float64), [np.asarray(g, np.float64) for g in grads]


def rel_err(actual, expected) -> float:
    scale = max(float(np.max(np.abs(expected))), 1e-30)
    return float(np.max(np.abs(np.asarray(actual, np.float64) - expected))) / scale


@functools.cache
def case_reference(case: Case, seed: int = 0):
    """The float64 reference for a case's inputs (cached: several paths are checked against each case)."""
    q, k, v, ct, seg = make_inputs(case, seed)
    return reference_vjp(q, k, v, ct, seg, causal=case.causal, scale=case.head_dim**-0.5)


def assert_matches_reference(fn, case: Case, *, fast_compile=True, seed=0):
    """Forward and all three gradients of ``fn`` within the dtype's tolerance of the float64 reference.

    ``fn`` is called with softmax_scale left to the caller; cases use 1/sqrt(head_dim).
    """
    q, k, v, ct, seg = make_inputs(case, seed)
    ref_out, ref_grads = case_reference(case, seed)
    out, grads = path_vjp(fn, q, k, v, ct, seg, fast_compile=fast_compile)
    tol = F32_TOL if case.dtype == "float32" else BF16_TOL
    errors = {"out": rel_err(out, ref_out)}
    errors.update({name: rel_err(g, r) for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads, strict=True)})
    bad = {name: err for name, err in errors.items() if not err <= tol}  # "not <=" also catches NaN
    assert not bad, f"{case}: relative errors {errors} exceed {tol}"
    return out, grads


# ------------------------------------------------------------------------------------------ the reference

REFERENCE_CASES = [
    Case("causal", 2, 33, 33, 4, 4, 8, True, None),
    Case("causal_packed_gqa2", 2, 40, 40, 4, 2, 8, True, "packed"),
    Case("bidirectional_scattered_gqa4", 1, 24, 24, 8, 2, 16, False, "scattered"),
    Case("causal_q_shorter_mqa", 1, 9, 30, 4, 1, 8, True, "packed"),
    Case("causal_q_longer", 1, 30, 9, 2, 2, 8, True, None),  # first 21 query rows see no key
]


@pytest.mark.parametrize("case", REFERENCE_CASES, ids=str)
def test_reference_matches_numpy_float64(case):
    q, k, v, _, seg = make_inputs(case)
    scale = case.head_dim**-0.5
    expected = numpy_attention(q, k, v, causal=case.causal, segment_ids=seg, scale=scale)
    with jax.enable_x64(True):
        q64, k64, v64 = (jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v))
        got = jax.jit(
            lambda q, k, v, s: xla.reference_attention(q, k, v, causal=case.causal, segment_ids=s, softmax_scale=scale)
        )(q64, k64, v64, seg)
        assert got.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-12, atol=1e-12)


def test_reference_gradient_matches_finite_differences():
    case = Case("tiny", 1, 5, 7, 2, 1, 4, True, "packed")
    q, k, v, ct, seg = make_inputs(case, seed=3)
    _, grads = reference_vjp(q, k, v, ct, seg, causal=True, scale=0.5)
    with jax.enable_x64(True):
        args = [jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v)]
        ct64 = jnp.asarray(np.asarray(ct, np.float64))

        @jax.jit
        def loss_fn(q, k, v):
            out = xla.reference_attention(q, k, v, causal=True, segment_ids=seg, softmax_scale=0.5)
            return jnp.sum(out * ct64)

        def loss(*args):
            return float(loss_fn(*args))

        eps = 1e-6
        for which, grad in enumerate(grads):
            for index in [(0, 0, 0, 0), (0, 3, 1, 2), (0, 4, 0, 3)] if which == 0 else [(0, 2, 0, 1), (0, 6, 0, 0)]:
                plus = [a.at[index].add(eps) if i == which else a for i, a in enumerate(args)]
                minus = [a.at[index].add(-eps) if i == which else a for i, a in enumerate(args)]
                numeric = (loss(*plus) - loss(*minus)) / (2 * eps)
                assert abs(numeric - grad[index]) < 1e-7, (which, index, numeric, grad[index])


def test_fully_masked_rows_are_zero_and_finite_in_reference():
    case = Case("causal_q_longer", 1, 30, 9, 2, 2, 8, True, None)
    q, k, v, ct, seg = make_inputs(case)
    out, grads = path_vjp(lambda q, k, v, s: kernels.attention(q, k, v, impl="xla"), q, k, v, ct, seg)
    assert np.all(out[:, :21] == 0.0)
    assert all(np.all(np.isfinite(g)) for g in grads)
    assert np.all(grads[0][:, :21] == 0.0)


# ------------------------------------------------------------------------------------------ XLA paths

# Small tiles (block_q 16, block_kv 32) so even these short sequences span several tiles, with lengths
# that are and are not tile multiples.
BLOCKWISE = xla.BlockwiseSizes(block_q=16, block_kv=32)
XLA_CASES = [
    Case("causal_mha_multiple", 2, 64, 64, 2, 2, 16, True, None),
    Case("causal_packed_gqa2_ragged", 2, 70, 70, 4, 2, 16, True, "packed"),
    Case("bidirectional_packed_gqa4_ragged", 1, 50, 50, 8, 2, 8, False, "packed"),
    Case("causal_scattered_gqa8", 1, 96, 96, 8, 1, 8, True, "scattered"),
    Case("bidirectional_gqa1_cross_lengths", 1, 24, 81, 2, 2, 8, False, "scattered"),
    Case("causal_chunk_q_shorter", 1, 20, 64, 4, 2, 8, True, "packed"),
    Case("causal_q_longer_empty_rows", 1, 64, 24, 4, 4, 8, True, None),
    Case("causal_packed_gqa2_bf16", 1, 80, 80, 4, 2, 16, True, "packed", "bfloat16"),
]


@pytest.mark.parametrize("impl", ["xla", "xla_blockwise"])
@pytest.mark.parametrize("case", XLA_CASES, ids=str)
def test_xla_paths_match_float64_reference(case, impl):
    sizes = BLOCKWISE if impl == "xla_blockwise" else None

    def fn(q, k, v, seg):
        return kernels.attention(
            q,
            k,
            v,
            causal=case.causal,
            segment_ids=seg,
            softmax_scale=case.head_dim**-0.5,
            impl=impl,
            block_sizes=sizes,
        )

    out, _ = assert_matches_reference(fn, case)
    if case.q_len > case.kv_len and case.causal:
        assert np.all(out[:, : case.q_len - case.kv_len] == 0.0)


def test_blockwise_float64_is_exact():
    """In float64 the blockwise path equals the reference to rounding: same maths, different order."""
    case = Case("f64", 1, 45, 45, 4, 2, 8, True, "packed")
    q, k, v, ct, seg = make_inputs(case)
    ref_out, ref_grads = reference_vjp(q, k, v, ct, seg, causal=True, scale=0.3)
    with jax.enable_x64(True):
        args = [jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v, ct)]
        out, grads = path_vjp(
            lambda q, k, v, s: xla.blockwise_attention(
                q, k, v, causal=True, segment_ids=s, softmax_scale=0.3, block_sizes=BLOCKWISE
            ),
            *args,
            seg,
            fast_compile=True,
        )
    for got, want in zip([out, *grads], [ref_out, *ref_grads], strict=True):
        assert rel_err(got, want) < 1e-12


def test_default_scale_is_inverse_sqrt_head_dim():
    case = Case("scale", 1, 16, 16, 2, 2, 16, True, None)
    q, k, v, _, _ = make_inputs(case)
    expected = numpy_attention(q, k, v, causal=True, segment_ids=None, scale=1 / math.sqrt(16))
    for impl in ("xla", "xla_blockwise"):
        out = jax.jit(functools.partial(kernels.attention, impl=impl))(q, k, v)
        assert rel_err(np.asarray(out), expected) < F32_TOL


def _temp_bytes(fn, length, heads=4, head_dim=64):
    q = jax.ShapeDtypeStruct((1, length, heads, head_dim), jnp.float32)

    def loss(q, k, v):
        return fn(q, k, v).sum()

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, q, q).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_blockwise_memory_is_linear_in_length():
    """Compiled (never run) forward+backward: blockwise temp memory grows ~linearly, the reference's
    quadratically, and at 8k blockwise needs under a tenth of the reference's."""

    def blockwise(q, k, v):
        return xla.blockwise_attention(q, k, v, causal=True, softmax_scale=0.1)

    def reference(q, k, v):
        return xla.reference_attention(q, k, v, causal=True, softmax_scale=0.1)

    bw_2k, bw_8k = _temp_bytes(blockwise, 2048), _temp_bytes(blockwise, 8192)
    ref_8k = _temp_bytes(reference, 8192)
    assert bw_8k < 6 * bw_2k, (bw_2k, bw_8k)  # linear: 4x; quadratic would be 16x
    assert bw_8k < ref_8k / 10, (bw_8k, ref_8k)


# ------------------------------------------------------------------------------------------ dispatch


def _problem(batch=1, q_len=1024, kv_len=1024, heads=8, kv_heads=8, head_dim=128, causal=True, segments=False):
    return Problem(batch, q_len, kv_len, heads, kv_heads, head_dim, causal, segments)


TPU = dispatch.Target("tpu", "TPU v5 lite")
GPU = dispatch.Target("gpu", "NVIDIA H100 80GB HBM3")
CPU = dispatch.Target("cpu", "cpu")


@pytest.mark.parametrize(
    "problem, dtype, target, expected",
    [
        (_problem(), jnp.bfloat16, TPU, "pallas_tpu"),
        (_problem(segments=True, kv_heads=1), jnp.float32, TPU, "pallas_tpu"),
        (_problem(q_len=1, kv_len=4096), jnp.bfloat16, TPU, "xla"),  # decode step
        (_problem(q_len=64, kv_len=64), jnp.bfloat16, TPU, "xla"),  # short sequence
        (_problem(head_dim=1024), jnp.bfloat16, TPU, "xla_blockwise"),  # no kernel for this head_dim
        (_problem(), jnp.bfloat16, GPU, "cudnn"),
        (_problem(segments=True), jnp.bfloat16, GPU, "pallas_gpu"),  # cuDNN would need a dense mask
        (_problem(q_len=512, kv_len=1024), jnp.bfloat16, GPU, "pallas_gpu"),  # bottom-right causal
        (_problem(), jnp.float32, GPU, "pallas_gpu"),  # cuDNN is half precision only
        (_problem(head_dim=100), jnp.bfloat16, GPU, "pallas_gpu"),  # cuDNN needs head_dim % 8 == 0
        (_problem(head_dim=512), jnp.bfloat16, GPU, "xla_blockwise"),
        (_problem(q_len=256, kv_len=256, heads=4), jnp.float32, CPU, "cpu_native"),
        (_problem(q_len=4096, kv_len=4096), jnp.float32, CPU, "cpu_native"),
        (_problem(q_len=256, kv_len=256, heads=4), jnp.bfloat16, CPU, "xla"),
        (_problem(q_len=4096, kv_len=4096), jnp.bfloat16, CPU, "xla_blockwise"),
    ],
)
def test_auto_selection(problem, dtype, target, expected):
    assert dispatch.select_impl(problem, dtype, target) == expected


def test_auto_on_this_cpu_runs_the_expected_path(monkeypatch):
    case = Case("auto", 1, 256, 256, 8, 8, 64, True, None)
    q, k, v, _, _ = make_inputs(case)
    calls = []
    monkeypatch.setattr(xla, "blockwise_attention", lambda *a, **kw: calls.append("xla_blockwise") or 0)
    monkeypatch.setattr(xla, "reference_attention", lambda *a, **kw: calls.append("xla") or 0)
    monkeypatch.setattr(xla, "cpu_attention", lambda *a, **kw: calls.append("cpu_attention") or 0)
    monkeypatch.setattr(cpu_native, "cpu_native_attention", lambda *a, **kw: calls.append("cpu_native") or 0)
    kernels.attention(q, k, v)
    kernels.attention(q, k, v, impl="xla")  # forced: the token-major reference itself
    big = jnp.zeros((2, 2048, 8, 64), jnp.float32)
    kernels.attention(big, big, big)
    half = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    kernels.attention(*half)  # no bfloat16 kernel: XLA's
    kernels.attention(*(x.astype(jnp.bfloat16) for x in (big, big, big)))
    monkeypatch.setattr(cpu_native, "_load", lambda: (False, "no C++ compiler"))
    kernels.attention(q, k, v)  # cannot be built: XLA's
    assert calls == ["cpu_native", "xla", "cpu_native", "cpu_attention", "xla_blockwise", "cpu_attention"]
    assert dispatch.current_target().platform == "cpu"


def _qkv(batch=1, length=256, heads=4, kv_heads=2, head_dim=64, dtype=jnp.float32, kv_len=None):
    q = jnp.zeros((batch, length, heads, head_dim), dtype)
    k = jnp.zeros((batch, kv_len or length, kv_heads, head_dim), dtype)
    return q, k, k


@pytest.mark.parametrize(
    "impl, kwargs, message",
    [
        ("pallas_tpu", {}, "'pallas_tpu' needs a TPU backend, but the backend is 'cpu'"),
        ("pallas_gpu", {}, "'pallas_gpu' needs a GPU backend, but the backend is 'cpu'"),
        ("cudnn", {}, "'cudnn' needs an NVIDIA GPU backend, but the backend is 'cpu'"),
        ("cudnn", {"interpret": True}, "cuDNN has no interpreter"),
        ("flash", {}, "attention impl 'flash' is not one of"),
    ],
)
def test_forced_kernel_on_wrong_backend_is_a_clear_error(impl, kwargs, message):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=message):
        kernels.attention(q, k, v, impl=impl, **kwargs)


def test_forced_kernel_backend_is_checked_at_lowering_or_from_the_mesh():
    q, k, v = _qkv()

    def f(q, k, v):
        return kernels.attention(q, k, v, impl="pallas_tpu")

    # Shape inference needs no TPU (e.g. a model's abstract parameters on a CPU host) ...
    assert jax.eval_shape(f, q, k, v).shape == q.shape
    # ... compiling for this CPU does, and says so ...
    with pytest.raises(ValueError, match="'pallas_tpu' needs a TPU backend, but the backend is 'cpu'"):
        jax.jit(f).lower(q, k, v)
    # ... and inside a mesh the mesh's devices decide while tracing.
    mesh = jax.make_mesh((len(jax.devices()),), ("data",))
    with jax.set_mesh(mesh), pytest.raises(ValueError, match="needs a TPU backend, but the backend is 'cpu'"):
        jax.eval_shape(f, q, k, v)


@pytest.mark.parametrize(
    "impl, inputs, kwargs, message",
    [
        ("pallas_tpu", _qkv(head_dim=1024), {}, "pallas_tpu: head_dim 1024 > 512 is not supported"),
        ("pallas_gpu", _qkv(head_dim=512), {}, "pallas_gpu: head_dim 512 > 256 is not supported"),
        ("pallas_tpu", _qkv(heads=6, kv_heads=4), {}, r"pallas_tpu.*query heads 6 are not a multiple of kv heads 4"),
        ("xla_blockwise", _qkv(heads=3, kv_heads=2), {}, r"query heads 3 are not a multiple of kv heads 2"),
        (
            "xla",
            (jnp.zeros((1, 8, 2, 16)), jnp.zeros((1, 8, 2, 16)), jnp.zeros((1, 9, 2, 16))),
            {},
            r"k\(1, 8, 2, 16\) and v\(1, 9, 2, 16\) must have the same shape",
        ),
        (
            "pallas_gpu",
            (jnp.zeros((1, 8, 2, 16)), jnp.zeros((1, 8, 2, 32)), jnp.zeros((1, 8, 2, 32))),
            {},
            r"does not match q\(1, 8, 2, 16\) in batch or head_dim",
        ),
        ("xla", (jnp.zeros((8, 2, 16)),) * 3, {}, "must be \\[batch, length, heads, head_dim\\]"),
        (
            "pallas_tpu",
            _qkv(),
            {"segment_ids": jnp.zeros((1, 255), jnp.int32)},
            r"segment_ids\(1, 255\) must be \[batch, kv_len\] = \(1, 256\)",
        ),
        ("xla", _qkv(kv_len=128), {"segment_ids": jnp.zeros((1, 128), jnp.int32)}, "segment_ids need q_len <= kv_len"),
        (
            "pallas_tpu",
            _qkv(),
            {"block_sizes": pallas_gpu.BlockSizes()},
            "'pallas_tpu' takes meditron_jax.kernels.pallas_tpu.BlockSizes, got BlockSizes",
        ),
        ("xla", _qkv(), {"block_sizes": xla.BlockwiseSizes()}, "'xla' takes no block sizes"),
    ],
)
def test_bad_inputs_are_clear_errors(impl, inputs, kwargs, message):
    with pytest.raises(ValueError, match=message):
        kernels.attention(*inputs, impl=impl, interpret=True, **kwargs)


def test_unsupported_shapes_for_cudnn_name_the_kernel():
    q, k, v = _qkv(dtype=jnp.float32)
    check = dispatch.check_runnable
    with pytest.raises(ValueError, match="cudnn: dtype float32 is not supported"):
        check("cudnn", q, k, v, None, causal=True, target=GPU, interpret=False)
    q, k, v = _qkv(head_dim=100, dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match="cudnn: head_dim 100 is not supported"):
        check("cudnn", q, k, v, None, causal=True, target=GPU, interpret=False)
    q, k, v = _qkv(dtype=jnp.bfloat16)
    check("cudnn", q, k, v, None, causal=True, target=GPU, interpret=False)  # supported: no error


def test_block_size_validation():
    with pytest.raises(ValueError, match="pallas_tpu: block_kv=200 must be a positive multiple of 128"):
        pallas_tpu.BlockSizes(block_kv=200)
    with pytest.raises(ValueError, match="pallas_gpu: block_q=48 must be a power of two >= 16"):
        pallas_gpu.BlockSizes(block_q=48)
    assert pallas_tpu.default_block_sizes("TPU v4") == pallas_tpu.DEFAULT_BLOCK_SIZES["TPU v4"]
    assert pallas_tpu.default_block_sizes("TPU v5 lite").block_kv == 1024
    assert pallas_tpu.default_block_sizes("unknown") == pallas_tpu.BlockSizes()


@pytest.mark.parametrize("block_q", [128, 24])
@pytest.mark.parametrize(
    "heads, kv_heads, q_len, segments", [(8, 8, 64, False), (8, 2, 64, True), (4, 1, 16, True), (4, 2, 40, True)]
)
def test_cpu_attention_matches_the_reference_with_gradients(heads, kv_heads, q_len, segments, block_q):
    """`xla.cpu_attention` (what "auto" runs on CPU for small scores: head-major, batch and heads merged)
    against the token-major reference `xla.reference_attention`: GQA, packed segments, bottom-right causal
    with fewer queries than keys. block_q=24 splits the queries into causal blocks, the last one ragged
    (64 = 24 + 24 + 16; 40 queries against 64 keys: 24 + 16). float32 both sides; 1e-5 covers summation
    order."""
    rng = np.random.default_rng(1)
    b, kv_len, d = 2, 64, 16
    q = jnp.asarray(rng.standard_normal((b, q_len, heads, d)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((b, kv_len, kv_heads, d)), jnp.float32) for _ in range(2))
    seg = jnp.asarray(np.repeat([[1, 2], [1, 1]], kv_len // 2, axis=1), jnp.int32) if segments else None
    cot = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v, causal=True, segment_ids=seg, softmax_scale=0.3) * cot)

    blocked = functools.partial(xla.cpu_attention, block_q=block_q)
    got = jax.value_and_grad(loss(blocked), argnums=(0, 1, 2))(q, k, v)
    want = jax.value_and_grad(loss(xla.reference_attention), argnums=(0, 1, 2))(q, k, v)
    for a, e in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-5)
