"""The Falcon decoder block (``FalconForCausalLM``): LayerNorm with a bias, a GELU MLP, attention and MLP side
by side. Attention (rotary, MQA/GQA, the KV cache) is Llama's `layers.Attention`; the embedding, the layer
stack and the head are `llama.Llama`'s, picked by ``ModelConfig.family`` (`model.families`).

Parameter names follow the Llama block so rules, pipeline and optimiser treat both alike: ``attention_norm``
(HF ``input_layernorm`` or ``ln_attn``), ``mlp_norm`` (``ln_mlp`` / ``post_attention_layernorm``; absent when
one LayerNorm feeds both), ``attention`` and ``mlp`` (``up``/``down``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from meditron_jax.config import ModelConfig
from meditron_jax.model.layers import WEIGHT_INIT, Attention, constrain, dense, dtype_of, param


class LayerNorm(nn.Module):
    """LayerNorm with scale and bias, normalised in float32 (as ``torch.nn.LayerNorm`` on float32 input)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        pdt = dtype_of(cfg.param_dtype)
        scale = param(self, "scale", (x.shape[-1],), ("embed",), nn.initializers.ones, pdt)
        bias = param(self, "bias", (x.shape[-1],), ("embed",), nn.initializers.zeros, pdt)
        x32 = x.astype(jnp.float32)
        centred = x32 - jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(centred * centred, axis=-1, keepdims=True)  # biased, as torch
        y = centred * jax.lax.rsqrt(var + cfg.layer_norm_eps)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(dtype_of(cfg.dtype))


class GeluMLP(nn.Module):
    """down(gelu(up(x))), the exact (erf) GELU of Falcon's ``activation="gelu"``."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        dt, pdt = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        d, f = cfg.hidden_size, cfg.intermediate_size
        up = param(self, "up", (d, f), ("embed", "mlp"), WEIGHT_INIT, pdt)
        down = param(self, "down", (f, d), ("mlp", "embed"), WEIGHT_INIT, pdt)
        kw = {"impl": cfg.layer_matmul_impl, "panels": cfg.weight_panels}
        h = nn.gelu(dense(x, up.astype(dt), **kw), approximate=False)
        h = constrain(h, ("batch", "length", "mlp"))
        return dense(h, down.astype(dt), **kw)


class FalconDecoderLayer(nn.Module):
    """Parallel: ``x + attn(ln_a(x)) + mlp(ln_m(x))`` (ln_m = ln_a with one LayerNorm); sequential otherwise."""

    config: ModelConfig
    mode: str = "train"

    @nn.compact
    def __call__(self, x, positions, segment_ids):
        cfg = self.config
        h = LayerNorm(cfg, name="attention_norm")(x)
        attn = Attention(cfg, self.mode, name="attention")(h, positions, segment_ids)
        if cfg.parallel_attn:
            h_mlp = LayerNorm(cfg, name="mlp_norm")(x) if cfg.parallel_norms == 2 else h
            x = x + (GeluMLP(cfg, name="mlp")(h_mlp) + attn)
        else:
            x = constrain(x + attn, ("batch", "length", "embed"))
            x = x + GeluMLP(cfg, name="mlp")(LayerNorm(cfg, name="mlp_norm")(x))
        return constrain(x, ("batch", "length", "embed")), None
