"""The two things every reader yields: a parsed document, or a malformed-record report with its position."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class Doc:
    """One document. ``removed`` counts what cleaning took out (rule -> chars or items), for the stats."""

    id: str
    source: str
    text: str
    raw_chars: int = 0
    removed: dict[str, int] = dataclasses.field(default_factory=dict)
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    def output(self) -> dict[str, str]:
        return {"id": self.id, "source": self.source, "text": self.text}


@dataclasses.dataclass
class Malformed:
    """A record that could not be read. ``position`` holds line / record index / byte offset as known."""

    source: str
    file: str
    position: dict[str, Any]
    error: str

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
