"""The compiled CPU attention kernel (`kernels/cpu_native.py` + `cpu_native.cc`) against the token-major
reference `xla.reference_attention` differentiated by autodiff: outputs and q, k, v gradients, float32.
1e-5 covers summation order (sgemm's against XLA's; measured differences are ~5e-7 relative)."""

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meditron_jax import kernels
from meditron_jax.kernels import cpu_native, xla


@pytest.fixture(scope="module", autouse=True)
def built():
    # Builds the library into the cache on first use; CI and this machine have g++ and numpy's OpenBLAS.
    assert cpu_native.available(), cpu_native.why_unavailable()


def _inputs(b, q_len, kv_len, heads, kv_heads, d, segments, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((b, q_len, heads, d)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((b, kv_len, kv_heads, d)), jnp.float32) for _ in range(2))
    cot = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    seg = None
    if segments == "packed":  # a few packed documents, and a padded tail (segment 0) in the first row
        ids = np.sort(rng.integers(1, 4, (b, kv_len)), axis=1)
        ids[0, -kv_len // 5 :] = 0
        seg = jnp.asarray(ids, jnp.int32)
    elif segments == "short":  # many documents of 1-40 tokens: most key blocks lie outside a block's window
        ids = np.cumsum(rng.random((b, kv_len)) < 1 / 20, axis=1) + 1
        ids[1, :3] = [7, 8, 9]  # one-token documents
        seg = jnp.asarray(ids, jnp.int32)
    elif segments == "scattered":  # ids that recur far apart (not contiguous), so windows are wide but gappy
        seg = jnp.asarray(rng.integers(0, 5, (b, kv_len)), jnp.int32)
    return q, k, v, seg, cot


def _value_and_grads(fn, q, k, v, seg, cot, causal):
    def loss(q, k, v):
        return jnp.sum(fn(q, k, v, causal=causal, segment_ids=seg, softmax_scale=0.3) * cot)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)


@pytest.mark.parametrize(
    "q_len, kv_len, heads, kv_heads, causal, segments",
    [
        (64, 64, 4, 4, True, None),
        (300, 300, 4, 2, True, "packed"),  # five causal blocks of 64, the last ragged; GQA
        (40, 64, 4, 4, True, None),  # fewer queries than keys: bottom-right causal
        (200, 256, 8, 2, True, "packed"),
        (64, 64, 4, 1, False, "packed"),  # not causal, one KV head
        (300, 300, 4, 2, True, "short"),  # windows narrower than the causal prefix
        (200, 300, 4, 4, False, "short"),  # not causal: windows end before the last key
        (300, 300, 4, 2, True, "scattered"),
        (260, 300, 4, 1, False, "scattered"),
    ],
)
def test_matches_the_reference_with_gradients(q_len, kv_len, heads, kv_heads, causal, segments):
    q, k, v, seg, cot = _inputs(2, q_len, kv_len, heads, kv_heads, 16, segments)
    got = _value_and_grads(cpu_native.cpu_native_attention, q, k, v, seg, cot, causal)
    want = _value_and_grads(xla.reference_attention, q, k, v, seg, cot, causal)
    for a, e in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-5)


def test_forced_through_dispatch_alone_and_sharded():
    """impl="cpu_native" runs the kernel; on a (data, tensor) mesh of the test's 8 CPU devices it runs per
    shard (shard_map over batch) and gives the single-device result."""
    q, k, v, seg, cot = _inputs(4, 256, 256, 4, 4, 16, "short")

    def fn(q, k, v, **kw):
        return kernels.attention(q, k, v, impl="cpu_native", **kw)

    alone = _value_and_grads(fn, q, k, v, seg, cot, True)
    want = _value_and_grads(xla.reference_attention, q, k, v, seg, cot, True)
    for a, e in zip(jax.tree.leaves(alone), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-5)
    mesh = jax.make_mesh((4, 2), ("data", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    with jax.set_mesh(mesh):
        sharded = _value_and_grads(fn, q, k, v, seg, cot, True)
        program = str(jax.make_jaxpr(lambda q, k, v: fn(q, k, v, causal=True, segment_ids=seg))(q, k, v))
    assert "shard_map" in program and "meditron_cpu_attention_fwd" in program
    for a, e in zip(jax.tree.leaves(sharded), jax.tree.leaves(alone), strict=True):
        np.testing.assert_allclose(a, e, rtol=1e-6, atol=1e-6)


def test_independent_calls_in_one_program_give_each_calls_result():
    """Four attention calls with nothing between them in one program, forward and backward: XLA:CPU may run
    them side by side on its thread pool, whose threads the kernel's units also take. Each call's output and
    gradients equal the same call compiled alone."""
    calls = [_inputs(2, 256, 256, 4, 2, 16, "short", seed=i) for i in range(4)]

    def loss_of(q, k, v, seg, cot):
        return jnp.sum(cpu_native.cpu_native_attention(q, k, v, segment_ids=seg, softmax_scale=0.25) * cot)

    def together(qkvs):
        return sum(loss_of(q, k, v, c[3], c[4]) for (q, k, v), c in zip(qkvs, calls, strict=True))

    qkvs = [c[:3] for c in calls]
    total, grads = jax.jit(jax.value_and_grad(together))(qkvs)
    alone = [jax.jit(jax.value_and_grad(loss_of, argnums=(0, 1, 2)))(*c) for c in calls]
    np.testing.assert_allclose(total, sum(a[0] for a in alone), rtol=1e-6)
    for got, (_, want) in zip(grads, alone, strict=True):
        for a, e in zip(got, want, strict=True):
            np.testing.assert_array_equal(a, e)


def test_bad_inputs_and_an_unavailable_kernel_are_named(monkeypatch):
    q, k, v, _, _ = _inputs(1, 64, 64, 2, 2, 16, None)
    with pytest.raises(ValueError, match="float32 q, k, v with q_len <= kv_len, got bfloat16"):
        kernels.attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)), impl="cpu_native")
    with pytest.raises(ValueError, match="q_len 64, kv_len 32"):
        kernels.attention(q, k[:, :32], v[:, :32], impl="cpu_native")
    monkeypatch.setattr(cpu_native, "_load", lambda: (False, "no C++ compiler ('g++' not found; set CXX)"))
    assert not cpu_native.available()
    with pytest.raises(ValueError, match="'cpu_native' is unavailable here: no C\\+\\+ compiler"):
        kernels.attention(q, k, v, impl="cpu_native")


def test_the_library_is_built_once_per_source_and_cpu_into_the_cache(tmp_path, monkeypatch):
    """A build writes one library under $MEDITRON_JAX_CACHE, atomically (no temporary left behind)."""
    monkeypatch.setenv("MEDITRON_JAX_CACHE", str(tmp_path / "cache"))
    target = cpu_native.cache_dir() / "probe.so"
    cpu_native._build("g++", target)
    assert [p.name for p in target.parent.iterdir()] == ["probe.so"]


def test_turned_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("MEDITRON_CPU_NATIVE", "off")
    assert cpu_native._load.__wrapped__() == (False, "turned off by MEDITRON_CPU_NATIVE")


def test_numpys_openblas_keeps_its_thread_count():
    """The kernel sets OpenBLAS's (process-wide) thread count to one while it runs and puts it back: numpy's
    own matmuls in the same process keep their thread count (a fresh process, so loading is covered too)."""
    script = (
        "import ctypes, jax, jax.numpy as jnp\n"
        "from meditron_jax.kernels import cpu_native\n"
        "count = ctypes.CDLL(cpu_native._openblas()).scipy_openblas_get_num_threads64_\n"
        "before = count()\n"
        "assert cpu_native.available()\n"
        "q = jnp.ones((1, 256, 2, 16), jnp.float32)\n"
        "f = lambda q: cpu_native.cpu_native_attention(q, q, q, softmax_scale=0.25).sum()\n"
        "jax.block_until_ready(jax.grad(f)(q))\n"
        "print(before, count())\n"
    )
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "2"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-2:] == ["2", "2"]


@pytest.mark.parametrize(
    "b, new, heads, kv_heads, slots, first, d",
    [
        (3, 1, 4, 2, 40, 25, 16),  # one new token, GQA
        (2, 3, 4, 4, 32, 10, 16),  # three new tokens: each sees one slot more
        (1, 1, 2, 1, 24, 23, 16),  # one row: the cache has no batch axis; the last slot
        (2, 1, 4, 2, 16, 0, 16),  # the first slot: a row whose only slot is invalid sees nothing
        # head_dim 64 (Llama's), the kernel's compiled-in size: the same cases through its other code
        (3, 1, 4, 2, 40, 25, 64),
        (2, 3, 4, 4, 32, 10, 64),
        (2, 1, 4, 2, 16, 0, 64),
        # over several blocks of 64 slots, which every query of a (row, KV head) shares: GQA groups of 4
        # with three new tokens at head_dim 128 (Llama-2 7B's and 70B's), MQA (Falcon's), another head_dim
        (2, 3, 8, 2, 150, 100, 128),
        (1, 1, 6, 1, 200, 170, 64),
        (2, 2, 4, 4, 130, 127, 32),
        # one row of MQA with Falcon-7B's 71 query heads: with more threads than (row, KV head) units the
        # group is split between them, 36 + 35 heads on two (the case above: 4 + 2)
        (1, 1, 71, 1, 130, 100, 64),
    ],
)
def test_decode_attention_equals_xlas_over_the_cache(b, new, heads, kv_heads, slots, first, d):
    """The decode kernel against `xla.head_major_attention` with the mask the model builds (valid slots, up
    to each new token's own): left padding, unwritten slots beyond the new tokens (garbage in the cache,
    never read), GQA and MQA. Both sum in float32, in different orders: 1e-6 for dots of 16 terms over 40
    slots, 2e-6 for 64, 5e-6 for up to 128 terms or 200 slots (outputs are of order 0.1–1)."""
    rng = np.random.default_rng(b * 100 + first)
    q = jnp.asarray(rng.standard_normal((b, new, heads, d)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((b, kv_heads, slots, d)), jnp.float32) for _ in range(2))
    valid = np.ones((b, slots), bool)
    valid[0, : min(4, slots)] = False  # a left-padded row
    valid[:, first + new :] = False  # not written yet
    if first == 0:
        valid[1, 0] = True
    k = k.at[:, :, first + new :].set(jnp.nan)  # never read: NaNs there would show
    v = v.at[:, :, first + new :].set(jnp.nan)
    valid = jnp.asarray(valid)
    cache = (k[0], v[0]) if b == 1 else (k, v)
    got = jax.jit(lambda q, kc, vc: cpu_native.decode_attention(q, kc, vc, valid, first, softmax_scale=0.25))(q, *cache)
    slot = jnp.arange(slots)
    mask = valid[:, None, :] & (slot[None, None, :] <= first + jnp.arange(new)[None, :, None])
    safe_k, safe_v = (jnp.where(jnp.isnan(x), 0.0, x) for x in (k, v))
    want = xla.head_major_attention(q, safe_k, safe_v, mask, 0.25)
    tol = 1e-6 if d <= 16 else 2e-6 if slots <= 64 and d <= 64 else 5e-6
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
    if first == 0:
        assert not np.any(np.asarray(got[0]))  # row 0 sees no slot: zeros


def test_decode_runs_the_kernel_on_one_cpu_device_and_xla_otherwise(monkeypatch):
    """`kernels.decode_attention` picks the kernel on one CPU device in float32 (impl "auto" or
    "cpu_native"), and XLA's head-major attention for impl "xla", other dtypes, or a multi-device mesh."""
    q = jnp.ones((2, 1, 4, 16), jnp.float32)
    cache = jnp.ones((2, 2, 8, 16), jnp.float32)
    valid = jnp.ones((2, 8), bool)

    def program(impl, dtype=jnp.float32):
        fn = functools.partial(kernels.decode_attention, softmax_scale=0.25, impl=impl)
        return str(jax.make_jaxpr(lambda q, c: fn(q, c, c, valid, 3))(q.astype(dtype), cache.astype(dtype)))

    assert "meditron_cpu_decode_attention" in program("auto")
    assert "meditron_cpu_decode_attention" in program("cpu_native")
    assert "meditron_cpu_decode_attention" not in program("xla")
    assert "meditron_cpu_decode_attention" not in program("auto", jnp.bfloat16)
    mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    with jax.set_mesh(mesh):
        assert "meditron_cpu_decode_attention" not in program("auto")
    monkeypatch.setattr(cpu_native, "_load", lambda: (False, "off for the test"))
    assert "meditron_cpu_decode_attention" not in program("auto")


# --- The dense layers' product, `cpu_native.matmul` (through `kernels.matmul`) ---


@pytest.mark.parametrize(
    "m, k, n",
    [
        (300, 200, 170),  # cut by rows into one piece per core, ragged
        (40, 33, 300),  # more columns than rows: cut by columns
        (1000, 33, 1000),
        (40, 64, 16),  # too small to cut: one piece
        (1, 9, 1),
        # thin products (up to 32 rows): register tiles of 6 rows (12 with AVX-512) and the rows left over,
        # 64-row blocks of w, 16- or 32-column panels and a ragged last one, chunks split between threads
        (16, 768, 1000),
        (32, 130, 2049),
        (5, 7, 300),
        (13, 65, 31),
        (2, 200, 17),
    ],
)
def test_matmul_equals_float64_with_gradients(m, k, n):
    """Product and both gradients (dx = dy wᵀ, dw = xᵀ dy, the kernel's two transposed forms) against
    float64 numpy. 1e-5 relative to each result's largest entry: float32 sums of up to 1000 terms."""
    rng = np.random.default_rng(m + k + n)
    x, w, dy = (rng.standard_normal(s) for s in ((m, k), (k, n), (m, n)))
    out, vjp = jax.vjp(cpu_native.matmul, jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32))
    dx, dw = vjp(jnp.asarray(dy, jnp.float32))
    for got, want in ((out, x @ w), (dx, dy @ w.T), (dw, x.T @ dy)):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_the_avx512_thin_tile_gives_the_same_products_on_any_machine(tmp_path):
    """The thin kernel's AVX-512 shape (tiles of 12 rows × 32 columns), built here with MEDITRON_THIN_WIDE
    whatever this CPU has, in a fresh process with its own cache: product and both gradients against float64
    numpy, 1e-5 of each result's largest entry (as above); its panel-major products (panels of 32
    columns: one row, thin rows, blocks of 32 rows, unpacked beyond 128) against the same; and decode's
    grouped attention, which takes its tiles (GQA at head_dim 64 and 128; at 16, not a multiple of 32, the
    one-query path), against XLA's as in the decode test above."""
    script = (
        "import ctypes, jax, jax.numpy as jnp, numpy as np\n"
        "from meditron_jax.kernels import cpu_native\n"
        "cpu_native.FLAGS += ('-DMEDITRON_THIN_WIDE',)\n"
        "assert cpu_native.available(), cpu_native.why_unavailable()\n"
        "(lib,) = cpu_native.cache_dir().glob('cpu_native-*.so')\n"
        "print('tile rows', ctypes.CDLL(str(lib)).mj_thin_tile_rows())\n"
        "for m, k, n in ((16, 768, 1000), (32, 130, 2049), (13, 65, 31), (25, 64, 40), (2, 200, 17)):\n"
        "    rng = np.random.default_rng(m + k + n)\n"
        "    x, w, dy = (rng.standard_normal(s) for s in ((m, k), (k, n), (m, n)))\n"
        "    out, vjp = jax.vjp(cpu_native.matmul, jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32))\n"
        "    dx, dw = vjp(jnp.asarray(dy, jnp.float32))\n"
        "    for got, want in ((out, x @ w), (dx, dy @ w.T), (dw, x.T @ dy)):\n"
        "        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())\n"
        "from meditron_jax import kernels\n"
        "print('panel width', cpu_native.panel_width())\n"
        "for m, k, n in ((1, 130, 160), (16, 768, 1024), (40, 65, 96), (129, 33, 64)):\n"
        "    rng = np.random.default_rng(m + k + n)\n"
        "    x, w = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)\n"
        "    got = kernels.matmul(x, kernels.pack_panels(jnp.asarray(w), 32), panels=32)\n"
        "    want = x.astype(np.float64) @ w\n"
        "    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())\n"
        "from meditron_jax.kernels import xla\n"
        "for heads, kv, d in ((8, 2, 64), (6, 1, 128), (4, 2, 16)):\n"
        "    rng = np.random.default_rng(d)\n"
        "    q = jnp.asarray(rng.standard_normal((2, 1, heads, d)), jnp.float32)\n"
        "    k, v = (jnp.asarray(rng.standard_normal((2, kv, 90, d)), jnp.float32) for _ in range(2))\n"
        "    valid = jnp.arange(90)[None, :].repeat(2, 0) < 80\n"
        "    got = cpu_native.decode_attention(q, k, v, valid, 79, softmax_scale=0.2)\n"
        "    want = xla.head_major_attention(q, k, v, valid[:, None, :], 0.2)\n"
        "    np.testing.assert_allclose(got, want, rtol=5e-6, atol=5e-6)\n"
        "print('ok')\n"
    )
    env = {**os.environ, "MEDITRON_JAX_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split("\n")[-4:] == ["tile rows 12", "panel width 32", "ok", ""]


def _matmul_program(x, w, impl="auto", **kwargs):
    return str(jax.make_jaxpr(lambda x, w: kernels.matmul(x, w, impl=impl, **kwargs))(x, w))


def test_matmul_runs_the_kernel_for_large_float32_products_on_one_cpu_device(monkeypatch):
    """ "auto" takes the kernel from CPU_NATIVE_MATMUL_MIN_ROWS rows and CPU_NATIVE_MATMUL_MIN_WEIGHT weight
    elements, or for thin products, on one CPU device in float32, and XLA's dot otherwise; "xla" never takes
    it."""
    from meditron_jax.kernels import dispatch

    rows, weight = dispatch.CPU_NATIVE_MATMUL_MIN_ROWS, dispatch.CPU_NATIVE_MATMUL_MIN_WEIGHT
    x = jax.ShapeDtypeStruct((rows, 512), jnp.float32)
    w = jax.ShapeDtypeStruct((512, weight // 512), jnp.float32)
    native = "meditron_cpu_matmul"
    assert native in _matmul_program(x, w)
    assert native not in _matmul_program(x, w, "xla")
    assert native not in _matmul_program(jax.ShapeDtypeStruct((rows - 1, 512), jnp.float32), w)
    assert native not in _matmul_program(x, jax.ShapeDtypeStruct((512, weight // 512 - 1), jnp.float32))
    # thin products (decode's batch rows): from CPU_NATIVE_THIN_ROWS[0] to [1] rows and a weight of at least
    # CPU_NATIVE_THIN_MIN_WEIGHT elements; one row stays XLA's matrix-vector product
    lo, hi = dispatch.CPU_NATIVE_THIN_ROWS
    thin_w = jax.ShapeDtypeStruct((512, dispatch.CPU_NATIVE_THIN_MIN_WEIGHT // 512), jnp.float32)
    for m, want in ((lo - 1, False), (lo, True), (hi, True), (hi + 1, False)):
        assert (native in _matmul_program(jax.ShapeDtypeStruct((m, 512), jnp.float32), thin_w)) == want, m
    small_w = jax.ShapeDtypeStruct((512, dispatch.CPU_NATIVE_THIN_MIN_WEIGHT // 512 - 1), jnp.float32)
    assert native not in _matmul_program(jax.ShapeDtypeStruct((hi, 512), jnp.float32), small_w)
    bf16 = [jax.ShapeDtypeStruct(a.shape, jnp.bfloat16) for a in (x, w)]
    assert native not in _matmul_program(*bf16)
    assert native not in _matmul_program(*bf16, preferred_element_type=jnp.float32)
    mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    with jax.set_mesh(mesh):
        assert native not in _matmul_program(x, w)
    monkeypatch.setattr(cpu_native, "_load", lambda: (False, "off for the test"))
    assert native not in _matmul_program(x, w)


def test_matmul_forced_runs_any_size_or_says_why_not(monkeypatch):
    small = jnp.ones((3, 4), jnp.float32)
    assert "meditron_cpu_matmul" in _matmul_program(small, small.T, "cpu_native")
    with pytest.raises(ValueError, match="'cpu_native' cannot run here: it computes in float32, got x bfloat16"):
        kernels.matmul(small.astype(jnp.bfloat16), small.T.astype(jnp.bfloat16), impl="cpu_native")
    mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    with jax.set_mesh(mesh), pytest.raises(ValueError, match="runs on one CPU device"):
        kernels.matmul(small, small.T, impl="cpu_native")
    with pytest.raises(ValueError, match="matmul impl 'fast' is not one of"):
        kernels.matmul(small, small.T, impl="fast")
    monkeypatch.setattr(cpu_native, "_load", lambda: (False, "no C++ compiler ('g++' not found; set CXX)"))
    with pytest.raises(ValueError, match="cannot run here: no C\\+\\+ compiler"):
        kernels.matmul(small, small.T, impl="cpu_native")


def test_a_train_step_with_the_kernels_products_equals_xlas():
    """The tiny Llama's loss and every parameter's gradient with all dense products forced through the
    kernel against XLA's dots: the same float32 products summed in another order (1e-5)."""
    from meditron_jax.config import get_config
    from meditron_jax.model.llama import Llama, init_params

    cfg = get_config("tiny").replace(scan_layers=True)
    params = init_params(cfg, seed=0)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 33)), jnp.int32)

    def loss_and_grads(impl):
        model = Llama(cfg.replace(matmul_impl=impl))

        def loss(p):
            logits = model.apply({"params": p}, tokens[:, :-1])
            picked = jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], axis=-1)
            return -jnp.mean(picked)

        return jax.value_and_grad(loss)

    assert str(jax.make_jaxpr(loss_and_grads("cpu_native"))(params)).count("meditron_cpu_matmul") >= 6
    native, xla_ = jax.jit(loss_and_grads("cpu_native"))(params), jax.jit(loss_and_grads("xla"))(params)
    for a, b in zip(jax.tree.leaves(native), jax.tree.leaves(xla_), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_libraries_unused_for_a_week_are_pruned_from_the_cache(tmp_path):
    """Loading marks the current library used; other libraries older than UNUSED_FOR_S are deleted, younger
    ones and files that are not libraries are kept."""
    now = 1_000_000_000.0
    current, recent, stale = (tmp_path / f"cpu_native-{n}.so" for n in ("cur", "recent", "stale"))
    other = tmp_path / "notes.txt"
    for path, age in ((current, 30 * 86400), (recent, 86400), (stale, 8 * 86400), (other, 30 * 86400)):
        path.write_bytes(b"x")
        os.utime(path, (now - age, now - age))
    assert cpu_native.prune_unused(current, now=now) == [stale]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cpu_native-cur.so", "cpu_native-recent.so", "notes.txt"]
    assert current.stat().st_mtime == now


@pytest.mark.parametrize("remat, layer_calls", [("none", 3), ("full", 3), ("dots", 0), ("minimal", 0)])
def test_auto_keeps_xlas_dots_in_layers_whose_remat_policy_saves_dots(remat, layer_calls):
    """A kernel's product is not a dot to `checkpoint_dots`-like policies, which would then recompute it: under
    them "auto" gives the layers XLA's dots. The head, outside the layers, keeps the kernel (1 call forward)."""
    from meditron_jax.config import get_config
    from meditron_jax.model.llama import Llama

    cfg = get_config("tiny").replace(
        hidden_size=512, intermediate_size=2048, num_heads=8, num_kv_heads=8, num_layers=1, vocab_size=2048
    )
    cfg = cfg.replace(remat_policy=remat, scan_layers=False)
    tokens = jax.ShapeDtypeStruct((2, 128), jnp.int32)
    model = Llama(cfg)
    params = jax.eval_shape(lambda t: model.init(jax.random.PRNGKey(0), t), tokens)
    program = str(jax.make_jaxpr(lambda p, t: model.apply(p, t))(params, tokens))
    assert program.count("target_name=meditron_cpu_matmul") == layer_calls + 1  # MLP's three, the head


@pytest.mark.parametrize(
    "m, k, n",
    [
        (1, 768, 16 * 7),  # one row: four panels side by side, then three alone
        (2, 64, 32),
        (16, 130, 160),  # ragged 64-row blocks of w
        (32, 65, 96),
        (40, 33, 64),  # thin, in blocks of 32 rows (16 + 8 left)
        (128, 20, 48),
        (129, 50, 80),  # beyond 128 rows: unpacked piece by piece for sgemm
        (300, 7, 32),
    ],
)
def test_panel_major_weights_give_the_row_major_products(m, k, n):
    """`kernels.pack_panels` weights through the kernel (`matmul(..., panels=)`) against float64 numpy (1e-5
    of the largest entry, as above), and bit for bit against the row-major thin kernel for 2 to 32 rows: the
    same tiles and blocks, only where they are read from. Round trip through `unpack_panels` exact."""
    width = cpu_native.panel_width()
    rng = np.random.default_rng(m + k + n)
    n = n * width // 16  # whole panels with AVX-512's 32 columns too
    x, w = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)
    packed = kernels.pack_panels(jnp.asarray(w), width)
    assert packed.shape == w.shape and not np.array_equal(np.asarray(packed), w)
    np.testing.assert_array_equal(np.asarray(kernels.unpack_panels(packed, width)), w)
    program = jax.jit(lambda x, w: kernels.matmul(x, w, panels=width))
    assert "meditron_cpu_matmul" in str(jax.make_jaxpr(program)(x, packed))
    got = np.asarray(program(x, packed))
    want = x.astype(np.float64) @ w
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
    if 2 <= m <= 32:
        row_major = jax.jit(lambda x, w: kernels.matmul(x, w, impl="cpu_native"))(x, w)
        np.testing.assert_array_equal(got, np.asarray(row_major))


def test_panel_major_weights_elsewhere_are_unpacked_by_xla(monkeypatch):
    """impl "xla", or no kernel: XLA unpacks the weight and its dot gives XLA's product exactly. A weight of a
    contraction over two axes (the attention output's [heads, head_dim, embed]) packs over its 2-D view."""
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((4, 96), np.float32), rng.standard_normal((2, 48, 64), np.float32)
    packed = kernels.pack_panels(jnp.asarray(w), 16, contract=2)
    np.testing.assert_array_equal(np.asarray(kernels.unpack_panels(packed, 16, contract=2)), w)
    want = np.asarray(jnp.matmul(x, w.reshape(96, 64)))
    for impl in ("xla", "auto"):
        if impl == "auto":
            monkeypatch.setattr(cpu_native, "_load", lambda: (False, "off for the test"))
        program = jax.jit(lambda x, w, impl=impl: kernels.matmul(x, w.reshape(96, 64), impl=impl, panels=16))
        assert "meditron_cpu_matmul" not in str(jax.make_jaxpr(program)(x, packed))
        np.testing.assert_array_equal(np.asarray(program(x, packed)), want)
    with pytest.raises(ValueError, match="100 output columns of a weight \\(3, 100\\) do not split into panels of 16"):
        kernels.pack_panels(jnp.zeros((3, 100)), 16)


def test_panels_of_another_width_are_refused():
    """Weights packed for another build of the kernel (16 columns with AVX2, 32 with AVX-512) are an error,
    not a wrong product."""
    other = 48
    with pytest.raises(
        ValueError, match=f"packed in panels of {other} columns; this build takes {cpu_native.panel_width()}"
    ):
        kernels.matmul(jnp.ones((2, 8)), jnp.ones((8, 96)), panels=other)
