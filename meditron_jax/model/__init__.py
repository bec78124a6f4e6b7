"""The Flax Llama-2 model."""

from meditron_jax.model.layers import DENSE_WEIGHTS
from meditron_jax.model.llama import Llama, abstract_params, init_cache, init_params, logical_axes

__all__ = ["DENSE_WEIGHTS", "Llama", "abstract_params", "init_cache", "init_params", "logical_axes"]
