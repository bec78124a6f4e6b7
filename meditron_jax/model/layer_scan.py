"""The scanned, fully rematerialised layer stack with a backward that adds into a gradient accumulator.

With gradient accumulation the training step adds each microstep's gradients to accumulators (float32, as the
master weights).
Through autodiff of the scanned stack, the backward scan first emits the microstep's own stacked layer
gradients (a second float32 copy of every layer parameter, per chip) and the step adds them afterwards.
``accumulating_layer_scan`` computes the same forward (``ModelConfig.remat_policy="full"``: the scan saves
each layer's input, the backward recomputes the layer), but its custom VJP's backward is a reverse scan that
carries the accumulator next to dx and adds layer i's gradient to its slice i in place. The stacked
per-microstep gradient never exists; each slice gets ``acc[i] + g[i]``, the same float32 addition as the
step's, so results are bit for bit the same (tests/test_layer_scan.py). docs/performance.md, "Training memory
ahead of time", finding 5.

The price is an unusual contract: the "gradient" this function reports for ``layer_params`` is
``layer_grads + d loss / d layer_params`` (the updated accumulator), and ``layer_grads`` gets none.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from meditron_jax.config import ModelConfig


def supports(config: ModelConfig) -> bool:
    """Whether ``accumulating_layer_scan`` computes this config's layer stack as `llama.layer_stack` does."""
    return config.scan_layers and config.remat_policy == "full"


def accumulating_layer_scan(config: ModelConfig, layer_cls, layer_params, layer_grads, x, positions, segment_ids):
    """The layer stack's output for input ``x``; its VJP returns ``layer_grads + grads`` for ``layer_params``.

    layer_cls: the decoder block (`families.decoder_layer_class`); layer_params and layer_grads: trees of the
    stacked parameters (leading axis ``num_layers``) and of accumulators of the same shapes and dtypes.
    """
    if not supports(config):
        raise ValueError("accumulating_layer_scan needs scan_layers=True and remat_policy='full'")

    def layer(p, h, positions, segment_ids):
        return layer_cls(config, "train").apply({"params": p}, h, positions, segment_ids)[0]

    def run(params, acc, h, positions, segment_ids):
        del acc
        return jax.lax.scan(lambda h, p: (layer(p, h, positions, segment_ids), None), h, params)[0]

    def fwd(params, acc, h, positions, segment_ids):
        # saves each layer's input only
        out, inputs = jax.lax.scan(lambda h, p: (layer(p, h, positions, segment_ids), h), h, params)
        return out, (params, acc, inputs, positions, segment_ids)

    def bwd(res, d_out):
        params, acc, inputs, positions, segment_ids = res

        def body(carry, step):
            d_h, acc = carry
            p, h, i = step
            # recomputes layer i (full remat)
            _, pullback = jax.vjp(lambda p, h: layer(p, h, positions, segment_ids), p, h)
            d_p, d_h = pullback(d_h)

            def add(a, g):
                return jax.lax.dynamic_update_index_in_dim(a, jax.lax.dynamic_index_in_dim(a, i, 0, False) + g, i, 0)

            return (d_h, jax.tree.map(add, acc, d_p)), None

        n = jax.tree.leaves(params)[0].shape[0]
        steps = (params, inputs, jnp.arange(n, dtype=jnp.int32))
        (d_h, acc), _ = jax.lax.scan(body, (d_out, acc), steps, reverse=True)
        return acc, None, d_h, None, None

    stack = jax.custom_vjp(run)
    stack.defvjp(fwd, bwd)
    return stack(layer_params, layer_grads, x, positions, segment_ids)
