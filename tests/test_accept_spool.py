"""``smtp.accept = "spool"``: 250 once the raw mail is stored, the documents checked after it,
a refusal coming back as a bounce (DSN) to the envelope sender."""

from __future__ import annotations

import asyncio
import email
import email.policy
import json
import logging
import sqlite3
import time
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from mailfax.app import Application
from mailfax.store import migrate
from tests.conftest import Service, fax_mail, make_settings

BROKEN_PDF = b"%PDF-1.4\n1 0 obj << /Type /Catalog /Pages 2 0 R >>\nthis is not the rest of a PDF"


def spool_settings(tmp_path: Path, accept: str = "spool") -> Any:
    return make_settings(tmp_path, smtp={"listen": ["127.0.0.1:0"], "accept": accept})


async def wait_for_jobs(app: Application, count: int, timeout: float = 20.0) -> list[Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = await app.store.list_jobs()
        if len(jobs) >= count:
            return jobs
        await asyncio.sleep(0.1)
    raise AssertionError(f"fewer than {count} job(s) within {timeout} s")


async def test_a_good_pdf_mail_gets_its_250_and_becomes_a_job(tmp_path: Path,
                                                                corpus: Path) -> None:
    app = Application(spool_settings(tmp_path))
    await app.start()
    try:
        pdf = (corpus / "pdf" / "crazyones.pdf").read_bytes()
        mail = fax_mail([("letter.pdf", pdf, "application/pdf")])
        _, reply = await Service(app).send(mail, "alice@example.org", ["030123456@fax.local"])
        assert reply.startswith("2.0.0 spooled as ")
        jobs = await wait_for_jobs(app, 1)
        assert [job.number for job in jobs] == ["+4930123456"]
        assert jobs[0].pages == 1
        await wait_until_spool_empty(app)
    finally:
        await app.stop()


async def wait_until_spool_empty(app: Application, timeout: float = 10.0) -> None:
    """The spooled mail is gone from the store once its jobs or its bounce are stored."""
    path = app.settings.store_url.removeprefix("sqlite:///")
    deadline = time.monotonic() + timeout
    while True:
        with sqlite3.connect(path) as conn:
            left = conn.execute("SELECT count(*) FROM accept_spool").fetchone()[0]
        if left == 0:
            return
        assert time.monotonic() < deadline, f"{left} spooled mail(s) not removed"
        await asyncio.sleep(0.1)


async def checked_refusal(tmp_path: Path, mail: Any) -> str:
    """What the default (``"checked"``) answers the same mail at DATA."""
    app = Application(spool_settings(tmp_path / "checked", accept="checked"))
    await app.start()
    try:
        with pytest.raises(aiosmtplib.SMTPDataError) as refused:
            await Service(app).send(mail, "alice@example.org", ["030123456@fax.local"])
        assert refused.value.code == 554
        return " ".join(refused.value.message.split())
    finally:
        await app.stop()


async def test_a_broken_pdf_gets_its_250_then_a_bounce_naming_the_file_and_reason(
        tmp_path: Path) -> None:
    mail = fax_mail([("angebot.pdf", BROKEN_PDF, "application/pdf")], subject="Angebot")
    refusal = await checked_refusal(tmp_path, mail)
    assert "angebot.pdf" in refusal
    app = Application(spool_settings(tmp_path))
    await app.start()
    service = Service(app)
    try:
        _, reply = await service.send(mail, "alice@example.org", ["030123456@fax.local"])
        assert reply.startswith("2.0.0 spooled as ")
        report = await service.wait_for_mail(
            lambda m: m.get_content_type() == "multipart/report", timeout=20)
        parsed = email.message_from_bytes(bytes(report), policy=email.policy.default)
        assert parsed["To"] == "alice@example.org"
        assert parsed["In-Reply-To"] == mail["Message-ID"]
        human, status, headers = parsed.get_payload()
        text = " ".join(human.get_content().split())
        assert "angebot.pdf" in text
        assert refusal.split(" ", 1)[1] in text  # the reason the 554 would have given
        fields = status.as_string()
        assert "Final-Recipient: rfc822; 030123456@fax.local" in fields
        assert "Action: failed" in fields and "Status: 5.6." in fields
        assert "Subject: Angebot" in headers.as_string()
        assert await app.store.list_jobs() == []
        await wait_until_spool_empty(app)
    finally:
        await app.stop()


@pytest.mark.parametrize("accept", ["spool", "checked"])
async def test_a_mail_spooled_before_a_crash_is_taken_at_start_up(tmp_path: Path, corpus: Path,
                                                                   accept: str) -> None:
    """Also after switching back to "checked": no spooled mail is left behind."""
    settings = spool_settings(tmp_path, accept)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    await migrate(settings.store_url)
    pdf = (corpus / "pdf" / "crazyones.pdf").read_bytes()
    raw = fax_mail([("letter.pdf", pdf, "application/pdf")], to="0309991111@fax.local")
    spool_directly(settings, "0309991111@fax.local", raw.as_bytes())
    app = Application(settings)
    await app.start()
    try:
        jobs = await wait_for_jobs(app, 1)
        assert [job.number for job in jobs] == ["+49309991111"]
        await wait_until_spool_empty(app)
    finally:
        await app.stop()


def spool_directly(settings: Any, recipient: str, message: bytes) -> None:
    """A mail as DATA spooled it, written into the table (as a crash would leave it)."""
    with sqlite3.connect(settings.store_url.removeprefix("sqlite:///")) as conn:
        conn.execute("INSERT INTO accept_spool (received_at, envelope_from, recipients, client,"
                     " message) VALUES (?, ?, ?, ?, ?)",
                     (time.time(), "alice@example.org", json.dumps([recipient]), "127.0.0.1",
                      message))


async def test_a_temporary_refusal_keeps_the_mail_spooled_without_a_bounce(
        tmp_path: Path, corpus: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Two mails spooled, a quota of one fax an hour: the second is refused for now (452),
    so it stays spooled to be tried again; no job, no bounce for it."""
    caplog.set_level(logging.INFO, logger="mailfax.intake.accept_spool")
    settings = make_settings(tmp_path, smtp={"listen": ["127.0.0.1:0"], "accept": "spool"},
                             quotas={"faxes_per_hour": 1})
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    await migrate(settings.store_url)
    pdf = (corpus / "pdf" / "crazyones.pdf").read_bytes()
    for number in ("0309991111", "0309992222"):
        mail = fax_mail([("letter.pdf", pdf, "application/pdf")], to=f"{number}@fax.local")
        spool_directly(settings, f"{number}@fax.local", mail.as_bytes())
    app = Application(settings)
    await app.start()
    try:
        jobs = await wait_for_jobs(app, 1)
        assert [job.number for job in jobs] == ["+49309991111"]
        path = settings.store_url.removeprefix("sqlite:///")
        deadline = time.monotonic() + 10
        while True:
            with sqlite3.connect(path) as conn:
                left = conn.execute("SELECT recipients, leased_until FROM accept_spool"
                                    ).fetchall()
            if len(left) == 1 and left[0][1] > time.time():  # the first one done; the
                break  # second taken by the worker, and kept
            assert time.monotonic() < deadline, left
            await asyncio.sleep(0.1)
        assert [json.loads(row[0]) for row in left] == [["0309992222@fax.local"]]
        kept = [r.getMessage() for r in caplog.records if "kept to try again" in r.getMessage()]
        assert len(kept) == 1 and "faxes per hour" in kept[0], kept
        assert len(await app.store.list_jobs()) == 1
        with sqlite3.connect(path) as conn:  # a bounce is queued here before the Maildir
            bounces = conn.execute("SELECT count(*) FROM outbox WHERE kind = 'dsn'").fetchone()
        assert bounces == (0,)
        assert not [m for m in Service(app).outbox_messages()
                    if m.get_content_type() == "multipart/report"]
    finally:
        await app.stop()


async def test_senders_and_recipients_are_still_refused_at_rcpt(tmp_path: Path) -> None:
    app = Application(spool_settings(tmp_path))
    await app.start()
    try:
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=Service(app).port) as client:
            await client.mail("alice@example.org")
            with pytest.raises(aiosmtplib.SMTPRecipientRefused) as refused:
                await client.rcpt("abc@fax.local")
            assert refused.value.code == 550
    finally:
        await app.stop()
