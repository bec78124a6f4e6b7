"""One answer to "what kind of model directory is this, load it": Hugging Face, our orbax model format, or a
training run's ``MODEL_DIR`` (its newest checkpoint), given as a path or as a Hugging Face hub id
(``convert.hub``). The API, the trainer's ``init_from``, the evaluation and the scripts all come through here."""

from __future__ import annotations

import math
import os

import jax
import numpy as np

from meditron_jax.config import ModelConfig
from meditron_jax.convert import hf, orbax
from meditron_jax.convert.hub import resolve_model_path

# What the trainer writes into MODEL_DIR (meditron_jax.train.trainer): the architecture and orbax steps.
RUN_CONFIG_FILE = "model_config.json"
RUN_CHECKPOINTS = "checkpoints"


def model_dir_kind(path: str | os.PathLike) -> str:
    """``"orbax"``, ``"hf"`` or ``"run"``; a clear error for anything else."""
    path = resolve_model_path(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"{path} is not a directory (expected a Hugging Face or meditron_jax model, or a run dir)"
        )
    if orbax.is_orbax_model(path):
        return "orbax"
    if os.path.isfile(os.path.join(path, RUN_CONFIG_FILE)) and os.path.isdir(os.path.join(path, RUN_CHECKPOINTS)):
        return "run"
    if os.path.isfile(os.path.join(path, "config.json")):
        return "hf"
    raise FileNotFoundError(
        f"{os.path.join(path, 'config.json')} does not exist: not a Hugging Face model directory, nor a "
        f"meditron_jax one (no {orbax.CONFIG_FILE}), nor a training run's MODEL_DIR (no {RUN_CONFIG_FILE} and "
        f"{RUN_CHECKPOINTS}/)"
    )


def read_model_config(path: str | os.PathLike, **overrides) -> ModelConfig:
    """The stored architecture of any model directory, with ``overrides`` applied."""
    path = resolve_model_path(path)
    kind = model_dir_kind(path)
    if kind == "hf":
        return hf.read_hf_config(path, **overrides)
    name = orbax.CONFIG_FILE if kind == "orbax" else RUN_CONFIG_FILE
    return ModelConfig.from_json(os.path.join(path, name)).replace(**overrides)


def latest_run_step(path: str | os.PathLike) -> int:
    """The newest complete checkpoint step of a training run (orbax's own step bookkeeping)."""
    import orbax.checkpoint as ocp

    ckpt_dir = os.path.join(os.path.abspath(os.fspath(path)), RUN_CHECKPOINTS)
    steps = ocp.utils.checkpoint_steps(ckpt_dir)
    if not steps:
        raise FileNotFoundError(f"{path}: training run has no finished checkpoint under {RUN_CHECKPOINTS}/")
    return max(steps)


def _run_item(path: str, step: int | None) -> str:
    """The orbax item folder of a training run's checkpoint ``step`` (default: the newest)."""
    import orbax.checkpoint as ocp

    if step is None:
        step = latest_run_step(path)
    else:
        steps = sorted(ocp.utils.checkpoint_steps(os.path.join(os.path.abspath(path), RUN_CHECKPOINTS)))
        if step not in steps:
            raise FileNotFoundError(f"{path}: training run has no finished checkpoint of step {step} (it has {steps})")
    return os.path.join(os.path.abspath(path), RUN_CHECKPOINTS, str(step), "default")


def _load_run(path: str, config: ModelConfig, step: int | None) -> dict:
    """Parameters of a training-run checkpoint, back in the model layout when it was saved pipelined."""
    import orbax.checkpoint as ocp
    from flax import linen as nn

    from meditron_jax.model import abstract_params

    item = _run_item(path, step)
    with ocp.PyTreeCheckpointer() as ckptr, orbax.quiet_item_reads():  # host arrays, reshaped below
        tree = ckptr.restore(item)
    params = tree["params"]
    want = nn.meta.unbox(abstract_params(config))

    def fit(x, target):
        x = np.asarray(x)
        if x.shape != tuple(target.shape) and x.size == int(np.prod(target.shape)):
            x = x.reshape(target.shape)  # pipeline layout [repeats, stages, L/(r·s), ...] → [L, ...]
        if x.shape != tuple(target.shape):
            raise ValueError(f"{item}: a parameter of shape {x.shape} does not fit the run's model ({target.shape})")
        return x.astype(target.dtype)

    return jax.tree.map(fit, params, want)


def _lazy_run(path: str, config: ModelConfig, step: int | None) -> dict:
    """:func:`_load_run` 's parameters as `orbax.StoredParam` s: checked against the checkpoint's metadata
    now, read only when placed (straight into their shards, reshaped there when saved pipelined). The
    optimizer state beside them is never read."""
    import orbax.checkpoint as ocp
    from flax import linen as nn

    from meditron_jax.model import abstract_params

    item = _run_item(path, step)
    with ocp.PyTreeCheckpointer() as ckptr, orbax.quiet_item_reads():
        stored = ckptr.metadata(item).item_metadata.tree["params"]
    want = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), nn.meta.unbox(abstract_params(config)))

    def check(m, target):
        shape = tuple(m.shape)
        if shape != tuple(target.shape) and math.prod(shape) != math.prod(target.shape):
            raise ValueError(f"{item}: a parameter of shape {shape} does not fit the run's model ({target.shape})")

    jax.tree.map(check, stored, want)
    return orbax.StoredParams(item, ("params",)).lazy_tree(stored, want)


def load_model_dir(
    path: str | os.PathLike, *, step: int | None = None, lazy: bool = False, **overrides
) -> tuple[dict, ModelConfig]:
    """(host parameters, config) of a Hugging Face, meditron_jax orbax, or training-run directory.

    ``overrides`` change how the model computes (dtype, param_dtype, scan_layers, attention_impl, ...);
    ``step`` picks a training run's checkpoint (default: the newest). ``lazy``: the parameters are not read
    yet, only checked against the checkpoint's headers / metadata; `streaming.place` reads them straight
    into their device shards, so the model never sits whole on the host. A Hugging Face directory gives
    `streaming.LazyParam` s (read slice by slice), an orbax export or a training run `orbax.StoredParam` s
    (restored together by orbax into the target shardings). Indexing or ``np.asarray`` of one reads that
    parameter alone onto the host.
    """
    path = resolve_model_path(path)
    kind = model_dir_kind(path)
    config = read_model_config(path, **overrides)
    if kind == "hf":
        return (hf.lazy_hf_params if lazy else hf.load_hf_params)(path, config), config
    if kind == "orbax":
        return (orbax.lazy_orbax if lazy else orbax.load_orbax)(path, config)
    return (_lazy_run if lazy else _load_run)(path, config, step), config
