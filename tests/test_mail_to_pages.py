"""What a person mails becomes pages: office files, winmail.dat, and the mail's text as a cover
page (per mail with +cover / +nocover, or by configuration)."""

from __future__ import annotations

import io
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiosmtplib
import pypdf
import pytest

from mailfax.app import Application
from tests.conftest import Service, fax_mail, make_settings
from tests.fixtures.office import assert_office_pages

needs_libreoffice = pytest.mark.skipif(shutil.which("soffice") is None,
                                       reason="LibreOffice (soffice) is not installed")
TEXT = "Sehr geehrte Frau Müller,\n\nanbei das Angebot über 1.200 €.\n\n-- \nErika"


async def _service(tmp_path: Path, **overrides: Any) -> Service:
    app = Application(make_settings(tmp_path, **overrides))
    await app.start()
    return Service(app)


@pytest.fixture
async def with_text_cover(tmp_path: Path) -> AsyncIterator[Service]:
    service = await _service(tmp_path, documents={"cover": "when-text"})
    yield service
    await service.app.stop()


async def _documents(service: Service, reply: str) -> list[Any]:
    job = await service.app.store.get_job(reply.split()[-1])
    assert job is not None
    return await service.app.store.load_documents(job.mail_id)


async def test_plus_cover_adds_exactly_one_page_with_the_mail_text(service: Service,
                                                                   corpus: Path) -> None:
    pdf = (corpus / "pdf" / "crazyones.pdf").read_bytes()
    mail = fax_mail([("letter.pdf", pdf, "application/pdf")], to="030123456+cover@fax.local",
                    subject="Angebot", body=TEXT)
    _, reply = await service.send(mail, "alice@example.org", ["030123456+cover@fax.local"])
    documents = await _documents(service, reply)
    assert [document.pages for document in documents] == [1, 1]
    cover_text = pypdf.PdfReader(io.BytesIO(documents[0].data)).pages[0].extract_text()
    assert "Sehr geehrte Frau Müller," in cover_text
    assert "1.200 €" in cover_text
    assert "Erika" not in cover_text  # the signature stays off the fax
    job = await service.app.store.get_job(reply.split()[-1])
    assert job is not None and job.pages == 2 and job.number == "+4930123456"


@pytest.mark.parametrize("to", ["030123456+nocover@fax.local", "030123456@fax.local"])
async def test_nocover_and_the_default_add_no_page(service: Service, corpus: Path,
                                                   to: str) -> None:
    pdf = (corpus / "pdf" / "crazyones.pdf").read_bytes()
    mail = fax_mail([("letter.pdf", pdf, "application/pdf")], to=to, body=TEXT)
    _, reply = await service.send(mail, "alice@example.org", [to])
    assert [document.filename for document in await _documents(service, reply)] == \
        ["letter.pdf"]


async def test_when_text_config_covers_and_nocover_still_wins(with_text_cover: Service,
                                                              corpus: Path) -> None:
    pdf = (corpus / "pdf" / "crazyones.pdf").read_bytes()
    mail = fax_mail([("letter.pdf", pdf, "application/pdf")], body=TEXT)
    _, reply = await with_text_cover.send(mail, "alice@example.org", ["030123456@fax.local"])
    assert len(await _documents(with_text_cover, reply)) == 2
    _, reply = await with_text_cover.send(mail, "alice@example.org",
                                          ["030123456+nocover@fax.local"])
    assert len(await _documents(with_text_cover, reply)) == 1


async def test_a_text_only_mail_is_a_fax_with_cover_and_refused_without(
        service: Service) -> None:
    mail = fax_mail([], body=TEXT)
    _, reply = await service.send(mail, "alice@example.org", ["030123456+cover@fax.local"])
    documents = await _documents(service, reply)
    assert [document.pages for document in documents] == [1]
    with pytest.raises(aiosmtplib.SMTPDataError) as raised:
        await service.send(mail, "alice@example.org", ["030123456@fax.local"])
    assert raised.value.code == 554 and "no document" in raised.value.message


@needs_libreoffice
@pytest.mark.every_corpus
@pytest.mark.parametrize("name", ["VIA_Nytt_1402.doc", "par-rendered-page-breaks.docx",
                                  "hdr-header-footer.docx"])
async def test_office_documents_from_the_corpus_are_converted(
        service: Service, corpus: Path, expected: dict[str, Any], name: str) -> None:
    want = expected["office"][name]
    data = (corpus / "office" / name).read_bytes()
    mail = fax_mail([(name, data, "application/octet-stream")])
    _, reply = await service.send(mail, "alice@example.org", ["030123456@fax.local"])
    (document,) = await _documents(service, reply)
    assert document.filename.endswith(".pdf")
    assert_office_pages(name, corpus, want, document.pages)


async def test_office_files_are_refused_clearly_when_not_enabled(tmp_path: Path,
                                                                 corpus: Path) -> None:
    service = await _service(tmp_path, documents={"office": False})
    try:
        data = (corpus / "office" / "hdr-header-footer.docx").read_bytes()
        mail = fax_mail([("brief.docx", data, "application/octet-stream")])
        with pytest.raises(aiosmtplib.SMTPDataError) as raised:
            await service.send(mail, "alice@example.org", ["030123456@fax.local"])
        assert raised.value.code == 554 and "brief.docx" in raised.value.message
        assert "not enabled" in raised.value.message
    finally:
        await service.app.stop()


async def test_a_docx_that_is_something_else_is_refused_as_such(service: Service) -> None:
    mail = fax_mail([("invoice.docx", b"MZ\x90\x00 this is a program", "application/octet-stream")])
    with pytest.raises(aiosmtplib.SMTPDataError) as raised:
        await service.send(mail, "alice@example.org", ["030123456@fax.local"])
    assert raised.value.code == 554 and "invoice.docx" in raised.value.message


async def test_an_image_named_pdf_is_faxed_as_the_image_it_was_chosen_as(service: Service
                                                                          ) -> None:
    # Selected as an image (image/jpeg, JPEG bytes); converting by the ".pdf" name instead
    # refused it with "scan.pdf is not a PDF".
    from PIL import Image

    out = io.BytesIO()
    Image.new("L", (200, 280), 255).save(out, format="JPEG")
    mail = fax_mail([("scan.pdf", out.getvalue(), "image/jpeg")])
    _, reply = await service.send(mail, "alice@example.org", ["030123456@fax.local"])
    assert "queued as" in reply
    documents = await _documents(service, reply)
    assert [document.pages for document in documents] == [1]
    assert documents[0].data.startswith(b"%PDF-")
