"""General-domain replay text (MEDITRON.md §2: a document-level sample of RedPajama, keep fraction 0.0004).

Inputs:
- ``.jsonl`` / ``.jsonl.gz`` with a ``text`` field per line (RedPajama's layout): one document per line;
- ``.txt``: WikiText files (`` = Title = `` lines) are split into articles, detokenized (`` @-@ `` -> ``-``,
  `` , `` -> ``, ``) with `` = = Section = = `` turned into markdown headings; other plain text (the tiny
  Shakespeare sample) is cut at blank lines into documents of at most ``max_chars``.
The keep-fraction sampling itself is a pipeline filter (``--replay_keep_fraction``), so it is counted.
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Iterator
from typing import IO, cast

from .records import Doc, Malformed

SOURCE = "replay"
MAX_CHARS = 20_000
_WT_TITLE_RE = re.compile(r"^= ([^=].*?) =$")
_WT_HEADING_RE = re.compile(r"^(=(?: =)+) (.+?) =(?: =)+$")
_DETOK = ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" n't", "n't"), (" 's ", "'s "))
_SPACE_BEFORE_RE = re.compile(r" ([.,;:!?)\]}%])")
_SPACE_AFTER_RE = re.compile(r"([(\[{$]) ")


def detokenize_wikitext(line: str) -> str:
    for a, b in _DETOK:
        line = line.replace(a, b)
    line = _SPACE_AFTER_RE.sub(r"\1", _SPACE_BEFORE_RE.sub(r"\1", line))
    return " ".join(line.split())


def _decoded_lines(path: str, fh: IO[bytes]) -> Iterator[tuple[int, str | None, Malformed | None]]:
    for lineno, raw in enumerate(fh, 1):
        try:
            yield lineno, raw.decode("utf-8"), None
        except UnicodeDecodeError as e:
            yield lineno, None, Malformed(SOURCE, path, {"line": lineno, "column": e.start}, f"invalid UTF-8: {e}")


def _wikitext_docs(path: str, lines: list[tuple[int, str]]) -> Iterator[Doc]:
    stem = path.rsplit("/", 1)[-1]
    body: list[str]
    title, first_line, body, raw = None, 0, [], 0
    for lineno, line in lines + [(0, "= <end> =")]:
        m = _WT_TITLE_RE.match(line.strip())
        if m:
            if title is not None and body:
                yield Doc(
                    id=f"replay:{stem}:{first_line}",
                    source=SOURCE,
                    text="\n".join([title] + body),
                    raw_chars=raw,
                    meta={"file": path, "line": first_line},
                )
            title, first_line, body, raw = detokenize_wikitext(m.group(1)), lineno, [], len(line)
            continue
        raw += len(line)
        h = _WT_HEADING_RE.match(line.strip())
        if h:
            body.append("\n" + "#" * min(3, h.group(1).count("=")) + " " + detokenize_wikitext(h.group(2)))
        elif line.strip():
            body.append(detokenize_wikitext(line))


def _plain_docs(path: str, lines: list[tuple[int, str]], max_chars: int) -> Iterator[Doc]:
    stem = path.rsplit("/", 1)[-1]
    paras: list[str] = []
    cur: list[str] = []
    starts: list[int] = []
    for lineno, line in lines + [(0, "")]:
        if line.strip():
            if not cur:
                starts.append(lineno)
            cur.append(line.rstrip())
        elif cur:
            paras.append("\n".join(cur))
            cur = []
    doc: list[str] = []
    size, first = 0, 0
    for para, start in zip(paras + [None], starts + [0], strict=True):
        if doc and (para is None or size + len(para) > max_chars):
            text = "\n\n".join(doc)
            yield Doc(
                id=f"replay:{stem}:{first}",
                source=SOURCE,
                text=text,
                raw_chars=len(text),
                meta={"file": path, "line": first},
            )
            doc, size = [], 0
        if para is not None:
            if not doc:
                first = start
            doc.append(para)
            size += len(para) + 2


def read_replay(path: str, fh: IO[bytes], max_chars: int = MAX_CHARS) -> Iterator[Doc | Malformed]:
    name = path.lower()
    if name.endswith(".gz"):
        fh, name = cast(IO[bytes], gzip.GzipFile(fileobj=fh)), name[:-3]
    try:
        if name.endswith(".jsonl"):
            stem = path.rsplit("/", 1)[-1]
            for lineno, line, bad in _decoded_lines(path, fh):
                if bad or line is None or not line.strip():  # line is None only with bad set
                    if bad:
                        yield bad
                    continue
                try:
                    rec = json.loads(line)
                    text = rec["text"]
                    if not isinstance(text, str):
                        raise TypeError(f"'text' is {type(text).__name__}")
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    yield Malformed(SOURCE, path, {"line": lineno}, f"bad replay record: {e!r}")
                    continue
                ident = rec.get("id") or f"{stem}:{lineno}"
                yield Doc(
                    id=f"replay:{ident}",
                    source=SOURCE,
                    text=text.strip(),
                    raw_chars=len(text),
                    meta={"file": path, "line": lineno},
                )
            return
        good: list[tuple[int, str]] = []
        for lineno, line, bad in _decoded_lines(path, fh):
            if bad:
                yield bad
            else:
                good.append((lineno, cast(str, line)))  # str whenever bad is None
        if any(_WT_TITLE_RE.match(ln.strip()) for _, ln in good[:2000]):
            yield from _wikitext_docs(path, good)
        else:
            yield from _plain_docs(path, good, max_chars)
    except (OSError, EOFError) as e:
        yield Malformed(SOURCE, path, {"byte_offset": None}, f"unreadable compressed stream: {e}")
