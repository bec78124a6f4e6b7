"""Falcon against transformers' PyTorch FalconForCausalLM (the independent implementation), float32.

Both layouts of the published checkpoints (7B: multi-query, one LayerNorm, parallel; 40B/180B: the new
decoder, grouped KV, ln_attn + ln_mlp) and the other two transformers can build with rotary embeddings
(plain MHA, parallel or sequential). Logits tolerance 1e-4 absolute: both sides compute in float32 with
different reduction orders (observed ~1e-6).
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import linen as nn

from meditron_jax.config import get_config
from meditron_jax.convert import hf_falcon
from meditron_jax.convert.hf import ConversionError, config_from_hf, load_hf_params, read_hf_config, save_hf
from meditron_jax.model import Llama, abstract_params, init_params, logical_axes

from .hf_utils import assert_layers_match_transformers, hf_logits

PROMPT_LEN = 512

# transformers FalconConfig keyword arguments of each layout (on top of the tiny shape below).
LAYOUTS = {
    "7b-mqa": dict(new_decoder_architecture=False, multi_query=True, parallel_attn=True, num_attention_heads=4),
    "40b-new": dict(new_decoder_architecture=True, num_kv_heads=2, num_attention_heads=8),
    "new-1ln": dict(new_decoder_architecture=True, num_kv_heads=2, num_attention_heads=4, num_ln_in_parallel_attn=1),
    "mha-parallel": dict(new_decoder_architecture=False, multi_query=False, parallel_attn=True, num_attention_heads=4),
    "mha-sequential": dict(
        new_decoder_architecture=False, multi_query=False, parallel_attn=False, num_attention_heads=4
    ),
}


def random_hf_falcon(tmp_path, layout, *, tied=True, layers=2, seed=0):
    """Save a random FalconForCausalLM (LayerNorm weights and biases randomised too) → (path, model)."""
    torch.manual_seed(seed)
    cfg = transformers.FalconConfig(
        vocab_size=200,
        hidden_size=64,
        num_hidden_layers=layers,
        ffn_hidden_size=96,
        max_position_embeddings=1024,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
        **LAYOUTS[layout],
    )
    model = transformers.FalconForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" in name or "layernorm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))
    path = tmp_path / layout
    model.save_pretrained(str(path))
    return str(path), model


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_logits_match_transformers(tmp_path, layout):
    path, hf = random_hf_falcon(tmp_path, layout, tied=layout != "40b-new", seed=len(layout))
    scan = layout in ("7b-mqa", "mha-sequential")
    cfg = read_hf_config(path, scan_layers=scan)
    assert cfg.family == "falcon"
    params = load_hf_params(path, cfg)
    tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, PROMPT_LEN))
    ours = np.asarray(jax.jit(Llama(cfg).apply)({"params": params}, jnp.asarray(tokens)))
    ref = hf_logits(hf, tokens)
    assert ours.shape == ref.shape == (2, PROMPT_LEN, cfg.vocab_size)
    diff = float(np.abs(ours - ref).max())
    print(f"{layout}: max |logits - transformers| = {diff:.2e}")
    assert diff <= 1e-4


@pytest.mark.parametrize("layout", ["7b-mqa", "40b-new"])
def test_hidden_states_per_layer_match_transformers(tmp_path, layout):
    path, hf = random_hf_falcon(tmp_path, layout, layers=3)
    cfg = read_hf_config(path, scan_layers=False)
    params = load_hf_params(path, cfg)
    tokens = np.random.RandomState(1).randint(0, cfg.vocab_size, (2, PROMPT_LEN))
    assert_layers_match_transformers(cfg, params, hf, tokens, atol=1e-5)


@pytest.mark.parametrize("layout,tied", [("7b-mqa", True), ("40b-new", False), ("mha-sequential", True)])
def test_hf_round_trip_is_bit_exact_and_reloads_in_transformers(tmp_path, layout, tied):
    from safetensors.numpy import load_file

    path, hf = random_hf_falcon(tmp_path, layout, tied=tied)
    cfg = read_hf_config(path)
    params = load_hf_params(path, cfg)
    out = tmp_path / "export"
    save_hf(params, cfg, str(out))
    before, after = load_file(f"{path}/model.safetensors"), load_file(f"{out}/model.safetensors")
    before.pop("lm_head.weight", None) if tied else None
    assert sorted(before) == sorted(after)
    for name, w in before.items():
        assert w.dtype == after[name].dtype and np.array_equal(w, after[name]), name
    # config.json describes the same model, and transformers loads the export with the same outputs.
    assert read_hf_config(str(out)) == cfg
    back = transformers.FalconForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    tokens = np.random.RandomState(3).randint(0, cfg.vocab_size, (1, 32))
    assert np.array_equal(hf_logits(back, tokens), hf_logits(hf, tokens))


def test_fused_qkv_orders_match_the_documented_layouts():
    """Hand-written row orders of query_key_value (transformers FalconAttention._split_heads), hd = d = 1."""
    base = dict(family="falcon", parallel_attn=True, hidden_size=1, intermediate_size=4, head_dim=1, vocab_size=8)
    rows = np.arange(8, dtype=np.float32)[:, None]
    # new decoder, 4 query heads in 2 KV groups: [q0 q1 k0 v0 q2 q3 k1 v1]
    cfg = get_config("tiny").replace(**base, num_heads=4, num_kv_heads=2, new_decoder_architecture=True)
    q, k, v = (x[0, :, 0].tolist() for x in hf_falcon.split_qkv(cfg, rows))
    assert (q, k, v) == ([0, 1, 4, 5], [2, 6], [3, 7])
    # multi-query, 6 query heads: [q0 .. q5 k v]
    cfg = get_config("tiny").replace(**base, num_heads=6, num_kv_heads=1)
    q, k, v = (x[0, :, 0].tolist() for x in hf_falcon.split_qkv(cfg, rows))
    assert (q, k, v) == ([0, 1, 2, 3, 4, 5], [6], [7])
    # plain MHA, 2 heads: [q0 k0 v0 q1 k1 v1]
    cfg = get_config("tiny").replace(**base, num_heads=2, num_kv_heads=2)
    q, k, v = (x[0, :, 0].tolist() for x in hf_falcon.split_qkv(cfg, rows[:6]))
    assert (q, k, v) == ([0, 3], [1, 4], [2, 5])
    assert np.array_equal(hf_falcon.fuse_qkv(cfg, *hf_falcon.split_qkv(cfg, rows[:6])), rows[:6])


@pytest.mark.parametrize(
    "change,message",
    [
        ({"alibi": True}, "alibi=True: ALiBi"),
        ({"bias": True}, "bias=True: linear-layer biases"),
        ({"activation": "relu"}, "activation='relu'"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling"),
        ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}, "only default rotary"),
        ({"frobnicate": 1}, r"unknown Falcon config keys \['frobnicate'\]"),
        ({"new_decoder_architecture": False, "multi_query": False, "num_kv_heads": 2}, "num_kv_heads=2"),
        ({"num_attention_heads": 3}, "not divisible"),
    ],
)
def test_unsupported_falcon_configs_are_refused_by_name(change, message):
    hf_cfg = transformers.FalconConfig(
        vocab_size=200, hidden_size=64, num_hidden_layers=2, num_attention_heads=8, num_kv_heads=2
    )
    cfg = json.loads(hf_cfg.to_json_string())  # what save_pretrained writes
    cfg.update({"new_decoder_architecture": True, **change})
    with pytest.raises(ConversionError, match=message):
        config_from_hf(cfg, source="x/config.json")


def test_published_falcon_40b_config_is_the_preset():
    """tiiuae/falcon-40b's config.json (in-library checkpoint, 2023) as published: several keys absent."""
    published = {
        "alibi": False,
        "apply_residual_connection_post_layernorm": False,
        "architectures": ["FalconForCausalLM"],
        "attention_dropout": 0.0,
        "bias": False,
        "bos_token_id": 11,
        "eos_token_id": 11,
        "hidden_dropout": 0.0,
        "hidden_size": 8192,
        "initializer_range": 0.02,
        "layer_norm_epsilon": 1e-05,
        "model_type": "falcon",
        "new_decoder_architecture": True,
        "num_attention_heads": 128,
        "num_hidden_layers": 60,
        "num_kv_heads": 8,
        "parallel_attn": True,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.27.4",
        "use_cache": True,
        "vocab_size": 65024,
    }
    assert config_from_hf(published) == get_config("falcon-40b")


@pytest.mark.parametrize("preset", ["falcon-7b", "falcon-40b", "falcon-180b"])
def test_preset_shapes_match_transformers(preset):
    """Parameter count of transformers' FalconForCausalLM built (on the meta device) from our exported config."""
    cfg = get_config(preset)
    hf_cfg = transformers.FalconConfig(**{k: v for k, v in hf_falcon.config_to_hf(cfg, "float32").items()})
    with torch.device("meta"):
        model = transformers.FalconForCausalLM(hf_cfg)
    n = sum(p.numel() for p in model.parameters())  # tied head counted once
    assert cfg.num_params() == n
    # Published sizes: Falcon-7B 6.92B, Falcon-40B 41.3B ("40B"), Falcon-180B 178.6B ("180B")
    assert f"{n / 1e9:.1f}" == {"falcon-7b": "6.9", "falcon-40b": "41.3", "falcon-180b": "178.6"}[preset]


@pytest.mark.parametrize("preset", ["tiny-falcon", "tiny-falcon-mqa"])
def test_every_parameter_has_logical_axis_names(preset):
    for scan in (True, False):
        cfg = get_config(preset, scan_layers=scan)
        specs = jax.tree.leaves(logical_axes(cfg), is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))
        shapes = jax.tree.leaves(nn.meta.unbox(abstract_params(cfg)))
        assert len(specs) == len(shapes)
        for spec, shape in zip(specs, shapes, strict=True):
            assert len(spec) == len(shape.shape) and all(isinstance(a, str) for a in spec)


def test_init_params_give_layernorm_its_identity():
    params = init_params(get_config("tiny-falcon"))
    assert np.all(params["final_norm"]["scale"] == 1) and np.all(params["final_norm"]["bias"] == 0)
    assert np.all(params["layers"]["mlp_norm"]["bias"] == 0)
    assert 0.01 < float(np.std(params["layers"]["mlp"]["up"])) < 0.05


def test_kv_cache_decode_matches_the_full_forward():
    """Prefill + one-token decode steps (the engine's path) give the logits of one full forward."""
    from meditron_jax.model import init_cache

    cfg = get_config("tiny-falcon", scan_layers=False)
    params = init_params(cfg, 1)
    model = Llama(cfg)
    tokens = jnp.asarray(np.random.RandomState(4).randint(0, cfg.vocab_size, (2, 12)))
    full = jax.jit(model.apply)({"params": params}, tokens)
    prefill = jax.jit(lambda c, t: model.apply({"params": params, "cache": c}, t, mode="prefill", mutable=["cache"]))
    decode = jax.jit(
        lambda c, t, p: model.apply({"params": params, "cache": c}, t, p, mode="decode", mutable=["cache"])
    )
    logits, state = prefill(init_cache(cfg, 2, 16), tokens[:, :8])
    steps = [logits]
    for t in range(8, 12):
        logits, state = decode(state["cache"], tokens[:, t : t + 1], jnp.full((2, 1), t, jnp.int32))
        steps.append(logits)
    assert np.abs(np.concatenate(steps, axis=1) - np.asarray(full)).max() <= 1e-5


def test_a_llama_config_refuses_falcon_fields():
    with pytest.raises(ValueError, match="parallel_attn=True .* applies to family 'falcon' only"):
        get_config("tiny", parallel_attn=True)
    with pytest.raises(ValueError, match="family='gpt2'"):
        get_config("tiny", family="gpt2")


def test_convert_cli_falcon_hf_to_orbax_to_hf_is_bit_exact(tmp_path):
    from safetensors.numpy import load_file

    from meditron_jax.cli import convert

    src, _ = random_hf_falcon(tmp_path, "7b-mqa")
    assert convert.main(["--to", "orbax", "--input", src, "--output", str(tmp_path / "orbax"), "--no_tokenizer"]) == 0
    out = tmp_path / "hf"
    assert convert.main(["--to", "hf", "--input", str(tmp_path / "orbax"), "--output", str(out), "--no_tokenizer"]) == 0
    before, after = load_file(f"{src}/model.safetensors"), load_file(f"{out}/model.safetensors")
    assert sorted(before) == sorted(after)
    assert all(np.array_equal(before[k], after[k]) for k in before)
    card = (out / "README.md").read_text()  # the model card describes a Falcon, not a Llama-2
    assert "license: other" in card and '- "falcon"' in card and "`FalconForCausalLM`" in card
    assert "| MLP size (GELU) | 96 |" in card and "| attention heads / KV heads | 4 / 1 |" in card
    assert "Llama" not in card and "SwiGLU" not in card and "RMSNorm" not in card
