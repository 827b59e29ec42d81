"""The store contract. Parametrised over backends so every backend passes the same suite."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from mailfax import reasons
from mailfax.model import JobState
from mailfax.providers.base import FaxDocument
from mailfax.store.base import IllegalTransition, NewJob, NewMail, OutgoingMail, Store, Transition
from mailfax.store.sqlite import SqliteStore


@pytest.fixture(params=["sqlite"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    backend: Store = SqliteStore(tmp_path / "store.sqlite3")
    await backend.open()
    try:
        yield backend
    finally:
        await backend.close()


def new_mail(mail_id: str = "m1", sender: str = "alice@example.org") -> NewMail:
    return NewMail(mail_id=mail_id, envelope_from=sender, message_id="<a@b>", subject="Hi",
                   references=["<x@y>"], from_header="Alice <alice@example.org>",
                   client_address="127.0.0.1")


DOCS = [FaxDocument("a.pdf", b"%PDF-a", 2), FaxDocument("b.pdf", b"%PDF-b", 1)]


async def add(store: Store, mail_id: str = "m1", jobs: tuple[str, ...] = ("j1",)) -> None:
    await store.add_mail_jobs(new_mail(mail_id),
                              [NewJob(job_id, "+4930123456", "acct") for job_id in jobs], DOCS)


async def test_added_jobs_are_queued_with_pages_documents_and_an_accepted_event(
        store: Store) -> None:
    await add(store, jobs=("j1", "j2"))
    job = await store.get_job("j1")
    assert job is not None
    assert job.state == JobState.QUEUED
    assert job.pages == 3
    assert job.sender == "alice@example.org"
    assert await store.load_documents(job.mail_id) == DOCS
    mail = await store.get_mail("m1")
    assert mail is not None and mail.references == ["<x@y>"]
    events = await store.job_events("j1")
    assert [e.state for e in events] == [JobState.QUEUED]
    assert len(await store.pending_notifications(10)) == 2


async def test_a_claimed_job_is_leased_and_not_claimed_twice(store: Store) -> None:
    await add(store, jobs=("j1", "j2"))
    first = await store.claim_due_jobs("one", 10, lease_seconds=60)
    second = await store.claim_due_jobs("two", 10, lease_seconds=60)
    assert sorted(job.id for job in first) == ["j1", "j2"]
    assert all(job.attempts == 1 for job in first)
    assert second == []
    assert await store.release_leases("one") == 2
    again = await store.claim_due_jobs("two", 10, lease_seconds=60)
    assert [job.attempts for job in again] == [2, 2]


async def test_an_expired_lease_lets_another_instance_claim(store: Store) -> None:
    await add(store)
    assert len(await store.claim_due_jobs("dead", 10, lease_seconds=0.05)) == 1
    await asyncio.sleep(0.1)
    assert [job.id for job in await store.claim_due_jobs("alive", 10, lease_seconds=60)] == ["j1"]


async def test_transitions_follow_the_state_table(store: Store) -> None:
    await add(store)
    assert await store.record("j1", Transition(JobState.SUBMITTED, provider_job_id="P1"))
    assert await store.record("j1", Transition(JobState.DELIVERED, pages=3, duration_seconds=41,
                                               remote_id="REMOTE"))
    job = await store.get_job("j1")
    assert job is not None
    assert (job.state, job.provider_job_id, job.duration_seconds, job.remote_id) == (
        JobState.DELIVERED, "P1", 41, "REMOTE")
    with pytest.raises(IllegalTransition):
        await store.record("j1", Transition(JobState.SENDING))


async def test_expected_states_guard_a_transition(store: Store) -> None:
    await add(store)
    assert not await store.record("j1", Transition(JobState.DELIVERED),
                                  expected=[JobState.SUBMITTED])
    job = await store.get_job("j1")
    assert job is not None and job.state == JobState.QUEUED


async def test_retrying_job_is_due_only_at_its_time(store: Store) -> None:
    await add(store)
    await store.claim_due_jobs("one", 10, lease_seconds=60)
    later = datetime.now(UTC) + timedelta(seconds=3600)
    await store.record("j1", Transition(JobState.RETRYING, reason=reasons.reason("busy"),
                                        next_attempt_at=later))
    assert await store.claim_due_jobs("one", 10, lease_seconds=60) == []
    due = await store.next_due_time()
    assert due is not None and abs((due - later).total_seconds()) < 1
    job = await store.get_job("j1")
    assert job is not None and job.reason is not None and job.reason.code == "busy"


async def test_tracked_jobs_are_the_ones_at_the_provider(store: Store) -> None:
    await add(store, jobs=("j1", "j2"))
    await store.record("j1", Transition(JobState.SUBMITTED, provider_job_id="P1"))
    assert [job.id for job in await store.tracked_jobs("acct")] == ["j1"]
    assert await store.tracked_jobs("other") == []


async def test_notification_and_outbox_are_handed_over_atomically(store: Store) -> None:
    await add(store)
    [event] = await store.pending_notifications(10)
    await store.complete_notification(event.id, OutgoingMail("", ["alice@example.org"], b"m",
                                                             job_id="j1"))
    assert await store.pending_notifications(10) == []
    [item] = await store.due_outbox(10)
    assert (item.recipients, item.message, item.job_id) == (["alice@example.org"], b"m", "j1")
    assert await store.outbox_depth() == 1
    await store.outbox_retry(item.id, datetime.now(UTC) + timedelta(hours=1), "relay down")
    assert await store.due_outbox(10) == []
    assert await store.outbox_depth() == 1
    await store.outbox_sent(item.id)
    assert await store.outbox_depth() == 0


async def test_final_jobs_are_acknowledged_only_after_their_mail_left(store: Store) -> None:
    await add(store)
    await store.record("j1", Transition(JobState.SUBMITTED, provider_job_id="P1"))
    await store.record("j1", Transition(JobState.DELIVERED))
    assert await store.unacknowledged_final_jobs("acct", 10) == []  # events not yet mailed
    for event in await store.pending_notifications(10):
        await store.complete_notification(event.id, OutgoingMail("", ["a@b"], b"m", "j1"))
    assert await store.unacknowledged_final_jobs("acct", 10) == []  # mail still in the outbox
    for item in await store.due_outbox(10):
        await store.outbox_sent(item.id)
    assert [job.id for job in await store.unacknowledged_final_jobs("acct", 10)] == ["j1"]
    await store.mark_acknowledged(["j1"])
    assert await store.unacknowledged_final_jobs("acct", 10) == []


async def test_concurrent_writes_share_commits(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "group.sqlite3")
    await store.open()
    try:
        before = store.commits
        await asyncio.gather(*(add(store, f"m{i}", (f"j{i}",)) for i in range(100)))
        assert len(await store.list_jobs()) == 100
        assert store.commits - before < 100  # group commit: fewer transactions than mails
    finally:
        await store.close()


async def test_a_failing_operation_does_not_undo_its_batch_neighbours(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.sqlite3")
    await store.open()
    try:
        results = await asyncio.gather(add(store, "m1", ("j1",)), add(store, "m1", ("j2",)),
                                       add(store, "m3", ("j3",)), return_exceptions=True)
        assert isinstance(results[1], Exception)  # duplicate mail id
        assert sorted(job.id for job in await store.list_jobs()) == ["j1", "j3"]
    finally:
        await store.close()


async def test_data_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    first = SqliteStore(path)
    await first.open()
    await add(first)
    await first.close()
    second = SqliteStore(path)
    await second.open()
    try:
        job = await second.get_job("j1")
        assert job is not None and job.state == JobState.QUEUED
    finally:
        await second.close()
