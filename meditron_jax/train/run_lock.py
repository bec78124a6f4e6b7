"""One training run per MODEL_DIR: a lock file naming its holder (host, pid, start time).

Two live runs writing the same checkpoints would interleave steps and input positions. A lock left by a
run that died (SIGKILL, OOM) on this host is taken over with a warning; a live holder, or one on another
host (whose process cannot be checked from here), is refused with an error naming it.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import time

from meditron_jax import fs

log = logging.getLogger(__name__)

LOCK_FILE = "run.lock"


class RunLockedError(FileExistsError):  # a user error: the CLI prints its message
    pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _describe(holder: dict) -> str:
    return f"pid {holder.get('pid')} on host {holder.get('host')!r}, started {holder.get('start_time')}"


class RunLock:
    """``with RunLock(model_dir):`` — held for the duration of a run; process 0 of a multi-host run holds it."""

    def __init__(self, model_dir: str):
        # A bucket (gs://) has no exclusive create and its writer's pid cannot be checked: no lock there.
        self.remote = fs.is_url(model_dir)
        self.path = fs.join(fs.absolute(model_dir), LOCK_FILE)
        self.me = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "start_time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }
        self._held = False

    def acquire(self) -> None:
        if self.remote:
            log.warning("MODEL_DIR %s is not on a local disk: one run at a time is not enforced there", self.path)
            return
        for _ in range(5):  # a take-over can race with another starter; re-check after each attempt
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = self._read()
                if holder is None:
                    continue  # removed in between, or being written
                if holder.get("host") == self.me["host"] and not _alive(int(holder.get("pid", -1))):
                    log.warning("taking over the lock %s of a run that is gone (%s)", self.path, _describe(holder))
                    self._remove_if(holder)
                    continue
                raise RunLockedError(
                    f"MODEL_DIR {os.path.dirname(self.path)} is in use by another run ({_describe(holder)}); "
                    f"stop it or use another MODEL_DIR. If that run is gone, delete {self.path}"
                ) from None
            with os.fdopen(fd, "w") as f:
                json.dump(self.me, f)
            self._held = True
            return
        raise RunLockedError(f"could not take the lock {self.path}: other runs keep replacing it")

    def _read(self) -> dict | None:
        try:
            with open(self.path) as f:
                text = f.read()
            if not text:  # created, not yet written
                time.sleep(0.2)
                return None
            return json.loads(text)
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, OSError) as e:
            raise RunLockedError(
                f"lock file {self.path} is unreadable ({e}); if no run uses this MODEL_DIR, delete it"
            ) from e

    def _remove_if(self, holder: dict) -> None:
        if self._read() == holder:
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass

    def release(self) -> None:
        if self._held:
            self._remove_if(self.me)
            self._held = False

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
