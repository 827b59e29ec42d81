"""Broadcast lists over real SMTP: list-customers@fax.local becomes one job per number of a
CSV list and one summary mail once every job has ended; the dial policy, who may use the
list, and the quotas still hold."""

from __future__ import annotations

import asyncio
import email
import email.policy
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from mailfax.app import Application, preflight
from mailfax.config import ConfigError, load_settings
from mailfax.model import JobState
from mailfax.outbound.broadcast import summary_due
from mailfax.providers.base import SendRequest
from tests.acceptance import documents
from tests.conftest import Service, fax_mail, make_settings

# 50 Berlin numbers the emulator delivers, but one that is busy every time (+4930999…)
NUMBERS = [f"030 1234 56{index:02d}" for index in range(49)] + ["030 999 123"]
PREMIUM = "0900 1234567"  # a premium-rate number: refused by the default dial policy
LIST = "list-customers@fax.local"


def write_list(folder: Path) -> Path:
    """customers.csv as exported by a spreadsheet: a header, ";" between the columns, the
    premium-rate number in the middle and one number twice."""
    rows = ["Fax Number;Name"]
    rows += [f"{number};Customer {index}" for index, number in enumerate(NUMBERS[:25])]
    rows.append(f"{PREMIUM};Premium Line GmbH")
    rows += [f"{number};Customer {index + 25}" for index, number in enumerate(NUMBERS[25:])]
    rows.append(f"{NUMBERS[0]};Customer 0 again")
    path = folder / "customers.csv"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def list_settings(tmp_path: Path, **list_overrides: Any) -> dict[str, Any]:
    return {"customers": {"file": str(write_list(tmp_path)),
                          "allowed": ["alice@example.org", "@team.example.org"],
                          **list_overrides}}


@pytest.fixture
async def lists_service(tmp_path: Path) -> AsyncIterator[Service]:
    app = Application(make_settings(tmp_path, lists=list_settings(tmp_path)))
    await app.start()
    try:
        yield Service(app)
    finally:
        await app.stop()


def parsed(message: Any) -> email.message.EmailMessage:
    result = email.message_from_bytes(bytes(message), policy=email.policy.default)
    assert isinstance(result, email.message.EmailMessage)
    return result


def jobs_json(tmp_path: Path, data_dir: Path) -> list[dict[str, Any]]:
    """``mailfax jobs --json``, as the user runs it."""
    config = tmp_path / "cli.toml"
    config.write_text(f'data_dir = "{data_dir}"\n')
    result = subprocess.run([sys.executable, "-m", "mailfax", "-c", str(config), "jobs",
                             "--json"], capture_output=True, text=True, timeout=120,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    jobs = data["jobs"] if isinstance(data, dict) else data
    assert isinstance(jobs, list)
    return jobs


async def refused_rcpt(service: Service, sender: str, address: str
                      ) -> aiosmtplib.SMTPRecipientRefused:
    """The refusal of RCPT TO:<address> after MAIL FROM:<sender>."""
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=service.port) as client:
        await client.mail(sender)
        with pytest.raises(aiosmtplib.SMTPRecipientRefused) as refused:
            await client.rcpt(address)
    return refused.value


async def test_a_list_of_50_numbers_is_50_jobs_and_one_summary_listing_the_refused(
        lists_service: Service, tmp_path: Path) -> None:
    mail = fax_mail([("offer.pdf", documents.pdf(2), "application/pdf")], to=LIST,
                    subject="Spring offer")
    errors, reply = await lists_service.send(mail, "alice@example.org", [LIST])
    assert errors == {}
    assert "50 faxes to the broadcast list customers" in reply
    assert "1 number refused by the dial policy" in reply

    summary = parsed(await lists_service.wait_for_mail(
        lambda m: m["X-Mailfax-State"] == "summary", timeout=90))
    store = lists_service.app.store
    jobs = await store.list_jobs()
    assert len(jobs) == 50
    assert sorted(job.number for job in jobs) == sorted(
        ["+49301234" + f"56{index:02d}" for index in range(49)] + ["+4930999123"])
    assert {job.options["broadcast"] for job in jobs} == {"customers"}
    assert all(job.state.is_final for job in jobs)
    assert len({job.mail_id for job in jobs}) == 1
    listed = jobs_json(tmp_path, lists_service.app.settings.data_dir)
    assert len(listed) == 50
    assert "+499001234567" not in {job["number"] for job in listed}

    await asyncio.sleep(2.0)  # nothing else may follow: no per-job mails, no 2nd summary
    mails = [parsed(message) for message in lists_service.outbox_messages()]
    assert [m["X-Mailfax-State"] for m in mails] == ["summary"]
    assert summary["To"] == "alice@example.org"
    assert summary["In-Reply-To"] == mail["Message-ID"]
    assert summary["X-Mailfax-Broadcast"] == "customers"
    assert summary["Subject"] == ("Re: Spring offer — Broadcast to list customers: 49 of 51 "
                                  "delivered, 1 failed, 1 refused")
    text = summary.get_body(("plain",))
    html = summary.get_body(("html",))
    assert text is not None and html is not None
    lines = text.get_content().splitlines()
    premium = next(line for line in lines if "+49 900 1 234567" in line)
    assert "Premium Line GmbH" in premium
    assert "REFUSED by the dial policy: +499001234567 is a premium-rate number" in premium
    busy = next(line for line in lines if "+49 30 999123" in line)
    assert "FAILED: The line was busy every time we called." in busy
    delivered = [line for line in lines if line.rstrip().endswith(" delivered")]
    assert len(delivered) == 49
    assert "Customer 0 " in delivered[0] and "Customer 25 " in delivered[25]
    body = html.get_content()
    assert body.count('<tr class="delivered">') == 49
    assert body.count('<tr class="refused">') == 1
    assert body.count('<tr class="failed">') == 1


async def test_a_sender_the_list_does_not_allow_is_refused_at_rcpt(
        lists_service: Service) -> None:
    refused = await refused_rcpt(lists_service, "mallory@example.org", LIST)
    assert refused.code == 550
    assert "5.7.1" in refused.message
    assert "broadcast list customers" in refused.message
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=lists_service.port) as client:
        await client.mail("bob@team.example.org")  # the list allows the whole domain
        code, message = await client.rcpt(LIST)
        assert code == 250
        assert "list customers (50 numbers)" in message


async def test_an_unknown_list_is_refused_at_rcpt(lists_service: Service) -> None:
    refused = await refused_rcpt(lists_service, "alice@example.org",
                                 "list-suppliers@fax.local")
    assert refused.code == 550
    assert "5.1.1" in refused.message
    assert "list-suppliers@fax.local" in refused.message


async def test_a_list_goes_in_a_mail_of_its_own(lists_service: Service) -> None:
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=lists_service.port) as client:
        await client.mail("alice@example.org")
        assert (await client.rcpt("030123456@fax.local"))[0] == 250
        with pytest.raises(aiosmtplib.SMTPRecipientRefused) as refused:
            await client.rcpt(LIST)
        assert refused.value.code == 452
        assert "4.5.3" in refused.value.message
        await client.rset()  # the other way round: a fax recipient after the list
        await client.mail("alice@example.org")
        assert (await client.rcpt(LIST))[0] == 250
        with pytest.raises(aiosmtplib.SMTPRecipientRefused) as refused:
            await client.rcpt("030123456@fax.local")
        assert refused.value.code == 452
        assert "4.5.3" in refused.value.message
    assert await lists_service.app.store.list_jobs() == []


async def test_the_quota_counts_every_page_of_the_list(tmp_path: Path) -> None:
    app = Application(make_settings(tmp_path, lists=list_settings(tmp_path),
                                    quotas={"pages_per_day": 60}))
    await app.start()
    try:
        service = Service(app)
        mail = fax_mail([("offer.pdf", documents.pdf(2), "application/pdf")], to=LIST)
        with pytest.raises(aiosmtplib.SMTPDataError) as refused:
            await service.send(mail, "alice@example.org", [LIST])
        assert refused.value.code == 452
        assert "this mail needs 100" in refused.value.message
        assert await app.store.list_jobs() == []
    finally:
        await app.stop()


async def test_the_accounts_concurrency_limits_the_sends_of_a_list(tmp_path: Path) -> None:
    app = Application(make_settings(tmp_path, lists=list_settings(tmp_path),
                                    dispatch={"concurrency": 3}))
    await app.start()
    try:
        provider: Any = app.providers["emulator"].inner
        original = provider.send_many
        at_once = [0, 0]  # now, most

        async def slow_send_many(requests: list[SendRequest]) -> Any:
            at_once[0] += len(requests)
            at_once[1] = max(at_once[1], at_once[0])
            try:
                await asyncio.sleep(0.05)
                return await original(requests)
            finally:
                at_once[0] -= len(requests)

        provider.send_many = slow_send_many
        service = Service(app)
        mail = fax_mail([("offer.pdf", documents.pdf(1), "application/pdf")], to=LIST)
        await service.send(mail, "alice@example.org", [LIST])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            jobs = await app.store.list_jobs()
            if all(job.state not in (JobState.QUEUED, JobState.RETRYING) for job in jobs):
                break
            await asyncio.sleep(0.1)
        assert len(jobs) == 50
        assert at_once[1] == 3  # the limit was reached, and never passed
    finally:
        await app.stop()


def test_a_bad_number_in_the_csv_refuses_the_start_naming_the_line(tmp_path: Path) -> None:
    path = write_list(tmp_path)
    lines = path.read_text().splitlines()
    lines[3] = "030 12x45;Typo AG"
    path.write_text("\n".join(lines) + "\n")
    config = tmp_path / "mailfax.toml"
    config.write_text(f'data_dir = "{tmp_path / "data"}"\n'
                      '[lists.customers]\nfile = "customers.csv"\n'
                      'allowed = ["alice@example.org"]\n')
    settings = load_settings(config)  # the file is relative to the config's folder
    assert settings.lists["customers"].file == path
    with pytest.raises(ConfigError, match=r"lists\.customers: .*customers\.csv line 4: "):
        preflight(settings)
    result = subprocess.run([sys.executable, "-m", "mailfax", "-c", str(config),
                             "check-config"], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "customers.csv line 4" in result.stderr


def test_numbers_may_be_given_in_the_config_and_a_list_needs_allowed(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, lists={"board": {
        "numbers": ["030 123456", {"number": "+49 89 123456", "name": "Munich"}],
        "allowed": ["@example.org"]}})
    preflight(settings)
    with pytest.raises(ValueError, match="allowed"):
        make_settings(tmp_path, lists={"board": {"numbers": ["030 123456"]}})
    with pytest.raises(ValueError, match="not both"):
        make_settings(tmp_path, lists={"board": {"numbers": ["030 123456"],
                                                 "file": "x.csv", "allowed": ["@x.org"]}})


def test_the_summary_is_due_once_every_job_has_ended_and_once_per_change() -> None:
    from datetime import UTC, datetime, timedelta

    from mailfax.store.base import Event, Job

    start = datetime(2026, 1, 1, tzinfo=UTC)

    def job(job_id: str, state: JobState, seconds: int, **options: Any) -> Job:
        return Job(id=job_id, mail_id="m", account="emulator", number="+4930123456",
                   state=state, pages=1, sender="a@b.c", created=start,
                   updated=start + timedelta(seconds=seconds), attempts=1,
                   next_attempt_at=None, provider_job_id="p", reason=None,
                   duration_seconds=None, remote_id=None,
                   options={"broadcast": "x", **options},
                   cancel_requested=False, acknowledged=False)

    def event(of: Job) -> Event:
        return Event(id=1, job_id=of.id, at=of.updated, state=of.state, reason=None,
                     detail="")

    first, last = job("a", JobState.DELIVERED, 5), job("b", JobState.FAILED, 9)
    assert summary_due(event(last), last, [first, last], None)
    assert summary_due(event(first), first, [first, last], None)  # whichever comes first
    after = start + timedelta(seconds=10)
    assert not summary_due(event(last), last, [first, last], after)  # already sent
    retried = job("b", JobState.DELIVERED, 60)  # `mailfax retry`, delivered this time
    assert summary_due(event(retried), retried, [first, retried], after)
    sending = job("b", JobState.SENDING, 9)
    assert not summary_due(event(first), first, [first, sending], None)
    stale = Event(id=1, job_id="b", at=last.updated, state=JobState.UNCONFIRMED, reason=None,
                  detail="")
    assert not summary_due(stale, last, [first, last], None)  # the job moved on since
    quiet = job("a", JobState.DELIVERED, 5, notify="none")
    assert not summary_due(event(quiet), quiet, [quiet], None)


async def test_failure_mode_mails_each_failed_fax_and_the_summary_speaks_german(
        tmp_path: Path) -> None:
    lists = {"board": {"numbers": ["030 123456", {"number": "030 999 124", "name": "Vorstand"},
                                   "0900 1234567"],
                       "allowed": ["alice@example.org"], "job_mails": "failure"}}
    app = Application(make_settings(tmp_path, lists=lists,
                                    notify={"from_address": "fax@mailfax.test",
                                            "language": "de"}))
    await app.start()
    try:
        service = Service(app)
        mail = fax_mail([("a.pdf", documents.pdf(1), "application/pdf")],
                        to="list-board@fax.local", subject="Einladung")
        await service.send(mail, "alice@example.org", ["list-board@fax.local"])
        summary = parsed(await service.wait_for_mail(
            lambda m: m["X-Mailfax-State"] == "summary", timeout=60))
        await service.wait_for_mail(lambda m: m["X-Mailfax-State"] == "failed")
        await asyncio.sleep(1.0)
        states = sorted(parsed(m)["X-Mailfax-State"] for m in service.outbox_messages())
        assert states == ["failed", "summary"]
        assert summary["Subject"] == ("Re: Einladung — Rundsendung an Liste board: 1 von 3 "
                                      "zugestellt, 1 fehlgeschlagen, 1 abgelehnt")
        text = summary.get_body(("plain",))
        assert text is not None
        row = next(line for line in text.get_content().splitlines() if "Vorstand" in line)
        assert "+49 30 999124" in row and "FEHLGESCHLAGEN" in row
    finally:
        await app.stop()


async def test_a_lists_cover_page_shows_no_recipient_numbers(tmp_path: Path) -> None:
    import io

    import pypdf

    lists = {"board": {"numbers": ["030 123456", "089 123456"],
                       "allowed": ["alice@example.org"], "account": "second"}}
    app = Application(make_settings(tmp_path, lists=lists, accounts={
        "emulator": {"provider": "emulator"}, "second": {"provider": "emulator"}}))
    await app.start()
    try:
        service = Service(app)
        address = "list-board+cover@fax.local"
        mail = fax_mail([("a.pdf", documents.pdf(1), "application/pdf")], to=address,
                        body="Dear board, the agenda is attached.")
        _, reply = await service.send(mail, "alice@example.org", [address])
        assert "2 faxes to the broadcast list board" in reply
        jobs = await app.store.list_jobs()
        assert len(jobs) == 2 and jobs[0].pages == 2  # the cover and the document
        assert {job.account for job in jobs} == {"second"}  # the list's account
        cover = (await app.store.load_documents(jobs[0].mail_id))[0]
        text = pypdf.PdfReader(io.BytesIO(cover.data)).pages[0].extract_text()
        assert "Dear board, the agenda is attached." in text
        assert "alice@example.org" in text
        assert "123456" not in text and "To" not in text.split()
    finally:
        await app.stop()


async def test_postfix_in_front_the_policy_service_and_the_signed_user_hold_for_lists(
        tmp_path: Path) -> None:
    from mailfax.trust.policy_service import PolicyDecider, Transaction
    from tests.test_policy_service import (
        ALICE,
        FAX,
        KEY,
        lmtp_send,
        policy_settings,
        rcpt,
        signed_mail,
    )

    lists = {"board": {"numbers": ["030 123456", {"number": "089 123456", "name": "Munich"}],
                       "allowed": [ALICE]}}
    app = Application(policy_settings(tmp_path, lists=lists))  # alice: only +4930 numbers
    await app.start()
    try:
        app.intake.secret_key = KEY
        address = f"list-board@{FAX}"
        decider = PolicyDecider(app.intake, KEY)
        answer = await decider.decide(rcpt(address, user="alice"), Transaction())
        assert answer.startswith("PREPEND X-Mailfax-Authorized:"), answer
        refused = await decider.decide(rcpt(address, sender="bob@example.org", user="bob"),
                                       Transaction())
        assert refused.startswith("550 5.7.1") and "broadcast list board" in refused
        unknown = await decider.decide(rcpt(f"list-nope@{FAX}", user="alice"), Transaction())
        assert unknown.startswith("550 5.1.1")

        answers = await lmtp_send(app, signed_mail("alice", ALICE, [address]), ALICE,
                                  [address])
        assert answers[address][0] == 250, answers
        assert "1 fax to the broadcast list board" in answers[address][1]
        assert "1 number refused" in answers[address][1]
        jobs = await app.store.list_jobs()
        assert [job.number for job in jobs] == ["+4930123456"]
        assert jobs[0].options["broadcast_refused"] == [{
            "number": "+4989123456", "name": "Munich", "index": 1,
            "reason": "User alice may not send faxes to +4989123456 (allowed: +4930)."}]
    finally:
        await app.stop()


@pytest.mark.parametrize(("text", "expected"), [
    ("030 123456,Alice\n089 123456,Bob\n", [("+4930123456", "Alice"), ("+4989123456", "Bob")]),
    ("\ufeffName\tFax\n# a comment\nAlice\t030 123456\n\nBob\t+49 89 123456\n",
     [("+4930123456", "Alice"), ("+4989123456", "Bob")]),
    ("Nummer;Firma\n030/123456;Müller & Söhne\n0049-30-123456;twice\n",
     [("+4930123456", "Müller & Söhne")]),
    ("+4930123456\n", [("+4930123456", "")]),
])
def test_csv_lists_in_the_forms_spreadsheets_write(
        tmp_path: Path, text: str, expected: list[tuple[str, str]]) -> None:
    from mailfax.intake.broadcast import load_lists

    (tmp_path / "list.csv").write_text(text, encoding="utf-8")
    settings = make_settings(tmp_path, lists={"l": {"file": str(tmp_path / "list.csv"),
                                                    "allowed": ["@example.org"]}})
    entries = load_lists(settings)["l"].entries
    assert [(entry.number, entry.name) for entry in entries] == expected
    assert [entry.index for entry in entries] == list(range(len(expected)))


@pytest.mark.parametrize(("text", "problem"), [
    ("number,name\n030 123456,A\n,B\n", r"list\.csv line 3: no number in column 1"),
    ("030 123456\n030 12x456\n", r"list\.csv line 2: .*030 12x456"),
    ("number,name\n", "the list has no numbers"),
])
def test_a_bad_list_is_named_with_its_line(tmp_path: Path, text: str, problem: str) -> None:
    (tmp_path / "list.csv").write_text(text, encoding="utf-8")
    settings = make_settings(tmp_path, lists={"l": {"file": str(tmp_path / "list.csv"),
                                                    "allowed": ["@example.org"]}})
    with pytest.raises(ConfigError, match=problem):
        preflight(settings)


def test_a_missing_list_file_refuses_the_start(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, lists={"l": {"file": str(tmp_path / "nope.csv"),
                                                    "allowed": ["@example.org"]}})
    with pytest.raises(ConfigError, match=r"lists\.l\.file: cannot read .*nope\.csv"):
        preflight(settings)


async def test_with_the_spool_intake_a_list_mail_is_expanded_after_the_250(
        tmp_path: Path) -> None:
    lists = {"board": {"numbers": ["030 123456", "089 123456", "0900 1234567"],
                       "allowed": ["alice@example.org"]}}
    app = Application(make_settings(tmp_path, lists=lists,
                                    smtp={"listen": ["127.0.0.1:0"], "accept": "spool"}))
    await app.start()
    try:
        service = Service(app)
        mail = fax_mail([("a.pdf", documents.pdf(1), "application/pdf")],
                        to="list-board@fax.local")
        _, reply = await service.send(mail, "alice@example.org", ["list-board@fax.local"])
        assert "spooled as" in reply
        summary = parsed(await service.wait_for_mail(
            lambda m: m["X-Mailfax-State"] == "summary", timeout=60))
        assert "2 of 3 delivered, 1 refused" in summary["Subject"]
        assert len(await app.store.list_jobs()) == 2
    finally:
        await app.stop()
