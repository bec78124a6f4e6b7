"""Attention kernels behind one entry point, :func:`attention`; decode's :func:`decode_attention`; and the
dense layers' :func:`matmul`."""

from meditron_jax.kernels.dispatch import attention, decode_attention, matmul

__all__ = ["attention", "decode_attention", "matmul"]
