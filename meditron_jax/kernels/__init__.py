"""Attention kernels behind one entry point, :func:`attention`; decode's :func:`decode_attention`; and the
dense layers' :func:`matmul`, and the panel-major weight layout it takes (:func:`pack_panels`)."""

from meditron_jax.kernels.dispatch import attention, decode_attention, matmul, pack_panels, unpack_panels

__all__ = ["attention", "decode_attention", "matmul", "pack_panels", "unpack_panels"]
