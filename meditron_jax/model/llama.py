"""The Llama-2 decoder: embedding, a stack of decoder layers (scanned or unrolled), norm, output head."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from meditron_jax.config import ModelConfig
from meditron_jax.kernels.common import current_target
from meditron_jax.model.families import decoder_layer_class, norm_class
from meditron_jax.model.layer_scan import accumulating_layer_scan
from meditron_jax.model.layers import MODES, WEIGHT_INIT, constrain, dense, dtype_of, param, rotary_tables

_REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole layer
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_with_no_batch_dims": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "minimal": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def layer_stack(config: ModelConfig, mode: str):
    """The decoder-layer class as configured: rematerialised and/or scanned over ``layers``."""
    cls = decoder_layer_class(config)  # Llama's or Falcon's block (ModelConfig.family)
    if config.remat_policy != "none":
        cls = nn.remat(cls, policy=_REMAT_POLICIES[config.remat_policy], prevent_cse=not config.scan_layers)
    if config.scan_layers:
        cls = nn.scan(
            cls,
            variable_axes={"params": 0, "cache": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast, nn.broadcast),
            length=config.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
    return cls


class Llama(nn.Module):
    """Causal LM. ``__call__(tokens, positions, segment_ids, mode)`` → float32 logits [batch, length, vocab].

    mode "train": full causal attention (packed sequences via segment ids, 0 = padding).
    mode "prefill"/"decode": also read/write the KV cache collection ``cache`` (see `infer.generate`).
    return_hidden: return (final-normed hidden state, head matrix [embed, padded vocab]) instead of the logits,
    for a loss that applies the head itself (`meditron_jax.model.loss.head_cross_entropy_sums`).
    layer_grads: gradient accumulators of the stacked layer parameters (training with gradient
    accumulation, scanned layers and full remat): the layers then run through
    `layer_scan.accumulating_layer_scan`, and the gradient autodiff reports for ``params["layers"]`` is
    ``layer_grads`` plus the gradient (the updated accumulators), added inside the backward layer scan.
    """

    config: ModelConfig

    @nn.compact
    def __call__(
        self,
        tokens,
        positions=None,
        segment_ids=None,
        mode: str = "train",
        return_hidden: bool = False,
        layer_grads=None,
    ):
        cfg = self.config
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} is not one of {MODES}")
        if cfg.weight_panels and mode == "train":
            raise ValueError("ModelConfig.weight_panels is the inference engine's weight layout; training keeps 0")
        pdt = dtype_of(cfg.param_dtype)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        embedding = param(
            self, "embedding", (cfg.padded_vocab_size, cfg.hidden_size), ("vocab", "embed"), WEIGHT_INIT, pdt
        )
        x = embed(cfg, embedding, tokens)
        assert cfg.head_dim is not None  # ModelConfig fills it in
        positions = rotary_tables(positions, cfg.head_dim, cfg.rope_theta)  # once for all layers

        stack = layer_stack(cfg, mode)
        if layer_grads is not None:
            if mode != "train" or self.is_initializing():
                raise ValueError("layer_grads is for training steps on existing parameters (mode 'train')")
            layers = self.variables["params"]["layers"]
            x = accumulating_layer_scan(cfg, decoder_layer_class(cfg), layers, layer_grads, x, positions, segment_ids)
        elif cfg.scan_layers and _unrolls_stacked_layers(cfg, mode) and not self.is_initializing():
            x = _unrolled_stacked_layers(cfg, self.variables["params"]["layers"], x, positions, segment_ids)
        elif cfg.scan_layers:
            x, _ = stack(cfg, mode, name="layers")(x, positions, segment_ids)
        else:
            for i in range(cfg.num_layers):
                x, _ = stack(cfg, mode, name=f"layers_{i}")(x, positions, segment_ids)

        x = norm_class(cfg)(cfg, name="final_norm")(x)
        if cfg.tie_word_embeddings:
            head = embedding.T
        else:
            head = param(
                self, "lm_head", (cfg.hidden_size, cfg.padded_vocab_size), ("embed", "vocab"), WEIGHT_INIT, pdt
            )
        if return_hidden:
            return x, head
        return vocab_logits(cfg, x, head)


def _unrolls_stacked_layers(config: ModelConfig, mode: str) -> bool:
    """Whether the stacked layers run as an unrolled loop instead of a scan: training on XLA:CPU without
    remat. There the scan only adds memory traffic: every step it zero-fills a stacked buffer for each value
    saved for the backward, copies each layer's values into it and out again (5.7 GB a step counted at the
    CPU bench shape, against 0.7 GB of parameter and gradient copies unrolled; docs/performance.md "Fourth
    round"). The parameters stay stacked, so checkpoints and shardings do not change. Compile time grows
    with the layer count, which CPU-sized models keep small; TPU and GPU keep the scan."""
    return mode == "train" and config.remat_policy == "none" and current_target().platform == "cpu"


def _unrolled_stacked_layers(config: ModelConfig, layers, x, positions, segment_ids):
    """The decoder layers applied one after another to ``x``, layer i's parameters cut from the stacked tree.

    ``jnp.split`` rather than indexing: its gradient is one concatenation per parameter, where the gradients
    of N indexings are N full-size padded arrays for XLA to add.
    """
    n = config.num_layers
    per_layer = jax.tree.map(lambda a: [jnp.squeeze(p, 0) for p in jnp.split(a, n)], nn.meta.unbox(layers))
    cls = decoder_layer_class(config)
    for i in range(n):
        params = jax.tree.map(lambda parts, i=i: parts[i], per_layer, is_leaf=lambda v: isinstance(v, list))
        x, _ = cls(config, "train").apply({"params": params}, x, positions, segment_ids)
    return x


def embed(config: ModelConfig, embedding, tokens, constrain_fn=constrain):
    """Input embedding lookup in the compute dtype. The pipeline calls this too, on its own parameters."""
    tokens = constrain_fn(tokens, ("batch", "length"))
    x = jnp.take(embedding, tokens, axis=0).astype(dtype_of(config.dtype))
    return constrain_fn(x, ("batch", "length", "embed"))


def vocab_logits(config: ModelConfig, x, head, constrain_fn=constrain):
    """Output projection of the normed hidden state → float32 logits over the real (unpadded) vocabulary."""
    panels = 0 if config.tie_word_embeddings else config.weight_panels  # a tied head is the embedding's transpose
    logits = dense(
        x,
        head.astype(dtype_of(config.dtype)),
        impl=config.matmul_impl,
        preferred_element_type=jnp.float32,
        panels=panels,
    )
    logits = constrain_fn(logits, ("batch", "length", "vocab"))
    return logits[..., : config.vocab_size]


def init_params(config: ModelConfig, seed=0):
    """Random host parameters with Llama's initialisation, drawn with numpy.

    ``seed``: an int or a jax PRNG key. Same distribution as ``Llama.init`` without compiling XLA's
    random-number kernels, which on CPU takes far longer than the draw. On a mesh, jit ``Llama.init``.
    """
    import ml_dtypes
    import numpy as np

    if not isinstance(seed, int):  # a jax PRNG key: seed numpy from its bits
        data = jax.random.key_data(seed) if jnp.issubdtype(seed.dtype, jax.dtypes.prng_key) else seed
        seed = [int(x) for x in np.asarray(data).ravel()]
    rng = np.random.default_rng(seed)
    dtype = ml_dtypes.bfloat16 if config.param_dtype == "bfloat16" else np.dtype(config.param_dtype)

    def draw(path, s):
        if jax.tree_util.keystr(path).endswith("['scale']"):
            return np.ones(s.shape, dtype)
        if jax.tree_util.keystr(path).endswith("['bias']"):  # Falcon's LayerNorm biases
            return np.zeros(s.shape, dtype)
        return (0.02 * rng.standard_normal(s.shape, np.float32)).astype(dtype)

    return jax.tree_util.tree_map_with_path(draw, nn.meta.unbox(abstract_params(config)))


def abstract_params(config: ModelConfig):
    """Shapes/dtypes of the parameters, boxed with their logical axis names (no allocation)."""
    model = Llama(config)
    tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    return jax.eval_shape(lambda t: model.init(jax.random.PRNGKey(0), t), tokens)["params"]


def logical_axes(config: ModelConfig):
    """A tree like the params whose leaves are the parameters' logical axis-name tuples."""
    return nn.get_partition_spec(abstract_params(config))


def init_cache(config: ModelConfig, batch: int, max_length: int):
    """An empty KV cache for ``batch`` rows of up to ``max_length`` tokens."""
    model = Llama(config)
    tokens = jax.ShapeDtypeStruct((batch, max_length), jnp.int32)
    shapes = jax.eval_shape(lambda t: model.init(jax.random.PRNGKey(0), t, mode="decode"), tokens)["cache"]
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
