"""Untrusted XML (provider answers and pushes, WSDLs): refused when it declares a DOCTYPE or
entities, as defusedxml does, so no entity-expansion bomb and no external entity can reach a
parser. expat reads the declared encoding itself, so no byte-level trick hides a declaration."""

from __future__ import annotations

from typing import Any
from xml.parsers import expat


class UnsafeXML(ValueError):
    """XML that is malformed or declares a DOCTYPE or entities."""


def refuse_dtd(data: bytes | str) -> None:
    def refuse(*_: Any) -> None:
        raise UnsafeXML("XML with a DOCTYPE or entity declaration")

    parser = expat.ParserCreate()
    parser.StartDoctypeDeclHandler = refuse
    parser.EntityDeclHandler = refuse
    parser.UnparsedEntityDeclHandler = refuse
    parser.ExternalEntityRefHandler = refuse  # type: ignore[assignment]
    try:
        parser.Parse(data, True)
    except expat.ExpatError as error:
        raise UnsafeXML(f"malformed XML: {error}") from None
