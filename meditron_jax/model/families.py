"""Which decoder block and final norm a ``ModelConfig.family`` uses; everything else is shared."""

from __future__ import annotations

from meditron_jax.config import ModelConfig
from meditron_jax.model.falcon import FalconDecoderLayer, LayerNorm
from meditron_jax.model.layers import DecoderLayer, RMSNorm


def decoder_layer_class(config: ModelConfig) -> type:
    return FalconDecoderLayer if config.family == "falcon" else DecoderLayer


def norm_class(config: ModelConfig) -> type:
    """The final norm's class (constructed as ``cls(config)``): RMSNorm for Llama, LayerNorm for Falcon."""
    return LayerNorm if config.family == "falcon" else RMSNorm
