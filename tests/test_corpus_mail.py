"""Every mail of the corpus, delivered over SMTP as a real client would: the jobs it must make or
the refusal it must get (``expected.json``), and no status mail for a refusal or a bounce."""

from __future__ import annotations

import asyncio
import email
import email.policy
import json
from email.utils import parseaddr
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from mailfax.intake.assemble import Refusal, assemble
from mailfax.intake.mime import parse_mail, select_documents
from tests.conftest import Service
from tests.fixtures.build import EXTRA_MAILS

pytestmark = pytest.mark.every_corpus  # the real corpus, and the stand-in the tests make

MAILS = ["mutt-pdf-umlaut-name.eml", "mutt-two-pdfs-two-recipients.eml", "s-nail-pdf.eml",
         "swaks-octet-stream-pdf.eml", "attachment_with_quoted_filename.eml",
         "attachment_pdf.eml", "attachment_message_rfc822.eml", "raw_email7.eml",
         "email_with_similar_boundaries.eml", "sig_only_email.eml", "basic_email.eml",
         "raw_email_with_mimepart_without_content_type.eml",
         "swaks-outlook-winmail-dat-jpeg.eml"]

# What each "refused" line of expected.json means in words the SMTP reply must contain.
REFUSAL_WORDS = {
    "attachment_pdf.eml": ["broken.pdf", "damaged PDF"],
    "attachment_message_rfc822.eml": ["broken.pdf", "damaged PDF", "forwarded message"],
    "raw_email7.eml": ["test.pdf", "is not a PDF"],
    "email_with_similar_boundaries.eml": ["LOGO.png", "not a readable image"],
    "sig_only_email.eml": ["no document"],
    "basic_email.eml": ["no document"],
    "raw_email_with_mimepart_without_content_type.eml": ["no document"],
}


def _envelope_sender(raw: bytes, want: dict[str, Any]) -> str:
    if "mail_from" in want:
        return str(want["mail_from"])
    message = email.message_from_bytes(raw, policy=email.policy.default)
    return parseaddr(str(message["From"]))[1]


async def _deliver(service: Service, raw: bytes, sender: str,
                   recipients: list[str]) -> tuple[dict[str, Any], str]:
    """Like ``aiosmtplib.send``, which refuses the null sender ``<>`` of a bounce."""
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=service.port, timeout=30)
    async with client:
        errors, reply = await client.sendmail(sender, recipients, raw)
    return dict(errors), reply


@pytest.mark.parametrize("name", MAILS)
async def test_corpus_mail_over_smtp(service: Service, corpus: Path, expected: dict[str, Any],
                                     name: str) -> None:
    want = expected["mime"][name]
    raw = (corpus / "mime" / name).read_bytes()
    sender = _envelope_sender(raw, want)
    if "refused" in want:
        with pytest.raises(aiosmtplib.SMTPDataError) as raised:
            await _deliver(service, raw, sender, want["rcpt"])
        assert raised.value.code == 554
        message = raised.value.message
        assert message.startswith("5.6.")  # an enhanced status code, then the sentence
        for words in REFUSAL_WORDS[name]:
            assert words in message, message
        assert await service.app.store.list_jobs() == []
    else:
        errors, reply = await _deliver(service, raw, sender, want["rcpt"])
        assert errors == {}
        job_ids = reply.split("queued as ", 1)[1].split()
        assert len(job_ids) == len(want["jobs"])
        for job_id, wanted in zip(job_ids, want["jobs"], strict=True):
            job = await service.app.store.get_job(job_id)
            assert job is not None
            assert job.number == wanted["number"]
            assert job.pages == wanted["pages"]
            documents = await service.app.store.load_documents(job.mail_id)
            assert [document.filename for document in documents] == wanted["documents"]
            assert sum(document.pages for document in documents) == wanted["pages"]
    if "refused" in want or not sender:
        await asyncio.sleep(0.5)
        assert service.outbox_messages() == []  # no status mail for a refusal or a bounce


@pytest.mark.parametrize("name", MAILS)
def test_assemble_agrees_with_expected_without_sockets(corpus: Path, expected: dict[str, Any],
                                                       name: str) -> None:
    want = expected["mime"][name]
    raw = (corpus / "mime" / name).read_bytes()
    if "refused" in want:
        with pytest.raises(Refusal) as raised:
            assemble(raw)
        assert raised.value.code == 554
        for words in REFUSAL_WORDS[name]:
            assert words in raised.value.sentence
        return
    content = assemble(raw)
    assert [document.filename for document in content.documents] == \
        want["jobs"][0]["documents"]
    assert content.pages == want["jobs"][0]["pages"]


def test_winmail_dat_unpacks_the_picture_and_leaves_the_html_bookmark(corpus: Path) -> None:
    mail = parse_mail((corpus / "mime" / "swaks-outlook-winmail-dat-jpeg.eml").read_bytes())
    chosen = select_documents(mail)
    assert [attachment.filename for attachment in chosen] == ["zappa_av1.jpg"]
    assert chosen[0].data[:3] == b"\xff\xd8\xff"
    assert any("bookmark.htm" in sentence for sentence in mail.skipped)


def test_threading_headers_and_text_are_read(corpus: Path) -> None:
    mail = parse_mail((corpus / "mime" / "mutt-pdf-umlaut-name.eml").read_bytes())
    assert mail.message_id is not None and mail.message_id.startswith("<")
    assert mail.from_address == "erika@example.org"
    assert "anbei das Angebot" in mail.text
    assert mail.attachments[0].filename == "Angebot Müller 2026.pdf"


def test_an_inline_logo_of_the_html_body_is_not_faxed() -> None:
    raw = (b"From: a@example.org\r\nTo: 030123456@fax.local\r\nSubject: x\r\nMIME-Version: 1.0\r\n"
           b"Content-Type: multipart/related; boundary=B\r\n\r\n--B\r\n"
           b"Content-Type: text/html\r\n\r\n<p>Hi</p><img src=\"cid:logo@x\">\r\n--B\r\n"
           b"Content-Type: image/png\r\nContent-ID: <logo@x>\r\nContent-Disposition: inline\r\n"
           b"Content-Transfer-Encoding: base64\r\n\r\niVBORw0KGgo=\r\n--B--\r\n")
    mail = parse_mail(raw)
    assert len(mail.attachments) == 1
    assert select_documents(mail) == []
    assert mail.text == "Hi"


@pytest.mark.parametrize("name", EXTRA_MAILS)
def test_forwarded_documents_and_a_word_file_in_winmail_dat_are_faxed(
        generated_corpus: Path, name: str) -> None:
    """Only in the stand-in: a PDF inside a forwarded mail, a .doc inside a winmail.dat."""
    want = json.loads((generated_corpus / "expected.json").read_text())["mime"]
    if name not in want:
        pytest.skip("writing a .doc needs LibreOffice (soffice), which is not installed")
    content = assemble((generated_corpus / "mime" / name).read_bytes())
    [job] = want[name]["jobs"]
    assert [document.filename for document in content.documents] == job["documents"]
    assert content.pages == job["pages"]
