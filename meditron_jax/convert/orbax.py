"""meditron_jax's own model format: an orbax parameter checkpoint plus its ModelConfig and tokenizer files.

Layout: ``<dir>/meditron_config.json``, ``<dir>/params/`` (orbax), tokenizer files beside them.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from meditron_jax.config import ModelConfig
from meditron_jax.convert import streaming
from meditron_jax.convert.files import TOKENIZER_FILES, OutputKind, atomic_directory, copy_tokenizer_files

CONFIG_FILE = "meditron_config.json"


def is_orbax_model(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG_FILE))


def _looks_like_orbax_export(folder: str, names: set[str]) -> bool:
    """Only what :func:`save_orbax` writes (an output of an older version, before the marker file)."""
    return CONFIG_FILE in names and names <= {CONFIG_FILE, "params", *TOKENIZER_FILES}


ORBAX_OUTPUT = OutputKind("orbax_model", "meditron_jax orbax model folder", _looks_like_orbax_export)


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


@contextlib.contextmanager
def _absl_dropping(prefix: str):
    """orbax's log lines (absl's logger) that start with ``prefix`` are dropped inside the block."""
    absl_logger, drop = logging.getLogger("absl"), _DropMessage(prefix)
    absl_logger.addFilter(drop)
    try:
        yield
    finally:
        absl_logger.removeFilter(drop)


@contextlib.contextmanager
def quiet_item_reads():
    """Around direct reads of a checkpoint item (a run's ``<step>/default``, an export's ``params``), drop two
    orbax notices printed on every read that do not apply: "Metadata file does not exist" (a run's step
    metadata is one level up, where the trainer wrote it) and the advice to pass shardings (these readers
    read to host arrays, or give each array its target sharding)."""
    with _absl_dropping("Metadata file does not exist"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sharding info not provided when restoring")
        yield


def save_orbax(
    params,
    config: ModelConfig,
    out_dir: str,
    *,
    tokenizer_dir: str | None = None,
    inputs: Sequence[str] = (),
    overwrite: bool = False,
    record: dict | None = None,
    transfer_bytes: int = 256 << 20,
) -> None:
    """Write atomically (a temporary sibling folder renamed at the end); ``out_dir`` must be new, empty or a
    previous orbax export (else ``overwrite``), and none of ``inputs``. Device arrays are copied to the host
    in batches of about ``transfer_bytes`` (at least the largest array), each written before the next."""
    import orbax.checkpoint as ocp

    inputs = [*inputs, *([tokenizer_dir] if tokenizer_dir else [])]
    with atomic_directory(out_dir, ORBAX_OUTPUT, inputs=inputs, overwrite=overwrite, record=record) as tmp:
        handler = _save_handler(params, transfer_bytes)
        if handler is None:
            with ocp.StandardCheckpointer() as ckptr:
                ckptr.save(os.path.join(tmp, "params"), params)
        else:
            # orbax notes that no array was prioritized: InBatches deprioritizes them all, on purpose
            with _absl_dropping("No prioritized params found for saving"), ocp.Checkpointer(handler) as ckptr:
                ckptr.save(os.path.join(tmp, "params"), args=ocp.args.PyTreeSave(params))
        config.to_json(os.path.join(tmp, CONFIG_FILE))
        copy_tokenizer_files(tokenizer_dir, tmp)


def _save_handler(params, transfer_bytes: int):
    """For device arrays: an orbax handler that copies them to the host a batch at a time, each batch written
    before the next is copied (batches of ``transfer_bytes``, or the largest array). orbax's default copies
    every array to the host before writing any: a second copy of the model in host memory.
    None (orbax's default handler) for host arrays, or if this orbax lacks the (internal) hooks used."""
    import orbax.checkpoint as ocp

    arrays = [x for x in jax.tree.leaves(params) if isinstance(x, jax.Array)]
    if not arrays:
        return None
    try:
        from orbax.checkpoint._src.metadata import array_metadata_store
        from orbax.checkpoint._src.serialization import types as serialization_types

        class InBatches(serialization_types.DefaultSerializationStatusCallback):
            def key_priority(self, _):
                return serialization_types.TransferPriority.ASYNCHRONOUS_DEPRIORITIZED

        array_handler = ocp.type_handlers.ArrayHandler(
            array_metadata_store=array_metadata_store.Store(), callback=InBatches()
        )
    except (ImportError, AttributeError, TypeError):  # another orbax version: its default, unbounded
        return None
    registry = ocp.type_handlers.create_type_handler_registry(
        (int, ocp.type_handlers.ScalarHandler()),
        (float, ocp.type_handlers.ScalarHandler()),
        (np.number, ocp.type_handlers.ScalarHandler()),
        (np.ndarray, ocp.type_handlers.NumpyHandler()),
        (jax.Array, array_handler),
    )
    local = max(sum(s.data.nbytes for s in x.addressable_shards) for x in arrays)
    budget = max(local + 1, transfer_bytes)
    return ocp.PyTreeCheckpointHandler(save_device_host_concurrent_gb=budget / 1e9, type_handler_registry=registry)


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


def lazy_orbax(path: str, config: ModelConfig | None = None):
    """(params, config) like :func:`load_orbax`, but each parameter a :class:`StoredParam`: checked against
    the checkpoint's metadata now, read only when placed (`streaming.place`), straight into its shards."""
    import orbax.checkpoint as ocp
    from flax import linen as nn

    from meditron_jax.model import abstract_params

    if not is_orbax_model(path):
        raise FileNotFoundError(f"{path}: no {CONFIG_FILE}; not a meditron_jax orbax model directory")
    config = config or ModelConfig.from_json(os.path.join(path, CONFIG_FILE))
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), nn.meta.unbox(abstract_params(config)))
    params_dir = os.path.join(os.path.abspath(path), "params")
    with ocp.StandardCheckpointer() as ckptr:
        stored = ckptr.metadata(params_dir).item_metadata.tree
    _check_matches(path, stored, target)
    return StoredParams(params_dir).lazy_tree(stored, target), config


class StoredParam(streaming.GroupedParam):
    """One parameter of an orbax checkpoint, not read yet. ``shape`` / ``dtype``: the model's; the checkpoint
    may hold it in another dtype, or (a pipelined training run) as ``[repeats, stages, L/(r·s), ...]``."""

    def __init__(self, group: StoredParams, key: tuple[str, ...], shape, dtype, stored):
        self.group, self.key = group, key
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self.stored_shape, self.stored_dtype = tuple(stored.shape), np.dtype(stored.dtype)
        chunk = getattr(getattr(stored, "storage", None), "chunk_shape", None)
        self.chunk_shape = tuple(chunk) if chunk else self.stored_shape

    def read_bytes(self, index) -> int:
        """What orbax reserves to read ``index`` of the stored array: whole chunks, in the stored dtype
        (its serialization.estimate_read_memory_footprint)."""
        n = self.stored_dtype.itemsize
        for size, chunk, s in zip(self.stored_shape, self.chunk_shape, index, strict=True):
            start, stop, _ = s.indices(size)
            chunk = max(int(chunk), 1)
            n *= -(-stop // chunk) * chunk - start // chunk * chunk
        return n

    def __getitem__(self, index: Any) -> np.ndarray:
        return self.group.read(self)[index]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self.group.read(self)
        return out if dtype is None else out.astype(dtype)

    def __repr__(self) -> str:
        return f"StoredParam({'/'.join(self.key)}, {self.shape}, {self.dtype})"


def _set(tree: dict, key: tuple[str, ...], value) -> None:
    for k in key[:-1]:
        tree = tree.setdefault(k, {})
    tree[key[-1]] = value


def _get(tree, key: tuple[str, ...]):
    for k in key:
        tree = tree[k]
    return tree


def _names(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def _stored_sharding(sharding: jax.sharding.Sharding, stored_shape, shape):
    """A sharding of the stored layout whose shards reshape to ``sharding`` 's on each device without moving
    data between devices (None: no such sharding is known; the parameter is then read on the host).

    Pipelined ``[r, s, m, ...]`` → ``[r·s·m, ...]``: the trailing axes keep their partitioning; a
    partitioned layer axis goes to the first of ``r, s, m`` longer than 1 when it divides it (its blocks are
    then contiguous runs of layers), else it is dropped (each device reads all layers of its other slices)."""
    stored_shape, shape = tuple(stored_shape), tuple(shape)
    if stored_shape == shape or isinstance(sharding, jax.sharding.SingleDeviceSharding):
        return sharding
    lead = len(stored_shape) - len(shape) + 1  # stored axes that make up the target's first
    if not isinstance(sharding, jax.sharding.NamedSharding) or lead < 1 or stored_shape[lead:] != shape[1:]:
        return None
    spec = tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))
    layer, rest = spec[0], spec[1:]
    new: list[Any] = [None] * lead
    if layer is not None:
        axes = (layer,) if isinstance(layer, str) else tuple(layer)
        parts = math.prod(sharding.mesh.shape[a] for a in axes)
        j = next((i for i in range(lead) if stored_shape[i] > 1), lead - 1)
        if stored_shape[j] % parts == 0:
            new[j] = layer
    spec_out = jax.sharding.PartitionSpec(*new, *rest)
    return jax.sharding.NamedSharding(sharding.mesh, spec_out, memory_kind=sharding.memory_kind)


@functools.lru_cache(maxsize=256)
def _reshaper(shape: tuple[int, ...], sharding: jax.sharding.Sharding):
    return jax.jit(lambda x: x.reshape(shape), out_shardings=sharding)


class StoredParams:
    """The parameters of one orbax checkpoint (``directory``, under ``prefix`` in its tree): restored
    together, each straight into its target sharding, so each process reads only its devices' slices.

    orbax reads each distinct shard once into a host buffer (cast there to the model's dtype, shard by shard,
    as the host restore casts) and copies it to its devices; in-flight reads are limited to
    ``max_inflight_bytes`` (default: the largest single read), so the host holds about one device shard at
    a time, never the model. A pipelined parameter is restored in its stored layout, in a sharding whose
    shards are the target's (`_stored_sharding`), then reshaped on the devices."""

    def __init__(self, directory: str, prefix: tuple[str, ...] = (), *, max_inflight_bytes: int | None = None):
        self.directory, self.prefix, self.max_inflight_bytes = directory, tuple(prefix), max_inflight_bytes

    def lazy_tree(self, stored, target):
        """``target`` (a tree of ShapeDtypeStruct, the model's) with StoredParam leaves over ``stored`` (the
        checkpoint's metadata tree under ``prefix``; shapes already checked)."""

        def leaf(path, t):
            key = _names(path)
            return StoredParam(self, key, t.shape, t.dtype, _get(stored, key))

        return jax.tree_util.tree_map_with_path(leaf, target)

    def _restore(self, target, restore_args, max_read: int):
        import orbax.checkpoint as ocp

        limit = max(self.max_inflight_bytes or 0, max_read) + 1  # orbax refuses a read >= its limit
        handler = ocp.PyTreeCheckpointHandler(restore_concurrent_gb=limit / 1e9)
        with ocp.Checkpointer(handler) as ckptr, quiet_item_reads():
            args = ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True)
            return ckptr.restore(self.directory, args=args)

    def place(self, params: list[StoredParam], shardings: list) -> list[jax.Array]:
        import orbax.checkpoint as ocp

        target: dict = {}
        plan: list[tuple[StoredParam, Any, Any]] = []
        max_read = 0
        for p, sharding in zip(params, shardings, strict=True):
            stored_sharding = _stored_sharding(sharding, p.stored_shape, p.shape)
            plan.append((p, sharding, stored_sharding))
            if stored_sharding is None:
                continue
            _set(target, self.prefix + p.key, jax.ShapeDtypeStruct(p.stored_shape, p.dtype, sharding=stored_sharding))
            indices = {
                tuple((s.start, s.stop) for s in streaming.normalize(i, p.stored_shape))
                for i in stored_sharding.addressable_devices_indices_map(p.stored_shape).values()
            }
            for i in indices:
                index = tuple(slice(a, b) for a, b in i)
                max_read = max(max_read, p.read_bytes(index))
        restored = {}
        if target:
            restored = self._restore(target, ocp.checkpoint_utils.construct_restore_args(target), max_read)
        out = []
        for p, sharding, stored_sharding in plan:
            if stored_sharding is None:
                out.append(streaming.place_leaf(self.read(p), sharding, p.nbytes))
                continue
            array = _get(restored, self.prefix + p.key)
            if array.shape != p.shape:
                array = _reshaper(p.shape, sharding)(array)
            out.append(array)
        return out

    def read(self, p: StoredParam) -> np.ndarray:
        """One parameter onto the host, in the model's layout and dtype."""
        import orbax.checkpoint as ocp

        target: dict = {}
        _set(target, self.prefix + p.key, jax.ShapeDtypeStruct(p.stored_shape, p.dtype))
        args: dict = {}
        _set(args, self.prefix + p.key, ocp.RestoreArgs(restore_type=np.ndarray, dtype=p.dtype))
        read = p.read_bytes(tuple(slice(None) for _ in p.stored_shape))
        x = np.asarray(_get(self._restore(target, args, read), self.prefix + p.key))
        return x.reshape(p.shape)


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
