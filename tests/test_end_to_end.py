"""Mail in over SMTP, fax out through the bundled emulator, status mail back in the outbox."""

from __future__ import annotations

import email
import email.policy
import mailbox
from pathlib import Path

import aiosmtplib
import pytest

from mailfax.model import JobState
from tests.conftest import Service, fax_mail


def _parsed(message: mailbox.MaildirMessage) -> email.message.EmailMessage:
    parsed = email.message_from_bytes(bytes(message), policy=email.policy.default)
    assert isinstance(parsed, email.message.EmailMessage)
    return parsed


async def test_pdf_mail_is_faxed_and_a_threaded_delivered_mail_comes_back(
        service: Service, corpus: Path) -> None:
    pdf = (corpus / "pdf" / "two-different-pages.pdf").read_bytes()
    mail = fax_mail([("letter.pdf", pdf, "application/pdf")], to="004930123456@fax.local",
                    subject="Our offer")
    errors, reply = await service.send(mail, "alice@example.org", ["004930123456@fax.local"])
    assert errors == {}
    assert reply.startswith("2.0.0 queued as ")
    job_id = reply.split()[-1]

    status = _parsed(await service.wait_for_mail(lambda m: m["X-Mailfax-State"] == "delivered"))
    assert status["To"] == "alice@example.org"
    assert status["In-Reply-To"] == mail["Message-ID"]
    assert mail["Message-ID"] in status["References"]
    assert status["Auto-Submitted"] == "auto-replied"
    assert status["X-Mailfax-Job"] == job_id
    assert status["Subject"].startswith("Re: Our offer")
    assert "Fax to +49 30 123456 delivered, 2 pages, 0:41" in status["Subject"]
    text = status.get_body(("plain",))
    html = status.get_body(("html",))
    assert text is not None and html is not None
    assert "+49 30 123456" in text.get_content()
    assert "<strong>+49 30 123456</strong>" in html.get_content()

    job = await service.app.store.get_job(job_id)
    assert job is not None
    assert job.state == JobState.DELIVERED
    assert job.number == "+4930123456"
    assert job.pages == 2
    states = [event.state for event in await service.app.store.job_events(job_id)]
    assert states[0] == JobState.QUEUED
    assert states[-1] == JobState.DELIVERED
    assert JobState.SUBMITTED in states


async def test_number_the_emulator_fails_gets_a_failure_mail_with_a_reason(
        service: Service, corpus: Path) -> None:
    pdf = (corpus / "pdf" / "crazyones.pdf").read_bytes()
    mail = fax_mail([("crazy.pdf", pdf, "application/pdf")], to="030999123@fax.local")
    await service.send(mail, "bob@example.org", ["030999123@fax.local"])
    status = _parsed(await service.wait_for_mail(lambda m: m["X-Mailfax-State"] == "failed"))
    assert status["To"] == "bob@example.org"
    assert "failed" in status["Subject"]
    body = status.get_body(("plain",))
    assert body is not None
    assert "The line was busy every time we called." in body.get_content()


async def test_foreign_domain_is_refused_at_rcpt(service: Service) -> None:
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=service.port) as client:
        await client.mail("alice@example.org")
        with pytest.raises(aiosmtplib.SMTPRecipientRefused) as refused:
            await client.rcpt("x@example.com")
        assert refused.value.code == 550
        assert "5.7.1" in refused.value.message


async def test_letters_are_not_a_number(service: Service) -> None:
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=service.port) as client:
        await client.mail("alice@example.org")
        with pytest.raises(aiosmtplib.SMTPRecipientRefused) as refused:
            await client.rcpt("abc@fax.local")
        assert refused.value.code == 550
        assert "5.1.1" in refused.value.message


async def test_mail_without_document_is_refused_at_data(service: Service) -> None:
    mail = fax_mail([])
    with pytest.raises(aiosmtplib.SMTPDataError) as refused:
        await service.send(mail, "alice@example.org", ["030123456@fax.local"])
    assert refused.value.code == 554
    assert "5.6.0" in refused.value.message
    assert "PDF" in refused.value.message
    assert await service.app.store.list_jobs() == []


async def test_two_recipients_make_two_jobs_sharing_the_documents(
        service: Service, corpus: Path) -> None:
    pdf = (corpus / "pdf" / "git.pdf").read_bytes()
    mail = fax_mail([("git.pdf", pdf, "application/pdf")])
    _, reply = await service.send(mail, "alice@example.org",
                                  ["030123456@fax.local", "+4922198765@fax.local"])
    job_ids = reply.split("queued as ")[1].split()
    assert len(job_ids) == 2
    jobs = [await service.app.store.get_job(job_id) for job_id in job_ids]
    assert sorted(job.number for job in jobs if job) == ["+4922198765", "+4930123456"]
    assert jobs[0] is not None and jobs[1] is not None
    assert jobs[0].mail_id == jobs[1].mail_id
