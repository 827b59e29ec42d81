"""Postfix in front of mailfax, against the real programs, configured from deploy/postfix/ as
documented (main.cf and master.cf appended, the map files used as they are; only ports and
paths substituted): who may send to the fax domain (SASL logins through Dovecot, mynetworks,
strangers from 127.0.0.2), mailfax's policy service answering at RCPT, recipient
verification probes, the LMTP and SMTP hand-over, and status mails going back out through
Postfix into the sender's Dovecot mailbox, read over IMAP.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from email.message import EmailMessage
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
    PASSWORD,
    Dovecot,
    Postfix,
    free_port,
    running_dovecot,
    running_postfix,
)

pytestmark = pytest.mark.integration

ALICE = "alice@example.org"  # SASL logins are the full addresses (Dovecot's passwd-file)
BOB = "bob@example.org"
OUTSIDE = "127.0.0.2"  # not in the test Postfix's mynetworks (127.0.0.1/32)
PDF = (b"%PDF-1.4\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj\n"
       b"2 0 obj<</Type/Pages/Kids[3 0 R]/Count 1>>endobj\n"
       b"3 0 obj<</Type/Page/Parent 2 0 R/MediaBox[0 0 595 842]>>endobj\n"
       b"trailer<</Root 1 0 R>>\n%%EOF\n")


@pytest.fixture(scope="module")
def dovecot() -> Iterator[Dovecot]:
    with running_dovecot([ALICE, BOB]) as server:
        yield server


def mailfax_settings(tmp_path: Path, postfix: Postfix, **overrides: Any) -> Any:
    """mailfax as deploy/EXPOSURE.md says for Postfix in front."""
    values: dict[str, Any] = {
        "fax_domains": [FAX_DOMAIN],
        "senders": {"trusted_networks": ["127.0.0.1/32"]},
        "relay": {"host": "127.0.0.1", "port": postfix.relay_port, "timeout": 20},
        "notify": {"from_address": "fax@example.org", "events": ["delivered", "failed"]},
        "outbox": {"retry_initial_seconds": 0.3, "retry_max_seconds": 2.0},
        "policy_service": {"listen": f"127.0.0.1:{postfix.policy_port}"},
        "accounts": {"emulator": {"provider": "emulator", "delay_seconds": 0.3},
                     "alices": {"provider": "emulator", "delay_seconds": 0.3}},
        "users": {ALICE: {"addresses": [ALICE], "account": "alices"},
                  BOB: {"addresses": [BOB]}},
    }
    if postfix.transport == "transport":
        values["smtp"] = {"listen": ["127.0.0.1:0"],
                          "lmtp_listen": [f"127.0.0.1:{postfix.mailfax_port}"]}
    else:
        values["smtp"] = {"listen": [f"127.0.0.1:{postfix.mailfax_port}"]}
    return make_settings(tmp_path, **{**values, **overrides})


@contextlib.asynccontextmanager
async def setup(tmp_path: Path, dovecot: Dovecot, transport: str = "transport",
                **overrides: Any) -> AsyncIterator[tuple[Postfix, Application]]:
    with running_postfix(dovecot, transport, free_port(), free_port()) as postfix:
        app = Application(mailfax_settings(tmp_path, postfix, **overrides))
        await app.start()
        try:
            yield postfix, app
        finally:
            await app.stop()


@pytest.fixture
async def lmtp_setup(tmp_path: Path, dovecot: Dovecot
                     ) -> AsyncIterator[tuple[Postfix, Application]]:
    async with setup(tmp_path, dovecot) as pair:
        yield pair


@contextlib.asynccontextmanager
async def session(postfix: Postfix, source: str = OUTSIDE,
                  login: str | None = None) -> AsyncIterator[aiosmtplib.SMTP]:
    """An SMTP session with Postfix from ``source``, logged in as ``login`` if given."""
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=postfix.smtp_port, timeout=30,
                           source_address=(source, 0), start_tls=False,
                           local_hostname="client.example.net")
    await smtp.connect()
    try:
        if smtp.last_ehlo_response is None:  # else data() would say EHLO, ending the mail
            await smtp.ehlo()
        if login is not None:
            await smtp.login(login, PASSWORD)
        yield smtp
    finally:
        with contextlib.suppress(aiosmtplib.SMTPException):
            await smtp.quit()


async def command(smtp: aiosmtplib.SMTP, verb: str, argument: str) -> tuple[int, str]:
    reply = await smtp.execute_command(verb.encode(), argument.encode())
    return reply.code, reply.message


def letter(sender: str, recipients: list[str], subject: str = "Letter") -> EmailMessage:
    return fax_mail([("letter.pdf", PDF, "application/pdf")], sender=sender,
                    to=", ".join(recipients), subject=subject)


async def send_data(smtp: aiosmtplib.SMTP, message: EmailMessage) -> tuple[int, str]:
    reply = await smtp.data(message.as_bytes())
    return reply.code, reply.message


async def send_through(postfix: Postfix, recipients: list[str], subject: str,
                       login: str = ALICE) -> str:
    message = letter(login, recipients, subject)
    await aiosmtplib.send(message, sender=login, recipients=recipients, hostname="127.0.0.1",
                          port=postfix.smtp_port, timeout=30, username=login,
                          password=PASSWORD, start_tls=False, source_address=(OUTSIDE, 0))
    return str(message["Message-ID"])


def assert_nothing_bounced(postfix: Postfix) -> None:
    """No mail waits in Postfix's queue and Postfix made no bounce (backscatter)."""
    assert postfix.queue() == []
    log = postfix.log_text()
    assert "sender non-delivery notification" not in log
    assert "status=bounced" not in log


async def test_a_stranger_outside_mynetworks_is_refused_at_rcpt(
        lmtp_setup: tuple[Postfix, Application]) -> None:
    postfix, app = lmtp_setup
    recipient = f"030123456@{FAX_DOMAIN}"
    async with session(postfix) as smtp:  # 127.0.0.2, no AUTH
        assert (await command(smtp, "MAIL", "FROM:<stranger@evil.example>"))[0] == 250
        code, text = await command(smtp, "RCPT", f"TO:<{recipient}>")
        assert code == 550, text
        # mailfax's own reason, given by its policy service
        assert "5.7.1" in text and "Not allowed: your client address may not send faxes " \
            "here" in text, text
        assert (await command(smtp, "DATA", ""))[0] == 554  # no valid recipients
        await smtp.rset()
        # A stranger using a user's address is refused by reject_sender_login_mismatch.
        assert (await command(smtp, "MAIL", f"FROM:<{ALICE}>"))[0] == 250
        code, text = await command(smtp, "RCPT", f"TO:<{recipient}>")
        assert code == 553 and "not logged in" in text, text
    assert await app.store.list_jobs() == []
    assert_nothing_bounced(postfix)
    # Mail to other domains is not mailfax's business: Postfix's own relay rules hold.
    async with session(postfix) as smtp:
        assert (await command(smtp, "MAIL", "FROM:<stranger@evil.example>"))[0] == 250
        code, text = await command(smtp, "RCPT", "TO:<someone@example.com>")
        assert code == 554 and "Relay access denied" in text, text


async def test_a_logged_in_user_is_accepted_with_their_prefixes_and_quota(
        tmp_path: Path, dovecot: Dovecot) -> None:
    users = {ALICE: {"addresses": [ALICE], "account": "alices",
                     "allowed_prefixes": ["+4930"], "faxes_per_hour": 2}}
    async with setup(tmp_path, dovecot, users=users) as (postfix, app):
        good = [f"030123456@{FAX_DOMAIN}", f"030123457@{FAX_DOMAIN}"]
        async with session(postfix, login=ALICE) as smtp:
            assert (await command(smtp, "MAIL", f"FROM:<{ALICE}>"))[0] == 250
            code, text = await command(smtp, "RCPT", f"TO:<040987654@{FAX_DOMAIN}>")
            assert code == 550, text
            assert f"User {ALICE} may not send faxes to +4940987654 (allowed: +4930)" in text
            for address in good:
                code, text = await command(smtp, "RCPT", f"TO:<{address}>")
                assert code == 250, text
            code, text = await command(smtp, "RCPT", f"TO:<030123458@{FAX_DOMAIN}>")
            assert code == 450 and "4.7.1" in text, text
            assert f"Quota reached: user {ALICE} may send at most 2 faxes per hour" in text
            assert (await send_data(smtp, letter(ALICE, good)))[0] == 250
        await postfix.wait_for_deliveries(dict.fromkeys(good, "sent"))
        jobs = await app.store.list_jobs()
        # The login Postfix checked reached the jobs: alice's account, not the default one.
        assert sorted((job.number, job.account, job.sender) for job in jobs) == [
            ("+4930123456", "alices", ALICE), ("+4930123457", "alices", ALICE)]
        # Her hour is used up now, in a new session too.
        async with session(postfix, login=ALICE) as smtp:
            assert (await command(smtp, "MAIL", f"FROM:<{ALICE}>"))[0] == 250
            code, text = await command(smtp, "RCPT", f"TO:<030123459@{FAX_DOMAIN}>")
            assert code == 450 and "2 already used" in text, text
        assert_nothing_bounced(postfix)


async def test_a_user_forging_another_users_sender_is_refused(
        lmtp_setup: tuple[Postfix, Application], dovecot: Dovecot) -> None:
    postfix, app = lmtp_setup
    recipient = f"030123456@{FAX_DOMAIN}"
    async with session(postfix, login=ALICE) as smtp:
        assert (await command(smtp, "MAIL", f"FROM:<{BOB}>"))[0] == 250
        code, text = await command(smtp, "RCPT", f"TO:<{recipient}>")
        assert code == 553 and f"not owned by user {ALICE}" in text, text
        await smtp.rset()
        # The From: header cannot be seen at RCPT: mailfax refuses it when Postfix hands the
        # mail over, and Postfix tells alice (the logged-in sender, not a forged address).
        assert (await command(smtp, "MAIL", f"FROM:<{ALICE}>"))[0] == 250
        assert (await command(smtp, "RCPT", f"TO:<{recipient}>"))[0] == 250
        assert (await send_data(smtp, letter(BOB, [recipient], "Forged From")))[0] == 250
    lines = await postfix.wait_for_deliveries({recipient: "bounced"})
    assert f"550 5.7.1 Not allowed: user {ALICE} may not send mail From: <{BOB}>" in \
        lines[recipient]
    assert await app.store.list_jobs() == []
    bounce = await dovecot.wait_for(ALICE, "INBOX", lambda message: "Forged From" in
                                    message.as_string() and "MAILER-DAEMON" in
                                    str(message["From"]))
    assert bounce


async def test_a_bad_number_is_refused_at_rcpt_and_good_ones_are_verified_and_faxed(
        lmtp_setup: tuple[Postfix, Application], dovecot: Dovecot) -> None:
    postfix, app = lmtp_setup
    good = [f"030123456@{FAX_DOMAIN}", f"040-987654@{FAX_DOMAIN}"]
    bad = f"0301@{FAX_DOMAIN}"  # too short to be a number
    async with session(postfix, login=ALICE) as smtp:
        assert (await command(smtp, "MAIL", f"FROM:<{ALICE}>"))[0] == 250
        assert (await command(smtp, "RCPT", f"TO:<{good[0]}>"))[0] == 250
        code, text = await command(smtp, "RCPT", f"TO:<{bad}>")
        # reject_unverified_recipient: Postfix probed mailfax, which refused the number.
        assert code == 550 and "5.1.1" in text and "undeliverable address" in text, text
        assert "said: 550 5.1.1" in text, text  # mailfax's reason, passed on
        assert (await command(smtp, "RCPT", f"TO:<{good[1]}>"))[0] == 250
        assert (await send_data(smtp, letter(ALICE, [*good, bad], "Three recipients")))[0] \
            == 250

    lines = await postfix.wait_for_deliveries(dict.fromkeys(good, "sent"))
    assert "queued as" in lines[good[0]]
    log = postfix.log_text()
    # The probes: mailfax answered at RCPT; the probe for the bad number got its reason.
    assert f"to=<{good[0]}>" in log and "status=deliverable" in log
    assert f"to=<{bad}>" in log and "status=undeliverable" in log
    jobs = await app.store.list_jobs()
    assert sorted(job.number for job in jobs) == ["+4930123456", "+4940987654"]
    assert {job.sender for job in jobs} == {ALICE}
    mail = await app.store.get_mail(jobs[0].mail_id)
    assert mail is not None and mail.client_address == "127.0.0.1"
    # The signed header was checked and taken out before the mail became jobs.
    assert all(job.account == "alices" for job in jobs)
    assert_nothing_bounced(postfix)  # no backscatter for the bad number


async def test_a_mynetworks_client_without_login_is_judged_by_mailfax_senders(
        tmp_path: Path, dovecot: Dovecot) -> None:
    async with setup(tmp_path, dovecot,
                     senders={"trusted_networks": ["127.0.0.1/32"],
                              "allowed_addresses": ["scanner@example.org"]}) as (postfix, app):
        recipient = f"030123456@{FAX_DOMAIN}"
        async with session(postfix, source="127.0.0.1") as smtp:
            assert (await command(smtp, "MAIL", "FROM:<printer@example.org>"))[0] == 250
            code, text = await command(smtp, "RCPT", f"TO:<{recipient}>")
            assert code == 550 and "sender <printer@example.org> may not send faxes" in text
            await smtp.rset()
            assert (await command(smtp, "MAIL", "FROM:<scanner@example.org>"))[0] == 250
            assert (await command(smtp, "RCPT", f"TO:<{recipient}>"))[0] == 250
            assert (await send_data(smtp, letter("scanner@example.org", [recipient])))[0] \
                == 250
        # A logged-in user's address need not be in mailfax's sender lists: the signed
        # login counts, not Postfix's address.
        other = f"030123457@{FAX_DOMAIN}"
        await send_through(postfix, [other], "From alice")
        await postfix.wait_for_deliveries({recipient: "sent", other: "sent"})
        jobs = await app.store.list_jobs()
        assert sorted((job.sender, job.account) for job in jobs) == [
            (ALICE, "alices"), ("scanner@example.org", "emulator")]


async def test_a_bounce_to_a_forged_fax_sender_is_not_faxed(
        lmtp_setup: tuple[Postfix, Application]) -> None:
    """Postfix's own bounce (null sender) for a mail whose sender was a fax address goes to
    mailfax through the transport, past every smtpd restriction: mailfax refuses it."""
    postfix, app = lmtp_setup
    forged = f"030123456@{FAX_DOMAIN}"
    async with session(postfix, source="127.0.0.1") as smtp:  # Dovecot will refuse nobody
        assert (await command(smtp, "MAIL", f"FROM:<{forged}>"))[0] == 250
        assert (await command(smtp, "RCPT", "TO:<nobody@example.org>"))[0] == 250
        assert (await send_data(smtp, letter(forged, ["nobody@example.org"])))[0] == 250
    lines = await postfix.wait_for_deliveries({"nobody@example.org": "bounced",
                                               forged: "bounced"})
    assert "said: 550 5.7.1 Mail from <> (a bounce, report or address probe) is not faxed" \
        in lines[forged]
    assert await app.store.list_jobs() == []


async def test_postmaster_of_the_fax_domain_reaches_the_configured_postmaster(
        tmp_path: Path, dovecot: Dovecot) -> None:
    async with setup(tmp_path, dovecot, inbound={"ocr": "off", "postmaster": BOB}) as (
            postfix, app):
        message = fax_mail([], sender="someone@example.net", to=f"postmaster@{FAX_DOMAIN}",
                           subject="About your fax server", body="Hello postmaster")
        async with session(postfix) as smtp:  # anyone may write to postmaster (RFC 5321)
            assert (await command(smtp, "MAIL", "FROM:<someone@example.net>"))[0] == 250
            assert (await command(smtp, "RCPT", f"TO:<postmaster@{FAX_DOMAIN}>"))[0] == 250
            assert (await send_data(smtp, message))[0] == 250
        forwarded = await dovecot.wait_for(BOB, "INBOX", lambda item: str(item["Subject"])
                                           == "About your fax server", timeout=45)
        assert "Hello postmaster" in forwarded[0].as_string()
        assert await app.store.list_jobs() == []


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
    async with setup(tmp_path, dovecot, "transport.smtp") as (postfix, app):
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
        assert job.account == "alices"  # the signed login, over the SMTP hand-over too
        assert reply["X-Mailfax-State"] == "delivered"
        assert reply["Auto-Submitted"] == "auto-replied"
        assert "Contract" in str(reply["Subject"])
        # It went out through Postfix's relay port for mailfax (deploy/postfix/master.cf).
        assert "postfix/mailfax-relay/smtpd" in postfix.log_text()


async def test_mail_through_an_mta_mailfax_does_not_trust_is_refused(
        tmp_path: Path, dovecot: Dovecot) -> None:
    async with setup(tmp_path, dovecot,
                     senders={"trusted_networks": ["192.0.2.0/24"]}) as (postfix, app):
        recipient = f"030123456@{FAX_DOMAIN}"
        async with session(postfix, login=ALICE) as smtp:
            assert (await command(smtp, "MAIL", f"FROM:<{ALICE}>"))[0] == 250
            code, text = await command(smtp, "RCPT", f"TO:<{recipient}>")
        # mailfax refused Postfix's probe: Postfix is not a trusted network of mailfax.
        assert code == 550 and "said: 550 5.7.1" in text, text
        assert await app.store.list_jobs() == []
        assert_nothing_bounced(postfix)
