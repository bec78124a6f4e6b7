"""Attention kernels behind one entry point, :func:`attention`, and decode's :func:`decode_attention`."""

from meditron_jax.kernels.dispatch import attention, decode_attention

__all__ = ["attention", "decode_attention"]
