#!/usr/bin/env python
"""What sets a TPU program's temporary memory: the live set at the peak of libtpu's own buffer assignment.

Reads the ``*after_optimizations-buffer-assignment.txt`` and ``*-live-range.txt`` files that an XLA dump
(``xla_dump_to``) holds for a compiled module, and prints:

* the preallocated temporary heap (what ``memory_analysis().temp_size_in_bytes`` reports on libtpu 0.0.52);
* the peak of the bytes live at once, and the time step of the flattened schedule where it happens (values in
  one heap slot at the same time counted once; while-loop carries, the ``(phi)`` values, included);
* the heap minus that peak: fragmentation;
* the values live at the peak (or at ``--at``), by heap offset, from ``--min_mib`` up.

Dumps come from ``meditron_jax.train.aot.compile_train_step(..., compiler_options={"xla_dump_to": DIR})`` and,
for MaxText, ``train_compile ... compile_xla_flags=--xla_dump_to=DIR`` (docs/performance.md).

    python bench/aot_heap.py DUMP_DIR [--min_mib 64] [--at STEP]
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

MIB = 1 << 20
_ALLOC = re.compile(r"allocation \d+: size (\d+), page 0, preallocated-temp:\n((?: value:.*\n)+)")
_VALUE = re.compile(r" value: <\d+ (\S+)(?: \(phi\))? @\d+> \(size=(\d+),offset=(\d+)\): (\S+)")
_RANGE = re.compile(r"    (\S+\{[\d,]*\}):(\d+)-(\d+)$")


def module_files(dump: Path) -> tuple[Path, Path]:
    """The buffer assignment and live ranges of the dump's largest module (the training step)."""
    assignments = sorted(dump.glob("*after_optimizations-buffer-assignment.txt"), key=lambda p: p.stat().st_size)
    if not assignments:
        raise SystemExit(f"{dump}: no *after_optimizations-buffer-assignment.txt (was xla_dump_to set?)")
    ba = assignments[-1]
    lr = ba.with_name(ba.name.replace("buffer-assignment.txt", "live-range.txt"))
    if not lr.exists():
        raise SystemExit(f"{dump}: {ba.name} has no live-range file beside it")
    return ba, lr


def heap(ba: Path, lr: Path):
    """(heap bytes, {value: (offset, size, shape)}, {value: (start, end)}) of the default-memory temp heap."""
    m = _ALLOC.search(ba.read_text())
    if m is None:
        raise SystemExit(f"{ba}: no preallocated-temp allocation")
    values = {}
    for line in m.group(2).splitlines():
        v = _VALUE.match(line)
        if v:
            name = v.group(1) if "{" in v.group(1) else v.group(1) + "{}"
            values[name] = (int(v.group(3)), int(v.group(2)), re.sub(r"\{[^}]*\}", "", v.group(4)))
    ranges = {}
    for line in lr.read_text().splitlines():
        r = _RANGE.match(line)
        if r:
            ranges[r.group(1)] = (int(r.group(2)), int(r.group(3)))
    return int(m.group(1)), values, ranges


def live_slots(values, ranges, t: int) -> dict:
    """{(offset, size): (value, shape, start, end)} of the heap slots live at step t."""
    out = {}
    for name, (off, size, shape) in values.items():
        start, end = ranges.get(name, (-1, -2))
        if start <= t <= end:
            out[(off, size)] = (name, shape, start, end)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dump", type=Path, help="an xla_dump_to folder")
    p.add_argument("--min_mib", type=float, default=64, help="list values of at least this many MiB")
    p.add_argument("--at", type=int, default=None, help="list the values live at this step instead of the peak")
    args = p.parse_args(argv)
    size, values, ranges = heap(*module_files(args.dump))
    steps = max((end for _, end in ranges.values()), default=0) + 1
    events: list[list] = [[] for _ in range(steps + 1)]  # slot births and deaths per step
    slots: dict[tuple, list] = {}
    for name, (off, sz, _) in values.items():
        if name in ranges:
            slots.setdefault((off, sz), []).append(ranges[name])
    for (_, sz), spans in slots.items():
        covered = set()
        for start, end in spans:
            covered.update(range(start, end + 1))
        for t in covered:
            if t - 1 not in covered:
                events[t].append(sz)
            if t + 1 not in covered:
                events[t + 1].append(-sz)
    live, peak, peak_t = 0, 0, 0
    for t in range(steps):
        live += sum(events[t])
        if live > peak:
            peak, peak_t = live, t
    print(f"temporary heap {size / 2**30:.3f} GiB ({size} B)")
    print(f"peak live {peak / 2**30:.3f} GiB at step {peak_t} of {steps}")
    print(f"fragmentation (heap - peak live) {(size - peak) / 2**30:.3f} GiB")
    t = peak_t if args.at is None else args.at
    print(f"values live at step {t} (offset MiB, size MiB, live steps, value, shape):")
    for (off, sz), (name, shape, start, end) in sorted(live_slots(values, ranges, t).items()):
        if sz >= args.min_mib * MIB:
            print(f"  {off / MIB:9.1f} {sz / MIB:8.1f}  [{start}-{end}]  {name}  {shape}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
