"""Attention kernels behind one entry point, :func:`attention`."""

from meditron_jax.kernels.dispatch import attention

__all__ = ["attention"]
