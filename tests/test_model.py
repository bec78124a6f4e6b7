"""Model options (remat, dtypes, packing) and the KV cache, each against a plain computation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meditron_jax.config import get_config
from meditron_jax.infer.generate import left_pad
from meditron_jax.model import Llama, init_cache, init_params

CFG = get_config("tiny", num_layers=3)
PARAMS = init_params(CFG, 0)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _forward(params, tokens, positions=None, segment_ids=None, *, cfg=CFG):
    return Llama(cfg).apply({"params": params}, tokens, positions, segment_ids)


def _loss(cfg, params, tokens):
    logits = Llama(cfg).apply({"params": params}, tokens)
    logp = jax.nn.log_softmax(logits[:, :-1])
    return -jnp.take_along_axis(logp, tokens[:, 1:, None], -1).mean()


def _unstack(params, n):
    """Scanned params → unrolled layout (layers_0, layers_1, …)."""
    out = {k: v for k, v in params.items() if k != "layers"}
    for i in range(n):
        out[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], params["layers"])
    return out


@pytest.fixture(scope="module")
def reference_loss_and_grads():
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, CFG.vocab_size, (2, 32)))
    return tokens, jax.jit(jax.value_and_grad(functools.partial(_loss, CFG)))(PARAMS, tokens)


@pytest.mark.parametrize(
    "remat,scan", [("none", False), ("full", True), ("dots_with_no_batch_dims", False), ("minimal", True)]
)
def test_remat_and_unrolled_give_the_same_loss_and_grads(reference_loss_and_grads, remat, scan):
    tokens, (base_loss, base_grads) = reference_loss_and_grads
    cfg = CFG.replace(remat_policy=remat, scan_layers=scan)
    params = PARAMS if scan else _unstack(PARAMS, CFG.num_layers)
    loss, grads = jax.jit(jax.value_and_grad(functools.partial(_loss, cfg)))(params, tokens)
    want = base_grads if scan else _unstack(base_grads, CFG.num_layers)
    np.testing.assert_allclose(loss, base_loss, rtol=1e-6)
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-7)


@pytest.mark.slow
def test_bfloat16_params_and_compute():
    tokens = jnp.asarray(np.random.RandomState(1).randint(0, CFG.vocab_size, (2, 32)))
    ref = _forward(PARAMS, tokens)
    cfg = CFG.replace(param_dtype="bfloat16", dtype="bfloat16")
    bf_params = init_params(cfg, 0)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(bf_params))
    out = _forward(bf_params, tokens, cfg=cfg)
    assert out.dtype == jnp.float32  # logits stay float32 for the loss
    # bf16 weights and activations: ~3 significant digits, so compare distributions, not bits.
    rel = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
    assert rel < 3e-2, rel
    # float32 params with bfloat16 compute (the usual mixed-precision recipe)
    mixed = _forward(PARAMS, tokens, cfg=CFG.replace(dtype="bfloat16"))
    assert float(jnp.linalg.norm(mixed - ref) / jnp.linalg.norm(ref)) < 3e-2


def test_packed_segments_equal_separate_sequences():
    rng = np.random.RandomState(2)
    a, b = rng.randint(0, CFG.vocab_size, 20), rng.randint(0, CFG.vocab_size, 12)
    packed = np.concatenate([a, b, np.zeros(8, int)])[None]
    segments = np.array([[1] * 20 + [2] * 12 + [0] * 8])
    positions = np.array([list(range(20)) + list(range(12)) + [0] * 8])
    out = _forward(PARAMS, jnp.asarray(packed), jnp.asarray(positions), jnp.asarray(segments))
    alone_a = _forward(PARAMS, jnp.asarray(a[None]))
    alone_b = _forward(PARAMS, jnp.asarray(b[None]))
    np.testing.assert_allclose(out[0, :20], alone_a[0], atol=1e-5)
    np.testing.assert_allclose(out[0, 20:32], alone_b[0], atol=1e-5)
    # Without segment ids the second document would see the first: the mask is doing real work.
    leaky = _forward(PARAMS, jnp.asarray(packed), jnp.asarray(positions))
    assert np.abs(leaky[0, 20:32] - alone_b[0]).max() > 1e-3


@pytest.mark.slow
def test_kv_cache_decode_equals_full_forward_for_ragged_batch():
    """Prefill left-padded prompts of different lengths, then feed fixed tokens one step at a time;
    every step's logits must equal a full forward pass over that row alone."""
    rng = np.random.RandomState(3)
    prompts = [list(rng.randint(3, CFG.vocab_size, n)) for n in (5, 11, 1)]
    steps = 6
    follow = rng.randint(3, CFG.vocab_size, (len(prompts), steps))
    tokens, real, positions = left_pad(prompts)
    model = Llama(CFG)
    cache = init_cache(CFG, len(prompts), tokens.shape[1] + steps)
    prefill = jax.jit(
        lambda c, t, p, r: model.apply({"params": PARAMS, "cache": c}, t, p, r, mode="prefill", mutable=["cache"])
    )
    logits, state = prefill(cache, tokens, positions, real)
    got = [logits[:, -1]]
    pos = positions[:, -1:] + 1
    decode = jax.jit(
        lambda c, t, p: model.apply(
            {"params": PARAMS, "cache": c}, t, p, jnp.ones_like(p), mode="decode", mutable=["cache"]
        )
    )
    for s in range(steps):
        step_logits, state = decode(state["cache"], jnp.asarray(follow[:, s : s + 1]), pos)
        got.append(step_logits[:, -1])
        pos = pos + 1
    got = np.stack(got, 1)  # [b, steps + 1, vocab]
    for i, p in enumerate(prompts):
        full = _forward(PARAMS, jnp.asarray([p + list(follow[i])]))[0]
        want = full[len(p) - 1 :]
        assert np.abs(got[i] - np.asarray(want)).max() <= 1e-5, f"row {i}"


def test_bad_mode_and_config_errors():
    with pytest.raises(ValueError, match="mode 'sample' is not one of"):
        Llama(CFG).apply({"params": PARAMS}, jnp.zeros((1, 4), jnp.int32), mode="sample")
    with pytest.raises(ValueError, match="num_heads 6 is not a multiple of num_kv_heads 4"):
        CFG.replace(num_heads=6, hidden_size=48)
    with pytest.raises(ValueError, match="remat_policy 'some' is not one of"):
        CFG.replace(remat_policy="some")
    with pytest.raises(KeyError, match="unknown model 'llama3'"):
        get_config("llama3")


def test_presets_have_the_published_sizes():
    # Llama-2 parameter counts (Touvron et al. 2023): 6.74B, 13.0B, 69.0B.
    assert round(get_config("llama2-7b").num_params() / 1e9, 2) == 6.74
    assert round(get_config("llama2-13b").num_params() / 1e9, 1) == 13.0
    assert round(get_config("llama2-70b").num_params() / 1e9, 1) == 69.0
    m7 = get_config("meditron-7b")
    assert (m7.vocab_size, m7.padded_vocab_size, m7.max_position_embeddings) == (32017, 32128, 2048)
    m70 = get_config("meditron-70b")
    assert (m70.num_heads, m70.num_kv_heads, m70.max_position_embeddings) == (64, 8, 4096)
