"""Postfix in front of mailfax, against the real programs: LMTP hand-over with per-recipient
answers, SMTP hand-over, and status mails going back out through Postfix into the sender's
Dovecot mailbox, read over IMAP. Postfix is configured from deploy/postfix/ as documented.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from mailfax.app import Application
from mailfax.model import JobState
from mailfax.outbound.outbox import RelaySink
from mailfax.store.base import OutboxItem
from tests.conftest import fax_mail, make_settings
from tests.mailservers import (
    FAX_DOMAIN,
    Dovecot,
    Postfix,
    free_port,
    running_dovecot,
    running_postfix,
)

pytestmark = pytest.mark.integration

ALICE = "alice@example.org"
PDF = (b"%PDF-1.4\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj\n"
       b"2 0 obj<</Type/Pages/Kids[3 0 R]/Count 1>>endobj\n"
       b"3 0 obj<</Type/Page/Parent 2 0 R/MediaBox[0 0 595 842]>>endobj\n"
       b"trailer<</Root 1 0 R>>\n%%EOF\n")


@pytest.fixture(scope="module")
def dovecot() -> Iterator[Dovecot]:
    with running_dovecot([ALICE, "bob@example.org"]) as server:
        yield server


def mailfax_settings(tmp_path: Path, postfix_relay_port: int, **overrides: Any) -> Any:
    return make_settings(
        tmp_path, fax_domains=[FAX_DOMAIN],
        relay={"host": "127.0.0.1", "port": postfix_relay_port, "timeout": 20},
        notify={"from_address": "fax@example.org", "events": ["delivered", "failed"]},
        outbox={"retry_initial_seconds": 0.3, "retry_max_seconds": 2.0}, **overrides)


@pytest.fixture
async def lmtp_setup(tmp_path: Path, dovecot: Dovecot
                     ) -> AsyncIterator[tuple[Postfix, Application]]:
    lmtp_port = free_port()
    with running_postfix(dovecot, "transport", lmtp_port) as postfix:
        app = Application(mailfax_settings(
            tmp_path, postfix.relay_port,
            smtp={"listen": ["127.0.0.1:0"], "lmtp_listen": [f"127.0.0.1:{lmtp_port}"]}))
        await app.start()
        try:
            yield postfix, app
        finally:
            await app.stop()


async def send_through(postfix: Postfix, recipients: list[str], subject: str) -> str:
    message = fax_mail([("letter.pdf", PDF, "application/pdf")], sender=ALICE,
                       to=", ".join(recipients), subject=subject)
    await aiosmtplib.send(message, sender=ALICE, recipients=recipients, hostname="127.0.0.1",
                          port=postfix.smtp_port, timeout=30)
    return str(message["Message-ID"])


async def test_lmtp_through_postfix_one_bad_number_bounces_only_that_recipient(
        lmtp_setup: tuple[Postfix, Application], dovecot: Dovecot) -> None:
    postfix, app = lmtp_setup
    good = [f"030123456@{FAX_DOMAIN}", f"040-987654@{FAX_DOMAIN}"]
    bad = f"0301@{FAX_DOMAIN}"  # too short to be a number
    await send_through(postfix, [good[0], bad, good[1]], "Three recipients")

    lines = await postfix.wait_for_deliveries({good[0]: "sent", good[1]: "sent",
                                               bad: "bounced"})
    assert "queued as" in lines[good[0]] and "status=sent" in lines[good[0]]
    assert " said: 550 5.1.1 " in lines[bad]  # mailfax's per-recipient answer, passed on
    assert f"127.0.0.1[127.0.0.1]:{app.settings.smtp.lmtp_listen[0].split(':')[1]}" in lines[bad]

    jobs = await app.store.list_jobs()
    assert sorted(job.number for job in jobs) == ["+4930123456", "+4940987654"]
    assert {job.sender for job in jobs} == {ALICE}  # the envelope sender Postfix passed on
    mail = await app.store.get_mail(jobs[0].mail_id)
    assert mail is not None and mail.client_address == "127.0.0.1"

    # Postfix's bounce reaches the sender's mailbox and names only the bad recipient.
    bounces = await dovecot.wait_for(ALICE, "INBOX", lambda message: "MAILER-DAEMON" in str(
        message["From"]) and bad in message.as_string())
    text = bounces[0].as_string()
    assert all(address not in text.split("Content-Description: Undelivered Message")[0]
               for address in good)


async def relay_takes_the_null_sender(app: Application) -> None:
    """Status mails have the empty envelope sender (<>); the relay sink must send them."""
    sink = app.outbox.sink
    assert isinstance(sink, RelaySink)
    probe = OutboxItem(id=0, envelope_from="", recipients=[ALICE], attempts=0,
                       job_id=None, message=b"Subject: probe\r\nAuto-Submitted: auto-replied"
                       b"\r\n\r\nprobe\r\n")
    await sink.deliver(probe)  # raised ValueError while RelaySink used aiosmtplib.send()


async def test_smtp_through_postfix_status_mail_reaches_the_senders_imap_mailbox(
        tmp_path: Path, dovecot: Dovecot) -> None:
    smtp_port = free_port()
    with running_postfix(dovecot, "transport.smtp", smtp_port) as postfix:
        app = Application(mailfax_settings(
            tmp_path, postfix.relay_port, smtp={"listen": [f"127.0.0.1:{smtp_port}"]}))
        await app.start()
        try:
            await relay_takes_the_null_sender(app)
            message_id = await send_through(postfix, [f"+49-30-5550123@{FAX_DOMAIN}"],
                                            "Contract")
            await postfix.wait_for_deliveries({f"+49-30-5550123@{FAX_DOMAIN}": "sent"})
            replies = await dovecot.wait_for(
                ALICE, "INBOX", lambda message: message["In-Reply-To"] == message_id,
                timeout=45)
            reply = replies[0]
            job_id = str(reply["X-Mailfax-Job"])
            job = await app.store.get_job(job_id)
            assert job is not None and job.state is JobState.DELIVERED
            assert job.number == "+49305550123" and job.sender == ALICE
            assert reply["X-Mailfax-State"] == "delivered"
            assert reply["Auto-Submitted"] == "auto-replied"
            assert "Contract" in str(reply["Subject"])
            # It went out through Postfix's relay port for mailfax (deploy/postfix/master.cf).
            assert "postfix/mailfax-relay/smtpd" in postfix.log_text()
        finally:
            await app.stop()


async def test_mail_from_an_untrusted_relay_is_refused(tmp_path: Path, dovecot: Dovecot
                                                       ) -> None:
    lmtp_port = free_port()
    with running_postfix(dovecot, "transport", lmtp_port) as postfix:
        app = Application(mailfax_settings(
            tmp_path, postfix.relay_port, senders={"trusted_networks": ["192.0.2.0/24"]},
            smtp={"listen": ["127.0.0.1:0"], "lmtp_listen": [f"127.0.0.1:{lmtp_port}"]}))
        await app.start()
        try:
            recipient = f"030123456@{FAX_DOMAIN}"
            await send_through(postfix, [recipient], "Not from here")
            lines = await postfix.wait_for_deliveries({recipient: "bounced"})
            assert "550 5.7.1" in lines[recipient]
            assert await app.store.list_jobs() == []
        finally:
            await app.stop()
