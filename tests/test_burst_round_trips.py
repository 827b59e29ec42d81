"""A burst does not multiply the tracker's and notifier's store work (issue 19): the store
calls (each one round trip, or one operation of the SQLite writer) for 200 mails whose faxes
are delivered are counted, per method, through a proxy around a real store. Counts, not
times: what a batch saves shows in them whatever the machine's load."""

from __future__ import annotations

import collections
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from mailfax.config import NotifySettings
from mailfax.model import JobState
from mailfax.outbound.notify import Notifier, Renderer
from mailfax.outbound.tracking import Tracker
from mailfax.providers.base import BaseProvider, ProviderContext, ProviderRef, StatusReport
from mailfax.store.base import NewJob, NewMail, OutgoingMail, Store, Transition
from mailfax.store.sqlite import SqliteStore

MAILS = 200


@pytest.fixture
async def real(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    """A real SQLite store, open for the test."""
    opened = SqliteStore(tmp_path / "store.sqlite3")
    await opened.open()
    try:
        yield opened
    finally:
        await opened.close()


class CountingStore:
    """The store, counting the calls made through it by method name."""

    def __init__(self, store: Store):
        self.store = store
        self.calls: collections.Counter[str] = collections.Counter()

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.store, name)
        if not callable(method):
            return method

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            return method(*args, **kwargs)

        return counted


class DeliversAll(BaseProvider):
    provider_name = "delivers"

    async def status(self, refs: Sequence[ProviderRef]) -> dict[str, StatusReport]:
        return {ref.job_id: StatusReport(JobState.DELIVERED, pages=1) for ref in refs}


async def submitted_burst(store: Store) -> None:
    """MAILS mails of one fax each, handed to the provider (their "accepted" events done)."""
    await one_fax_mails(store, MAILS, sender=lambda index: f"user{index % 20}@example.org",
                        until=JobState.SUBMITTED)
    await store.complete_notifications(
        [(event.id, []) for event in await store.pending_notifications(10 * MAILS)])


async def drain(handle: Callable[[], Any]) -> None:
    while await handle():
        pass


async def one_fax_mails(store: Store, count: int,
                        sender: Callable[[int], str] = lambda index: "user@example.org",
                        until: JobState = JobState.QUEUED) -> None:
    """``count`` mails m0… of one fax each (jobs j000…), queued, submitted or delivered."""
    for index in range(count):
        await store.add_mail_jobs(
            NewMail(mail_id=f"m{index}", envelope_from=sender(index),
                    message_id=f"<{index}@example.org>", subject="fax", references=[],
                    from_header="", client_address="127.0.0.1"),
            [NewJob(f"j{index:03d}", "+4930123456", "acct")], [])
        if until in (JobState.SUBMITTED, JobState.DELIVERED):
            await store.record(f"j{index:03d}", Transition(
                JobState.SUBMITTED, provider_job_id=f"P{index}", notify=False))
        if until == JobState.DELIVERED:
            await store.record(f"j{index:03d}", Transition(JobState.DELIVERED, pages=1))


async def test_a_burst_of_delivered_faxes_costs_few_store_calls_per_mail(
        tmp_path: Path, real: SqliteStore) -> None:
    await submitted_burst(real)
    store = CountingStore(real)
    counted: Store = store  # type: ignore[assignment]
    provider = DeliversAll(ProviderContext(account="acct", data_dir=tmp_path))
    tracker = Tracker(counted, {"acct": provider}, interval=60.0)
    await tracker.poll_all()
    tracking = dict(store.calls)
    store.calls.clear()
    notifier = Notifier(counted, NotifySettings(), Renderer(), mails_per_hour=1000)
    await drain(lambda: notifier.handle_pending(limit=100))
    notifying = dict(store.calls)
    delivered = [job for job in await real.list_jobs(limit=MAILS)
                 if job.state == JobState.DELIVERED]
    assert len(delivered) == MAILS
    assert await real.outbox_depth() == MAILS  # one status mail each
    print(f"\ntracker, {MAILS} mails: {tracking} = {sum(tracking.values())}"
          f"\nnotifier, {MAILS} mails: {notifying} = {sum(notifying.values())}")
    # The tracker: one call for all the state changes of a poll, not one per job.
    assert tracking["record_all"] == 1 and sum(tracking.values()) <= 5, tracking
    # The notifier: the jobs and mails of each claim at once; per mail, only its flood
    # check, its documents (the delivered mail's transmission report shows page 1 of that
    # mail's fax) and the transaction that queues it and marks its event done (stored before
    # the next event is looked at: the flood check reads the outbox).
    assert notifying.get("get_job", 0) == notifying.get("get_mail", 0) == 0, notifying
    assert notifying.get("load_documents", 0) <= MAILS, notifying
    assert sum(notifying.values()) <= 3 * MAILS + 3 * notifying["claim_notifications"], \
        notifying


async def test_a_burst_of_events_that_mail_nothing_is_completed_per_claim(
        real: SqliteStore) -> None:
    """A burst's "accepted" events (no acceptance mail asked for): one store call marks a
    claim's worth done, not one call (one operation of the SQLite writer) per event."""
    await one_fax_mails(real, MAILS)
    store = CountingStore(real)
    counted: Store = store  # type: ignore[assignment]
    notifier = Notifier(counted, NotifySettings(), Renderer(), mails_per_hour=1000)
    await drain(lambda: notifier.handle_pending(limit=100))
    assert await real.pending_notifications(10) == []
    assert await real.outbox_depth() == 0
    assert store.calls["complete_notifications"] == MAILS // 100, store.calls


async def test_a_mail_to_several_numbers_has_its_documents_read_once_for_its_reports(
        tmp_path: Path, real: SqliteStore) -> None:
    """Each delivered job's mail carries a transmission report drawn from the mail's
    documents; the jobs of one mail come side by side, so the documents are read once."""
    from reportlab.pdfgen.canvas import Canvas

    from mailfax.providers.base import FaxDocument

    canvas = Canvas(str(tmp_path / "letter.pdf"))
    canvas.drawString(72, 760, "Hello, fax")
    canvas.save()
    document = FaxDocument("letter.pdf", (tmp_path / "letter.pdf").read_bytes(), 1)
    numbers = [f"+493012345{index}" for index in range(5)]
    await real.add_mail_jobs(
        NewMail(mail_id="m", envelope_from="user@example.org", message_id="<m@example.org>",
                subject="fax", references=[], from_header="", client_address="127.0.0.1"),
        [NewJob(f"j{index}", number, "acct") for index, number in enumerate(numbers)],
        [document])
    for index in range(len(numbers)):
        await real.record(f"j{index}", Transition(
            JobState.SUBMITTED, provider_job_id=f"P{index}", notify=False))
        await real.record(f"j{index}", Transition(JobState.DELIVERED, pages=1))
    for event in await real.pending_notifications(100):
        if event.state != JobState.DELIVERED:
            await real.complete_notifications([(event.id, [])])
    store = CountingStore(real)
    counted: Store = store  # type: ignore[assignment]
    notifier = Notifier(counted, NotifySettings(), Renderer(), mails_per_hour=1000)
    await drain(lambda: notifier.handle_pending(limit=100))
    assert await real.outbox_depth() == len(numbers)  # a report each
    assert store.calls["load_documents"] == 1, store.calls


async def test_the_mails_made_before_an_event_that_fails_are_still_queued(
        real: SqliteStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """An event whose mail cannot be made (a bug) does not lose what was made before it."""
    await one_fax_mails(real, 3)
    _, second, third = await real.pending_notifications(10)
    notifier = Notifier(real, NotifySettings(), Renderer(), mails_per_hour=1000)
    made = notifier._mails_for

    async def failing_on_the_second(event: Any, *args: Any) -> Any:
        if event.id == second.id:
            raise RuntimeError("a template bug")
        mails = await made(event, *args)
        return [*mails, OutgoingMail("", ["a@b"], f"for {event.job_id}".encode(),
                                     job_id=event.job_id)]

    monkeypatch.setattr(notifier, "_mails_for", failing_on_the_second)
    with pytest.raises(RuntimeError, match="a template bug"):
        await notifier.handle_pending()
    assert [event.id for event in await real.pending_notifications(10)] == [
        second.id, third.id]
    assert [item.message for item in await real.due_outbox(10)] == [b"for j000"]


async def test_the_status_mail_limit_holds_within_one_claim(real: SqliteStore) -> None:
    """Five faxes of one sender delivered at once, three status mails an hour allowed: the
    limit reads the outbox, so each mail is stored before the next event is looked at."""
    await one_fax_mails(real, 5, sender=lambda index: "alice@example.org",
                        until=JobState.DELIVERED)
    notifier = Notifier(real, NotifySettings(), Renderer(), mails_per_hour=3)
    await drain(lambda: notifier.handle_pending(limit=100))
    assert await real.pending_notifications(10) == []
    assert await real.outbox_depth() == 3
