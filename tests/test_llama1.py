"""Llama-1: the Llama-2 code with Llama-1's settings (MHA, 2,048 context, RMSNorm eps 1e-6), against
transformers' PyTorch LlamaForCausalLM (float32; logits tolerance 1e-4 as in test_hf_parity) and the sizes of
the LLaMA paper (Touvron et al. 2023a, Table 2: 6.7B, 13.0B, 32.5B, 65.2B)."""

import dataclasses

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from meditron_jax.config import ModelConfig, get_config
from meditron_jax.convert.hf import config_to_hf, load_hf_params, read_hf_config
from meditron_jax.model import Llama
from meditron_jax.resources import gin_dir

from .hf_utils import hf_hidden_states, hf_logits

PROMPT_LEN = 512


@pytest.fixture(scope="module")
def tiny_llama1(tmp_path_factory):
    """A random HF Llama-1-shaped model (MHA, eps 1e-6, 2,048 context), norms randomised too."""
    torch.manual_seed(11)
    cfg = transformers.LlamaConfig(
        vocab_size=200,
        hidden_size=64,
        intermediate_size=172,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("llama1")
    model.save_pretrained(str(path))
    return str(path), model


def test_tiny_llama1_logits_and_layers_match_transformers(tiny_llama1):
    path, hf = tiny_llama1
    cfg = read_hf_config(path, scan_layers=False)
    assert (cfg.num_kv_heads, cfg.rms_norm_eps, cfg.max_position_embeddings) == (4, 1e-6, 2048)
    params = load_hf_params(path, cfg)
    tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, PROMPT_LEN))
    logits, state = Llama(cfg).apply(
        {"params": params}, jnp.asarray(tokens), capture_intermediates=True, mutable=["intermediates"]
    )
    diff = float(np.abs(np.asarray(logits) - hf_logits(hf, tokens)).max())
    print(f"llama-1 tiny: max |logits - transformers| = {diff:.2e}")
    assert diff <= 1e-4
    ref = hf_hidden_states(hf, tokens)
    inter = state["intermediates"]
    for i in range(cfg.num_layers - 1):
        assert np.abs(np.asarray(inter[f"layers_{i}"]["__call__"][0][0]) - ref[i + 1]).max() <= 1e-5, f"layer {i}"


def test_tiny_llama1_scanned_equals_unrolled(tiny_llama1):
    path, _ = tiny_llama1
    tokens = jnp.asarray(np.random.RandomState(5).randint(0, 200, (1, 64)))
    out = []
    for scan in (True, False):
        cfg = read_hf_config(path, scan_layers=scan)
        out.append(np.asarray(jax.jit(Llama(cfg).apply)({"params": load_hf_params(path, cfg)}, tokens)))
    assert np.abs(out[0] - out[1]).max() <= 1e-5


@pytest.mark.parametrize(
    "preset,paper", [("llama1-7b", "6.7"), ("llama1-13b", "13.0"), ("llama1-33b", "32.5"), ("llama1-65b", "65.2")]
)
def test_presets_have_the_papers_sizes_and_transformers_shapes(preset, paper):
    cfg = get_config(preset)
    assert (cfg.max_position_embeddings, cfg.rms_norm_eps, cfg.num_kv_heads) == (2048, 1e-6, cfg.num_heads)
    hf_cfg = transformers.LlamaConfig(**config_to_hf(cfg, "float32"))
    with torch.device("meta"):
        n = sum(p.numel() for p in transformers.LlamaForCausalLM(hf_cfg).parameters())
    assert cfg.num_params() == n
    assert f"{n // 10**8 / 10:.1f}" == paper  # the paper truncates (65.29B is "65.2B")


GIN_FILES = [
    ("models/llama1_7b.gin", "llama1-7b", {"vocab_size": 32017}),
    ("models/llama1_13b.gin", "llama1-13b", {"vocab_size": 32017}),
    ("models/llama1_33b.gin", "llama1-33b", {"vocab_size": 32017}),
    ("models/llama1_65b.gin", "llama1-65b", {"vocab_size": 32017}),
    ("models/falcon_7b.gin", "falcon-7b", {}),
    ("models/falcon_40b.gin", "falcon-40b", {}),
    ("models/falcon_180b.gin", "falcon-180b", {}),
]


@pytest.mark.parametrize("gin_file,preset,changes", GIN_FILES)
def test_gin_model_files_bind_the_presets(gin_file, preset, changes):
    from meditron_jax.train import trainer

    gin.clear_config()
    try:
        gin.add_config_file_search_path(str(gin_dir()))
        gin.parse_config_files_and_bindings(
            [gin_file, "runs/pretrain.gin"],
            ["MODEL_DIR='/x'", "SEQUENCE_LENGTH=8", "GLOBAL_BATCH=1", "TRAIN_STEPS=1"],
        )
        model = trainer.TrainConfig().model
    finally:
        gin.clear_config()
    want = get_config(preset, **changes)
    arch = {f.name for f in dataclasses.fields(ModelConfig)} - {"param_dtype", "dtype", "scan_layers", "remat_policy"}
    assert {k: getattr(model, k) for k in arch} == {k: getattr(want, k) for k in arch}


def test_published_llama1_7b_config_is_the_preset():
    """huggyllama/llama-7b's config.json (transformers 4.28 conversion of Meta's LLaMA-7B)."""
    from meditron_jax.convert.hf import config_from_hf

    published = {
        "_name_or_path": "huggyllama/llama-7b",
        "architectures": ["LlamaForCausalLM"],
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": 4096,
        "initializer_range": 0.02,
        "intermediate_size": 11008,
        "max_position_embeddings": 2048,
        "max_sequence_length": 2048,
        "model_type": "llama",
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "pad_token_id": 0,
        "rms_norm_eps": 1e-06,
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
        "transformers_version": "4.28.0",
        "use_cache": True,
        "vocab_size": 32000,
    }
    assert config_from_hf(published) == get_config("llama1-7b")
