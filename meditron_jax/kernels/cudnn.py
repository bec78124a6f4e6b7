"""cuDNN flash attention through ``jax.nn.dot_product_attention(implementation="cudnn")``.

cuDNN takes causal (top-left aligned) and key-length masks natively. Packed segments, and causal masks
with q_len != kv_len (which need bottom-right alignment), go in as a dense boolean mask: correct, but
quadratic in memory, so ``auto`` dispatch sends those cases to the Pallas kernel instead.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from meditron_jax.kernels.common import check_inputs

MAX_HEAD_DIM = 128  # 256 on Hopper and later with recent cuDNN; 128 is safe everywhere
SUPPORTED_DTYPES = (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))


def check_supported(q, k, v, segment_ids, *, causal: bool):
    p = check_inputs(q, k, v, segment_ids, causal=causal, who="cudnn")
    if jnp.dtype(q.dtype) not in SUPPORTED_DTYPES:
        raise ValueError(f"cudnn: dtype {q.dtype} is not supported; cuDNN flash attention takes float16/bfloat16")
    if p.head_dim % 8 or p.head_dim > MAX_HEAD_DIM:
        raise ValueError(f"cudnn: head_dim {p.head_dim} is not supported (needs a multiple of 8, <= {MAX_HEAD_DIM})")
    return p


def needs_dense_mask(p) -> bool:
    return p.has_segments or (p.causal and p.q_len != p.kv_len)


def cudnn_attention(q, k, v, *, causal=True, segment_ids=None, softmax_scale):
    from meditron_jax.kernels.xla import make_mask  # local: xla imports nothing from here, keep it that way

    p = check_supported(q, k, v, segment_ids, causal=causal)
    mask = None
    if needs_dense_mask(p):
        mask = make_mask(p.q_len, p.kv_len, causal=causal, segment_ids=segment_ids)
        mask = jnp.broadcast_to(mask, (p.batch, p.q_len, p.kv_len))
    out = jax.nn.dot_product_attention(
        q,
        k,
        v,
        mask=None if mask is None else mask[:, None],
        scale=softmax_scale,
        is_causal=causal and mask is None,
        implementation="cudnn",
    )
    if mask is not None:  # same empty-row convention as every other path
        out = out * jnp.any(mask, axis=-1)[:, :, None, None].astype(out.dtype)
    return out
