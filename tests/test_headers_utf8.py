"""Non-ASCII headers as people send them: raw UTF-8 (RFC 6532, swaks, Postfix passing it on),
Windows-1252 from old clients, RFC 2047 words, and an SMTPUTF8 envelope. What comes back must
read "Müller" in the status mail, on the cover page faxed to the recipient, and in a bounce."""

from __future__ import annotations

import email
import email.policy
import io
import mailbox
from collections.abc import AsyncIterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiosmtplib
import pikepdf
import pypdf
import pytest
from aiosmtpd.controller import Controller

from mailfax.app import Application
from mailfax.config import RelaySettings
from mailfax.intake.mime import parse_mail
from mailfax.outbound.outbox import PermanentRefusal, RelaySink
from mailfax.store.base import OutboxItem
from tests.conftest import Service, make_settings
from tests.ports import free_port


def small_pdf() -> bytes:
    pdf = pikepdf.new()
    pdf.add_blank_page(page_size=(595, 842))
    out = io.BytesIO()
    pdf.save(out)
    return out.getvalue()


def raw_mail(*, subject: bytes, from_header: bytes, filename: bytes = b"Brief.pdf",
             to: bytes = b"030123456+cover@fax.local", body: bytes = b"Guten Tag,\r\nanbei.\r\n",
             date: bytes = b"Mon, 02 Mar 2026 08:30:00 +0000") -> bytes:
    """A mail with 8-bit headers exactly as a client puts them on the wire (no encoding)."""
    import base64

    pdf = base64.encodebytes(small_pdf()).replace(b"\n", b"\r\n")
    return (b"From: " + from_header + b"\r\nTo: " + to + b"\r\nSubject: " + subject +
            b"\r\nDate: " + date + b"\r\nMessage-ID: <utf8-test@example.org>\r\n"
            b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n"
            b"--b1\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Transfer-Encoding: 8bit\r\n\r\n" + body +
            b"\r\n--b1\r\nContent-Type: application/pdf\r\n"
            b"Content-Disposition: attachment; filename=\"" + filename + b"\"\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\n" + pdf + b"\r\n--b1--\r\n")


def parsed(message: mailbox.MaildirMessage) -> EmailMessage:
    result = email.message_from_bytes(bytes(message), policy=email.policy.default)
    assert isinstance(result, EmailMessage)
    return result


@pytest.fixture
async def german(tmp_path: Path) -> AsyncIterator[Service]:
    app = Application(make_settings(tmp_path, notify={
        "from_address": "fax@mailfax.test", "language": "de", "timezone": "Europe/Berlin",
        "events": ["delivered", "failed"], "failure_format": "both"}))
    await app.start()
    try:
        yield Service(app)
    finally:
        await app.stop()


async def _cover_text(service: Service, reply: str) -> str:
    job = await service.app.store.get_job(reply.split()[-1])
    assert job is not None
    documents = await service.app.store.load_documents(job.mail_id)
    return str(pypdf.PdfReader(io.BytesIO(documents[0].data)).pages[0].extract_text())


def test_raw_utf8_headers_are_read_as_utf8() -> None:
    mail = parse_mail(raw_mail(subject="Brief an Müller".encode(),
                               from_header="Jürgen Groß <jg@example.de>".encode(),
                               filename="Grüße.pdf".encode()))
    assert mail.subject == "Brief an Müller"
    assert mail.from_header == "Jürgen Groß <jg@example.de>"
    assert mail.from_address == "jg@example.de"
    assert [attachment.filename for attachment in mail.attachments] == ["Grüße.pdf"]


def test_windows_1252_headers_are_read_as_windows_1252() -> None:
    mail = parse_mail(raw_mail(subject="Brief an Müller – 5 €".encode("cp1252"),
                               from_header="Jürgen <jg@example.de>".encode("cp1252")))
    assert mail.subject == "Brief an Müller – 5 €"
    assert mail.from_header == "Jürgen <jg@example.de>"


def test_encoded_words_still_work_and_ascii_is_untouched() -> None:
    mail = parse_mail(raw_mail(subject=b"=?utf-8?q?Brief_an_M=C3=BCller?=",
                               from_header=b"Plain Name <p@example.org>"))
    assert mail.subject == "Brief an Müller"
    assert mail.from_header == "Plain Name <p@example.org>"


async def test_raw_utf8_subject_reaches_the_cover_page_and_the_status_mail(
        german: Service) -> None:
    raw = raw_mail(subject="Brief an Müller".encode(),
                   from_header="Jürgen Groß <jg@example.de>".encode())
    _, reply = await german.send(raw, "jg@example.de", ["030123456+cover@fax.local"])
    cover = await _cover_text(german, reply)
    assert "Brief an Müller" in cover
    assert "Jürgen Groß" in cover
    assert "\ufffd" not in cover
    # 08:30 UTC in the Date header is 09:30 in Berlin in March (CET): the cover says so.
    assert "02.03.2026, 09:30 CET" in cover

    status = parsed(await german.wait_for_mail(lambda m: m["X-Mailfax-State"] == "delivered"))
    assert status["Subject"].startswith("Re: Brief an Müller — Fax an +49 30 123456 zugestellt")
    header_section = bytes(german.outbox_messages()[0]).split(b"\n\n", 1)[0]
    assert header_section.isascii() and b"=?utf-8?" in header_section  # for any relay
    body = status.get_body(("plain",))
    assert body is not None and "Betreff Ihrer Mail: Brief an Müller" in body.get_content()


async def test_smtputf8_envelope_sender_gets_its_status_mail_and_bounce(
        german: Service) -> None:
    sender = "grüße@example.de"
    raw = raw_mail(subject="Grüße".encode(), from_header=f"Ärger <{sender}>".encode(),
                   to=b"030998123@fax.local")  # the emulator's "no answer": a failure
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=german.port) as client:
        await client.ehlo()
        assert client.supports_extension("smtputf8")
        await client.mail(sender, options=["SMTPUTF8", "BODY=8BITMIME"], encoding="utf-8")
        await client.rcpt("030998123@fax.local")
        response = await client.data(raw)
    assert response.code == 250
    status = parsed(await german.wait_for_mail(
        lambda m: m["X-Mailfax-State"] == "failed" and "multipart/alternative" in
        m.get_content_type()))
    assert status["To"] == sender
    assert status["Subject"].startswith("Re: Grüße — Fax an +49 30 998123 fehlgeschlagen")

    bounce = parsed(await german.wait_for_mail(
        lambda m: m.get_content_type() == "multipart/report"))
    assert bounce["To"] == sender
    headers_part = next(part for part in bounce.walk()
                    if part.get_content_type() == "text/rfc822-headers")
    original = email.message_from_string(headers_part.get_content(),
                                         policy=email.policy.default)
    assert original["Subject"] == "Grüße"
    assert original["From"].addresses[0].display_name == "Ärger"


async def test_a_zero_byte_attachment_is_called_empty(service: Service) -> None:
    message = EmailMessage()
    message["From"] = "alice@example.org"
    message["To"] = "030123456@fax.local"
    message["Subject"] = "empty"
    message.set_content("see attachment")
    message.add_attachment(b"", maintype="application", subtype="pdf", filename="empty.pdf")
    with pytest.raises(aiosmtplib.SMTPDataError) as refused:
        await service.send(message, "alice@example.org", ["030123456@fax.local"])
    assert refused.value.code == 554
    assert "empty.pdf is empty (0 bytes)" in refused.value.message
    assert await service.app.store.list_jobs() == []


async def test_mailfax_send_status_mail_names_the_file_not_a_mail(service: Service) -> None:
    from mailfax.documents.pdf import prepare_pdf
    from mailfax.intake.service import Intake
    from mailfax.numbers import parse_fax_local_part

    intake = Intake(service.app.settings, service.app.store)
    address = parse_fax_local_part("030123456", "DE")
    accepted = await intake.store_documents("alice@example.org", [address],
                                            [prepare_pdf("letter.pdf", small_pdf())],
                                            "letter.pdf", "cli")
    service.app.dispatcher.wake()
    status = parsed(await service.wait_for_mail(
        lambda m: m["X-Mailfax-Job"] == accepted.job_ids[0]
        and m["X-Mailfax-State"] == "delivered"))
    assert status["Subject"].startswith("Fax of letter.pdf to +49 30 123456 delivered")
    assert "In-Reply-To" not in status
    body = status.get_body(("plain",))
    assert body is not None
    text = body.get_content()
    assert "Your fax of: letter.pdf (mailfax send)" in text
    assert "Subject of your mail" not in text


class _Sink:
    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        return "250 OK"


async def test_relay_without_smtputf8_is_a_permanent_refusal_for_a_utf8_address() -> None:
    port = free_port()
    controller = Controller(_Sink(), hostname="127.0.0.1", port=port, enable_SMTPUTF8=False)
    controller.start()
    try:
        sink = RelaySink(RelaySettings(host="127.0.0.1", port=port), "mailfax.test")
        item = OutboxItem(id=1, envelope_from="", recipients=["grüße@example.de"],
                          message=b"Subject: x\r\n\r\nx\r\n", attempts=0,
                          job_id=None)
        with pytest.raises(PermanentRefusal, match="SMTPUTF8"):
            await sink.deliver(item)
    finally:
        controller.stop()


async def test_relay_with_smtputf8_takes_a_status_mail_to_a_utf8_address() -> None:
    received: list[Any] = []

    class Keep:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            received.append(envelope)
            return "250 OK"

    port = free_port()
    controller = Controller(Keep(), hostname="127.0.0.1", port=port, enable_SMTPUTF8=True)
    controller.start()
    try:
        sink = RelaySink(RelaySettings(host="127.0.0.1", port=port), "mailfax.test")
        await sink.deliver(OutboxItem(id=1, envelope_from="", recipients=["grüße@example.de"],
                                      message="To: grüße@example.de\r\n\r\nx\r\n".encode(),
                                      attempts=0, job_id=None))
    finally:
        controller.stop()
    assert [envelope.rcpt_tos for envelope in received] == [["grüße@example.de"]]
    assert "SMTPUTF8" in received[0].mail_options
