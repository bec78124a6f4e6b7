"""Paths that may be URLs: ``gs://bucket/run`` goes through TensorFlow's file system layer (``tf.io.gfile``, which
also reads ``s3://``, ``hdfs://`` and ``ram://``); a local path keeps Python's own calls, unchanged.

Why: ``os.path.abspath("gs://b/run")`` is ``<cwd>/gs:/b/run`` and ``open()``/``os.makedirs`` on it write to a
local folder named ``gs:`` instead of the bucket. Code that writes under a directory a user may give as a URL
(MODEL_DIR, the curated data) uses these functions, and never `pathlib.Path`/`os.path.abspath` on it.
"""

from __future__ import annotations

import glob as globlib
import os
import posixpath
import re
import shutil
from typing import Any

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(path: str | os.PathLike) -> bool:
    """``gs://...``, ``s3://...``, ``ram://...``: a path for tf.io.gfile, not for the local file system."""
    return bool(_SCHEME.match(os.fspath(path)))


def _gfile() -> Any:
    import tensorflow as tf  # only when a URL is used

    return tf.io.gfile


def absolute(path: str | os.PathLike) -> str:
    """A local path made absolute; a URL unchanged."""
    path = os.fspath(path)
    return path if is_url(path) else os.path.abspath(path)


def join(path: str | os.PathLike, *parts: str) -> str:
    path = os.fspath(path)
    return posixpath.join(path, *parts) if is_url(path) else os.path.join(path, *parts)


def makedirs(path: str | os.PathLike) -> None:
    if is_url(path):
        _gfile().makedirs(os.fspath(path))
    else:
        os.makedirs(path, exist_ok=True)


def exists(path: str | os.PathLike) -> bool:
    return _gfile().exists(os.fspath(path)) if is_url(path) else os.path.exists(path)


def isdir(path: str | os.PathLike) -> bool:
    return _gfile().isdir(os.fspath(path)) if is_url(path) else os.path.isdir(path)


def listdir(path: str | os.PathLike) -> list[str]:
    """Entry names (gfile lists sub-folders of a bucket with a trailing '/', dropped here)."""
    if is_url(path):
        return [name.rstrip("/") for name in _gfile().listdir(os.fspath(path))]
    return os.listdir(path)


def rmtree(path: str | os.PathLike) -> None:
    """Remove a folder and its contents; a missing folder is not an error."""
    if is_url(path):
        if _gfile().exists(os.fspath(path)):
            _gfile().rmtree(os.fspath(path))
    else:
        shutil.rmtree(path, ignore_errors=True)


def move(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    if is_url(src) or is_url(dst):
        _gfile().rename(os.fspath(src), os.fspath(dst), overwrite=False)
    else:
        shutil.move(src, dst)


def copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    if is_url(src) or is_url(dst):
        _gfile().copy(os.fspath(src), os.fspath(dst), overwrite=True)
    else:
        shutil.copyfile(src, dst)


def glob(pattern: str) -> list[str]:
    """Paths matching a shell pattern (``*``, ``?``, ``[...]``), sorted."""
    if is_url(pattern):
        return sorted(_gfile().glob(pattern))
    return sorted(globlib.glob(pattern))


def size(path: str | os.PathLike) -> int:
    return int(_gfile().stat(os.fspath(path)).length) if is_url(path) else os.path.getsize(path)


def open_file(path: str | os.PathLike, mode: str = "r"):
    """A text or binary file object: ``open`` locally, ``tf.io.gfile.GFile`` for a URL (append on a bucket
    rewrites the object, so it suits small files such as metrics.jsonl)."""
    if is_url(path):
        return _gfile().GFile(os.fspath(path), mode)
    return open(path, mode, encoding=None if "b" in mode else "utf-8")


def write_text(path: str | os.PathLike, text: str) -> None:
    with open_file(path, "w") as f:
        f.write(text)


def read_text(path: str | os.PathLike) -> str:
    with open_file(path, "r") as f:
        return f.read()
