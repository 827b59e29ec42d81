"""Every kind of document mailfax claims to fax, mailed to ``mailfax serve`` on its embedded
defaults: each is accepted with 250, faxed by the bundled emulator with the right page count
(``mailfax jobs --json``), and answered by a status mail in ./mailfax-data/outbox."""

from __future__ import annotations

import shutil
from collections.abc import Callable

import pytest

from bench.memory import random_pdf
from tests.acceptance import documents
from tests.acceptance.user import Mailfax, final_job, status_mail

FAX = "030123456@fax.local"

needs_libreoffice = pytest.mark.skipif(shutil.which("soffice") is None,
                                       reason="LibreOffice (soffice) is not installed")


@pytest.fixture(scope="module")
def office_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    if shutil.which("soffice") is None:
        pytest.skip("LibreOffice (soffice) is not installed")
    return documents.office_conversions(tmp_path_factory.mktemp("office"))


def attachment(name: str, content_type: str, data: bytes) -> documents.EmailMessage:
    return documents.mail(FAX, f"Fax: {name}", attachments=((name, content_type, data),))


SIMPLE_KINDS: dict[str, tuple[Callable[[], documents.EmailMessage], int]] = {
    "pdf": (lambda: attachment("letter.pdf", "application/pdf", documents.pdf(2)), 2),
    "jpeg": (lambda: attachment("photo.jpg", "image/jpeg", documents.picture("JPEG")), 1),
    "png": (lambda: attachment("scan.png", "image/png", documents.picture("PNG")), 1),
    "tiff": (lambda: attachment("fax.tif", "image/tiff", documents.tiff(3)), 3),
    "gif": (lambda: attachment("drawing.gif", "image/gif", documents.picture("GIF")), 1),
    "forwarded mail": (lambda: documents.forwarded(FAX, attachment(
        "inner.pdf", "application/pdf", documents.pdf(2, "Forwarded"))), 2),
}


async def expect_faxed(mailfax: Mailfax, message: documents.EmailMessage, pages: int) -> None:
    job_id = await mailfax.queued(message)
    job = final_job(mailfax, job_id)
    assert (job["state"], job["pages"], job["number"]) == ("delivered", pages, "+4930123456")
    assert mailfax.emulator_ledger(job_id) == ("+4930123456", pages, 1)  # faxed once
    mail = status_mail(mailfax, job_id)
    assert f"delivered, {pages} page" in str(mail["Subject"])
    assert mail["To"] == "alice@example.org"


@pytest.mark.parametrize("kind", list(SIMPLE_KINDS))
async def test_a_mailed_document_is_faxed_with_its_pages(mailfax: Mailfax, kind: str) -> None:
    make, pages = SIMPLE_KINDS[kind]
    await expect_faxed(mailfax, make(), pages)


async def test_a_large_scan_is_faxed_whole_and_leaves_nothing_in_the_spool(
        mailfax: Mailfax) -> None:
    # 4 MB on the wire: received into a spool file, its PDF decoded into another (over 1 MB)
    scan = random_pdf(3_000_000, pages=3)
    message = attachment("scan.pdf", "application/pdf", scan)
    assert len(message.as_bytes()) > 4_000_000
    await expect_faxed(mailfax, message, 3)
    spool = mailfax.folder / "mailfax-data" / "spool"
    assert [path.name for path in spool.iterdir()] == []


OFFICE_TYPES = {
    "docx": "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
    "odt": "application/vnd.oasis.opendocument.text",
    "doc": "application/msword",
}


@needs_libreoffice
@pytest.mark.parametrize("kind", list(OFFICE_TYPES))
async def test_an_office_document_is_faxed_with_its_pages(
        mailfax: Mailfax, office_files: dict[str, bytes], kind: str) -> None:
    message = attachment(f"letter.{kind}", OFFICE_TYPES[kind], office_files[kind])
    await expect_faxed(mailfax, message, 2)


@needs_libreoffice
async def test_a_text_file_is_faxed(mailfax: Mailfax) -> None:
    text = "\n".join(f"Line {n} of a plain text file." for n in range(1, 41)).encode()
    await expect_faxed(mailfax, attachment("notes.txt", "text/plain", text), 1)


@needs_libreoffice
async def test_a_winmail_dat_with_a_doc_inside_is_faxed(
        mailfax: Mailfax, office_files: dict[str, bytes]) -> None:
    tnef = documents.winmail_dat({"letter.doc": office_files["doc"]})
    await expect_faxed(mailfax, attachment("winmail.dat", "application/ms-tnef", tnef), 2)


async def test_a_winmail_dat_with_a_pdf_inside_is_faxed(mailfax: Mailfax) -> None:
    tnef = documents.winmail_dat({"offer.pdf": documents.pdf(3, "Offer")})
    await expect_faxed(mailfax, attachment("winmail.dat", "application/ms-tnef", tnef), 3)


async def test_text_with_plus_cover_is_a_one_page_fax(mailfax: Mailfax) -> None:
    message = documents.mail("030123456+cover@fax.local", "Just text",
                             "Dear Sir or Madam,\n\nplease call me back.\n\nAlice")
    await expect_faxed(mailfax, message, 1)


async def test_a_body_only_mail_without_plus_cover_is_refused_with_the_hint(
        mailfax: Mailfax) -> None:
    before = len(mailfax.jobs())
    code, reply = await mailfax.send(documents.mail(FAX, "Only text", "Please fax me."))
    assert code == 554, reply
    assert "no document to fax" in reply and "+cover" in reply
    assert len(mailfax.jobs()) == before


def test_the_data_stays_in_the_folder_it_was_started_in(mailfax: Mailfax) -> None:
    """No config: the store, the emulator's ledger and the Maildir are in ./mailfax-data."""
    data = mailfax.folder / "mailfax-data"
    assert (data / "mailfax.sqlite3").is_file()
    assert (data / "emulator" / "inbox").is_dir()  # where the emulator receives faxes
    assert (data / "outbox" / "new").is_dir()
