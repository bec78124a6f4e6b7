"""Clinical guidelines: read scraped JSON/JSONL dumps, strip navigation and boilerplate, keep headings.

Rules (MEDITRON.md §2, "Guidelines"): drop URLs, HTML, bracket references, figures, table rows and the
boilerplate before the first real section and after "References" / "Acknowledgments" / "Disclaimer";
bullets become "- ", markdown headers are normalised to "#".."###"; lines with no letters are dropped.
Site-specific boilerplate lives in a ``Profile`` (MEDITRON had one function per site); ``cdc`` covers the
CDC MMWR pages of the sample, ``generic`` is used for any other source. Two deviations: only numeric bracket
citations are removed (MEDITRON removed every ``[...]``), and the English check is ``text.english_score``.

Accepted dump layouts (as scraped collections are shipped, optionally inside .zip or .gz):
- ``.json``: a dict ``{url_or_id: text}`` (e.g. harvest-cdc-journals), a dict ``{id: {...record...}}``, or a
  list of records;
- ``.jsonl``: one record per line.
A record is a dict with the text in ``text`` / ``raw_text`` / ``content`` / ``clean_text`` (``content`` may
be a dict of ``{section title: text}``), and optionally ``id``, ``url``, ``title``, ``source``.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import re
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any, cast

from . import text as T
from .records import Doc, Malformed

SOURCE = "guidelines"
TEXT_FIELDS = ("text", "raw_text", "content", "clean_text")


@dataclasses.dataclass(frozen=True)
class Profile:
    """Site boilerplate. ``head``: cut up to the end of the furthest match in the first ``head_window`` chars.
    ``tail``: (rule, pattern or finder) cut from the earliest match past ``min_tail_fraction`` of the text.
    ``drop`` / ``drop_literals``: spans removed wherever they occur."""

    name: str
    head: tuple[re.Pattern, ...] = ()
    tail: tuple[tuple[str, re.Pattern | Callable[[str, int], int | None]], ...] = ()
    drop: tuple[re.Pattern, ...] = ()
    drop_literals: tuple[str, ...] = ()
    head_window: int = 4000
    min_tail_fraction: float = 0.2


def _heading_line(words: str) -> re.Pattern:
    # A stand-alone heading line such as "References" or "## Acknowledgements".
    return re.compile(rf"(?im)^[#* ]*(?:{words})[ :]*$")


_GENERIC_TAIL = (
    ("reference_list", _heading_line(r"references|bibliography|reference list|literature cited")),
    ("boilerplate_tail", _heading_line(r"acknowledge?ments?|disclaimers?")),
)

GENERIC = Profile("generic", tail=_GENERIC_TAIL)

_REF_BEFORE = re.compile(r"(?:[.?!)\]\d:]\s|\n|Top|^|\n[IVX]+\.\s)$")
_REF_AFTER = re.compile(r"\s*(?:\d+\.\s*)?[A-Z]")


def _mmwr_references(text: str, floor: int) -> int | None:
    """Start of an MMWR reference list: "... sentence. References Smith J, ..." or "TopReferences ...",
    but not the disclaimer "References to non-CDC sites" nor "Source: References 15 and 20"."""
    pos = text.find("References", floor)
    while pos != -1:
        if (
            _REF_BEFORE.search(text, max(0, pos - 6), pos)
            and _REF_AFTER.match(text, pos + 10)
            and not text.startswith(" to non-", pos + 10)
        ):
            return pos
        pos = text.find("References", pos + 10)
    return None


CDC = Profile(
    "cdc",
    head=(
        re.compile(
            r"Persons using assistive technology might not be able to fully access information in this "
            r"file\..{0,300}?subject line of e-mail\.",
            re.S,
        ),
        re.compile(r"Skip directly to (?:search|site content|page options|A[- ]to[- ]Z (?:list|link)|A-Z link)"),
        re.compile(r"Saving Lives,? Protecting People\.?™?"),
        re.compile(r"Morbidity and Mortality Weekly Report \(MMWR\)(?: Section Navigation| MMWR ShareCompartir)?"),
        re.compile(r"CDC Home Facebook\s+Twitter\s+LinkedIn\s+Syndicate"),
    ),
    tail=(
        ("reference_list", _mmwr_references),
        ("boilerplate_tail", re.compile(r"(?m)^(?:Top\s*)?(?:Acknowledge?ments?|Conflicts? of Interest)\s*$")),
        ("boilerplate_tail", re.compile(r"Top ?Acknowledge?ments?\b")),
        (
            "boilerplate_tail",
            re.compile(
                r"Disclaimer All MMWR HTML documents|Use of trade names and commercial "
                r"sources is for identification only|All MMWR HTML versions of articles|"
                r"References to non-CDC sites on the Internet"
            ),
        ),
        *_GENERIC_TAIL,
    ),
    drop=(
        # Title block of the newer pages: issue line, authors, affiliations link, metrics, table of contents.
        re.compile(
            r"Supplements / [^\n/]{3,40} / .{0,4000}?Related Materials(?:pdf icon ?\[PDF\]|PDF pdf icon"
            r"\[\d+K\]|Article PDFFull Issue PDF|pdf icon)?",
            re.S,
        ),
        re.compile(r"Corresponding author:[^\n]{0,400}?(?:E-?mail:\s*\S+|(?=\n))"),
        re.compile(r"(?m)^Top\d[^\n]*"),  # "Top1Division of ..., CDC; 2Division ...": affiliations
        re.compile(r"(?m)^Top(?=\s|[A-Z]|$)"),
        re.compile(r"(?m)(?<= )Top$"),
    ),
    drop_literals=(
        "(View author affiliations)",
        "View suggested citation",
        "Article Metrics",
        "Altmetric:",
        "Metric Details",
        "PubMedexternal icon",
        "external icon",
        "pdf icon",
        "Print Related Pages",
        "Related Pages",
    ),
)

PROFILES = {"generic": GENERIC, "cdc": CDC}


def profile_for(path: str, record_source: str | None = None) -> Profile:
    """``guidelines_cdc/...`` or a record whose ``source`` is ``cdc`` get the CDC profile."""
    if record_source and record_source.lower() in PROFILES:
        return PROFILES[record_source.lower()]
    m = re.search(r"guidelines[_-]([a-z0-9]+)", path.lower())
    return PROFILES.get(m.group(1), GENERIC) if m else GENERIC


# ---------------------------------------------------------------- cleaning

_MD_LINK_RE = re.compile(r"!?\[([^\]\n]*)\]\([^)\s]*\)")
_INLINE_BULLETS = "•●▪■◆◦"
_NUMERIC_TOKEN_RE = re.compile(r"(?:^|(?<= ))(?:[\d.,%()\-–—<>±/*†‡§¶]+|NA|N/A|—|Ref\.?)(?= |$)")
_BULLET_RE = re.compile(r"^(?:[•●▪■◆◦□\-–*+]|o|q)\s+(?=\S)")
_NUMBERED_RE = re.compile(r"^\d{1,3}[.)]\s")
_MD_HEADING_RE = re.compile(r"^(#+)\s*(.*?)\s*#*$")
_CAPTION_RE = re.compile(r"^(?:TABLE|FIGURE|BOX|Table|Figure|Box|Fig\.)\s*[A-Z]?\d+[A-Za-z]?\s*[.:—–-]")
_SENT_END = tuple(".:;!?")
SECTION_NAMES = frozenset(
    "abstract summary introduction background methods materials and methods results discussion conclusion "
    "conclusions recommendations limitations overview purpose scope definitions treatment diagnosis "
    "prevention management".split()
) | {"materials and methods", "key recommendations", "future directions"}


def _is_short(line: str) -> bool:
    return len(line.split()) <= 3 and not line.endswith(_SENT_END) and not line.startswith(("- ", "#"))


def _table_row(line: str) -> bool:
    n = line.count(" ") + 1
    return n >= 3 and len(_NUMERIC_TOKEN_RE.findall(line)) * 2 >= n


def _cut_head(text: str, prof: Profile, removed: Counter) -> str:
    end = 0
    window = text[: prof.head_window]
    for pat in prof.head:
        for m in pat.finditer(window):
            end = max(end, m.end())
    if end:
        removed["boilerplate_head"] += end
    return text[end:]


def _cut_tail(text: str, prof: Profile, removed: Counter) -> str:
    floor = int(len(text) * prof.min_tail_fraction)
    best: tuple[int, str] | None = None
    for rule, finder in prof.tail:
        if isinstance(finder, re.Pattern):
            m = finder.search(text, floor)
            start = m.start() if m else None
        else:
            start = finder(text, floor)
        if start is not None and (best is None or start < best[0]):
            best = (start, rule)
    if best is None:
        return text
    removed[best[1]] += len(text) - best[0]
    return text[: best[0]]


def _normalize_headings(lines: list[str]) -> list[str]:
    # Markdown headings shifted so the shallowest is "#", capped at "###" (MEDITRON normalize_sections).
    levels = [len(m.group(1)) for line in lines if (m := _MD_HEADING_RE.match(line)) and m.group(2)]
    shift = min(levels) - 1 if levels else 0
    out = []
    for line in lines:
        m = _MD_HEADING_RE.match(line)
        if m and m.group(2):
            line = "#" * min(3, len(m.group(1)) - shift) + " " + m.group(2)
        elif line.lower().rstrip(":") in SECTION_NAMES:
            line = "# " + line.rstrip(":")
        out.append(line)
    return out


def _line_filters(lines: list[str], removed: Counter) -> list[str]:
    keep = [True] * len(lines)
    for i, line in enumerate(lines):
        if not re.search(r"[^\W\d_]", line):
            keep[i] = False
            removed["no_letter_lines"] += len(line)
        elif line.count("|") >= 2 and all(len(s.split()) <= 4 for s in line.split("|")):
            keep[i] = False
            removed["navigation"] += len(line)
        elif _CAPTION_RE.match(line) or _table_row(line):
            keep[i] = False
            removed["tables_figures"] += len(line)
    # Menus: runs of 4+ short non-sentence lines (Facebook / Twitter / LinkedIn, A-Z indexes, ...).
    i = 0
    while i < len(lines):
        j = i
        while j < len(lines) and (not keep[j] or _is_short(lines[j])):
            j += 1
        if sum(keep[i:j]) >= 4:
            for k in range(i, j):
                if keep[k]:
                    keep[k] = False
                    removed["navigation"] += len(lines[k])
        i = max(j, i + 1)
    return [line for line, k in zip(lines, keep, strict=True) if k]


def _unwrap(lines: list[str]) -> list[str]:
    # Hard-wrapped plain text (older pages wrap at ~65 columns): join a line with the next when the next
    # starts in lower case, i.e. continues the sentence.
    out: list[str] = []
    for line in lines:
        if (
            out
            and line
            and (line[0].islower() or line[0] in ",;)")
            and not out[-1].startswith("#")
            and not out[-1].endswith(_SENT_END)
        ):
            out[-1] = out[-1] + " " + line
        else:
            out.append(line)
    return out


def clean_guideline(text: str, profile: Profile = GENERIC) -> tuple[str, Counter]:
    """Clean one guideline text; returns the text and ``removed`` (rule -> characters removed)."""
    removed: Counter = Counter()
    text = T.normalize_spaces(text)
    text = T.sub_counted(T.HTML_TAG_RE, " ", text, removed, "html")
    text = _MD_LINK_RE.sub(r"\1", text)
    text = _cut_head(text, profile, removed)
    for pat in profile.drop:
        text = T.sub_counted(pat, " ", text, removed, "boilerplate_inline")
    for lit in profile.drop_literals:
        if lit in text:
            removed["boilerplate_inline"] += text.count(lit) * len(lit)
            text = text.replace(lit, " ")
    text = _cut_tail(text, profile, removed)
    text = T.remove_urls(text, removed)
    text = T.remove_emails(text, removed)
    text = T.remove_spans(text, T.NUMERIC_BRACKET_REF_RE, removed, "bracket_refs")
    for b in _INLINE_BULLETS:
        if b in text:
            text = text.replace(f" {b} ", "\n- ")
    text = T.normalize_spaces(text)
    lines = [_BULLET_RE.sub("- ", line) for line in text.split("\n") if line]
    lines = _normalize_headings(lines)
    lines = _unwrap(_line_filters(lines, removed))
    # One line per paragraph, a blank line before each heading (MEDITRON normalize_newlines).
    return re.sub(r"\n(#+ )", r"\n\n\1", "\n".join(lines)).strip(), removed


# ---------------------------------------------------------------- reading


def _record_text(rec: Any) -> tuple[str | None, dict]:
    if isinstance(rec, str):
        return rec, {}
    if not isinstance(rec, dict):
        return None, {}
    for field in TEXT_FIELDS:
        val = rec.get(field)
        if isinstance(val, dict):  # {section title: text}, as some scrapers emit
            val = "\n\n".join(f"# {k}\n{v}" for k, v in val.items() if isinstance(v, str))
        if isinstance(val, str) and val.strip():
            return val, rec
    return None, rec


def _make_doc(path: str, key: str, rec: Any) -> Doc | Malformed:
    text, meta = _record_text(rec)
    if text is None:
        return Malformed(SOURCE, path, {"record": key}, f"no text field (expected one of {TEXT_FIELDS})")
    prof = profile_for(path, meta.get("source") if isinstance(meta.get("source"), str) else None)
    raw_chars = len(text)
    title = meta.get("title") if isinstance(meta.get("title"), str) else None
    if title and not text.lstrip().startswith(title.strip()):
        text = f"# {title.strip()}\n{text}"
    cleaned, removed = clean_guideline(text, prof)
    ident = str(meta.get("id") or meta.get("url") or key)
    return Doc(
        id=f"{SOURCE}:{prof.name}:{ident}",
        source=SOURCE,
        text=cleaned,
        raw_chars=raw_chars,
        removed=dict(removed),
        meta={"file": path},
    )


def _read_json(path: str, data: bytes) -> Iterator[Doc | Malformed]:
    try:
        obj = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        pos = (
            {"line": e.lineno, "column": e.colno, "char_offset": e.pos}
            if isinstance(e, json.JSONDecodeError)
            else {"byte_offset": e.start}
        )
        yield Malformed(SOURCE, path, pos, f"invalid JSON: {e}")
        return
    items: Iterable[tuple[Any, Any]]
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, list):
        items = ((str(i), rec) for i, rec in enumerate(obj))
    else:
        yield Malformed(SOURCE, path, {"record": 0}, f"top-level JSON {type(obj).__name__} is not a dict or list")
        return
    for key, rec in items:
        yield _make_doc(path, key, rec)


def _read_jsonl(path: str, fh: IO[bytes]) -> Iterator[Doc | Malformed]:
    offset = 0
    for lineno, raw in enumerate(fh, 1):
        start, offset = offset, offset + len(raw)
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            yield Malformed(SOURCE, path, {"line": lineno, "byte_offset": start}, f"invalid JSON line: {e}")
            continue
        doc = _make_doc(path, f"line{lineno}", rec)
        if isinstance(doc, Malformed):
            doc.position = {"line": lineno, "byte_offset": start}
        yield doc


def read_guidelines(path: str, fh: IO[bytes]) -> Iterator[Doc | Malformed]:
    """Yield cleaned guideline ``Doc`` s (and ``Malformed`` reports) from one dump file."""
    name = path.lower()
    if name.endswith(".zip"):
        try:
            zf = zipfile.ZipFile(fh if fh.seekable() else io.BytesIO(fh.read()))
        except zipfile.BadZipFile as e:
            yield Malformed(SOURCE, path, {"byte_offset": 0}, f"bad zip: {e}")
            return
        for member in zf.namelist():
            if member.endswith("/") or not member.lower().endswith((".json", ".jsonl", ".json.gz", ".jsonl.gz")):
                continue
            with zf.open(member) as inner:
                yield from read_guidelines(f"{path}!{member}", inner)
        return
    if name.endswith(".gz"):
        fh, name = cast(IO[bytes], gzip.GzipFile(fileobj=fh)), name[:-3]
    try:
        if name.endswith(".jsonl"):
            yield from _read_jsonl(path, fh)
        else:
            yield from _read_json(path, fh.read())
    except (OSError, EOFError, zipfile.BadZipFile) as e:  # truncated gzip / zip member
        yield Malformed(SOURCE, path, {"byte_offset": None}, f"unreadable compressed stream: {e}")
