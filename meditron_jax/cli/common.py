"""What every command shares: quiet start-up, one clear line per error (the traceback behind --verbose)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Callable, Sequence

# Errors a user can fix from the message alone (bad values, files, disk full); anything else is a bug and
# keeps its traceback. ConversionError, OutputError and ConfigError are ValueErrors.
USER_ERRORS = (ValueError, KeyError, OSError)


# Library log messages that say nothing about this run (each checked in tests/test_quiet_output.py):
NOISE_MESSAGES = (
    # seqio, on every SentencePiece vocabulary: T5's pad id 0 is what the whole project uses.
    "T5 library uses PAD_ID=",
    # seqio, on every in-memory SFT task: caching them (seqio's cache_tasks_main) is for corpora, not these.
    "Using an uncached FunctionDataset for training is not recommended",
    # Apache Beam, on import: the BigQuery connectors it offers are not used here.
    "apitools not found, and bigquery client libraries are not available",
    "No module named google.cloud.bigquery_storage_v1",
    # jax's platform notices when an accelerator plugin is installed but not the one in use.
    "An NVIDIA GPU may be present on this machine, but a CUDA-enabled jaxlib is not installed",
    "Unable to initialize backend",
)
# Python warnings of the same kind (regular expressions matched against the start of the message).
NOISE_WARNINGS = (
    # orbax, restoring a training run to the host (convert.model_dir): there is no sharding to give it.
    r"Sharding info not provided when restoring",
    r"Couldn't find sharding info under RestoreArgs",
)


def quiet_startup(verbose: bool) -> None:
    """Silence TensorFlow/absl/SeqIO/Beam start-up chatter unless asked; must run before they are imported.
    What native libraries write to stderr themselves is filtered by :func:`run` (cli/stderr_filter.py)."""
    if not verbose:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TF's C++ logs once absl is initialised
    level = logging.DEBUG if verbose else logging.INFO
    # Configure the root logger before gin or absl can, so their first message does not set a bare format.
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s", force=True)
    logging.getLogger().addFilter(_gin_search_misses)
    if verbose:
        logging.getLogger().removeFilter(_library_noise)
    else:
        for name in ("absl", "tensorflow", "jax._src", "orbax", "seqio", "apache_beam"):
            logging.getLogger(name).setLevel(logging.WARNING)
        for handler in logging.getLogger().handlers:  # handler filters see records of every logger
            handler.addFilter(_library_noise)
        for pattern in NOISE_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern)


def _gin_search_misses(record: logging.LogRecord) -> bool:
    """gin's resource reader logs ``ERROR Path not found`` for every search-path entry that lacks an included
    file, even when a later entry has it; a missing file is still an error (gin raises), so these only mislead."""
    return record.module != "resource_reader"


def _library_noise(record: logging.LogRecord) -> bool:
    try:
        message = record.getMessage()
    except Exception:  # a malformed library record: let logging report it as usual
        return True
    return not any(noise in message for noise in NOISE_MESSAGES)


# Apache Beam logs on the root logger while it is imported, which a command does before parsing its flags.
if "--verbose" not in sys.argv[1:]:
    logging.getLogger().addFilter(_library_noise)

_FILTER_ENV = "MEDITRON_STDERR_FILTERED"  # set once the filter runs: child commands inherit it, and the pipe


def filter_native_stderr() -> None:
    """Route file descriptor 2 through cli/stderr_filter.py (a child process) so that native libraries'
    start-up lines are dropped; everything else passes unchanged. Once per process tree; a no-op where fd 2
    cannot be replaced."""
    if os.environ.get(_FILTER_ENV):
        return
    import atexit
    import subprocess

    try:
        sys.stderr.flush()
        real = os.dup(2)
        child = subprocess.Popen(
            [sys.executable, "-I", os.path.join(os.path.dirname(os.path.abspath(__file__)), "stderr_filter.py")],
            stdin=subprocess.PIPE,
            stdout=real,
            stderr=real,
            close_fds=True,
        )
    except OSError:
        return
    assert child.stdin is not None
    os.dup2(child.stdin.fileno(), 2)
    child.stdin.close()
    os.environ[_FILTER_ENV] = "1"

    def drain() -> None:
        # Give stderr back and let the filter pass on the last lines before the shell prompt returns.
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(real, 2)
        try:
            child.wait(timeout=5)
        except subprocess.TimeoutExpired:  # a grandchild still holds the pipe: it keeps filtering for it
            pass

    atexit.register(drain)


def add_verbose(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verbose", action="store_true", help="full tracebacks and library logs")


def run(main: Callable[[Sequence[str]], int], argv: Sequence[str] | None = None) -> int:
    """Run ``main(argv)``; a user error prints ``error: ...`` and exits 1 (with --verbose, the traceback)."""
    from_command_line = argv is None  # a console script; a test calling console([...]) keeps its stderr
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in argv
    if from_command_line and not verbose:
        filter_native_stderr()
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
