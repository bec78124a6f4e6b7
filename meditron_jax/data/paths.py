"""The one setting that says where the shared data (benchmarks, tokenizer, goldens, corpus sample) lives."""

from __future__ import annotations

import os
import pathlib

ENV_VAR = "MEDITRON_SHARED_DATA"
_REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def shared_data_dir() -> pathlib.Path:
    """``$MEDITRON_SHARED_DATA``, else ``../shared/data`` beside the repository."""
    return pathlib.Path(os.environ.get(ENV_VAR, _REPO_ROOT.parent / "shared" / "data"))


def shared_path(*parts: str, must_exist: bool = True) -> pathlib.Path:
    path = shared_data_dir().joinpath(*parts)
    if must_exist and not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist; set {ENV_VAR} to the folder holding the shared data (now {shared_data_dir()})"
        )
    return path
