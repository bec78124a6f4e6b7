"""With gradient accumulation, the training step adds the layers' gradients to their accumulators inside the
backward layer scan (`meditron_jax.model.layer_scan`). It must give the step's values bit for bit: the
gradients, the loss and the updated parameters, against the step that adds the stacked gradients afterwards."""

import jax
import numpy as np
import pytest

from meditron_jax.config import get_config
from meditron_jax.model import init_params
from meditron_jax.parallel import MeshConfig, create_mesh
from meditron_jax.train import OptimizerConfig, TrainStep, make_optimizer

from .batch_utils import packed_batch

OPT = make_optimizer(OptimizerConfig(peak_lr=1e-3, warmup_steps=1, train_steps=4))
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
BATCH, LENGTH = 12, 16


def _steps(cfg, mesh_kw, accum, in_scan, steps=2, compiler_options=FAST_COMPILE):
    n = int(np.prod(list(mesh_kw.values()))) if mesh_kw else 1
    mesh = create_mesh(MeshConfig(**{"ici_fsdp": 1, "dcn_data": 1, **mesh_kw}), jax.devices()[:n])
    step = TrainStep(
        cfg,
        mesh,
        OPT,
        grad_accum_steps=accum,
        return_grads=True,
        compiler_options=compiler_options,
        accumulate_in_layer_scan=in_scan,
    )
    assert step.accumulate_in_layer_scan == in_scan
    state = step.state_from_params(init_params(cfg, 0))
    out = []
    for seed in range(steps):
        state, metrics = step(state, step.shard_batch(packed_batch(seed, cfg.vocab_size, BATCH, LENGTH)))
        out.append(jax.tree.map(np.asarray, (metrics, state.params)))
    return out


@pytest.mark.parametrize(
    "model,dtype,mesh_kw,accum",
    [
        ("tiny", "float32", {}, 2),
        ("tiny", "bfloat16", {}, 3),
        ("tiny", "bfloat16", {"ici_fsdp": 2, "ici_tensor": 2}, 2),
        ("tiny-falcon", "float32", {"ici_fsdp": 2}, 3),
    ],
)
def test_accumulating_in_the_layer_scan_is_bit_exact(model, dtype, mesh_kw, accum):
    cfg = get_config(model, num_layers=3, remat_policy="full", dtype=dtype)
    # XLA:CPU's default emitters, which the suite turns off to compile faster (conftest.py): under the older
    # ones the two programs' float32 sums round differently (up to 1.2e-8), so bit-exactness is their claim.
    opts = {**FAST_COMPILE, "xla_cpu_use_fusion_emitters": True}
    got = _steps(cfg, mesh_kw, accum, in_scan=True, compiler_options=opts)
    want = _steps(cfg, mesh_kw, accum, in_scan=False, compiler_options=opts)
    for (g_metrics, g_params), (w_metrics, w_params) in zip(got, want, strict=True):
        for got_leaf, want_leaf in zip(jax.tree.leaves(g_metrics), jax.tree.leaves(w_metrics), strict=True):
            np.testing.assert_array_equal(got_leaf, want_leaf)
        for got_leaf, want_leaf in zip(jax.tree.leaves(g_params), jax.tree.leaves(w_params), strict=True):
            np.testing.assert_array_equal(got_leaf, want_leaf)
    assert np.any(got[0][0]["grads"]["layers"]["mlp"]["down"] != 0)
    assert got[1][0]["loss"] != got[0][0]["loss"]


def test_when_the_step_accumulates_in_the_layer_scan():
    mesh = create_mesh(MeshConfig(), jax.devices()[:1])
    full = get_config("tiny", remat_policy="full")
    assert TrainStep(full, mesh, OPT, grad_accum_steps=2).accumulate_in_layer_scan  # the default
    assert not TrainStep(full, mesh, OPT).accumulate_in_layer_scan  # no accumulator without accumulation
    others = (full.replace(remat_policy="none"), full.replace(remat_policy="dots"), full.replace(scan_layers=False))
    for other in others:
        assert not TrainStep(other, mesh, OPT, grad_accum_steps=2).accumulate_in_layer_scan


@pytest.mark.parametrize("mesh_kw", [{}, {"ici_fsdp": 2, "ici_tensor": 2}])
def test_unrolled_stacked_layers_give_the_scans_step(mesh_kw, monkeypatch):
    """On CPU without remat the stacked layers run unrolled (`llama._unrolls_stacked_layers`): the same loss,
    gradients and updated parameters as the scan, and the same (stacked) parameter tree. float32; 1e-6
    relative covers a different fusion of the same sums."""
    from meditron_jax.model import llama

    cfg = get_config("tiny", num_layers=3, remat_policy="none", dtype="float32")
    assert llama._unrolls_stacked_layers(cfg, "train")
    assert not llama._unrolls_stacked_layers(cfg.replace(remat_policy="full"), "train")
    assert not llama._unrolls_stacked_layers(cfg, "prefill")
    got = _steps(cfg, mesh_kw, 1, in_scan=False)
    monkeypatch.setattr(llama, "_unrolls_stacked_layers", lambda config, mode: False)
    want = _steps(cfg, mesh_kw, 1, in_scan=False)
    for (g_metrics, g_params), (w_metrics, w_params) in zip(got, want, strict=True):
        assert jax.tree.structure(g_params) == jax.tree.structure(w_params)
        for got_leaf, want_leaf in zip(
            jax.tree.leaves((g_metrics, g_params)), jax.tree.leaves((w_metrics, w_params)), strict=True
        ):
            np.testing.assert_allclose(got_leaf, want_leaf, rtol=1e-6, atol=1e-7)
    assert np.any(got[0][0]["grads"]["layers"]["mlp"]["down"] != 0)
