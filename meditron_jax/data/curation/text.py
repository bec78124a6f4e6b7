"""Text helpers shared by the cleaners, dedup and contamination: URLs, whitespace, word tokens, language."""

from __future__ import annotations

import re
import unicodedata
from collections import Counter

# Scheme URLs and bare www. hosts; MEDITRON dropped URLs from all three medical sources (MEDITRON.md §2).
# Each pattern starts with a literal so the regex engine can skip ahead (10 MB of CDC text per pass).
_URL_TAIL = r"[^\s<>\"'\])]*[^\s<>\"'\]).,;:!?]"
URL_RES = tuple(re.compile(p + _URL_TAIL) for p in (r"https?://", r"ftp://", r"www\.", r"HTTPS?://"))
_EMAIL_LOCAL_RE = re.compile(r"[\w.+-]{1,64}$")
_EMAIL_DOMAIN_RE = re.compile(r"[\w-]+(?:\.[\w-]+)+")
HTML_TAG_RE = re.compile(r"</?[a-zA-Z][a-zA-Z0-9]*(?:\s[^<>]*)?/?>")
# Numeric bracket citations such as [1], [2, 3], [4-7]; other bracketed text is kept (unlike MEDITRON,
# which dropped every [...] span and so also lost things like "[95% CI]").
NUMERIC_BRACKET_REF_RE = re.compile(r"\[\d+(?:\s*[-–,]\s*\d+)*\]")
_WORD_RE = re.compile(r"\w+", re.UNICODE)


def sub_counted(pattern: re.Pattern, repl: str, text: str, removed: Counter, rule: str) -> str:
    """``pattern.sub`` that adds the number of characters it removed to ``removed[rule]``."""
    out, n = pattern.subn(repl, text)
    if n:
        removed[rule] += max(0, len(text) - len(out))
    return out


def remove_urls(text: str, removed: Counter, rule: str = "urls") -> str:
    for pat in URL_RES:
        text = sub_counted(pat, "", text, removed, rule)
    return text


def remove_emails(text: str, removed: Counter, rule: str = "urls") -> str:
    # Anchored on "@" (a literal scan) instead of a regex that would restart at every word character.
    out, pos, at = [], 0, text.find("@")
    while at != -1:
        local = _EMAIL_LOCAL_RE.search(text, max(pos, at - 64), at)
        dom = _EMAIL_DOMAIN_RE.match(text, at + 1)
        if local and dom:
            out.append(text[pos : local.start()])
            removed[rule] += dom.end() - local.start()
            pos = dom.end()
        at = text.find("@", max(at + 1, pos))
    out.append(text[pos:])
    return "".join(out)


def remove_spans(text: str, pattern: re.Pattern, removed: Counter, rule: str) -> str:
    """Delete matches and one space before each, so "word [1]." becomes "word."."""
    out, pos = [], 0
    for m in pattern.finditer(text):
        start = m.start() - 1 if m.start() > pos and text[m.start() - 1] == " " else m.start()
        out.append(text[pos:start])
        removed[rule] += m.end() - start
        pos = m.end()
    out.append(text[pos:])
    return "".join(out)


def normalize_spaces(text: str) -> str:
    """NFC, unify line ends, collapse runs of horizontal space, strip each line, keep single blank lines."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n").replace("\u200b", "")
    out: list[str] = []
    for line in text.split("\n"):
        line = " ".join(line.split())  # str.split() also splits on NBSP and the other Unicode spaces
        if line or (out and out[-1]):
            out.append(line)
    return "\n".join(out).strip()


def words(text: str) -> list[str]:
    """Lower-cased word tokens with punctuation dropped: the unit of dedup shingles and contamination n-grams."""
    return _WORD_RE.findall(text.lower())


# The most frequent English function words. A share of them among the first 10,000 characters is our
# dependency-free stand-in for MEDITRON's langdetect "en" check (MEDITRON.md §2: first 10,000 characters).
_ENGLISH_STOPWORDS = frozenset(
    "the of and to in a is that for it as was with be by on not he i this are or his from at which but have "
    "an they you were her she there their been has one we all would will more when who if no can its may "
    "these other than into some only also after should between during such most both each these those".split()
)


def english_score(text: str, sample_chars: int = 10_000) -> float:
    """Fraction of alphabetic tokens that are common English function words (about 0.3-0.5 for English)."""
    toks = [w for w in words(text[:sample_chars]) if w.isalpha()]
    if not toks:
        return 0.0
    return sum(w in _ENGLISH_STOPWORDS for w in toks) / len(toks)
