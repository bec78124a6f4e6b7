"""The unchunked loss path applies the output head with a joint backward (one optimization barrier over dx and
d_head, so XLA:TPU frees the logit cotangent before the layer stack's backward; docs/performance.md). It must
give autodiff's own values and be the path the default training step takes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meditron_jax.config import get_config
from meditron_jax.model import Llama, init_params
from meditron_jax.model.llama import vocab_logits
from meditron_jax.model.loss import cross_entropy_sums, head_cross_entropy_sums
from meditron_jax.parallel.mesh import MeshConfig, create_mesh
from meditron_jax.train import TrainStep, make_optimizer

CFG = get_config("tiny").replace(vocab_size=500)  # padded to 512: the slice of the padded columns is in the VJP


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_joint_backward_equals_autodiff(dtype):
    cfg = CFG.replace(dtype=dtype)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 500, (2, 16)), jnp.int32)
    targets = jnp.asarray(rng.integers(0, 500, (2, 16)), jnp.int32)
    weights = jnp.asarray(rng.random((2, 16)) > 0.2, jnp.float32)
    x, head = jax.jit(lambda p, t: Llama(cfg).apply({"params": p}, t, return_hidden=True))(init_params(cfg), tokens)

    def joint(x, head):  # loss_chunk_size=0: one chunk, through the joint backward
        return head_cross_entropy_sums(cfg, x, head, targets, weights, vocab_logits)[0]

    def plain(x, head):  # jax.grad straight through the head's einsum and slice
        return cross_entropy_sums(vocab_logits(cfg, x, head), targets, weights)[0]

    assert "optimization_barrier" in str(jax.make_jaxpr(jax.grad(joint, (0, 1)))(x, head))
    assert "optimization_barrier" not in str(jax.make_jaxpr(jax.grad(plain, (0, 1)))(x, head))
    (v_joint, g_joint), (v_plain, g_plain) = (jax.jit(jax.value_and_grad(f, (0, 1)))(x, head) for f in (joint, plain))
    # The same operations in the same order (the backward is jax.vjp of the same function): bit for bit.
    np.testing.assert_array_equal(np.asarray(v_joint), np.asarray(v_plain))
    for got, want in zip(g_joint, g_plain, strict=True):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def test_default_step_takes_the_joint_backward():
    mesh = create_mesh(MeshConfig(), jax.devices()[:1])
    step = TrainStep(CFG, mesh, make_optimizer())
    batch = {k: jnp.zeros((2, 16), jnp.int32) for k in ("decoder_input_tokens", "decoder_target_tokens")}
    with step._context():
        jaxpr = jax.make_jaxpr(lambda p, b: step._grads(p, b))(step.abstract_state.params, batch)
    assert "optimization_barrier" in str(jaxpr)
