"""JAX's persistent compilation cache for the commands that compile (training, evaluation, generation): a
restarted, resumed or repeated run loads its compiled programs instead of compiling them again (minutes for a
7B or 70B step on a TPU slice; a third of a small CPU job: docs/performance.md, "Start-up"). MaxText keeps
one by default too.

The user's own setting wins: ``JAX_COMPILATION_CACHE_DIR`` or ``jax.config.update("jax_compilation_cache_dir",
...)``. JAX treats the cache as trusted code: keep it where only you can write (the default folder is created
private to its owner).
"""

from __future__ import annotations

import logging
import os

import jax

from meditron_jax import fs

DEFAULT_DIR = "${XDG_CACHE_HOME}/meditron_jax/xla"  # XDG_CACHE_HOME unset or empty: ~/.cache
MAX_BYTES = 8 << 30  # a local cache evicts least recently used entries past this (JAX's default: no limit)

log = logging.getLogger(__name__)


def use_compilation_cache(path: str | None = DEFAULT_DIR) -> str | None:
    """Point JAX's persistent cache at ``path`` (``~`` and ``$VARIABLES`` expanded; a gs:// URL works too)
    unless one is configured already; ``None`` or "" leaves it off. Returns the folder in use, or None. Takes
    effect for programs compiled after the call, unless JAX already started a cache elsewhere in this process."""
    configured = jax.config.values["jax_compilation_cache_dir"]
    if configured:
        return configured
    if not path:
        return None
    xdg = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    path = os.path.expandvars(os.fspath(path).replace("${XDG_CACHE_HOME}", xdg))
    if not fs.is_url(path):
        path = os.path.expanduser(path)
        os.makedirs(path, mode=0o700, exist_ok=True)
        # Eviction locks a file in the folder: local folders only (JAX's SoftFileLock cannot write to gs://).
        if jax.config.values["jax_compilation_cache_max_size"] == -1:
            jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    jax.config.update("jax_compilation_cache_dir", path)
    log.info("compiled programs are cached in %s", path)
    return path


def add_flag(parser) -> None:
    """``--compilation_cache_dir`` of a command that compiles; pass its value to :func:`use_compilation_cache`."""
    parser.add_argument(
        "--compilation_cache_dir",
        default=DEFAULT_DIR,
        help="JAX's persistent compilation cache: a repeated run skips compiling ('' turns it off; "
        "JAX_COMPILATION_CACHE_DIR, when set, wins)",
    )
