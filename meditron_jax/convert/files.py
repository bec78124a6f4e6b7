"""Writing output directories safely: atomically, never over a user's files, never into an input.

Every writer of the project (HF export, orbax export, the curation pipeline) goes through
:func:`atomic_directory`. Before any work it checks the target (:func:`check_output_dir`):

* the target may not be, contain or lie inside one of the writer's inputs (``--input X --output X``);
* it may not be a file, a symbolic link, the current folder or one holding it, the home folder or ``/``;
* a non-empty folder is replaced only when it is a previous output of the same kind (our marker file
  :data:`MARKER`, or only names that this writer produces) or when ``overwrite`` is given.

The output is written into a hidden sibling temporary folder and renamed into place at the end, so a
reader never sees half an output. A writer that was killed leaves that folder behind; the next write into
the same parent folder removes it (it records the owning process, so a live writer's folder is kept).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence

log = logging.getLogger(__name__)

TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)
MARKER = ".meditron_jax_output.json"
_OWNER = ".meditron_jax_writer.json"
_TMP_PREFIX = ".tmp-model-"  # the name older versions used too, so their leftovers are found
_OLD_PREFIX = ".old-model-"
# A temporary folder without an owner record (older versions wrote none) is stale after this long.
_UNOWNED_STALE_SECONDS = 600


class OutputError(ValueError):
    """The output target cannot be written without destroying something; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class OutputKind:
    """What a writer produces: a name recorded in the marker, and how to recognise an unmarked older output
    (``recognise(folder, names)``: only names that writer produces, and whatever else sets it apart)."""

    name: str
    description: str
    recognise: Callable[[str, set[str]], bool]


def _resolved(path: str) -> str:
    return os.path.realpath(os.path.abspath(os.path.expanduser(path)))


def _inside(child: str, parent: str) -> bool:
    return child != parent and os.path.commonpath([child, parent]) == parent


def read_marker(path: str) -> dict | None:
    """The marker a writer left in ``path`` (None when there is none or it is unreadable)."""
    try:
        with open(os.path.join(path, MARKER)) as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def check_output_dir(out_dir: str, kind: OutputKind, *, inputs: Iterable[str] = (), overwrite: bool = False) -> None:
    """Raise :class:`OutputError` when writing ``kind`` to ``out_dir`` could destroy a user's files."""
    if not out_dir:
        raise OutputError("the output folder is empty ('')")
    target = _resolved(out_dir)
    for inp in inputs:
        if not inp:
            continue
        src = _resolved(inp)
        if target == src:
            raise OutputError(f"output {out_dir} is the input {inp}; write the {kind.description} to another folder")
        if _inside(target, src):
            raise OutputError(f"output {out_dir} lies inside the input {inp}; write the {kind.description} elsewhere")
        if _inside(src, target):
            raise OutputError(f"output {out_dir} holds the input {inp}; replacing it would delete the input")
    try:
        cwd = _resolved(os.getcwd())
    except FileNotFoundError:  # the current folder was deleted: nothing of it to protect
        cwd = None
    home = _resolved("~")
    if cwd is not None and (target == cwd or _inside(cwd, target)):
        raise OutputError(
            f"output {out_dir} is the current folder or holds it; name a new folder (e.g. {out_dir.rstrip('/')}/out)"
        )
    if target in (home, os.path.sep) or _inside(home, target):
        raise OutputError(f"output {out_dir} is the home folder, the root, or holds the home folder; refusing")
    if os.path.islink(os.path.abspath(out_dir)):
        raise OutputError(f"output {out_dir} is a symbolic link; name the real folder")
    if os.path.lexists(target) and not os.path.isdir(target):
        raise OutputError(f"output {out_dir} is a file, not a folder; name a folder")
    if os.path.isdir(target):
        names = set(os.listdir(target))
        if names and not overwrite:
            marker = read_marker(target)
            if marker is not None and marker.get("kind") != kind.name:
                raise OutputError(
                    f"output {out_dir} holds a meditron_jax {marker.get('kind')!r} output, not a {kind.description}; "
                    "pass --overwrite to replace it"
                )
            if marker is None and not kind.recognise(target, names - {MARKER}):
                shown = ", ".join(sorted(names)[:5]) + (" …" if len(names) > 5 else "")
                raise OutputError(
                    f"output {out_dir} is not empty ({len(names)} entries: {shown}) and is not a previous "
                    f"{kind.description}; pass --overwrite to replace all of it, or name a new folder"
                )
    parent = os.path.dirname(target)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise OutputError(f"output {out_dir}: {parent} is a file, so the folder cannot be created")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"output {out_dir}: no permission to write in {parent}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_stale(folder: str) -> tuple[bool, str]:
    try:
        with open(os.path.join(folder, _OWNER)) as f:
            owner = json.load(f)
    except (OSError, ValueError):
        age = time.time() - os.path.getmtime(folder)
        return age > _UNOWNED_STALE_SECONDS, f"no owner record, {age / 60:.0f} min old"
    if owner.get("host") != socket.gethostname():
        return False, f"written from host {owner.get('host')}"
    pid = int(owner.get("pid", -1))
    return not _pid_alive(pid), f"process {pid} is gone"


def clean_stale_temporaries(parent: str) -> list[str]:
    """Remove temporary folders that killed writers left in ``parent``; returns what was removed.

    A previous output that was moved aside (``.old-model-*``) and whose place is still empty is put back."""
    removed: list[str] = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    for name in sorted(names):
        if not (name.startswith(_TMP_PREFIX) or name.startswith(_OLD_PREFIX)):
            continue
        folder = os.path.join(parent, name)
        if not os.path.isdir(folder) or os.path.islink(folder):
            continue
        stale, why = _is_stale(folder)
        if not stale:
            continue
        if name.startswith(_OLD_PREFIX):
            with contextlib.suppress(OSError, ValueError):
                with open(os.path.join(folder, _OWNER)) as f:
                    target = json.load(f).get("target")
                if target and not os.path.lexists(target):
                    os.remove(os.path.join(folder, _OWNER))
                    os.replace(folder, target)
                    log.warning("restored %s, moved aside by an interrupted write (%s)", target, why)
                    continue
        shutil.rmtree(folder, ignore_errors=True)
        log.warning("removed %s, left by an interrupted write (%s)", folder, why)
        removed.append(folder)
    return removed


def _write_owner(folder: str, target: str) -> None:
    with open(os.path.join(folder, _OWNER), "w") as f:
        json.dump({"pid": os.getpid(), "host": socket.gethostname(), "target": target}, f)


@contextlib.contextmanager
def atomic_directory(
    out_dir: str,
    kind: OutputKind,
    *,
    inputs: Sequence[str] = (),
    overwrite: bool = False,
    record: dict | None = None,
):
    """Yield a temporary sibling folder; on success it replaces ``out_dir``, on failure it is removed, so
    readers never see a half-written output. ``record`` is added to the marker file (e.g. the inputs)."""
    check_output_dir(out_dir, kind, inputs=inputs, overwrite=overwrite)
    target = _resolved(out_dir)
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    clean_stale_temporaries(parent)
    tmp = tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would hide the output from the user's group
    old = None
    try:
        _write_owner(tmp, target)
        yield tmp
        os.remove(os.path.join(tmp, _OWNER))
        marker = {
            "kind": kind.name,
            "writer": "meditron_jax",
            "written": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "inputs": list(dict.fromkeys(os.path.abspath(i) for i in inputs if i)),
            **(record or {}),
        }
        with open(os.path.join(tmp, MARKER), "w") as f:
            json.dump(marker, f, indent=2)
        # The target may have changed during a long write (someone copied files in): check again.
        check_output_dir(out_dir, kind, inputs=inputs, overwrite=overwrite)
        if os.path.isdir(target):
            old = tempfile.mkdtemp(prefix=_OLD_PREFIX, dir=parent)
            os.replace(target, old)  # onto the empty folder just made
            _write_owner(old, target)
        try:
            os.replace(tmp, target)
        except BaseException:
            if old is not None:
                os.remove(os.path.join(old, _OWNER))
                os.replace(old, target)
                old = None
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def copy_tokenizer_files(src_dir: str | None, dst_dir: str) -> list[str]:
    """Copy the tokenizer files present in ``src_dir``; returns their names."""
    copied: list[str] = []
    if not src_dir:
        return copied
    for fname in TOKENIZER_FILES:
        src = os.path.join(src_dir, fname)
        if os.path.isfile(src):
            shutil.copy(src, os.path.join(dst_dir, fname))
            copied.append(fname)
    return copied
