"""Sharded training equals single-device training on 8 fake CPU devices.

For data, FSDP, tensor and pipeline parallelism alone and in combinations (with the sequence axis, gradient
accumulation and the circular pipeline schedule): one step's loss and gradients match the single-device
result to 1e-5 relative error in float32, and parameters after several optimizer steps agree.
"""

import jax
import numpy as np
import pytest

from meditron_jax.config import get_config
from meditron_jax.model import init_params
from meditron_jax.parallel import MeshConfig, PipelineConfig, create_mesh
from meditron_jax.train import OptimizerConfig, TrainStep, make_optimizer

from .batch_utils import packed_batch

pytestmark = pytest.mark.slow  # multi-second runs: excluded from the quick `-m "not slow"` loop

# 4 layers so that 2 stages × 2 circular repeats each hold one layer; GQA (8 heads, 4 KV heads).
CFG = get_config("tiny", num_layers=4)
OPT = make_optimizer(OptimizerConfig(peak_lr=1e-3, warmup_steps=1, train_steps=4))
BATCH, LENGTH, STEPS = 8, 16, 3
RTOL = 1e-5
# LLVM's codegen optimisation level does not change the HLO's arithmetic; level 0 halves CPU compile time.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
# Adam divides by sqrt(v): rounding differences in the gradients grow a little over a few steps.
PARAM_RTOL = 1e-4


def _batch(seed):
    return packed_batch(seed, CFG.vocab_size, BATCH, LENGTH)


BATCHES = [_batch(i) for i in range(STEPS)]
PARAMS = init_params(CFG, 0)


def _run(mesh_kw, pipeline=None, accum=1):
    """Several sharded optimizer steps → (first step's loss and gradients, every step's loss, final params)."""
    n = int(np.prod(list(mesh_kw.values()))) if mesh_kw else 1
    mesh = create_mesh(MeshConfig(**{"ici_fsdp": 1, "dcn_data": 1, **mesh_kw}), jax.devices()[:n])
    step = TrainStep(
        CFG, mesh, OPT, pipeline=pipeline, grad_accum_steps=accum, return_grads=True, compiler_options=FAST_COMPILE
    )
    state = step.state_from_params(PARAMS)
    losses, first_grads = [], None
    for b in BATCHES:
        state, metrics = step(state, step.shard_batch(b))
        losses.append(float(metrics["loss"]))
        if first_grads is None:
            first_grads = jax.tree.map(np.asarray, step.model_params(metrics["grads"]))
    hlo = None
    if pipeline is not None:  # the compiled program (from the session's compilation cache), for its collectives
        hlo = step.lower(BATCH, LENGTH, keys=tuple(b)).compile().as_text()
    return first_grads, losses, jax.tree.map(np.asarray, step.model_params(state.params)), hlo


@pytest.fixture(scope="module")
def reference():
    return _run({})


def _rel(a, b):
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _assert_close_trees(got, want, rtol):
    errs = jax.tree.map(_rel, got, want)
    worst = max(jax.tree.leaves(errs))
    assert worst <= rtol, f"max relative error {worst:.2e} > {rtol}: {errs}"


CASES = {
    "data8": ({"ici_data": 8}, None, 1),
    "fsdp8": ({"ici_fsdp": 8}, None, 1),
    "tensor4": ({"ici_tensor": 4}, None, 1),
    "pipeline4_gpipe": ({"ici_stage": 4}, PipelineConfig(num_microbatches=4), 1),
    # combinations, with the sequence (context) axis, gradient accumulation and the circular schedule
    "fsdp2_sequence2_tensor2": ({"ici_fsdp": 2, "ici_sequence": 2, "ici_tensor": 2}, None, 1),
    "fsdp4_tensor2_accum2": ({"ici_fsdp": 4, "ici_tensor": 2}, None, 2),
    "data2_pipeline2_tensor2_circular": (
        {"ici_data": 2, "ici_stage": 2, "ici_tensor": 2},
        PipelineConfig(num_microbatches=2, schedule="circular", num_repeats=2),
        1,
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_sharded_training_matches_single_device(name, reference):
    ref_grads, ref_losses, ref_params, _ = reference
    grads, losses, params, hlo = _run(*CASES[name])
    # one step: loss and gradients
    assert abs(losses[0] - ref_losses[0]) <= RTOL * abs(ref_losses[0]), (losses[0], ref_losses[0])
    _assert_close_trees(grads, ref_grads, RTOL)
    # several steps: every loss and the final parameters
    np.testing.assert_allclose(losses, ref_losses, rtol=RTOL)
    _assert_close_trees(params, ref_params, PARAM_RTOL)
    assert ref_losses[-1] != ref_losses[0]  # the steps did change the parameters
    if hlo is not None:  # stages hand activations to their neighbours: collective-permute, not all-gather
        assert "collective-permute" in hlo


def test_init_state_is_born_sharded():
    """Random initialisation straight into the pipeline layout's shardings (stage × fsdp × tensor)."""
    mesh = create_mesh(MeshConfig(ici_stage=2, ici_fsdp=2, ici_tensor=2, dcn_data=1))
    step = TrainStep(CFG, mesh, OPT, pipeline=PipelineConfig(num_microbatches=2), compiler_options=FAST_COMPILE)
    state = step.init_state(jax.random.PRNGKey(1))
    assert int(state.step) == 0
    for leaf, sharding in zip(jax.tree.leaves(state), jax.tree.leaves(step.state_shardings), strict=True):
        assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim)
    gate = state.params["layers"]["mlp"]["gate"]
    assert gate.shape == (1, 2, 2, CFG.hidden_size, CFG.intermediate_size)
    assert gate.addressable_shards[0].data.shape == (1, 1, 2, CFG.hidden_size // 2, CFG.intermediate_size // 2)
    std = float(np.std(np.asarray(gate)))
    assert 0.01 < std < 0.05  # Llama's normal(0.02) initialisation
