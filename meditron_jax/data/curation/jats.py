"""PubMed Central full-text papers from JATS XML (``.nxml``/``.xml``, one article per file).

Follows MEDITRON's paper formatting (MEDITRON.md §2, "Papers"), re-done on JATS structure instead of
S2ORC/GROBID character spans:
- title prepended; authors, affiliations, acknowledgments, footnotes and all back matter removed;
- the reference list is removed; an in-text citation becomes
  ``[bib_ref] <cited title, at most 12 words>, <first author's last name> [/bib_ref]`` and a citation whose
  entry has no title or no author is deleted (MEDITRON deletes unresolvable ones too);
- a figure/table reference becomes ``[fig_ref] Figure N: <caption, at most 12 words> [/fig_ref]`` (the
  caption is cut at its first sentence break, as MEDITRON's ``summarize_caption`` did);
- figures, tables and their captions are removed (the issue's rule, default). With
  ``keep_captions=True`` they are kept where they occur as ``[fig] Figure N: caption [/fig]`` /
  ``[table] Table N: caption [/table]`` (MEDITRON's released setting: table bodies dropped, captions kept);
- display formulas with a text form become ``[formula] ... [/formula]``; others are removed;
- URLs (``ext-link``, ``uri``, plain-text links) and e-mail addresses are dropped;
- headings: one deviation. MEDITRON guessed levels from names ("#" for Introduction/Methods/...,
  "##" otherwise) because S2ORC is flat; JATS nests ``<sec>``, so depth decides: "#", "##", then "###".
Markers are lower-case with spaces around them, like MEDITRON's code.
"""

from __future__ import annotations

import gzip
import re
from collections import Counter
from collections.abc import Iterator
from typing import IO
from xml.etree.ElementTree import Element

from . import safe_xml
from . import text as T
from .records import Doc, Malformed

SOURCE = "pmc_papers"
MAX_MARKER_WORDS = 12
_DROP_INLINE = {
    "ext-link",
    "uri",
    "email",
    "inline-graphic",
    "graphic",
    "media",
    "fn",
    "table-wrap-foot",
    "alternatives-graphic",
    "private-char",
    "target",
    "object-id",
}
_DROP_XREF = {"aff", "corresp", "fn", "table-fn", "author-notes", "contrib", "other"}
_FLOATS = {"fig": "Figure", "table-wrap": "Table", "fig-group": "Figure", "table-wrap-group": "Table"}
_BLOCKS = {
    "p",
    "sec",
    "list",
    "fig",
    "table-wrap",
    "fig-group",
    "table-wrap-group",
    "disp-formula",
    "boxed-text",
    "disp-quote",
    "def-list",
    "table",
    "supplementary-material",
    "fn-group",
    "ref-list",
    "statement",
    "preformat",
    "speech",
    "verse-group",
    "glossary",
    "array",
    "chem-struct-wrap",
    "code",
}
_MARKER = r"\[(?:bib_ref|fig_ref)\] [^\[]*? \[/(?:bib_ref|fig_ref)\]"
# "[ m1, m2 ]" or "( m1; m2 )" holding only markers: drop the brackets (MEDITRON widened citation spans to
# swallow them); brackets left empty by deleted citations go too.
_WRAPPED_MARKERS_RE = re.compile(rf"[\[(]\s*((?:{_MARKER})(?:\s*[,;–-]?\s*{_MARKER})*)\s*[\])]")
_EMPTY_BRACKETS_RE = re.compile(r"\s?[\[(][\s,;–-]*[\])]")
_DANGLING_SEP_RE = re.compile(r"\(\s*[;,]\s*|\s*[;,]\s*\)")
_SPACE_PUNCT_RE = re.compile(r" +([.,;:])(?=\s|$)")


def _words(s: str, n: int = MAX_MARKER_WORDS) -> str:
    w = s.split()
    return " ".join(w[:n]) + ("..." if len(w) > n else "")


def summarize_caption(caption: str) -> str:
    """First sentence (cut at . ; : or parenthesis once longer than 20 chars), at most 12 words."""
    if len(caption) > 20:
        caption = re.split(r"[.;:()]", caption)[0]
    return _words(caption.strip())


def _float_label(elem: Element, kind: str) -> str:
    label = safe_xml.text_of(elem.find("label")).rstrip(".: ")
    label = re.sub(r"^Fig\.?(?=\s|\d)", "Figure", label)
    label = re.sub(r"^Tab\.?(?=\s|\d)", "Table", label)
    return label or kind


def _caption_text(elem: Element) -> str:
    cap = elem.find("caption")
    if cap is None:
        return ""
    title = safe_xml.text_of(cap.find("title"))
    return title or safe_xml.text_of(cap)


class _Renderer:
    def __init__(self, root: Element, keep_captions: bool):
        self.root = root
        self.keep_captions = keep_captions
        self.removed: Counter = Counter()
        self.refs: dict[str, str | None] = {}
        self.floats: dict[str, str | None] = {}
        for ref in root.iter("ref"):
            if ref_id := ref.get("id"):
                self.refs[ref_id] = self._bib_marker_text(ref)
        for tag, kind in _FLOATS.items():
            for fl in root.iter(tag):
                if fl_id := fl.get("id"):
                    cap = _caption_text(fl)
                    self.floats[fl_id] = f"{_float_label(fl, kind)}: {summarize_caption(cap)}" if cap else None

    # -- references and floats
    @staticmethod
    def _bib_marker_text(ref: Element) -> str | None:
        cit = next((c for c in ref if c.tag in ("element-citation", "mixed-citation", "citation", "nlm-citation")), ref)
        title = ""
        for tag in ("article-title", "chapter-title", "source"):
            title = safe_xml.text_of(cit.find(f".//{tag}"))
            if title:
                break
        author = ""
        group = cit.find("person-group[@person-group-type='author']")
        for scope in ([group] if group is not None else []) + [cit]:
            surname = scope.find(".//name/surname")
            if surname is None:
                surname = scope.find(".//string-name/surname")
            author = safe_xml.text_of(surname) or safe_xml.text_of(scope.find(".//collab"))
            if author:
                break
        if not title or not author:
            return None
        return f"{_words(title.rstrip('.'))}, {author}"

    def _xref(self, x: Element) -> str:
        kind = x.get("ref-type", "")
        rids = (x.get("rid") or "").split()
        if kind == "bibr":
            out = []
            for rid in rids:
                marker = self.refs.get(rid)
                if marker:
                    out.append(f" [bib_ref] {marker} [/bib_ref] ")
                    self.removed["bib_ref_markers"] += 1
                else:
                    self.removed["citations_unresolved"] += 1
            return ", ".join(out) if out else " "
        if kind in ("fig", "table"):
            out = [f" [fig_ref] {self.floats[r]} [/fig_ref] " for r in rids if self.floats.get(r)]
            if out:
                self.removed["fig_ref_markers"] += len(out)
                return ", ".join(out)
            return self._inline(x)
        if kind in _DROP_XREF:
            return ""
        return self._inline(x)

    # -- inline text
    def _inline(self, e: Element, blocks: list[str] | None = None) -> str:
        parts = [e.text or ""]
        for c in e:
            tag = c.tag
            if tag == "xref":
                parts.append(self._xref(c))
            elif tag in ("ext-link", "uri", "email"):
                self.removed["urls"] += len(safe_xml.text_of(c)) + 1
            elif tag in _DROP_INLINE:
                pass
            elif tag == "inline-formula":
                parts.append(safe_xml.text_of(c.find("tex-math")) or safe_xml.text_of(c))
            elif tag == "break":
                parts.append(" ")
            elif tag in _BLOCKS and blocks is not None:
                # A float/list/formula inside a paragraph: render it as its own block after the paragraph.
                blocks.extend(self._block(c, depth=99))
                parts.append(" ")
            else:
                parts.append(self._inline(c, blocks))
            parts.append(c.tail or "")
        return "".join(parts)

    def _finish_paragraph(self, s: str) -> str:
        s = T.remove_urls(s, self.removed)
        s = T.remove_emails(s, self.removed)
        s = " ".join(s.split())
        s = _WRAPPED_MARKERS_RE.sub(r" \1 ", s)
        s = _EMPTY_BRACKETS_RE.sub("", s)
        s = _DANGLING_SEP_RE.sub(lambda m: "(" if "(" in m.group(0) else ")", s)
        s = " ".join(s.split()).replace("( ", "(").replace(" )", ")")
        # "word [1]." with the citation deleted, or "[/bib_ref] ." (MEDITRON glued those too).
        return _SPACE_PUNCT_RE.sub(r"\1", s)

    # -- blocks
    def _float(self, e: Element) -> list[str]:
        kind = _FLOATS.get(e.tag, "Figure")
        self.removed["tables" if kind == "Table" else "figures"] += 1
        caption = e.find("caption")
        if caption is None or not safe_xml.text_of(caption):
            return []
        if not self.keep_captions:
            self.removed["captions"] += 1
            return []
        cap = " ".join(self._finish_paragraph(self._inline(c)) for c in caption if c.tag in ("title", "p"))
        tag = "table" if kind == "Table" else "fig"
        return [f"[{tag}] {_float_label(e, kind)}: {cap} [/{tag}]"]

    def _block(self, e: Element, depth: int) -> list[str]:
        tag = e.tag
        if tag == "sec":
            out = []
            title_el = e.find("title")
            title = " ".join(self._inline(title_el).split()) if title_el is not None else ""
            if title:
                out.append("#" * min(3, max(1, depth)) + " " + title)
            for c in e:
                if c.tag not in ("title", "label"):
                    out.extend(self._block(c, depth + 1))
            return out
        if tag in _FLOATS:
            return self._float(e)
        if tag in (
            "table",
            "supplementary-material",
            "fn-group",
            "ref-list",
            "graphic",
            "media",
            "array",
            "chem-struct-wrap",
        ):
            self.removed[tag.replace("-", "_")] += 1
            return []
        if tag == "disp-formula":
            f = safe_xml.text_of(e.find("tex-math")) or safe_xml.text_of(e)
            f = re.sub(r"\(\d+[a-z]?\)$", "", f).strip()  # equation number
            if not f:
                self.removed["formulas"] += 1
                return []
            return [f"[formula] {f} [/formula]"]
        if tag == "list":
            out = []
            for item in e.iter("list-item"):
                inner: list[str] = []
                body = " ".join(self._finish_paragraph(self._inline(p, inner)) for p in item if p.tag == "p")
                if body:
                    out.append("- " + body)
                out.extend(inner)
            return out
        if tag == "def-list":
            return [
                f"- {safe_xml.text_of(it.find('term'))}: {safe_xml.text_of(it.find('def'))}"
                for it in e.iter("def-item")
            ]
        if tag in (
            "boxed-text",
            "disp-quote",
            "statement",
            "speech",
            "verse-group",
            "glossary",
            "body",
            "abstract",
            "trans-abstract",
        ):
            out = []
            for c in e:
                if c.tag == "caption":
                    out.extend(self._finish_paragraph(self._inline(p)) for p in c if p.tag in ("title", "p"))
                elif c.tag not in ("label", "title", "object-id"):
                    out.extend(self._block(c, depth))
            return out
        if tag in ("title", "label", "object-id", "caption"):
            return []
        extra: list[str] = []
        para = self._finish_paragraph(self._inline(e, extra))
        return ([para] if para else []) + extra

    def render(self) -> str:
        meta = self.root.find("front/article-meta")
        if meta is None:
            meta = self.root.find(".//article-meta")
        parts: list[str] = []
        title_el = meta.find("title-group/article-title") if meta is not None else None
        title = self._finish_paragraph(self._inline(title_el)) if title_el is not None else ""
        if title:
            parts.append(title)
        for ab in meta.findall("abstract") if meta is not None else []:
            if ab.get("abstract-type") in ("graphical", "teaser", "toc", "web-summary"):
                continue
            heading = safe_xml.text_of(ab.find("title")) or "Abstract"
            blocks = self._block(ab, depth=2)
            if blocks:
                parts.append("# " + heading)
                parts.extend(blocks)
        body = self.root.find("body")
        if body is not None:
            parts.extend(self._block(body, depth=1))
        back = self.root.find("back")
        if back is not None:
            self.removed["reference_entries"] += sum(1 for _ in back.iter("ref"))
            self.removed["back_sections"] += len(back)
        for fl in self.root.findall("floats-group/*"):
            parts.extend(self._block(fl, depth=99))
        parts = [p for p in parts if p.strip()]
        return re.sub(r"\n(#+ )", r"\n\n\1", "\n".join(parts)).strip()


def render_article(root: Element, keep_captions: bool = False) -> tuple[str, Counter]:
    r = _Renderer(root, keep_captions)
    return r.render(), r.removed


def article_ids(root: Element) -> dict[str, str]:
    meta = root.find("front/article-meta")
    ids: dict[str, str] = {}
    for aid in meta.findall("article-id") if meta is not None else []:
        kind = aid.get("pub-id-type")
        value = (aid.text or "").strip()
        if kind and value:
            ids.setdefault(kind, value)
    return ids


def read_jats(path: str, fh: IO[bytes], keep_captions: bool = False) -> Iterator[Doc | Malformed]:
    """One ``Doc`` per JATS file (or one ``Malformed`` with the parser's line/column/byte offset)."""
    try:
        data = gzip.GzipFile(fileobj=fh).read() if path.lower().endswith(".gz") else fh.read()
    except (OSError, EOFError) as e:
        yield Malformed(SOURCE, path, {"byte_offset": None}, f"unreadable compressed stream: {e}")
        return
    try:
        root, skipped = safe_xml.parse(data)
    except safe_xml.XMLError as e:
        kind = "unsafe XML" if isinstance(e, safe_xml.UnsafeXMLError) else "malformed XML"
        yield Malformed(SOURCE, path, e.position(), f"{kind}: {e}")
        return
    if root.tag != "article":
        yield Malformed(SOURCE, path, {"line": 1}, f"root element is <{root.tag}>, not a JATS <article>")
        return
    text, removed = render_article(root, keep_captions)
    if skipped:
        removed["undefined_entities"] += skipped
    ids = article_ids(root)
    pmcid = ids.get("pmc") or ids.get("pmcid")
    if pmcid and not pmcid.upper().startswith("PMC"):
        pmcid = "PMC" + pmcid
    stem = path.rsplit("/", 1)[-1]
    ident = pmcid or (f"pmid{ids['pmid']}" if "pmid" in ids else stem)
    yield Doc(
        id=f"pmc:{ident}",
        source=SOURCE,
        text=text,
        raw_chars=len(data),
        removed=dict(removed),
        meta={"pmid": ids.get("pmid"), "pmcid": pmcid, "file": path},
    )
