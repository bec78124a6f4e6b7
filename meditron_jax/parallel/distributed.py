"""Multi-host start-up and per-host input: every process feeds only its own rows of the global batch.

`initialize` must run before anything touches a JAX backend (``jax.devices()``, the first array):

* Cloud TPU pod slices (and multi-slice): no arguments needed; JAX discovers the workers from the TPU VM
  metadata (the ``GceTpuCluster`` / ``GkeTpuCluster`` environments).
* Multi-process CPU or GPU: a coordinator ``host:port``, the process count and this process's id, from
  arguments, gin (``DistributedConfig.*``) or the environment (``JAX_COORDINATOR_ADDRESS``,
  ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``); SLURM and Open MPI jobs are auto-detected by JAX.
* One process: nothing to do.

Input: `process_rows` says which rows of a ``[global_batch, length]`` array this process's devices hold under
the batch sharding; the data loader reads only those, and `global_batch` assembles the global `jax.Array`
from them with `jax.make_array_from_process_local_data` (no host ever materialises the whole batch).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping

import gin
import jax
import numpy as np
from jax.sharding import NamedSharding

log = logging.getLogger(__name__)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    coordinator_address: str | None = None  # "host:port" of process 0; None: environment / auto-detect
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None  # GPU: which local devices this process drives
    initialization_timeout: int = 300
    # CPU multi-process needs a cross-process collectives backend (gloo ships with jaxlib).
    cpu_collectives: str = "gloo"


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None


def _on_multihost_tpu() -> bool:
    """A TPU VM that is one of several workers (pod slice or multi-slice)."""
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return "," in hosts or bool(os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"))


def initialize(config: DistributedConfig | None = None) -> bool:
    """Start the JAX distributed runtime when this is one of several processes; returns whether it did.

    Idempotent. Raises with the missing setting named when a multi-process CPU/GPU run is half-configured.
    """
    config = DistributedConfig() if config is None else config
    if jax.distributed.is_initialized():
        return True
    address = config.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    num = config.num_processes if config.num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    pid = config.process_id if config.process_id is not None else _env_int("JAX_PROCESS_ID")
    explicit = address is not None or num is not None or pid is not None
    if explicit:
        missing = [
            n
            for n, v in (
                ("coordinator_address / JAX_COORDINATOR_ADDRESS", address),
                ("num_processes / JAX_NUM_PROCESSES", num),
                ("process_id / JAX_PROCESS_ID", pid),
            )
            if v is None
        ]
        if missing:
            raise ValueError(f"multi-process start-up is missing {missing} (DistributedConfig or environment)")
        if num == 1:
            return False
        if "cpu" in os.environ.get("JAX_PLATFORMS", "") and config.cpu_collectives:
            jax.config.update("jax_cpu_collectives_implementation", config.cpu_collectives)
        jax.distributed.initialize(
            coordinator_address=address,
            num_processes=num,
            process_id=pid,
            local_device_ids=config.local_device_ids,
            initialization_timeout=config.initialization_timeout,
        )
    elif _on_multihost_tpu() or (_env_int("SLURM_NTASKS") or 1) > 1 or (_env_int("OMPI_COMM_WORLD_SIZE") or 1) > 1:
        jax.distributed.initialize(initialization_timeout=config.initialization_timeout)
    else:
        return False
    log.info(
        "JAX distributed: process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True


def process_rows(sharding: NamedSharding, global_shape: tuple[int, ...]) -> slice:
    """The contiguous rows (dimension 0) of a global array that this process's devices hold.

    Several processes may share rows (when the batch is not split over a mesh axis that spans hosts); each
    then loads the same rows. Non-contiguous ownership (an unusual device order) is an error.
    """
    index_map = sharding.addressable_devices_indices_map(tuple(global_shape))
    starts, stops = [], []
    for idx in index_map.values():
        rows = idx[0] if idx else slice(None)
        start, stop, _ = rows.indices(global_shape[0])
        starts.append(start)
        stops.append(stop)
    lo, hi = min(starts), max(stops)
    covered = np.zeros(hi - lo, bool)
    for a, b in zip(starts, stops, strict=True):
        covered[a - lo : b - lo] = True
    if not covered.all():
        raise ValueError(
            f"process {jax.process_index()} holds non-contiguous batch rows {sorted(zip(starts, stops, strict=True))}"
        )
    return slice(lo, hi)


def global_batch(local: Mapping[str, np.ndarray], sharding: NamedSharding, global_batch_size: int) -> dict:
    """Global `jax.Array`s from this process's rows (``local[k]`` is ``[rows of process_rows, ...]``)."""
    out = {}
    for k, v in local.items():
        v = np.asarray(v)
        shape = (global_batch_size,) + v.shape[1:]
        rows = process_rows(sharding, shape)
        if v.shape[0] != rows.stop - rows.start:
            raise ValueError(
                f"batch key {k!r}: this process must supply rows {rows.start}:{rows.stop} "
                f"({rows.stop - rows.start} rows) of the global batch {global_batch_size}, "
                f"got {v.shape[0]}"
            )
        out[k] = jax.make_array_from_process_local_data(sharding, v, shape)
    return out
