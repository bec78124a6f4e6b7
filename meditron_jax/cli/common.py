"""What every command shares: quiet start-up, one clear line per error (the traceback behind --verbose)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence

# Errors a user can fix from the message alone; anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, KeyError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError)


def quiet_startup(verbose: bool) -> None:
    """Silence TensorFlow/absl start-up chatter unless asked; must run before they are imported."""
    if not verbose:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    level = logging.DEBUG if verbose else logging.INFO
    # Configure the root logger before gin or absl can, so their first message does not set a bare format.
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s", force=True)
    if not verbose:
        for name in ("absl", "tensorflow", "jax._src", "orbax", "seqio"):
            logging.getLogger(name).setLevel(logging.WARNING)


def add_verbose(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verbose", action="store_true", help="full tracebacks and library logs")


def run(main: Callable[[Sequence[str]], int], argv: Sequence[str] | None = None) -> int:
    """Run ``main(argv)``; a user error prints ``error: ...`` and exits 1 (with --verbose, the traceback)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in argv
    try:
        return main(argv)
    except USER_ERRORS as e:
        if verbose:
            raise
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {message}", file=sys.stderr)
        return 1
