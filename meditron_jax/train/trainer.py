"""The training loop: model + mesh + sharded step + SeqIO batches + orbax checkpoints that resume exactly.

Everything is set from gin (``gin/runs/*.gin``); `scripts/train.py` only parses flags.
A checkpoint at step N is the train state (orbax, atomic: written to a temporary folder and renamed on
commit) plus each host's input-pipeline position, written *before* the state so that a state on disk
always has its data position. A killed run restarts from the newest complete checkpoint and sees the
batches it would have seen.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Mapping
from typing import Any

import gin
import jax
import numpy as np

from meditron_jax.config import EXECUTION_FIELDS, ModelConfig, get_config
from meditron_jax.convert.model_dir import RUN_CHECKPOINTS, RUN_CONFIG_FILE, load_model_dir, read_model_config
from meditron_jax.parallel import distributed
from meditron_jax.parallel.mesh import MeshConfig, create_mesh
from meditron_jax.parallel.pipeline import PipelineConfig
from meditron_jax.train.optimizer import OptimizerConfig, learning_rate_schedule, make_optimizer
from meditron_jax.train.step import TrainState, TrainStep

log = logging.getLogger(__name__)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model_dir: str = ""  # gin: MODEL_DIR macro
    # A ModelConfig (gin: `TrainConfig.model = @ModelConfig()` and `ModelConfig.hidden_size = ...`, see
    # gin/models/) or the name of a preset in meditron_jax.config. With init_from and a preset name, the
    # checkpoint gives the architecture; with a ModelConfig, the checkpoint must match it.
    model: str | ModelConfig = "tiny"
    model_overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # e.g. {"dtype": "bfloat16"}
    init_from: str | None = None  # an HF, meditron_jax or training-run directory to continue from
    mixture: str = "gap_replay"
    sequence_length: int = 2048
    global_batch: int = 8
    train_steps: int = 100  # also the optimizer's train_steps (its cosine horizon is a multiple of it)
    grad_accum_steps: int = 1
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    log_every: int = 10
    seed: int = 0
    use_pipeline: bool = False  # PipelineConfig (gin) applies; the mesh's stage axis must be > 1

    def __post_init__(self):
        if not self.model_dir:
            raise ValueError("TrainConfig.model_dir is empty: pass --gin.MODEL_DIR=... (or TrainConfig.model_dir)")
        for name in ("sequence_length", "global_batch", "train_steps", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1 (got {getattr(self, name)})")


def model_config(cfg: TrainConfig) -> ModelConfig:
    overrides = dict(cfg.model_overrides)
    if isinstance(cfg.model, ModelConfig):
        wanted = cfg.model.replace(**overrides)
    elif not cfg.init_from:
        return get_config(cfg.model, **overrides)
    else:
        return read_model_config(cfg.init_from, **overrides)
    if cfg.init_from:
        check_same_architecture(read_model_config(cfg.init_from), wanted, cfg.init_from)
    return wanted


# Fields a checkpoint may differ in from the model it initialises: the vocabulary can grow (extend_vocab),
# the context can be set per run, and the execution options do not change the weights.
_FREE_FIELDS = {"vocab_size", "max_position_embeddings", "vocab_pad_multiple", "bos_token_id", "eos_token_id"}


def check_same_architecture(stored: ModelConfig, wanted: ModelConfig, source: str) -> None:
    for field in dataclasses.fields(ModelConfig):
        if field.name in _FREE_FIELDS or field.name in EXECUTION_FIELDS:
            continue
        have, want = getattr(stored, field.name), getattr(wanted, field.name)
        if have != want:
            raise ValueError(
                f"TrainConfig.init_from {source}: the checkpoint has {field.name}={have!r} but the gin "
                f"ModelConfig says {want!r}"
            )


def _initial_params(cfg: TrainConfig, model_cfg: ModelConfig):
    """Parameters of ``init_from``, with the vocabulary extended when the model's is larger
    (Llama-2's 32,000 tokens → MEDITRON's 32,017, whose marker tokens the curated corpus contains)."""
    execution = {name: getattr(model_cfg, name) for name in EXECUTION_FIELDS}
    params, stored = load_model_dir(cfg.init_from, **execution)
    return extend_vocab(params, stored, model_cfg)


def extend_vocab(params, old: ModelConfig, new: ModelConfig):
    """Grow the embedding (and untied head) from ``old.vocab_size`` to ``new.vocab_size`` rows; new rows
    start at the mean of the existing ones, a common choice that keeps their initial logits typical."""
    if new.vocab_size == old.vocab_size:
        return params
    if new.vocab_size < old.vocab_size:
        raise ValueError(
            f"the model's vocab_size {new.vocab_size} is smaller than the checkpoint's "
            f"{old.vocab_size}; shrinking a vocabulary would drop trained rows"
        )
    out = dict(params)
    emb = np.asarray(params["embedding"])[: old.vocab_size]
    grown = np.concatenate([emb, np.repeat(emb.mean(0, keepdims=True), new.vocab_size - old.vocab_size, 0)])
    out["embedding"] = np.pad(grown, ((0, new.padded_vocab_size - new.vocab_size), (0, 0)))
    if "lm_head" in params:
        head = np.asarray(params["lm_head"])[:, : old.vocab_size]
        grown = np.concatenate(
            [head, np.repeat(head.mean(1, keepdims=True), new.vocab_size - old.vocab_size, 1)], axis=1
        )
        out["lm_head"] = np.pad(grown, ((0, 0), (0, new.padded_vocab_size - new.vocab_size)))
    return out


def check_token_ids(batch: Mapping[str, np.ndarray], vocab_size: int, mixture: str) -> None:
    """Out-of-range ids would be silently clamped or turned into NaNs inside the jitted step."""
    for key in ("decoder_input_tokens", "decoder_target_tokens"):
        top = int(np.max(batch[key]))
        if top >= vocab_size:
            raise ValueError(
                f"mixture {mixture!r} produced token id {top} in {key}, but the model's vocabulary "
                f"has {vocab_size} tokens; set model_overrides vocab_size (MEDITRON: 32017)"
            )


class Checkpoints:
    """Train state (orbax CheckpointManager) + per-host input positions under ``model_dir``."""

    def __init__(self, model_dir: str, keep: int):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.state_dir = os.path.join(os.path.abspath(model_dir), RUN_CHECKPOINTS)
        self.input_dir = os.path.join(os.path.abspath(model_dir), "input_state")
        self.manager = ocp.CheckpointManager(
            self.state_dir, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def input_path(self, step: int) -> str:
        from meditron_jax.data.pipeline import host_dir

        return host_dir(os.path.join(self.input_dir, str(step)), jax.process_index(), jax.process_count())

    def save(self, step: int, state: TrainState, iterator) -> None:
        iterator.save(self.input_path(step))
        self.manager.save(step, args=self._ocp.args.StandardSave(_as_dict(state)))
        self.manager.wait_until_finished()
        self._prune_inputs()

    def restore(self, step: int, abstract_state: TrainState) -> TrainState:
        if not os.path.isdir(self.input_path(step)):
            raise FileNotFoundError(f"checkpoint {step} has no input-pipeline state at {self.input_path(step)}")
        restored = self.manager.restore(step, args=self._ocp.args.StandardRestore(_as_dict(abstract_state)))
        return TrainState(**restored)

    def _prune_inputs(self) -> None:
        if jax.process_index() != 0 or not os.path.isdir(self.input_dir):
            return
        kept = {str(s) for s in self.manager.all_steps()}
        for name in os.listdir(self.input_dir):
            if name not in kept:
                shutil.rmtree(os.path.join(self.input_dir, name), ignore_errors=True)

    def close(self) -> None:
        self.manager.close()


def _as_dict(state: TrainState) -> dict:
    return {"step": state.step, "params": state.params, "opt_state": state.opt_state}


@gin.configurable
def train(
    config: TrainConfig = gin.REQUIRED,
    mesh_config: MeshConfig | None = None,
    optimizer_config: OptimizerConfig | None = None,
    pipeline_config: PipelineConfig | None = None,
    max_steps_this_run: int | None = None,
) -> dict:
    """Train to ``config.train_steps`` (or stop after ``max_steps_this_run`` more); returns the last metrics.

    ``max_steps_this_run`` exists to stop early on purpose (tests of resumption, time-limited jobs).
    """
    from meditron_jax.data.pipeline import make_iterator

    distributed.initialize()
    os.makedirs(config.model_dir, exist_ok=True)
    model_cfg = model_config(config)
    mesh = create_mesh(mesh_config or MeshConfig())
    opt_cfg = dataclasses.replace(optimizer_config or OptimizerConfig(), train_steps=config.train_steps)
    step_fn = TrainStep(
        model_cfg,
        mesh,
        make_optimizer(opt_cfg),
        pipeline=(pipeline_config or PipelineConfig()) if config.use_pipeline else None,
        grad_accum_steps=config.grad_accum_steps,
        lr_schedule=learning_rate_schedule(opt_cfg),
        model_name=config.model if isinstance(config.model, str) else "gin ModelConfig",
    )
    step_fn.check_batch(config.global_batch, config.sequence_length)
    ckpts = Checkpoints(config.model_dir, config.keep_checkpoints)
    start = ckpts.latest_step()
    data_kwargs = dict(
        sequence_length=config.sequence_length,
        batch_size=config.global_batch,
        seed=config.seed,
        host_index=jax.process_index(),
        host_count=jax.process_count(),
    )
    if start is not None:
        state = ckpts.restore(start, step_fn.abstract_state)
        iterator = make_iterator(config.mixture, restore_from=ckpts.input_path(start), **data_kwargs)
        log.info("resumed from step %d in %s", start, ckpts.state_dir)
    else:
        start = 0
        if config.init_from:
            state = step_fn.state_from_params(_initial_params(config, model_cfg))
        else:
            state = step_fn.init_state(jax.random.PRNGKey(config.seed))
        iterator = make_iterator(config.mixture, **data_kwargs)
    if jax.process_index() == 0:
        model_cfg.to_json(os.path.join(config.model_dir, RUN_CONFIG_FILE))
        with open(os.path.join(config.model_dir, "operative_config.gin"), "w") as f:
            f.write(gin.operative_config_str())

    end = config.train_steps if max_steps_this_run is None else min(config.train_steps, start + max_steps_this_run)
    metrics_path = os.path.join(config.model_dir, "metrics.jsonl")
    last: dict = {}
    t0 = time.perf_counter()
    for i in range(start, end):
        host_batch = next(iterator)
        check_token_ids(host_batch, model_cfg.vocab_size, config.mixture)
        batch = distributed.global_batch(host_batch, step_fn.batch_sharding, config.global_batch)
        state, metrics = step_fn(state, batch)
        done = i + 1
        if done % config.log_every == 0 or done == end:
            last = {k: float(np.asarray(v)) for k, v in metrics.items() if k != "grads"}
            last.update(step=done, seconds=round(time.perf_counter() - t0, 3))
            if jax.process_index() == 0:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(last) + "\n")
                log.info(
                    "step %d loss %.4f grad_norm %.3f lr %.3g",
                    done,
                    last["loss"],
                    last["grad_norm"],
                    last.get("learning_rate", float("nan")),
                )
        if done % config.checkpoint_every == 0 or done == end:
            ckpts.save(done, state, iterator)
    ckpts.close()
    return last
