"""Time and the providers: outages hold (with one "delayed" mail), account refusals pause the
account (one admin alert) until it works again, and a tracked job cannot wait for ever.

The long ones run on a clock the test controls: the dispatcher, the tracker and the store all
read it, so 30 minutes or 24 hours pass in a fraction of a second. The providers are the real
clients against their emulators on loopback.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import io
import time
import types
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiohttp
import pikepdf
import pytest

from mailfax import reasons
from mailfax.app import Application
from mailfax.config import DispatchSettings, NotifySettings, Settings
from mailfax.emulators import faxde as faxde_emulator
from mailfax.emulators import faxnummer as faxnummer_emulator
from mailfax.model import JobState
from mailfax.outbound.dispatch import Dispatcher, outcome_of_error
from mailfax.outbound.notify import Notifier, Renderer
from mailfax.outbound.tracking import Tracker
from mailfax.providers import faxde, faxnummer
from mailfax.providers.base import ErrorKind, FaxDocument, ProviderContext, ProviderError
from mailfax.store import sqlite as sqlite_store
from mailfax.store.base import Job, NewJob, NewMail
from mailfax.store.sqlite import SqliteStore
from tests.conftest import Service, fax_mail, make_settings


class SimClock:
    """Wall-clock time that moves only when the test says so."""

    def __init__(self) -> None:
        self.now_seconds = time.time()

    def time(self) -> float:
        return self.now_seconds

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.now_seconds, UTC)

    def advance(self, seconds: float) -> None:
        self.now_seconds += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> SimClock:
    """The clock, also as the SQLite store's time (created, updated, due, leases)."""
    sim = SimClock()
    monkeypatch.setattr(sqlite_store, "time", types.SimpleNamespace(time=sim.time))
    return sim


def one_page_pdf() -> bytes:
    pdf = pikepdf.new()
    pdf.add_blank_page(page_size=(595, 842))
    out = io.BytesIO()
    pdf.save(out)
    return out.getvalue()


@dataclass
class Rig:
    """A store, a dispatcher, a tracker and a notifier sharing one simulated clock."""

    store: SqliteStore
    dispatcher: Dispatcher
    tracker: Tracker
    notifier: Notifier
    clock: SimClock

    async def queue(self, count: int, account: str) -> list[str]:
        pdf = FaxDocument("letter.pdf", one_page_pdf(), 1)
        ids = []
        for index in range(count):
            mail = NewMail(mail_id=f"m{index}", envelope_from=f"sender{index}@example.org",
                           message_id=f"<m{index}@example.org>", subject=f"Letter {index}",
                           references=[], from_header="", client_address="127.0.0.1")
            ids.append(f"job{index:09d}")
            # A number each: a second job to one number would wait for the first's call to
            # end (one call per number), which only the tracker sees.
            await self.store.add_mail_jobs(
                mail, [NewJob(ids[-1], f"+49301234{index:02d}", account)], [pdf])
        return ids

    async def step(self, seconds: float) -> None:
        """Let ``seconds`` pass, then do what the loops would do at that moment."""
        self.clock.advance(seconds)
        await self.dispatcher.run_once()
        await self.notifier.handle_pending()

    async def jobs(self) -> list[Job]:
        return sorted(await self.store.list_jobs(), key=lambda job: job.id)

    async def mails(self, kind: str | None = None) -> list[tuple[str, EmailMessage]]:
        """(kind, message) of every mail in the outbox, oldest first."""
        items = await self.store.due_outbox(1000)
        found = []
        for item in items:
            message = email.message_from_bytes(item.message, policy=email.policy.default)
            assert isinstance(message, EmailMessage)
            if kind is None or message["X-Mailfax-State"] == kind or (
                    kind == "delayed" and "delayed" in str(message["Subject"])):
                found.append((str(message["X-Mailfax-State"]), message))
        return found


@pytest.fixture
async def faxnummer_fake() -> AsyncIterator[faxnummer_emulator.FaxnummerEmulator]:
    server = await faxnummer_emulator.start("127.0.0.1", 0, {"delay": "0"})
    yield server
    await server.close()


def faxnummer_provider(server: faxnummer_emulator.FaxnummerEmulator, tmp_path: Path,
                       code: str = "secret") -> faxnummer.FaxnummerProvider:
    settings = faxnummer.Settings.model_validate({
        "url": server.url, "product_login": "acc12345", "product_code": code,
        "status_email": "admin@example.org", "connect_retries": 0})
    return faxnummer.create(ProviderContext(account="fn", data_dir=tmp_path), settings)


@pytest.fixture
def rig_factory(tmp_path: Path, clock: SimClock) -> Any:
    """Makes a :class:`Rig` for some providers; the test closes its store."""

    async def make(providers: dict[str, Any], **dispatch: Any) -> Rig:
        settings = DispatchSettings(retry_initial_seconds=30, retry_max_seconds=300,
                                    **dispatch)
        store = SqliteStore(tmp_path / "store.sqlite3")
        await store.open()
        rig = Rig(
            store=store,
            dispatcher=Dispatcher(store, providers, settings, "test", clock=clock.now),
            tracker=Tracker(store, providers, 20.0, clock=clock.now,
                            default_deadline=timedelta(hours=settings.max_tracking_hours),
                            lifetime=settings.max_age),
            notifier=Notifier(store, NotifySettings(from_address="fax@mailfax.test"),
                              Renderer()),
            clock=clock)
        return rig

    return make


async def test_a_provider_down_for_30_minutes_holds_the_faxes_and_warns_once(
        rig_factory: Any, faxnummer_fake: faxnummer_emulator.FaxnummerEmulator,
        tmp_path: Path, clock: SimClock) -> None:
    faxnummer_fake.state.clock = clock.time  # the emulator's jobs progress on our clock
    provider = faxnummer_provider(faxnummer_fake, tmp_path)
    rig = await rig_factory({"fn": provider}, delay_warning_hours=0.25)
    try:
        faxnummer_fake.state.faults.http_error_count = 10**9  # down: 503 to every call
        job_ids = await rig.queue(2, "fn")
        await rig.step(0)
        for _ in range(180):  # 30 minutes in steps of 10 s
            await rig.step(10)
        jobs = await rig.jobs()
        assert {job.state for job in jobs} == {JobState.RETRYING}, jobs
        assert all(job.attempts >= 6 for job in jobs)  # the old limit: failed for good here
        delayed = await rig.mails("delayed")
        assert sorted(str(message["To"]) for _, message in delayed) == [
            "sender0@example.org", "sender1@example.org"]  # one each, not one per retry
        text = delayed[0][1].get_body(("plain",)).get_content()  # type: ignore[union-attr]
        assert "has not been sent yet" in text and "you do not need to send it again" in text
        assert "HTTP 503" not in text  # people read the reason, not the provider's wording
        assert not faxnummer_fake.state.faxes

        faxnummer_fake.state.faults.http_error_count = 0  # back
        for _ in range(40):
            await rig.step(10)
            if all(job.state != JobState.RETRYING for job in await rig.jobs()):
                break
        await rig.tracker.poll_all()
        await rig.notifier.handle_pending()
        jobs = await rig.jobs()
        assert [job.state for job in jobs] == [JobState.DELIVERED] * 2
        assert len(faxnummer_fake.state.faxes) == 2  # one fax per job
        delivered = await rig.mails("delivered")
        assert len(delivered) == 2 and len(await rig.mails("delayed")) == 2
        assert {job.id for job in jobs} == set(job_ids)
    finally:
        await provider.close()
        await rig.store.close()


async def test_at_the_end_of_the_lifetime_the_sender_gets_the_failure(
        rig_factory: Any, faxnummer_fake: faxnummer_emulator.FaxnummerEmulator,
        tmp_path: Path) -> None:
    provider = faxnummer_provider(faxnummer_fake, tmp_path)
    rig = await rig_factory({"fn": provider}, delay_warning_hours=0.25, max_age_hours=1)
    try:
        faxnummer_fake.state.faults.http_error_count = 10**9
        await rig.queue(1, "fn")
        await rig.step(0)
        for _ in range(60 * 6 + 6):  # 61 minutes
            await rig.step(10)
        (job,) = await rig.jobs()
        assert job.state == JobState.FAILED
        assert job.reason is not None and job.reason.code == "too_many_attempts"
        mails = await rig.mails()
        assert [kind for kind, _ in mails] == ["retrying", "failed"]  # delayed, then the end
        assert "delayed" in str(mails[0][1]["Subject"])
        text = mails[1][1].get_body(("plain",)).get_content()  # type: ignore[union-attr]
        assert "We gave up after" in text and "in 1 h" in text
    finally:
        await provider.close()
        await rig.store.close()


def test_the_delay_warning_falls_on_one_retry_only() -> None:
    settings = DispatchSettings(delay_warning_hours=1, retry_initial_seconds=60)
    error = ProviderError(reasons.reason("provider_unavailable"), transient=True)
    queued = datetime(2026, 1, 1, tzinfo=UTC)
    notices = []
    last: datetime | None = None
    at = queued
    while at < queued + timedelta(hours=3):
        transition = outcome_of_error(error, 1, settings, at, queued_at=queued,
                                      last_failure_at=last)
        assert transition.state == JobState.RETRYING
        notices.append(transition.reason is not None and transition.reason.code == "delayed")
        last, at = at, at + timedelta(minutes=7)
    assert notices.count(True) == 1
    assert notices.index(True) == 9  # the first failure at or after 60 minutes (9 × 7 min)


@pytest.mark.parametrize("answer", ["in progress", "undocumented"])
async def test_a_status_that_never_changes_reaches_the_deadline(
        rig_factory: Any, tmp_path: Path, clock: SimClock, answer: str) -> None:
    """FAX.de answers JobStatus 6 ("still in progress") for ever, or a code its docs do not
    have: after 24 h the job fails with a reason saying so, and the sender gets that mail."""
    # unlogged=0: JobStatus 6 from the first poll (by default the emulator first answers 5,
    # "no log entry yet", which is no news within the grace period).
    server = await faxde_emulator.start("127.0.0.1", 0, {"delay": str(10**9), "unlogged": "0"})
    if answer == "undocumented":
        server.state.force("JobStatus", *[99] * 100)
    settings = faxde.Settings.model_validate({"account": "123456", "password": "secret",
                                              "wsdl_url": server.wsdl_url})
    provider = faxde.create(ProviderContext(account="fd", data_dir=tmp_path), settings)
    rig = await rig_factory({"fd": provider})
    expired: list[str] = []
    rig.tracker.on_deadline = expired.append
    try:
        await rig.queue(1, "fd")
        await rig.step(0)
        await rig.tracker.poll_all()
        first = JobState.SENDING if answer == "in progress" else JobState.SUBMITTED
        assert [job.state for job in await rig.jobs()] == [first]
        for _ in range(23):
            clock.advance(3600)
            await rig.tracker.poll_all()
        assert [job.state for job in await rig.jobs()] == [first]
        clock.advance(3600)
        await rig.tracker.poll_all()
        await rig.notifier.handle_pending()
        (job,) = await rig.jobs()
        assert job.state == JobState.FAILED
        assert job.reason is not None and job.reason.code == "tracking_deadline"
        assert expired == ["fd"]
        ((kind, message),) = await rig.mails()
        assert kind == "failed"
        text = message.get_body(("plain",)).get_content()  # type: ignore[union-attr]
        assert "No final status from fax.de after 24 h" in text
    finally:
        await provider.close()
        await server.close()
        await rig.store.close()


# -- account refusals, with the whole service -------------------------------------------------

def faxnummer_settings(tmp_path: Path, server: faxnummer_emulator.FaxnummerEmulator,
                       code: str) -> Settings:
    return make_settings(
        tmp_path, default_account="fn",
        accounts={"fn": {"provider": "faxnummer.de", "url": server.url,
                         "product_login": "acc12345", "product_code": code,
                         "status_email": "admin@example.org"}},
        dispatch={"account_probe_seconds": 0.5},
        web={"listen": "127.0.0.1:0"},
        inbound={"ocr": "off", "postmaster": "postmaster@mailfax.test"})


def web_url(app: Application) -> str:
    assert app.web_runner is not None
    host, port = app.web_runner.addresses[0][:2]
    return f"http://{host}:{port}"


async def wait_until(predicate: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.1)


async def mail_to(service: Service, predicate: Any, timeout: float = 20.0) -> Any:
    """The first Maildir message that matches (the Maildir may be in the making)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return await service.wait_for_mail(predicate, timeout=0.5)
        except (AssertionError, FileNotFoundError):
            await asyncio.sleep(0.1)
    raise AssertionError("no such mail")


def outbox(service: Service) -> list[Any]:
    try:
        return service.outbox_messages()
    except FileNotFoundError:
        return []


def pdf_fax(subject: str) -> EmailMessage:
    return fax_mail([("letter.pdf", one_page_pdf(), "application/pdf")], subject=subject)


async def test_a_refused_login_holds_the_faxes_alerts_once_and_a_restart_sends_them(
        faxnummer_fake: faxnummer_emulator.FaxnummerEmulator, tmp_path: Path) -> None:
    app = Application(faxnummer_settings(tmp_path, faxnummer_fake, code="wrong"))
    await app.start()
    service = Service(app)
    try:
        await service.send(pdf_fax("first"), "alice@example.org", ["030123456@fax.local"])
        admin = await mail_to(
            service, lambda message: message["To"] == "postmaster@mailfax.test")
        assert "fn paused" in str(admin["Subject"])
        body = admin.get_payload(decode=True).decode()  # type: ignore[union-attr]
        assert "Productcode invalid" in body and "mailfax check-account fn" in body
        assert "wrong" not in body  # no secret in the alert
        await service.send(pdf_fax("second"), "alice@example.org", ["030123457@fax.local"])

        async def both_held() -> bool:
            """The first was refused and waits; the second is not even tried."""
            jobs = sorted(await app.store.list_jobs(), key=lambda job: job.created)
            return [(job.state, job.reason.code if job.reason else None, job.attempts)
                    for job in jobs] == [(JobState.RETRYING, "provider_auth", 1),
                                         (JobState.QUEUED, None, 0)]
        await wait_until(both_held)
        await asyncio.sleep(1.5)  # probes come and fail; still held, still one alert
        assert await both_held()
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{web_url(app)}/readyz") as response:
                # Mail is still taken, but faxes are only held: not ready, and why.
                assert response.status == 503
                ready = await response.text()
            async with http.get(f"{web_url(app)}/metrics") as response:
                metrics = await response.text()
        assert "problem: account fn paused since" in ready and "Productcode invalid" in ready
        assert 'mailfax_account_paused{account="fn"} 1.0' in metrics
        admins = [m for m in outbox(service) if m["To"] == "postmaster@mailfax.test"]
        assert len(admins) == 1
        assert not [m for m in outbox(service) if m["X-Mailfax-State"] == "failed"]
        assert not faxnummer_fake.state.faxes
    finally:
        await app.stop()

    app = Application(faxnummer_settings(tmp_path, faxnummer_fake, code="secret"))  # fixed
    await app.start()
    service = Service(app)
    try:
        async with aiohttp.ClientSession() as http, http.get(
                f"{web_url(app)}/metrics") as response:
            assert 'mailfax_account_paused{account="fn"} 0.0' in await response.text()

        async def both_delivered() -> bool:
            return [job.state for job in await app.store.list_jobs()] == [
                JobState.DELIVERED] * 2
        await wait_until(both_delivered, timeout=30)
        assert len(faxnummer_fake.state.faxes) == 2
        await mail_to(service, lambda message: message["X-Mailfax-State"] == "delivered")
    finally:
        await app.stop()


async def test_no_credit_pauses_the_account_until_a_probe_passes(tmp_path: Path) -> None:
    """FAX.de 54 "No incoming payment": the account pauses, the probe (JobStatus of job 0)
    finds it working again, and the held fax goes out by itself."""
    server = await faxde_emulator.start("127.0.0.1", 0, {"delay": "0.2"})
    server.state.force("SendJob", 54)
    settings = make_settings(
        tmp_path, default_account="fd",
        accounts={"fd": {"provider": "fax.de", "account": "123456", "password": "secret",
                         "wsdl_url": server.wsdl_url}},
        dispatch={"account_probe_seconds": 1.0},
        inbound={"ocr": "off", "postmaster": "postmaster@mailfax.test"})
    app = Application(settings)
    await app.start()
    service = Service(app)
    try:
        await service.send(pdf_fax("payment"), "alice@example.org", ["030123456@fax.local"])
        admin = await mail_to(
            service, lambda message: message["To"] == "postmaster@mailfax.test")
        assert "No incoming payment" in admin.get_payload(decode=True).decode()  # type: ignore[union-attr]

        async def delivered() -> bool:
            return [job.state for job in await app.store.list_jobs()] == [JobState.DELIVERED]
        await wait_until(delivered, timeout=30)
        assert not app.accounts.paused("fd")
        assert len(server.state.jobs) == 1
        events = [event.detail for event in await app.store.job_events(
            (await app.store.list_jobs())[0].id)]
        assert any(detail.startswith("held: account fd paused") for detail in events)
    finally:
        await app.stop()
        await server.close()


def test_account_refusals_are_told_apart_from_job_refusals() -> None:
    from mailfax.providers import faxde_codes as codes
    from mailfax.providers import retarus_codes

    for result in (-1, -2, 1, 2, 3, 6, 54, 61):
        assert codes.error_for("SendJob", result).kind == ErrorKind.ACCOUNT, result
    for result in (-1309, 7, 8, 9, -5, 45):  # about this job: the next one may pass
        assert codes.error_for("SendJob", result).kind == ErrorKind.PERMANENT, result
    assert codes.error_for("SendJob", -4).kind == ErrorKind.TRANSIENT
    for status in (401, 403):
        assert retarus_codes.http_error(status, "", None, "send").kind == ErrorKind.ACCOUNT
    for comment in ("Productcode invalid",
                    "Webrequest is not available for this account"):
        error = faxnummer.answer_error({"wr_status": "failed", "wr_comment": comment})
        assert error is not None and error.kind == ErrorKind.ACCOUNT
    error = faxnummer.answer_error({"wr_status": "failed", "wr_comment": "Fax wrong format"})
    assert error is not None and error.kind == ErrorKind.PERMANENT
