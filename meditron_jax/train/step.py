"""The sharded training step: loss, `TrainState`, and one `jax.jit` with explicit in/out shardings.

Batches are dicts with the T5X decoder-only keys (arrays [batch, length]):

* ``decoder_input_tokens`` (required), ``decoder_target_tokens`` (required),
* ``decoder_loss_weights`` (default: all ones), ``decoder_segment_ids`` (packing; 0 = padding),
  ``decoder_positions`` (default: 0..length-1).

The loss is token-level cross-entropy, Σ w·CE / Σ w over the whole global batch — also with gradient
accumulation, whose microsteps sum numerators and denominators before dividing, so the result does not
depend on how the batch is split (over devices, accumulation steps or pipeline microbatches).

Typical use (a training loop calls ``step`` repeatedly)::

    mesh = create_mesh(MeshConfig(ici_fsdp=-1, ici_tensor=4))
    step = TrainStep(cfg, mesh, make_optimizer(opt_cfg), lr_schedule=learning_rate_schedule(opt_cfg))
    state = step.init_state(jax.random.PRNGKey(0))            # born sharded; never on one device
    batch = step.shard_batch(host_batch)                      # or distributed.global_batch(...)
    state, metrics = step(state, batch)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from meditron_jax.config import ModelConfig
from meditron_jax.data.features import BATCH_KEYS, REQUIRED_KEYS
from meditron_jax.model import Llama, abstract_params, layer_scan
from meditron_jax.model.llama import vocab_logits
from meditron_jax.model.loss import cross_entropy_sums, head_cross_entropy_sums
from meditron_jax.parallel import pipeline as pp
from meditron_jax.parallel.mesh import MeshError
from meditron_jax.parallel.rules import (
    ResolvedRules,
    ShardingReport,
    logical_axis_rules,
    logical_to_spec,
    mesh_axis_size,
    resolve_rules,
    sharding_report,
)


@flax.struct.dataclass
class TrainState:
    step: Any  # a scalar array; a ShapeDtypeStruct or PartitionSpec in the abstract and sharding trees
    params: Any
    opt_state: Any


def _complete(batch: Mapping[str, Any]) -> dict[str, Any]:
    missing = [k for k in REQUIRED_KEYS if k not in batch]
    unknown = sorted(set(batch) - set(BATCH_KEYS))
    if missing or unknown:
        raise KeyError(f"batch keys: missing {missing}, unknown {unknown}; expected {BATCH_KEYS}")
    return dict(batch)


class TrainStep:
    """Sharded train step for one model, mesh, rule list and optimizer (build once, call every step).

    Attributes a loop or a checkpointer needs: ``state_shardings``, ``abstract_state`` (ShapeDtypeStructs
    carrying those shardings), ``batch_sharding`` and ``rules``. With a `PipelineConfig` the layer
    parameters live in the pipeline layout (`meditron_jax.parallel.pipeline.to_pipeline_params`); convert
    with `model_params` before exporting.
    """

    def __init__(
        self,
        config: ModelConfig,
        mesh: Mesh,
        optimizer: optax.GradientTransformation,
        *,
        rules: Sequence | None = None,
        pipeline: pp.PipelineConfig | None = None,
        grad_accum_steps: int = 1,
        lr_schedule: Callable | None = None,
        model_name: str = "the model",
        donate: bool = True,
        max_replication_overhead: float | None = None,
        return_grads: bool = False,
        compiler_options: dict | None = None,
        accumulate_in_layer_scan: bool = True,
    ):
        self.config = config
        self.mesh = mesh
        self.optimizer = optimizer
        self.lr_schedule = lr_schedule
        self.grad_accum_steps = int(grad_accum_steps)
        if self.grad_accum_steps < 1:
            raise ValueError(f"grad_accum_steps must be >= 1, got {grad_accum_steps}")
        self.mesh_shape = dict(mesh.shape)
        self.num_stages = self.mesh_shape.get("stage", 1)
        if pipeline is None and self.num_stages > 1:
            raise MeshError(
                f"mesh has stage={self.num_stages} but no PipelineConfig: set the pipeline "
                "microbatches (PipelineConfig.num_microbatches) or make the stage axis 1"
            )
        self.pipeline = pipeline
        if pipeline is not None:
            pipeline.validate(config, self.num_stages)
            if config.loss_chunk_size:
                raise ValueError(
                    f"ModelConfig.loss_chunk_size={config.loss_chunk_size}: the chunked loss is not implemented "
                    "with pipeline parallelism; set it to 0"
                )
        resolved: ResolvedRules = resolve_rules(
            logical_axis_rules() if rules is None else rules, config, self.mesh_shape, model_name
        )
        self.rules = resolved.rules
        self.notes = list(resolved.notes)
        if pipeline is not None:
            self.notes.append(pipeline.describe(self.num_stages))

        boxed = abstract_params(config)
        if pipeline is not None:
            boxed = pp.to_pipeline_params(boxed, self.num_stages, pipeline.repeats)
        boxed_opt = jax.eval_shape(optimizer.init, boxed)
        logical = TrainState(
            step=PartitionSpec(), params=nn.get_partition_spec(boxed), opt_state=nn.get_partition_spec(boxed_opt)
        )
        self.state_shardings = nn.logical_to_mesh_sharding(logical, mesh, self.rules)
        abstract = TrainState(
            step=jax.ShapeDtypeStruct((), jnp.int32), params=nn.meta.unbox(boxed), opt_state=nn.meta.unbox(boxed_opt)
        )
        self.abstract_state = jax.tree.map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), abstract, self.state_shardings
        )
        self.batch_sharding = NamedSharding(mesh, logical_to_spec(("batch", "length"), self.rules))
        self.batch_shards = mesh_axis_size(self.mesh_shape, self.batch_sharding.spec[0])
        self._replicated = NamedSharding(mesh, PartitionSpec())
        self._donate = donate
        self._return_grads = return_grads  # metrics["grads"]: the step's gradients, for checks and debugging
        self._compiler_options = compiler_options  # XLA options, e.g. a lower CPU codegen level in tests
        # With accumulation, add each layer's gradient to its accumulator inside the backward layer scan
        # (`model.layer_scan`): the same values bit for bit, without a stacked float32 gradient per microstep.
        self.accumulate_in_layer_scan = (
            accumulate_in_layer_scan and self.grad_accum_steps > 1 and pipeline is None and layer_scan.supports(config)
        )
        self._jitted: dict[tuple, Any] = {}
        if max_replication_overhead is not None:
            self.report().check(max_replication_overhead)

    # -- sharding information -------------------------------------------------------------------------

    def report(self, include_optimizer: bool = False) -> ShardingReport:
        """Per-parameter sharding and bytes per device (optionally the optimizer state too)."""
        tree = self.abstract_state.params
        shardings = self.state_shardings.params
        if include_optimizer:
            tree = (tree, self.abstract_state.opt_state)
            shardings = (shardings, self.state_shardings.opt_state)
        return sharding_report(tree, shardings, self.mesh, self.notes)

    def check_batch(self, batch_size: int, length: int) -> None:
        a = self.grad_accum_steps
        if batch_size % a:
            raise MeshError(f"global batch {batch_size} is not divisible by grad_accum_steps={a}")
        per_step = batch_size // a
        if self.pipeline is not None:
            self.pipeline.validate(self.config, self.num_stages, per_step, self.batch_shards)
        elif per_step % self.batch_shards:
            raise MeshError(
                f"batch of {per_step} sequences per accumulation step (global {batch_size} / "
                f"grad_accum_steps={a}) does not split over the {self.batch_shards} batch shards "
                f"({self.batch_sharding.spec[0]})"
            )
        seq_ways = mesh_axis_size(self.mesh_shape, self.batch_sharding.spec[1])
        if length % seq_ways:
            raise MeshError(f"sequence length {length} is not divisible by the {seq_ways}-way sequence axis")

    def abstract_batch(self, batch_size: int, length: int, keys: Sequence[str] = BATCH_KEYS) -> dict:
        """The batch the input pipeline yields (every feature int32, loss weights too), so that an AOT compile
        is the program training runs."""
        self.check_batch(batch_size, length)
        return {k: jax.ShapeDtypeStruct((batch_size, length), jnp.int32, sharding=self.batch_sharding) for k in keys}

    # -- state ----------------------------------------------------------------------------------------

    def _context(self):
        return _context(self.mesh, self.rules)

    def _to_layout(self, params):
        if self.pipeline is None:
            return params
        return pp.to_pipeline_params(params, self.num_stages, self.pipeline.repeats)

    def model_params(self, params):
        """Parameters in the model's own layout (undoes the pipeline layout)."""
        return params if self.pipeline is None else pp.from_pipeline_params(params)

    def init_state(self, rng) -> TrainState:
        """Fresh random parameters and optimizer state, created directly in their shardings."""

        def init(key):
            tokens = jnp.zeros((1, 8), jnp.int32)
            params = self._to_layout(nn.meta.unbox(Llama(self.config).init(key, tokens)["params"]))
            return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.optimizer.init(params))

        with jax.set_mesh(self.mesh):  # no logical rules: init's dummy batch of 1 is not to be split
            return jax.jit(init, out_shardings=self.state_shardings, compiler_options=self._compiler_options)(rng)

    def shard_params(self, params):
        """Model-layout parameters → this step's layout, placed in their shardings, without compiling.

        Host (numpy) arrays are copied shard by shard (`jax.make_array_from_callback`), so no device ever
        holds a whole 70B tree and, with several processes, each host transfers only its own shards.
        """

        def put(x, sharding):
            if isinstance(x, jax.Array):
                return jax.device_put(x, sharding)
            x = np.asarray(x)
            return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

        return jax.tree.map(put, self._to_layout(params), self.state_shardings.params)

    def state_from_params(self, params) -> TrainState:
        """A step-0 state from model-layout parameters (e.g. a converted checkpoint), born sharded."""

        def make(p):
            return TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=self.optimizer.init(p))

        with jax.set_mesh(self.mesh):
            return jax.jit(
                make,
                in_shardings=(self.state_shardings.params,),
                out_shardings=self.state_shardings,
                compiler_options=self._compiler_options,
            )(self.shard_params(params))

    def shard_batch(self, batch: Mapping[str, Any]) -> dict:
        """Place a host batch (the full global batch, single process) on the mesh."""
        batch = _complete(batch)
        first = next(iter(batch.values()))
        self.check_batch(*np.shape(first))
        return {k: jax.device_put(np.asarray(v), self.batch_sharding) for k, v in batch.items()}

    # -- computation ----------------------------------------------------------------------------------

    def _logits(self, params, mb):
        tokens = mb["decoder_input_tokens"]
        positions = mb.get("decoder_positions")
        segment_ids = mb.get("decoder_segment_ids")
        if self.pipeline is None:
            return Llama(self.config).apply({"params": params}, tokens, positions, segment_ids)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        x = pp.embed(self.config, params, tokens)
        x = pp.run_stages(self.config, self.pipeline, self.num_stages, params["layers"], x, positions, segment_ids)
        return pp.head(self.config, params, x)

    def _loss_sums(self, params, mb, layer_grads=None):
        """(Σ w·CE, Σ w) of a microbatch (`meditron_jax.model.loss`; chunked with ModelConfig.loss_chunk_size).

        layer_grads: accumulators that the layers' gradients are added into (`Llama`'s argument of that name).
        """
        weights = mb.get("decoder_loss_weights")
        if weights is None:
            weights = jnp.ones(mb["decoder_target_tokens"].shape, jnp.float32)
        if self.pipeline is None:  # the loss applies the head itself (chunked, or with a joint backward)
            x, head = Llama(self.config).apply(
                {"params": params},
                mb["decoder_input_tokens"],
                mb.get("decoder_positions"),
                mb.get("decoder_segment_ids"),
                return_hidden=True,
                layer_grads=layer_grads,
            )
            return head_cross_entropy_sums(self.config, x, head, mb["decoder_target_tokens"], weights, vocab_logits)
        logits = self._logits(params, mb)
        return cross_entropy_sums(logits, mb["decoder_target_tokens"], weights)

    def _grads(self, params, batch):
        """(loss, Σw, grads of the mean loss, their global norm) over the whole batch, accumulating over
        microsteps."""
        grad_fn = jax.value_and_grad(self._loss_sums, has_aux=True)
        a = self.grad_accum_steps
        if a == 1:
            (loss_sum, w_sum), g_sum = grad_fn(params, batch)
        else:
            micro = {k: pp.split_microbatches(v, a) for k, v in batch.items()}
            micro = {
                k: jax.lax.with_sharding_constraint(
                    v, NamedSharding(self.mesh, PartitionSpec(None, *self.batch_sharding.spec))
                )
                for k, v in micro.items()
            }
            g_shard = self.state_shardings.params

            def body(carry, mb):
                g_acc, l_acc, w_acc = carry
                if self.accumulate_in_layer_scan:  # g["layers"] is already g_acc["layers"] + the gradient
                    (loss, w), g = grad_fn(params, mb, g_acc["layers"])
                    g_acc = {k: g[k] if k == "layers" else jax.tree.map(jnp.add, g_acc[k], g[k]) for k in g}
                else:
                    (loss, w), g = grad_fn(params, mb)
                    g_acc = jax.tree.map(jnp.add, g_acc, g)
                return (jax.lax.with_sharding_constraint(g_acc, g_shard), l_acc + loss, w_acc + w), None

            zeros = jax.lax.with_sharding_constraint(jax.tree.map(jnp.zeros_like, params), g_shard)
            (g_sum, loss_sum, w_sum), _ = jax.lax.scan(body, (zeros, jnp.float32(0), jnp.float32(0)), micro)
        denom = jnp.maximum(w_sum, 1.0)
        # A product with one reciprocal, not a division per element, and the norm taken of the sum: XLA then
        # fuses the multiply into each of the optimizer's reads. A division, or a norm of the scaled
        # gradients (XLA:CPU's reduction reads a materialised operand), kept a gradient-sized temporary
        # per parameter.
        inverse = 1.0 / denom
        grads = jax.tree.map(lambda g: (g * inverse).astype(g.dtype), g_sum)
        return loss_sum / denom, w_sum, grads, optax.global_norm(g_sum) * inverse

    def _step(self, state: TrainState, batch):
        loss, tokens, grads, grad_norm = self._grads(state.params, batch)
        grads = jax.lax.with_sharding_constraint(grads, self.state_shardings.params)
        # make_optimizer's chain takes the norm (optimizer.clip_by_global_norm); a plain optax optimizer cannot
        extra = {"global_norm": grad_norm} if isinstance(self.optimizer, optax.GradientTransformationExtraArgs) else {}
        updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params, **extra)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": grad_norm, "tokens": tokens}
        if self.lr_schedule is not None:
            metrics["learning_rate"] = jnp.asarray(self.lr_schedule(state.step), jnp.float32)
        if self._return_grads:
            metrics["grads"] = grads
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    def _jit(self, keys: tuple[str, ...]):
        if keys not in self._jitted:
            batch_sh = {k: self.batch_sharding for k in keys}
            metrics_sh: Any = self._replicated
            if self._return_grads:
                names = ["loss", "grad_norm", "tokens"] + (["learning_rate"] if self.lr_schedule else [])
                metrics_sh = {**{k: self._replicated for k in names}, "grads": self.state_shardings.params}
            self._jitted[keys] = jax.jit(
                self._step,
                in_shardings=(self.state_shardings, batch_sh),
                out_shardings=(self.state_shardings, metrics_sh),
                donate_argnums=(0,) if self._donate else (),
                compiler_options=self._compiler_options,
            )
        return self._jitted[keys]

    def __call__(self, state: TrainState, batch: Mapping[str, Any]):
        """One optimizer step → (new state, metrics {loss, grad_norm, tokens, learning_rate[, grads]})."""
        batch = _complete(batch)
        with self._context():
            return self._jit(tuple(sorted(batch)))(state, batch)

    def eval_loss(self, params, batch: Mapping[str, Any]):
        """(Σ w·CE, Σ w) of a batch under ``params``, no gradients (validation; sum several, then divide)."""
        batch = _complete(batch)
        keys = tuple(sorted(batch))
        if ("eval", keys) not in self._jitted:
            self._jitted["eval", keys] = jax.jit(
                self._loss_sums,
                in_shardings=(self.state_shardings.params, {k: self.batch_sharding for k in keys}),
                out_shardings=self._replicated,
                compiler_options=self._compiler_options,
            )
        with self._context():
            return self._jitted["eval", keys](params, batch)

    def lower(self, batch_size: int, length: int, keys: Sequence[str] = BATCH_KEYS):
        """Lower the full step (forward, backward, optimizer update) for abstract inputs, e.g. for AOT."""
        abstract_batch = self.abstract_batch(batch_size, length, keys)
        with self._context():
            return self._jit(tuple(sorted(abstract_batch))).lower(self.abstract_state, abstract_batch)


@contextlib.contextmanager
def _context(mesh, rules):
    """Mesh + logical rules in force while tracing (the model's sharding constraints need both)."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield
