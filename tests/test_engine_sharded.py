"""The engine sharded over 8 fake CPU devices (FSDP, tensor parallelism, both) gives the single-device
output token for token, and its decode program compiles for a real TPU topology (libtpu, no TPU)."""

import json

import jax
import pytest

import meditron_jax
from meditron_jax.infer import Engine, SamplingParams
from meditron_jax.infer.aot import compile_decode_step
from meditron_jax.parallel import MeshConfig, create_mesh

# LLVM's codegen level does not change the arithmetic; level 0 cuts CPU compile time (as in
# tests/test_parallel_equivalence.py).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
PROMPTS = ["Once upon a time", "Lily", "The little dog ran to the park and saw a big red ball. He"]


@pytest.fixture(scope="module")
def stories(shared_data):
    return meditron_jax.load(shared_data / "stories260K_hf")


@pytest.fixture(scope="module")
def reference(stories):
    eng = Engine(stories.config, stories.params, stories.tokenizer, compiler_options=FAST_COMPILE)
    greedy = eng.generate(PROMPTS, SamplingParams(max_new_tokens=32, frequency_penalty=1.0))
    sampled = eng.generate(PROMPTS, SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.9, n=2, seed=5))
    return greedy, sampled


# The real stories260K model: 8 heads, 4 KV heads, hidden 64, so tensor=4 splits heads and KV heads and
# fsdp=8 splits the hidden dimension of every weight 8 ways.
@pytest.mark.slow
@pytest.mark.parametrize("mesh_axes, sampled", [("fsdp=8", False), ("fsdp=2,tensor=4", True)])
def test_sharded_generation_equals_single_device(stories, reference, mesh_axes, sampled):
    assert jax.device_count() >= 8, "needs XLA_FLAGS=--xla_force_host_platform_device_count=8 (tests/conftest.py)"
    mesh = create_mesh(MeshConfig.from_flags(mesh_axes, dcn="data=1"), jax.devices()[:8])
    eng = Engine(stories.config, stories.params, stories.tokenizer, mesh=mesh, compiler_options=FAST_COMPILE)
    leaf = eng.params["layers_0"]["mlp"]["gate"]
    assert leaf.sharding.shard_shape(leaf.shape) != leaf.shape  # really split
    assert eng.generate(PROMPTS, SamplingParams(max_new_tokens=32, frequency_penalty=1.0)) == reference[0]
    if sampled:  # same PRNG streams, vocab-sharded logits: the same draws
        assert (
            eng.generate(PROMPTS, SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.9, n=2, seed=5))
            == (reference[1])
        )


def test_sharding_rejects_sequence_axis(stories):
    mesh = create_mesh(MeshConfig.from_flags("fsdp=4,sequence=2", dcn="data=1"), jax.devices()[:8])
    with pytest.raises(ValueError, match="sequence=2"):
        Engine(stories.config, stories.params, mesh=mesh)


def test_decode_compiles_for_tpu_v5e_2x2():
    """The tiny model's decode loop for a v5e 2x2 slice (fsdp=2, tensor=2): it fits, and the decode
    state (KV cache included) is donated: aliased to the output instead of copied."""
    r = compile_decode_step("tiny", "v5e:2x2", batch=8, max_len=512, mesh=MeshConfig.from_flags("fsdp=2,tensor=2"))
    assert r.num_chips == 4 and r.fits
    assert r.params_bytes_per_chip > 0 and r.cache_bytes_per_chip > 0
    assert r.alias_bytes >= r.cache_bytes_per_chip
    assert r.temp_bytes < r.cache_bytes_per_chip
    assert r.total_bytes == r.argument_bytes + r.output_bytes - r.alias_bytes + r.temp_bytes
    assert "fits" in r.summary()


def test_decode_that_does_not_fit_exits_3(capsys):
    """16k rows × 16k cached tokens of the tiny model: ~17 GiB of cache per v5e chip. libtpu refuses the
    program; the CLI reports its numbers and exits 3."""
    from meditron_jax.infer.aot import main

    code = main(
        ["--model", "tiny", "--topology", "v5e:2x2", "--mesh", "fsdp=4", "--batch", "16384", "--max-len", "16384"]
    )
    out = capsys.readouterr().out
    assert code == 3 and "DOES NOT FIT" in out and "RESOURCE_EXHAUSTED" in out
    result = json.loads(out.strip().splitlines()[-1])
    assert result["fits"] is False and result["cache_bytes_per_chip"] > result["hbm_bytes"]
