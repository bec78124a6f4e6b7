"""Helpers of the reliability tests: a folder's exact content, to prove that nothing a user had was lost."""

import hashlib
import os
import pathlib


def snapshot(folder) -> dict[str, str]:
    """{relative path: sha256 of a file, or 'dir'} of everything under ``folder`` (hidden entries included)."""
    root = pathlib.Path(folder)
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[str(pathlib.Path(dirpath, d).relative_to(root))] = "dir"
        for f in filenames:
            p = pathlib.Path(dirpath, f)
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def user_folder(path, files=None) -> dict[str, str]:
    """Make a folder of a user's unrelated files; returns its snapshot."""
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for name, text in (files or {"notes.txt": "my notes\n", "data/results.csv": "a,b\n1,2\n"}).items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(text)
    return snapshot(path)
