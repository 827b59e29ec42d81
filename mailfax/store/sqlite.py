"""The embedded store: one SQLite database in WAL mode with ``synchronous=FULL``.

All access goes through one worker thread that owns the connection. Operations queue up while
a transaction commits, and the next transaction takes all of them at once: a *group commit*,
so many SMTP sessions share one fsync without any of them getting its 250 before its job is on
disk. Each operation runs in its own savepoint, so one failing operation never takes the
others of its batch down with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from mailfax import reasons
from mailfax.documents.mapped import DocumentBytes, document_file, pieces, sha256_of
from mailfax.model import (
    RETRYABLE_STATES,
    TRACKED_STATES,
    JobState,
    Reason,
    can_transition,
)
from mailfax.providers.base import (
    EmulatedTransmission,
    FaxDocument,
    InboundFax,
    new_emulator_job_id,
)
from mailfax.store.base import (
    CANDIDATES_PER_SLOT,
    DEFAULT_RULES,
    ENDED_STATES,
    OTHER_ACCOUNTS,
    ClaimRules,
    Event,
    Handoff,
    IllegalTransition,
    InboundRecord,
    Job,
    Mail,
    NewJob,
    NewMail,
    OutboxItem,
    Outcome,
    OutgoingMail,
    Purged,
    PurgeKind,
    Quota,
    ReadinessVerdict,
    SpooledMail,
    Transition,
    Work,
    busy_step,
    first_exceeded,
    group_work,
    handoff_of,
    priority_rank,
)
from mailfax.support.batches import settle_all

log = logging.getLogger(__name__)
T = TypeVar("T")
Operation = Callable[[sqlite3.Connection], Any]

SCHEMA_VERSION = 8
MIGRATIONS: dict[int, str] = {
    1: """
    CREATE TABLE mails (
        id TEXT PRIMARY KEY,
        received_at REAL NOT NULL,
        envelope_from TEXT NOT NULL,
        message_id TEXT,
        subject TEXT NOT NULL,
        refs TEXT NOT NULL,
        from_header TEXT NOT NULL,
        client_address TEXT NOT NULL,
        auto_submitted TEXT,
        precedence TEXT,
        language TEXT NOT NULL
    );
    CREATE TABLE blobs (sha256 TEXT PRIMARY KEY, data BLOB NOT NULL);
    CREATE TABLE documents (
        mail_id TEXT NOT NULL REFERENCES mails(id),
        position INTEGER NOT NULL,
        filename TEXT NOT NULL,
        content_type TEXT NOT NULL,
        pages INTEGER NOT NULL,
        blob TEXT NOT NULL REFERENCES blobs(sha256),
        PRIMARY KEY (mail_id, position)
    );
    CREATE TABLE jobs (
        id TEXT PRIMARY KEY,
        mail_id TEXT NOT NULL REFERENCES mails(id),
        account TEXT NOT NULL,
        number TEXT NOT NULL,
        state TEXT NOT NULL,
        pages INTEGER NOT NULL,
        sender TEXT NOT NULL,
        created REAL NOT NULL,
        updated REAL NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL,
        provider_job_id TEXT,
        reason TEXT,
        duration REAL,
        remote_id TEXT,
        options TEXT NOT NULL DEFAULT '{}',
        cancel_requested INTEGER NOT NULL DEFAULT 0,
        acknowledged INTEGER NOT NULL DEFAULT 0,
        lease_owner TEXT,
        lease_until REAL
    );
    CREATE INDEX jobs_due ON jobs (state, next_attempt_at) WHERE provider_job_id IS NULL;
    CREATE INDEX jobs_tracked ON jobs (account, state) WHERE provider_job_id IS NOT NULL;
    CREATE INDEX jobs_created ON jobs (created);
    CREATE TABLE events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        job_id TEXT NOT NULL REFERENCES jobs(id),
        at REAL NOT NULL,
        state TEXT NOT NULL,
        reason TEXT,
        detail TEXT NOT NULL DEFAULT '',
        notify INTEGER NOT NULL
    );
    CREATE INDEX events_job ON events (job_id);
    CREATE INDEX events_pending ON events (id) WHERE notify = 1;
    CREATE TABLE outbox (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        created REAL NOT NULL,
        job_id TEXT,
        kind TEXT NOT NULL,
        envelope_from TEXT NOT NULL,
        recipients TEXT NOT NULL,
        message BLOB NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL NOT NULL,
        state TEXT NOT NULL DEFAULT 'pending',
        last_error TEXT
    );
    CREATE INDEX outbox_due ON outbox (next_attempt_at) WHERE state = 'pending';
    CREATE TABLE inbound_faxes (
        account TEXT NOT NULL,
        fax_id TEXT NOT NULL,
        fetched_at REAL NOT NULL,
        called_number TEXT NOT NULL,
        received_at REAL NOT NULL,
        originator TEXT NOT NULL,
        remote_id TEXT NOT NULL,
        pages INTEGER NOT NULL,
        image BLOB NOT NULL,
        state TEXT NOT NULL DEFAULT 'received',
        deliveries INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (account, fax_id)
    );
    CREATE INDEX inbound_pending ON inbound_faxes (account, state) WHERE state != 'deleted';
    ALTER TABLE outbox ADD COLUMN inbound_account TEXT;
    ALTER TABLE outbox ADD COLUMN inbound_fax_id TEXT;
    """,
    # The status-mail limit per sender counts the outbox, so it holds whatever wrote it.
    2: """
    CREATE INDEX outbox_status_to ON outbox (lower(json_extract(recipients, '$[0]')), created)
        WHERE job_id IS NOT NULL AND kind <> 'dsn';
    """,
    # The bundled emulator's fax network lives in the store: one network per store.
    3: """
    CREATE TABLE emulator_transmissions (
        account TEXT NOT NULL,
        provider_job_id TEXT PRIMARY KEY,
        reference TEXT NOT NULL,
        number TEXT NOT NULL,
        pages INTEGER NOT NULL,
        submitted_at REAL NOT NULL,
        send_calls INTEGER NOT NULL DEFAULT 1,
        cancelled INTEGER NOT NULL DEFAULT 0,
        UNIQUE (account, reference)
    );
    """,
    # Hot queries on indexes, whatever the history: the dispatcher's count of live leases,
    # the tracker's unacknowledged jobs, ``jobs --state``; job counts per state (``/metrics``)
    # kept by triggers instead of counted.
    4: """
    CREATE INDEX jobs_live_leases ON jobs (account) WHERE lease_owner IS NOT NULL;
    CREATE INDEX jobs_unacknowledged ON jobs (account)
        WHERE acknowledged = 0 AND provider_job_id IS NOT NULL;
    CREATE INDEX jobs_state_created ON jobs (state, created);
    CREATE INDEX outbox_job ON outbox (job_id);
    CREATE TABLE job_state_counts (state TEXT PRIMARY KEY, jobs INTEGER NOT NULL);
    INSERT INTO job_state_counts SELECT state, COUNT(*) FROM jobs GROUP BY state;
    CREATE TRIGGER job_counts_insert AFTER INSERT ON jobs BEGIN
        INSERT OR IGNORE INTO job_state_counts (state, jobs) VALUES (new.state, 0);
        UPDATE job_state_counts SET jobs = jobs + 1 WHERE state = new.state;
    END;
    CREATE TRIGGER job_counts_update AFTER UPDATE OF state ON jobs
        WHEN old.state IS NOT new.state BEGIN
        UPDATE job_state_counts SET jobs = jobs - 1 WHERE state = old.state;
        INSERT OR IGNORE INTO job_state_counts (state, jobs) VALUES (new.state, 0);
        UPDATE job_state_counts SET jobs = jobs + 1 WHERE state = new.state;
    END;
    CREATE TRIGGER job_counts_delete AFTER DELETE ON jobs BEGIN
        UPDATE job_state_counts SET jobs = jobs - 1 WHERE state = old.state;
    END;
    """,
    # Retention (mailfax.store.retention): what was purged, and the indexes purges look up.
    5: """
    ALTER TABLE mails ADD COLUMN documents_purged_at REAL;
    ALTER TABLE inbound_faxes ADD COLUMN image_purged_at REAL;
    CREATE INDEX jobs_mail ON jobs (mail_id);
    CREATE INDEX documents_blob ON documents (blob);
    CREATE INDEX outbox_inbound ON outbox (inbound_account, inbound_fax_id)
        WHERE inbound_fax_id IS NOT NULL;
    """,
    # smtp.accept = "spool": mails taken before they are parsed, until intake made them jobs.
    6: """
    CREATE TABLE accept_spool (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        received_at REAL NOT NULL,
        envelope_from TEXT NOT NULL,
        recipients TEXT NOT NULL,
        client TEXT NOT NULL,
        user_name TEXT,
        message BLOB NOT NULL,
        leased_until REAL NOT NULL DEFAULT 0
    );
    """,
    # The unconfirmed jobs still looked for at their provider (the tracker settles them once
    # ``unconfirmed_after`` ran out), oldest first, however many settled ones pile up.
    # Service-wide quotas count jobs and pages per 300 s of creation (SERVICE_USAGE_SQL),
    # kept by triggers, so the count does not grow with the jobs of the window; a user's
    # quota reads only that user's jobs.
    7: """
    CREATE INDEX jobs_answer_lost ON jobs (updated)
        WHERE state = 'unconfirmed' AND json_extract(reason, '$.code') = 'answer_lost';
    CREATE INDEX jobs_sender ON jobs (lower(sender), created);
    CREATE TABLE job_created_totals (
        bucket INTEGER PRIMARY KEY, jobs INTEGER NOT NULL, pages INTEGER NOT NULL);
    INSERT INTO job_created_totals
        SELECT CAST(created / 300 AS INTEGER), COUNT(*), SUM(pages) FROM jobs GROUP BY 1;
    CREATE TRIGGER job_created_total_insert AFTER INSERT ON jobs BEGIN
        INSERT INTO job_created_totals (bucket, jobs, pages)
            VALUES (CAST(new.created / 300 AS INTEGER), 1, new.pages)
            ON CONFLICT (bucket) DO UPDATE SET jobs = jobs + 1, pages = pages + excluded.pages;
    END;
    CREATE TRIGGER job_created_total_pages AFTER UPDATE OF pages ON jobs
        WHEN old.pages IS NOT new.pages BEGIN
        UPDATE job_created_totals SET pages = pages + new.pages - old.pages
            WHERE bucket = CAST(old.created / 300 AS INTEGER);
    END;
    """,
    # One call at a time per number, busy backoff per number, priorities (issue 20): the
    # claim looks up a number's live jobs and backoff by index and walks the due jobs of an
    # account in priority order.
    8: """
    ALTER TABLE jobs ADD COLUMN priority INTEGER NOT NULL DEFAULT 0;
    UPDATE jobs SET priority = 1 WHERE json_extract(options, '$.priority') = 'bulk'
        AND provider_job_id IS NULL AND state IN ('queued', 'retrying');
    CREATE INDEX jobs_claim ON jobs (account, priority, next_attempt_at)
        WHERE provider_job_id IS NULL;
    CREATE INDEX jobs_line_in_use ON jobs (number)
        WHERE provider_job_id IS NOT NULL AND state IN ('submitted', 'sending', 'retrying');
    CREATE INDEX jobs_leased_number ON jobs (number) WHERE lease_owner IS NOT NULL;
    CREATE TABLE number_backoff (
        number TEXT PRIMARY KEY,
        not_before REAL NOT NULL,
        busy_count INTEGER NOT NULL
    );
    """,
}

DISPATCHABLE = (JobState.QUEUED.value, JobState.RETRYING.value)
assert reasons.ANSWER_LOST == "answer_lost"  # spelt out in jobs_answer_lost and its query
# Documents up to this size go in and out of the blobs table as values; larger ones through
# SQLite's incremental blob I/O, in pieces of this size.
BLOB_IN_ROW_BYTES = 1024 * 1024


def _ts(value: float | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, UTC)


def _epoch(value: datetime | None) -> float | None:
    return None if value is None else value.timestamp()


def _job(row: sqlite3.Row) -> Job:
    return Job(
        id=row["id"],
        mail_id=row["mail_id"],
        account=row["account"],
        number=row["number"],
        state=JobState(row["state"]),
        pages=row["pages"],
        sender=row["sender"],
        created=datetime.fromtimestamp(row["created"], UTC),
        updated=datetime.fromtimestamp(row["updated"], UTC),
        attempts=row["attempts"],
        next_attempt_at=_ts(row["next_attempt_at"]),
        provider_job_id=row["provider_job_id"],
        reason=Reason.from_json(json.loads(row["reason"])) if row["reason"] else None,
        duration_seconds=row["duration"],
        remote_id=row["remote_id"],
        options=json.loads(row["options"]),
        cancel_requested=bool(row["cancel_requested"]),
        acknowledged=bool(row["acknowledged"]),
    )


def _mail(row: sqlite3.Row) -> Mail:
    return Mail(
        id=row["id"], envelope_from=row["envelope_from"], message_id=row["message_id"],
        subject=row["subject"], references=json.loads(row["refs"]),
        from_header=row["from_header"], client_address=row["client_address"],
        auto_submitted=row["auto_submitted"], precedence=row["precedence"],
        language=row["language"], received_at=datetime.fromtimestamp(row["received_at"], UTC),
    )


def _event(row: sqlite3.Row) -> Event:
    return Event(
        id=row["id"],
        job_id=row["job_id"],
        at=datetime.fromtimestamp(row["at"], UTC),
        state=JobState(row["state"]),
        reason=Reason.from_json(json.loads(row["reason"])) if row["reason"] else None,
        detail=row["detail"],
    )


_INBOUND_COLUMNS = ("account, fax_id, fetched_at, called_number, received_at, originator,"
                    " remote_id, pages, state, deliveries")


def _inbound(row: sqlite3.Row) -> InboundRecord:
    return InboundRecord(
        account=row["account"], fax_id=row["fax_id"],
        fetched_at=datetime.fromtimestamp(row["fetched_at"], UTC),
        called_number=row["called_number"],
        received_at=datetime.fromtimestamp(row["received_at"], UTC),
        originator=row["originator"], remote_id=row["remote_id"], pages=row["pages"],
        state=row["state"], deliveries=row["deliveries"],
    )


def _inbound_of(row: sqlite3.Row) -> tuple[str, str] | None:
    """The (account, fax id) of the received fax an outbox row carries."""
    if row["inbound_fax_id"] is None:
        return None
    return row["inbound_account"], row["inbound_fax_id"]


def _documents(conn: sqlite3.Connection, mail_ids: Sequence[str], spool: Path | None = None
               ) -> dict[str, list[FaxDocument]]:
    """The documents of these mails, each mail's in order; with ``spool``, a large one read
    into a file there (see Store.load_documents)."""
    found: dict[str, list[FaxDocument]] = {}
    if not mail_ids:
        return found
    rows = conn.execute(
        "SELECT d.mail_id, d.filename, d.content_type, d.pages, b.rowid AS blob_row,"
        " CASE WHEN length(b.data) <= ? THEN b.data END AS data FROM documents d"
        f" JOIN blobs b ON b.sha256 = d.blob WHERE d.mail_id IN ({','.join('?' * len(mail_ids))})"
        " ORDER BY d.mail_id, d.position", [BLOB_IN_ROW_BYTES, *mail_ids]).fetchall()
    for r in rows:
        data = r["data"]
        if data is None:  # a large document: into its file, or straight into one bytes object
            data = _large_document(conn, r["blob_row"], spool)
        found.setdefault(r["mail_id"], []).append(FaxDocument(
            filename=r["filename"], data=data, pages=r["pages"],
            content_type=r["content_type"]))
    return found


def _large_document(conn: sqlite3.Connection, blob_row: int, spool: Path | None
                    ) -> DocumentBytes:
    """A large stored document: read in pieces into a file in ``spool``, or (without one,
    or when that file cannot be written: a full disk) into memory."""
    if spool is not None:
        try:
            with conn.blobopen("blobs", "data", blob_row, readonly=True) as blob:
                return document_file(spool, iter(lambda: blob.read(BLOB_IN_ROW_BYTES), b""))
        except OSError as error:
            log.warning("a stored document is read into memory: %s cannot take it (%s)",
                        spool, error.strerror or error)
    with conn.blobopen("blobs", "data", blob_row, readonly=True) as blob:
        return blob.read()


def _put_blob(conn: sqlite3.Connection, digest: str, data: DocumentBytes) -> None:
    """Store a document's bytes once. A large one is written in pieces into a zeroblob: bound
    as a parameter, SQLite would copy it twice (the bound value, then the row's record); one
    in its file is read from there piece by piece (documents.mapped.pieces)."""
    if len(data) <= BLOB_IN_ROW_BYTES:
        conn.execute("INSERT OR IGNORE INTO blobs VALUES (?, ?)", (digest, data))
        return
    cursor = conn.execute("INSERT OR IGNORE INTO blobs VALUES (?, zeroblob(?))",
                          (digest, len(data)))
    if not cursor.rowcount:  # the same document is stored already
        return
    assert cursor.lastrowid is not None
    with conn.blobopen("blobs", "data", cursor.lastrowid) as blob:
        for piece in pieces(data, BLOB_IN_ROW_BYTES):
            blob.write(piece)


# A waiting job whose number's line is in use: another job to it leased (by any instance)
# or at its provider still dialling. Literal states, as in the partial indexes they use.
LINE_IN_USE = (
    " EXISTS (SELECT 1 FROM jobs busy WHERE busy.number = jobs.number"
    " AND busy.provider_job_id IS NOT NULL AND busy.state IN ('submitted', 'sending', 'retrying'))"
    " OR EXISTS (SELECT 1 FROM jobs held WHERE held.number = jobs.number"
    " AND held.lease_owner IS NOT NULL AND held.lease_until >= :now"
    " AND held.state IN ('queued', 'retrying') AND held.id <> jobs.id)")
BACKED_OFF = (" EXISTS (SELECT 1 FROM number_backoff b WHERE b.number = jobs.number"
              " AND b.not_before > :now)")


def _held_by_rules(rules: ClaimRules) -> str:
    """The conditions ``rules`` add to a query of waiting jobs (named parameter ``:now``)."""
    held = ""
    if rules.one_call_per_number:
        held += f" AND NOT ({LINE_IN_USE})"
    if rules.held_priorities:
        held += f" AND priority NOT IN ({','.join(str(int(p)) for p in rules.held_priorities)})"
    return held


def _pick(conn: sqlite3.Connection, query: str, parameters: dict[str, Any], room: int,
          taken: set[str], rules: ClaimRules) -> list[str]:
    """Up to ``room`` job ids of ``query`` (in its order); with one call per number, the
    first job of each number not in ``taken`` (which grows by the numbers picked)."""
    if not rules.one_call_per_number:
        return [row[0] for row in conn.execute(query, {**parameters, "room": room})]
    picked: list[str] = []
    for job_id, number in conn.execute(
            query, {**parameters, "room": room * CANDIDATES_PER_SLOT}):
        if number not in taken:
            taken.add(number)
            picked.append(job_id)
            if len(picked) == room:
                break
    return picked


def _claim(conn: sqlite3.Connection, owner: str, limit: int, lease_seconds: float,
           account_limits: Mapping[str, int], rules: ClaimRules = DEFAULT_RULES) -> list[Job]:
    now = time.time()
    due = ("SELECT id, number FROM jobs WHERE state IN (:queued, :retrying)"
           " AND provider_job_id IS NULL AND next_attempt_at <= :now"
           " AND (lease_until IS NULL OR lease_until < :now)"
           f" AND NOT ({BACKED_OFF}){_held_by_rules(rules)}")
    parameters: dict[str, Any] = {"queued": DISPATCHABLE[0], "retrying": DISPATCHABLE[1],
                                  "now": now}
    order = " ORDER BY priority, next_attempt_at LIMIT :room"
    live = dict(conn.execute(
        "SELECT account, COUNT(*) FROM jobs WHERE lease_owner IS NOT NULL"
        " AND lease_until >= ? AND state IN (?, ?) GROUP BY account",
        (now, *DISPATCHABLE)).fetchall())
    named = [account for account in account_limits if account != OTHER_ACCOUNTS]
    claimed: list[str] = []
    taken: set[str] = set()  # numbers this claim calls
    for account in named:
        room = min(account_limits[account] - live.get(account, 0), limit - len(claimed))
        if room > 0:  # (SQLite reads a negative LIMIT as no limit)
            claimed += _pick(conn, due + " AND account = :account" + order,
                             {**parameters, "account": account}, room, taken, rules)
    room = min(account_limits.get(OTHER_ACCOUNTS, 0), limit - len(claimed))
    if room > 0:
        others = {f"a{index}": account for index, account in enumerate(named)}
        claimed += _pick(conn, due + f" AND account NOT IN ({','.join(':' + k for k in others)})"
                         + order, {**parameters, **others}, room, taken, rules)
    if not claimed:
        return []
    conn.executemany(
        "UPDATE jobs SET lease_owner = ?, lease_until = ?, attempts = attempts + 1 WHERE id = ?",
        [(owner, now + lease_seconds, job_id) for job_id in claimed])
    return [_job(r) for r in conn.execute(
        f"SELECT * FROM jobs WHERE id IN ({','.join('?' * len(claimed))})"
        " ORDER BY priority, next_attempt_at, id", claimed).fetchall()]


def _number_busy(conn: sqlite3.Connection, number: str, backoff_seconds: Sequence[float]
                 ) -> datetime:
    row = conn.execute("SELECT busy_count, not_before FROM number_backoff WHERE number = ?",
                       (number,)).fetchone()
    count, not_before = busy_step(None if row is None else (row[0], row[1]), time.time(),
                                  backoff_seconds)
    conn.execute("INSERT OR REPLACE INTO number_backoff (number, not_before, busy_count)"
                 " VALUES (?, ?, ?)", (number, not_before, count))
    return datetime.fromtimestamp(not_before, UTC)


def _statements(script: str) -> Iterator[str]:
    """A migration's statements one by one (a trigger's body holds semicolons too)."""
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            yield pending.strip()
            pending = ""
    if pending.strip():
        raise ValueError(f"incomplete statement in a migration: {pending.strip()[:60]}")


# Everyone's jobs since :since: the totals of the buckets after the one :since falls in, and
# the jobs of that one bucket created since :since counted one by one (CAST as the trigger
# does, so a job on a bucket's edge is counted in exactly one of the two).
SERVICE_USAGE_SQL = """
SELECT COALESCE(SUM(jobs), 0), COALESCE(SUM(pages), 0) FROM (
    SELECT jobs, pages FROM job_created_totals WHERE bucket > CAST(:since / 300 AS INTEGER)
    UNION ALL
    SELECT COUNT(*), COALESCE(SUM(pages), 0) FROM jobs
    WHERE created >= :since AND created < :since + 600
      AND CAST(created / 300 AS INTEGER) <= CAST(:since / 300 AS INTEGER))
"""


def _usage(conn: sqlite3.Connection, since: float, senders: Sequence[str] | None
           ) -> tuple[int, int]:
    """(jobs, pages) created since ``since`` by these senders (None: everyone, from the
    kept totals: these count jobs purged since as well)."""
    if senders is None:
        row = conn.execute(SERVICE_USAGE_SQL, {"since": since}).fetchone()
        return int(row[0]), int(row[1])
    query = "SELECT COUNT(*), COALESCE(SUM(pages), 0) FROM jobs WHERE created >= ?"
    parameters: list[Any] = [since]
    # "a@b.c" exactly, "@b.c" the whole domain
    tests = ["lower(sender) LIKE ?" if sender.startswith("@") else "lower(sender) = ?"
             for sender in senders]
    query += f" AND ({' OR '.join(tests) or '0'})"
    parameters += [f"%{sender.lower()}" if sender.startswith("@") else sender.lower()
                   for sender in senders]
    row = conn.execute(query, parameters).fetchone()
    return int(row[0]), int(row[1])


def _check_quotas(conn: sqlite3.Connection, quotas: Sequence[Quota], now: float, jobs: int,
                  pages: int) -> None:
    """Raise QuotaExceeded if storing ``jobs`` jobs of ``pages`` pages goes over a quota.

    Run in the operation that inserts them: the one writer thread runs operations one after
    the other in its transaction, so this count sees every mail stored before, also those of
    the same batch, and none can slip in between the count and the insert."""
    used = [_usage(conn, now - quota.window_seconds, quota.senders)[
        0 if quota.unit == "faxes" else 1] for quota in quotas]
    exceeded = first_exceeded(quotas, used, jobs, pages)
    if exceeded is not None:
        raise exceeded


def _record(conn: sqlite3.Connection, job_id: str, transition: Transition,
            expected: Sequence[JobState] | None) -> bool:
    row = conn.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
    if row is None:
        raise KeyError(job_id)
    current = JobState(row["state"])
    if expected is not None and current not in expected:
        return False
    if current != transition.state and not can_transition(current, transition.state):
        raise IllegalTransition(f"job {job_id}: {current} -> {transition.state}")
    now = time.time()
    reason = json.dumps(transition.reason.to_json()) if transition.reason else None
    conn.execute(
        "UPDATE jobs SET state = ?, updated = ?, lease_owner = NULL, lease_until = NULL,"
        " reason = COALESCE(?, reason),"
        " provider_job_id = COALESCE(?, provider_job_id), pages = COALESCE(?, pages),"
        " duration = COALESCE(?, duration), remote_id = COALESCE(?, remote_id),"
        " next_attempt_at = COALESCE(?, next_attempt_at) WHERE id = ?",
        (transition.state.value, now, reason, transition.provider_job_id,
         transition.pages, transition.duration_seconds, transition.remote_id,
         _epoch(transition.next_attempt_at), job_id),
    )
    if current != transition.state or transition.always_event:
        conn.execute(
            "INSERT INTO events (job_id, at, state, reason, detail, notify) VALUES (?,?,?,?,?,?)",
            (job_id, now, transition.state.value, reason, transition.detail,
             int(transition.notify)),
        )
    return True


def _record_outcomes(conn: sqlite3.Connection, outcomes: Sequence[Outcome]) -> list[bool]:
    """Record each outcome; whether its job moved. A refused one is logged, not raised (as
    PostgresStore does): the others are committed with it."""
    moved: list[bool] = []
    for outcome in outcomes:
        try:
            moved.append(_record(conn, outcome.job_id, outcome.transition, outcome.expected))
        except (KeyError, IllegalTransition) as error:
            log.error("result of job %s not recorded: %s", outcome.job_id, error)
            moved.append(False)
    return moved


class _InboundMixin:
    """Received faxes: stored before anything else happens, deleted at the provider last."""

    _call: Callable[..., Any]

    async def add_inbound_fax(self, account: str, fax: InboundFax) -> InboundRecord:
        def operation(conn: sqlite3.Connection) -> InboundRecord:
            conn.execute(
                "INSERT OR IGNORE INTO inbound_faxes (account, fax_id, fetched_at, called_number,"
                " received_at, originator, remote_id, pages, image) VALUES (?,?,?,?,?,?,?,?,?)",
                (account, fax.fax_id, time.time(), fax.called_number,
                 fax.received_at.timestamp(), fax.originator, fax.remote_id, fax.pages,
                 fax.image))
            row = conn.execute(
                f"SELECT {_INBOUND_COLUMNS} FROM inbound_faxes WHERE account = ? AND fax_id = ?",
                (account, fax.fax_id)).fetchone()
            return _inbound(row)

        result: InboundRecord = await self._call(operation)
        return result

    async def inbound_image(self, account: str, fax_id: str) -> bytes:
        def operation(conn: sqlite3.Connection) -> bytes:
            row = conn.execute("SELECT image FROM inbound_faxes WHERE account = ? AND fax_id = ?",
                               (account, fax_id)).fetchone()
            if row is None:
                raise KeyError(fax_id)
            return bytes(row[0])

        result: bytes = await self._call(operation)
        return result

    async def queue_inbound_mails(self, account: str, fax_id: str,
                                  mails: Sequence[OutgoingMail], pages: int | None = None
                                  ) -> None:
        def operation(conn: sqlite3.Connection) -> None:
            for mail in mails:
                SqliteStore._insert_outbox(conn, mail)
            conn.execute(
                "UPDATE inbound_faxes SET deliveries = deliveries + 1, state = CASE state"
                " WHEN 'deleted' THEN 'deleted' ELSE 'queued' END,"  # a redelivery stays deleted
                " pages = COALESCE(?, pages) WHERE account = ? AND fax_id = ?",
                (pages, account, fax_id))

        await self._call(operation)

    async def inbound_handoff(self, account: str, fax_id: str) -> Handoff:
        def operation(conn: sqlite3.Connection) -> Handoff:
            sent, pending, failed = conn.execute(
                "SELECT COALESCE(SUM(state = 'sent'), 0), COALESCE(SUM(state = 'pending'), 0),"
                " COALESCE(SUM(state = 'failed'), 0)"
                " FROM outbox WHERE inbound_account = ? AND inbound_fax_id = ?",
                (account, fax_id)).fetchone()
            return handoff_of(sent, pending, failed)

        handoff: Handoff = await self._call(operation)
        return handoff

    async def mark_inbound_deleted(self, account: str, fax_id: str) -> None:
        await self._call(lambda conn: conn.execute(
            "UPDATE inbound_faxes SET state = 'deleted' WHERE account = ? AND fax_id = ?",
            (account, fax_id)))

    async def mark_inbound_screened(self, account: str, fax_id: str, state: str) -> None:
        await self._call(lambda conn: conn.execute(
            "UPDATE inbound_faxes SET state = ? WHERE account = ? AND fax_id = ?",
            (state, account, fax_id)))

    async def list_inbound(self, limit: int = 1000) -> list[InboundRecord]:
        def operation(conn: sqlite3.Connection) -> list[InboundRecord]:
            rows = conn.execute(
                f"SELECT {_INBOUND_COLUMNS} FROM inbound_faxes ORDER BY received_at DESC"
                " LIMIT ?", (limit,)).fetchall()
            return [_inbound(row) for row in rows]

        result: list[InboundRecord] = await self._call(operation)
        return result

    async def find_inbound(self, fax_id: str) -> list[InboundRecord]:
        def operation(conn: sqlite3.Connection) -> list[InboundRecord]:
            rows = conn.execute(
                f"SELECT {_INBOUND_COLUMNS} FROM inbound_faxes WHERE fax_id = ?",
                (fax_id,)).fetchall()
            return [_inbound(row) for row in rows]

        result: list[InboundRecord] = await self._call(operation)
        return result


class _EmulatorNetworkMixin:
    """The bundled emulator's network (see ``mailfax.providers.emulator``)."""

    _call: Callable[..., Any]

    async def emulator_submit(self, account: str, reference: str, number: str,
                              pages: int) -> tuple[str, bool]:
        def operation(conn: sqlite3.Connection) -> tuple[str, bool]:
            row = conn.execute(
                "INSERT INTO emulator_transmissions (account, provider_job_id, reference, number,"
                " pages, submitted_at) VALUES (?,?,?,?,?,?) ON CONFLICT (account, reference)"
                " DO UPDATE SET send_calls = send_calls + 1 RETURNING provider_job_id, send_calls",
                (account, new_emulator_job_id(), reference, number, pages, time.time()),
            ).fetchone()
            return str(row[0]), int(row[1]) > 1

        result: tuple[str, bool] = await self._call(operation)
        return result

    async def emulator_transmissions(self, account: str, provider_job_ids: Sequence[str]
                                     ) -> dict[str, EmulatedTransmission]:
        def operation(conn: sqlite3.Connection) -> dict[str, EmulatedTransmission]:
            rows = conn.execute(
                "SELECT provider_job_id, reference, number, pages, submitted_at, send_calls,"
                " cancelled FROM emulator_transmissions WHERE account = ? AND provider_job_id IN"
                f" ({','.join('?' * len(provider_job_ids))})",
                [account, *provider_job_ids]).fetchall()
            return {row[0]: EmulatedTransmission(
                provider_job_id=row[0], reference=row[1], number=row[2], pages=row[3],
                submitted_at=row[4], send_calls=row[5], cancelled=bool(row[6])) for row in rows}

        result: dict[str, EmulatedTransmission] = await self._call(operation)
        return result

    async def emulator_cancel(self, account: str, provider_job_id: str) -> None:
        await self._call(lambda conn: conn.execute(
            "UPDATE emulator_transmissions SET cancelled = 1 WHERE account = ?"
            " AND provider_job_id = ?", (account, provider_job_id)))


PRIVATE_FILE_MODE = 0o600  # the database and its -wal and -shm files, whatever the umask
BATCH_BYTES = 4_000_000  # content deleted per transaction, at most about (batch_size or this)
VACUUM_PAGES_PER_STEP = 500  # one short transaction frees this many pages (2 MB at 4 KiB)
ENDED = ENDED_STATES


def private_database(path: Path) -> None:
    """Create the database file 0600 before SQLite does (SQLite gives its -wal and -shm
    files the database file's mode), and take group and other rights from an older one."""
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE))
    for name in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        with contextlib.suppress(FileNotFoundError):
            if name.stat().st_mode & 0o077:
                os.chmod(name, PRIVATE_FILE_MODE)


def enable_incremental_vacuum(path: Path) -> bool:
    """Switch a database made before incremental vacuum to ``auto_vacuum=INCREMENTAL``: a
    one-off VACUUM, which rewrites the whole file and holds it locked meanwhile (run by
    ``mailfax migrate``, with mailfax stopped). False when it already was (blocking)."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        if conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2:
            return False
        conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
        conn.execute("VACUUM")
        return True
    finally:
        conn.close()


def _marks(values: Sequence[Any]) -> str:
    return ",".join("?" * len(values))


def _orphan_bytes(conn: sqlite3.Connection, mail_ids: Sequence[str]) -> tuple[int, list[str]]:
    """The documents of these mails: the bytes and digests of the blobs no other mail uses."""
    rows = conn.execute(
        f"SELECT b.sha256, length(b.data) FROM blobs b WHERE b.sha256 IN (SELECT blob FROM"
        f" documents WHERE mail_id IN ({_marks(mail_ids)})) AND NOT EXISTS (SELECT 1 FROM"
        f" documents d WHERE d.blob = b.sha256 AND d.mail_id NOT IN ({_marks(mail_ids)}))",
        [*mail_ids, *mail_ids]).fetchall()
    return sum(int(row[1]) for row in rows), [str(row[0]) for row in rows]


def _drop_documents(conn: sqlite3.Connection, mail_ids: Sequence[str], digests: Sequence[str]
                    ) -> None:
    conn.execute(f"DELETE FROM documents WHERE mail_id IN ({_marks(mail_ids)})", mail_ids)
    if digests:
        conn.execute(f"DELETE FROM blobs WHERE sha256 IN ({_marks(digests)})", digests)


# Purge candidates: rowid, id, and the bytes of the mail's documents (for _within_budget).
_MAILS_WITH_SIZE = ("SELECT m.rowid, m.id, (SELECT COALESCE(SUM(length(b.data)), 0)"
                    " FROM documents d JOIN blobs b ON b.sha256 = d.blob"
                    " WHERE d.mail_id = m.id) FROM mails m")


def _ended_mails(conn: sqlite3.Connection, before: float, after: int, limit: int, *,
                 history: bool) -> list[Any]:
    """Mails received before ``before`` (after rowid ``after``) whose jobs all ended before
    it; for ``history`` also nothing of them waiting to be mailed, else only those whose
    documents are still there. Rows as in :data:`_MAILS_WITH_SIZE`."""
    waiting = (" OR EXISTS (SELECT 1 FROM events e WHERE e.job_id = j.id AND e.notify = 1)"
               " OR EXISTS (SELECT 1 FROM outbox o WHERE o.job_id = j.id"
               " AND o.state = 'pending')") if history else ""
    return conn.execute(
        f"{_MAILS_WITH_SIZE} WHERE m.rowid > ? AND m.received_at < ?"
        f"{'' if history else ' AND m.documents_purged_at IS NULL'}"
        " AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.mail_id = m.id"
        f" AND (j.state NOT IN ({_marks(ENDED)}) OR j.updated >= ?{waiting}))"
        " ORDER BY m.rowid LIMIT ?", (after, before, *ENDED, before, limit)).fetchall()


def _purge_documents(conn: sqlite3.Connection, before: float, after: int, limit: int,
                     dry_run: bool) -> tuple[Purged, int, int]:
    """One batch of documents (mails after rowid ``after``): (purged, last rowid, rows)."""
    fetched = _ended_mails(conn, before, after, limit, history=False)
    rows = _within_budget(fetched, 2)
    if not rows:
        return Purged("documents"), after, 0
    mail_ids = [str(row[1]) for row in rows]
    documents = conn.execute(f"SELECT count(*) FROM documents WHERE mail_id IN"
                             f" ({_marks(mail_ids)})", mail_ids).fetchone()[0]
    size, digests = _orphan_bytes(conn, mail_ids)
    if not dry_run:
        _drop_documents(conn, mail_ids, digests)
        conn.execute(f"UPDATE mails SET documents_purged_at = ? WHERE id IN"
                     f" ({_marks(mail_ids)})", (time.time(), *mail_ids))
    return (Purged("documents", int(documents), size), int(rows[-1][0]),
            _scanned(fetched, rows, limit))


def _handed_off_faxes(conn: sqlite3.Connection, before: float, after: int, limit: int,
                      only_with_image: bool) -> list[tuple[int, str, str, int]]:
    """Received faxes deleted at the provider, or screened out (junk, duplicates), before
    ``before`` (after rowid ``after``), none of their mails pending: (rowid, account, fax
    id, bytes of image and mails)."""
    rows = conn.execute(
        "SELECT f.rowid, f.account, f.fax_id, length(f.image) + COALESCE((SELECT"
        " SUM(length(o.message)) FROM outbox o WHERE o.inbound_account = f.account"
        " AND o.inbound_fax_id = f.fax_id), 0) FROM inbound_faxes f"
        " WHERE f.rowid > ? AND f.fetched_at < ?"
        " AND f.state IN ('deleted', 'blocked', 'duplicate')"
        f" {'AND f.image_purged_at IS NULL' if only_with_image else ''}"
        " AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.inbound_account = f.account"
        " AND o.inbound_fax_id = f.fax_id AND o.state = 'pending')"
        " ORDER BY f.rowid LIMIT ?", (after, before, limit)).fetchall()
    return [(int(row[0]), str(row[1]), str(row[2]), int(row[3])) for row in rows]


def _within_budget(rows: list[Any], size_at: int) -> list[Any]:
    """The first of ``rows`` whose content (column ``size_at``) stays within BATCH_BYTES
    together (at least one row), so one transaction never writes much more than that."""
    total = 0
    for count, row in enumerate(rows):
        total += int(row[size_at])
        if total > BATCH_BYTES and count:
            return rows[:count]
    return rows


def _scanned(fetched: list[Any], rows: list[Any], limit: int) -> int:
    """How many rows a batch counts as: ``limit`` when the budget cut it short (so the purge
    goes on), else how many were found (fewer than ``limit``: it was the last batch)."""
    return limit if len(rows) < len(fetched) else len(fetched)


def _purge_faxes(conn: sqlite3.Connection, before: float, after: int, limit: int,
                 dry_run: bool, *, history: bool) -> tuple[Purged, int, int]:
    """Images of handed-off faxes and the copies in their sent mails; with ``history``,
    their records and mails altogether."""
    fetched = _handed_off_faxes(conn, before, after, limit, only_with_image=not history)
    rows = _within_budget(fetched, 3)
    faxes = [] if dry_run else [(account, fax_id) for _, account, fax_id, _ in rows]
    if history:
        conn.executemany("DELETE FROM outbox WHERE inbound_account = ? AND inbound_fax_id = ?",
                         faxes)
        conn.executemany("DELETE FROM inbound_faxes WHERE account = ? AND fax_id = ?", faxes)
    else:
        now = time.time()
        conn.executemany("UPDATE inbound_faxes SET image = x'', image_purged_at = ?"
                         " WHERE account = ? AND fax_id = ?", [(now, *fax) for fax in faxes])
        conn.executemany("UPDATE outbox SET message = x'' WHERE inbound_account = ?"
                         " AND inbound_fax_id = ?", faxes)
    return (Purged("history" if history else "received_faxes", len(rows),
                   sum(row[3] for row in rows)), rows[-1][0] if rows else after,
            _scanned(fetched, rows, limit))


def _purge_outbox(kind: str, conn: sqlite3.Connection, before: float, after: int, limit: int,
                  dry_run: bool) -> tuple[Purged, int, int]:
    """Sent or given-up mails in the outbox: DSNs (``kind`` "dsn") or all others."""
    fetched = conn.execute(
        "SELECT id, length(message) FROM outbox WHERE id > ? AND created < ?"
        " AND state <> 'pending' AND inbound_fax_id IS NULL"
        f" AND kind {'=' if kind == 'dsn' else '<>'} 'dsn' ORDER BY id LIMIT ?",
        (after, before, limit)).fetchall()
    rows = _within_budget(fetched, 1)
    ids = [int(row[0]) for row in rows]
    if ids and not dry_run:
        conn.execute(f"DELETE FROM outbox WHERE id IN ({_marks(ids)})", ids)
    return (Purged(kind, len(rows), sum(int(row[1]) for row in rows)),
            ids[-1] if ids else after, _scanned(fetched, rows, limit))


def _purge_job_history(conn: sqlite3.Connection, before: float, after: int, limit: int,
                       dry_run: bool) -> tuple[Purged, int, int]:
    """Mails whose jobs all ended before ``before``, nothing of them waiting to be mailed:
    the jobs, their events and outbox mails, the documents, the mail."""
    fetched = _ended_mails(conn, before, after, limit, history=True)
    rows = _within_budget(fetched, 2)
    if not rows:
        return Purged("history"), after, 0
    mail_ids = [str(row[1]) for row in rows]
    jobs_of_mails = f"SELECT id FROM jobs WHERE mail_id IN ({_marks(mail_ids)})"
    jobs = int(conn.execute(f"SELECT count(*) FROM ({jobs_of_mails})", mail_ids).fetchone()[0])
    size, digests = _orphan_bytes(conn, mail_ids)
    size += int(conn.execute(f"SELECT COALESCE(SUM(length(message)), 0) FROM outbox"
                             f" WHERE job_id IN ({jobs_of_mails})", mail_ids).fetchone()[0])
    if not dry_run:
        for table in ("outbox", "events"):
            conn.execute(f"DELETE FROM {table} WHERE job_id IN ({jobs_of_mails})", mail_ids)
        conn.execute(f"DELETE FROM jobs WHERE mail_id IN ({_marks(mail_ids)})", mail_ids)
        _drop_documents(conn, mail_ids, digests)
        conn.execute(f"DELETE FROM mails WHERE id IN ({_marks(mail_ids)})", mail_ids)
    return Purged("history", jobs, size), int(rows[-1][0]), _scanned(fetched, rows, limit)


def _purge_quota_totals(conn: sqlite3.Connection, before: float, after: int, limit: int,
                        dry_run: bool) -> tuple[Purged, int, int]:
    """The service-wide quotas' totals of the 300 s ending before ``before`` (bucket numbers
    after ``after``): no quota window reaches back that far (QUOTA_TOTALS_DAYS)."""
    buckets = [int(row[0]) for row in conn.execute(
        "SELECT bucket FROM job_created_totals WHERE bucket > ? AND bucket < ?"
        " ORDER BY bucket LIMIT ?", (after, _bucket_of(before), limit))]
    if buckets and not dry_run:
        conn.execute("DELETE FROM job_created_totals WHERE bucket > ? AND bucket <= ?",
                     (after, buckets[-1]))
    return (Purged("quota_totals", len(buckets)), buckets[-1] if buckets else after,
            len(buckets))


def _bucket_of(epoch: float) -> int:
    """The job_created_totals bucket of a time (as its trigger and SERVICE_USAGE_SQL count)."""
    return int(epoch // 300)


PurgeBatch = Callable[[sqlite3.Connection, float, int, int, bool], tuple[Purged, int, int]]

PURGE_BATCHES: dict[PurgeKind, tuple[PurgeBatch, ...]] = {
    "documents": (_purge_documents,),
    "received_faxes": (functools.partial(_purge_faxes, history=False),),
    "outbox": (lambda *args: _purge_outbox("outbox", *args),),
    "dsn": (lambda *args: _purge_outbox("dsn", *args),),
    "history": (_purge_job_history, functools.partial(_purge_faxes, history=True)),
    "quota_totals": (_purge_quota_totals,),
}


def _vacuum_step(conn: sqlite3.Connection) -> tuple[int, int]:
    """Give up to VACUUM_PAGES_PER_STEP free pages back: (bytes given back, pages left)."""
    if conn.execute("PRAGMA auto_vacuum").fetchone()[0] != 2:
        return 0, 0  # an older database: free pages are reused, the file does not shrink
    free = int(conn.execute("PRAGMA freelist_count").fetchone()[0])
    step = min(free, VACUUM_PAGES_PER_STEP)
    for _ in range(step):
        # One page per statement: Python's sqlite3 steps a PRAGMA once, and
        # incremental_vacuum frees one page per step.
        conn.execute("PRAGMA incremental_vacuum(1)")
    page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
    left = int(conn.execute("PRAGMA freelist_count").fetchone()[0])
    return (free - left) * page_size, left if left < free else 0


def _checkpoint(path: Path) -> None:
    """Checkpoint the WAL now, so the file shrinks by what the vacuum gave back, rather than
    when the last connection closes. Outside the writer's transactions (a checkpoint cannot
    run inside one), on a connection of its own; if the writer is busy, it is left for later."""
    conn = sqlite3.connect(path, timeout=1.0)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    except sqlite3.OperationalError as error:
        log.info("WAL checkpoint after the vacuum left for later: %s", error)
    finally:
        conn.close()


class _RetentionMixin:
    """Purges in batches, each one short transaction of the writer thread, so intake and the
    dispatcher get their turn in between; then incremental vacuum in steps."""

    _call: Callable[..., Any]
    path: Path

    async def purge(self, kind: PurgeKind, before: datetime, *, dry_run: bool = False,
                    batch_size: int = 200) -> Purged:
        total = Purged(kind)
        for batch in PURGE_BATCHES[kind]:
            after = 0
            while True:
                purged, after, rows = await self._call(
                    lambda conn, after=after, batch=batch: batch(
                        conn, before.timestamp(), after, batch_size, dry_run))
                total += purged
                if rows < batch_size:
                    break
        return total

    async def reclaim_space(self) -> int:
        given_back = 0
        while True:
            size, left = await self._call(_vacuum_step)
            given_back += int(size)
            if not left:
                break
        if given_back:
            await asyncio.to_thread(_checkpoint, self.path)
        return given_back

    @contextlib.asynccontextmanager
    async def retention_lock(self) -> AsyncIterator[bool]:
        yield True  # one instance per SQLite database


class SqliteStore(_InboundMixin, _EmulatorNetworkMixin, _RetentionMixin):
    """The :class:`~mailfax.store.base.Store` on SQLite (single instance)."""

    def __init__(self, path: Path, *, max_batch: int = 512):
        self.path = path
        self.max_batch = max_batch
        self._queue: queue.SimpleQueue[tuple[Operation, asyncio.Future[Any]] | None] = (
            queue.SimpleQueue()
        )
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.commits = 0  # how many transactions were committed (for tests and benchmarks)

    # -- the worker thread -------------------------------------------------------------------

    async def open(self) -> None:
        self.path.parent.mkdir(0o750, parents=True, exist_ok=True)
        self._loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = self._loop.create_future()
        self._thread = threading.Thread(
            target=self._run, args=(ready,), name="mailfax-sqlite", daemon=True
        )
        self._thread.start()
        await ready
        await self._call(self._migrate)

    async def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            await asyncio.to_thread(self._thread.join)
            self._thread = None

    def _connect(self) -> sqlite3.Connection:
        private_database(self.path)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        # Takes effect on a new database (before its first table); an older one keeps
        # auto_vacuum=NONE until `mailfax migrate` VACUUMs it once (enable_incremental_vacuum).
        conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA busy_timeout=10000")
        # Each operation of a group commit runs in a savepoint, whose journal (the pages it
        # changed, as they were) went to a temporary file once over 64 KiB: a file made and
        # removed in every commit that stored a mail, 2 ms of the commit's 3 ms (bench/intake.py).
        # In memory it holds the pages one operation changes, and the temporary tables of
        # sorts, which the indexed hot queries do not make.
        conn.execute("PRAGMA temp_store=MEMORY")
        return conn

    def _run(self, ready: asyncio.Future[None]) -> None:
        assert self._loop is not None
        loop = self._loop
        try:
            conn = self._connect()
        except Exception as error:
            loop.call_soon_threadsafe(ready.set_exception, error)
            return
        loop.call_soon_threadsafe(ready.set_result, None)
        while True:
            item = self._queue.get()
            if item is None:
                break
            batch = [item]
            while len(batch) < self.max_batch:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._queue.put(None)
                    break
                batch.append(more)
            self._run_batch(conn, batch)
        conn.close()

    def _run_batch(
        self, conn: sqlite3.Connection, batch: list[tuple[Operation, asyncio.Future[Any]]]
    ) -> None:
        assert self._loop is not None
        outcomes: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for operation, future in batch:
                conn.execute("SAVEPOINT op")
                try:
                    result = operation(conn)
                except Exception as error:
                    conn.execute("ROLLBACK TO op")
                    outcomes.append((future, None, error))
                else:
                    outcomes.append((future, result, None))
                conn.execute("RELEASE op")
            conn.execute("COMMIT")
            self.commits += 1
        except Exception as error:  # the commit itself failed: nothing of the batch is stored
            log.exception("store transaction failed")
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            outcomes = [(future, None, error) for _, future in batch]
        # One wake-up of the loop for the batch: each call_soon_threadsafe writes to the
        # loop's self-pipe, a system call on both sides.
        self._loop.call_soon_threadsafe(settle_all, outcomes)

    async def _call(self, operation: Callable[[sqlite3.Connection], T]) -> T:
        if self._loop is None or self._thread is None:
            raise RuntimeError("store is not open")
        future: asyncio.Future[T] = self._loop.create_future()
        self._queue.put((operation, future))
        return await future

    # -- schema ------------------------------------------------------------------------------

    @staticmethod
    def _migrate(conn: sqlite3.Connection) -> None:
        conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        version = int(row[0]) if row else 0
        if version > SCHEMA_VERSION:
            raise RuntimeError(
                f"database schema version {version} is newer than this mailfax "
                f"({SCHEMA_VERSION}); upgrade mailfax"
            )
        for step in range(version + 1, SCHEMA_VERSION + 1):
            for statement in _statements(MIGRATIONS[step]):
                conn.execute(statement)
        conn.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)",
            (str(SCHEMA_VERSION),),
        )

    # -- intake ------------------------------------------------------------------------------

    async def add_mail_jobs(
        self, mail: NewMail, jobs: Sequence[NewJob], documents: Sequence[FaxDocument],
        quotas: Sequence[Quota] = (),
    ) -> None:
        pages = sum(document.pages for document in documents)

        def operation(conn: sqlite3.Connection) -> None:
            now = time.time()
            if quotas:
                _check_quotas(conn, quotas, now, len(jobs), pages)
            conn.execute(
                "INSERT INTO mails (id, received_at, envelope_from, message_id, subject, refs,"
                " from_header, client_address, auto_submitted, precedence, language)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (mail.mail_id, now, mail.envelope_from, mail.message_id, mail.subject,
                 json.dumps(mail.references), mail.from_header, mail.client_address,
                 mail.auto_submitted, mail.precedence, mail.language),
            )
            for position, document in enumerate(documents):
                digest = sha256_of(document.data)
                _put_blob(conn, digest, document.data)
                conn.execute(
                    "INSERT INTO documents VALUES (?,?,?,?,?,?)",
                    (mail.mail_id, position, document.filename, document.content_type,
                     document.pages, digest),
                )
            for job in jobs:
                conn.execute(
                    "INSERT INTO jobs (id, mail_id, account, number, state, pages, sender,"
                    " created, updated, next_attempt_at, options, priority)"
                    " VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                    (job.job_id, mail.mail_id, job.account, job.number, JobState.QUEUED.value,
                     pages, mail.envelope_from, now, now,
                     job.hold_until.timestamp() if job.hold_until else now,
                     json.dumps(job.options), priority_rank(job.options)),
                )
                conn.execute(
                    "INSERT INTO events (job_id, at, state, detail, notify) VALUES (?,?,?,?,1)",
                    (job.job_id, now, JobState.QUEUED.value, "accepted"),
                )

        await self._call(operation)

    async def record_readiness(self, verdict: ReadinessVerdict) -> list[str]:
        def operation(conn: sqlite3.Connection) -> list[str]:
            now = time.time()
            release = _epoch(verdict.release_at) or now
            marks: dict[str, Any] = {"readiness": verdict.outcome}
            if verdict.findings:
                marks["warnings"] = list(verdict.findings)
            recorded = []
            for job_id in verdict.job_ids:
                updated = conn.execute(
                    "UPDATE jobs SET options = json_patch(options, ?),"
                    " next_attempt_at = CASE WHEN state = 'queued' AND attempts = 0"
                    " AND lease_owner IS NULL AND provider_job_id IS NULL THEN ?"
                    " ELSE next_attempt_at END"
                    " WHERE id = ? AND json_extract(options, '$.readiness') = 'pending'"
                    " RETURNING state", (json.dumps(marks), release, job_id)).fetchone()
                if updated is None:
                    continue  # recorded already (or no such job)
                recorded.append(job_id)
                if updated["state"] == JobState.CANCELLED.value:
                    continue  # no acceptance mail for a job its sender cancelled
                conn.execute(
                    "INSERT INTO events (job_id, at, state, detail, notify) VALUES (?,?,?,?,?)",
                    (job_id, now, JobState.QUEUED.value, verdict.detail, int(verdict.notify)))
            return recorded

        return await self._call(operation)

    async def pending_readiness(self, limit: int) -> list[Job]:
        def operation(conn: sqlite3.Connection) -> list[Job]:
            rows = conn.execute(
                "SELECT * FROM jobs WHERE state = 'queued'"
                " AND json_extract(options, '$.readiness') = 'pending'"
                " ORDER BY created LIMIT ?", (limit,)).fetchall()
            return [_job(row) for row in rows]

        return await self._call(operation)

    async def get_mail(self, mail_id: str) -> Mail | None:
        def operation(conn: sqlite3.Connection) -> Mail | None:
            row = conn.execute("SELECT * FROM mails WHERE id = ?", (mail_id,)).fetchone()
            return None if row is None else _mail(row)

        return await self._call(operation)

    async def get_mails(self, mail_ids: Sequence[str]) -> list[Mail]:
        def operation(conn: sqlite3.Connection) -> list[Mail]:
            found: list[Mail] = []
            for start in range(0, len(mail_ids), 500):  # SQLite's limit on parameters
                chunk = list(mail_ids[start:start + 500])
                found += [_mail(row) for row in conn.execute(
                    f"SELECT * FROM mails WHERE id IN ({_marks(chunk)})", chunk)]
            return found

        return await self._call(operation) if mail_ids else []

    async def load_documents(self, mail_id: str, spool: Path | None = None
                             ) -> list[FaxDocument]:
        return await self._call(
            lambda conn: _documents(conn, [mail_id], spool).get(mail_id, []))

    # -- dispatcher --------------------------------------------------------------------------

    async def claim_work(self, owner: str, limit: int, lease_seconds: float,
                         account_limits: Mapping[str, int],
                         finished: Sequence[Outcome] = (),
                         rules: ClaimRules = DEFAULT_RULES,
                         spool: Path | None = None) -> list[Work]:
        def operation(conn: sqlite3.Connection) -> list[Work]:
            _record_outcomes(conn, finished)
            jobs = _claim(conn, owner, limit, lease_seconds, account_limits, rules)
            mail_ids = list(dict.fromkeys(job.mail_id for job in jobs))
            subjects = dict(conn.execute(
                f"SELECT id, subject FROM mails WHERE id IN ({','.join('?' * len(mail_ids))})",
                mail_ids).fetchall()) if mail_ids else {}
            return group_work(jobs, subjects, _documents(conn, mail_ids, spool))

        return await self._call(operation)

    async def renew_leases(self, owner: str, job_ids: Sequence[str],
                           lease_seconds: float) -> int:
        def operation(conn: sqlite3.Connection) -> int:
            until = time.time() + lease_seconds
            return sum(conn.execute(
                "UPDATE jobs SET lease_until = ? WHERE id = ? AND lease_owner = ?"
                " AND state IN (?, ?)", (until, job_id, owner, *DISPATCHABLE)).rowcount
                for job_id in job_ids)

        return await self._call(operation)

    async def release_leases(self, owner: str | None = None) -> int:
        def operation(conn: sqlite3.Connection) -> int:
            if owner is None:
                cursor = conn.execute(
                    "UPDATE jobs SET lease_owner = NULL, lease_until = NULL"
                    " WHERE lease_owner IS NOT NULL")
            else:
                cursor = conn.execute(
                    "UPDATE jobs SET lease_owner = NULL, lease_until = NULL WHERE lease_owner = ?",
                    (owner,))
            return cursor.rowcount

        return await self._call(operation)

    async def next_due_time(self, rules: ClaimRules = DEFAULT_RULES) -> datetime | None:
        def operation(conn: sqlite3.Connection) -> datetime | None:
            row = conn.execute(
                "SELECT MIN(MAX(COALESCE(MAX(next_attempt_at, lease_until), next_attempt_at),"
                " COALESCE((SELECT not_before FROM number_backoff b"
                " WHERE b.number = jobs.number), 0)))"
                " FROM jobs WHERE state IN (:queued, :retrying) AND provider_job_id IS NULL"
                + _held_by_rules(rules),
                {"queued": DISPATCHABLE[0], "retrying": DISPATCHABLE[1], "now": time.time()},
            ).fetchone()
            return _ts(row[0])

        return await self._call(operation)

    async def number_busy(self, number: str, backoff_seconds: Sequence[float]) -> datetime:
        return await self._call(lambda conn: _number_busy(conn, number, backoff_seconds))

    async def record(self, job_id: str, transition: Transition,
                     expected: Sequence[JobState] | None = None) -> bool:
        return await self._call(lambda conn: _record(conn, job_id, transition, expected))

    async def record_all(self, outcomes: Sequence[Outcome]) -> list[bool]:
        if not outcomes:
            return []
        return await self._call(lambda conn: _record_outcomes(conn, outcomes))

    # -- tracker -----------------------------------------------------------------------------

    async def tracked_jobs(self, account: str) -> list[Job]:
        states = [s.value for s in (*TRACKED_STATES, JobState.RETRYING)]

        def operation(conn: sqlite3.Connection) -> list[Job]:
            rows = conn.execute(
                f"SELECT * FROM jobs WHERE account = ? AND provider_job_id IS NOT NULL"
                f" AND state IN ({','.join('?' * len(states))})",
                (account, *states),
            ).fetchall()
            return [_job(r) for r in rows]

        return await self._call(operation)

    async def reopen_job(self, job_id: str, detail: str) -> Job | None:
        def operation(conn: sqlite3.Connection) -> Job | None:
            row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None or JobState(row["state"]) not in RETRYABLE_STATES:
                return _job(row) if row else None
            now = time.time()
            conn.execute(
                "UPDATE jobs SET state = ?, updated = ?, next_attempt_at = ?, attempts = 0,"
                " provider_job_id = NULL, cancel_requested = 0, acknowledged = 0,"
                " lease_owner = NULL, lease_until = NULL WHERE id = ?",
                (JobState.QUEUED.value, now, now, job_id))
            conn.execute(
                "INSERT INTO events (job_id, at, state, reason, detail, notify)"
                " VALUES (?, ?, ?, NULL, ?, 0)", (job_id, now, JobState.QUEUED.value, detail))
            return _job(conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())

        return await self._call(operation)

    async def lost_answers_before(self, before: datetime, limit: int) -> list[Job]:
        # The literals match jobs_answer_lost's WHERE, for the planner to use it.
        def operation(conn: sqlite3.Connection) -> list[Job]:
            rows = conn.execute(
                "SELECT * FROM jobs WHERE state = 'unconfirmed'"
                " AND json_extract(reason, '$.code') = 'answer_lost' AND updated < ?"
                " ORDER BY updated, id LIMIT ?", (before.timestamp(), limit)).fetchall()
            return [_job(r) for r in rows]

        return await self._call(operation)

    async def unacknowledged_final_jobs(self, account: str, limit: int) -> list[Job]:
        def operation(conn: sqlite3.Connection) -> list[Job]:
            rows = conn.execute(
                # INDEXED BY: left to itself the planner walks jobs_tracked, every finished
                # job of the account (40 ms at 100k jobs); this index holds only the few
                # unacknowledged ones.
                "SELECT * FROM jobs j INDEXED BY jobs_unacknowledged WHERE account = ?"
                " AND acknowledged = 0"
                " AND provider_job_id IS NOT NULL AND state IN ('delivered','failed','cancelled')"
                " AND NOT EXISTS (SELECT 1 FROM events e WHERE e.job_id = j.id AND e.notify = 1)"
                " AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.job_id = j.id"
                "                 AND o.state = 'pending') LIMIT ?",
                (account, limit),
            ).fetchall()
            return [_job(r) for r in rows]

        return await self._call(operation)

    async def mark_acknowledged(self, job_ids: Sequence[str]) -> None:
        def operation(conn: sqlite3.Connection) -> None:
            conn.executemany("UPDATE jobs SET acknowledged = 1 WHERE id = ?",
                             [(job_id,) for job_id in job_ids])

        await self._call(operation)

    # -- queries -----------------------------------------------------------------------------

    async def get_job(self, job_id: str) -> Job | None:
        def operation(conn: sqlite3.Connection) -> Job | None:
            row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            return _job(row) if row else None

        return await self._call(operation)

    async def get_jobs(self, job_ids: Sequence[str]) -> list[Job]:
        def operation(conn: sqlite3.Connection) -> list[Job]:
            found: list[Job] = []
            for start in range(0, len(job_ids), 500):  # SQLite's limit on parameters
                chunk = list(job_ids[start:start + 500])
                marks = ",".join("?" * len(chunk))
                rows = conn.execute(f"SELECT * FROM jobs WHERE id IN ({marks})", chunk).fetchall()
                found += [_job(row) for row in rows]
            return found

        return await self._call(operation)

    async def open_jobs(self, mail_id: str) -> int:
        def operation(conn: sqlite3.Connection) -> int:
            row = conn.execute(f"SELECT count(*) FROM jobs WHERE mail_id = ? AND state NOT IN"
                               f" ({_marks(ENDED)})", (mail_id, *ENDED)).fetchone()
            return int(row[0])

        return await self._call(operation)

    async def last_summary_at(self, mail_id: str) -> datetime | None:
        def operation(conn: sqlite3.Connection) -> datetime | None:
            row = conn.execute(
                "SELECT max(o.created) FROM outbox o JOIN jobs j ON o.job_id = j.id"
                " WHERE j.mail_id = ? AND o.kind = 'summary'", (mail_id,)).fetchone()
            return _ts(row[0])

        return await self._call(operation)

    async def mail_jobs(self, mail_id: str) -> list[Job]:
        def operation(conn: sqlite3.Connection) -> list[Job]:
            rows = conn.execute("SELECT * FROM jobs WHERE mail_id = ? ORDER BY created, id",
                                (mail_id,)).fetchall()
            return [_job(row) for row in rows]

        return await self._call(operation)

    async def list_jobs(self, limit: int = 1000, state: JobState | None = None) -> list[Job]:
        def operation(conn: sqlite3.Connection) -> list[Job]:
            if state is None:
                rows = conn.execute(
                    "SELECT * FROM jobs ORDER BY created DESC, id LIMIT ?", (limit,)).fetchall()
            else:
                rows = conn.execute(
                    "SELECT * FROM jobs WHERE state = ? ORDER BY created DESC, id LIMIT ?",
                    (state.value, limit)).fetchall()
            return [_job(r) for r in rows]

        return await self._call(operation)

    async def usage_since(self, since: datetime, senders: Sequence[str] | None = None
                          ) -> tuple[int, int]:
        return await self._call(lambda conn: _usage(conn, since.timestamp(), senders))

    async def job_events(self, job_id: str) -> list[Event]:
        def operation(conn: sqlite3.Connection) -> list[Event]:
            rows = conn.execute(
                "SELECT * FROM events WHERE job_id = ? ORDER BY id", (job_id,)).fetchall()
            return [_event(r) for r in rows]

        return await self._call(operation)

    async def request_cancel(self, job_id: str) -> Job | None:
        def operation(conn: sqlite3.Connection) -> Job | None:
            conn.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
            row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            return _job(row) if row else None

        return await self._call(operation)

    # -- notifications and outbox -----------------------------------------------------------

    async def pending_notifications(self, limit: int) -> list[Event]:
        def operation(conn: sqlite3.Connection) -> list[Event]:
            rows = conn.execute(
                "SELECT * FROM events WHERE notify = 1 ORDER BY id LIMIT ?", (limit,)).fetchall()
            return [_event(r) for r in rows]

        return await self._call(operation)

    @staticmethod
    def _insert_outbox(conn: sqlite3.Connection, mail: OutgoingMail) -> int:
        now = time.time()
        cursor = conn.execute(
            "INSERT INTO outbox (created, job_id, kind, envelope_from, recipients, message,"
            " next_attempt_at, inbound_account, inbound_fax_id) VALUES (?,?,?,?,?,?,?,?,?)",
            (now, mail.job_id, mail.kind, mail.envelope_from, json.dumps(mail.recipients),
             mail.message, now, *(mail.inbound or (None, None))),
        )
        return int(cursor.lastrowid or 0)

    async def claim_notifications(self, owner: str, limit: int,
                                  lease_seconds: float) -> list[Event]:
        # One instance per SQLite database: nobody else could take them.
        return await self.pending_notifications(limit)

    async def complete_notifications(
            self, completed: Sequence[tuple[int, Sequence[OutgoingMail]]]) -> None:
        def operation(conn: sqlite3.Connection) -> None:
            for event_id, mails in completed:
                done = conn.execute("UPDATE events SET notify = 0 WHERE id = ? AND notify = 1",
                                    (event_id,)).rowcount
                if not done:
                    continue  # already handled: its mails are in the outbox once
                for mail in mails:
                    self._insert_outbox(conn, mail)

        await self._call(operation)

    async def enqueue_mail(self, mail: OutgoingMail) -> int:
        return await self._call(lambda conn: self._insert_outbox(conn, mail))

    async def spool_mail(self, envelope_from: str, recipients: Sequence[str], client: str,
                         user: str | None, message: bytes) -> int:
        def operation(conn: sqlite3.Connection) -> int:
            cur = conn.execute(
                "INSERT INTO accept_spool (received_at, envelope_from, recipients, client,"
                " user_name, message) VALUES (?, ?, ?, ?, ?, ?)",
                (time.time(), envelope_from, json.dumps(list(recipients)), client, user,
                 message))
            return int(cur.lastrowid or 0)

        return await self._call(operation)

    async def claim_spooled(self, limit: int, lease_seconds: float) -> list[SpooledMail]:
        def operation(conn: sqlite3.Connection) -> list[SpooledMail]:
            now = time.time()
            rows = conn.execute(
                "SELECT * FROM accept_spool WHERE leased_until <= ? ORDER BY id LIMIT ?",
                (now, limit)).fetchall()
            conn.executemany("UPDATE accept_spool SET leased_until = ? WHERE id = ?",
                             [(now + lease_seconds, row["id"]) for row in rows])
            return [SpooledMail(
                id=row["id"], received_at=datetime.fromtimestamp(row["received_at"], UTC),
                envelope_from=row["envelope_from"], recipients=json.loads(row["recipients"]),
                client=row["client"], user=row["user_name"], message=bytes(row["message"]))
                for row in rows]

        return await self._call(operation)

    async def unspool_mail(self, spool_id: int) -> None:
        await self._call(lambda conn: conn.execute(
            "DELETE FROM accept_spool WHERE id = ?", (spool_id,)))

    async def status_mails_since(self, recipient: str, since: datetime) -> int:
        def operation(conn: sqlite3.Connection) -> int:
            row = conn.execute(
                "SELECT count(*) FROM outbox WHERE job_id IS NOT NULL AND kind <> 'dsn'"
                " AND lower(json_extract(recipients, '$[0]')) = lower(?) AND created >= ?",
                (recipient, since.timestamp())).fetchone()
            return int(row[0])

        return await self._call(operation)

    async def due_outbox(self, limit: int) -> list[OutboxItem]:
        def operation(conn: sqlite3.Connection) -> list[OutboxItem]:
            rows = conn.execute(
                "SELECT * FROM outbox WHERE state = 'pending' AND next_attempt_at <= ?"
                " ORDER BY id LIMIT ?", (time.time(), limit)).fetchall()
            return [OutboxItem(id=r["id"], envelope_from=r["envelope_from"],
                               recipients=json.loads(r["recipients"]), message=r["message"],
                               attempts=r["attempts"], job_id=r["job_id"],
                               inbound=_inbound_of(r)) for r in rows]

        return await self._call(operation)

    async def claim_outbox(self, owner: str, limit: int, lease_seconds: float
                           ) -> list[OutboxItem]:
        return await self.due_outbox(limit)  # one instance per SQLite database

    async def outbox_sent(self, item_id: int) -> None:
        await self._call(lambda conn: conn.execute(
            "UPDATE outbox SET state = 'sent', attempts = attempts + 1, last_error = NULL"
            " WHERE id = ?", (item_id,)))

    async def outbox_retry(self, item_id: int, next_attempt_at: datetime, error: str) -> None:
        await self._call(lambda conn: conn.execute(
            "UPDATE outbox SET attempts = attempts + 1, next_attempt_at = ?, last_error = ?"
            " WHERE id = ?", (next_attempt_at.timestamp(), error[:1000], item_id)))

    async def outbox_give_up(self, item_id: int, error: str) -> None:
        await self._call(lambda conn: conn.execute(
            "UPDATE outbox SET state = 'failed', attempts = attempts + 1, last_error = ?"
            " WHERE id = ?", (error[:1000], item_id)))

    async def clear_cancel_request(self, job_id: str) -> None:
        await self._call(lambda conn: conn.execute(
            "UPDATE jobs SET cancel_requested = 0 WHERE id = ?", (job_id,)))

    async def outbox_next_due(self) -> datetime | None:
        def operation(conn: sqlite3.Connection) -> datetime | None:
            row = conn.execute(
                "SELECT MIN(next_attempt_at) FROM outbox WHERE state = 'pending'").fetchone()
            return _ts(row[0])

        return await self._call(operation)

    async def outbox_depth(self) -> int:
        def operation(conn: sqlite3.Connection) -> int:
            return int(conn.execute(
                "SELECT COUNT(*) FROM outbox WHERE state = 'pending'").fetchone()[0])

        return await self._call(operation)

    async def probe_write(self) -> None:
        await self._call(lambda conn: conn.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('write_probe', ?)",
            (datetime.now(UTC).isoformat(),)))

    async def counts(self) -> dict[str, dict[str, int]]:
        def operation(conn: sqlite3.Connection) -> dict[str, dict[str, int]]:
            jobs = dict(conn.execute("SELECT state, jobs FROM job_state_counts"))
            inbound = dict(conn.execute(
                "SELECT state, COUNT(*) FROM inbound_faxes GROUP BY state"))
            return {"jobs": jobs, "inbound": inbound}

        return await self._call(operation)
