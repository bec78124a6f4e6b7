"""meditron_jax: MEDITRON (medical Llama-2) in JAX/Flax."""

__version__ = "0.1.0"


def load(path, **kwargs):
    """Load a Hugging Face or meditron_jax model directory; see :func:`meditron_jax.api.load`."""
    from meditron_jax.api import load as _load

    return _load(path, **kwargs)
