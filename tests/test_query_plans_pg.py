"""PostgreSQL: the hot queries run on indexes once the jobs table is big (issue 19). The SQL is
captured from the store's own cursors while its methods run on a table of 50,000 finished
jobs and a few live ones, then ``EXPLAIN``ed with the same parameters."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import psycopg
import pytest

from mailfax.model import JobState
from mailfax.providers.base import FaxDocument
from mailfax.store.base import NewJob, NewMail, Quota, QuotaExceeded
from mailfax.store.postgres import PostgresStore
from tests import test_multi_instance
from tests.test_query_plans import dispatcher_and_tracker_queries, store_under_quotas

FINISHED_JOBS = 50_000
T = TypeVar("T")
SEQ_SCAN_ON_JOBS = re.compile(r"Seq Scan on (jobs|job_created_totals)\b")
# The server for the module and a database of its own per test, as the multi-instance tests
postgres_server = test_multi_instance.postgres_server
database = test_multi_instance.database

HISTORY = """
INSERT INTO mails (id, received_at, envelope_from, message_id, subject, refs, from_header,
                   client_address, language)
VALUES ('history', now(), 'history@example.org', NULL, 'history', '[]', '', '::1', 'en');
INSERT INTO jobs (id, mail_id, account, number, state, pages, sender, created, updated,
                  attempts, provider_job_id, acknowledged)
SELECT 'h' || i, 'history', 'main', '+4930' || (1000000 + i), 'delivered', 1,
       'user' || (i % 50) || '@example.org', now() - interval '2 days' - i * interval '1 min',
       now() - interval '2 days' - i * interval '1 min', 1, 'P' || i, true
FROM generate_series(1, %s) AS i;
"""


def captured_statements(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Any]]:
    """Every (query, params) the store's cursors execute from now on."""
    statements: list[tuple[str, Any]] = []
    original = psycopg.AsyncCursor.execute

    async def execute(self: Any, query: Any, params: Any = None, **kwargs: Any) -> Any:
        statements.append((str(query), params))
        return await original(self, query, params, **kwargs)

    monkeypatch.setattr(psycopg.AsyncCursor, "execute", execute)
    return statements


def plan(conn: psycopg.Connection[Any], query: str, params: Any) -> str:
    rows = conn.execute(f"EXPLAIN {query}", params).fetchall()  # type: ignore[call-overload]
    return "\n".join(row[0] for row in rows)


async def test_postgres_hot_queries_use_indexes_on_a_big_jobs_table(
        database: str, monkeypatch: pytest.MonkeyPatch) -> None:
    store = PostgresStore(database, listen=False)
    await store.open()  # the schema, every migration
    try:
        with psycopg.connect(database, autocommit=True) as conn:
            for statement in HISTORY.split(";\n")[:2]:
                conn.execute(statement.replace("%s", str(FINISHED_JOBS)))
        for index in range(5):  # a few live jobs
            mail = NewMail(mail_id=f"m{index}", envelope_from="a@example.org", message_id=None,
                           subject="s", references=[], from_header="", client_address="::1")
            await store.add_mail_jobs(mail, [NewJob(f"j{index}", "+4930123456", "main")],
                                      [FaxDocument("a.pdf", b"%PDF-1.4", 1)])
        await store.counts()  # folds the quota totals' deltas, as each /metrics scrape does
        with psycopg.connect(database, autocommit=True) as conn:
            conn.execute("ANALYZE")  # what autovacuum does after such a bulk insert

        statements = captured_statements(monkeypatch)
        await dispatcher_and_tracker_queries(store)
        kept = await store.counts()
        await store.list_jobs(limit=50, state=JobState.QUEUED)
        await store.lost_answers_before(datetime.now(UTC) - timedelta(hours=6), 200)
        await store.list_jobs(limit=50, state=JobState.DELIVERED)
        await store.usage_since(datetime.now(UTC) - timedelta(hours=1), ["user1@example.org"])
        await store.usage_since(datetime.now(UTC) - timedelta(days=1))  # everyone's
        await store_under_quotas(store, "q", "user1@example.org")
        monkeypatch.undo()
    finally:
        await store.close()
    assert kept["jobs"] == {"delivered": FINISHED_JOBS, "queued": 5}

    reads = [(query, params) for query, params in statements
             if re.search(r"\b(FROM|UPDATE) jobs\b", query)]
    assert len(reads) >= 7, statements
    with psycopg.connect(database, autocommit=True) as conn:
        # The table is big enough for the planner to care: an unindexed filter scans it.
        assert SEQ_SCAN_ON_JOBS.search(plan(conn, "SELECT * FROM jobs WHERE pages = %s", (3,)))
        scans = {query: text for query, params in reads
                 if SEQ_SCAN_ON_JOBS.search(text := plan(conn, query, params))}
    assert scans == {}


async def test_postgres_job_counts_follow_every_state_change(database: str) -> None:
    """/metrics' per-state counts come from the triggers' rows, folded on each read: they
    must equal a count of the table after inserts, transitions and a deletion."""
    from mailfax.store.base import Transition
    from tests.test_store import add

    store = PostgresStore(database, listen=False)
    await store.open()
    try:
        await add(store, "m1", ("j1", "j2", "j3"))
        await store.record("j1", Transition(JobState.SUBMITTED, provider_job_id="P1"))
        assert (await store.counts())["jobs"] == {"queued": 2, "submitted": 1}
        await store.record("j1", Transition(JobState.DELIVERED))
        await store.record("j2", Transition(JobState.SUBMITTED, provider_job_id="P2"))
        first, again = await store.counts(), await store.counts()  # folding twice is the same
        with psycopg.connect(database, autocommit=True) as conn:
            counted = dict(conn.execute(
                "SELECT state, count(*) FROM jobs GROUP BY state").fetchall())
            conn.execute("DELETE FROM events WHERE job_id = 'j3'")
            conn.execute("DELETE FROM jobs WHERE id = 'j3'")
            folded_rows = conn.execute("SELECT count(*) FROM job_state_counts").fetchone()
        assert counted == {"delivered": 1, "submitted": 1, "queued": 1}
        assert first["jobs"] == again["jobs"] == counted
        assert folded_rows is not None and folded_rows[0] <= 4  # 3 folded + the deletion's -1
        assert (await store.counts())["jobs"] == {"delivered": 1, "submitted": 1}
    finally:
        await store.close()


async def plan_on_history(database: str, monkeypatch: pytest.MonkeyPatch,
                          history: str, then: Sequence[str],
                          call: Callable[[PostgresStore], Awaitable[T]], marker: str
                          ) -> tuple[T, str]:
    """What ``call`` finds after HISTORY's jobs, changed into ``history`` (FINISHED_JOBS of
    them) and the statements ``then``, are in the table; and the plan of its statement that
    contains ``marker``."""
    store = PostgresStore(database, listen=False)
    await store.open()
    try:
        with psycopg.connect(database, autocommit=True) as conn:
            conn.execute(HISTORY.split(";\n")[0])
            conn.execute(history.replace("%s", str(FINISHED_JOBS)))
            for statement in then:
                conn.execute(statement)
            conn.execute("ANALYZE")
        statements = captured_statements(monkeypatch)
        found = await call(store)
        monkeypatch.undo()
    finally:
        await store.close()
    [(query, params)] = [(q, p) for q, p in statements if marker in q]
    with psycopg.connect(database, autocommit=True) as conn:
        return found, plan(conn, query, params)


JOBS = HISTORY.split(";\n")[1]


async def test_postgres_lost_answers_are_found_on_their_partial_index(
        database: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With many unconfirmed jobs mailed already (they stay unconfirmed), the tracker's look
    for the ones still to settle reads jobs_answer_lost, which holds only those."""
    found, text = await plan_on_history(
        database, monkeypatch, JOBS.replace("'delivered'", "'unconfirmed'"),
        ["""UPDATE jobs SET reason = jsonb_build_object('code',
            CASE WHEN right(id, 4) = '0000' THEN 'answer_lost' ELSE 'unconfirmed' END)"""],
        lambda store: store.lost_answers_before(datetime.now(UTC), 10), "answer_lost")
    assert sorted(job.id for job in found) == [f"h{i}0000" for i in range(1, 6)]
    assert "jobs_answer_lost" in text, text


async def test_postgres_a_users_quota_reads_only_that_users_jobs(
        database: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With many jobs of other senders in the window, a user's count walks jobs_sender (the
    user's jobs), not jobs_created (everyone's jobs of the hour)."""
    used, text = await plan_on_history(
        database, monkeypatch, JOBS.replace("interval '2 days' - i * interval '1 min'",
                                            "i * interval '50 ms'"),  # all in the last hour
        [], lambda store: store.usage_since(datetime.now(UTC) - timedelta(hours=1),
                                            ["User1@example.org"]), "FROM jobs")
    assert used[0] == FINISHED_JOBS // 50
    assert "jobs_sender" in text, text


async def test_postgres_a_users_quota_reads_only_that_users_jobs_on_a_quiet_day(
        database: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """20,000 jobs of the last day from 50 senders, some 900 of them in the last hour: the
    planner's cost model took jobs_created for the hour (its rows in the order of the table,
    every job of the hour whoever sent it) over jobs_sender (the user's 18, scattered). The
    quota check intake runs must walk the user's jobs alone, whatever the volume."""

    async def over_quota(store: PostgresStore) -> int:
        quota = Quota("user u1", "user u1", 5, "faxes", 3600, ("User1@example.org",))
        with pytest.raises(QuotaExceeded) as over:
            await store.add_mail_jobs(
                NewMail(mail_id="q", envelope_from="user1@example.org", message_id=None,
                        subject="s", references=[], from_header="", client_address="::1"),
                [NewJob("q-job", "+4930123456", "main")], [FaxDocument("a.pdf", b"%PDF", 1)],
                [quota])
        return over.value.used

    day = JOBS.replace("generate_series(1, %s)", "generate_series(1, 20000)").replace(
        "interval '2 days' - i * interval '1 min'", "i * interval '4 s'")  # over 22 hours
    used, text = await plan_on_history(database, monkeypatch, day, [], over_quota,
                                       "lower(sender)")
    assert used == 18  # user1's jobs 1, 51, ..., 851 of the hour's 900
    assert "jobs_sender" in text and "jobs_created" not in text, text
