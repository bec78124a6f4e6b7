"""The chunked output head + cross-entropy (ModelConfig.loss_chunk_size) against the unchunked step and an
independent log-softmax loss over the model's full logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meditron_jax.config import ConfigError, get_config
from meditron_jax.model import Llama, init_params
from meditron_jax.model.llama import vocab_logits
from meditron_jax.model.loss import head_cross_entropy_sums
from meditron_jax.parallel.mesh import MeshConfig, create_mesh
from meditron_jax.train import TrainStep, make_optimizer

FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
CFG = get_config("tiny")  # vocab 512 → padded 512; use 500 below so the padded columns are exercised


def _batch(length=32, seed=0):
    rng = np.random.default_rng(seed)
    tok = rng.integers(0, 500, (2, length + 1)).astype(np.int32)
    return {
        "decoder_input_tokens": tok[:, :-1],
        "decoder_target_tokens": tok[:, 1:],
        "decoder_loss_weights": (rng.random((2, length)) > 0.2).astype(np.float32),
    }


def _step_metrics(cfg, batch):
    mesh = create_mesh(MeshConfig(), jax.devices()[:1])
    step = TrainStep(cfg, mesh, make_optimizer(), return_grads=True, donate=False, compiler_options=FAST)
    state = step.init_state(jax.random.PRNGKey(0))
    return step(state, step.shard_batch(batch))[1]


def test_chunked_step_equals_unchunked_step():
    cfg = CFG.replace(vocab_size=500)
    batch = _batch()
    plain, chunked = _step_metrics(cfg, batch), _step_metrics(cfg.replace(loss_chunk_size=8), batch)
    # Float32 sums over 4 chunks instead of one: rounding-level differences only.
    np.testing.assert_allclose(float(chunked["loss"]), float(plain["loss"]), rtol=1e-6)
    assert float(chunked["tokens"]) == float(plain["tokens"])
    for a, b in zip(jax.tree.leaves(plain["grads"]), jax.tree.leaves(chunked["grads"]), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)


def test_chunked_loss_and_head_gradient_against_log_softmax():
    cfg = CFG.replace(vocab_size=500, loss_chunk_size=4)
    batch = _batch(length=16, seed=1)
    params = init_params(cfg, seed=1)
    hidden = jax.jit(lambda p, t: Llama(cfg).apply({"params": p}, t, return_hidden=True))
    x, head = hidden(params, batch["decoder_input_tokens"])
    targets, weights = jnp.asarray(batch["decoder_target_tokens"]), jnp.asarray(batch["decoder_loss_weights"])

    def ours(x, head):
        return head_cross_entropy_sums(cfg, x, head, targets, weights, vocab_logits)[0]

    def reference(x, head):  # independent: full logits over the real vocabulary, log_softmax, gather
        logits = jnp.einsum("bld,dv->blv", x, head[:, :500])
        ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
        return jnp.sum(ce * weights)

    (v_ours, g_ours), (v_ref, g_ref) = (jax.jit(jax.value_and_grad(f, (0, 1)))(x, head) for f in (ours, reference))
    np.testing.assert_allclose(float(v_ours), float(v_ref), rtol=1e-6)
    for got, want in zip(g_ours, g_ref, strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)
    # The padded vocabulary columns of the head get no gradient.
    assert not np.any(np.asarray(g_ours[1])[:, 500:])


def test_chunk_must_divide_the_sequence_and_be_non_negative():
    with pytest.raises(ValueError, match="loss_chunk_size=5 does not divide the sequence length 32"):
        _step_metrics(CFG.replace(loss_chunk_size=5), _batch())
    with pytest.raises(ConfigError, match="loss_chunk_size"):
        CFG.replace(loss_chunk_size=-1)
