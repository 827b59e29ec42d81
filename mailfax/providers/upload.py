"""Send requests that carry documents without holding them in memory.

Each provider's send request carries its documents whole: as base64 text in a SOAP envelope
(FAX.de) or a JSON body (Retarus), or as the raw bytes of a form part (faxnummer.de). The
serializer (zeep, ``json``, httpx's form encoder) builds the request around a short random
marker in place of each document; :meth:`Upload.body` then gives that text with each marker
replaced by its document, read piece by piece as the body goes out: a large document from
its file (:class:`~mailfax.documents.mapped.DocumentMap`, the pages read dropped again), the
base64 made one piece at a time in a worker thread. So a 30 MB scan is never a 40 MB string,
then an envelope, then a request body in memory.

The body's length is known before it is sent, so it goes with a ``Content-Length`` like any
other request: none of the providers' docs promise to take a chunked one.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
from collections.abc import AsyncIterator, Generator
from dataclasses import dataclass

from mailfax.documents.mapped import DocumentBytes, pieces

# A multiple of 3, so the base64 of consecutive pieces joins without padding between them.
PIECE_BYTES = 3 * 256 * 1024


@dataclass(frozen=True, eq=False)
class _Document:
    """A document in a body: its bytes as they are, or as base64 text."""

    data: DocumentBytes
    as_base64: bool

    def __len__(self) -> int:
        size = len(self.data)
        return 4 * ((size + 2) // 3) if self.as_base64 else size

    def body_pieces(self) -> Generator[bytes, None, None]:
        """The body's bytes for the document, ``PIECE_BYTES`` of it at a time (a mapped one's
        pages dropped as read: :func:`~mailfax.documents.mapped.pieces`). Blocking: advanced
        in a worker thread."""
        for piece in pieces(self.data, PIECE_BYTES):
            yield base64.b64encode(piece) if self.as_base64 else bytes(piece)


class Upload:
    """The documents of one request, each behind the marker that stands for it."""

    def __init__(self) -> None:
        self._documents: dict[bytes, _Document] = {}

    def base64_marker(self, data: DocumentBytes) -> bytes:
        """Bytes to give a serializer that writes them as base64 (zeep's base64Binary): the
        base64 of these stands for the base64 of ``data`` in the text."""
        marker = secrets.token_bytes(24)  # 32 characters of base64, no padding
        self._documents[base64.b64encode(marker)] = _Document(data, as_base64=True)
        return marker

    def base64_text(self, data: DocumentBytes) -> str:
        """Text that stands for the base64 of ``data`` (in a JSON string)."""
        return base64.b64encode(self.base64_marker(data)).decode("ascii")

    def raw_marker(self, data: DocumentBytes) -> bytes:
        """Bytes that stand for ``data`` itself (the content of a form part)."""
        marker = secrets.token_hex(24).encode("ascii")
        self._documents[marker] = _Document(data, as_base64=False)
        return marker

    def body(self, template: bytes) -> DocumentBody:
        """``template`` with each marker replaced by its document. ValueError unless every
        marker is in it exactly once."""
        found = []
        for marker, document in self._documents.items():
            if template.count(marker) != 1:
                raise ValueError("a document's marker is not in the request exactly once")
            found.append((template.index(marker), marker, document))
        parts: list[bytes | _Document] = []
        end = 0
        for start, marker, document in sorted(found, key=lambda item: item[0]):
            parts += [template[end:start], document]
            end = start + len(marker)
        parts.append(template[end:])
        return DocumentBody([part for part in parts if len(part)])


class DocumentBody:
    """A request body (httpx ``content=``) that reads its documents as it is sent. It can be
    sent more than once (httpx's transport retries a failed connection)."""

    def __init__(self, parts: list[bytes | _Document]):
        self._parts = parts

    def __len__(self) -> int:
        return sum(len(part) for part in self._parts)

    @property
    def headers(self) -> dict[str, str]:
        return {"Content-Length": str(len(self))}

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for part in self._parts:
            if isinstance(part, bytes):
                yield part
                continue
            body_pieces = part.body_pieces()
            try:
                while (piece := await asyncio.to_thread(next, body_pieces, None)) is not None:
                    yield piece
            finally:
                body_pieces.close()  # a body cut short: its view of the document released
