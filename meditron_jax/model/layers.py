"""Llama-2 building blocks. Every parameter and main activation carries logical axis names.

Logical names (mapped to mesh axes in one place, `meditron_jax.parallel.rules`):
``batch length embed heads kv_heads head_dim mlp vocab layers``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from meditron_jax import kernels
from meditron_jax.config import ModelConfig
from meditron_jax.kernels.common import current_target

MODES = ("train", "prefill", "decode")


def dtype_of(name: str):
    return jnp.dtype(name)


def constrain(x, axes):
    """Activation sharding hint; a no-op outside a mesh with logical axis rules."""
    return nn.with_logical_constraint(x, axes)


def _flatten_for_cpu() -> bool:
    """Whether ``dense`` merges batch and length here: only for XLA:CPU (the platform traced for: the
    mesh's devices, else the default backend), and not where ``length`` is sharded over several devices."""
    if current_target().platform != "cpu":
        return False
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return True
    spec = nn.logical_to_mesh_axes(("length",))
    axes = None if spec is None else spec[0]
    names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    return all(mesh.shape.get(name, 1) == 1 for name in names)


def dense(x, w, contract: int = 1, impl: str = "auto", preferred_element_type=None, panels: int = 0):
    """``x``'s last ``contract`` dims times ``w``'s first ``contract`` dims, as one 2-D matmul.

    x [batch, length, K...], w [K..., N...] → [batch, length, N...]. Flattening batch and length (free
    reshapes of row-major arrays) gives the weight gradient one contracting dimension: with two, XLA:CPU's dot
    canonicalisation writes the activation gradients transposed for it, which made the MLP's forward and
    backward 1.6× slower on the CPU bench (docs/performance.md). XLA:TPU needs no such help (its compile
    of the merged form used 1.4% more memory), and where ``length`` is sharded (sequence parallelism)
    merging it with the batch would reshuffle shards: there the plain contraction stays. The 2-D product is
    ``kernels.matmul``'s, with ``impl`` (ModelConfig.matmul_impl) choosing XLA's dot or the CPU kernel.
    ``panels``: ``w`` is in the engine's panel-major layout (ModelConfig.weight_panels, `kernels.pack_panels`).
    """
    if x.ndim - contract != 2 or not _flatten_for_cpu():
        if impl == "cpu_native":
            raise ValueError("matmul_impl 'cpu_native' needs XLA:CPU with the length axis unsharded")
        if panels:
            w = kernels.unpack_panels(w, panels, contract)
        return jnp.tensordot(x, w, contract, preferred_element_type=preferred_element_type)
    lead, n_dims = x.shape[:-contract], w.shape[contract:]
    k, n = math.prod(w.shape[:contract]), math.prod(n_dims)
    out = kernels.matmul(
        x.reshape(-1, k), w.reshape(k, n), impl=impl, preferred_element_type=preferred_element_type, panels=panels
    )
    return out.reshape(*lead, *n_dims)


# The dense weights by parameter name (Llama's and Falcon's), with the leading axes each contracts (`dense`'s
# ``contract``): what the inference engine packs into panels (ModelConfig.weight_panels).
DENSE_WEIGHTS = {"query": 1, "key": 1, "value": 1, "out": 2, "gate": 1, "up": 1, "down": 1, "lm_head": 1}

# Llama's (and HF's) initialisation: normal(0, 0.02) for every matrix, ones for norm scales.
WEIGHT_INIT = nn.initializers.normal(stddev=0.02)


def param(module: nn.Module, name: str, shape, axes, init, dtype):
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


class RMSNorm(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        scale = param(self, "scale", (x.shape[-1],), ("embed",), nn.initializers.ones, dtype_of(cfg.param_dtype))
        # Normalise in float32 whatever the compute dtype, as the reference implementations do.
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + cfg.rms_norm_eps)
        return (scale.astype(jnp.float32) * x32).astype(dtype_of(cfg.dtype))


class RotaryTables(NamedTuple):
    """cos and sin of RoPE's angles, each [b, l, 1, head_dim] float32. Built once per forward pass and shared
    by every layer's q and k: computed inside each, XLA:CPU evaluated them again for every element of every
    head (a 4.6 ms rotation of one q at the CPU bench shape, 0.9 ms with the tables given; docs/performance.md).
    """

    cos: jax.Array
    sin: jax.Array


def rotary_tables(positions, head_dim: int, theta: float) -> RotaryTables:
    """The tables for ``positions`` [b, l] (int)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [b, l, d/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]

    def tables(angles):
        return jnp.cos(angles), jnp.sin(angles)

    if current_target().platform != "cpu":
        return RotaryTables(*tables(angles))
    # XLA:CPU fuses cos and sin into every rotation that reads them, and evaluates them there per element
    # (8 rotations, 8 copies of cos: with or without an optimization_barrier, which it drops before fusing).
    # A conditional's result is never fused into its users, so with both branches the same and a predicate
    # only known at run time, the pair is computed once: 8 rotations 34 -> 9 ms (docs/performance.md).
    return RotaryTables(*jax.lax.cond(positions[0, 0] >= 0, tables, tables, angles))


def rotary_embedding(x, positions, theta: float, compute_dtype=jnp.float32):
    """Rotate-half RoPE (the layout of Hugging Face Llama checkpoints). x: [b, l, h, d]; positions: [b, l]
    int, or their :class:`RotaryTables` (then ``theta`` is unused).

    Angles, cos and sin are float32; the rotation runs in ``compute_dtype`` (float32 by default; x's own dtype
    is what Hugging Face does: cos and sin cast to it).
    """
    d = x.shape[-1]
    tables = positions if isinstance(positions, RotaryTables) else rotary_tables(positions, d, theta)
    cos, sin = tables.cos.astype(compute_dtype), tables.sin.astype(compute_dtype)
    x32 = x.astype(compute_dtype)
    # rotate_half(x) = [-x2, x1], as a reversal of the two halves times a sign (the same values as slicing
    # and concatenating): its gradient is a reversal too, where slices transpose to padded copies, which
    # XLA:TPU kept as float32 half-width temporaries in the backward pass (docs/performance.md).
    sign = jnp.array([-1.0, 1.0], compute_dtype)[:, None]
    rotated = (x32.reshape(*x.shape[:-1], 2, d // 2)[..., ::-1, :] * sign).reshape(x.shape)
    return (x32 * cos + rotated * sin).astype(x.dtype)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        dt, pdt = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        init = WEIGHT_INIT
        d, f = cfg.hidden_size, cfg.intermediate_size
        gate = param(self, "gate", (d, f), ("embed", "mlp"), init, pdt)
        up = param(self, "up", (d, f), ("embed", "mlp"), init, pdt)
        down = param(self, "down", (f, d), ("mlp", "embed"), init, pdt)
        kw = {"impl": cfg.layer_matmul_impl, "panels": cfg.weight_panels}
        h = nn.silu(dense(x, gate.astype(dt), **kw)) * dense(x, up.astype(dt), **kw)
        h = constrain(h, ("batch", "length", "mlp"))
        return dense(h, down.astype(dt), **kw)


class Attention(nn.Module):
    config: ModelConfig
    mode: str = "train"

    @nn.compact
    def __call__(self, x, positions, segment_ids):
        cfg = self.config
        dt, pdt = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        init = WEIGHT_INIT
        d, h, kvh, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        wq = param(self, "query", (d, h, hd), ("embed", "heads", "head_dim"), init, pdt)
        wk = param(self, "key", (d, kvh, hd), ("embed", "kv_heads", "head_dim"), init, pdt)
        wv = param(self, "value", (d, kvh, hd), ("embed", "kv_heads", "head_dim"), init, pdt)
        wo = param(self, "out", (h, hd, d), ("heads", "head_dim", "embed"), init, pdt)

        kw = {"impl": cfg.layer_matmul_impl, "panels": cfg.weight_panels}
        q, k, v = (dense(x, w.astype(dt), **kw) for w in (wq, wk, wv))
        rdt = dt if cfg.rope_in_compute_dtype else jnp.float32
        q = constrain(rotary_embedding(q, positions, cfg.rope_theta, rdt), ("batch", "length", "heads", "head_dim"))
        k = constrain(rotary_embedding(k, positions, cfg.rope_theta, rdt), ("batch", "length", "kv_heads", "head_dim"))
        v = constrain(v, ("batch", "length", "kv_heads", "head_dim"))
        scale = hd**-0.5

        if self.mode == "train":
            out = kernels.attention(
                q, k, v, causal=True, segment_ids=segment_ids, softmax_scale=scale, impl=cfg.attention_impl
            )
        else:
            out = self._cached_attention(q, k, v, segment_ids, scale)
        out = constrain(out, ("batch", "length", "heads", "head_dim"))
        return dense(out, wo.astype(dt), contract=2, **kw)

    def _cached_attention(self, q, k, v, segment_ids, scale):
        """Prefill writes the prompt's K/V into the cache; decode appends one step and attends to the cache.

        The cache is created by an init call with the full cache length as the sequence length. K/V are
        cached head-major, [b, kv_heads, length, d]: decode's attention products are then plain batched
        matmuls over (batch, heads); token-major, XLA:CPU transposed a copy of the whole cache per layer
        and step (docs/performance.md, decode section).
        """
        b, length = k.shape[:2]
        initialised = self.has_variable("cache", "key")
        # One row: [kv_heads, length, d], no unit batch axis. XLA:CPU otherwise duplicates each in-place
        # update to drop it, and copies the cache twice per layer and step.
        lead = () if b == 1 else (b,)
        shape = (*lead, k.shape[2], length, k.shape[3])
        ck = self.variable("cache", "key", jnp.zeros, shape, k.dtype)
        cv = self.variable("cache", "value", jnp.zeros, shape, v.dtype)
        valid = self.variable("cache", "valid", jnp.zeros, (b, length), jnp.bool_)
        index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
        if not initialised:  # the init call that sizes the cache
            return kernels.attention(q, k, v, causal=True, segment_ids=segment_ids, softmax_scale=scale)
        is_real = jnp.ones((b, length), jnp.bool_) if segment_ids is None else segment_ids != 0
        k_heads = k.astype(ck.value.dtype).transpose(0, 2, 1, 3).reshape(ck.value.shape[:-2] + (length, -1))
        v_heads = v.astype(cv.value.dtype).transpose(0, 2, 1, 3).reshape(cv.value.shape[:-2] + (length, -1))
        zeros = (0,) * len(lead)
        if self.mode == "prefill":
            ck.value = jax.lax.dynamic_update_slice(ck.value, k_heads, (*zeros, 0, 0, 0))
            cv.value = jax.lax.dynamic_update_slice(cv.value, v_heads, (*zeros, 0, 0, 0))
            valid.value = jax.lax.dynamic_update_slice(valid.value, is_real, (0, 0))
            index.value = jnp.asarray(length, jnp.int32)
            return kernels.attention(
                q, k, v, causal=True, segment_ids=segment_ids, softmax_scale=scale, impl=self.config.attention_impl
            )
        # decode: `length` new tokens (usually 1) at cache slots [index, index + length)
        i = index.value
        ck.value = jax.lax.dynamic_update_slice(ck.value, k_heads, (*zeros, 0, i, 0))
        cv.value = jax.lax.dynamic_update_slice(cv.value, v_heads, (*zeros, 0, i, 0))
        valid.value = jax.lax.dynamic_update_slice(valid.value, is_real, (0, i))
        index.value = i + length
        return kernels.decode_attention(
            q, ck.value, cv.value, valid.value, i, softmax_scale=scale, impl=self.config.attention_impl
        )


class DecoderLayer(nn.Module):
    config: ModelConfig
    mode: str = "train"

    @nn.compact
    def __call__(self, x, positions, segment_ids):
        cfg = self.config
        h = RMSNorm(cfg, name="attention_norm")(x)
        x = x + Attention(cfg, self.mode, name="attention")(h, positions, segment_ids)
        x = constrain(x, ("batch", "length", "embed"))
        h = RMSNorm(cfg, name="mlp_norm")(x)
        x = x + MLP(cfg, name="mlp")(h)
        return constrain(x, ("batch", "length", "embed")), None
