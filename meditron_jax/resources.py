"""Where the project's gin recipes and config files are: the source tree when run from a checkout (editable
install), else the copies ``pip install`` puts under ``<prefix>/share/meditron_jax`` (setup.cfg data_files)."""

from __future__ import annotations

import pathlib
import sys

_SOURCE_ROOT = pathlib.Path(__file__).resolve().parents[1]
_INSTALLED_ROOT = pathlib.Path(sys.prefix) / "share" / "meditron_jax"


def _root_with(name: str) -> pathlib.Path:
    for root in (_SOURCE_ROOT, _INSTALLED_ROOT):
        if (root / name).is_dir():
            return root / name
    raise FileNotFoundError(f"meditron_jax's {name}/ folder is neither in {_SOURCE_ROOT} nor in {_INSTALLED_ROOT}")


def gin_dir() -> pathlib.Path:
    """The folder of the gin recipes (models/, runs/, data/, parallel/)."""
    return _root_with("gin")
