"""Send requests that read their documents as they go out (providers/upload.py): the body is
the serializer's text with each marker replaced by its document, of the length announced,
sent again the same; and the emulators, following the docs' silence, take no chunked body.
The adapters' own sends of a large document in its file are in test_faxde, test_faxnummer
and test_retarus."""

from __future__ import annotations

import base64
import random
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailfax.documents.mapped import DocumentBytes, document_file
from mailfax.emulators import emulator_module
from mailfax.providers import upload as upload_module
from mailfax.providers.upload import DocumentBody, Upload


async def joined(body: DocumentBody) -> bytes:
    return b"".join([piece async for piece in body])


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(0, 400), min_size=1, max_size=3),
       base64_each=st.lists(st.booleans(), min_size=3, max_size=3),
       piece=st.integers(1, 40).map(lambda n: n * 3), in_file=st.booleans())
async def test_a_body_is_the_text_with_each_document_in_its_place(
        sizes: list[int], base64_each: list[bool], piece: int, in_file: bool) -> None:
    generator = random.Random(sum(sizes) + piece)
    documents = [generator.randbytes(size) for size in sizes]
    with tempfile.TemporaryDirectory() as folder, pytest.MonkeyPatch.context() as patch:
        patch.setattr(upload_module, "PIECE_BYTES", piece)  # pieces split the documents
        stored: list[DocumentBytes] = [
            document_file(Path(folder), [data]) if in_file and data else data
            for data in documents]
        upload = Upload()
        template = b"<request>"
        expected = template
        for data, original, as_base64 in zip(stored, documents, base64_each, strict=False):
            marker = upload.base64_text(data).encode() if as_base64 else upload.raw_marker(data)
            text = base64.b64encode(original) if as_base64 else original
            template += b"<file>" + marker + b"</file>"
            expected += b"<file>" + text + b"</file>"
        body = upload.body(template + b"</request>")
        sent = await joined(body)
        assert sent == expected + b"</request>"  # each document whole, in its place
        assert len(body) == len(sent) and body.headers == {"Content-Length": str(len(sent))}
        assert await joined(body) == sent  # sent again (a retried connection): the same


def test_a_marker_missing_from_the_text_or_there_twice_is_refused() -> None:
    upload = Upload()
    marker = upload.raw_marker(b"data")
    with pytest.raises(ValueError, match="exactly once"):
        upload.body(b"no marker here")
    with pytest.raises(ValueError, match="exactly once"):
        upload.body(marker + b" and " + marker)


async def test_zeep_writes_a_base64_marker_as_the_text_that_stands_for_the_document() -> None:
    """FAX.de's SendFileN: zeep writes the bytes it is given as base64; that text is what
    the transport finds in the envelope."""
    from zeep.xsd.types.builtins import Base64Binary

    upload = Upload()
    marker = upload.base64_marker(b"%PDF-1.4 document")
    written = Base64Binary().xmlvalue(marker)
    body = upload.body(b"<SendFile1>" + written + b"</SendFile1>")
    assert await joined(body) == \
        b"<SendFile1>" + base64.b64encode(b"%PDF-1.4 document") + b"</SendFile1>"


def send_endpoint(name: str, emulator: Any) -> str:
    """Where each emulator takes a send."""
    if name == "fax.de":
        return str(emulator.soap_url)
    if name == "retarus":
        return f"{emulator.send_url}/{emulator.customer}/fax"
    return str(emulator.url)


@pytest.fixture(params=["fax.de", "faxnummer.de", "retarus"])
async def endpoint(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    emulator = await emulator_module(request.param).start("127.0.0.1", 0, {})
    try:
        yield send_endpoint(request.param, emulator)
    finally:
        await emulator.close()


async def test_an_emulator_refuses_a_chunked_body_with_411(endpoint: str) -> None:
    """None of the providers' docs says a chunked request body is taken; the emulators read
    that silence pessimistically, so a client that sent one would be seen to fail."""

    async def chunks() -> AsyncIterator[bytes]:
        yield b"sCommand=SendFax"

    async with httpx.AsyncClient() as client:
        response = await client.post(endpoint, content=chunks())
        assert response.request.headers["Transfer-Encoding"] == "chunked"
        assert response.status_code == 411
        # the same body with its length is refused for what it says, if at all, not its form
        sized = await client.post(endpoint, content=b"sCommand=SendFax")
        assert sized.status_code != 411
