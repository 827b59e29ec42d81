"""The dispatcher against a real store and the bundled emulator: slots, batching, and what
happens when the store call that records results fails."""

from __future__ import annotations

import asyncio
import email
import email.policy
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from mailfax import reasons
from mailfax.config import DispatchSettings, NotifySettings
from mailfax.model import RETRYABLE_STATES, TRANSITIONS, JobState, can_transition
from mailfax.outbound.dispatch import Dispatcher, unconfirmed_transition
from mailfax.outbound.notify import Notifier, Renderer
from mailfax.outbound.tracking import Tracker
from mailfax.providers import emulator
from mailfax.providers.base import (
    BaseProvider,
    FaxDocument,
    ProviderContext,
    ProviderError,
    ResendHandling,
    SendReceipt,
    SendRequest,
    SendResult,
)
from mailfax.store.base import DEFAULT_RULES, ClaimRules, Job, NewJob, NewMail, Outcome, Work
from mailfax.store.sqlite import SqliteStore

PDF = FaxDocument("a.pdf", b"%PDF-1.4 test", 1)


class CountingProvider(emulator.EmulatorProvider):
    """The emulator, counting sends at once and sends per job."""

    def __init__(self, context: ProviderContext, settings: emulator.Settings):
        super().__init__(context, settings)
        self.now = self.most = 0
        self.sends: dict[str, int] = {}

    async def send_many(self, requests: Sequence[SendRequest]) -> list[SendResult]:
        self.now += len(requests)
        self.most = max(self.most, self.now)
        for request in requests:
            self.sends[request.job_id] = self.sends.get(request.job_id, 0) + 1
        try:
            return await super().send_many(requests)
        finally:
            self.now -= len(requests)


class FlakyStore(SqliteStore):
    """Fails every third call that hands back results (as a database that goes away would)."""

    def __init__(self, path: Path):
        super().__init__(path)
        self.calls = self.failed = 0

    async def claim_work(self, owner: str, limit: int, lease_seconds: float,
                         account_limits: Mapping[str, int],
                         finished: Sequence[Outcome] = (),
                         rules: ClaimRules = DEFAULT_RULES,
                         spool: Path | None = None) -> list[Work]:
        if finished:
            self.calls += 1
            if self.calls % 3 == 0:
                self.failed += 1
                raise OSError("database went away")
        return await super().claim_work(owner, limit, lease_seconds, account_limits, finished,
                                        rules, spool)


async def run_until_submitted(store: SqliteStore, dispatcher: Dispatcher, count: int) -> None:
    task = asyncio.create_task(dispatcher.run())
    try:
        deadline = time.monotonic() + 30
        while (await store.counts())["jobs"].get(JobState.SUBMITTED.value, 0) < count:
            assert time.monotonic() < deadline, await store.counts()
            await asyncio.sleep(0.02)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def queue(store: SqliteStore, count: int) -> None:
    for index in range(count):
        mail = NewMail(mail_id=f"m{index}", envelope_from="a@example.org", message_id=None,
                       subject="s", references=[], from_header="", client_address="::1")
        # A number each: this is about the limits per account (one number gets one call at
        # a time, see test_per_number.py).
        await store.add_mail_jobs(mail, [NewJob(f"j{index:03d}", f"+4930123{index:03d}", "emu")],
                                  [PDF])


def provider(tmp_path: Path) -> CountingProvider:
    return CountingProvider(ProviderContext(account="emu", data_dir=tmp_path),
                            emulator.Settings(delay_seconds=3600, send_latency_seconds=0.01,
                                              fail=[]))


async def test_every_job_is_sent_once_within_the_limit_and_reported(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "store.sqlite3")
    await store.open()
    fax = provider(tmp_path)
    reported: list[str] = []
    try:
        await queue(store, 60)
        dispatcher = Dispatcher(store, {"emu": fax}, DispatchSettings(concurrency=4), "one",
                                on_submitted=reported.extend)
        await run_until_submitted(store, dispatcher, 60)
        assert fax.sends == {f"j{index:03d}": 1 for index in range(60)}
        assert fax.most == 4  # the limit, and used
        assert sorted(reported) == sorted(fax.sends)  # each reported once, after recording
        assert all(job.attempts == 1 for job in await store.list_jobs())
    finally:
        await fax.close()
        await store.close()


async def test_results_survive_a_failing_store_call(tmp_path: Path) -> None:
    """When recording with the next claim fails, the results are recorded one by one: no job
    is sent twice or left waiting, and the failures do not stop the dispatcher."""
    store = FlakyStore(tmp_path / "store.sqlite3")
    await store.open()
    fax = provider(tmp_path)
    try:
        await queue(store, 40)
        dispatcher = Dispatcher(store, {"emu": fax}, DispatchSettings(concurrency=4), "one")
        await run_until_submitted(store, dispatcher, 40)
        assert store.failed >= 3
        assert fax.sends == {f"j{index:03d}": 1 for index in range(40)}
        jobs = await store.list_jobs()
        assert {job.state for job in jobs} == {JobState.SUBMITTED}
        assert all(job.provider_job_id for job in jobs)
    finally:
        await fax.close()
        await store.close()


# -- the outcome-unknown path -----------------------------------------------------------------

class LostAnswers(BaseProvider):
    """Every send 'reaches' the provider and its answer is lost; the declaration is a test
    parameter (what an adapter says its provider documents)."""

    def __init__(self, handling: ResendHandling, placeholder: bool):
        super().__init__(ProviderContext(account="emu", data_dir=Path(".")))
        self.resend_handling = handling
        self.placeholder = placeholder
        self.requests: list[SendRequest] = []

    def unconfirmed_ref(self, job_id: str) -> str | None:
        return f"ref:{job_id}" if self.placeholder else None

    async def send(self, request: SendRequest) -> SendReceipt:
        self.requests.append(request)
        raise ProviderError(reasons.reason("provider_unavailable", "ReadTimeout"),
                            transient=True, maybe_sent=True)


async def dispatch_until(store: SqliteStore, dispatcher: Dispatcher, job_id: str,
                         done: Callable[[Job], bool]) -> Job:
    task = asyncio.create_task(dispatcher.run())
    try:
        deadline = time.monotonic() + 10
        while True:
            job = await store.get_job(job_id)
            assert job is not None
            if done(job):
                return job
            assert time.monotonic() < deadline, job
            await asyncio.sleep(0.02)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@pytest.mark.parametrize("placeholder", [False, True], ids=["cannot-ask", "can-ask"])
async def test_a_lost_answer_at_a_provider_that_cannot_recognise_a_resend_is_not_resent(
        tmp_path: Path, placeholder: bool) -> None:
    store = SqliteStore(tmp_path / "store.sqlite3")
    await store.open()
    fax = LostAnswers(ResendHandling.NOT_RECOGNISED, placeholder)
    try:
        await queue(store, 1)
        settings = DispatchSettings(retry_initial_seconds=0.01, retry_max_seconds=0.01)
        dispatcher = Dispatcher(store, {"emu": fax}, settings, "one")
        job = await dispatch_until(store, dispatcher, "j000",
                                   lambda job: job.state != JobState.QUEUED)
        assert job.state == JobState.UNCONFIRMED and len(fax.requests) == 1
        assert job.provider_job_id == ("ref:j000" if placeholder else None)
        assert job.reason is not None
        assert job.reason.code == ("answer_lost" if placeholder else "unconfirmed")
        # The mail at once only when nothing can be asked; else when the search runs out.
        mailed = [event for event in await store.pending_notifications(10)
                  if event.state == JobState.UNCONFIRMED]
        assert len(mailed) == (0 if placeholder else 1)
        await asyncio.sleep(0.1)
        assert len(fax.requests) == 1
    finally:
        await store.close()


@pytest.mark.parametrize("handling", [ResendHandling.RECOGNISED, ResendHandling.REFUSED])
async def test_a_lost_answer_is_resent_where_the_provider_documents_it_safe(
        tmp_path: Path, handling: ResendHandling) -> None:
    store = SqliteStore(tmp_path / "store.sqlite3")
    await store.open()
    fax = LostAnswers(handling, placeholder=False)
    try:
        await queue(store, 1)
        settings = DispatchSettings(max_attempts=3, retry_initial_seconds=0.01,
                                    retry_max_seconds=0.01)
        dispatcher = Dispatcher(store, {"emu": fax}, settings, "one")
        job = await dispatch_until(store, dispatcher, "j000",
                                   lambda job: job.state == JobState.UNCONFIRMED)
        # resent up to the limit, each resend told that the earlier one may have arrived;
        # after the last, the outcome is still unknown: unconfirmed, not failed
        assert [request.earlier_may_have_arrived for request in fax.requests] == [
            False, True, True]
        assert job.attempts == 3
    finally:
        await store.close()


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now


async def test_an_unconfirmed_job_not_found_in_time_gets_one_mail_and_retry_reopens_it(
        tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "store.sqlite3")
    await store.open()
    try:
        await queue(store, 2)
        lost = unconfirmed_transition("ref:j000", "ReadTimeout")
        assert await store.record("j000", lost)
        clock = Clock()
        tracker = Tracker(store, {}, 60, unconfirmed_after=timedelta(hours=6), clock=clock)
        assert await tracker.settle_unconfirmed() == 0  # still being looked for
        clock.now += timedelta(hours=6, seconds=1)
        assert await tracker.settle_unconfirmed() == 1
        assert await tracker.settle_unconfirmed() == 0  # one mail, not one per check
        events = [event for event in await store.pending_notifications(10)
                  if event.state != JobState.QUEUED]  # (the "accepted" events)
        assert [(event.job_id, event.state) for event in events] == [
            ("j000", JobState.UNCONFIRMED)]
        assert events[0].reason is not None and events[0].reason.code == "unconfirmed"
        assert "within 6 h" in events[0].detail

        reopened = await store.reopen_job("j000", "sent again with mailfax retry")
        assert reopened is not None
        assert (reopened.state, reopened.attempts, reopened.provider_job_id) == (
            JobState.QUEUED, 0, None)
        untouched = await store.reopen_job("j001", "sent again with mailfax retry")
        assert untouched is not None and untouched.state == JobState.QUEUED  # was queued
        assert [event.state for event in await store.job_events("j001")] == [JobState.QUEUED]
        assert await store.reopen_job("nosuchjob", "x") is None
    finally:
        await store.close()


def test_unconfirmed_is_outside_the_automatic_paths() -> None:
    assert not JobState.UNCONFIRMED.is_final
    assert JobState.UNCONFIRMED not in TRANSITIONS[JobState.SUBMITTED]
    assert can_transition(JobState.UNCONFIRMED, JobState.DELIVERED)
    assert not can_transition(JobState.UNCONFIRMED, JobState.QUEUED)  # only mailfax retry
    assert {JobState.FAILED, JobState.CANCELLED, JobState.UNCONFIRMED} == RETRYABLE_STATES


class Answering(LostAnswers):
    async def send(self, request: SendRequest) -> SendReceipt:
        self.requests.append(request)
        return SendReceipt(request.job_id, f"P-{request.job_id}", pages=1)


@pytest.mark.parametrize("handling", list(ResendHandling))
async def test_a_send_interrupted_by_a_crash_is_resent_only_where_that_is_safe(
        tmp_path: Path, handling: ResendHandling) -> None:
    store = SqliteStore(tmp_path / "store.sqlite3")
    await store.open()
    fax = Answering(handling, placeholder=False)
    try:
        await queue(store, 1)
        # An instance claimed it and died mid-send: its lease runs out, nothing recorded.
        [work] = await store.claim_work("dead", 1, 0.01, {"emu": 1})
        assert work.jobs[0].attempts == 1
        await asyncio.sleep(0.05)
        dispatcher = Dispatcher(store, {"emu": fax}, DispatchSettings(), "one")
        job = await dispatch_until(store, dispatcher, "j000",
                                   lambda job: job.state != JobState.QUEUED)
        if handling == ResendHandling.NOT_RECOGNISED:
            assert job.state == JobState.UNCONFIRMED and fax.requests == []
            assert job.reason is not None and job.reason.code == "unconfirmed"
        else:
            assert job.state == JobState.SUBMITTED
            assert [request.earlier_may_have_arrived for request in fax.requests] == [True]
    finally:
        await store.close()


@pytest.mark.parametrize(("language", "words"), [
    ("en", ["MAY HAVE BEEN SENT", "mailfax retry j000", "not sent again"]),
    ("de", ["WURDE MÖGLICHERWEISE GESENDET", "mailfax retry j000", "nicht noch einmal"])])
async def test_the_unconfirmed_mail_in_both_languages(tmp_path: Path, language: str,
                                                     words: list[str]) -> None:
    store = SqliteStore(tmp_path / "store.sqlite3")
    await store.open()
    try:
        await queue(store, 1)
        await store.record("j000", unconfirmed_transition(None, "ReadTimeout"))
        job = await store.get_job("j000")
        mail = await store.get_mail("m0")
        [event] = [event for event in await store.job_events("j000")
                   if event.state == JobState.UNCONFIRMED]
        assert job is not None and mail is not None
        status = Renderer().render("unconfirmed", job, mail, event, language)
        for word in words:
            assert word in status.text
        assert "mailfax retry j000" in status.html
        assert ("may have been sent" if language == "en" else "möglicherweise") in status.subject
    finally:
        await store.close()


@pytest.mark.parametrize("automatic", [False, True])
async def test_the_unconfirmed_mail_goes_to_the_sender_and_the_postmaster_once(
        tmp_path: Path, automatic: bool) -> None:
    store = SqliteStore(tmp_path / "store.sqlite3")
    await store.open()
    try:
        mail = NewMail(mail_id="m0", envelope_from="alice@example.org", message_id=None,
                       subject="offer", references=[], from_header="", client_address="::1",
                       auto_submitted="auto-generated" if automatic else None)
        await store.add_mail_jobs(mail, [NewJob("j000", "+4930123456", "emu")], [PDF])
        await store.record("j000", unconfirmed_transition(None, "ReadTimeout"))
        # "unconfirmed" is mailed even when notify.events does not name it
        notifier = Notifier(store, NotifySettings(events=["delivered"]), Renderer(),
                            admin_address="pm@example.org")
        await notifier.handle_pending()
        await notifier.handle_pending()
        items = await store.due_outbox(10)
        assert len(items) == 1
        message = email.message_from_bytes(items[0].message, policy=email.policy.default)
        if automatic:  # never a reply to automatic mail; the postmaster still has to know
            assert items[0].recipients == ["pm@example.org"]
            assert message["To"] == "pm@example.org" and message["Cc"] is None
        else:
            assert items[0].recipients == ["alice@example.org", "pm@example.org"]
            assert (message["To"], message["Cc"]) == ("alice@example.org", "pm@example.org")
        assert message["X-Mailfax-State"] == "unconfirmed"
    finally:
        await store.close()


class Crashing(LostAnswers):
    async def send(self, request: SendRequest) -> SendReceipt:
        self.requests.append(request)
        raise KeyError("a bug after the request went out")

    async def send_many(self, requests: Sequence[SendRequest]) -> list[SendResult]:
        for request in requests:
            await self.send(request)
        return []


async def test_an_unexpected_error_may_have_sent_the_fax(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "store.sqlite3")
    await store.open()
    fax = Crashing(ResendHandling.NOT_RECOGNISED, placeholder=False)
    try:
        await queue(store, 1)
        dispatcher = Dispatcher(store, {"emu": fax}, DispatchSettings(), "one")
        job = await dispatch_until(store, dispatcher, "j000",
                                   lambda job: job.state != JobState.QUEUED)
        assert job.state == JobState.UNCONFIRMED and len(fax.requests) == 1
    finally:
        await store.close()
