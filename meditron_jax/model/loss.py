"""Token-level cross-entropy sums, over given logits or fused with the output head in sequence chunks.

``cross_entropy_sums`` takes float32 logits [..., vocab]. ``head_cross_entropy_sums`` takes the normed
hidden state and the head matrix and computes the logits ``chunk`` sequence positions at a time, in a scan
whose body is rematerialised: the [tokens, vocab] logits (float32, the step's largest temporaries at 7B and
70B) never exist in full, forward or backward. The cost is one more head matmul (the backward recomputes
each chunk's logits). Per token the numbers are those of the unchunked path; the sums over chunks (the loss,
the head's gradient) add in a different order, so results differ from it by rounding only
(tests/test_train_step.py bounds it).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from meditron_jax.config import ModelConfig
from meditron_jax.model.layers import constrain


def cross_entropy_sums(logits, targets, weights):
    """(Σ w·CE, Σ w) over float32 logits [..., vocab] and integer targets [...].

    A masked sum instead of a gather, so vocab-sharded logits stay sharded. A custom VJP keeps one
    vocab-sized residual for backward (the logits) where autodiff of the same expression keeps three (exp,
    mask, select). XLA's TPU compile of the 7B step reaches the same peak either way (measured); this is so
    that the memory does not depend on the compiler finding that.
    """
    weights = weights.astype(jnp.float32)
    return _weighted_ce(logits.astype(jnp.float32), targets, weights), jnp.sum(weights)


def _target_mask(logits, targets):
    return jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1) == targets[..., None]


def _ce_terms(logits, targets):
    lse = jax.nn.logsumexp(logits, axis=-1)
    return lse, lse - jnp.sum(jnp.where(_target_mask(logits, targets), logits, 0.0), axis=-1)


@jax.custom_vjp
def _weighted_ce(logits, targets, weights):
    return jnp.sum(_ce_terms(logits, targets)[1] * weights)


def _weighted_ce_fwd(logits, targets, weights):
    lse, ce = _ce_terms(logits, targets)
    return jnp.sum(ce * weights), (logits, lse, ce, targets, weights)


def _weighted_ce_bwd(res, g):
    logits, lse, ce, targets, weights = res
    probs = jnp.exp(logits - lse[..., None])
    d_logits = (probs - _target_mask(logits, targets).astype(jnp.float32)) * (g * weights)[..., None]
    return d_logits, np.zeros(targets.shape, jax.dtypes.float0), g * ce


_weighted_ce.defvjp(_weighted_ce_fwd, _weighted_ce_bwd)


def _head_with_joint_backward(config: ModelConfig, logits_fn):
    """``logits_fn(config, x, head)`` whose backward returns the two cotangents through one optimization barrier.

    Values are autodiff's own (the backward is ``jax.vjp`` of the same function). Without the barrier XLA:TPU
    scheduled the head's gradient (x^T · d_logits) after the whole layer stack's backward, so the bf16
    [tokens, vocab] logit cotangent stayed live under every layer's backward working set (+0.33 GiB per chip
    at 70B on v4-256, docs/performance.md). Tied to dx, which the layer stack's backward needs first, it is
    computed and freed before that.
    """

    def apply(x, head):
        return logits_fn(config, x, head)

    def fwd(x, head):
        return apply(x, head), (x, head)

    def bwd(res, g):
        _, pullback = jax.vjp(apply, *res)
        return tuple(jax.lax.optimization_barrier(pullback(g)))

    joint = jax.custom_vjp(apply)
    joint.defvjp(fwd, bwd)
    return joint


def head_cross_entropy_sums(config: ModelConfig, x, head, targets, weights, logits_fn):
    """(Σ w·CE, Σ w) of ``logits_fn(config, x, head)`` without materialising all of its logits at once.

    x: [batch, length, embed] (the final norm's output); targets, weights: [batch, length]. The sequence is
    cut into ``config.loss_chunk_size`` positions per chunk (0 or ≥ length: one chunk, the plain path).
    """
    chunk = config.loss_chunk_size
    b, length = targets.shape
    weights = weights.astype(jnp.float32)
    if chunk <= 0 or chunk >= length:
        return cross_entropy_sums(_head_with_joint_backward(config, logits_fn)(x, head), targets, weights)
    if length % chunk:
        raise ValueError(
            f"ModelConfig.loss_chunk_size={chunk} does not divide the sequence length {length}; use a divisor "
            "or 0 (no chunking)"
        )
    n = length // chunk

    def chunks(a):  # [b, length, ...] -> [n, b, chunk, ...]: scanned over n, batch sharding kept
        return jnp.swapaxes(a.reshape(b, n, chunk, *a.shape[2:]), 0, 1)

    @jax.checkpoint
    def body_sums(head, xc, tc, wc):
        # The constraint's transpose keeps each chunk's head gradient, and so the scan's float32 accumulator
        # of it, in the head's own sharding instead of a full [embed, vocab] copy per device.
        head = constrain(head, ("embed", "vocab"))
        return _weighted_ce(logits_fn(config, xc, head).astype(jnp.float32), tc, wc)

    def body(total, inputs):
        return total + body_sums(head, *inputs), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (chunks(x), chunks(targets), chunks(weights)))
    return total, jnp.sum(weights)
