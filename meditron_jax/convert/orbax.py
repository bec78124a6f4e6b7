"""meditron_jax's own model format: an orbax parameter checkpoint plus its ModelConfig and tokenizer files.

Layout: ``<dir>/meditron_config.json``, ``<dir>/params/`` (orbax), tokenizer files beside them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax

from meditron_jax.config import ModelConfig
from meditron_jax.convert.files import TOKENIZER_FILES, OutputKind, atomic_directory, copy_tokenizer_files

CONFIG_FILE = "meditron_config.json"


def is_orbax_model(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG_FILE))


def _looks_like_orbax_export(folder: str, names: set[str]) -> bool:
    """Only what :func:`save_orbax` writes (an output of an older version, before the marker file)."""
    return CONFIG_FILE in names and names <= {CONFIG_FILE, "params", *TOKENIZER_FILES}


ORBAX_OUTPUT = OutputKind("orbax_model", "meditron_jax orbax model folder", _looks_like_orbax_export)


def save_orbax(
    params,
    config: ModelConfig,
    out_dir: str,
    *,
    tokenizer_dir: str | None = None,
    inputs: Sequence[str] = (),
    overwrite: bool = False,
    record: dict | None = None,
) -> None:
    """Write atomically (a temporary sibling folder renamed at the end); ``out_dir`` must be new, empty or a
    previous orbax export (else ``overwrite``), and none of ``inputs``."""
    import orbax.checkpoint as ocp

    inputs = [*inputs, *([tokenizer_dir] if tokenizer_dir else [])]
    with atomic_directory(out_dir, ORBAX_OUTPUT, inputs=inputs, overwrite=overwrite, record=record) as tmp:
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(os.path.join(tmp, "params"), params)
        config.to_json(os.path.join(tmp, CONFIG_FILE))
        copy_tokenizer_files(tokenizer_dir, tmp)


def load_orbax(path: str, config: ModelConfig | None = None):
    """(params, config). The stored config is used unless one is given (e.g. with another dtype)."""
    import orbax.checkpoint as ocp
    from flax import linen as nn

    from meditron_jax.model import abstract_params

    if not is_orbax_model(path):
        raise FileNotFoundError(f"{path}: no {CONFIG_FILE}; not a meditron_jax orbax model directory")
    stored = ModelConfig.from_json(os.path.join(path, CONFIG_FILE))
    config = config or stored
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), nn.meta.unbox(abstract_params(config)))
    params_dir = os.path.join(os.path.abspath(path), "params")
    with ocp.StandardCheckpointer() as ckptr:
        _check_matches(path, ckptr.metadata(params_dir).item_metadata.tree, target)
        params = ckptr.restore(params_dir, target)
    return params, config


def _check_matches(path: str, stored, target) -> None:
    """Name the first parameter whose presence or shape differs, before orbax tries to read it."""
    flat_stored = dict(jax.tree_util.tree_flatten_with_path(stored)[0])
    flat_target = dict(jax.tree_util.tree_flatten_with_path(target)[0])
    names = lambda tree: {jax.tree_util.keystr(k): v for k, v in tree.items()}
    have, want = names(flat_stored), names(flat_target)
    for key in sorted(set(have) | set(want)):
        if key not in have:
            raise ValueError(f"{path}: checkpoint does not match the model config: parameter {key} is missing")
        if key not in want:
            raise ValueError(f"{path}: checkpoint does not match the model config: unexpected parameter {key}")
        if tuple(have[key].shape) != tuple(want[key].shape):
            raise ValueError(
                f"{path}: checkpoint does not match the model config: parameter {key} has shape "
                f"{tuple(have[key].shape)}, the config needs {tuple(want[key].shape)}"
            )
