"""RoPE: the reversal form against Hugging Face's slice-and-concatenate formula, in float32 and with
ModelConfig.rope_in_compute_dtype (the rotation in bfloat16, as transformers does for a bfloat16 model); the
tables built once per forward pass (model.layers.rotary_tables)."""

import jax
import jax.numpy as jnp
import numpy as np

from meditron_jax.config import get_config
from meditron_jax.model.layers import rotary_embedding


def _hf_rope(x, positions, theta, dtype):
    """transformers' LlamaRotaryEmbedding + apply_rotary_pos_emb, written independently: float32 angles, cos and
    sin cast to ``dtype``, q·cos + rotate_half(q)·sin in ``dtype``."""
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    freqs = jnp.asarray(positions, jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)
    x = x.astype(dtype)
    rotated = jnp.concatenate([-x[..., d // 2 :], x[..., : d // 2]], axis=-1)
    return x * cos + rotated * sin


def test_rope_matches_the_hugging_face_formula_in_float32_and_bfloat16():
    rng = np.random.default_rng(0)
    positions = rng.integers(0, 4096, (2, 16))
    x = rng.standard_normal((2, 16, 4, 64)).astype(np.float32)
    ours = jax.jit(rotary_embedding, static_argnums=(2, 3))
    hf = jax.jit(_hf_rope, static_argnums=(2, 3))
    np.testing.assert_allclose(ours(x, positions, 1e4), hf(x, positions, 1e4, jnp.float32), rtol=1e-6, atol=1e-6)
    xb = jnp.asarray(x, jnp.bfloat16)
    got = ours(xb, positions, 1e4, jnp.bfloat16)
    assert got.dtype == jnp.bfloat16
    want = hf(xb, positions, 1e4, jnp.bfloat16)
    # One bfloat16 rounding step apart at most (XLA may keep a fused product in float32 before rounding).
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=2**-7, atol=2**-7)
    # The default float32 rotation of a bfloat16 input differs from it by rounding only.
    f32_rotation = np.asarray(ours(xb, positions, 1e4), np.float32)
    np.testing.assert_allclose(f32_rotation, np.asarray(got, np.float32), rtol=2**-6, atol=2**-6)


def test_flag_is_inert_for_a_float32_model():
    from meditron_jax.model import Llama, init_params

    cfg = get_config("tiny")
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (1, 12)).astype(np.int32)
    params = init_params(cfg, seed=0)
    run = lambda c: jax.jit(lambda p, t: Llama(c).apply({"params": p}, t))(params, tokens)  # noqa: E731
    np.testing.assert_array_equal(np.asarray(run(cfg)), np.asarray(run(cfg.replace(rope_in_compute_dtype=True))))


def test_tables_given_equal_positions_and_the_cpu_step_computes_them_once():
    """The tables Llama builds once give the rotation bit for bit; compiled for CPU, a training step's
    gradient of a 3-layer model holds cos only in the tables' conditional (2 branches), not one per rotation
    (there are 12: q and k, 3 layers, forward and backward) as when each layer computed its own."""
    from meditron_jax.model import Llama, init_params
    from meditron_jax.model.layers import rotary_tables

    rng = np.random.default_rng(2)
    positions = jnp.asarray(rng.integers(0, 4096, (2, 16)), jnp.int32)
    x = jnp.asarray(rng.standard_normal((2, 16, 4, 64)).astype(np.float32))
    by_tables = jax.jit(lambda x, p: rotary_embedding(x, rotary_tables(p, 64, 1e4), 1e4))(x, positions)
    np.testing.assert_array_equal(
        np.asarray(by_tables), np.asarray(jax.jit(rotary_embedding, static_argnums=2)(x, positions, 1e4))
    )

    cfg = get_config("tiny").replace(num_layers=3)
    params = init_params(cfg, seed=0)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 16)), jnp.int32)
    loss = lambda p: jnp.sum(Llama(cfg).apply({"params": p}, tokens))  # noqa: E731
    hlo = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
    assert hlo.count(" cosine(") == 2, hlo.count(" cosine(")
