"""The store contract. Parametrised over backends so every backend passes the same suite."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from mailfax import reasons
from mailfax.documents.mapped import DocumentMap
from mailfax.model import JobState
from mailfax.providers.base import FaxDocument, InboundFax
from mailfax.store import migrate, open_store
from mailfax.store.base import (
    IllegalTransition,
    Job,
    NewJob,
    NewMail,
    OutgoingMail,
    Quota,
    QuotaExceeded,
    Store,
    Transition,
)
from mailfax.store.sqlite import SqliteStore
from tests import pg

BACKENDS = ["sqlite", "postgresql"]
# For what only PostgreSQL has: the test is not made for SQLite at all (rather than skipped).
ONLY_POSTGRES = pytest.mark.parametrize("backend", ["postgresql"], indirect=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[pg.PostgresServer]:
    """One PostgreSQL server for the session (each test gets a database of its own)."""
    with pg.server_for_tests() as server:
        yield server


@dataclass
class Backend:
    """A fresh, empty database of one backend; ``make()`` gives another store object on it."""

    name: str
    url: str
    set_schema_version: Callable[[int], None]

    def make(self) -> Store:
        return open_store(self.url)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "sqlite":
        path = tmp_path / "store.sqlite3"

        def sqlite_version(version: int) -> None:
            with sqlite3.connect(path) as conn:
                conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'",
                             (str(version),))

        yield Backend("sqlite", f"sqlite:///{path}", sqlite_version)
        return
    server: pg.PostgresServer = request.getfixturevalue("postgres_server")
    url = server.create_database()

    def postgres_version(version: int) -> None:
        import psycopg

        with psycopg.connect(url) as conn:
            conn.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (version,))

    try:
        yield Backend("postgresql", url, postgres_version)
    finally:
        server.drop_database(url)


@pytest.fixture
async def store(backend: Backend) -> AsyncIterator[Store]:
    opened = backend.make()
    await opened.open()
    try:
        yield opened
    finally:
        await opened.close()


def new_mail(mail_id: str = "m1", sender: str = "alice@example.org") -> NewMail:
    return NewMail(mail_id=mail_id, envelope_from=sender, message_id="<a@b>", subject="Hi",
                   references=["<x@y>"], from_header="Alice <alice@example.org>",
                   client_address="127.0.0.1")


DOCS = [FaxDocument("a.pdf", b"%PDF-a", 2), FaxDocument("b.pdf", b"%PDF-b", 1)]


async def claim(store: Store, owner: str, limit: int, lease_seconds: float,
                account_limits: dict[str, int] | None = None) -> list[Job]:
    """The jobs of a claim_work call with no results to record; without limits, any due job
    (every account counts as "other", so no lease count applies)."""
    from mailfax.store.base import OTHER_ACCOUNTS

    limits = account_limits if account_limits is not None else {OTHER_ACCOUNTS: limit}
    work = await store.claim_work(owner, limit, lease_seconds, limits)
    return [job for unit in work for job in unit.jobs]


def number_of(job_id: str) -> str:
    """A number of its own for each job: these tests are about leases and limits, and jobs to
    one number are claimed one at a time (tested in test_per_number.py)."""
    return "+4940" + str(int.from_bytes(job_id.encode(), "big") % 10**9).zfill(9)


async def add(store: Store, mail_id: str = "m1", jobs: tuple[str, ...] = ("j1",)) -> None:
    await store.add_mail_jobs(new_mail(mail_id),
                              [NewJob(job_id, number_of(job_id), "acct") for job_id in jobs], DOCS)


async def test_jobs_are_fetched_by_id_in_one_call_and_unknown_ids_left_out(
        store: Store) -> None:
    await add(store, jobs=("j1", "j2", "j3"))
    jobs = await store.get_jobs(["j3", "nope", "j1"])
    assert sorted(job.id for job in jobs) == ["j1", "j3"]
    assert await store.get_jobs([]) == []
    many = [f"x{index}" for index in range(1200)]  # more than one SQLite statement's worth
    await add(store, mail_id="m2", jobs=tuple(many))
    assert len(await store.get_jobs(many)) == 1200


async def test_a_mails_jobs_come_in_the_order_they_were_stored_with_their_options(
        store: Store) -> None:
    await store.add_mail_jobs(new_mail("m1"), [
        NewJob("j2", "+4930123456", "acct", {"broadcast": "customers", "broadcast_index": 0}),
        NewJob("j1", "+4930654321", "acct", {"broadcast": "customers", "broadcast_index": 1}),
    ], DOCS)
    await add(store, mail_id="m2", jobs=("j3",))
    jobs = await store.mail_jobs("m1")
    assert [job.id for job in jobs] == ["j1", "j2"]  # one insert time: then by id
    assert {job.id: job.options["broadcast_index"] for job in jobs} == {"j2": 0, "j1": 1}
    assert [job.id for job in await store.mail_jobs("m2")] == ["j3"]
    assert await store.mail_jobs("nope") == []
    assert await store.open_jobs("m1") == 2
    await store.record("j1", Transition(JobState.FAILED, reason=reasons.reason("busy")))
    await store.record("j2", Transition(JobState.UNCONFIRMED))
    assert await store.open_jobs("m1") == 0  # unconfirmed: ended, as far as a summary goes
    assert await store.open_jobs("m2") == 1
    assert await store.last_summary_at("m1") is None
    await store.enqueue_mail(OutgoingMail("", ["a@b.c"], b"status", job_id="j2", kind="failed"))
    assert await store.last_summary_at("m1") is None
    before = datetime.now(UTC) - timedelta(seconds=5)
    await store.enqueue_mail(OutgoingMail("", ["a@b.c"], b"sum", job_id="j1", kind="summary"))
    at = await store.last_summary_at("m1")
    assert at is not None and before < at <= datetime.now(UTC) + timedelta(seconds=5)
    assert await store.last_summary_at("m2") is None

async def test_mails_are_fetched_by_id_in_one_call(store: Store) -> None:
    await add(store, "m1")
    await add(store, "m2", ("j2",))
    mails = await store.get_mails(["m2", "nope", "m1"])
    assert sorted(mail.id for mail in mails) == ["m1", "m2"]
    assert mails[0] == await store.get_mail(mails[0].id)
    assert await store.get_mails([]) == []


async def test_many_transitions_are_recorded_in_one_call(store: Store) -> None:
    """record_all: each as record would (moved or not), one refused by the state table or
    of no such job logged and not moved, the others recorded all the same."""
    from mailfax.store.base import Outcome

    await add(store, jobs=("j1", "j2", "j3"))
    await store.record("j3", Transition(JobState.DELIVERED))
    moved = await store.record_all([
        Outcome("j2", Transition(JobState.SENDING, provider_job_id="P2")),
        Outcome("j1", Transition(JobState.SUBMITTED, provider_job_id="P1")),
        Outcome("j3", Transition(JobState.SENDING), expected=[JobState.SUBMITTED]),
        Outcome("j3", Transition(JobState.QUEUED)),  # delivered -> queued: refused
        Outcome("nope", Transition(JobState.SENDING)),
    ])
    assert moved == [True, True, False, False, False]
    states = {job.id: (job.state, job.provider_job_id)
              for job in await store.get_jobs(["j1", "j2", "j3"])}
    assert states == {"j1": (JobState.SUBMITTED, "P1"), "j2": (JobState.SENDING, "P2"),
                      "j3": (JobState.DELIVERED, None)}
    assert [event.state for event in await store.job_events("j2")] == [
        JobState.QUEUED, JobState.SENDING]
    assert await store.record_all([]) == []


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


async def test_a_document_in_its_file_is_stored_and_loaded_byte_for_byte(
        store: Store, tmp_path: Path) -> None:
    import base64
    import random

    from mailfax.intake.spool import decode_base64_to_file

    # SQLite: the first written in pieces, the second (decoded from over 1 MB of base64 to
    # under 1 MB) bound as one value
    data, under = (random.Random(7).randbytes(size) for size in (3 * 1024 * 1024 + 17, 900_000))
    mapped = [decode_base64_to_file(encoded, 0, len(encoded), tmp_path)
              for encoded in (base64.encodebytes(data), base64.encodebytes(under))]
    try:
        await store.add_mail_jobs(new_mail(), [NewJob("j1", number_of("j1"), "acct")],
                                  [FaxDocument("big.pdf", mapped[0], 9), *DOCS,
                                   FaxDocument("under.pdf", mapped[1], 1)])
    finally:
        for document in mapped:
            document.close()
    assert await store.load_documents("m1") == [FaxDocument("big.pdf", data, 9), *DOCS,
                                                FaxDocument("under.pdf", under, 1)]
    # read for the page check and the report: the large one in pieces into a file
    (tmp_path / "out").mkdir()
    big, *small = await store.load_documents("m1", tmp_path / "out")
    assert big.data[:] == data and small == [*DOCS, FaxDocument("under.pdf", under, 1)]
    assert isinstance(big.data, DocumentMap)
    assert list((tmp_path / "out").iterdir()) == []  # the file has no name
    # claimed to be sent: the dispatcher reads them the same way, to send from the file
    [work] = await store.claim_work("one", 5, 60, {"acct": 5}, spool=tmp_path / "out")
    big, *small = work.documents
    assert big.data[:] == data and small == [*DOCS, FaxDocument("under.pdf", under, 1)]
    assert isinstance(big.data, DocumentMap) and [job.id for job in work.jobs] == ["j1"]
    assert list((tmp_path / "out").iterdir()) == []


async def test_a_large_document_is_read_into_memory_when_the_spool_is_full(
        store: Store, tmp_path: Path, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    import errno
    import random

    from mailfax.documents import mapped

    def full(**_: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    data = random.Random(8).randbytes(3 * 1024 * 1024)
    await store.add_mail_jobs(new_mail(), [NewJob("j1", number_of("j1"), "acct")],
                              [FaxDocument("big.pdf", data, 9)])
    monkeypatch.setattr(mapped.tempfile, "TemporaryFile", full)
    [work] = await store.claim_work("one", 5, 60, {"acct": 5}, spool=tmp_path)
    assert [(document.data, type(document.data)) for document in work.documents] == \
        [(data, bytes)]  # sent from memory, not lost
    assert "read into memory" in caplog.text and "No space left on device" in caplog.text


async def test_a_claimed_job_is_leased_and_not_claimed_twice(store: Store) -> None:
    await add(store, jobs=("j1", "j2"))
    first = await claim(store, "one", 10, 60)
    second = await claim(store, "two", 10, 60)
    assert sorted(job.id for job in first) == ["j1", "j2"]
    assert all(job.attempts == 1 for job in first)
    assert second == []
    assert await store.release_leases("one") == 2
    again = await claim(store, "two", 10, 60)
    assert [job.attempts for job in again] == [2, 2]


async def test_an_expired_lease_lets_another_instance_claim(store: Store) -> None:
    await add(store)
    assert len(await claim(store, "dead", 10, 0.05)) == 1
    await asyncio.sleep(0.1)
    assert [job.id for job in await claim(store, "alive", 10, 60)] == ["j1"]


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
    await claim(store, "one", 10, 60)
    later = datetime.now(UTC) + timedelta(seconds=3600)
    await store.record("j1", Transition(JobState.RETRYING, reason=reasons.reason("busy"),
                                        next_attempt_at=later))
    assert await claim(store, "one", 10, 60) == []
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
    await store.complete_notifications([(event.id, [OutgoingMail("", ["alice@example.org"],
                                                                  b"m", job_id="j1")])])
    assert await store.pending_notifications(10) == []
    [item] = await store.due_outbox(10)
    assert (item.recipients, item.message, item.job_id) == (["alice@example.org"], b"m", "j1")
    assert await store.outbox_depth() == 1
    await store.outbox_retry(item.id, datetime.now(UTC) + timedelta(hours=1), "relay down")
    assert await store.due_outbox(10) == []
    assert await store.outbox_depth() == 1
    await store.outbox_sent(item.id)
    assert await store.outbox_depth() == 0


async def test_a_claims_events_are_completed_together_and_a_done_one_adds_nothing(
        store: Store) -> None:
    await add(store, jobs=("j1", "j2", "j3"))
    first, second, third = await store.pending_notifications(10)
    await store.complete_notifications([(second.id, [])])  # done before, by another pass
    await store.complete_notifications([
        (first.id, [OutgoingMail("", ["a@b"], b"one", job_id="j1"),
                    OutgoingMail("", ["c@d"], b"one, a copy", job_id="j1")]),
        (second.id, [OutgoingMail("", ["a@b"], b"two again", job_id="j2")]),
        (third.id, [])])
    assert await store.pending_notifications(10) == []
    assert [(item.message, item.recipients) for item in await store.due_outbox(10)] == [
        (b"one", ["a@b"]), (b"one, a copy", ["c@d"])]


async def test_final_jobs_are_acknowledged_only_after_their_mail_left(store: Store) -> None:
    await add(store)
    await store.record("j1", Transition(JobState.SUBMITTED, provider_job_id="P1"))
    await store.record("j1", Transition(JobState.DELIVERED))
    assert await store.unacknowledged_final_jobs("acct", 10) == []  # events not yet mailed
    for event in await store.pending_notifications(10):
        await store.complete_notifications([(event.id, [OutgoingMail("", ["a@b"], b"m", "j1")])])
    assert await store.unacknowledged_final_jobs("acct", 10) == []  # mail still in the outbox
    for item in await store.due_outbox(10):
        await store.outbox_sent(item.id)
    assert [job.id for job in await store.unacknowledged_final_jobs("acct", 10)] == ["j1"]
    await store.mark_acknowledged(["j1"])
    assert await store.unacknowledged_final_jobs("acct", 10) == []


async def test_concurrent_writes_all_land(store: Store) -> None:
    if isinstance(store, SqliteStore):
        before = store.commits
    await asyncio.gather(*(add(store, f"m{i}", (f"j{i}",)) for i in range(100)))
    assert len(await store.list_jobs()) == 100
    if isinstance(store, SqliteStore):
        assert store.commits - before < 100  # group commit: fewer transactions than mails


async def test_a_failing_operation_does_not_undo_its_neighbours(store: Store) -> None:
    results = await asyncio.gather(add(store, "m1", ("j1",)), add(store, "m1", ("j2",)),
                                   add(store, "m3", ("j3",)), return_exceptions=True)
    assert isinstance(results[1], Exception)  # duplicate mail id
    assert sorted(job.id for job in await store.list_jobs()) == ["j1", "j3"]
    assert await store.get_job("j2") is None  # nothing of the failed one was kept


async def test_data_survives_reopening(backend: Backend) -> None:
    first = backend.make()
    await first.open()
    await add(first)
    await first.close()
    second = backend.make()
    await second.open()
    try:
        job = await second.get_job("j1")
        assert job is not None and job.state == JobState.QUEUED
    finally:
        await second.close()


async def test_values_round_trip_exactly(store: Store) -> None:
    binary = [FaxDocument("x.pdf", bytes(range(256)) * 3, 4), FaxDocument("y.pdf", b"\0", 1)]
    options = {"station_id": "Kanzlei Müller", "cover": {"lines": ["a", "b"]}, "n": 1.5}
    await store.add_mail_jobs(new_mail("m1"), [NewJob("j1", "+4930123456", "acct", options)],
                              binary)
    await store.add_mail_jobs(new_mail("m2"), [NewJob("j2", "+4930123456", "acct")],
                              binary)  # the same documents again: stored once, loaded twice
    assert await store.load_documents("m1") == binary
    assert await store.load_documents("m2") == binary
    job = await store.get_job("j1")
    assert job is not None and job.options == options and job.pages == 5
    for moment in (job.created, job.updated, job.next_attempt_at):
        assert moment is not None and moment.utcoffset() == timedelta(0)
        assert abs((moment - datetime.now(UTC)).total_seconds()) < 60
    assert not job.cancel_requested and not job.acknowledged
    mail = await store.get_mail("m1")
    assert mail is not None and mail.received_at.utcoffset() == timedelta(0)
    assert await store.get_job("nope") is None and await store.get_mail("nope") is None


async def test_a_transition_with_a_reason_logs_an_event(store: Store) -> None:
    await add(store)
    reason = reasons.reason("busy")
    assert await store.record("j1", Transition(JobState.RETRYING, reason=reason,
                                               detail="line busy", notify=False))
    assert await store.record("j1", Transition(JobState.RETRYING))  # same state: no new event
    events = await store.job_events("j1")
    assert [(e.state, e.detail) for e in events] == [(JobState.QUEUED, "accepted"),
                                                     (JobState.RETRYING, "line busy")]
    assert events[1].reason == reason and events[1].at.utcoffset() == timedelta(0)
    assert [e.job_id for e in await store.pending_notifications(10)] == ["j1"]  # not notify
    with pytest.raises(KeyError):
        await store.record("nope", Transition(JobState.FAILED))


async def test_a_transition_clears_the_lease(store: Store) -> None:
    await add(store)
    [job] = await claim(store, "one", 10, 60)
    await store.record("j1", Transition(JobState.RETRYING, next_attempt_at=job.created))
    assert [job.id for job in await claim(store, "two", 10, 60)] == ["j1"]


async def test_cancel_requests_and_job_lists(store: Store) -> None:
    await add(store, jobs=("j1", "j2"))
    await store.record("j2", Transition(JobState.FAILED))
    job = await store.request_cancel("j1")
    assert job is not None and job.cancel_requested
    assert await store.request_cancel("nope") is None
    await store.clear_cancel_request("j1")
    job = await store.get_job("j1")
    assert job is not None and not job.cancel_requested
    assert {job.id for job in await store.list_jobs()} == {"j1", "j2"}
    assert [job.id for job in await store.list_jobs(state=JobState.FAILED)] == ["j2"]
    assert len(await store.list_jobs(limit=1)) == 1


async def test_usage_counts_jobs_and_pages_by_sender(store: Store) -> None:
    since = datetime.now(UTC) - timedelta(minutes=1)
    await add(store, "m1", ("j1", "j2"))
    await store.add_mail_jobs(new_mail("m2", "Bob@Other.example"),
                              [NewJob("j3", "+4930123456", "acct")], DOCS)
    assert await store.usage_since(since) == (3, 9)
    assert await store.usage_since(since, ["alice@example.org"]) == (2, 6)
    assert await store.usage_since(since, ["bob@other.example"]) == (1, 3)
    assert await store.usage_since(since, ["@other.example", "alice@example.org"]) == (3, 9)
    assert await store.usage_since(since, []) == (0, 0)
    assert await store.usage_since(datetime.now(UTC) + timedelta(minutes=1)) == (0, 0)


def insert_jobs_created_at(backend: Backend, created: Sequence[float], pages: int,
                           first: int = 0) -> None:
    """Jobs of mail "m1" (stored already) created at these epoch seconds, straight into the
    table (the store's own triggers see them, as they see any insert); ids from t<first>."""
    rows = [(f"t{index}", created_at, pages)
            for index, created_at in enumerate(created, start=first)]
    if backend.name == "sqlite":
        with sqlite3.connect(backend.url.removeprefix("sqlite:///")) as conn:
            conn.executemany(
                "INSERT INTO jobs (id, mail_id, account, number, state, pages, sender, created,"
                " updated) VALUES (?, 'm1', 'acct', '+4930123456', 'delivered', ?, 'a@b.c', ?, ?)",
                [(job_id, n, at, at) for job_id, at, n in rows])
        return
    import psycopg

    with psycopg.connect(backend.url) as conn, conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO jobs (id, mail_id, account, number, state, pages, sender, created,"
            " updated) VALUES (%s, 'm1', 'acct', '+4930123456', 'delivered', %s, 'a@b.c',"
            " to_timestamp(%s), to_timestamp(%s))",
            [(job_id, n, at, at) for job_id, at, n in rows])


async def test_everyones_usage_from_kept_totals_equals_a_count_at_every_edge(
        backend: Backend, store: Store) -> None:
    """The service-wide count comes from per-300-s totals plus the jobs of the bucket the
    window starts in: it must equal counting the jobs, wherever the window starts (on a
    bucket's edge, just before or after it), and follow a job's pages as they change."""
    await add(store)  # j1: 3 pages, now
    now = time.time()
    edge = (now // 300 - 20) * 300  # a bucket's first second, 100 min ago
    created = [edge - 300, edge - 0.5, edge, edge + 0.25, edge + 299.75, edge + 300, edge + 900]
    insert_jobs_created_at(backend, created, 2)
    assert await store.record("j1", Transition(JobState.FAILED, pages=5))  # 3 → 5 pages
    starts = [edge - 301, edge - 300, edge - 1, edge - 0.5, edge, edge + 0.1, edge + 0.25,
              edge + 150, edge + 300, edge + 300.5, edge + 1000, now - 1]

    async def check() -> None:
        for start in starts:
            expected = [at for at in created if at >= start]
            assert await store.usage_since(datetime.fromtimestamp(start, UTC)) == (
                len(expected) + 1, 2 * len(expected) + 5), start

    await check()
    await store.counts()  # PostgreSQL folds the triggers' rows here (and in quota checks)
    await check()
    pages = Quota("service", "this service", 2 * len(created) + 5 + 3, "pages", 86400)
    await store.add_mail_jobs(new_mail("m2"), [NewJob("j2", "+4930123456", "acct")], DOCS,
                              [pages])  # exactly up to the limit
    with pytest.raises(QuotaExceeded) as over:
        await store.add_mail_jobs(new_mail("m3"), [NewJob("j3", "+4930123456", "acct")], DOCS,
                                  [pages])
    assert over.value.used == 2 * len(created) + 5 + 3


async def test_quotas_are_checked_where_the_jobs_are_stored(store: Store) -> None:
    faxes = Quota("user alice", "user alice", 3, "faxes", 3600, ("alice@example.org",))
    pages = Quota("service", "this service", 10, "pages", 86400)
    await store.add_mail_jobs(new_mail("m1"), [NewJob("j1", "+4930123456", "acct"),
                                               NewJob("j2", "+4930123457", "acct")],
                              DOCS, [faxes, pages])  # 2 faxes, 6 pages
    with pytest.raises(QuotaExceeded) as over:
        await store.add_mail_jobs(new_mail("m2"), [NewJob("j3", "+4930123456", "acct"),
                                                   NewJob("j4", "+4930123457", "acct")],
                                  DOCS, [faxes, pages])
    assert (over.value.quota, over.value.used, over.value.adding) == (faxes, 2, 2)
    assert await store.get_mail("m2") is None and await store.get_job("j3") is None
    with pytest.raises(QuotaExceeded) as over:  # 1 fax fits, its 3 pages do not (6 + 3 > 8)
        await store.add_mail_jobs(new_mail("m3"), [NewJob("j5", "+4930123456", "acct")], DOCS,
                                  [faxes, Quota("service", "this service", 8, "pages", 86400)])
    assert (over.value.used, over.value.adding) == (6, 3)
    other = Quota("user bob", "user bob", 1, "faxes", 3600, ("bob@example.org",))
    await store.add_mail_jobs(new_mail("m4", "bob@example.org"),
                              [NewJob("j6", "+4930123456", "acct")], DOCS, [other, pages])
    assert await store.usage_since(datetime.now(UTC) - timedelta(hours=1)) == (3, 9)


async def test_a_quota_holds_for_mails_stored_at_once_by_two_store_objects(
        backend: Backend) -> None:
    quota = Quota("user alice", "user alice", 5, "faxes", 3600, ("alice@example.org",))
    stores = [backend.make(), backend.make()]
    for opened in stores:
        await opened.open()
    try:
        async def store_one(index: int) -> bool:
            try:
                await stores[index % 2].add_mail_jobs(
                    new_mail(f"m{index}"), [NewJob(f"j{index}", "+4930123456", "acct")], DOCS,
                    [quota])
            except QuotaExceeded:
                return False
            return True

        stored = await asyncio.gather(*(store_one(index) for index in range(20)))
        assert stored.count(True) == 5
        assert len(await stores[0].list_jobs()) == 5
    finally:
        for opened in stores:
            await opened.close()


async def test_outbox_failures_and_next_due(store: Store) -> None:
    assert await store.outbox_next_due() is None
    first = await store.enqueue_mail(OutgoingMail("", ["a@b"], b"one", kind="bounce"))
    second = await store.enqueue_mail(OutgoingMail("", ["c@d"], b"two"))
    assert first < second
    due = await store.outbox_next_due()
    assert due is not None and due <= datetime.now(UTC)
    await store.outbox_give_up(first, "x" * 5000)
    assert [item.id for item in await store.due_outbox(10)] == [second]
    later = datetime.now(UTC) + timedelta(hours=2)
    await store.outbox_retry(second, later, "try later")
    due = await store.outbox_next_due()
    assert due is not None and abs((due - later).total_seconds()) < 1
    assert await store.outbox_depth() == 1


async def test_inbound_faxes_are_stored_once_and_handed_off(store: Store) -> None:
    received = datetime(2024, 5, 1, 12, 30, tzinfo=UTC)
    fax = InboundFax("F1", "+4930999", received, "+4940111", "REMOTE", 2, b"II*\0" + bytes(300))
    record = await store.add_inbound_fax("acct", fax)
    again = await store.add_inbound_fax("acct", fax)
    assert record == again
    assert (record.state, record.deliveries, record.pages, record.received_at) == (
        "received", 0, 2, received)
    assert await store.inbound_image("acct", "F1") == fax.image
    with pytest.raises(KeyError):
        await store.inbound_image("acct", "nope")
    assert await store.inbound_handoff("acct", "F1") == "waiting"  # no mail yet
    await store.queue_inbound_mails("acct", "F1", [
        OutgoingMail("", ["x@y"], b"fax", kind="inbound", inbound=("acct", "F1")),
        OutgoingMail("", ["z@y"], b"fax", kind="inbound", inbound=("acct", "F1"))])
    [stored] = await store.find_inbound("F1")
    assert (stored.state, stored.deliveries) == ("queued", 1)
    items = await store.due_outbox(10)
    await store.outbox_sent(items[0].id)
    assert await store.inbound_handoff("acct", "F1") == "waiting"
    await store.outbox_sent(items[1].id)
    assert await store.inbound_handoff("acct", "F1") == "handed_off"
    await store.mark_inbound_deleted("acct", "F1")
    assert [(r.fax_id, r.state) for r in await store.list_inbound()] == [("F1", "deleted")]
    assert await store.find_inbound("nope") == []
    # mailfax redeliver: mailed again, still deleted at the provider; the conversion's count
    await store.queue_inbound_mails("acct", "F1", [
        OutgoingMail("", ["x@y"], b"fax", kind="inbound", inbound=("acct", "F1"))], pages=3)
    [redelivered] = await store.find_inbound("F1")
    assert (redelivered.state, redelivered.deliveries, redelivered.pages) == ("deleted", 2, 3)
    assert await store.inbound_handoff("acct", "F1") == "waiting"


async def test_a_screened_fax_keeps_its_state_and_is_counted(store: Store) -> None:
    received = datetime(2024, 5, 1, 12, 30, tzinfo=UTC)
    for fax_id in ("J1", "D1"):
        await store.add_inbound_fax("acct", InboundFax(fax_id, "+4930999", received, "+49180",
                                                       "", 1, b"II*\0"))
    await store.mark_inbound_screened("acct", "J1", "blocked")
    await store.mark_inbound_screened("acct", "D1", "duplicate")
    again = await store.add_inbound_fax("acct", InboundFax("J1", "+4930999", received, "", "",
                                                           1, b"II*\0"))
    assert again.state == "blocked"  # fetched again (the delete was lost): still not mailed
    assert (await store.counts())["inbound"] == {"blocked": 1, "duplicate": 1}


async def test_two_instances_claiming_concurrently_get_disjoint_jobs(backend: Backend) -> None:
    first, second = backend.make(), backend.make()
    await first.open()
    await second.open()
    try:
        ids = [f"j{i}" for i in range(60)]
        for start in range(0, 60, 10):
            await add(first, f"m{start}", tuple(ids[start:start + 10]))
        claimed: dict[str, list[str]] = {"one": [], "two": []}

        async def worker(store: Store, owner: str) -> None:
            while jobs := await claim(store, owner, 3, 60):
                claimed[owner] += [job.id for job in jobs]

        await asyncio.gather(*(worker(store, owner)
                               for _ in range(4)
                               for store, owner in ((first, "one"), (second, "two"))))
        assert not set(claimed["one"]) & set(claimed["two"])
        assert sorted(claimed["one"] + claimed["two"]) == sorted(ids)  # each exactly once
        assert all(job.attempts == 1 for job in await first.list_jobs())
    finally:
        await first.close()
        await second.close()


async def test_migrate_applies_each_version_once(backend: Backend) -> None:
    applied = await migrate(backend.url)
    assert applied and applied == sorted(applied) and applied[0] == 1
    assert await migrate(backend.url) == []
    store = backend.make()
    await store.open()  # nothing left to do
    await add(store)
    await store.close()
    assert await migrate(backend.url) == []


async def test_a_newer_schema_is_refused(backend: Backend) -> None:
    applied = await migrate(backend.url)
    backend.set_schema_version(applied[-1] + 1)
    with pytest.raises(RuntimeError, match="newer than this mailfax"):
        await migrate(backend.url)
    store = backend.make()
    with pytest.raises(RuntimeError, match="newer than this mailfax"):
        await store.open()
    await store.close()


@ONLY_POSTGRES
async def test_postgres_wakes_waiters_when_another_instance_adds_jobs(backend: Backend) -> None:
    from mailfax.store.postgres import PostgresStore

    waiter, adder = PostgresStore(backend.url), PostgresStore(backend.url)
    await waiter.open()
    await adder.open()
    try:
        started = asyncio.get_running_loop().time()
        await waiter.wait_for_work(0.2)  # nothing happens: the whole timeout
        assert asyncio.get_running_loop().time() - started >= 0.19
        waiting = asyncio.create_task(waiter.wait_for_work(30))
        await asyncio.sleep(0.05)
        started = asyncio.get_running_loop().time()
        await add(adder)
        await asyncio.wait_for(waiting, 5)
        assert asyncio.get_running_loop().time() - started < 5
    finally:
        await waiter.close()
        await adder.close()


async def test_account_limits_count_the_live_leases_of_every_instance(backend: Backend) -> None:
    from mailfax.store.base import OTHER_ACCOUNTS

    first, second = backend.make(), backend.make()
    await first.open()
    await second.open()
    try:
        await first.add_mail_jobs(new_mail("m1"), [NewJob(f"a{i}", number_of(f"a{i}"), "acct")
                                                   for i in range(10)], DOCS)
        await first.add_mail_jobs(new_mail("m2"), [NewJob(f"b{i}", number_of(f"b{i}"), "other")
                                                   for i in range(3)], DOCS)
        limits = {"acct": 4}
        one = await claim(first, "one", 10, 60, limits)
        assert len(one) == 4 and {job.account for job in one} == {"acct"}
        assert await claim(second, "two", 10, 60, limits) == []
        await first.record(one[0].id, Transition(JobState.SUBMITTED, provider_job_id="P"))
        two = await claim(second, "two", 10, 60, limits)
        assert len(two) == 1  # the slot that one's recorded job freed
        # Not named: only with OTHER_ACCOUNTS, and then at most that many.
        others = await claim(second, "two", 10, 60, {"acct": 4, OTHER_ACCOUNTS: 2})
        assert [job.account for job in others] == ["other", "other"]

        async def claimer(store: Store, owner: str) -> list[str]:
            got: list[str] = []
            for _ in range(5):
                got += [job.id for job in await claim(store, owner, 10, 60, {"acct": 6})]
            return got

        more = await asyncio.gather(claimer(first, "one"), claimer(second, "two"))
        assert sum(map(len, more)) == 2  # 4 live leases of 6 allowed, whoever claims
    finally:
        await first.close()
        await second.close()


async def test_leases_are_renewed_only_by_their_holder(store: Store) -> None:
    await add(store, jobs=("j1", "j2"))
    assert len(await claim(store, "one", 10, 0.3)) == 2
    assert await store.renew_leases("two", ["j1", "j2"], 60) == 0
    assert await store.renew_leases("one", ["j1"], 60) == 1
    await asyncio.sleep(0.4)
    # j2's lease ran out; j1's was renewed and is still held.
    assert [job.id for job in await claim(store, "two", 10, 60)] == ["j2"]
    await store.record("j1", Transition(JobState.SUBMITTED, provider_job_id="P"))
    assert await store.renew_leases("one", ["j1"], 60) == 0  # recorded: nothing to renew


async def test_a_notification_is_claimed_and_mailed_once(backend: Backend) -> None:
    first, second = backend.make(), backend.make()
    await first.open()
    await second.open()
    try:
        await add(first, jobs=("j1", "j2"))
        claimed = await first.claim_notifications("one", 10, lease_seconds=60)
        assert [event.job_id for event in claimed] == ["j1", "j2"]
        again = await first.claim_notifications("one", 10, lease_seconds=60)
        assert [event.id for event in again] == [event.id for event in claimed]
        other = await second.claim_notifications("two", 10, lease_seconds=60)
        if backend.name == "postgresql":
            assert other == []  # leased to "one"
        # Both complete the same event (a lease that ran out): its mail is queued once.
        mail = OutgoingMail("", ["a@b"], b"status", job_id="j1")
        await first.complete_notifications([(claimed[0].id, [mail])])
        await second.complete_notifications([(claimed[0].id, [mail])])
        assert [item.job_id for item in await first.due_outbox(10)] == ["j1"]
    finally:
        await first.close()
        await second.close()


async def test_outbox_mails_are_leased_to_one_instance(backend: Backend) -> None:
    first, second = backend.make(), backend.make()
    await first.open()
    await second.open()
    try:
        ids = [await first.enqueue_mail(OutgoingMail("", ["a@b"], f"m{i}".encode()))
               for i in range(3)]
        assert [item.id for item in await first.claim_outbox("one", 2, 0.3)] == ids[:2]
        if backend.name == "postgresql":
            assert [item.id for item in await second.claim_outbox("two", 10, 60)] == ids[2:]
            await first.outbox_sent(ids[0])
            await asyncio.sleep(0.4)  # one's lease on ids[1] runs out
            assert [item.id for item in await second.claim_outbox("two", 10, 60)] == [ids[1],
                                                                                       ids[2]]
        else:  # one instance per SQLite database: nothing to share
            assert len(await second.claim_outbox("two", 10, 60)) == 3
    finally:
        await first.close()
        await second.close()


@ONLY_POSTGRES
async def test_postgres_singleton_moves_when_its_holder_goes(backend: Backend) -> None:
    from mailfax.store import postgres

    one, two = postgres.PostgresStore(backend.url), postgres.PostgresStore(backend.url)
    await one.open()
    await two.open()
    original = postgres.SINGLETON_RETRY_SECONDS
    postgres.SINGLETON_RETRY_SECONDS = 0.1
    try:
        async with one.singleton("tracker") as lost:
            waiting = asyncio.create_task(_enter(two, "tracker"))
            await asyncio.sleep(0.5)
            assert not waiting.done() and not lost.is_set()
        await asyncio.wait_for(waiting, 5)  # one left: two takes it
    finally:
        postgres.SINGLETON_RETRY_SECONDS = original
        await one.close()
        await two.close()


async def _enter(store: Store, name: str) -> None:
    async with store.singleton(name):  # type: ignore[attr-defined]
        pass


async def test_claim_work_records_outcomes_then_fills_the_slots_they_freed(
        backend: Backend) -> None:
    from mailfax.store.base import Outcome

    first, second = backend.make(), backend.make()
    await first.open()
    await second.open()
    try:
        await add(first, "m1", ("a1", "a2"))
        await first.add_mail_jobs(
            NewMail(mail_id="m2", envelope_from="bob@example.org", message_id=None,
                    subject="Rechnung März", references=[], from_header="",
                    client_address="::1"),
            [NewJob("b1", "+4930123456", "acct")], [FaxDocument("c.pdf", b"%PDF-c", 3)])
        limits = {"acct": 2}
        work = await first.claim_work("one", 5, 60, limits)
        assert [[job.id for job in unit.jobs] for unit in work] == [["a1", "a2"]]
        assert work[0].subject == "Hi" and work[0].documents == DOCS  # in their order
        assert await second.claim_work("two", 5, 60, limits) == []  # the limit is taken

        sent = Outcome("a1", Transition(JobState.SUBMITTED, provider_job_id="P1",
                                        notify=False), expected=[JobState.QUEUED])
        more = await second.claim_work("two", 5, 60, limits, finished=[sent])
        assert [[job.id for job in unit.jobs] for unit in more] == [["b1"]]
        assert more[0].subject == "Rechnung März"
        assert more[0].documents == [FaxDocument("c.pdf", b"%PDF-c", 3)]
        recorded = await first.get_job("a1")
        assert recorded is not None and recorded.state == JobState.SUBMITTED
        assert recorded.provider_job_id == "P1"
        assert [event.state for event in await first.job_events("a1")][-1] == JobState.SUBMITTED
        assert await first.claim_work("one", 5, 60, limits) == []  # a2 and b1 hold both
    finally:
        await first.close()
        await second.close()


async def test_claim_work_skips_refused_outcomes_and_still_claims(
        store: Store, caplog: pytest.LogCaptureFixture) -> None:
    from mailfax.store.base import Outcome

    await add(store, "m1", ("a1", "a2", "a3"))
    await store.record("a3", Transition(JobState.CANCELLED))
    claimed = await store.claim_work("one", 2, 60, {"acct": 2})
    assert [job.id for unit in claimed for job in unit.jobs] == ["a1", "a2"]
    outcomes = [
        Outcome("nope", Transition(JobState.SUBMITTED, provider_job_id="X")),  # no such job
        Outcome("a3", Transition(JobState.SUBMITTED, provider_job_id="Y")),  # cancelled: final
        Outcome("a2", Transition(JobState.FAILED), expected=[JobState.RETRYING]),  # moved on
        Outcome("a1", Transition(JobState.SUBMITTED, provider_job_id="Z")),
    ]
    await store.add_mail_jobs(new_mail("m2"), [NewJob("c1", "+4930123456", "acct")], DOCS)
    more = await store.claim_work("one", 1, 60, {"acct": 2}, finished=outcomes)
    assert [job.id for unit in more for job in unit.jobs] == ["c1"]
    states = {job.id: job.state for job in await store.get_jobs(["a1", "a2", "a3"])}
    assert states == {"a1": JobState.SUBMITTED, "a2": JobState.QUEUED,
                      "a3": JobState.CANCELLED}
    refused = [record.getMessage() for record in caplog.records if record.levelname == "ERROR"]
    assert len(refused) == 2  # in job id order on PostgreSQL, in the given order on SQLite
    assert {"nope", "a3"} == {job_id for job_id in ("nope", "a3", "a1", "a2")
                              if any(f"job {job_id} " in message for message in refused)}


async def test_concurrent_claim_work_never_exceeds_the_account_limit(backend: Backend) -> None:
    """Three instances, each with three loops that claim, "send" and hand back the outcome
    with their next claim. The jobs a loop holds are always leased, so at no moment may all
    loops together hold more than the limit."""
    from mailfax.store.base import Outcome

    stores = [backend.make() for _ in range(3)]
    for opened in stores:
        await opened.open()
    try:
        for start in range(0, 120, 20):
            await add(stores[0], f"m{start}", tuple(f"j{i:03d}" for i in range(start, start + 20)))
        held: set[str] = set()
        most = 0
        sent: list[str] = []

        async def loop(store: Store, owner: str) -> None:
            nonlocal most
            finished: list[Outcome] = []
            while True:
                work = await store.claim_work(owner, 3, 60, {"acct": 5}, finished=finished)
                ids = [job.id for unit in work for job in unit.jobs]
                held.update(ids)
                most = max(most, len(held))
                if not ids and not finished:
                    if not any(job.state == JobState.QUEUED for job in await store.list_jobs()):
                        return
                    await asyncio.sleep(0.005)
                await asyncio.sleep(0.001)  # the send
                held.difference_update(ids)  # handed back with the next claim
                sent.extend(ids)
                finished = [Outcome(job_id, Transition(JobState.SUBMITTED, notify=False,
                                                       provider_job_id=f"P{job_id}"))
                            for job_id in ids]

        await asyncio.gather(*(loop(store, f"instance{index}.{lane}")
                               for index, store in enumerate(stores) for lane in range(3)))
        assert sorted(sent) == [f"j{i:03d}" for i in range(120)]  # each exactly once
        assert most <= 5
        assert all(job.state == JobState.SUBMITTED for job in await stores[0].list_jobs())
    finally:
        for opened in stores:
            await opened.close()


@ONLY_POSTGRES
async def test_postgres_pipeline_statements_share_one_transaction(backend: Backend) -> None:
    """PostgresStore.claim_work counts on psycopg not syncing inside a pipeline block in
    autocommit mode: the claim lock, the outcomes and the claim are then one transaction."""
    import psycopg

    async with await psycopg.AsyncConnection.connect(backend.url, autocommit=True) as conn:
        async with conn.pipeline():
            await conn.execute("SELECT pg_advisory_xact_lock(7)")
            locks = conn.cursor()
            await locks.execute("SELECT count(*) FROM pg_locks"
                                " WHERE locktype = 'advisory' AND pid = pg_backend_pid()")
            times = conn.cursor()
            await times.execute("SELECT statement_timestamp() - now() > interval '0'")
        assert await locks.fetchone() == (1,)  # the lock of the first statement is still held
        assert await times.fetchone() == (True,)  # and now() is the first statement's
        after = await conn.execute("SELECT count(*) FROM pg_locks"
                                   " WHERE locktype = 'advisory' AND pid = pg_backend_pid()")
        assert await after.fetchone() == (0,)  # committed at the Sync


async def test_status_mails_are_counted_per_recipient_since_a_time(store: Store) -> None:
    def mail(to: str, kind: str = "delivered", job_id: str | None = "j1") -> OutgoingMail:
        return OutgoingMail(envelope_from="", recipients=[to], message=b"x", job_id=job_id,
                            kind=kind)

    before = datetime.now(UTC) - timedelta(seconds=1)
    for outgoing in (mail("Alice@Example.org"), mail("alice@example.org", "failed"),
                     mail("alice@example.org", "dsn"),  # a bounce is not a status mail
                     mail("alice@example.org", "fax", job_id=None),  # a received fax
                     mail("bob@example.org")):
        await store.enqueue_mail(outgoing)
    assert await store.status_mails_since("ALICE@example.org", before) == 2
    assert await store.status_mails_since("bob@example.org", before) == 1
    assert await store.status_mails_since("alice@example.org",
                                          datetime.now(UTC) + timedelta(seconds=1)) == 0


async def test_the_status_mail_limit_holds_over_two_instances(backend: Backend) -> None:
    from mailfax.config import NotifySettings
    from mailfax.outbound.notify import Notifier, Renderer

    stores = [backend.make(), backend.make()]
    for opened in stores:
        await opened.open()
    try:
        await add(stores[0], "m1", ("a1", "a2", "a3", "a4"))
        for job_id in ("a1", "a2", "a3", "a4"):
            await stores[0].record(job_id, Transition(JobState.SUBMITTED, provider_job_id="P",
                                                      notify=False))
            await stores[0].record(job_id, Transition(JobState.DELIVERED))
        notifiers = [Notifier(opened, NotifySettings(), Renderer(), mails_per_hour=3,
                              owner=f"instance{index}") for index, opened in enumerate(stores)]
        while sum([await notifier.handle_pending(limit=1) for notifier in notifiers]):
            pass
        queued = await stores[1].due_outbox(100)
        assert [item.recipients for item in queued] == [["alice@example.org"]] * 3
        assert {item.job_id for item in queued} < {"a1", "a2", "a3", "a4"}
    finally:
        for opened in stores:
            await opened.close()


@ONLY_POSTGRES
async def test_postgres_announces_submitted_jobs_to_the_tracking_instance(
        backend: Backend) -> None:
    """Jobs submitted on one instance are polled soon by the tracker on another, not only
    at its next full poll (interval 60 s here)."""
    from mailfax.outbound.tracking import Tracker
    from mailfax.providers.base import BaseProvider, ProviderContext, ProviderRef, StatusReport
    from mailfax.store.postgres import PostgresStore

    class Provider(BaseProvider):
        provider_name = "counting"

        def __init__(self) -> None:
            super().__init__(ProviderContext(account="acct", data_dir=Path(".")))
            self.asked: list[str] = []

        async def status(self, refs: Sequence[ProviderRef]) -> dict[str, StatusReport]:
            self.asked += [ref.job_id for ref in refs]
            return {ref.job_id: StatusReport(JobState.DELIVERED) for ref in refs}

    tracking, sending = PostgresStore(backend.url), PostgresStore(backend.url)
    await tracking.open()
    await sending.open()
    provider = Provider()
    tracker = Tracker(tracking, {"acct": provider}, interval=60.0)
    tracking.on_announced = tracker.wake
    heard: list[str] = []
    sending.on_announced = heard.extend  # every instance hears, the sender too
    task = asyncio.create_task(tracker.run())
    try:
        await asyncio.sleep(0.3)  # the tracker's first full poll: nothing in flight yet
        ids = [f"job-{index:08d}" for index in range(800)]  # two payloads' worth
        await add(sending, "m1", tuple(ids))
        for job_id in ids:
            await sending.record(job_id, Transition(JobState.SUBMITTED, provider_job_id="P",
                                                    notify=False))
        await sending.announce_submitted(ids)
        deadline = asyncio.get_running_loop().time() + 10
        while len(await tracking.list_jobs(state=JobState.DELIVERED)) < len(ids):
            assert asyncio.get_running_loop().time() < deadline, len(provider.asked)
            await asyncio.sleep(0.1)
        assert sorted(provider.asked) == ids  # each asked once, in a fast poll
        assert sorted(heard) == ids
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await tracking.close()
        await sending.close()


@ONLY_POSTGRES
async def test_an_instance_without_the_tracker_announces_the_jobs_it_sent(
        backend: Backend, tmp_path: Path, corpus: Path) -> None:
    """mailfax serve on PostgreSQL while another instance holds the tracker: the jobs it
    hands to the provider are announced, so that instance polls them soon."""
    from mailfax.app import Application
    from mailfax.store.postgres import PostgresStore
    from tests.conftest import Service, fax_mail, make_settings

    other = PostgresStore(backend.url)
    await other.open()
    heard: list[str] = []
    other.on_announced = heard.extend
    try:
        async with other.singleton("tracker"):  # the other instance tracks
            app = Application(make_settings(tmp_path, store={"url": backend.url}))
            await app.start()
            try:
                pdf = (corpus / "pdf" / "crazyones.pdf").read_bytes()
                await Service(app).send(fax_mail([("a.pdf", pdf, "application/pdf")]),
                                        "alice@example.org", ["030123456@fax.local"])
                deadline = asyncio.get_running_loop().time() + 10
                while not heard:
                    assert asyncio.get_running_loop().time() < deadline
                    await asyncio.sleep(0.05)
                [job] = await other.list_jobs()
                assert heard == [job.id] and job.provider_job_id is not None
                assert not app.tracker.running
            finally:
                await app.stop()
    finally:
        await other.close()


# -- the bundled emulator's fax network ------------------------------------------------------

async def test_the_emulator_network_records_a_fax_once_and_recognises_a_resend(
        backend: Backend) -> None:
    first, second = backend.make(), backend.make()  # two instances on one store
    await first.open()
    await second.open()
    try:
        job_id, duplicate = await first.emulator_submit("emu", "job-1", "+4930123456", 2)
        assert not duplicate and job_id.startswith("EMU-")
        # The other instance sends the same job again (a lease ran out): the same fax.
        assert await second.emulator_submit("emu", "job-1", "+4930123456", 2) == (job_id, True)
        # Another account is another network, even with the same reference.
        other, other_duplicate = await second.emulator_submit("other", "job-1", "+4930123456", 2)
        assert other != job_id and not other_duplicate
        seen = await second.emulator_transmissions("emu", [job_id, other])
        assert list(seen) == [job_id]
        assert (seen[job_id].reference, seen[job_id].pages, seen[job_id].send_calls,
                seen[job_id].cancelled) == ("job-1", 2, 2, False)
        await first.emulator_cancel("emu", job_id)
        assert (await second.emulator_transmissions("emu", [job_id]))[job_id].cancelled
    finally:
        await first.close()
        await second.close()


async def test_old_lost_answers_are_settled_behind_a_thousand_newer_unconfirmed_jobs(
        store: Store) -> None:
    """The tracker's "may have been sent" mail reaches the oldest unconfirmed jobs still
    looked for, also when more than 1000 newer unconfirmed jobs (mailed already: they stay
    unconfirmed) come first in a listing, and more of them than one batch."""
    from mailfax.outbound.tracking import SETTLE_BATCH, Tracker

    old = tuple(f"old{index:03d}" for index in range(SETTLE_BATCH + 50))
    newer = tuple(f"new{index:04d}" for index in range(1100))
    await add(store, "m-old", old)
    await asyncio.sleep(0.01)  # created (and updated) after the old ones
    await add(store, "m-new", newer)

    async def unconfirmed(job_id: str, code: str) -> None:
        assert await store.record(job_id, Transition(
            state=JobState.UNCONFIRMED, reason=reasons.reason(code),
            provider_job_id=f"ref:{job_id}", notify=False))

    await asyncio.gather(*(unconfirmed(job_id, reasons.ANSWER_LOST) for job_id in old))
    await asyncio.sleep(0.01)
    await asyncio.gather(*(unconfirmed(job_id, "unconfirmed") for job_id in newer))
    listed = await store.list_jobs(limit=1000, state=JobState.UNCONFIRMED)
    assert not {job.id for job in listed} & set(old)  # what the tracker used to read

    later = datetime.now(UTC) + timedelta(hours=6, seconds=1)
    due = await store.lost_answers_before(later - timedelta(hours=6), 10)
    assert len(due) == 10 and {job.id for job in due} <= set(old)  # only the lost answers
    assert [job.updated for job in due] == sorted(job.updated for job in due)  # oldest first
    assert await store.lost_answers_before(datetime.now(UTC) - timedelta(hours=1), 10) == []

    tracker = Tracker(store, {}, 60, unconfirmed_after=timedelta(hours=6), clock=lambda: later)
    assert await tracker.settle_unconfirmed() == len(old)
    assert await tracker.settle_unconfirmed() == 0  # one mail each
    for job in await store.get_jobs(old):
        assert job.state == JobState.UNCONFIRMED
        assert job.reason is not None and job.reason.code == "unconfirmed"
    mailed = {event.job_id for event in await store.pending_notifications(5000)
              if event.state == JobState.UNCONFIRMED}
    assert mailed == set(old)


async def test_unconfirmed_state_its_repeated_mail_and_the_deliberate_retry(
        store: Store) -> None:
    """Both stores: the state ``unconfirmed``, an event logged without a state change
    (``always_event``: the "may have been sent" mail after the search ran out), and
    ``reopen_job`` for ``mailfax retry``."""
    await add(store, jobs=("j1", "j2"))
    [claimed] = await claim(store, "one", 1, 30, {"acct": 1})
    assert await store.record(claimed.id, Transition(
        state=JobState.UNCONFIRMED, reason=reasons.reason("answer_lost"),
        provider_job_id=f"ref:{claimed.id}", notify=False))
    assert [job.id for job in await store.tracked_jobs("acct")] == [claimed.id]
    assert await store.record(claimed.id, Transition(
        state=JobState.UNCONFIRMED, reason=reasons.reason("unconfirmed"), always_event=True),
        expected=[JobState.UNCONFIRMED])
    events = await store.job_events(claimed.id)
    assert [event.state for event in events] == [JobState.QUEUED, JobState.UNCONFIRMED,
                                                 JobState.UNCONFIRMED]
    pending = [event.job_id for event in await store.pending_notifications(10)
               if event.state == JobState.UNCONFIRMED]
    assert pending == [claimed.id]  # only the second one is mailed

    reopened = await store.reopen_job(claimed.id, "sent again with mailfax retry")
    assert reopened is not None
    assert (reopened.state, reopened.attempts, reopened.provider_job_id) == (
        JobState.QUEUED, 0, None)
    again = await claim(store, "two", 2, 30, {"acct": 2})
    assert claimed.id in [job.id for job in again]  # due at once, for the dispatcher
    other = "j2" if claimed.id == "j1" else "j1"
    assert (await store.reopen_job(other, "x")) is not None  # queued: left as it is
    assert [event.state for event in await store.job_events(other)] == [JobState.QUEUED]
    assert await store.reopen_job("nosuchjob", "x") is None


async def test_an_unchanged_state_logs_an_event_only_when_asked(store: Store) -> None:
    """A retry that stays ``retrying`` adds no event, except the one "delayed" notice
    (``always_event``), which is then pending for the notifier."""
    await store.add_mail_jobs(new_mail(), [NewJob("j1", "+4930123456", "main")], [])
    retry = Transition(state=JobState.RETRYING, detail="attempt failed")
    assert await store.record("j1", retry)
    assert await store.record("j1", retry)
    assert [event.state for event in await store.job_events("j1")] == [
        JobState.QUEUED, JobState.RETRYING]
    notice = Transition(state=JobState.RETRYING, detail="still trying", always_event=True)
    assert await store.record("j1", notice)
    events = await store.job_events("j1")
    assert [event.detail for event in events][-1] == "still trying"
    assert "still trying" in [event.detail for event in await store.pending_notifications(10)]


async def test_spooled_mails_are_claimed_in_order_leased_and_removed(store: Store) -> None:
    """``smtp.accept = "spool"``: the raw mails kept before the 250, for the worker."""
    first = await store.spool_mail("alice@example.org", ["030123456@fax.local"], "127.0.0.1",
                                   None, b"Subject: one\r\n\r\nbody\r\n")
    second = await store.spool_mail("bob@example.org", ["a@fax.local", "b@fax.local"], "::1",
                                    "bob", b"\x00\xffraw")
    claimed = await store.claim_spooled(10, 60.0)
    assert [mail.id for mail in claimed] == [first, second]
    assert claimed[1].recipients == ["a@fax.local", "b@fax.local"]
    assert (claimed[1].user, claimed[1].client, claimed[1].message) == ("bob", "::1",
                                                                        b"\x00\xffraw")
    assert claimed[0].user is None and claimed[0].envelope_from == "alice@example.org"
    assert await store.claim_spooled(10, 60.0) == []  # leased: not taken twice meanwhile
    await store.unspool_mail(first)
    third = await store.spool_mail("c@example.org", ["x@fax.local"], "", None, b"x")
    assert [mail.id for mail in await store.claim_spooled(10, 0.0)] == [third]
    assert [mail.id for mail in await store.claim_spooled(10, 60.0)] == [third]  # lease ran out


async def test_a_job_held_until_its_send_time_is_not_claimed_before_it(store: Store) -> None:
    """A schedule mailfax keeps itself (README "Per-mail options"): the first attempt is at
    ``hold_until``; the dispatcher's wake-up time is that too."""
    later = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=2)
    await store.add_mail_jobs(new_mail(), [
        NewJob("held", "+4930123456", "acct", {"send_at": later.isoformat()}, hold_until=later)],
        DOCS)
    held = await store.get_job("held")
    assert held is not None and held.next_attempt_at == later
    assert held.options == {"send_at": later.isoformat()}
    assert await store.next_due_time() == later
    await add(store, mail_id="m2", jobs=("now",))
    assert [job.id for job in await claim(store, "one", 10, 60)] == ["now"]
    assert await claim(store, "one", 10, 60) == []
