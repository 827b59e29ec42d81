"""Received faxes become searchable: a text layer from OCRmyPDF, its first lines in the mail,
and a fax whose OCR fails or runs out of time is mailed all the same."""

from __future__ import annotations

import email
import email.policy
import io
from datetime import UTC, datetime
from pathlib import Path

import pypdf
import pytest

from mailfax.app import inbound_mailer
from mailfax.inbound import ocr
from mailfax.inbound.mailer import prepare_files
from mailfax.inbound.poller import with_text_layer
from mailfax.store.base import InboundRecord
from tests.conftest import make_settings

needs_ocr = pytest.mark.skipif(not ocr.ocr_available(), reason="OCRmyPDF/Tesseract not installed")


def _record() -> InboundRecord:
    return InboundRecord(account="main", fax_id="90001", fetched_at=datetime.now(UTC),
                         called_number="+49301234567",
                         received_at=datetime(2026, 11, 24, 9, 32, tzinfo=UTC),
                         originator="+4940555123", remote_id="MUSTER GMBH", pages=1,
                         state="received", deliveries=0)


@needs_ocr
async def test_a_received_fax_gets_a_text_layer_and_its_first_lines_in_the_mail(
        tmp_path: Path, corpus: Path) -> None:
    settings = make_settings(tmp_path, inbound={"ocr": "on"})
    image = (corpus / "fax-tiff" / "fax2d.tif").read_bytes()
    files = await with_text_layer(prepare_files(image), settings.inbound)
    assert files.pdf is not None and not files.ocr_note
    text = pypdf.PdfReader(io.BytesIO(files.pdf)).pages[0].extract_text()
    assert "BACKUP" in text.upper()  # the corpus fax is a man page of backup(1)
    assert files.text_lines
    message = inbound_mailer(settings).compose(_record(), files, image, ["sales@example.org"])
    parsed = email.message_from_bytes(message.as_bytes(), policy=email.policy.default)
    body = parsed.get_body(("plain",))
    assert body is not None and "It begins:" in body.get_content()


@needs_ocr
async def test_an_ocr_timeout_still_mails_the_fax_with_a_note(tmp_path: Path,
                                                              corpus: Path) -> None:
    settings = make_settings(tmp_path, inbound={"ocr": "on", "ocr_seconds_per_page": 0.01})
    image = (corpus / "fax-tiff" / "fax2d.tif").read_bytes()
    plain = prepare_files(image)
    files = await with_text_layer(plain, settings.inbound)
    assert files.pdf == plain.pdf  # unchanged, not lost
    assert files.ocr_note and not files.text_lines
    message = inbound_mailer(settings).compose(_record(), files, image, ["sales@example.org"])
    pdfs = [part for part in message.iter_attachments()
            if part.get_content_type() == "application/pdf"]
    assert len(pdfs) == 1
