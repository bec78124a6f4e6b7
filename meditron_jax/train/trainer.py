"""The training loop: model + mesh + sharded step + SeqIO batches + orbax checkpoints that resume exactly.

Everything is set from gin (``gin/runs/*.gin``); `scripts/train.py` only parses flags.
A checkpoint at step N is the train state (orbax, asynchronous and atomic) plus each host's input-pipeline
position, written *before* the state is committed (meditron_jax.train.checkpoints). A killed or preempted
run restarts from the newest intact checkpoint and sees the batches it would have seen. One run per
MODEL_DIR (run_lock); metrics go to the console, metrics.jsonl and TensorBoard (metrics).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Mapping
from typing import Any

import gin
import jax
import numpy as np
from flax import linen as nn

from meditron_jax import compilation_cache, fs
from meditron_jax.config import EXECUTION_FIELDS, ModelConfig, get_config
from meditron_jax.convert import streaming
from meditron_jax.convert.model_dir import RUN_CONFIG_FILE, load_model_dir, read_model_config
from meditron_jax.model import logical_axes
from meditron_jax.parallel import distributed
from meditron_jax.parallel.mesh import MeshConfig, create_mesh
from meditron_jax.parallel.pipeline import PipelineConfig
from meditron_jax.train.checkpoints import Checkpoints, PreemptionNotice
from meditron_jax.train.metrics import (
    MetricsWriter,
    StepMeter,
    model_flops_per_token,
    peak_flops_per_device,
    perplexity,
)
from meditron_jax.train.optimizer import OptimizerConfig, learning_rate_schedule, make_optimizer
from meditron_jax.train.run_lock import RunLock
from meditron_jax.train.step import TrainStep
from meditron_jax.train.validation import Validation

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
    keep_checkpoints: int = 3  # the newest K checkpoints ...
    keep_every: int = 0  # ... plus every step that is a multiple of this (0: none)
    async_checkpoints: bool = True  # checkpoint writes overlap the following steps
    log_every: int = 10
    eval_every: int = 0  # validation loss per task of the mixture every N steps (0: never)
    eval_steps: int = 10  # validation batches per task
    tensorboard: bool = True  # event files in MODEL_DIR/tensorboard
    peak_flops_per_device: float | None = None  # for MFU; default: meditron_jax.hardware (CPU: measured)
    # JAX's persistent compilation cache (meditron_jax/compilation_cache.py): a restarted run skips compiling.
    # None: off. JAX_COMPILATION_CACHE_DIR, when set, wins.
    compilation_cache_dir: str | None = compilation_cache.DEFAULT_DIR
    seed: int = 0
    use_pipeline: bool = False  # PipelineConfig (gin) applies; the mesh's stage axis must be > 1

    def __post_init__(self):
        if not self.model_dir:
            raise ValueError("TrainConfig.model_dir is empty: pass --gin.MODEL_DIR=... (or TrainConfig.model_dir)")
        positive = ("sequence_length", "global_batch", "train_steps", "checkpoint_every", "log_every", "eval_steps")
        for name in (*positive, "keep_checkpoints"):  # keeping 0 would delete the checkpoint just written
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1 (got {getattr(self, name)})")
        for name in ("keep_every", "eval_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0 (got {getattr(self, name)})")


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


def _initial_params(cfg: TrainConfig, model_cfg: ModelConfig, shardings=None):
    """Parameters of ``init_from``, with the vocabulary extended when the model's is larger
    (Llama-2's 32,000 tokens → MEDITRON's 32,017, whose marker tokens the curated corpus contains).

    With ``shardings`` (model layout) they are placed there, a Hugging Face checkpoint read slice by slice
    straight into each device's shard (`convert.streaming`); without, they are host / lazy arrays."""
    assert cfg.init_from is not None
    execution = {name: getattr(model_cfg, name) for name in EXECUTION_FIELDS}
    params, stored = load_model_dir(cfg.init_from, lazy=True, **execution)
    params = extend_vocab(params, stored, model_cfg)  # reads only the embedding and head, when it grows them
    return params if shardings is None else streaming.place(params, shardings)


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


def _mixture_vocabulary(mixture: str):
    import seqio

    import meditron_jax.data.tasks  # noqa: F401  (registers the tasks)

    return seqio.get_mixture_or_task(mixture).output_features["targets"].vocabulary


def check_vocabulary(mixture: str, vocab_size: int) -> None:
    """Before anything is built: a tokenizer with ids past the model's rows is refused at once, not when the first
    document holding such a token arrives (the curated corpus's markers, possibly hours into a run)."""
    tokens = _mixture_vocabulary(mixture).vocab_size
    if tokens > vocab_size:
        raise ValueError(
            f"mixture {mixture!r} is tokenized with {tokens} tokens, but the model's vocabulary has {vocab_size} "
            "tokens; set model_overrides vocab_size (MEDITRON: 32017)"
        )


def _write_tokenizer(mixture: str, model_dir: str) -> None:
    """The mixture's vocabulary as HF tokenizer files, so MODEL_DIR is a model directory that load(), the
    evaluation and the converter read without being told where the tokenizer is."""
    vocab = _mixture_vocabulary(mixture)
    if hasattr(vocab, "write_tokenizer_files"):
        vocab.write_tokenizer_files(model_dir)


@gin.configurable
def train(
    config: TrainConfig = gin.REQUIRED,
    mesh_config: MeshConfig | None = None,
    optimizer_config: OptimizerConfig | None = None,
    pipeline_config: PipelineConfig | None = None,
    max_steps_this_run: int | None = None,
) -> dict:
    """Train to ``config.train_steps`` (or stop after ``max_steps_this_run`` more); returns the last metrics
    with ``preempted`` True when a SIGTERM (or the TPU preemption sync point) stopped the run early, after
    saving a checkpoint that a restart of the same command resumes exactly.

    ``max_steps_this_run`` exists to stop early on purpose (tests of resumption, time-limited jobs).
    """
    distributed.initialize()
    fs.makedirs(config.model_dir)  # MODEL_DIR may be gs://...: never os.* on it (meditron_jax.fs)
    lock = RunLock(config.model_dir) if jax.process_index() == 0 else None
    if lock is not None:
        lock.acquire()
    notice = PreemptionNotice()  # from here on, a SIGTERM means "save at the next step boundary and stop"
    try:
        return _train(config, mesh_config, optimizer_config, pipeline_config, max_steps_this_run, notice)
    finally:
        notice.close()
        if lock is not None:
            lock.release()


def _train(config, mesh_config, optimizer_config, pipeline_config, max_steps_this_run, notice) -> dict:
    compilation_cache.use_compilation_cache(config.compilation_cache_dir)
    model_cfg = model_config(config)
    check_vocabulary(config.mixture, model_cfg.vocab_size)
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
    ckpts = Checkpoints(
        config.model_dir,
        every=config.checkpoint_every,
        keep=config.keep_checkpoints,
        keep_every=config.keep_every,
        async_save=config.async_checkpoints,
    )
    try:
        return _loop(config, model_cfg, step_fn, mesh, ckpts, notice, max_steps_this_run)
    finally:
        ckpts.close()  # waits for an asynchronous save still in flight


def _resume_or_init(config, model_cfg, step_fn, ckpts, data_kwargs):
    """(first step, state, input iterator): the newest intact checkpoint, else a fresh start."""
    from meditron_jax.data.pipeline import make_iterator

    had_checkpoints = bool(ckpts.all_steps())
    resumed = ckpts.restore_latest(
        step_fn.abstract_state,
        lambda path: make_iterator(config.mixture, restore_from=path, batch_size=config.global_batch, **data_kwargs),
    )
    if resumed is not None:
        start, state, iterator = resumed
        log.info("resumed from step %d (%s)", start, os.path.join(ckpts.state_dir, str(start)))
    else:
        if had_checkpoints:
            log.warning("no checkpoint in %s could be restored: starting from step 0", ckpts.state_dir)
        start = 0
        if config.init_from:
            shardings = nn.logical_to_mesh_sharding(logical_axes(model_cfg), step_fn.mesh, step_fn.rules)
            state = step_fn.state_from_params(_initial_params(config, model_cfg, shardings))
        else:
            state = step_fn.init_state(jax.random.PRNGKey(config.seed))
        iterator = make_iterator(config.mixture, batch_size=config.global_batch, **data_kwargs)
    return start, state, iterator


def _loop(config, model_cfg, step_fn, mesh, ckpts, notice, max_steps_this_run) -> dict:
    data_kwargs = dict(
        sequence_length=config.sequence_length,
        seed=config.seed,
        host_index=jax.process_index(),
        host_count=jax.process_count(),
    )
    start, state, iterator = _resume_or_init(config, model_cfg, step_fn, ckpts, data_kwargs)
    try:
        return _run_steps(
            config, model_cfg, step_fn, mesh, ckpts, notice, max_steps_this_run, data_kwargs, start, state, iterator
        )
    finally:
        iterator.close()  # now, not at interpreter shutdown, where tf.data's teardown can hang (data/pipeline.py)


def _run_steps(
    config, model_cfg, step_fn, mesh, ckpts, notice, max_steps_this_run, data_kwargs, start, state, iterator
) -> dict:
    if jax.process_index() == 0:
        config_json = json.dumps(model_cfg.to_dict(), indent=2, sort_keys=True)  # as ModelConfig.to_json
        fs.write_text(fs.join(config.model_dir, RUN_CONFIG_FILE), config_json)
        _write_tokenizer(config.mixture, config.model_dir)
        fs.write_text(fs.join(config.model_dir, "operative_config.gin"), gin.operative_config_str())

    def check(batch, source=config.mixture):
        check_token_ids(batch, model_cfg.vocab_size, source)

    validation = None
    if config.eval_every:
        validation = Validation(step_fn, config.mixture, config.eval_steps, config.global_batch, check, **data_kwargs)
    end = config.train_steps if max_steps_this_run is None else min(config.train_steps, start + max_steps_this_run)
    writer = MetricsWriter(config.model_dir, config.train_steps, tensorboard=config.tensorboard)
    flops_per_step = model_flops_per_token(model_cfg, config.sequence_length) * config.global_batch
    flops_per_step *= config.sequence_length
    peak = peak_flops_per_device(list(mesh.devices.flat), config.peak_flops_per_device)
    peak_total = peak * mesh.devices.size if peak else None
    meter = StepMeter()
    last: dict = {}
    preempted = False
    t0 = time.perf_counter()
    try:
        for i in range(start, end):
            with meter.input():
                host_batch = next(iterator)
                check(host_batch)
                batch = distributed.global_batch(host_batch, step_fn.batch_sharding, config.global_batch)
            state, metrics = step_fn(state, batch)
            meter.steps += 1
            done = i + 1
            stop = notice.reached(done, ckpts)
            if done % config.log_every == 0 or done == end or stop:
                # Blocks on this step's outputs only (see StepMeter); the first interval includes compiling.
                values = jax.device_get({k: v for k, v in metrics.items() if k != "grads"})
                last = {k: float(np.asarray(v)) for k, v in values.items()}
                timing = meter.read()
                last.update(
                    step=done,
                    seconds=round(time.perf_counter() - t0, 3),
                    perplexity=perplexity(last["loss"]),
                    tokens_per_s=config.global_batch * config.sequence_length / timing["step_time_s"],
                    **timing,
                )
                if peak_total:
                    last["mfu"] = flops_per_step / timing["step_time_s"] / peak_total
                writer.train(done, last)
                meter.reset()
            if validation is not None and (done % config.eval_every == 0 or done == end):
                with meter.exclude():
                    writer.eval(done, validation.run(state.params))
            with meter.exclude():
                t = time.perf_counter()
                if ckpts.save(done, state, iterator, force=done == end or stop):
                    log.info(
                        "checkpoint %d: %.2f s blocking, the rest written in the background",
                        done,
                        time.perf_counter() - t,
                    )
            if stop:
                preempted = True
                log.warning("preempted: checkpoint of step %d saved; stopping (rerun the command to resume)", done)
                break
        ckpts.wait()
    finally:
        writer.close()
    last["preempted"] = preempted
    return last
