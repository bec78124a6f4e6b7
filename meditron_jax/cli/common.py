"""What every command shares: quiet start-up, one clear line per error (the traceback behind --verbose)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence

# Errors a user can fix from the message alone (bad values, files, disk full); anything else is a bug and
# keeps its traceback. ConversionError, OutputError and ConfigError are ValueErrors.
USER_ERRORS = (ValueError, KeyError, OSError)


def quiet_startup(verbose: bool) -> None:
    """Silence TensorFlow/absl start-up chatter unless asked; must run before they are imported."""
    if not verbose:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # also TF's start-up "errors" about oneDNN
    level = logging.DEBUG if verbose else logging.INFO
    # Configure the root logger before gin or absl can, so their first message does not set a bare format.
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s", force=True)
    if not verbose:
        for name in ("absl", "tensorflow", "jax._src", "orbax", "seqio"):
            logging.getLogger(name).setLevel(logging.WARNING)
        logging.getLogger().addFilter(_gin_search_misses)


def _gin_search_misses(record: logging.LogRecord) -> bool:
    """gin's resource reader logs ``ERROR Path not found`` for every search-path entry that lacks an included
    file, even when a later entry has it; a missing file is still an error (gin raises), so these only mislead."""
    return record.module != "resource_reader"


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
        print(f"error: {one_line(str(message))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


def one_line(message: str) -> str:
    """The error itself, without a traceback that a library (Beam re-raises worker errors with one) put into
    the message: its last line, plus where it happened when the library says so."""
    if "Traceback (most recent call last)" not in message:
        return message
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    where = next((ln for ln in reversed(lines) if ln.startswith("[while running")), "")
    cause = next(
        (ln for ln in reversed(lines) if not ln.startswith(("[while running", "File ", "^", "~")) and ": " in ln),
        lines[-1],
    )
    return f"{cause} {where}".strip() + " (--verbose shows the traceback)"


def check_utf8(text: str, what: str) -> None:
    """Command-line text that is not valid UTF-8 arrives with lone surrogates (Python's surrogateescape);
    name it instead of failing later inside the tokenizer."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raw = text.encode("utf-8", "surrogateescape")
        at = len(text[: e.start].encode("utf-8", "surrogateescape"))
        raise ValueError(
            f"{what} is not valid UTF-8 (byte {raw[at : at + 1]!r} at offset {at} of {raw[:60]!r})"
        ) from None
