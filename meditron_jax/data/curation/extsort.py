"""Sorting more rows than fit in memory: sorted runs spilled to local temporary files, merged lazily.

The curation writes every output file in sorted order so that all runners produce the same bytes; one file
(a big shard, or ``removed.jsonl`` when most of a huge replay corpus is sampled out) can hold more rows than
a worker's memory. Runners hand a grouped file's rows over as a lazy iterable (Dataflow pages them in), so
only ``run_size`` rows are held at a time.
"""

from __future__ import annotations

import heapq
import pickle
import tempfile
from collections.abc import Iterable, Iterator
from typing import IO, Any

RUN_SIZE = 200_000  # rows per in-memory run; ~100-400 MB of curated documents


def _dump_run(rows: list[Any], tmpdir: str) -> IO[bytes]:
    f = tempfile.TemporaryFile(dir=tmpdir)
    for row in sorted(rows):
        pickle.dump(row, f, protocol=pickle.HIGHEST_PROTOCOL)
    f.seek(0)
    return f


def _read_run(f: IO[bytes]) -> Iterator[Any]:
    with f:
        while True:
            try:
                yield pickle.load(f)
            except EOFError:
                return


def external_sorted(rows: Iterable[Any], run_size: int = RUN_SIZE, tmpdir: str | None = None) -> Iterator[Any]:
    """``sorted(rows)`` as an iterator, holding at most ``run_size`` rows in memory (plus one per spilled run).

    Rows must be picklable and totally ordered; equal rows come out in any order, which is harmless here
    because equal rows are identical bytes."""
    if run_size < 1:
        raise ValueError(f"run_size {run_size} must be at least 1")
    runs: list[IO[bytes]] = []
    chunk: list[Any] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) >= run_size:
            runs.append(_dump_run(chunk, tmpdir or tempfile.gettempdir()))
            chunk = []
    if not runs:
        return iter(sorted(chunk))
    return heapq.merge(*(_read_run(f) for f in runs), iter(sorted(chunk)))
