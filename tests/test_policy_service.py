"""mailfax's Postfix policy service and the hooks behind it, without Postfix: the protocol
(pure), the verdicts for requests as Postfix sends them, the signed header reaching intake over
mailfax's own LMTP listener, verification probes and postmaster@. The same against a real
Postfix is in tests/test_postfix.py."""

from __future__ import annotations

import asyncio
import mailbox
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from mailfax.app import Application
from mailfax.intake.assemble import Refusal
from mailfax.trust.authorization import (
    HEADER,
    AuthorizationError,
    authorized_user,
    header_value,
    parse_header,
    strip_headers,
)
from mailfax.trust.policy_service import (
    BadRequest,
    PolicyDecider,
    Transaction,
    format_answer,
    parse_request,
)
from tests.conftest import fax_mail, make_settings
from tests.ports import free_port

FAX = "fax.example.org"
ALICE = "alice@example.org"
PDF = (b"%PDF-1.4\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj\n"
       b"2 0 obj<</Type/Pages/Kids[3 0 R]/Count 1>>endobj\n"
       b"3 0 obj<</Type/Page/Parent 2 0 R/MediaBox[0 0 595 842]>>endobj\n"
       b"trailer<</Root 1 0 R>>\n%%EOF\n")
KEY = bytes(range(32))


# -- the protocol, pure --------------------------------------------------------------------


def test_a_request_is_name_value_lines_and_the_first_value_counts() -> None:
    block = (b"request=smtpd_access_policy\nprotocol_state=RCPT\nsender=a@b.c\n"
             b"recipient=030123456@fax.example.org\nsasl_username=\nsize=0\n"
             b"sender=second@b.c\nccert_subject=x=y\n")
    request = parse_request(block)
    assert request["request"] == "smtpd_access_policy"
    assert request["sender"] == "a@b.c"
    assert request["sasl_username"] == ""
    assert request["ccert_subject"] == "x=y"  # only the first "=" separates


@pytest.mark.parametrize("block", [b"protocol_state=RCPT\n", b"request=smtpd_access_policy\n"
                                   b"no equals sign here\n", b"=value\nrequest=x\n"])
def test_what_is_not_a_request_is_refused(block: bytes) -> None:
    with pytest.raises(BadRequest):
        parse_request(block)


def test_an_answer_is_one_action_line_and_an_empty_line() -> None:
    assert format_answer("DUNNO") == b"action=DUNNO\n\n"
    # A line break inside would end the answer early and desynchronise the connection.
    assert format_answer("550 5.1.1 bad\nnumber\r\n") == b"action=550 5.1.1 bad number\n\n"


# -- the signed header, pure ----------------------------------------------------------------


def test_the_header_binds_user_sender_recipient_and_time() -> None:
    value = header_value(KEY, "alice", "Alice@Example.org", f"030123456@{FAX}", 1_700_000_000)
    item = parse_header(KEY, value)
    assert (item.user, item.sender, item.recipient, item.issued) == (
        "alice", ALICE, f"030123456@{FAX}", 1_700_000_000)
    for forged in (value.replace("user=alice", "user=bob"),
                   value.replace("ts=1700000000", "ts=1800000000"),
                   value.replace("sender=alice@", "sender=bob@")):
        assert forged != value
        with pytest.raises(AuthorizationError, match="did not make"):
            parse_header(KEY, forged)
    with pytest.raises(AuthorizationError, match="did not make"):
        parse_header(bytes(32), value)  # another installation's key
    with pytest.raises(AuthorizationError, match="malformed"):
        parse_header(KEY, "user=alice; mac=abc")


def test_the_header_applies_only_to_its_mail_and_only_while_fresh() -> None:
    now = 1_700_000_000
    value = header_value(KEY, "alice", ALICE, f"030123456@{FAX}", now)
    assert authorized_user(KEY, [value], ALICE, [f"030123456@{FAX}"], now + 60, 3600) == "alice"
    assert authorized_user(KEY, [], ALICE, [f"030123456@{FAX}"], now, 3600) is None
    with pytest.raises(AuthorizationError, match="another mail"):
        authorized_user(KEY, [value], "bob@example.org", [f"030123456@{FAX}"], now, 3600)
    with pytest.raises(AuthorizationError, match="another mail"):
        authorized_user(KEY, [value], ALICE, [f"040999@{FAX}"], now, 3600)
    with pytest.raises(AuthorizationError, match="older than 3600 seconds"):
        authorized_user(KEY, [value], ALICE, [f"030123456@{FAX}"], now + 3601, 3600)
    with pytest.raises(AuthorizationError, match="cannot check"):
        authorized_user(None, [value], ALICE, [f"030123456@{FAX}"], now, 3600)
    bob = header_value(KEY, "bob", ALICE, f"030123456@{FAX}", now)
    with pytest.raises(AuthorizationError, match="different users"):
        authorized_user(KEY, [value, bob], ALICE, [f"030123456@{FAX}"], now, 3600)


def test_stripping_takes_every_folded_copy_and_leaves_the_body() -> None:
    raw = (b"X-Mailfax-Authorized: v=1; user=alice;\r\n ts=1\r\nFrom: a@b.c\r\n"
           b"x-mailfax-authorized : second\r\nSubject: hi\r\n\r\n"
           b"X-Mailfax-Authorized: in the body stays\r\n")
    stripped, values = strip_headers(raw)
    assert values == ["v=1; user=alice; ts=1", "second"]
    assert stripped == (b"From: a@b.c\r\nSubject: hi\r\n\r\n"
                        b"X-Mailfax-Authorized: in the body stays\r\n")


# -- the verdicts, as Postfix asks ----------------------------------------------------------


def policy_settings(tmp_path: Path, **overrides: Any) -> Any:
    values: dict[str, Any] = {
        "fax_domains": [FAX], "senders": {"trusted_networks": ["127.0.0.1/32"]},
        "smtp": {"listen": ["127.0.0.1:0"], "lmtp_listen": [f"127.0.0.1:{free_port()}"]},
        "policy_service": {"listen": f"127.0.0.1:{free_port()}"},
        "inbound": {"ocr": "off", "postmaster": "pm@example.org"},
        # Users known from Postfix's logins: no password_hash, no login at mailfax itself.
        "users": {"alice": {"addresses": [ALICE], "allowed_prefixes": ["+4930"],
                            "faxes_per_hour": 2},
                  "bob": {"addresses": ["bob@example.org"]}}}
    return make_settings(tmp_path, **{**values, **overrides})


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[Application]:
    application = Application(policy_settings(tmp_path))
    await application.start()
    try:
        yield application
    finally:
        await application.stop()


def rcpt(recipient: str, sender: str = ALICE, client: str = "127.0.0.2", user: str = "",
         instance: str = "1.1", size: str = "0") -> dict[str, str]:
    return {"request": "smtpd_access_policy", "protocol_state": "RCPT",
            "protocol_name": "ESMTP", "sender": sender, "recipient": recipient,
            "client_address": client, "sasl_username": user, "instance": instance,
            "size": size, "recipient_count": "0"}


async def test_a_stranger_is_refused_with_mailfaxs_own_reason(app: Application) -> None:
    decider = PolicyDecider(app.intake, KEY)
    answer = await decider.decide(rcpt(f"030123456@{FAX}", sender="x@evil.example"),
                                  Transaction())
    assert answer.startswith("550 5.7.1 Not allowed: your client address may not send faxes")


async def test_the_real_client_is_judged_not_postfix(app: Application) -> None:
    decider = PolicyDecider(app.intake, KEY)
    answer = await decider.decide(rcpt(f"030123456@{FAX}", client="127.0.0.1"), Transaction())
    assert answer == "DUNNO"  # a trusted network: Postfix's permit_mynetworks decides


async def test_other_domains_and_other_states_are_not_mailfaxs_business(
        app: Application) -> None:
    decider = PolicyDecider(app.intake, KEY)
    assert await decider.decide(rcpt("someone@example.com"), Transaction()) == "DUNNO"
    mail_stage = {**rcpt(f"030123456@{FAX}"), "protocol_state": "MAIL"}
    assert await decider.decide(mail_stage, Transaction()) == "DUNNO"
    assert await decider.decide(rcpt(f"Postmaster@{FAX}", sender="x@evil.example"),
                                Transaction()) == "OK"


async def test_a_logged_in_user_gets_the_signed_header(app: Application) -> None:
    decider = PolicyDecider(app.intake, KEY, clock=lambda: 1_700_000_000)
    answer = await decider.decide(rcpt(f"030123456@{FAX}", user="alice"), Transaction())
    assert answer.startswith(f"PREPEND {HEADER}: v=1; user=alice; sender=alice@example.org;")
    item = parse_header(KEY, answer.split(": ", 1)[1])
    assert (item.user, item.recipient, item.issued) == ("alice", f"030123456@{FAX}",
                                                        1_700_000_000)


async def test_the_users_sender_prefixes_and_quota_hold(app: Application) -> None:
    decider = PolicyDecider(app.intake, KEY)
    transaction = Transaction()
    forged = await decider.decide(rcpt(f"030123456@{FAX}", sender="bob@example.org",
                                       user="alice"), transaction)
    assert forged == "550 5.7.1 Not allowed: user alice may not send as <bob@example.org>."
    outside = await decider.decide(rcpt(f"040987654@{FAX}", user="alice"), transaction)
    assert outside.startswith("550 5.7.1 User alice may not send faxes to +4940987654 "
                              "(allowed: +4930)")
    unknown = await decider.decide(rcpt(f"030123456@{FAX}", user="mallory"), transaction)
    assert unknown.startswith("550 5.7.1 Not allowed: user mallory")
    bad = await decider.decide(rcpt(f"0301@{FAX}", user="alice"), transaction)
    assert bad.startswith("550 5.1.1 ")
    premium = await decider.decide(rcpt(f"09001234567@{FAX}", sender="bob@example.org",
                                        user="bob"), transaction)
    assert premium.startswith("550 5.7.1 +499001234567 is a premium-rate number")
    # faxes_per_hour = 2: two recipients of one mail pass, the third waits.
    for number in ("030123456", "030123457"):
        answer = await decider.decide(rcpt(f"{number}@{FAX}", user="alice"), transaction)
        assert answer.startswith("PREPEND"), answer
    third = await decider.decide(rcpt(f"030123458@{FAX}", user="alice"), transaction)
    assert third.startswith("DEFER_IF_PERMIT 4.7.1 Quota reached: user alice may send at "
                            "most 2 faxes per hour")
    # A new mail (another instance) counts afresh from the store: nothing stored yet.
    answer = await decider.decide(rcpt(f"030123458@{FAX}", user="alice", instance="1.2"),
                                  transaction)
    assert answer.startswith("PREPEND")


async def test_null_sender_and_size_are_refused_before_data(app: Application) -> None:
    decider = PolicyDecider(app.intake, KEY)
    bounce = await decider.decide(rcpt(f"030123456@{FAX}", sender="", client="127.0.0.1"),
                                  Transaction())
    assert bounce.startswith("550 5.7.1 Mail from <> (a bounce, report or address probe) "
                             "is not faxed")
    big = await decider.decide(rcpt(f"030123456@{FAX}", user="alice", size="999999999"),
                               Transaction())
    assert big.startswith("552 5.3.4 Message too big")


async def test_the_service_speaks_the_protocol_over_tcp(app: Application) -> None:
    port = int(app.settings.policy_service.listen.split(":")[1])  # type: ignore[union-attr]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for request, expected in ((rcpt("x@example.com"), b"action=DUNNO\n\n"),
                                  (rcpt(f"040987654@{FAX}", user="alice"),
                                   b"action=550 5.7.1 User alice may not send faxes to")):
            writer.write("".join(f"{name}={value}\n" for name, value in request.items())
                         .encode() + b"\n")
            await writer.drain()
            answer = await asyncio.wait_for(reader.readuntil(b"\n\n"), 10)
            assert answer.startswith(expected), answer
        writer.write(b"garbage without equals\n\n")  # no answer, the connection closes
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 10) == b""
    finally:
        writer.close()


# -- the header at intake (mailfax's LMTP listener, as Postfix hands mail over) ------------


class Lmtp:
    """A plain LMTP client, as Postfix's lmtp(8) talks to mailfax."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, app: Application) -> Lmtp:
        port = int(app.settings.smtp.lmtp_listen[0].split(":")[1])
        client = cls(*await asyncio.open_connection("127.0.0.1", port))
        await client.reply()
        assert (await client.command("LHLO postfix.test"))[0] == 250
        return client

    async def reply(self) -> tuple[int, str]:
        lines = []
        while True:
            line = (await asyncio.wait_for(self.reader.readline(), 30)).decode()
            lines.append(line[4:].strip())
            if line[3:4] != "-":
                return int(line[:3]), " ".join(lines)

    async def command(self, text: str) -> tuple[int, str]:
        self.writer.write(text.encode() + b"\r\n")
        await self.writer.drain()
        return await self.reply()

    async def close(self) -> None:
        await self.command("QUIT")
        self.writer.close()


async def lmtp_send(app: Application, message: bytes, sender: str,
                    recipients: list[str]) -> dict[str, tuple[int, str]]:
    """LMTP hand-over; each recipient's reply (to RCPT if refused there, else to DATA)."""
    client = await Lmtp.connect(app)
    try:
        assert (await client.command(f"MAIL FROM:<{sender}>"))[0] == 250
        accepted = []
        answers: dict[str, tuple[int, str]] = {}
        for address in recipients:
            answer = await client.command(f"RCPT TO:<{address}>")
            if answer[0] == 250:
                accepted.append(address)
            else:
                answers[address] = answer
        if accepted:
            assert (await client.command("DATA"))[0] == 354
            body = message.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
            body = b"\r\n".join(b"." + line if line.startswith(b".") else line
                                for line in body.split(b"\r\n"))
            client.writer.write(body + b"\r\n.\r\n")
            await client.writer.drain()
            for address in accepted:
                answers[address] = await client.reply()
        return answers
    finally:
        await client.close()


def signed_mail(user: str, sender: str, recipients: list[str], issued: int | None = None,
                from_header: str | None = None) -> bytes:
    message = fax_mail([("letter.pdf", PDF, "application/pdf")], sender=from_header or sender,
                       to=", ".join(recipients))
    issued = int(time.time()) if issued is None else issued
    headers = b"".join(f"{HEADER}: {header_value(KEY, user, sender, address, issued)}\r\n"
                       .encode() for address in recipients)
    return headers + message.as_bytes()


async def test_the_signed_user_reaches_the_job_and_the_header_is_gone(
        tmp_path: Path) -> None:
    app = Application(policy_settings(tmp_path, accounts={
        "emulator": {"provider": "emulator"}, "alices": {"provider": "emulator"}},
        users={"alice": {"addresses": [ALICE], "account": "alices",
                         "allowed_prefixes": ["+4930"]}}))
    await app.start()
    try:
        app.intake.secret_key = KEY
        recipient = f"030123456@{FAX}"
        answers = await lmtp_send(app, signed_mail("alice", ALICE, [recipient]), ALICE,
                                  [recipient])
        assert answers[recipient][0] == 250, answers
        jobs = await app.store.list_jobs()
        assert [(job.number, job.account) for job in jobs] == [("+4930123456", "alices")]
        # The user's prefixes hold at intake too (a header for another number is no help).
        other = f"040987654@{FAX}"
        answers = await lmtp_send(app, signed_mail("alice", ALICE, [other]), ALICE, [other])
        assert answers[other][0] == 550 and "may not send faxes to +4940987654" in \
            answers[other][1]
        # The user's From: binding holds.
        answers = await lmtp_send(app, signed_mail("alice", ALICE, [recipient],
                                                   from_header="bob@example.org"),
                                  ALICE, [recipient])
        assert answers[recipient][0] == 550 and "From: <bob@example.org>" in \
            answers[recipient][1]
    finally:
        await app.stop()


@pytest.mark.parametrize("tamper", ["forged", "stale", "other key"])
async def test_a_header_mailfax_did_not_make_refuses_the_mail(app: Application,
                                                              tamper: str) -> None:
    app.intake.secret_key = KEY
    recipient = f"030123456@{FAX}"
    raw = signed_mail("alice", ALICE, [recipient],
                      issued=int(time.time()) - (200_000 if tamper == "stale" else 0))
    if tamper == "forged":
        raw = raw.replace(b"user=alice", b"user=bob", 1)
    if tamper == "other key":
        app.intake.secret_key = bytes(32)
    answers = await lmtp_send(app, raw, ALICE, [recipient])
    code, text = answers[recipient]
    assert code == 550 and text.startswith("5.7.1"), answers
    assert ("did not make" if tamper != "stale" else "older than") in text
    assert await app.store.list_jobs() == []


async def test_a_mail_without_the_header_from_the_mta_is_the_trusted_networks(
        app: Application) -> None:
    recipient = f"040987654@{FAX}"  # outside alice's prefixes: no user applies
    message = fax_mail([("letter.pdf", PDF, "application/pdf")], sender=ALICE, to=recipient)
    answers = await lmtp_send(app, message.as_bytes(), ALICE, [recipient])
    assert answers[recipient][0] == 250
    assert [job.account for job in await app.store.list_jobs()] == ["emulator"]


async def test_sender_lists_hold_for_the_mta_but_a_signed_user_passes(
        tmp_path: Path) -> None:
    app = Application(policy_settings(tmp_path, senders={
        "trusted_networks": ["127.0.0.1/32"], "allowed_addresses": ["scanner@example.org"]}))
    await app.start()
    try:
        app.intake.secret_key = KEY
        recipient = f"030123456@{FAX}"
        unsigned = fax_mail([("letter.pdf", PDF, "application/pdf")], to=recipient)
        answers = await lmtp_send(app, unsigned.as_bytes(), ALICE, [recipient])
        assert answers[recipient][0] == 550
        assert "sender <alice@example.org> may not send faxes" in answers[recipient][1]
        assert await app.store.list_jobs() == []
        answers = await lmtp_send(app, signed_mail("alice", ALICE, [recipient]), ALICE,
                                  [recipient])
        assert answers[recipient][0] == 250, answers
        assert len(await app.store.list_jobs()) == 1
    finally:
        await app.stop()


# -- verification probes and postmaster ----------------------------------------------------


@pytest.mark.parametrize("probe_sender", ["", "double-bounce@mx.example.org"])
async def test_a_verification_probe_is_answered_at_rcpt_and_nothing_queued(
        app: Application, probe_sender: str) -> None:
    client = await Lmtp.connect(app)
    try:
        assert (await client.command(f"MAIL FROM:<{probe_sender}>"))[0] == 250
        good = await client.command(f"RCPT TO:<030123456@{FAX}>")
        assert good[0] == 250, good
        bad = await client.command(f"RCPT TO:<0301@{FAX}>")
        assert bad[0] == 550 and bad[1].startswith("5.1.1"), bad
        premium = await client.command(f"RCPT TO:<09001234567@{FAX}>")
        assert premium[0] == 550 and "premium-rate" in premium[1], premium
        assert (await client.command("RSET"))[0] == 250  # what Postfix's verify does next
    finally:
        await client.close()
    assert await app.store.list_jobs() == []


async def test_a_null_sender_mail_that_does_send_data_is_not_faxed(app: Application) -> None:
    recipient = f"030123456@{FAX}"
    message = fax_mail([("letter.pdf", PDF, "application/pdf")], to=recipient)
    answers = await lmtp_send(app, message.as_bytes(), "", [recipient])
    assert answers[recipient][0] == 550 and "is not faxed" in answers[recipient][1]
    assert await app.store.list_jobs() == []


async def test_postmaster_is_accepted_and_forwarded_to_the_configured_postmaster(
        app: Application) -> None:
    message = fax_mail([], sender="someone@example.net", to=f"postmaster@{FAX}",
                       subject="Your server", body="Hello postmaster")
    answers = await lmtp_send(app, message.as_bytes(), "someone@example.net",
                              [f"postmaster@{FAX}", f"030123456@{FAX}"])
    assert answers[f"postmaster@{FAX}"] == (250, "2.0.0 forwarded to the postmaster")
    deadline = time.monotonic() + 20
    found: list[mailbox.MaildirMessage] = []
    while time.monotonic() < deadline and not found:
        if app.settings.maildir_path.exists():
            found = [item for item in mailbox.Maildir(app.settings.maildir_path, create=False)
                     if item["Subject"] == "Your server"]
        await asyncio.sleep(0.1)
    assert found, "nothing forwarded"
    forwarded = found[0]
    assert "Hello postmaster" in forwarded.as_string()
    assert forwarded["X-Mailfax-Postmaster"].startswith(f"forwarded for postmaster@{FAX}")
    # The mail had no document, so its fax recipient is refused alone (LMTP).
    assert answers[f"030123456@{FAX}"][0] == 554  # nothing to fax
    # Forwarding it again would loop: refused.
    again = await lmtp_send(app, forwarded.as_bytes(), "", [f"postmaster@{FAX}"])
    assert again[f"postmaster@{FAX}"][0] == 554


def test_the_policy_service_listens_on_loopback_only(tmp_path: Path) -> None:
    from pydantic import ValidationError

    assert make_settings(tmp_path, policy_service={"listen": "[::1]:10040"}).policy_service \
        .listen == "[::1]:10040"
    assert make_settings(tmp_path).policy_service.listen is None  # off by default
    with pytest.raises(ValidationError, match="listen on loopback"):
        make_settings(tmp_path, policy_service={"listen": "0.0.0.0:10040"})


def test_a_refusal_never_leaves_the_policy_answer_multi_line() -> None:
    from mailfax.trust.policy_service import refusal_action

    assert refusal_action(Refusal(452, "4.7.1", "Quota\nreached")) == \
        "DEFER_IF_PERMIT 4.7.1 Quota reached"
    assert refusal_action(Refusal(550, "5.1.1", "bad\x00number")) == "550 5.1.1 bad number"


def test_only_the_header_section_is_searched_and_a_plain_mail_is_left_as_it_is() -> None:
    plain = b"Subject: hi\r\n\r\nX-Mailfax-Authorized: quoted in the body\r\n"
    assert strip_headers(plain) == (plain, [])
    assert strip_headers(plain)[0] is plain  # not split and joined again
    signed = b"X-Mailfax-Authorized: a=1\r\n b=2\r\nSubject: hi\r\n\r\nX-Mailfax-Authorized: x\r\n"
    assert strip_headers(signed) == (b"Subject: hi\r\n\r\nX-Mailfax-Authorized: x\r\n",
                                     ["a=1 b=2"])
