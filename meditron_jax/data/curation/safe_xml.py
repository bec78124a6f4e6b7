"""XML parsing for untrusted dumps: no DTD entity declarations, no external entities, no network.

Raw MEDLINE/PMC dumps come from outside, so the parser must not resolve external entities (XXE: local files,
URLs) nor expand nested entity definitions (billion laughs / quadratic blow-up). We drive expat directly
(the stdlib parser under ``xml.etree``) and build an ``ElementTree`` ourselves:

- any ``<!ENTITY ...>`` declaration, general or parameter, internal or external, raises ``UnsafeXMLError``
  at the declaration, before anything is expanded (same policy as defusedxml's ``forbid_entities``);
- parameter-entity parsing is off, so an external DTD named in ``<!DOCTYPE ... "x.dtd">`` is never read;
  a plain DOCTYPE (every MEDLINE and JATS file has one) is allowed;
- references to entities the document does not declare (they would live in the unread external DTD) are
  skipped and counted in ``skipped_entities``; without a DOCTYPE they are a syntax error, as XML requires.

No namespace processing: prefixed names stay literal (``xlink:href``, ``mml:math``), which is what the
JATS renderer matches on.
"""

from __future__ import annotations

import xml.parsers.expat as expat
from xml.etree.ElementTree import Element, TreeBuilder


class XMLError(ValueError):
    """Malformed or unsafe XML, with the position expat reached (1-based line, 0-based column, byte offset)."""

    def __init__(
        self, message: str, line: int | None = None, column: int | None = None, byte_offset: int | None = None
    ):
        super().__init__(message)
        self.line, self.column, self.byte_offset = line, column, byte_offset

    def position(self) -> dict[str, int]:
        return {
            k: v
            for k, v in (("line", self.line), ("column", self.column), ("byte_offset", self.byte_offset))
            if v is not None and v >= 0
        }


class UnsafeXMLError(XMLError):
    """The document declares entities: rejected before any expansion."""


class _Guard:
    def __init__(self, parser):
        self.parser = parser
        self.skipped_entities = 0

    def _where(self):
        p = self.parser
        return p.CurrentLineNumber, p.CurrentColumnNumber, p.CurrentByteIndex

    def entity_decl(self, name, is_parameter_entity, value, base, system_id, public_id, notation_name):
        kind = "external" if system_id or public_id else "internal"
        raise UnsafeXMLError(
            f"{kind} entity declaration <!ENTITY {'% ' if is_parameter_entity else ''}{name}> is not allowed",
            *self._where(),
        )

    def unparsed_entity_decl(self, name, base, system_id, public_id, notation_name):
        raise UnsafeXMLError(f"unparsed entity declaration {name!r} is not allowed", *self._where())

    def external_entity_ref(self, context, base, system_id, public_id):
        raise UnsafeXMLError(f"external entity reference {system_id or public_id!r} is not allowed", *self._where())

    def skipped_entity(self, name, is_parameter_entity):
        self.skipped_entities += 1


def parse(data: bytes | str) -> tuple[Element, int]:
    """Parse one XML document; returns ``(root, skipped_entities)``. Raises ``XMLError``/``UnsafeXMLError``."""
    builder = TreeBuilder()
    parser = expat.ParserCreate()
    guard = _Guard(parser)
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    parser.EntityDeclHandler = guard.entity_decl
    parser.UnparsedEntityDeclHandler = guard.unparsed_entity_decl
    parser.ExternalEntityRefHandler = guard.external_entity_ref
    parser.SkippedEntityHandler = guard.skipped_entity
    parser.StartElementHandler = builder.start
    parser.EndElementHandler = builder.end
    parser.CharacterDataHandler = builder.data
    parser.buffer_text = True
    try:
        parser.Parse(data, True)
        root = builder.close()
    except UnsafeXMLError:
        raise
    except expat.ExpatError as e:
        raise XMLError(
            f"XML syntax error: {expat.ErrorString(e.code)}", e.lineno, e.offset, parser.CurrentByteIndex
        ) from None
    except (AssertionError, IndexError) as e:  # TreeBuilder on an empty/unbalanced document
        raise XMLError(f"XML structure error: {e or type(e).__name__}") from None
    return root, guard.skipped_entities


def text_of(elem: Element | None) -> str:
    """All character data under ``elem``, whitespace-collapsed."""
    if elem is None:
        return ""
    return " ".join("".join(elem.itertext()).split())
