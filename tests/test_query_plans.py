"""The hot queries run on indexes, so their cost does not grow with the history of finished
jobs (issue 19): every statement the dispatcher, tracker, quota check, ``/metrics`` and
``jobs --state`` run is captured from the store's own connection and explained."""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

from mailfax.model import JobState
from mailfax.providers.base import FaxDocument
from mailfax.store.base import ClaimRules, NewJob, NewMail, Quota, Store
from mailfax.store.sqlite import SqliteStore

T = TypeVar("T")
# A plan step that reads the whole jobs table: "SCAN jobs" without an index to walk.
# The quotas' totals per 300 s grow with time: read by their key, too.
FULL_SCAN = re.compile(r"^SCAN (jobs|j|job_created_totals)\b(?! USING (COVERING )?INDEX)")


async def store_under_quotas(store: Store, mail_id: str, sender: str) -> None:
    """One mail of one job, under the sender's faxes per hour and the service's pages per
    day: the quota counts intake runs in its transaction."""
    await store.add_mail_jobs(
        NewMail(mail_id=mail_id, envelope_from=sender, message_id=None, subject="s",
                references=[], from_header="", client_address="::1"),
        [NewJob(f"{mail_id}-job", "+4930123456", "main")],
        [FaxDocument("a.pdf", b"%PDF-1.4", 1)],
        [Quota(f"user {sender}", f"user {sender}", 10, "faxes", 3600, (sender,)),
         Quota("service", "this service", 10, "pages", 86400)])


async def dispatcher_and_tracker_queries(store: Store) -> None:
    """The dispatcher's claims and wake-up times (with and without held priorities), a busy
    number, and the tracker's looks for its jobs: the hot queries of both stores' tests."""
    await store.claim_work("me", 10, 20.0, {"main": 5, "*": 5})
    await store.claim_work("me", 10, 20.0, {"main": 5, "*": 5},
                           rules=ClaimRules(held_priorities=frozenset({1})))
    await store.next_due_time()
    await store.next_due_time(ClaimRules(held_priorities=frozenset({1})))
    await store.number_busy("+4930123456", [180.0])
    await store.unacknowledged_final_jobs("main", 100)
    await store.tracked_jobs("main")


async def test_sqlite_hot_queries_never_scan_the_jobs_table(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "store.sqlite3")
    await store.open()
    statements: list[str] = []
    try:
        await store._call(lambda conn: conn.set_trace_callback(statements.append))
        await dispatcher_and_tracker_queries(store)
        await store.counts()
        await store.list_jobs(limit=50, state=JobState.QUEUED)
        await store.lost_answers_before(datetime.now(UTC) - timedelta(hours=6), 200)
        await store.usage_since(datetime.now(UTC) - timedelta(hours=1), ["alice@example.org"])
        await store.usage_since(datetime.now(UTC) - timedelta(days=1))  # everyone's
        await store_under_quotas(store, "m", "alice@example.org")
        await store._call(lambda conn: conn.set_trace_callback(None))
    finally:
        await store.close()

    reads = [sql for sql in statements
             if re.search(r"\bFROM (jobs|job_created_totals)\b", sql)]
    assert len(reads) >= 10, statements  # every method above ran a query on jobs
    conn = sqlite3.connect(tmp_path / "store.sqlite3")
    scans = {}
    for sql in reads:
        plan = [row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + sql)]
        if any(FULL_SCAN.match(step) for step in plan):
            scans[sql] = plan
    assert scans == {}


async def test_sqlite_job_counts_follow_every_state_change(tmp_path: Path) -> None:
    """The per-state counts /metrics reads are kept by triggers: they must equal a count."""
    from mailfax.store.base import Transition
    from tests.test_store import add

    store = SqliteStore(tmp_path / "store.sqlite3")
    await store.open()
    try:
        await add(store, "m1", ("j1", "j2", "j3"))
        await store.record("j1", Transition(JobState.SUBMITTED, provider_job_id="P1"))
        await store.record("j1", Transition(JobState.DELIVERED))
        await store.record("j2", Transition(JobState.SUBMITTED, provider_job_id="P2"))
        counted = await store._call(lambda conn: dict(conn.execute(
            "SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()))
        kept = (await store.counts())["jobs"]
        assert counted == {"delivered": 1, "submitted": 1, "queued": 1}
        assert {state: n for state, n in kept.items() if n} == counted
        assert kept["queued"] == 1  # queued → submitted → delivered moved j1 along
    finally:
        await store.close()


JOBS_MAIL = ("INSERT INTO mails (id, received_at, envelope_from, message_id, subject, refs,"
             " from_header, client_address, auto_submitted, precedence, language)"
             " VALUES ('m', 0, 'a@example.org', NULL, 's', '[]', '', '::1', NULL, NULL, 'en')")


async def plan_on_bulk_jobs(path: Path, insert_jobs: str,
                            call: Callable[[SqliteStore], Awaitable[T]], marker: str
                            ) -> tuple[T, list[str]]:
    """What ``call`` finds in a store of the jobs ``insert_jobs`` adds in bulk (to mail "m"),
    and the query plan of its statement that contains ``marker``."""
    store = SqliteStore(path)
    await store.open()
    statements: list[str] = []
    try:
        await store._call(lambda conn: conn.execute(JOBS_MAIL))
        await store._call(lambda conn: conn.execute(insert_jobs))
        await store._call(lambda conn: conn.execute("ANALYZE"))
        await store._call(lambda conn: conn.set_trace_callback(statements.append))
        found = await call(store)
        await store._call(lambda conn: conn.set_trace_callback(None))
    finally:
        await store.close()
    query = next(sql for sql in statements if marker in sql)
    conn = sqlite3.connect(path)
    return found, [row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + query)]


async def test_sqlite_unacknowledged_jobs_are_found_without_walking_the_history(
        tmp_path: Path) -> None:
    """Not only no SCAN: with many finished, acknowledged jobs of the account the tracker's
    query walks only the unacknowledged ones (the planner alone picks jobs_tracked, which
    holds every finished job of the account)."""
    found, plan = await plan_on_bulk_jobs(tmp_path / "store.sqlite3", """
        INSERT INTO jobs (id, mail_id, account, number, state, pages, sender, created,
                          updated, provider_job_id, acknowledged)
        WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 5000)
        SELECT 'h' || i, 'm', 'main', '+4930123456', 'delivered', 1, 'a@example.org',
               i, i, 'P' || i, i > 3 FROM n""",
        lambda store: store.unacknowledged_final_jobs("main", 100), "acknowledged = 0")
    assert sorted(job.id for job in found) == ["h1", "h2", "h3"]
    assert any("USING INDEX jobs_unacknowledged" in step for step in plan), plan


async def test_sqlite_lost_answers_are_found_without_walking_settled_unconfirmed_jobs(
        tmp_path: Path) -> None:
    """The tracker's look for unconfirmed jobs to settle reads the partial index of the ones
    still looked for, not every unconfirmed job (those mailed already stay unconfirmed)."""
    found, plan = await plan_on_bulk_jobs(tmp_path / "store.sqlite3", """
        INSERT INTO jobs (id, mail_id, account, number, state, pages, sender, created,
                          updated, provider_job_id, reason)
        WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 5000)
        SELECT 'u' || i, 'm', 'main', '+4930123456', 'unconfirmed', 1, 'a@example.org',
               i, i, 'ref:u' || i,
               json_object('code', CASE WHEN i % 1000 = 0 THEN 'answer_lost'
                                        ELSE 'unconfirmed' END) FROM n""",
        lambda store: store.lost_answers_before(datetime.fromtimestamp(4500, UTC), 10),
        "answer_lost")
    assert [job.id for job in found] == ["u1000", "u2000", "u3000", "u4000"]
    assert any("USING INDEX jobs_answer_lost" in step for step in plan), plan


async def test_sqlite_a_users_quota_reads_only_that_users_jobs(tmp_path: Path) -> None:
    """With many jobs of other senders in the window, a user's count walks jobs_sender."""
    since = time.time() - 3600
    used, plan = await plan_on_bulk_jobs(tmp_path / "store.sqlite3", f"""
        INSERT INTO jobs (id, mail_id, account, number, state, pages, sender, created,
                          updated)
        WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 5000)
        SELECT 'r' || i, 'm', 'main', '+4930123456', 'delivered', 1,
               'user' || (i % 50) || '@example.org', {since} + i * 0.5, {since} + i * 0.5
        FROM n""",
        lambda store: store.usage_since(datetime.fromtimestamp(since, UTC),
                                        ["User1@example.org"]), "lower(sender)")
    assert used == (100, 100)
    assert any("USING INDEX jobs_sender" in step for step in plan), plan
