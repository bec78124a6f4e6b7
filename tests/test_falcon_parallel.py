"""Sharded Falcon training equals single-device training on 8 fake CPU devices (the pattern of
test_parallel_equivalence): FSDP, tensor parallelism (KV heads replicated where tensor > KV heads) and the
pipeline, on both Falcon layouts. One step's loss and gradients to 1e-5 relative error in float32; parameters
after three AdamW steps to 1e-4 (Adam's 1/sqrt(v) amplifies rounding differences a little)."""

import functools
import json

import jax
import numpy as np
import pytest

from meditron_jax.config import get_config
from meditron_jax.model import init_params
from meditron_jax.parallel import MeshConfig, PipelineConfig, create_mesh
from meditron_jax.train import OptimizerConfig, TrainStep, make_optimizer

from .batch_utils import packed_batch

pytestmark = pytest.mark.slow  # several CPU compiles of a sharded train step

CONFIGS = {
    # 40B layout: 8 query heads in 2 KV groups, two LayerNorms, untied head
    "new": get_config("tiny-falcon", num_layers=4),
    # 7B layout: multi-query, one LayerNorm, tied head
    "mqa": get_config("tiny-falcon-mqa", num_layers=4, tie_word_embeddings=True),
}
OPT = make_optimizer(OptimizerConfig(peak_lr=1e-3, warmup_steps=1, train_steps=4))
BATCH, LENGTH, STEPS = 8, 16, 3
RTOL, PARAM_RTOL = 1e-5, 1e-4
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _batch(seed, vocab):
    return packed_batch(seed, vocab, BATCH, LENGTH)


@functools.cache
def _run(layout, mesh_items=(), pipeline=None):
    cfg = CONFIGS[layout]
    mesh_kw = dict(mesh_items)
    n = int(np.prod(list(mesh_kw.values()))) if mesh_kw else 1
    mesh = create_mesh(MeshConfig(**{"ici_fsdp": 1, "dcn_data": 1, **mesh_kw}), jax.devices()[:n])
    step = TrainStep(cfg, mesh, OPT, pipeline=pipeline, return_grads=True, compiler_options=FAST_COMPILE)
    state = step.state_from_params(init_params(cfg, 0))
    losses, first_grads = [], None
    for i in range(STEPS):
        state, metrics = step(state, step.shard_batch(_batch(i, cfg.vocab_size)))
        losses.append(float(metrics["loss"]))
        if first_grads is None:
            first_grads = jax.tree.map(np.asarray, step.model_params(metrics["grads"]))
    return first_grads, losses, jax.tree.map(np.asarray, step.model_params(state.params))


def _rel(a, b):
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _worst(got, want):
    return max(jax.tree.leaves(jax.tree.map(_rel, got, want)))


CASES = {
    "new-fsdp8": ("new", (("ici_fsdp", 8),), None),
    "new-fsdp2_tensor4": ("new", (("ici_fsdp", 2), ("ici_tensor", 4)), None),  # 2 KV heads over tensor 4
    "new-pipeline2_fsdp2_tensor2": (
        "new",
        (("ici_stage", 2), ("ici_fsdp", 2), ("ici_tensor", 2)),
        PipelineConfig(num_microbatches=2),
    ),
    "mqa-fsdp4_tensor2": ("mqa", (("ici_fsdp", 4), ("ici_tensor", 2)), None),  # 1 KV head, replicated
}


@pytest.mark.parametrize("name", list(CASES))
def test_sharded_falcon_training_matches_single_device(name):
    layout, mesh_items, pipeline = CASES[name]
    ref_grads, ref_losses, ref_params = _run(layout)
    grads, losses, params = _run(layout, mesh_items, pipeline)
    assert abs(losses[0] - ref_losses[0]) <= RTOL * abs(ref_losses[0]), (losses[0], ref_losses[0])
    assert sorted(grads) == sorted(ref_grads)
    print(f"{name}: gradients {_worst(grads, ref_grads):.1e}, parameters {_worst(params, ref_params):.1e} (rel. err)")
    assert _worst(grads, ref_grads) <= RTOL
    np.testing.assert_allclose(losses, ref_losses, rtol=RTOL)
    assert _worst(params, ref_params) <= PARAM_RTOL
    assert ref_losses[-1] != ref_losses[0]  # the steps changed the parameters


def test_falcon_train_step_compiles_for_a_tpu_slice(capsys):
    """The AOT path of docs/parallelism.md §7 (libtpu, no TPU): the 40B layout's training step, FSDP × tensor
    with the 2 KV heads replicated over tensor 4, compiles for TPU and every parameter has a sharding."""
    from meditron_jax.cli import aot_compile

    flags = ["--model", "tiny-falcon", "--topology", "v5p-16", "--seq_len", "128", "--global_batch", "8"]
    code = aot_compile.main([*flags, "--mesh", "fsdp=2,tensor=4", "--report"])
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    assert code == 0 and result["fits"] is True and result["num_chips"] == 8
    for name in ("layers/attention_norm/bias", "layers/mlp_norm/scale", "layers/mlp/up", "final_norm/bias"):
        assert any(line.startswith(name) for line in lines), name


@pytest.mark.parametrize("layout, mesh_axes", [("new", "fsdp=2,tensor=4"), ("mqa", "fsdp=4,tensor=2")])
def test_sharded_falcon_generation_equals_single_device(layout, mesh_axes):
    """The engine (unrolled layers, KV cache) on 8 devices, KV heads replicated where tensor > KV heads."""
    from meditron_jax.infer import Engine, SamplingParams

    cfg = CONFIGS[layout]
    params = init_params(cfg, 3)
    prompts = [[1, 5, 9, 14], [1, 200, 3], [1, 7, 7, 7, 7, 7, 2, 40]]
    sampling = SamplingParams(max_new_tokens=12, temperature=0.0)
    want = Engine(cfg, params, compiler_options=FAST_COMPILE).generate_ids(prompts, sampling)
    mesh = create_mesh(MeshConfig.from_flags(mesh_axes, dcn="data=1"), jax.devices()[:8])
    eng = Engine(cfg, params, mesh=mesh, compiler_options=FAST_COMPILE)
    up = eng.params["layers_0"]["mlp"]["up"]
    assert up.sharding.shard_shape(up.shape) != up.shape  # really split
    assert eng.generate_ids(prompts, sampling) == want
