"""The Pallas flash-attention kernels (TPU/Mosaic and GPU/Triton) in the Pallas interpreter on CPU.

Each case runs through the public entry point, ``kernels.attention(..., impl=..., interpret=True)``, and
checks the output and dq, dk, dv against the float64 XLA reference (tolerances in test_kernels.py).
Tiles are small so the short sequences still span several query and key tiles; lengths that are not
tile multiples exercise the pad-and-mask path. No GPU machine was available: the Triton kernels are also
lowered for CUDA (``jax.export``, no device needed), which runs Pallas' Triton lowering on them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meditron_jax import kernels
from meditron_jax.kernels import pallas_gpu, pallas_tpu

from .test_kernels import Case, assert_matches_reference

PALLAS_CASES = [
    Case("causal_packed_mha_multiple", 1, 256, 256, 2, 2, 64, True, "packed"),
    Case("bidirectional_scattered_gqa4_cross_lengths", 2, 130, 300, 4, 1, 32, False, "scattered"),
    Case("causal_packed_gqa8", 1, 384, 384, 8, 1, 64, True, "packed"),
    Case("causal_chunk_q_shorter_packed", 1, 160, 384, 2, 1, 64, True, "packed"),
    Case("causal_q_longer_empty_rows", 1, 300, 100, 2, 1, 64, True, None),
    Case("causal_packed_gqa2_bf16", 1, 256, 256, 4, 2, 64, True, "packed", "bfloat16"),
]

SIZES = {
    "pallas_tpu": pallas_tpu.BlockSizes(block_q=128, block_kv=128, block_q_bwd=128, block_kv_bwd=256),
    "pallas_gpu": pallas_gpu.BlockSizes(block_q=64, block_kv=32, block_q_bwd=32, block_kv_bwd=64),
}


@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu"])
@pytest.mark.parametrize("case", PALLAS_CASES, ids=str)
def test_pallas_kernel_matches_float64_reference(case, impl):
    def fn(q, k, v, seg):
        return kernels.attention(
            q,
            k,
            v,
            causal=case.causal,
            segment_ids=seg,
            softmax_scale=case.head_dim**-0.5,
            impl=impl,
            interpret=True,
            block_sizes=SIZES[impl],
        )

    out, grads = assert_matches_reference(fn, case)
    if case.causal and case.q_len > case.kv_len:  # rows with no key: exactly zero, gradients finite
        assert np.all(out[:, : case.q_len - case.kv_len] == 0.0)
        assert all(np.all(np.isfinite(g)) for g in grads)


def _export_for_cuda(fn, *args):
    from jax import export

    triton = export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
    return export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=[triton])(*args).mlir_module()


@pytest.mark.parametrize(
    "shape, dtype, segments, causal",
    [
        ((2, 1000, 8, 2, 128), jnp.bfloat16, True, True),  # GQA 4, length not a tile multiple
        ((1, 512, 4, 4, 96), jnp.float16, False, False),  # head_dim padded to 128
        ((1, 300, 8, 1, 64), jnp.float32, True, True),  # MQA, float32
    ],
)
def test_triton_kernels_lower_for_cuda(shape, dtype, segments, causal):
    b, length, heads, kv_heads, d = shape
    q = jax.ShapeDtypeStruct((b, length, heads, d), dtype)
    kv = jax.ShapeDtypeStruct((b, length, kv_heads, d), dtype)
    seg = jax.ShapeDtypeStruct((b, length), jnp.int32) if segments else None

    def loss(q, k, v, seg):
        out = pallas_gpu.flash_attention(q, k, v, causal=causal, segment_ids=seg, softmax_scale=0.1)
        return out.astype(jnp.float32).sum()

    module = _export_for_cuda(jax.value_and_grad(loss, argnums=(0, 1, 2)), q, kv, kv, seg)
    for kernel in ("meditron_flash_fwd", "meditron_flash_dkv", "meditron_flash_dq"):
        assert f'name = "{kernel}"' in module, kernel
    assert module.count("__gpu$xla.gpu.triton") == 3
