"""What a sending MTA is told at DATA: 4xx only for what is temporary (the store unavailable,
the disk full, a converter that timed out or is busy, an unforeseen error), 5xx naming the file
and what to do for what retrying cannot change, and a body-only mail is pointed at +cover."""

from __future__ import annotations

import errno
import logging
import sqlite3
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from mailfax.app import Application
from mailfax.documents import office
from mailfax.documents.office import OfficeLimits
from mailfax.intake.assemble import Refusal, assemble
from tests.conftest import Service, fax_mail, make_settings

DOCX = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"


def docx() -> bytes:
    import io
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("[Content_Types].xml", "<Types/>")
        archive.writestr("word/document.xml", "<w:document/>")
    return buffer.getvalue()


def fake_soffice(folder: Path, body: str, **limits: Any) -> None:
    """Conversions from now on run this shell script instead of LibreOffice."""
    script = folder / "soffice"
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(0o755)
    office.configure(OfficeLimits(soffice=str(script), profile_root=folder / "profiles",
                                  **limits))


async def data_reply(service: Service, attachments: list[tuple[str, bytes, str]],
                     to: str = "030123456@fax.local", body: str = "Please fax this."
                     ) -> tuple[int, str]:
    mail = fax_mail(attachments, to=to, body=body)
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=service.port, timeout=60) as smtp:
        await smtp.mail("alice@example.org")
        await smtp.rcpt(to)
        try:
            response = await smtp.data(mail.as_bytes())
        except aiosmtplib.SMTPResponseException as error:
            return error.code, error.message
        return response.code, response.message


@pytest.fixture(autouse=True)
def restore_office() -> Any:
    yield
    office.configure(OfficeLimits())


async def test_a_document_that_cannot_be_converted_is_refused_for_good(
        service: Service, tmp_path: Path) -> None:
    fake_soffice(tmp_path, "exit 1\n")
    code, reply = await data_reply(service, [("Angebot.docx", docx(), DOCX)])
    assert code == 554
    assert reply.startswith("5.6.0 Angebot.docx could not be converted")
    assert "export it as a PDF" in reply


async def test_a_conversion_that_times_out_is_temporary(service: Service,
                                                        tmp_path: Path) -> None:
    fake_soffice(tmp_path, "sleep 30\n", timeout=0.5)
    code, reply = await data_reply(service, [("Angebot.docx", docx(), DOCX)])
    assert code == 451
    assert reply.startswith("4.3.0 Angebot.docx took too long to convert")
    assert "tried again later" in reply


def test_a_busy_converter_is_temporary(tmp_path: Path) -> None:
    fake_soffice(tmp_path, "exit 1\n", timeout=0.2, max_concurrent=1)
    slot = office._free_slots.get()  # every slot taken, as by a long conversion
    try:
        mail = fax_mail([("Angebot.docx", docx(), DOCX)])
        with pytest.raises(Refusal) as refused:
            assemble(mail.as_bytes())
    finally:
        office._free_slots.put(slot)
    assert refused.value.reply().startswith("451 4.3.2 Angebot.docx: the server is busy")
    assert refused.value.temporary


async def test_without_libreoffice_an_office_file_is_refused_with_what_to_do(
        service: Service, tmp_path: Path) -> None:
    office.configure(OfficeLimits(soffice=str(tmp_path / "no-soffice")))
    code, reply = await data_reply(service, [("Angebot.docx", docx(), DOCX)])
    assert (code, reply) == (554, "5.6.1 Angebot.docx: office files are not enabled on this "
                                  "server; save or export it as a PDF and send that instead.")


async def test_an_unavailable_store_is_temporary(service: Service,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    async def locked(*args: Any, **kwargs: Any) -> None:
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(service.app.store, "add_mail_jobs", locked)
    code, reply = await data_reply(service, [], body="Hello")
    assert code == 554  # nothing to fax: refused before the store is asked
    pdf = _pdf()
    code, reply = await data_reply(service, [("letter.pdf", pdf, "application/pdf")])
    assert (code, reply) == (451, "4.3.0 Temporary failure: the fax queue is unavailable right "
                                  "now; please try again later")


async def test_a_full_disk_is_temporary(service: Service, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    fake_soffice(tmp_path, "exit 1\n")

    def no_room(*args: Any) -> bytes:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(office, "_convert", no_room)
    code, reply = await data_reply(service, [("Angebot.docx", docx(), DOCX)])
    assert (code, reply) == (452, "4.3.1 Temporary failure: the server's disk is full; please "
                                  "try again later")


async def test_an_unexpected_error_is_temporary_and_logged(
        service: Service, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    fake_soffice(tmp_path, "exit 1\n")

    def broken(*args: Any) -> bytes:
        raise RuntimeError("a bug in the converter")

    monkeypatch.setattr(office, "_convert", broken)
    with caplog.at_level(logging.ERROR):
        code, reply = await data_reply(service, [("Angebot.docx", docx(), DOCX)])
    assert code == 451
    assert reply.startswith("4.3.0 Temporary failure: an unexpected error on the server")
    assert "a bug in the converter" in caplog.text and "Traceback" in caplog.text


@pytest.mark.parametrize(("to", "hint"), [
    ("030123456@fax.local", "<030123456+cover@fax.local>"),
    ("+4930123456+nocover@fax.local", "<+4930123456+cover@fax.local>"),
])
async def test_a_body_only_mail_is_told_about_cover(service: Service, to: str,
                                                    hint: str) -> None:
    code, reply = await data_reply(service, [], to=to, body="Dear Sir, please call me.")
    assert code == 554
    assert reply.startswith("5.6.0 This mail has no document to fax.")
    assert f"To fax the mail's text itself, send it to {hint}." in reply


async def test_a_mail_without_text_or_documents_gets_no_cover_hint(service: Service) -> None:
    code, reply = await data_reply(service, [], body="")
    assert code == 554 and "no document to fax" in reply and "+cover" not in reply


async def test_a_conversion_longer_than_the_idle_timeout_still_gets_its_answer(
        tmp_path: Path) -> None:
    """The client waits for the reply while LibreOffice works: that is not idling."""
    blank = tmp_path / "blank.pdf"
    blank.write_bytes(_pdf())
    app = Application(make_settings(tmp_path, smtp={"listen": ["127.0.0.1:0"],
                                                    "data_timeout": 1.0}))
    await app.start()
    try:
        fake_soffice(tmp_path, 'for a; do s=$a; done\nsleep 2.5\n'
                     f'cp {blank} "${{s%.*}}.pdf"\n', timeout=20)
        code, reply = await data_reply(Service(app), [("Angebot.docx", docx(), DOCX)])
    finally:
        await app.stop()
    assert code == 250 and reply.startswith("2.0.0 queued as "), reply


def _pdf() -> bytes:
    import io

    import pikepdf

    pdf = pikepdf.new()
    pdf.add_blank_page(page_size=(595, 842))
    buffer = io.BytesIO()
    pdf.save(buffer)
    return buffer.getvalue()
