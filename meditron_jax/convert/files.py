"""Writing model directories: atomically, with the tokenizer files alongside."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)


@contextlib.contextmanager
def atomic_directory(out_dir: str):
    """Yield a temporary sibling folder; on success it replaces ``out_dir``, on failure it is removed,
    so readers never see a half-written model directory."""
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-model-", dir=parent)
    try:
        yield tmp
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def copy_tokenizer_files(src_dir: str | None, dst_dir: str) -> None:
    if not src_dir:
        return
    for fname in TOKENIZER_FILES:
        src = os.path.join(src_dir, fname)
        if os.path.isfile(src):
            shutil.copy(src, os.path.join(dst_dir, fname))
