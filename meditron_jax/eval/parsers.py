"""Answer extraction: MEDITRON's parser bug for bug, a robust one, and the self-consistency vote.

``meditron`` follows ``eval()`` / ``clean_mcq_answer`` / ``clean_double_answer`` of epfLLM/meditron
``evaluation/evaluate.py`` @ a7c7cda3 (MEDITRON.md §5): the output is lower-cased; text after a
``"\\n##"`` is taken up to its line end; few-shot outputs are cut at the first blank line; every
non-alphanumeric becomes a space; chain of thought keeps the first word after the last "answer is"
(or the output's first word); multiple choice keeps the first character; a valid answer is one of
a-e, yes, no, whatever the benchmark ("maybe" never is). An invalid output's "prediction" is the whole
lower-cased output, which is what the original's vote counts.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

MEDITRON_VALID = ("a", "b", "c", "d", "e", "yes", "no")
PARSERS = ("meditron", "robust")


@dataclass(frozen=True)
class Parsed:
    """``key``: what the vote counts (the answer, or the raw output when unparseable); ``answer``: the
    answer in the gold's spelling (upper-case letter, or yes/no/maybe), None when unparseable."""

    key: str
    answer: str | None


def _gold_spelling(pred: str) -> str:
    return pred.upper() if len(pred) == 1 else pred


def parse_meditron(output: str, *, answer_type: str, shots: int = 0, cot: bool = False) -> Parsed:
    """MEDITRON's ``eval()``. answer_type: "mcq" or "boolean" (PubMedQA)."""
    full = output.lower()  # accuracy_metric lower-cases before eval()
    text = full
    if "\n##" in text:
        text = text.split("\n##")[1].split("\n")[0].strip().lower()
    if shots > 0:
        text = text.split("\n\n")[0].strip()
    text = re.sub(r"[^a-zA-Z0-9]", " ", text).strip()
    text = re.sub(" +", " ", text)
    if cot:
        words = text.split("answer is")[-1].split()
        if not words:
            return Parsed(full, None)
        text = words[0]
    if answer_type == "boolean":
        for double, single in (("yesyes", "yes"), ("nono", "no"), ("yesno", "yes"), ("noyes", "no")):
            if double in text:  # an if/elif chain in the original: only the first match is replaced
                text = text.replace(double, single)
                break
    elif answer_type == "mcq":
        text = text[:1]
    text = text.encode("ascii", "ignore").decode("ascii")
    if text in MEDITRON_VALID:
        return Parsed(text, _gold_spelling(text))
    return Parsed(full, None)


_LABELS = ("yes", "no", "maybe")


def _answer_segment(output: str, *, shots: int, cot: bool) -> str:
    text = output.strip()
    if shots > 0:  # the model runs on into the next exemplar after a blank line
        text = text.split("\n\n")[0]
    # Prefer the text after the last "answer is" / "answer:" when present (CoT, or a chatty answer).
    marks = list(re.finditer(r"answer\s*(?:is|:)\s*:?", text, flags=re.IGNORECASE))
    if marks:
        return text[marks[-1].end() :].strip()
    if cot:
        # No conclusion marker: look at the last line, where a chain of thought ends.
        lines = [ln for ln in text.splitlines() if ln.strip()]
        return lines[-1].strip() if lines else ""
    return text


def parse_robust(output: str, *, options: Mapping[str, str] | None, shots: int = 0, cot: bool = False) -> Parsed:
    """Yes/no/maybe, "(B)", "B.", "B)", "Answer: B", "answer is B", a bare "B", or the option's text.

    ``options``: letter -> text of a multiple-choice item; empty/None for PubMedQA (yes/no/maybe).
    """
    raw = output.lower()
    seg = _answer_segment(output, shots=shots, cot=cot)
    if not options:
        m = re.search(r"\b(yes|no|maybe)\b", seg, flags=re.IGNORECASE)
        return Parsed(m.group(1).lower(), m.group(1).lower()) if m else Parsed(raw, None)
    letters = "".join(sorted(options))
    patterns = (
        rf"^\(?([{letters}])\)?(?:[\s.,:;)\]]|$)",  # "B", "B.", "(B)", "B) text" at the start
        rf"\(([{letters}])\)",  # "(B)" anywhere
        rf"\b(?:option|choice)\s+([{letters}])\b",
        rf"(?:^|\s)([{letters}])[.)](?:\s|$)",  # "... B. text" / "B)" mid-text
    )
    article = re.match(r"^a\s+(?!is\b|was\b)[a-z]", seg, flags=re.IGNORECASE) is not None  # "A patient ..."
    for i, pat in enumerate(patterns):
        if i == 0 and article:
            continue
        m = re.search(pat, seg, flags=re.IGNORECASE)
        if m:
            return Parsed(m.group(1).lower(), m.group(1).upper())
    # The option's text: the whole answer, or (for texts of 4+ characters, so "I" or "c" never match by
    # accident) a whole-word occurrence; only when exactly one option matches, longer texts winning.
    low = seg.lower().strip().rstrip(".")
    exact = [k for k, v in options.items() if str(v).strip().lower().rstrip(".") == low]
    if len(exact) == 1:
        return Parsed(exact[0].lower(), exact[0])
    hits = [
        k
        for k, v in options.items()
        if len(str(v).strip()) >= 4 and re.search(rf"(?<!\w){re.escape(str(v).strip().lower())}(?!\w)", low)
    ]
    if len(hits) > 1:  # drop options contained in a longer hit ("cancer" inside "lung cancer")
        hits = [k for k in hits if not any(k != j and str(options[k]).lower() in str(options[j]).lower() for j in hits)]
    if len(hits) == 1:
        return Parsed(hits[0].lower(), hits[0])
    return Parsed(raw, None)


def parse(
    parser: str,
    output: str,
    *,
    options: Mapping[str, str] | None,
    shots: int = 0,
    cot: bool = False,
) -> Parsed:
    if parser == "meditron":
        return parse_meditron(output, answer_type="mcq" if options else "boolean", shots=shots, cot=cot)
    if parser == "robust":
        return parse_robust(output, options=options, shots=shots, cot=cot)
    raise ValueError(f"unknown parser {parser!r}; expected one of {PARSERS}")


def vote(parsed: Sequence[Parsed]) -> Parsed:
    """MEDITRON's self-consistency vote: ``Counter(keys).most_common(1)``. Unparseable branches vote with
    their raw output; a tie goes to the key seen first (Counter keeps insertion order and max() keeps
    the first maximum)."""
    if not parsed:
        raise ValueError("vote() needs at least one branch")
    key = Counter(p.key for p in parsed).most_common(1)[0][0]
    return next(p for p in parsed if p.key == key)
