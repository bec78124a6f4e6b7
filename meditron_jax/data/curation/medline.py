"""PubMed abstracts from MEDLINE/PubMed XML (``MedlineCitationSet`` or ``PubmedArticleSet``, plain or .gz).

MEDITRON.md §2: an abstract document is title + newline + abstract. Structured abstracts keep their labels,
one section per line ("METHODS: ..."); "UNLABELLED"/"UNASSIGNED" labels are not printed. Citations without
an abstract are dropped (counted as ``no_abstract``). URLs and numeric bracket citations are removed.

Each citation is cut out of the byte stream and parsed on its own (``safe_xml``), so a broken record is
reported with its index, byte offset and first line (plus the line of the XML error) and the records after
it still parse. Bytes between records
that are not whitespace, a closing set tag or a ``<DeleteCitation>`` block are reported too (they may be a
record whose start tag was damaged).
"""

from __future__ import annotations

import gzip
import re
from collections import Counter
from collections.abc import Iterator
from typing import IO, cast
from xml.etree.ElementTree import Element

from . import safe_xml
from . import text as T
from .records import Doc, Malformed

SOURCE = "pubmed_abstracts"
_CHUNK = 1 << 20
_MAX_RECORD_BYTES = 16 << 20
_HIDDEN_LABELS = {"UNLABELLED", "UNASSIGNED", ""}
_GAP_OK_RE = re.compile(
    rb"\s+|</(?:MedlineCitationSet|PubmedArticleSet)\s*>|<DeleteCitation>.*?</DeleteCitation>|"
    rb"<\?xml[^>]*\?>|<!DOCTYPE[^>\[]*(?:\[.*?\])?\s*>|<(?:MedlineCitationSet|PubmedArticleSet)"
    rb"\s*>|<!--.*?-->",
    re.S,
)


def _record_pattern(head: bytes) -> re.Pattern:
    # PubmedArticle contains a MedlineCitation, so the record tag depends on the set type.
    if b"<PubmedArticleSet" in head or b"<PubmedArticle" in head:
        return re.compile(rb"<(PubmedArticle|PubmedBookArticle)[\s>]")
    return re.compile(rb"<(MedlineCitation)[\s>]")


def split_records(fh: IO[bytes]) -> Iterator[tuple[str, int, int, int, bytes]]:
    """Yield ``(kind, index, byte_offset, line, bytes)``; kind is "record", "gap" (unexpected bytes between
    records) or "prolog" (everything before the first record)."""
    buf, base, line, index = b"", 0, 1, 0  # base: stream offset of buf[0]; line: line number at buf[0]
    pat: re.Pattern | None = None
    eof = False

    def fill() -> bool:
        nonlocal buf, eof
        chunk = fh.read(_CHUNK)
        if not chunk:
            eof = True
            return False
        buf += chunk
        return True

    def advance(n: int) -> None:
        nonlocal buf, base, line
        line += buf.count(b"\n", 0, n)
        base += n
        buf = buf[n:]

    while pat is None and fill():
        if re.search(rb"<(PubmedArticle|PubmedBookArticle|MedlineCitation)[\s>]", buf):
            pat = _record_pattern(buf)
    if pat is None:
        if buf.strip():
            yield "prolog", 0, 0, 1, buf
        return
    first = True
    while True:
        m = pat.search(buf)
        while m is None and not eof and fill():
            m = pat.search(buf)
        if m is None:  # trailing bytes after the last record
            if buf.strip() and _GAP_OK_RE.sub(b"", buf).strip():
                yield "gap", index, base, line, buf
            return
        if m.start():
            gap = buf[: m.start()]
            if first:
                yield "prolog", 0, base, line, gap
            elif _GAP_OK_RE.sub(b"", gap).strip():
                yield "gap", index, base, line, gap
            advance(m.start())
        first = False
        tag = m.group(1)
        end_pat = re.compile(rb"</" + tag + rb"\s*>")
        next_start = re.compile(rb"<" + tag + rb"[\s>]")
        while True:
            e = end_pat.search(buf)
            s = next_start.search(buf, 1)
            if e and (s is None or e.start() < s.start()):
                n = e.end()
                break
            if s is not None:  # next record starts before this one ends: truncated record
                n = s.start()
                break
            if eof or len(buf) > _MAX_RECORD_BYTES or not fill():
                n = len(buf)
                break
        yield "record", index, base, line, buf[:n]
        index += 1
        advance(n)


def render_citation(rec: Element) -> tuple[str, str | None, str | None]:
    """``(text, pmid, pmcid)`` of one MedlineCitation/PubmedArticle; text is "" when there is no abstract."""
    cit = rec if rec.tag == "MedlineCitation" else rec.find(".//MedlineCitation")
    if cit is None:  # PubmedBookArticle: BookDocument carries the title and abstract
        cit = rec.find("BookDocument")
    if cit is None:
        raise ValueError(f"<{rec.tag}> has no MedlineCitation/BookDocument")
    pmid = (cit.findtext("PMID") or "").strip() or None
    pmcid = None
    for other in rec.iter("OtherID"):
        other_text = (other.text or "").strip()
        if other_text.startswith("PMC"):
            pmcid = other_text
    for aid in rec.iter("ArticleId"):
        if aid.get("IdType") == "pmc":
            pmcid = (aid.text or "").strip() or pmcid
    title_el = cit.find(".//ArticleTitle")
    title = safe_xml.text_of(title_el if title_el is not None else cit.find(".//BookTitle"))
    if title.startswith("[") and title.rstrip(".").endswith("]"):  # MEDLINE brackets translated titles
        title = title.rstrip(".")[1:-1] + "."
    parts = []
    abstract = cit.find(".//Abstract")
    for at in abstract.findall("AbstractText") if abstract is not None else []:
        body = safe_xml.text_of(at)
        if not body:
            continue
        label = (at.get("Label") or "").strip()
        parts.append(body if label.upper() in _HIDDEN_LABELS else f"{label}: {body}")
    if not parts:
        return "", pmid, pmcid
    return "\n".join([title, *parts]) if title else "\n".join(parts), pmid, pmcid


def _clean(text: str) -> tuple[str, Counter]:
    removed: Counter = Counter()
    text = T.remove_urls(text, removed)
    text = T.remove_spans(text, T.NUMERIC_BRACKET_REF_RE, removed, "bracket_refs")
    return T.normalize_spaces(text), removed


def read_medline(path: str, fh: IO[bytes]) -> Iterator[Doc | Malformed]:
    """Yield abstract ``Doc`` s and ``Malformed`` reports from one MEDLINE/PubMed XML file."""
    if path.lower().endswith(".gz"):
        fh = cast(IO[bytes], gzip.GzipFile(fileobj=fh))
    try:
        for kind, index, offset, line, data in split_records(fh):
            pos = {"record": index, "byte_offset": offset, "line": line}
            if kind == "prolog":
                if b"<!ENTITY" in data:  # records are parsed without it, so its entities can never expand
                    yield Malformed(
                        SOURCE,
                        path,
                        {"byte_offset": offset + data.find(b"<!ENTITY"), "line": line},
                        "unsafe XML: entity declaration in the DOCTYPE (ignored)",
                    )
                continue
            if kind == "gap":
                yield Malformed(SOURCE, path, pos, f"unparsed bytes between records: {data[:80]!r}")
                continue
            try:
                root, _ = safe_xml.parse(data)
                text, pmid, pmcid = render_citation(root)
            except (safe_xml.XMLError, ValueError) as e:
                where = dict(pos)
                if isinstance(e, safe_xml.XMLError) and e.line is not None:
                    where["error_line"] = line + e.line - 1
                yield Malformed(SOURCE, path, where, str(e))
                continue
            raw_chars = len(text)
            text, removed = _clean(text)
            ident = pmid or f"{path}#{index}"
            yield Doc(
                id=f"pubmed:{ident}",
                source=SOURCE,
                text=text,
                raw_chars=raw_chars,
                removed=dict(removed),
                meta={"pmid": pmid, "pmcid": pmcid, "file": path, **({} if text else {"drop": "no_abstract"})},
            )
    except (OSError, EOFError) as e:  # truncated/corrupt gzip: what was read so far has been yielded
        yield Malformed(SOURCE, path, {"byte_offset": None}, f"unreadable compressed stream: {e}")
