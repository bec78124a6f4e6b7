"""Pipeline parallelism as one SPMD program: GPipe and circular (interleaved) schedules over the ``stage`` axis.

Design (no per-stage programs, so it composes with data/FSDP/tensor sharding through the usual rules):

* The decoder layers, stacked ``[num_layers, ...]`` by the scanned model, are stored as
  ``[repeats, stages, layers_per_repeat, ...]`` with ``stages`` sharded over the ``stage`` mesh axis. Virtual
  stage ``v = repeat × stages + stage`` holds model layers ``[v × lpr, (v + 1) × lpr)``; GPipe is ``repeats=1``.
* A state ``[stages, microbatch, length, embed]`` (sharded on ``stages``) holds what each stage computed
  last. Every iteration each stage applies its layers to its slot (`jax.vmap` over ``stages`` with
  ``spmd_axis_name="stage"``, so each device computes only its own stage and every sharding constraint
  inside the layer keeps ``stages`` on ``stage``), then the state is rotated by one stage (`jnp.roll`,
  which XLA turns into a collective-permute between neighbouring stages).
* Stage 0 takes fresh microbatches for the first ``M`` iterations; with repeats it then takes the last stage's
  outputs back (circular schedule, needs ``M >= stages``), kept in a per-stage buffer so that hand-back is
  the same neighbour permute. ``M × repeats + stages − 1`` iterations in all; the bubble fraction is
  ``(stages − 1) / (M × repeats + stages − 1)``.
* Microbatch ``m`` is rows ``m, m + M, m + 2M, …`` of the batch, so splitting keeps each device's rows local.

Backward is `jax.grad` through the loop (the reverse schedule). Embedding and head run outside the pipeline,
split over the batch axes as usual.
"""

from __future__ import annotations

import dataclasses
import math

import gin
import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.sharding import PartitionSpec

from meditron_jax.config import ModelConfig
from meditron_jax.model import llama
from meditron_jax.model.families import norm_class
from meditron_jax.model.layers import constrain
from meditron_jax.model.llama import layer_stack
from meditron_jax.parallel.mesh import MeshError

SCHEDULES = ("gpipe", "circular")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Gin: ``PipelineConfig.num_microbatches = 16``, ``PipelineConfig.schedule = "circular"``.

    The number of stages is the mesh's ``stage`` size. ``num_repeats`` (circular only) is how many times a
    microbatch goes round the stages; each stage then holds ``repeats`` non-adjacent blocks of layers.
    """

    num_microbatches: int = 1
    schedule: str = "gpipe"
    num_repeats: int = 2  # used by "circular" only
    # Save only each stage's input per iteration and recompute the stage in backward (on top of the model's
    # per-layer remat): less memory for one more forward pass. Always on for "circular" (see run_stages).
    remat_stage: bool = False

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"PipelineConfig.schedule {self.schedule!r} is not one of {SCHEDULES}")
        if self.num_microbatches < 1:
            raise ValueError(f"PipelineConfig.num_microbatches must be >= 1, got {self.num_microbatches}")
        if self.schedule == "circular" and self.num_repeats < 1:
            raise ValueError(f"PipelineConfig.num_repeats must be >= 1, got {self.num_repeats}")

    @property
    def repeats(self) -> int:
        return self.num_repeats if self.schedule == "circular" else 1

    def iterations(self, num_stages: int) -> int:
        return self.num_microbatches * self.repeats + num_stages - 1

    def bubble_fraction(self, num_stages: int) -> float:
        """Share of stage-iterations that compute nothing useful."""
        return (num_stages - 1) / self.iterations(num_stages)

    def validate(self, config: ModelConfig, num_stages: int, batch: int | None = None, batch_shards: int = 1) -> None:
        r = self.repeats
        if not config.scan_layers:
            raise MeshError("pipeline parallelism needs stacked layers: set ModelConfig.scan_layers=True")
        if config.num_layers % (num_stages * r):
            raise MeshError(
                f"num_layers={config.num_layers} is not divisible by stage={num_stages} × "
                f"repeats={r} (PipelineConfig.schedule={self.schedule!r})"
            )
        if r > 1 and self.num_microbatches < num_stages:
            raise MeshError(
                f"the circular schedule needs PipelineConfig.num_microbatches >= stage: "
                f"{self.num_microbatches} < {num_stages}"
            )
        if batch is not None:
            if batch % self.num_microbatches:
                raise MeshError(
                    f"batch of {batch} sequences per step does not split into "
                    f"PipelineConfig.num_microbatches={self.num_microbatches}"
                )
            mb = batch // self.num_microbatches
            if mb % batch_shards:
                raise MeshError(
                    f"microbatch of {mb} sequences (batch {batch} / {self.num_microbatches} "
                    f"microbatches) does not split over the {batch_shards} batch shards (data × fsdp)"
                )

    def describe(self, num_stages: int) -> str:
        return (
            f"{self.schedule} stages={num_stages} repeats={self.repeats} microbatches={self.num_microbatches} "
            f"iterations={self.iterations(num_stages)} bubble={self.bubble_fraction(num_stages):.1%}"
        )


# ---------------------------------------------------------------------------------------------------------
# Parameter layout: model [L, ...] ↔ pipeline [repeats, stages, L / (repeats × stages), ...]


def to_pipeline_params(params, num_stages: int, repeats: int):
    """Model parameters → pipeline layout (only ``params["layers"]`` changes; works on boxed trees too)."""

    def split(x):
        if isinstance(x, nn.LogicallyPartitioned):
            return x.replace(value=split(x.value), names=("repeats", "stages") + tuple(x.names))
        lpr = x.shape[0] // (num_stages * repeats)
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct((repeats, num_stages, lpr) + x.shape[1:], x.dtype)
        return x.reshape((repeats, num_stages, lpr) + x.shape[1:])

    out = dict(params)
    out["layers"] = jax.tree.map(split, params["layers"], is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    return out


def from_pipeline_params(params):
    """Pipeline layout → model parameters (``[num_layers, ...]`` stacked layers)."""
    out = dict(params)
    out["layers"] = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[3:]), params["layers"])
    return out


# ---------------------------------------------------------------------------------------------------------
# Forward pass


def embed(config: ModelConfig, params, tokens):
    """The model's input embedding (`meditron_jax.model.llama.embed`) on the pipeline's parameters."""
    return llama.embed(config, params["embedding"], tokens)


def head(config: ModelConfig, params, x):
    """Final norm and the model's output projection (`meditron_jax.model.llama.vocab_logits`).

    Every stage holds the pipeline's output; the batch is split over ``stage`` too (when it divides) so the
    head, the logits and the loss are not computed once per stage.
    """
    x = _over_stages(x, ("batch", "length", "embed"))
    x = norm_class(config)(config).apply({"params": params["final_norm"]}, x)
    w = params["embedding"].T if config.tie_word_embeddings else params["lm_head"]
    return llama.vocab_logits(config, x, w, constrain_fn=_over_stages)


def _over_stages(x, axes):
    """`constrain` with ``stage`` added to the batch dimension's mesh axes."""
    rules = nn.get_logical_axis_rules()
    mesh = jax.sharding.get_abstract_mesh()
    if not rules or mesh.empty:
        return x
    spec = list(nn.logical_to_mesh_axes(axes, rules))
    batch_axes = () if spec[0] is None else ((spec[0],) if isinstance(spec[0], str) else tuple(spec[0]))
    if "stage" not in batch_axes:
        batch_axes += ("stage",)
    if x.shape[0] % math.prod(mesh.shape[a] for a in batch_axes):
        return constrain(x, axes)
    return jax.lax.with_sharding_constraint(x, PartitionSpec(batch_axes, *spec[1:]))


def split_microbatches(x, m: int):
    """[B, ...] → [m, B/m, ...] with microbatch i = rows i, i+m, … (keeps a batch-sharded layout local)."""
    b = x.shape[0]
    return jnp.swapaxes(x.reshape((b // m, m) + x.shape[1:]), 0, 1)


def merge_microbatches(x):
    """Inverse of `split_microbatches`."""
    m, mb = x.shape[:2]
    return jnp.swapaxes(x, 0, 1).reshape((m * mb,) + x.shape[2:])


def run_stages(config: ModelConfig, pipe: PipelineConfig, num_stages: int, layer_params, x, positions, segment_ids):
    """The decoder layers of the pipeline: x [B, L, d] → [B, L, d]. ``layer_params`` in pipeline layout."""
    s_count, r, m = num_stages, pipe.repeats, pipe.num_microbatches
    lpr = config.num_layers // (s_count * r)
    stage_cfg = config.replace(num_layers=lpr)
    stack = layer_stack(stage_cfg, "train")(stage_cfg, "train")

    def apply(p, rep, h, pos, seg):
        """One stage: pick this repeat's layers (circular) and run them."""
        if r > 1:
            p = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, rep, keepdims=False), p)
        else:
            p = jax.tree.map(lambda a: a[0], p)
        out, _ = stack.apply({"params": p}, h, pos, seg)
        return out

    if pipe.remat_stage or r > 1:
        # Circular: a stage's weights change with the iteration, so anything saved from inside the stage
        # (the per-layer remat's inputs include the layer weights) would be stacked once per iteration —
        # iterations × stage weights. Checkpointing the whole stage saves only its inputs: the loop-invariant
        # full weights, the repeat index and the activations.
        apply = jax.checkpoint(apply)

    xs = constrain(split_microbatches(x, m), ("microbatch", "batch", "length", "embed"))
    pos_mb = split_microbatches(positions, m)
    seg_mb = None if segment_ids is None else split_microbatches(segment_ids, m)
    stage_ids = jnp.arange(s_count)
    state_axes = ("stages", "batch", "length", "embed")
    buf_axes = ("stages", "microbatch", "batch", "length", "embed")

    def vmap_stages(f, in_axes):
        return jax.vmap(f, in_axes=in_axes, spmd_axis_name="stage")

    def hand_back(buf, rolled, t):
        """Store the last stage's output of iteration t-1 (now on stage 0 after the roll) in stage 0's buffer."""
        item = t - s_count
        slot = jnp.mod(item, m)

        def write(s, b, r_s):
            old = jax.lax.dynamic_index_in_dim(b, slot, keepdims=False)
            new = jnp.where((s == 0) & (item >= 0), r_s, old)
            return jax.lax.dynamic_update_index_in_dim(b, new, slot, 0)

        return constrain(vmap_stages(write, (0, 0, 0))(stage_ids, buf, rolled), buf_axes)

    def body(carry, t):
        state, buf = carry
        rolled = constrain(jnp.roll(state, 1, axis=0), state_axes)
        buf = hand_back(buf, rolled, t)
        fresh = jax.lax.dynamic_index_in_dim(xs, jnp.minimum(t, m - 1), keepdims=False)

        def pick_input(s, r_s, b):
            first = fresh
            if r > 1:  # after the first M iterations stage 0 reads the previous repeat's outputs
                first = jnp.where(t < m, fresh, jax.lax.dynamic_index_in_dim(b, jnp.mod(t, m), keepdims=False))
            return jnp.where(s == 0, first, r_s)

        inputs = vmap_stages(pick_input, (0, 0, 0))(stage_ids, rolled, buf)
        item = t - stage_ids  # what each stage works on: microbatch item mod M, repeat item // M
        mb_idx = jnp.mod(item, m)
        rep_idx = jnp.clip(item // m, 0, r - 1)
        pos_s = pos_mb[mb_idx]
        seg_s = None if seg_mb is None else seg_mb[mb_idx]

        new_state = vmap_stages(apply, (1, 0, 0, 0, None if seg_s is None else 0))(
            layer_params, rep_idx, inputs, pos_s, seg_s
        )
        return (constrain(new_state, state_axes), buf), None

    state0 = constrain(jnp.zeros((s_count,) + xs.shape[1:], xs.dtype), state_axes)
    buf0 = constrain(jnp.zeros((s_count,) + xs.shape, xs.dtype), buf_axes)
    iters = pipe.iterations(s_count)
    (state, buf), _ = jax.lax.scan(body, (state0, buf0), jnp.arange(iters))
    # The last stage's final output reaches stage 0's buffer with one more hand-back; the buffer then holds
    # every microbatch's output of the last repeat.
    rolled = constrain(jnp.roll(state, 1, axis=0), state_axes)
    buf = hand_back(buf, rolled, jnp.asarray(iters))
    # A masked sum over stages (local partial sums + one all-reduce over `stage`) rather than a slice of the
    # stage-sharded buffer, which XLA may all-gather whole.
    outs = jnp.sum(jnp.where((stage_ids == 0)[:, None, None, None, None], buf, 0), axis=0)
    return merge_microbatches(constrain(outs, ("microbatch", "batch", "length", "embed")))
