"""Our Flax Llama against transformers' PyTorch LlamaForCausalLM, float32.

Tolerance 1e-4 absolute on logits: both sides compute in float32 with different reduction orders;
observed differences are ~1e-6 to 1e-5 for these sizes.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from meditron_jax.convert.hf import load_hf_params, read_hf_config
from meditron_jax.model import Llama, abstract_params

from .hf_utils import assert_layers_match_transformers, hf_logits, random_hf_llama

PROMPT_LEN = 512


@pytest.mark.parametrize(
    "heads,kv_heads,scan",
    [(4, 4, True), (4, 2, False), (4, 1, True), (8, 4, False), (8, 2, True)],
    ids=["mha-scan", "gqa2-unrolled", "mqa-scan", "gqa4-unrolled", "gqa4x2-scan"],
)
def test_logits_match_transformers(tmp_path, heads, kv_heads, scan):
    path, hf = random_hf_llama(tmp_path, heads=heads, kv_heads=kv_heads, seed=heads + kv_heads)
    cfg = read_hf_config(path, scan_layers=scan)
    assert (cfg.num_heads, cfg.num_kv_heads) == (heads, kv_heads)
    params = load_hf_params(path, cfg)
    tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, PROMPT_LEN))
    ours = np.asarray(jax.jit(Llama(cfg).apply)({"params": params}, jnp.asarray(tokens)))
    ref = hf_logits(hf, tokens)
    assert ours.shape == ref.shape == (2, PROMPT_LEN, cfg.vocab_size)
    assert np.abs(ours - ref).max() <= 1e-4


def test_hidden_states_per_layer_match_transformers(tmp_path):
    path, hf = random_hf_llama(tmp_path, heads=4, kv_heads=2, layers=3)
    cfg = read_hf_config(path, scan_layers=False)
    params = load_hf_params(path, cfg)
    tokens = np.random.RandomState(1).randint(0, cfg.vocab_size, (2, 64))
    assert_layers_match_transformers(cfg, params, hf, tokens, atol=1e-5)


def test_rms_norm_and_rope_match_transformers():
    import torch
    from transformers.models.llama import modeling_llama as ml

    from meditron_jax.config import get_config
    from meditron_jax.model.layers import RMSNorm, rotary_embedding

    rng = np.random.RandomState(2)
    x = rng.randn(2, 5, 64).astype(np.float32)
    w = (1 + 0.1 * rng.randn(64)).astype(np.float32)
    ref_norm = ml.LlamaRMSNorm(64, eps=1e-5)
    with torch.no_grad():
        ref_norm.weight.copy_(torch.tensor(w))
        want = ref_norm(torch.tensor(x)).numpy()
    got = RMSNorm(get_config("tiny")).apply({"params": {"scale": w}}, x)
    assert np.abs(np.asarray(got) - want).max() <= 1e-6

    q = rng.randn(2, 7, 3, 16).astype(np.float32)  # [b, l, h, d]
    pos = np.array([[0, 1, 2, 3, 4, 5, 6], [9, 10, 11, 0, 1, 2, 3]])
    inv = 1.0 / (10000.0 ** (np.arange(0, 16, 2) / 16))
    ang = pos[..., None] * inv
    emb = np.concatenate([ang, ang], -1)
    cos, sin = torch.tensor(np.cos(emb), dtype=torch.float32), torch.tensor(np.sin(emb), dtype=torch.float32)
    qt = torch.tensor(q).transpose(1, 2)  # HF layout [b, h, l, d]
    want_q, _ = ml.apply_rotary_pos_emb(qt, qt, cos, sin)
    got_q = rotary_embedding(jnp.asarray(q), jnp.asarray(pos), 10000.0)
    assert np.abs(np.asarray(got_q) - want_q.transpose(1, 2).numpy()).max() <= 1e-5


def test_logical_axis_names_cover_every_parameter():
    from meditron_jax.config import get_config
    from meditron_jax.model import logical_axes

    for scan in (True, False):
        cfg = get_config("tiny", scan_layers=scan)
        specs = jax.tree.leaves(logical_axes(cfg), is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))
        shapes = jax.tree.leaves(nn.meta.unbox(abstract_params(cfg)))
        assert len(specs) == len(shapes)
        for spec, shape in zip(specs, shapes, strict=True):
            assert len(spec) == len(shape.shape) and all(isinstance(a, str) for a in spec)
        if scan:
            assert any(spec[0] == "layers" for spec in specs)
