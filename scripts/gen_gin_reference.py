#!/usr/bin/env python
"""Write docs/gin_reference.md: every gin configurable of meditron_jax with its parameters and defaults, and the
macros the recipes in gin/ define, generated from the code (gin's registry and the signatures), not by hand.

    python scripts/gen_gin_reference.py            # rewrite docs/gin_reference.md
    python scripts/gen_gin_reference.py --check    # exit 1 if the committed file is stale

The modules imported are the ones whose source registers configurables (``gin.configurable``,
``gin.external_configurable``, ``gin.register``), so a new configurable shows up without editing this script.
tests/test_gin_reference.py regenerates the page in memory and compares it with the committed file.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import inspect
import os
import pathlib
import re
import sys
import textwrap

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "docs" / "gin_reference.md"
REGISTERS = re.compile(r"\bgin\.(configurable|external_configurable|register)\b")
MACRO_LINE = re.compile(r"^([A-Z][A-Z0-9_]*)\s*=\s*(.+?)\s*(#.*)?$")
REGENERATE = "python scripts/gen_gin_reference.py"


def registering_modules(package: pathlib.Path = ROOT / "meditron_jax") -> list[str]:
    """Dotted names of the package modules whose source registers a gin configurable."""
    out = []
    for path in sorted(package.rglob("*.py")):
        if REGISTERS.search(path.read_text(encoding="utf-8")):
            out.append(".".join(path.relative_to(package.parent).with_suffix("").parts))
    return out


def _configurables() -> list:
    """gin's registry entries whose wrapped object lives in meditron_jax, sorted by name."""
    import gin.config

    for module in registering_modules():
        importlib.import_module(module)
    found = [
        c for _, c in gin.config._REGISTRY.items() if getattr(c.wrapped, "__module__", "").startswith("meditron_jax")
    ]
    return sorted(found, key=lambda c: (c.name.lower(), c.selector))


def _show(value) -> str:
    """A default as gin would write it; functions and classes by qualified name (no memory addresses)."""
    import gin

    if value is inspect.Parameter.empty or value is dataclasses.MISSING or value is gin.REQUIRED:
        return "required"
    if inspect.isfunction(value) or inspect.isclass(value):
        return f"{value.__module__}.{value.__qualname__}"
    text = repr(value)
    if re.search(r" at 0x[0-9a-f]+", text):
        return type(value).__name__
    return text


def _field_comments(cls) -> dict[str, str]:
    """Each dataclass field's comment in the source: the ``#`` lines right above it plus the one after it."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    lines = source.splitlines()
    out = {}
    for node in ast.parse(source).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above = []
        i = node.lineno - 2
        while i >= 0 and lines[i].strip().startswith("#"):
            above.insert(0, lines[i].strip().lstrip("#").strip())
            i -= 1
        last = lines[node.end_lineno - 1]
        tail = last.split("  # ", 1)[1].strip() if "  # " in last else ""
        out[node.target.id] = " ".join(p for p in [*above, tail] if p)
    return out


def _parameters(configurable) -> list[tuple[str, str, str]]:
    """(name, default, comment) for every parameter gin may bind."""
    wrapped = configurable.wrapped
    allow, deny = configurable.allowlist, configurable.denylist or ()
    rows = []
    if dataclasses.is_dataclass(wrapped):
        comments = _field_comments(wrapped)
        for f in dataclasses.fields(wrapped):
            if not f.init:
                continue
            if f.default_factory is not dataclasses.MISSING:
                default = _show(f.default_factory())
            else:
                default = _show(f.default)
            rows.append((f.name, default, comments.get(f.name, "")))
    else:
        for p in inspect.signature(wrapped).parameters.values():
            if p.kind is p.VAR_POSITIONAL:
                continue
            if p.kind is p.VAR_KEYWORD:
                rows.append((f"**{p.name}", "", "passed through"))
                continue
            rows.append((p.name, _show(p.default), ""))
    return [r for r in rows if r[0] not in deny and (allow is None or r[0] in allow or r[0].startswith("**"))]


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _summary(obj) -> str:
    doc = inspect.getdoc(obj) or ""
    first = doc.split("\n\n", 1)[0].replace("\n", " ").strip()
    # A dataclass without a docstring gets dataclasses' generated signature; that is not a summary.
    return "" if first.startswith(getattr(obj, "__name__", "?") + "(") else first


def _macros(gin_root: pathlib.Path) -> list[tuple[str, str, str]]:
    """(macro, file, value) for every top-level ``NAME = value`` line of the gin files."""
    rows = []
    for path in sorted(gin_root.rglob("*.gin")):
        for line in path.read_text(encoding="utf-8").splitlines():
            m = MACRO_LINE.match(line)
            if m:
                rows.append((m.group(1), path.relative_to(gin_root).as_posix(), m.group(2)))
    return rows


def render() -> str:
    out = [
        "# Gin reference",
        "",
        f"Generated by `{REGENERATE}` from the code; do not edit by hand (`tests/test_gin_reference.py` fails",
        "when this page and the code disagree). Bind any parameter in a gin file (`TrainConfig.log_every = 10`) or on",
        "the command line (`meditron-train ... --gin.TrainConfig.log_every=10`; strings in gin syntax,",
        "`--gin.MODEL_DIR=\"'/tmp/run'\"`). `required` means gin must bind it (or the caller passes it). The recipes",
        "that use these are in `gin/` (docs/training.md); the macros they define are listed at the end.",
        "",
    ]
    configurables = _configurables()
    out += ["| configurable | defined in | what it is |", "|---|---|---|"]
    for c in configurables:
        src = pathlib.Path(inspect.getsourcefile(c.wrapped)).resolve().relative_to(ROOT).as_posix()
        out.append(f"| [`{c.name}`](#{c.name.lower()}) | `{src}` | {_cell(_summary(c.wrapped))} |")
    for c in configurables:
        src = pathlib.Path(inspect.getsourcefile(c.wrapped)).resolve().relative_to(ROOT).as_posix()
        kind = "dataclass" if dataclasses.is_dataclass(c.wrapped) else "function"
        out += ["", f"## {c.name}", "", f"`{c.selector}` ({kind}, `{src}`)."]
        summary = _summary(c.wrapped)
        if summary:
            out += ["", summary]
        if c.denylist:
            out += ["", "Not bindable from gin: " + ", ".join(f"`{n}`" for n in c.denylist) + "."]
        out += ["", "| parameter | default | note |", "|---|---|---|"]
        for name, default, note in _parameters(c):
            out.append(
                f"| `{name}` | `{_cell(default)}` | {_cell(note)} |" if default else f"| `{name}` | | {_cell(note)} |"
            )
    out += [
        "",
        "## Macros of the recipes",
        "",
        "Top-level `NAME = value` lines of `gin/**/*.gin` (`%gin.REQUIRED`: the command line must bind it, e.g.",
        "`--gin.MODEL_DIR=\"'/tmp/run'\"`; a file that includes another may set the same macro again).",
        "",
        "| macro | file | value |",
        "|---|---|---|",
    ]
    for name, file, value in _macros(ROOT / "gin"):
        out.append(f"| `{name}` | `gin/{file}` | `{_cell(value)}` |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare with the committed page; exit 1 if stale")
    parser.add_argument("--output", default=str(OUTPUT))
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    text = render()
    path = pathlib.Path(args.output)
    if args.check:
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            print(f"{path} is stale; regenerate it with: {REGENERATE}", file=sys.stderr)
            return 1
        print(f"{path} is up to date")
        return 0
    path.write_text(text, encoding="utf-8")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
