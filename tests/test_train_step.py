"""The loss and the optimizer: cross-entropy (value and gradient) against log-softmax, MEDITRON's schedule
(warmup, cosine with a 2×-train-steps horizon), weight-decay mask, clipping, batch-key validation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from meditron_jax.train import OptimizerConfig, TrainStep, cross_entropy_sums, learning_rate_schedule, make_optimizer
from meditron_jax.train.optimizer import decay_mask
from meditron_jax.train.step import _complete


def test_cross_entropy_matches_log_softmax_and_its_gradient():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(3, 7, 50)).astype(np.float32) * 3)
    targets = jnp.asarray(rng.integers(0, 50, (3, 7)))
    weights = jnp.asarray((rng.random((3, 7)) > 0.3).astype(np.float32))

    def ref(lg, w):
        ce = -jnp.take_along_axis(jax.nn.log_softmax(lg), targets[..., None], -1)[..., 0]
        return jnp.sum(ce * w)

    ours = lambda lg, w: cross_entropy_sums(lg, targets, w)[0]
    np.testing.assert_allclose(ours(logits, weights), ref(logits, weights), rtol=1e-6)
    assert float(cross_entropy_sums(logits, targets, weights)[1]) == float(weights.sum())
    for got, want in zip(jax.grad(ours, (0, 1))(logits, weights), jax.grad(ref, (0, 1))(logits, weights), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-6)


def _recipe_optimizer(size: str) -> OptimizerConfig:
    """The OptimizerConfig that gin/runs/pretrain_{size}.gin gives the trainer (train_steps from TRAIN_STEPS)."""
    import dataclasses

    import gin

    import meditron_jax.data.pipeline  # noqa: F401  (the recipes' configurables)
    import meditron_jax.data.tasks  # noqa: F401
    import meditron_jax.train.trainer  # noqa: F401
    from meditron_jax.resources import gin_dir

    gin.clear_config()
    try:
        gin.add_config_file_search_path(str(gin_dir()))
        gin.parse_config_files_and_bindings([f"runs/pretrain_{size}.gin"], ["MODEL_DIR='/unused'"])
        return dataclasses.replace(OptimizerConfig(), train_steps=gin.query_parameter("%TRAIN_STEPS"))
    finally:
        gin.clear_config()


PRESETS = {"7b": _recipe_optimizer("7b"), "70b": _recipe_optimizer("70b")}


def test_meditron_schedule_warmup_then_half_a_cosine():
    cfg = PRESETS["7b"]
    lr = learning_rate_schedule(cfg)
    assert float(lr(0)) == 0.0
    assert float(lr(1000)) == pytest.approx(1.5e-4)  # linear warmup
    assert float(lr(2000)) == pytest.approx(3e-4)  # peak
    # Training stops half-way down a cosine twice as long as the run: 3e-5 + 0.5 × 2.7e-4 ≈ 1.6e-4 for 7B
    # (MEDITRON.md §3)
    assert float(lr(cfg.train_steps)) == pytest.approx(1.65e-4, rel=1e-3)
    assert float(lr(2 * cfg.train_steps)) == pytest.approx(3e-5)  # floor: 10% of peak, reached at the horizon
    assert PRESETS["70b"].peak_lr == 1.5e-4 and PRESETS["70b"].train_steps == 23_000
    assert learning_rate_schedule(OptimizerConfig(horizon_factor=1.0))(14_252) == pytest.approx(3e-5)


@pytest.mark.slow
def test_adamw_hyperparameters_decay_mask_and_clipping():
    params = {
        "layers": {"attention_norm": {"scale": jnp.ones((2, 4))}, "mlp": {"gate": jnp.ones((2, 4, 8))}},
        "final_norm": {"scale": jnp.ones(4)},
        "embedding": jnp.ones((16, 4)),
    }
    mask = decay_mask(params)
    assert mask["embedding"] and mask["layers"]["mlp"]["gate"]
    assert not mask["final_norm"]["scale"] and not mask["layers"]["attention_norm"]["scale"]
    cfg = OptimizerConfig(peak_lr=1.0, warmup_steps=0, train_steps=10, clip_norm=1.0)
    opt = make_optimizer(cfg)
    huge = jax.tree.map(lambda p: 1e6 * jnp.ones_like(p), params)
    zero = jax.tree.map(jnp.zeros_like, params)
    # clipped gradient: Adam's first update is ±lr whatever the scale; decay adds lr·wd·p where masked
    updates, _ = opt.update(huge, opt.init(params), params)
    # (eps 1e-5 next to clipped per-element gradients of ~0.08 shifts the first update by ~1e-4)
    np.testing.assert_allclose(updates["final_norm"]["scale"], -1.0, rtol=1e-3)
    np.testing.assert_allclose(updates["embedding"], -1.0 - 0.1, rtol=1e-3)
    updates, _ = opt.update(zero, opt.init(params), params)
    np.testing.assert_allclose(updates["embedding"], -0.1, rtol=1e-6)  # weight decay alone
    np.testing.assert_allclose(updates["final_norm"]["scale"], 0.0)
    assert optax.global_norm(huge) > 1.0


@pytest.mark.parametrize("scale", [0.01, 30.0])  # under the limit: untouched; over it: scaled down
def test_clipping_matches_torch_clip_grad_norm(scale):
    """Megatron-LLM's and torch's rule (coefficient max_norm / (norm + 1e-6), applied when below 1), against
    torch.nn.utils.clip_grad_norm_ on the same gradients; the norm given as the extra argument, as TrainStep
    passes it, gives the same result as the norm computed from the gradients."""
    import torch

    from meditron_jax.train.optimizer import clip_by_global_norm

    rng = np.random.default_rng(0)
    grads = {"a": rng.normal(size=(4, 5)).astype(np.float32) * scale, "b": rng.normal(size=7).astype(np.float32)}
    tensors = [torch.nn.Parameter(torch.zeros(g.shape)) for g in grads.values()]
    for t, g in zip(tensors, grads.values(), strict=True):
        t.grad = torch.from_numpy(g.copy())
    torch_norm = float(torch.nn.utils.clip_grad_norm_(tensors, max_norm=1.0))
    clip = clip_by_global_norm(1.0)
    jgrads = jax.tree.map(jnp.asarray, grads)
    ours, _ = clip.update(jgrads, clip.init(jgrads))
    given, _ = clip.update(jgrads, clip.init(jgrads), global_norm=optax.global_norm(jgrads))
    np.testing.assert_allclose(float(optax.global_norm(jgrads)), torch_norm, rtol=1e-6)
    for name, t in zip(grads, tensors, strict=True):
        # float32 norms summed in another order: a few ulps
        np.testing.assert_allclose(ours[name], t.grad.numpy(), rtol=1e-6, atol=0)
        np.testing.assert_array_equal(given[name], ours[name])
    if torch_norm < 1.0:  # not clipped: every gradient bit for bit
        for name in grads:
            np.testing.assert_array_equal(ours[name], grads[name])
    else:
        assert float(optax.global_norm(ours)) == pytest.approx(1.0, rel=1e-5)


def test_batch_keys_are_checked():
    with pytest.raises(KeyError, match="missing \\['decoder_target_tokens'\\]"):
        _complete({"decoder_input_tokens": np.zeros((2, 4))})
    with pytest.raises(KeyError, match="unknown \\['inputs'\\]"):
        _complete({"decoder_input_tokens": 0, "decoder_target_tokens": 0, "inputs": 0})
    assert TrainStep.__call__.__doc__
