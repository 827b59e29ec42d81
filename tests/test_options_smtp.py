"""Per-mail options over SMTP, with each provider's emulator (README "Per-mail options").

The clock is the test's: :class:`ShiftedClock` stands in for ``time`` in the store, the bundled
emulator and the FAX.de and Retarus emulators, so a fax scheduled two hours ahead is sent when
the test moves the clock past its time, not before. Intake reads the same clock.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from types import ModuleType
from typing import Any
from zoneinfo import ZoneInfo

import aiosmtplib
import httpx
import pytest

import mailfax.emulators.faxde
import mailfax.emulators.retarus
import mailfax.providers.emulator
import mailfax.store.sqlite
from mailfax.app import Application
from mailfax.emulators import faxde as faxde_emulator
from mailfax.emulators import faxnummer as faxnummer_emulator
from mailfax.emulators import retarus as retarus_emulator
from mailfax.model import JobState
from mailfax.providers.capabilities import PROVIDER_SCHEDULE_LEAD
from mailfax.store.base import Job
from tests.conftest import Service, fax_mail, make_settings
from tests.test_faxnummer import mailfax_cli

BERLIN = ZoneInfo("Europe/Berlin")
PASSWORD = "s3cr3t"
TO = "004930123456@fax.local"


class ShiftedClock:
    """``time`` as the modules it replaces see it: the real clock plus an offset the test
    moves forward (``time()`` and ``monotonic()``; everything else is the real module's)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def time(self) -> float:
        return time.time() + self.offset

    def monotonic(self) -> float:
        return time.monotonic() + self.offset

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.time(), UTC)

    def advance(self, delta: timedelta) -> None:
        self.offset += delta.total_seconds()


CLOCKED: list[ModuleType] = [mailfax.store.sqlite, mailfax.providers.emulator,
                             mailfax.emulators.faxde, mailfax.emulators.retarus]


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> ShiftedClock:
    shifted = ShiftedClock()
    for module in CLOCKED:
        monkeypatch.setattr(module, "time", shifted)
    return shifted


@asynccontextmanager
async def running(tmp_path: Path, clock: ShiftedClock, account: dict[str, Any] | None = None,
                  **overrides: Any) -> AsyncIterator[Service]:
    accounts = {"main": account} if account else {}
    settings = make_settings(tmp_path, **({"accounts": {**accounts, "emulator": {
        "provider": "emulator", "delay_seconds": 0.3, "seconds_per_page": 20}},
        "default_account": "main"} if account else {}), **overrides)
    app = Application(settings)
    await app.start()
    app.intake.clock = clock.now
    try:
        yield Service(app)
    finally:
        await app.stop()


def option_mail(pdf: bytes, **headers: str) -> EmailMessage:
    mail = fax_mail([("offer.pdf", pdf, "application/pdf")], to=TO, subject="Offer")
    for name, value in headers.items():
        mail[name.replace("_", "-")] = value
    return mail


def berlin_minute(when: datetime) -> tuple[str, datetime]:
    """``when`` as a sender in Berlin writes it (to the minute), and the UTC time it means."""
    text = when.astimezone(BERLIN).strftime("%Y-%m-%d %H:%M")
    return text, datetime.strptime(text, "%Y-%m-%d %H:%M").replace(tzinfo=BERLIN).astimezone(UTC)


def mail_options(options: dict[str, Any]) -> dict[str, Any]:
    """A job's options without the fax-readiness check's mark (tests/test_readiness.py)."""
    return {name: value for name, value in options.items() if name != "readiness"}


async def fax(service: Service, mail: EmailMessage) -> Job:
    _, reply = await service.send(mail, "alice@example.org", [TO])
    job = await service.app.store.get_job(reply.split()[-1])
    assert job is not None
    return job


async def refused(service: Service, mail: EmailMessage) -> aiosmtplib.SMTPDataError:
    with pytest.raises(aiosmtplib.SMTPDataError) as error:
        await service.send(mail, "alice@example.org", [TO])
    assert await service.app.store.list_jobs() == []
    return error.value


async def until(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.1)


async def until_final(service: Service, job_id: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not (await state_of(service, job_id)).is_final:
        assert time.monotonic() < deadline, f"job {job_id} not finished in time"
        await asyncio.sleep(0.1)


async def delivered(service: Service) -> email.message.EmailMessage:
    message = await service.wait_for_mail(lambda m: m["X-Mailfax-State"] == "delivered")
    parsed = email.message_from_bytes(bytes(message), policy=email.policy.default)
    assert isinstance(parsed, email.message.EmailMessage)
    return parsed


async def state_of(service: Service, job_id: str) -> JobState:
    job = await service.app.store.get_job(job_id)
    assert job is not None
    return job.state


async def move_past(service: Service, clock: ShiftedClock, send_at: datetime) -> None:
    clock.advance(send_at - clock.now() + timedelta(seconds=2))
    service.app.dispatcher.wake()


async def fax_in_two_hours(service: Service, clock: ShiftedClock, corpus: Path,
                           **headers: str) -> tuple[Job, datetime]:
    """A PDF mailed with ``X-Fax-Send-At`` two hours ahead (Berlin time) and ``headers``;
    the job and the send time it means."""
    pdf = (corpus / "pdf" / "crazyones.pdf").read_bytes()
    text, send_at = berlin_minute(clock.now() + timedelta(hours=2))
    return await fax(service, option_mail(pdf, X_Fax_Send_At=text, **headers)), send_at


async def handed_over_before_its_time(service: Service, clock: ShiftedClock,
                                      send_at: datetime) -> None:
    """Held in mailfax's queue (a job at the provider counts as a call to its number until
    it ends) until ``PROVIDER_SCHEDULE_LEAD`` before ``send_at``, then handed over."""
    await asyncio.sleep(1.5)  # several dispatcher turns
    jobs = await service.app.store.list_jobs()
    assert [(job.state, job.attempts) for job in jobs] == [(JobState.QUEUED, 0)]
    await move_past(service, clock, send_at - PROVIDER_SCHEDULE_LEAD)


async def held_by_the_provider_then_delivered(service: Service, clock: ShiftedClock, job: Job,
                                              send_at: datetime) -> None:
    """The provider has the job and keeps it (FAX.de: JobStatus 6 "still in progress",
    Retarus: PENDING) until the clock passes ``send_at``; then it is delivered."""
    await asyncio.sleep(1.5)  # several status polls
    assert await state_of(service, job.id) in (JobState.SUBMITTED, JobState.SENDING)
    assert service.outbox_messages() == []
    await move_past(service, clock, send_at)
    await delivered(service)


# -- a schedule mailfax holds (the bundled emulator, Faxnummer.de) -------------------------

async def test_emulator_schedule_is_held_in_mailfax_until_its_time(
        tmp_path: Path, corpus: Path, clock: ShiftedClock) -> None:
    pdf = (corpus / "pdf" / "crazyones.pdf").read_bytes()
    text, send_at = berlin_minute(clock.now() + timedelta(hours=2))
    async with running(tmp_path, clock) as service:
        job = await fax(service, option_mail(pdf, X_Fax_Send_At=text))
        assert mail_options(job.options) == {"send_at": send_at.isoformat()}
        assert job.next_attempt_at == send_at  # the dispatcher claims it only then
        await asyncio.sleep(1.5)  # several dispatcher turns
        code, output = await mailfax_cli(tmp_path, "jobs", "--json")  # what a user reads
        [shown] = json.loads(output)
        assert code == 0 and shown["state"] == "queued" and shown["attempts"] == 0
        assert mail_options(shown["options"]) == {"send_at": send_at.isoformat()}
        assert shown["next_attempt_at"] == send_at.isoformat()
        assert service.outbox_messages() == []
        await move_past(service, clock, send_at)
        status = await delivered(service)
        assert status["X-Mailfax-Job"] == job.id
        events = await service.app.store.job_events(job.id)
        submitted = next(event for event in events if event.state == JobState.SUBMITTED)
        assert submitted.at >= send_at


async def test_faxnummer_schedule_is_held_in_mailfax_and_the_header_is_ssender(
        tmp_path: Path, corpus: Path, clock: ShiftedClock) -> None:
    emulator = await faxnummer_emulator.start("127.0.0.1", 0, {
        "login": "acc12345", "code": PASSWORD, "delay": "0.3"})
    account = {"provider": "faxnummer.de", "url": emulator.url, "product_login": "acc12345",
               "product_code": PASSWORD, "status_email": "fax-admin@example.org"}
    pdf = (corpus / "pdf" / "crazyones.pdf").read_bytes()
    try:
        async with running(tmp_path, clock, account) as service:
            job = await fax(service, option_mail(pdf, X_Fax_Delay="2h",
                                                 X_Fax_Header="Kanzlei Müller"))
            assert job.next_attempt_at is not None
            assert job.next_attempt_at - clock.now() > timedelta(hours=1, minutes=59)
            await asyncio.sleep(1.5)
            assert emulator.state.faxes == []  # nothing reached Faxnummer.de
            await move_past(service, clock, job.next_attempt_at)
            await delivered(service)
            [sent] = emulator.state.faxes
            assert sent.fields["sSender"] == "Kanzlei Mueller"
            assert "sSendDateTime" not in sent.fields  # the API has no send time
    finally:
        await emulator.close()


# -- a schedule the provider keeps (FAX.de, Retarus) --------------------------------------

async def test_fax_de_gets_senddatetime_header_and_station_id_before_the_time(
        tmp_path: Path, corpus: Path, clock: ShiftedClock) -> None:
    server = await faxde_emulator.start("127.0.0.1", 0, {"password": PASSWORD, "delay": "0.5"})
    account = {"provider": "fax.de", "account": "123456", "password": PASSWORD,
               "wsdl_url": server.wsdl_url}
    try:
        async with running(tmp_path, clock, account) as service:
            job, send_at = await fax_in_two_hours(
                service, clock, corpus, X_Fax_Header="Kanzlei Müller & Söhne",
                X_Fax_Station_Id="+49 30 1234567")
            assert not server.state.jobs
            await handed_over_before_its_time(service, clock, send_at)
            await until(lambda: bool(server.state.jobs))
            [sent] = server.state.jobs.values()
            assert sent.send_at == send_at
            assert sent.options["FAXHEADER"] == "Kanzlei Mueller & Soehne"
            assert sent.options["STATIONID"] == "+49 30 1234567"
            await held_by_the_provider_then_delivered(service, clock, job, send_at)
    finally:
        await server.close()


async def test_retarus_gets_jobvalid_start_header_csid_and_resolution(
        tmp_path: Path, corpus: Path, clock: ShiftedClock) -> None:
    emulator = await retarus_emulator.start("127.0.0.1", 0, {"delay": "0.3"})
    account = {"provider": "retarus", **emulator.provider_settings()}
    try:
        async with running(tmp_path, clock, account) as service:
            job, send_at = await fax_in_two_hours(
                service, clock, corpus, X_Fax_Header="Kanzlei Müller",
                X_Fax_Station_Id="+49 30 1234567", X_Fax_Resolution="standard")
            await handed_over_before_its_time(service, clock, send_at)
            await until(lambda: bool(emulator.state.jobs))
            [sent] = emulator.state.jobs.values()
            start = datetime.fromisoformat(sent.request["meta"]["jobValid"]["start"])
            assert start.tzinfo is not None and start == send_at
            assert sent.request["renderingOptions"]["header"] == "Kanzlei Müller"
            assert sent.request["renderingOptions"]["resolution"] == "LOW"
            assert sent.request["transportOptions"]["csid"] == "+49 30 1234567"
            await held_by_the_provider_then_delivered(service, clock, job, send_at)
    finally:
        await emulator.close()


# -- what a provider cannot do, and bad values -------------------------------------------

@pytest.mark.parametrize(("provider", "headers", "sentence"), [
    ("emulator", {"X-Fax-Header": "Kanzlei"}, "The option X-Fax-Header cannot be used: the "
     "bundled emulator does not let the sender set the fax header line."),
    ("fax.de", {"X-Fax-Resolution": "fine"}, "The option X-Fax-Resolution cannot be used: "
     "FAX.de does not let the sender set the resolution."),
    ("fax.de", {"X-Fax-Header": "x" * 31}, "The option X-Fax-Header is 31 characters long; "
     "FAX.de takes at most 30."),
    ("faxnummer.de", {"X-Fax-Resolution": "standard"}, "The option X-Fax-Resolution cannot be "
     "used: Faxnummer.de does not let the sender set the resolution."),
    ("faxnummer.de", {"X-Fax-Header": "Muster", "X-Fax-Station-Id": "+4930123"},
     "The options X-Fax-Header and X-Fax-Station-Id differ, but Faxnummer.de has one field "
     "for both (sSender); give one of them."),
    ("retarus", {"X-Fax-Header": "100% Muster"}, "The option X-Fax-Header contains '%', "
     "which Retarus reads as the start of a placeholder; leave it out."),
])
async def test_an_option_the_provider_cannot_do_is_refused_at_data_with_its_reason(
        tmp_path: Path, corpus: Path, clock: ShiftedClock, provider: str,
        headers: dict[str, str], sentence: str) -> None:
    accounts: dict[str, dict[str, Any]] = {
        "emulator": {},
        "fax.de": {"provider": "fax.de", "account": "123456", "password": PASSWORD,
                   "wsdl_url": "http://127.0.0.1:9/xmlws.exe?wsdl/IntfXMLWS"},
        "faxnummer.de": {"provider": "faxnummer.de", "url": "http://127.0.0.1:9/",
                         "product_login": "acc1", "product_code": PASSWORD,
                         "status_email": "fax-admin@example.org"},
        "retarus": {"provider": "retarus", "customer_number": "99999TE",
                    "username": "mailfax", "password": PASSWORD,
                    "send_url": "http://127.0.0.1:9/ha/rest/v1",
                    "data_centres": {"DE1": "http://127.0.0.1:9/dc/DE1/rest/v1"}},
    }
    pdf = (corpus / "pdf" / "crazyones.pdf").read_bytes()
    mail = option_mail(pdf)
    for name, value in headers.items():
        mail[name] = value
    async with running(tmp_path, clock, accounts[provider] or None) as service:
        error = await refused(service, mail)
    assert error.code == 554
    assert error.message == f"5.3.3 {sentence}"


async def test_a_send_time_in_the_past_or_too_far_ahead_is_refused_naming_the_header(
        tmp_path: Path, corpus: Path, clock: ShiftedClock) -> None:
    pdf = (corpus / "pdf" / "crazyones.pdf").read_bytes()
    past, _ = berlin_minute(clock.now() - timedelta(hours=1))
    later, _ = berlin_minute(clock.now() + timedelta(days=31))
    async with running(tmp_path, clock) as service:
        error = await refused(service, option_mail(pdf, X_Fax_Send_At=past))
        assert error.code == 554
        assert error.message.startswith(f"5.6.0 X-Fax-Send-At: '{past}' is in the past")
        error = await refused(service, option_mail(pdf, X_Fax_Send_At=later))
        assert error.message == (f"5.6.0 X-Fax-Send-At: '{later}' is more than 30 days ahead; "
                                 "faxes can be scheduled at most 30 days in advance.")
        error = await refused(service, option_mail(pdf, X_Fax_Priority="urgent"))
        assert error.message == ("5.6.0 X-Fax-Priority: 'urgent' is not a valid value; use "
                                 "normal or bulk.")


# -- options mailfax does itself --------------------------------------------------------

async def test_notify_none_and_failure_keep_the_delivered_mail_away(
        tmp_path: Path, corpus: Path, clock: ShiftedClock) -> None:
    pdf = (corpus / "pdf" / "crazyones.pdf").read_bytes()
    async with running(tmp_path, clock) as service:
        quiet = await fax(service, option_mail(pdf, X_Fax_Notify="none"))
        failing = option_mail(pdf, X_Fax_Notify="failure")
        _, reply = await service.send(failing, "alice@example.org", ["030999123@fax.local"])
        failed_id = reply.split()[-1]
        only_failure = await fax(service, option_mail(pdf, X_Fax_Notify="failure"))
        normal = await fax(service, option_mail(pdf))
        for job_id in (quiet.id, failed_id, only_failure.id, normal.id):
            await until_final(service, job_id)
        await service.wait_for_mail(lambda m: m["X-Mailfax-Job"] == failed_id)
        await service.wait_for_mail(lambda m: m["X-Mailfax-Job"] == normal.id)
        await asyncio.sleep(1.0)  # the notifier's turns for the other two
        mailed = {message["X-Mailfax-Job"] for message in service.outbox_messages()}
    assert mailed == {normal.id, failed_id}


async def test_x_fax_cover_yes_puts_the_text_in_front(
        tmp_path: Path, corpus: Path, clock: ShiftedClock) -> None:
    pdf = (corpus / "pdf" / "crazyones.pdf").read_bytes()
    async with running(tmp_path, clock) as service:
        plain = await fax(service, option_mail(pdf))
        covered = await fax(service, option_mail(pdf, X_Fax_Cover="yes"))
    assert covered.pages == plain.pages + 1
    assert mail_options(covered.options) == {"cover": True}


async def test_subject_codes_when_turned_on_are_options_and_leave_the_subject(
        tmp_path: Path, corpus: Path, clock: ShiftedClock) -> None:
    pdf = (corpus / "pdf" / "crazyones.pdf").read_bytes()
    mail = fax_mail([("offer.pdf", pdf, "application/pdf")], to=TO,
                    subject="Offer /delay 2h /p bulk /n failure")
    async with running(tmp_path, clock, options={"subject_codes": True}) as service:
        job = await fax(service, mail)
        stored = await service.app.store.get_mail(job.mail_id)
    assert stored is not None and stored.subject == "Offer"
    assert job.options["priority"] == "bulk" and job.options["notify"] == "failure"
    assert datetime.fromisoformat(job.options["send_at"]) - clock.now() > timedelta(hours=1.9)


async def test_the_retarus_emulator_refuses_a_start_without_a_zone_as_the_docs_say() -> None:
    emulator = await retarus_emulator.start("127.0.0.1", 0, {})
    settings = emulator.provider_settings()
    body: dict[str, Any] = {"recipients": [{"number": "+4930123456"}],
                            "documents": [{"name": "a.txt", "data": "dGVzdGZheAo="}],
                            "meta": {"customerReference": "x",
                                     "jobValid": {"start": "2026-12-24T08:00:00"}}}
    try:
        async with httpx.AsyncClient(auth=(settings["username"], settings["password"])) as client:
            url = f"{settings['send_url']}/{settings['customer_number']}/fax"
            answer = await client.post(url, json=body)
            assert answer.status_code == 400 and "has no time zone" in answer.text
            body["meta"]["jobValid"]["start"] = "2026-12-24T08:00:00+01:00"
            assert (await client.post(url, json=body)).status_code == 200
    finally:
        await emulator.close()
