"""Checkpoints that survive a preempted pod: orbax CheckpointManager (asynchronous saves, keep policy,
preemption sync) plus each host's input-pipeline position, a fingerprint that catches silent corruption,
and a fall-back to the previous good checkpoint when the newest is damaged.

Layout under MODEL_DIR: ``checkpoints/<step>/`` (orbax), ``input_state/<step>/input_pipeline-HHHHH-of-NNNNN/``
(per host), ``damaged_checkpoints/<step>-<time>/`` (checkpoints moved aside, never deleted).
"""

from __future__ import annotations

import logging
import os
import re
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from meditron_jax import fs
from meditron_jax.convert.model_dir import RUN_CHECKPOINTS
from meditron_jax.train.step import TrainState

log = logging.getLogger(__name__)

INPUT_STATE = "input_state"
DAMAGED = "damaged_checkpoints"


class DamagedCheckpoint(RuntimeError):
    """A checkpoint that cannot be read back as it was written."""


def _as_dict(state: TrainState) -> dict:
    return {"step": state.step, "params": state.params, "opt_state": state.opt_state}


# -- fingerprint ----------------------------------------------------------------------------------------
# Orbax restores flipped bytes inside an array file without complaint (measured: zeroing 64 bytes of a
# float32 chunk restores garbage silently). So each save records, per array, a position-weighted sum of its
# bit patterns modulo 2**32: integer addition is associative, so the value does not depend on the mesh the
# array is sharded over (a checkpoint restored onto another device count checks against the same number),
# and the odd weights make any change of one element change the sum.


def _leaf_fingerprint(x):
    x = jnp.asarray(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    bits = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
    u = jax.lax.bitcast_convert_type(x, bits).astype(jnp.uint32)
    index = jnp.zeros(x.shape, jnp.uint32)
    stride = 1
    for dim in reversed(range(x.ndim)):  # flat index mod 2**32, without an int64 iota
        index = index + jax.lax.broadcasted_iota(jnp.uint32, x.shape, dim) * jnp.uint32(stride % (1 << 32))
        stride *= x.shape[dim]
    return jnp.sum(u * (index * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)


@jax.jit
def _fingerprints(tree):
    return jax.tree.map(_leaf_fingerprint, tree)


def fingerprint(tree) -> dict[str, int]:
    """``{key path: uint32 checksum}`` of every array in ``tree``."""
    values = jax.device_get(_fingerprints(tree))
    return {path_name(path): int(v) for path, v in jax.tree_util.tree_leaves_with_path(values)}


def path_name(path) -> str:
    """``opt_state/1/0/mu/params/embedding``: the same for a namedtuple and the dict orbax's metadata makes of it."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


# -- preemption -----------------------------------------------------------------------------------------


class PreemptionNotice:
    """Whether the job has been told to stop: a SIGTERM to this process (a single host, a CPU run, a GKE
    pod's termination notice) or, on a multi-host TPU, the preemption sync point that JAX's coordination
    service agrees on (``CheckpointManager.reached_preemption``; the service itself listens for SIGTERM
    there, so no Python handler is installed then)."""

    def __init__(self):
        self._flag = threading.Event()
        self._previous = None
        self._installed = False
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)
            self._installed = True

    def _on_signal(self, signum, frame):
        log.warning("SIGTERM received: saving a checkpoint at the next step boundary, then stopping")
        self._flag.set()

    def reached(self, step: int, checkpoints: Checkpoints) -> bool:
        # Every host must call reached_preemption at every step for the sync point to be agreed on.
        return checkpoints.reached_preemption(step) or self._flag.is_set()

    def close(self) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)
            self._installed = False


# -- the checkpoint manager -----------------------------------------------------------------------------


class Checkpoints:
    """Train state (orbax) + per-host input positions under ``model_dir``.

    Saves every ``every`` steps (and when forced: the last step, a preemption); keeps the newest ``keep``
    plus every step that is a multiple of ``keep_every`` (0: none), orbax's own preservation policies.
    """

    def __init__(self, model_dir: str, *, every: int, keep: int, keep_every: int = 0, async_save: bool = True):
        import orbax.checkpoint as ocp
        from orbax.checkpoint import checkpoint_managers as cm

        self._ocp = ocp
        self.model_dir = fs.absolute(model_dir)  # a gs:// MODEL_DIR stays as it is (orbax writes there)
        self.state_dir = os.path.join(self.model_dir, RUN_CHECKPOINTS)
        self.input_dir = os.path.join(self.model_dir, INPUT_STATE)
        keep_policies = [cm.LatestN(keep)]
        if keep_every:
            keep_policies.append(cm.EveryNSteps(keep_every))
        options = ocp.CheckpointManagerOptions(
            # No InitialSavePolicy (orbax's default would save step 1 of every run).
            save_decision_policy=cm.AnySavePolicy([cm.FixedIntervalPolicy(every), cm.PreemptionCheckpointingPolicy()]),
            preservation_policy=cm.AnyPreservationPolicy(keep_policies),
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,  # half-written saves of a killed run
            create=True,
        )
        # The handler is named so that item_metadata can be read before anything was saved or restored.
        self.manager = ocp.CheckpointManager(
            self.state_dir, options=options, item_handlers=ocp.StandardCheckpointHandler()
        )

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def reached_preemption(self, step: int) -> bool:
        return self.manager.reached_preemption(step)

    def input_path(self, step: int) -> str:
        from meditron_jax.data.pipeline import host_dir

        return host_dir(os.path.join(self.input_dir, str(step)), jax.process_index(), jax.process_count())

    # -- saving ---------------------------------------------------------------------------------------

    def save(self, step: int, state: TrainState, iterator, *, force: bool = False) -> bool:
        """Save if the policy says so (or ``force``); returns whether a save started.

        The input position is written synchronously *before* ``manager.save`` is called, and orbax commits
        a step (renames ``<step>.orbax-checkpoint-tmp`` to ``<step>``, or writes its commit marker) only
        at the end of the asynchronous write that this call starts. So whenever a committed state exists on
        disk, its input position was already complete: a crash at any point leaves either both or an orphan
        position without a state, which restore ignores and the next save of that step overwrites. With
        several hosts, ``manager.save`` starts with a barrier of all processes, so every host's position
        is on disk before any host's state is, let alone committed. ``iterator`` has served exactly the
        batches of steps 1..step here (the loop saves between steps).
        """
        if not force and not self.manager.should_save(step):
            return False
        if step in self.manager.all_steps():  # e.g. the last step was already saved by the interval
            return False
        iterator.save(self.input_path(step))
        meta = {"fingerprint": fingerprint(_as_dict(state)), "batches_served": int(iterator.batches_served)}
        # save() waits for the previous asynchronous save, copies the arrays to host memory and returns;
        # the file writes overlap the next training steps (the state's buffers may then be donated).
        self.manager.save(step, args=self._ocp.args.StandardSave(_as_dict(state)), custom_metadata=meta, force=True)
        self._prune_inputs()
        return True

    def _prune_inputs(self) -> None:
        """Drop input positions of steps the keep policy deleted. Positions newer than every kept step
        (orphans of a crash) are left for the save of that step to overwrite."""
        if jax.process_index() != 0 or not fs.isdir(self.input_dir):
            return
        kept = set(self.manager.all_steps())  # includes the step being written
        newest = max(kept, default=-1)
        for name in fs.listdir(self.input_dir):
            if name.isdigit() and int(name) not in kept and int(name) < newest:
                fs.rmtree(os.path.join(self.input_dir, name))

    def wait(self) -> None:
        self.manager.wait_until_finished()

    # -- restoring ------------------------------------------------------------------------------------

    def restore(self, step: int, abstract_state: TrainState) -> TrainState:
        """Checkpoint ``step`` placed in ``abstract_state``'s shardings (any mesh or device count: orbax
        reads each device's slice of the stored arrays). Raises `DamagedCheckpoint` when the files cannot
        be read or do not match their fingerprint, ValueError when they are fine but the model differs."""
        where = os.path.join(self.state_dir, str(step))
        if not fs.isdir(self.input_path(step)):
            raise DamagedCheckpoint(f"checkpoint {where} has no input-pipeline position at {self.input_path(step)}")
        target = _as_dict(abstract_state)
        try:
            stored = self.manager.item_metadata(step)
        except Exception as e:  # noqa: BLE001 - any failure to read the metadata is damage
            raise DamagedCheckpoint(f"checkpoint {where}: unreadable metadata ({type(e).__name__}: {e})") from e
        _check_same_tree(stored, target, where)
        try:
            expected = dict(self.manager.metadata(step).custom_metadata or {}).get("fingerprint")
        except Exception as e:  # noqa: BLE001
            raise DamagedCheckpoint(f"checkpoint {where}: unreadable step metadata ({type(e).__name__}: {e})") from e
        if not expected:
            raise DamagedCheckpoint(f"checkpoint {where}: no fingerprint in its step metadata (_CHECKPOINT_METADATA)")
        try:
            restored = self.manager.restore(step, args=self._ocp.args.StandardRestore(target))
        except Exception as e:  # noqa: BLE001 - tensorstore/orbax raise many types for bad files
            raise DamagedCheckpoint(f"checkpoint {where}: {type(e).__name__}: {str(e)[:500]}") from e
        got = fingerprint(restored)
        bad = sorted(k for k in expected if got.get(k) != expected[k])
        if bad or set(got) != set(expected):
            raise DamagedCheckpoint(f"checkpoint {where}: arrays differ from what was saved: {bad[:5]}")
        return TrainState(**restored)

    def restore_latest(self, abstract_state: TrainState, open_input: Callable[[str], Any]):
        """(step, state, input iterator) of the newest checkpoint that reads back intact, or None.

        A damaged checkpoint (and any newer one) is moved to ``damaged_checkpoints/`` with a warning naming
        it, and the previous one is tried; ``open_input(path)`` builds the iterator from a saved position
        (a failure there is damage too).
        """
        for step in sorted(self.all_steps(), reverse=True):
            self._check_host_count(step)
            error = None
            try:
                state = self.restore(step, abstract_state)
                try:
                    iterator = open_input(self.input_path(step))
                except Exception as e:  # noqa: BLE001
                    raise DamagedCheckpoint(
                        f"checkpoint {os.path.join(self.state_dir, str(step))}: input position "
                        f"{self.input_path(step)} does not restore ({type(e).__name__}: {e})"
                    ) from e
            except DamagedCheckpoint as e:
                error = e
            # Hosts must agree, or one would resume from another step than the rest (each reads its own
            # input position and its own array shards).
            if _all_hosts(error is None):
                return step, state, iterator
            error = error or DamagedCheckpoint(
                f"checkpoint {os.path.join(self.state_dir, str(step))}: damaged on another host"
            )
            moved = self._move_aside(step)
            log.warning("skipping damaged checkpoint: %s; moved to %s; trying the previous one", error, moved)
        return None

    def _check_host_count(self, step: int) -> None:
        """Input positions saved by another number of hosts are a configuration change, not damage: moving
        every checkpoint aside and starting again from step 0 would throw the run away."""
        where = os.path.join(self.input_dir, str(step))
        if not fs.exists(where):
            return
        counts = sorted({m.group(1) for n in fs.listdir(where) if (m := re.match(r"input_pipeline-\d+-of-(\d+)$", n))})
        here = f"{jax.process_count():05d}"
        if counts and here not in counts:
            raise ValueError(
                f"checkpoint {os.path.join(self.state_dir, str(step))} was saved by {int(counts[0])} host(s) and this "
                f"run has {jax.process_count()}: the input pipeline's positions are per host. Resume on "
                f"{int(counts[0])} host(s), or start a new MODEL_DIR with INIT_FROM={self.model_dir} "
                "(same weights, the data restarts)"
            )

    def _move_aside(self, step: int) -> str:
        stamp = time.strftime("%Y%m%dT%H%M%S")
        dest = os.path.join(self.model_dir, DAMAGED, f"{step}-{stamp}")
        if jax.process_index() == 0:
            fs.makedirs(dest)
            for src, name in (
                (os.path.join(self.state_dir, str(step)), "state"),
                (os.path.join(self.input_dir, str(step)), "input_state"),
            ):
                if fs.exists(src):
                    fs.move(src, os.path.join(dest, name))
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"meditron_jax:move_aside:{step}")
        self.manager.reload()
        return dest

    def close(self) -> None:
        self.manager.close()


def _all_hosts(ok: bool) -> bool:
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok, np.int32))))


def _check_same_tree(stored, target, where: str) -> None:
    """A model or optimizer that differs from the checkpoint's is a configuration error, not damage."""
    try:
        stored_shapes = {
            path_name(p): tuple(m.shape) for p, m in jax.tree_util.tree_leaves_with_path(stored) if hasattr(m, "shape")
        }
    except Exception as e:  # noqa: BLE001
        raise DamagedCheckpoint(f"checkpoint {where}: unreadable metadata ({type(e).__name__}: {e})") from e
    wanted = {path_name(p): tuple(np.shape(x)) for p, x in jax.tree_util.tree_leaves_with_path(target)}
    if not stored_shapes:
        raise DamagedCheckpoint(f"checkpoint {where}: metadata lists no arrays")
    missing = sorted(set(wanted) - set(stored_shapes))
    extra = sorted(set(stored_shapes) - set(wanted))
    differ = sorted(k for k in set(wanted) & set(stored_shapes) if wanted[k] != stored_shapes[k])
    if missing or extra or differ:
        detail = (
            f"missing {missing[:3]}"
            if missing
            else f"unexpected {extra[:3]}"
            if extra
            else f"{differ[0]} has shape {stored_shapes[differ[0]]}, the model wants {wanted[differ[0]]}"
        )
        raise ValueError(
            f"checkpoint {where} does not match this run's model/optimizer ({detail}); "
            "use a new MODEL_DIR or the gin configuration that wrote it"
        )
