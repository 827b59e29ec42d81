"""Retention: ``Store.purge`` per kind on both backends (rows backdated in the database
directly), the SQLite file shrinking by incremental vacuum, file modes whatever the umask,
the Maildir purge, one purging instance at a time on PostgreSQL, ``serve``'s periodic run
and ``mailfax purge``."""

# ruff: noqa: F811
from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import stat
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from mailfax import cli
from mailfax.config import RetentionSettings, Settings
from mailfax.model import JobState
from mailfax.outbound.outbox import MaildirSink
from mailfax.providers.base import FaxDocument, InboundFax
from mailfax.store import migrate
from mailfax.store.base import (
    NewJob,
    OutboxItem,
    OutgoingMail,
    Purged,
    Quota,
    QuotaExceeded,
    Store,
    Transition,
)
from mailfax.store.retention import RetentionLoop, purge, purge_maildir, purge_store
from mailfax.store.sqlite import SqliteStore

# test_store's fixtures, used by name (as test parameters, which ruff sees as redefinitions)
from tests.test_store import (  # noqa: F401
    DOCS,
    Backend,
    backend,
    insert_jobs_created_at,
    new_mail,
    postgres_server,
    store,
)

DAY = 86400.0


def execute(backend: Backend, statement: str, *parameters: Any) -> list[tuple[Any, ...]]:
    """One statement straight on the database (``?`` placeholders on both backends)."""
    if backend.name == "sqlite":
        with sqlite3.connect(backend.url.removeprefix("sqlite:///")) as conn:
            return conn.execute(statement, parameters).fetchall()
    import psycopg

    with psycopg.connect(backend.url, autocommit=True) as conn:
        cursor = conn.execute(statement.replace("?", "%s"), parameters)  # type: ignore[arg-type]
        return cursor.fetchall() if cursor.description else []


def backdate(backend: Backend, table: str, columns: tuple[str, ...], where: str,
             days: float, *parameters: Any) -> None:
    """Move ``columns`` of the rows ``where`` selects ``days`` into the past."""
    if backend.name == "sqlite":
        moved = ", ".join(f"{column} = {column} - {days * DAY}" for column in columns)
    else:
        moved = ", ".join(f"{column} = {column} - interval '{days} days'" for column in columns)
    execute(backend, f"UPDATE {table} SET {moved} WHERE {where}", *parameters)


def document(mail_id: str, size: int = 1000) -> FaxDocument:
    return FaxDocument(f"{mail_id}.pdf", b"%PDF-" + os.urandom(size), 1)


async def finished_mail(store: Store, mail_id: str, state: JobState = JobState.DELIVERED,
                        size: int = 1000, jobs: int = 1) -> list[str]:
    """A mail whose jobs ended in ``state``, every event notified with a sent status mail."""
    job_ids = [f"{mail_id}-j{index}" for index in range(jobs)]
    await store.add_mail_jobs(new_mail(mail_id), [NewJob(job_id, "+4930123456", "acct")
                                                  for job_id in job_ids],
                              [document(mail_id, size)])
    for job_id in job_ids:
        if state != JobState.QUEUED:
            if state == JobState.DELIVERED:
                await store.record(job_id, Transition(JobState.SUBMITTED, provider_job_id="P"))
            await store.record(job_id, Transition(state))
    await notify_all(store)
    return job_ids


async def notify_all(store: Store) -> None:
    for event in await store.pending_notifications(100):
        await store.complete_notifications([(event.id, [OutgoingMail(
            envelope_from="", recipients=["alice@example.org"], message=b"status " * 100,
            job_id=event.job_id)])])
    for item in await store.due_outbox(100):
        await store.outbox_sent(item.id)


def age_mail(backend: Backend, mail_id: str, days: float) -> None:
    backdate(backend, "mails", ("received_at",), "id = ?", days, mail_id)
    backdate(backend, "jobs", ("created", "updated"), "mail_id = ?", days, mail_id)


async def test_documents_of_old_finished_jobs_go_recent_and_unfinished_ones_stay(
        backend: Backend, store: Store) -> None:
    old = await finished_mail(store, "old", size=5000)
    await finished_mail(store, "old-failed", JobState.FAILED, size=3000)
    await finished_mail(store, "old-queued", JobState.QUEUED)
    await finished_mail(store, "new")
    for mail_id in ("old", "old-failed", "old-queued"):
        age_mail(backend, mail_id, 40)
    before = datetime.now(UTC) - timedelta(days=30)

    counted = await store.purge("documents", before, dry_run=True, batch_size=1)
    assert (counted.items, counted.bytes) == (2, 5005 + 3005)
    assert await store.load_documents("old"), "a dry run deletes nothing"

    purged = await store.purge("documents", before, batch_size=1)
    assert (purged.items, purged.bytes) == (counted.items, counted.bytes)
    assert await store.load_documents("old") == []
    assert await store.load_documents("old-failed") == []
    assert await store.load_documents("old-queued"), "its job is still waiting to be sent"
    assert await store.load_documents("new")
    job = await store.get_job(old[0])
    assert job is not None and job.state == JobState.DELIVERED, "the job's history stays"
    assert execute(backend, "SELECT count(*) FROM blobs")[0][0] == 2
    again = await store.purge("documents", before)
    assert (again.items, again.bytes) == (0, 0)


async def test_a_document_another_recent_mail_shares_is_kept(store: Store,
                                                             backend: Backend) -> None:
    shared = document("shared")
    for mail_id in ("old", "new"):
        await store.add_mail_jobs(new_mail(mail_id), [NewJob(f"{mail_id}-j", "+4930123456",
                                                             "acct")], [shared])
        await store.record(f"{mail_id}-j", Transition(JobState.CANCELLED))
    age_mail(backend, "old", 40)
    purged = await store.purge("documents", datetime.now(UTC) - timedelta(days=30))
    assert (purged.items, purged.bytes) == (1, 0)
    assert await store.load_documents("new") == [shared]


async def test_history_of_old_jobs_goes_with_events_and_status_mails(
        backend: Backend, store: Store) -> None:
    old = await finished_mail(store, "old", jobs=2)
    new = await finished_mail(store, "new")
    pending = await finished_mail(store, "old-pending", JobState.QUEUED)
    await store.record(pending[0], Transition(JobState.FAILED))  # not mailed yet
    for mail_id in ("old", "old-pending"):
        age_mail(backend, mail_id, 400)
    before = datetime.now(UTC) - timedelta(days=365)
    counts_before = (await store.counts())["jobs"]

    counted = await store.purge("history", before, dry_run=True)
    assert counted.items == 2 and counted.bytes > 1000  # the document and two status mails
    assert await store.get_job(old[0]) is not None

    purged = await store.purge("history", before)
    assert purged.items == 2
    assert await store.get_job(old[0]) is None and await store.job_events(old[0]) == []
    assert await store.get_mail("old") is None
    assert execute(backend, "SELECT count(*) FROM outbox WHERE job_id = ?", old[0]) == [(0,)]
    assert await store.get_job(pending[0]) is not None, "its failure is not mailed yet"
    assert await store.get_job(new[0]) is not None and await store.load_documents("new")
    counts = (await store.counts())["jobs"]
    assert counts.get("delivered", 0) == counts_before["delivered"] - 2


async def received(store: Store, fax_id: str, handed_off: bool = True) -> None:
    await store.add_inbound_fax("acct", InboundFax(
        fax_id=fax_id, called_number="+4930123456", received_at=datetime.now(UTC),
        originator="+4940555123", remote_id="", pages=1, image=b"II*\0" + os.urandom(4000)))
    await store.queue_inbound_mails("acct", fax_id, [OutgoingMail(
        envelope_from="fax@localhost", recipients=["office@example.org"],
        message=b"fax mail " * 1000, kind="inbound", inbound=("acct", fax_id))])
    if handed_off:
        for item in await store.due_outbox(100):
            await store.outbox_sent(item.id)
        await store.mark_inbound_deleted("acct", fax_id)


async def test_received_fax_images_go_after_hand_off_the_record_stays(
        backend: Backend, store: Store) -> None:
    await received(store, "old")
    await received(store, "new")
    await received(store, "old-waiting", handed_off=False)
    backdate(backend, "inbound_faxes", ("fetched_at",), "fax_id <> 'new'", 40)
    before = datetime.now(UTC) - timedelta(days=30)

    counted = await store.purge("received_faxes", before, dry_run=True)
    assert (counted.items, counted.bytes) == (1, 4004 + 9000)
    purged = await store.purge("received_faxes", before)
    assert (purged.items, purged.bytes) == (1, 4004 + 9000)
    assert await store.inbound_image("acct", "old") == b""
    assert await store.inbound_handoff("acct", "old") == "handed_off", "still shown as mailed"
    assert [fax.fax_id for fax in await store.find_inbound("old")] == ["old"]
    assert len(await store.inbound_image("acct", "new")) == 4004
    assert len(await store.inbound_image("acct", "old-waiting")) == 4004
    assert execute(backend, "SELECT length(message) FROM outbox WHERE inbound_fax_id = ?",
                   "old") == [(0,)]

    backdate(backend, "inbound_faxes", ("fetched_at",), "fax_id = 'old'", 400)
    history = await store.purge("history", datetime.now(UTC) - timedelta(days=365))
    assert history.items == 1
    assert await store.find_inbound("old") == []
    assert execute(backend, "SELECT count(*) FROM outbox WHERE inbound_fax_id = ?",
                   "old") == [(0,)]


async def test_images_of_screened_faxes_go_too(backend: Backend, store: Store) -> None:
    """Junk and duplicate faxes are never mailed: their images go after the same days."""
    for fax_id, state in (("junk", "blocked"), ("again", "duplicate")):
        await store.add_inbound_fax("acct", InboundFax(
            fax_id=fax_id, called_number="+4930123456", received_at=datetime.now(UTC),
            originator="+4990055", remote_id="", pages=1, image=b"II*\0" + os.urandom(4000)))
        await store.mark_inbound_screened("acct", fax_id, state)
    backdate(backend, "inbound_faxes", ("fetched_at",), "fax_id = 'junk'", 40)

    purged = await store.purge("received_faxes", datetime.now(UTC) - timedelta(days=30))
    assert (purged.items, purged.bytes) == (1, 4004)
    assert await store.inbound_image("acct", "junk") == b""
    assert len(await store.inbound_image("acct", "again")) == 4004, "not old enough yet"


async def test_sent_outbox_mails_and_dsns_go_each_after_their_days(
        backend: Backend, store: Store) -> None:
    for kind in ("status", "dsn", "admin"):
        await store.enqueue_mail(OutgoingMail(envelope_from="", recipients=["a@example.org"],
                                              message=b"x" * 100, kind=kind))
    for item in await store.due_outbox(100):
        await store.outbox_sent(item.id)
    pending = await store.enqueue_mail(OutgoingMail(envelope_from="", recipients=["b@x.org"],
                                                    message=b"y" * 10))
    await store.enqueue_mail(OutgoingMail(envelope_from="", recipients=["c@x.org"],
                                          message=b"z" * 10))  # sent, but new
    for item in await store.due_outbox(100):
        if item.id != pending:
            await store.outbox_sent(item.id)
    backdate(backend, "outbox", ("created",), "message <> ?", 10, b"z" * 10)
    before = datetime.now(UTC) - timedelta(days=7)

    outbox = await store.purge("outbox", before)
    assert (outbox.items, outbox.bytes) == (2, 200)  # the status mail and the alert
    assert await store.purge("dsn", datetime.now(UTC) - timedelta(days=30)) == (
        await store.purge("dsn", datetime.now(UTC) - timedelta(days=30), dry_run=True))
    dsn = await store.purge("dsn", before)
    assert (dsn.items, dsn.bytes) == (1, 100)
    left = sorted(row[0] for row in execute(backend, "SELECT kind FROM outbox"))
    assert left == ["status", "status"]  # the pending one and the new one
    assert [item.id for item in await store.due_outbox(10)] == [pending]


def totals_buckets(backend: Backend) -> set[int]:
    return {int(row[0]) for row in execute(backend, "SELECT bucket FROM job_created_totals")}


async def test_quota_totals_older_than_any_window_go_and_the_count_stays(
        backend: Backend, store: Store) -> None:
    """The service-wide quotas' totals per 300 s are purged once older than any quota window
    needs (two days: the longest window is a day), folded or not yet (PostgreSQL); the
    count over the last day still equals counting the jobs, and a quota still holds."""
    await store.add_mail_jobs(new_mail("m1"), [NewJob("j1", "+4930123456", "acct")], DOCS)
    now = time.time()
    created = [now - 3 * DAY, now - 2.5 * DAY, now - 1.5 * DAY, now - 0.5 * DAY, now - 60]
    insert_jobs_created_at(backend, created[:3], 2)
    await store.counts()  # PostgreSQL folds these (the rest stay the triggers' delta rows)
    insert_jobs_created_at(backend, created[3:], 2, first=3)
    insert_jobs_created_at(backend, [now - 4 * DAY], 2, first=5)  # a delta, not folded yet
    since = datetime.fromtimestamp(now - DAY, UTC)
    in_window = 1 + sum(1 for at in created if at >= now - DAY)  # j1 (3 pages) and these
    plain = (in_window, 3 + 2 * (in_window - 1))
    assert await store.usage_since(since) == plain
    old = {int(at // 300) for at in (now - 4 * DAY, *created[:2])}
    assert old < totals_buckets(backend)

    settings = RetentionSettings(batch_size=1)  # one bucket per transaction
    counted, _, _ = await purge_store(store, settings, datetime.now(UTC), dry_run=True)
    assert [p for p in counted if p.kind == "quota_totals"] == [Purged("quota_totals", 3)]
    assert old < totals_buckets(backend), "a dry run deletes nothing"
    purged, _, _ = await purge_store(store, settings, datetime.now(UTC), dry_run=False)
    assert [p for p in purged if p.kind == "quota_totals"] == [Purged("quota_totals", 3)]
    left = totals_buckets(backend)
    assert not old & left
    assert {int(at // 300) for at in created[2:]} <= left, "within two days: kept"
    assert await store.usage_since(since) == plain
    pages = Quota("service", "this service", plain[1] + 3, "pages", DAY)
    await store.add_mail_jobs(new_mail("m2"), [NewJob("j2", "+4930123456", "acct")], DOCS,
                              [pages])  # exactly up to the limit
    with pytest.raises(QuotaExceeded) as over:
        await store.add_mail_jobs(new_mail("m3"), [NewJob("j3", "+4930123456", "acct")], DOCS,
                                  [pages])
    assert over.value.used == plain[1] + 3


def test_no_quota_counts_over_longer_than_the_totals_are_kept() -> None:
    with pytest.raises(ValueError, match="up to 86400 s"):
        Quota("service", "this service", 10, "pages", 2 * DAY)


# -- SQLite: the file shrinks, and is private -----------------------------------------------

def sqlite_backend(tmp_path: Path) -> Backend:
    return Backend("sqlite", f"sqlite:///{tmp_path / 'store.sqlite3'}", lambda version: None)


async def sqlite_store_with_finished_mail(tmp_path: Path, mail_id: str
                                         ) -> tuple[Backend, Store]:
    """An open SQLite store in ``tmp_path`` holding one finished mail, ``mail_id``."""
    backend = sqlite_backend(tmp_path)
    store = backend.make()
    await store.open()
    await finished_mail(store, mail_id)
    return backend, store


async def test_the_sqlite_file_gets_smaller_after_purge_and_vacuum(tmp_path: Path) -> None:
    backend = sqlite_backend(tmp_path)
    path = tmp_path / "store.sqlite3"
    store = backend.make()
    await store.open()
    for index in range(6):
        await finished_mail(store, f"old{index}", size=1_000_000)
    await finished_mail(store, "new", size=200_000)
    await store.close()
    size_before = path.stat().st_size
    assert execute(backend, "PRAGMA auto_vacuum") == [(2,)]  # INCREMENTAL from the start
    for index in range(6):
        age_mail(backend, f"old{index}", 40)

    await store.open()
    commits = store.commits if isinstance(store, SqliteStore) else 0
    assert (await store.purge("documents", datetime.now(UTC), dry_run=True)).items == 7
    assert isinstance(store, SqliteStore) and store.commits - commits >= 2, \
        "6 MB of documents are not one transaction"
    report = await purge(Settings(data_dir=tmp_path), store)
    documents = next(p for p in report.purged if p.kind == "documents")
    assert (documents.items, documents.bytes) == (6, 6 * 1_000_005)
    assert report.reclaimed >= 5_000_000
    assert await store.load_documents("new")
    assert path.stat().st_size < size_before - 5_000_000, "smaller while still open"
    await store.close()
    assert execute(backend, "PRAGMA integrity_check") == [("ok",)]
    assert execute(backend, "PRAGMA freelist_count") == [(0,)]


async def test_migrate_switches_an_older_sqlite_store_to_incremental_vacuum(
        tmp_path: Path) -> None:
    backend, store = await sqlite_store_with_finished_mail(tmp_path, "m")
    await store.close()
    execute(backend, "PRAGMA auto_vacuum=NONE")
    path = tmp_path / "store.sqlite3"
    with sqlite3.connect(path, isolation_level=None) as conn:
        conn.execute("PRAGMA auto_vacuum=NONE")
        conn.execute("VACUUM")  # as a store made before retention
    assert execute(backend, "PRAGMA auto_vacuum") == [(0,)]
    await migrate(backend.url)
    assert execute(backend, "PRAGMA auto_vacuum") == [(2,)]
    store = backend.make()
    await store.open()
    assert await store.load_documents("m")
    await store.close()


@pytest.fixture
def umask_022() -> Iterator[None]:
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.usefixtures("umask_022")
async def test_database_and_maildir_files_are_private_whatever_the_umask(
        tmp_path: Path) -> None:
    store = sqlite_backend(tmp_path).make()
    await store.open()
    await finished_mail(store, "m")
    path = tmp_path / "store.sqlite3"
    try:
        assert mode(path) == 0o600
        assert mode(path.with_name("store.sqlite3-wal")) == 0o600
        assert mode(path.with_name("store.sqlite3-shm")) == 0o600
    finally:
        await store.close()
    os.chmod(path, 0o644)  # a store made by an older mailfax
    await store.open()
    await store.close()
    assert mode(path) == 0o600

    sink = MaildirSink(tmp_path / "outbox")
    await sink.deliver(OutboxItem(id=1, envelope_from="", recipients=["a@b.c"],
                                  message=b"Subject: x\r\n\r\nhello\r\n", attempts=0,
                                  job_id=None))
    [written] = (tmp_path / "outbox" / "new").iterdir()
    assert mode(written) == 0o640
    assert mode(tmp_path / "outbox" / "new") == 0o750


def test_the_maildir_purge_deletes_only_old_mailfax_files(tmp_path: Path) -> None:
    now = time.time()
    files = {"new/mailfax-1-aa": 40, "cur/mailfax-2-bb:2,S": 40, "new/mailfax-3-cc": 1,
             "new/someone-elses": 40, "tmp/mailfax-4-dd.1.ab": 2, "tmp/mailfax-5-ee.1.cd": 0.5}
    for name, days in files.items():
        path = tmp_path / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"x" * 10)
        os.utime(path, (now - days * DAY, now - days * DAY))
    counted = purge_maildir(tmp_path, now - 30 * DAY, now, dry_run=True)
    assert (counted.items, counted.bytes) == (3, 30)
    assert all((tmp_path / name).exists() for name in files)
    purged = purge_maildir(tmp_path, now - 30 * DAY, now, dry_run=False)
    assert purged == counted
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) \
        == ["new/mailfax-3-cc", "new/someone-elses", "tmp/mailfax-5-ee.1.cd"]


async def test_zero_days_keeps_a_kind_forever(backend: Backend, store: Store,
                                              tmp_path: Path) -> None:
    await finished_mail(store, "old")
    age_mail(backend, "old", 4000)
    settings = RetentionSettings(documents_days=0, history_days=0)
    purged, _, busy = await purge_store(store, settings, datetime.now(UTC), dry_run=False)
    assert not busy and all(p.items == 0 for p in purged)
    assert await store.load_documents("old")


# -- PostgreSQL: one instance purges at a time ----------------------------------------------

@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
async def test_only_one_instance_purges_a_postgresql_store_at_a_time(
        backend: Backend, store: Store) -> None:
    await finished_mail(store, "old")
    age_mail(backend, "old", 40)
    other = backend.make()
    await other.open()
    try:
        async with store.retention_lock() as ours:
            assert ours
            purged, _, busy = await purge_store(other, RetentionSettings(), datetime.now(UTC),
                                                dry_run=False)
            assert busy and purged == []
            assert await other.load_documents("old")
        purged, _, busy = await purge_store(other, RetentionSettings(), datetime.now(UTC),
                                            dry_run=False)
        assert not busy and await other.load_documents("old") == []
    finally:
        await other.close()


# -- serve's periodic run, and the command ---------------------------------------------------

async def rounds(loop: RetentionLoop, count: int) -> None:
    for _ in range(count):
        loop.round_done.clear()
        await asyncio.wait_for(loop.round_done.wait(), 10)


async def test_serves_retention_loop_purges_every_interval_by_its_clock(
        tmp_path: Path) -> None:
    backend, store = await sqlite_store_with_finished_mail(tmp_path, "m")
    clock = [datetime.now(UTC)]
    settings = Settings(data_dir=tmp_path, store={"url": backend.url},
                        retention={"interval_hours": 0.1 / 3600})
    loop = RetentionLoop(settings, store, clock=lambda: clock[0])
    task = asyncio.create_task(loop.run())
    try:
        await rounds(loop, 2)
        assert await store.load_documents("m"), "not old yet by the loop's clock"
        clock[0] += timedelta(days=31)
        await rounds(loop, 2)
        assert await store.load_documents("m") == []
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await store.close()


def test_the_purge_command_and_a_retry_after_it(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "mailfax.toml"
    config.write_text('data_dir = "data"\n')
    backend = Backend("sqlite", f"sqlite:///{tmp_path / 'data' / 'mailfax.sqlite3'}",
                      lambda version: None)

    async def prepare() -> list[str]:
        store = backend.make()
        await store.open()
        try:
            return await finished_mail(store, "old", JobState.FAILED)
        finally:
            await store.close()

    [job_id] = asyncio.run(prepare())
    age_mail(backend, "old", 40)
    assert cli.main(["purge", "--dry-run", "-c", str(config)]) == 0
    out = capsys.readouterr().out
    assert "documents" in out and "would delete" in out
    assert cli.main(["purge", "--dry-run", "--json", "-c", str(config)]) == 0
    kinds = json.loads(capsys.readouterr().out)["kinds"]
    assert kinds["documents"]["items"] == 1
    assert kinds["quota_totals"] == {"items": 0, "bytes": 0, "days": 2}, "none that old"
    assert cli.main(["purge", "-c", str(config)]) == 0
    out = capsys.readouterr().out
    assert "-- deleted 1 items" in out, out
    assert cli.main(["retry", job_id, "-c", str(config)]) == 1
    assert "documents were deleted" in capsys.readouterr().err


async def test_a_failing_purge_is_logged_and_tried_again_not_a_crash(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = sqlite_backend(tmp_path).make()  # never opened: every call fails
    settings = Settings(data_dir=tmp_path, retention={"interval_hours": 0.05 / 3600})
    loop = RetentionLoop(settings, store)
    task = asyncio.create_task(loop.run())
    try:
        await asyncio.sleep(0.3)
        assert not task.done()
        failures = [r for r in caplog.records if "purge failed" in r.getMessage()]
        assert len(failures) >= 2 and "store is not open" in failures[0].getMessage()
        assert not loop.round_done.is_set()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_redeliver_refuses_a_fax_whose_image_was_purged(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "mailfax.toml"
    config.write_text('data_dir = "data"\n')
    backend = Backend("sqlite", f"sqlite:///{tmp_path / 'data' / 'mailfax.sqlite3'}",
                      lambda version: None)

    async def prepare() -> None:
        store = backend.make()
        await store.open()
        try:
            await received(store, "fax1")
        finally:
            await store.close()

    asyncio.run(prepare())
    backdate(backend, "inbound_faxes", ("fetched_at",), "fax_id = ?", 40, "fax1")
    assert cli.main(["purge", "-c", str(config)]) == 0
    assert "received_faxes        1" in capsys.readouterr().out
    assert cli.main(["redeliver", "fax1", "-c", str(config)]) == 1
    assert "its image was deleted" in capsys.readouterr().err
