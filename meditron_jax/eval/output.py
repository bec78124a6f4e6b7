"""The evaluation output folder: refuse to clobber user files, resume a previous run of the same config.

Layout: ``eval_config.json`` (the settings; also marks the folder as ours), ``predictions_{benchmark}.jsonl``
(one row per item, appended as items finish; ``...host{i}of{n}.jsonl`` per host on several hosts, with
a ``.done`` file once a host's share is complete), ``results.json`` and ``results.md``.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
from collections.abc import Iterable, Mapping

CONFIG_FILE = "eval_config.json"
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
_OURS_PREFIXES = ("predictions_",)
_OURS_FILES = (CONFIG_FILE, RESULTS_JSON, RESULTS_MD)


class OutputError(ValueError):
    pass


def _inside(child: pathlib.Path, parent: pathlib.Path) -> bool:
    return child == parent or parent in child.parents


def _our_files(out: pathlib.Path) -> list[pathlib.Path]:
    return [p for p in out.iterdir() if p.name in _OURS_FILES or p.name.startswith(_OURS_PREFIXES)]


def prepare(
    out_dir: str | os.PathLike,
    config: Mapping,
    *,
    checkpoint: str | os.PathLike | None,
    overwrite: bool = False,
    process_index: int = 0,
) -> pathlib.Path:
    """Create or reopen ``out_dir`` for ``config``; returns it. Errors name the folder and the way out.

    * a folder inside (or equal to) the checkpoint is refused, even with ``overwrite``;
    * a non-empty folder without our ``eval_config.json`` is refused unless ``overwrite`` (then only our
      file names are written; nothing else there is touched);
    * our folder with the same config resumes; a different config is an error unless ``overwrite``,
      which deletes our previous files (only those) and starts again.
    """
    out = pathlib.Path(out_dir).expanduser().resolve()
    if checkpoint is not None and _inside(out, pathlib.Path(checkpoint).expanduser().resolve()):
        raise OutputError(f"--output {out} is inside the checkpoint {checkpoint}; write evaluations elsewhere")
    if out.exists() and not out.is_dir():
        raise OutputError(f"--output {out} exists and is not a folder")
    cfg_path = out / CONFIG_FILE
    if out.is_dir() and any(out.iterdir()):
        if not cfg_path.is_file():
            if not overwrite:
                raise OutputError(
                    f"--output {out} is not empty and is not an evaluation output (no {CONFIG_FILE}); "
                    "choose an empty or new folder, or pass --overwrite to write our files beside what is there"
                )
        else:
            previous = json.loads(cfg_path.read_text())
            diff = sorted(k for k in set(previous) | set(config) if previous.get(k) != config.get(k))
            if diff and not overwrite:
                details = "; ".join(f"{k}: was {previous.get(k)!r}, now {config.get(k)!r}" for k in diff)
                raise OutputError(
                    f"--output {out} holds an evaluation with different settings ({details}); "
                    "use another --output, or --overwrite to discard it"
                )
            if overwrite and process_index == 0:
                for p in _our_files(out):
                    p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    if process_index == 0 or not cfg_path.exists():
        write_atomic(cfg_path, json.dumps(dict(config), indent=2, sort_keys=True) + "\n")
    return out


def write_atomic(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_rows(path: pathlib.Path) -> list[dict]:
    """Rows of a predictions file. A torn last line (the run was killed mid-write) is cut off the file
    with a notice; a bad line elsewhere is an error naming it."""
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").split("\n")
    rows = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if n >= len(lines) - 1:  # the last line (there may be no trailing newline)
                print(f"{path}:{n}: dropping a partly written last row; it will be evaluated again", file=sys.stderr)
                with open(path, "r+", encoding="utf-8") as f:
                    f.truncate(len("\n".join(lines[: n - 1]).encode("utf-8")) + (1 if n > 1 else 0))
                break
            raise OutputError(f"{path}:{n}: not valid JSON ({e.msg}); delete the file to start again") from e
        if not isinstance(row, dict) or "key" not in row:
            raise OutputError(f"{path}:{n}: a prediction row needs a 'key' field")
        rows.append(row)
    return rows


def append_rows(path: pathlib.Path, rows: Iterable[Mapping]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
