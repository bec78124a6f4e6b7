"""Statistics events and the ``stats.json`` report.

Every pipeline stage emits ``(key, value)`` events, ``key = (source, section, name[, field])``; they are
summed per key and assembled here. Sections:
- ``input``: files, records (docs + malformed), docs, raw_chars (characters before cleaning: the dump's
  text for guidelines and replay, title + abstract text for MEDLINE, the XML bytes for JATS papers);
- ``malformed``: records that could not be read (details in ``malformed.jsonl``);
- ``cleaning_chars``: characters removed by each cleaning rule; ``cleaning_items``: elements removed or
  rewritten (reference entries, figures, captions, markers, unresolved citations, ...);
- ``removed``: documents (and their characters) dropped by each filter, in pipeline order;
- ``output``: documents, characters and Llama-2 tokens per split.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

# Cleaning rules that count elements rather than characters.
ITEM_RULES = frozenset(
    {
        "bib_ref_markers",
        "fig_ref_markers",
        "citations_unresolved",
        "figures",
        "tables",
        "captions",
        "formulas",
        "reference_entries",
        "back_sections",
        "supplementary_material",
        "fn_group",
        "ref_list",
        "table",
        "graphic",
        "media",
        "array",
        "chem_struct_wrap",
        "undefined_entities",
    }
)
# Filters in the order the pipeline applies them.
FILTERS = (
    "no_abstract",
    "empty_after_cleaning",
    "too_short",
    "non_english",
    "replay_not_sampled",
    "abstract_has_full_text",
    "exact_duplicate",
    "near_duplicate",
    "contaminated",
)


def cleaning_events(source: str, removed: dict[str, int]) -> Iterable[tuple[tuple, int]]:
    for rule, n in removed.items():
        yield (source, "cleaning_items" if rule in ITEM_RULES else "cleaning_chars", rule), n


def _nest(out: dict, path: tuple, value: int) -> None:
    for p in path[:-1]:
        out = out.setdefault(p, {})
    out[path[-1]] = out.get(path[-1], 0) + value


def assemble(
    counts: Iterable[tuple[tuple, int]],
    *,
    config: dict[str, Any],
    malformed_examples: list[dict],
    removed_examples: list[dict],
    contamination: dict[str, Any] | None,
    sources: Iterable[str],
    count_tokens: bool,
) -> dict[str, Any]:
    per_source: dict[str, Any] = {}
    for src in sources:
        per_source[src] = {
            "input": {"files": 0, "records": 0, "docs": 0, "raw_chars": 0},
            "malformed": 0,
            "cleaning_chars": {},
            "cleaning_items": {},
            "removed": {},
            "output": {},
        }
    for key, value in counts:
        src, section, *rest = key
        node = per_source.setdefault(src, {})
        if not rest:
            node[section] = node.get(section, 0) + value
        else:
            _nest(node.setdefault(section, {}), tuple(rest), value)
    totals: dict[str, Any] = {"malformed": 0, "removed": {}, "output": {}}
    for node in per_source.values():
        node["input"]["records"] = node["input"].get("docs", 0) + node.get("malformed", 0)
        node["removed"] = {f: node["removed"][f] for f in FILTERS if f in node["removed"]}
        totals["malformed"] += node.get("malformed", 0)
        for f, v in node["removed"].items():
            t = totals["removed"].setdefault(f, {"docs": 0, "chars": 0})
            t["docs"] += v.get("docs", 0)
            t["chars"] += v.get("chars", 0)
        for split, v in node["output"].items():
            t = totals["output"].setdefault(split, {"docs": 0, "chars": 0, "tokens": 0})
            for k in t:
                t[k] += v.get(k, 0)
        if not count_tokens:
            for v in node["output"].values():
                v["tokens"] = None
    if not count_tokens:
        for v in totals["output"].values():
            v["tokens"] = None
    return {
        "config": config,
        "sources": per_source,
        "totals": totals,
        "contamination_index": contamination or {},
        "malformed_examples": sorted(malformed_examples, key=lambda m: (m["file"], str(m["position"]))),
        "removed_examples": _group_examples(removed_examples),
    }


def _group_examples(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for row in sorted(rows, key=lambda r: (r["filter"], r["id"])):
        out.setdefault(row["filter"], []).append({k: v for k, v in row.items() if k != "filter"})
    return {f: out[f] for f in FILTERS if f in out}
