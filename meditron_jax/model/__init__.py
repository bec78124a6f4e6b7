"""The Flax Llama-2 model."""

from meditron_jax.model.llama import Llama, abstract_params, init_cache, init_params, logical_axes

__all__ = ["Llama", "abstract_params", "init_cache", "init_params", "logical_axes"]
