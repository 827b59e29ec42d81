"""The shared store: PostgreSQL, for one or several mailfax instances on one database.

Every method is one transaction on a connection from a pool, committed before it returns.
"Now" is the database server's clock (``now()``), so instances on different hosts agree on
when a job is due and when a lease runs out. Instances share the dispatcher's work through
leases: :meth:`PostgresStore.claim_work` takes due jobs with ``FOR UPDATE SKIP LOCKED``
and stamps them with the owner and an expiry, so no two instances ever claim the same job and
a crashed instance's jobs come back when its leases expire. After adding jobs the store sends
``NOTIFY mailfax_jobs``; :meth:`PostgresStore.wait_for_work` wakes up on it. Jobs one instance
submitted are announced to the others (``mailfax_submitted``), for the one that tracks them.

The schema is versioned in ``schema_migrations``; :func:`migrate` applies the missing versions
in order, each in its own transaction, under an advisory lock so instances starting together
do not race, and refuses a database whose schema is newer than this mailfax.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg.rows import DictRow, dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from mailfax import reasons
from mailfax.documents.mapped import DocumentBytes, document_file_from, sha256_of
from mailfax.model import RETRYABLE_STATES, TRACKED_STATES, JobState, Reason, can_transition
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
from mailfax.support.waiting import cancel_and_wait, wait_for_event

log = logging.getLogger(__name__)

NOTIFY_CHANNEL = "mailfax_jobs"
SUBMITTED_CHANNEL = "mailfax_submitted"  # payload: job ids, comma-separated
NOTIFY_PAYLOAD_MAX = 7900  # PostgreSQL refuses payloads of 8000 bytes and more
MIGRATION_LOCK = 0x6D61696C666178  # pg_advisory_xact_lock key: "mailfax" in ASCII
CLAIM_LOCK = 0x6D61696C66617863  # pg_advisory_xact_lock key: claims with account limits
SINGLETON_RETRY_SECONDS = 2.0
SINGLETON_CHECK_SECONDS = 1.0

MIGRATIONS: dict[int, str] = {
    1: """
    CREATE TABLE mails (
        id              text PRIMARY KEY,
        received_at     timestamptz NOT NULL,
        envelope_from   text NOT NULL,
        message_id      text,
        subject         text NOT NULL,
        refs            jsonb NOT NULL,
        from_header     text NOT NULL,
        client_address  text NOT NULL,
        auto_submitted  text,
        precedence      text,
        language        text NOT NULL
    );

    CREATE TABLE blobs (
        sha256  text PRIMARY KEY,
        data    bytea NOT NULL
    );

    CREATE TABLE documents (
        mail_id       text NOT NULL REFERENCES mails (id),
        position      integer NOT NULL,
        filename      text NOT NULL,
        content_type  text NOT NULL,
        pages         integer NOT NULL,
        blob          text NOT NULL REFERENCES blobs (sha256),
        PRIMARY KEY (mail_id, position)
    );

    CREATE TABLE jobs (
        id                text PRIMARY KEY,
        mail_id           text NOT NULL REFERENCES mails (id),
        account           text NOT NULL,
        number            text NOT NULL,
        state             text NOT NULL,
        pages             integer NOT NULL,
        sender            text NOT NULL,
        created           timestamptz NOT NULL,
        updated           timestamptz NOT NULL,
        attempts          integer NOT NULL DEFAULT 0,
        next_attempt_at   timestamptz,
        provider_job_id   text,
        reason            jsonb,
        duration          double precision,
        remote_id         text,
        options           jsonb NOT NULL DEFAULT '{}',
        cancel_requested  boolean NOT NULL DEFAULT false,
        acknowledged      boolean NOT NULL DEFAULT false,
        lease_owner       text,
        lease_until       timestamptz
    );
    CREATE INDEX jobs_due ON jobs (next_attempt_at)
        WHERE provider_job_id IS NULL AND state IN ('queued', 'retrying');
    CREATE INDEX jobs_tracked ON jobs (account, state) WHERE provider_job_id IS NOT NULL;
    CREATE INDEX jobs_created ON jobs (created);
    CREATE INDEX jobs_mail ON jobs (mail_id);
    CREATE INDEX jobs_sender ON jobs (lower(sender), created);
    CREATE INDEX jobs_lease_owner ON jobs (lease_owner) WHERE lease_owner IS NOT NULL;

    CREATE TABLE events (
        id      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        job_id  text NOT NULL REFERENCES jobs (id),
        at      timestamptz NOT NULL,
        state   text NOT NULL,
        reason  jsonb,
        detail  text NOT NULL DEFAULT '',
        notify  boolean NOT NULL
    );
    CREATE INDEX events_job ON events (job_id);
    CREATE INDEX events_pending ON events (id) WHERE notify;

    CREATE TABLE outbox (
        id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        created          timestamptz NOT NULL,
        job_id           text,
        kind             text NOT NULL,
        envelope_from    text NOT NULL,
        recipients       jsonb NOT NULL,
        message          bytea NOT NULL,
        attempts         integer NOT NULL DEFAULT 0,
        next_attempt_at  timestamptz NOT NULL,
        state            text NOT NULL DEFAULT 'pending',
        last_error       text,
        inbound_account  text,
        inbound_fax_id   text
    );
    CREATE INDEX outbox_due ON outbox (next_attempt_at) WHERE state = 'pending';
    CREATE INDEX outbox_job ON outbox (job_id) WHERE job_id IS NOT NULL;
    CREATE INDEX outbox_inbound ON outbox (inbound_account, inbound_fax_id)
        WHERE inbound_fax_id IS NOT NULL;

    CREATE TABLE inbound_faxes (
        account        text NOT NULL,
        fax_id         text NOT NULL,
        fetched_at     timestamptz NOT NULL,
        called_number  text NOT NULL,
        received_at    timestamptz NOT NULL,
        originator     text NOT NULL,
        remote_id      text NOT NULL,
        pages          integer NOT NULL,
        image          bytea NOT NULL,
        state          text NOT NULL DEFAULT 'received',
        deliveries     integer NOT NULL DEFAULT 0,
        PRIMARY KEY (account, fax_id)
    );
    CREATE INDEX inbound_pending ON inbound_faxes (account, state) WHERE state <> 'deleted';
    CREATE INDEX inbound_fax_id ON inbound_faxes (fax_id);
    """,
    # Several instances: events and outbox mails are leased to the instance that handles them,
    # and the dispatcher claims by account.
    2: """
    ALTER TABLE events ADD COLUMN claim_owner text, ADD COLUMN claim_until timestamptz;
    ALTER TABLE outbox ADD COLUMN claim_owner text, ADD COLUMN claim_until timestamptz;
    CREATE INDEX jobs_due_account ON jobs (account, next_attempt_at)
        WHERE provider_job_id IS NULL AND state IN ('queued', 'retrying');
    CREATE INDEX jobs_live_leases ON jobs (account) WHERE lease_owner IS NOT NULL;
    """,
    # The status-mail limit per sender counts the outbox, so it holds over all instances.
    3: """
    CREATE INDEX outbox_status_to ON outbox (lower(recipients->>0), created)
        WHERE job_id IS NOT NULL AND kind <> 'dsn';
    """,
    # The bundled emulator's fax network lives in the store: every instance sees one network.
    4: """
    CREATE TABLE emulator_transmissions (
        account          text NOT NULL,
        provider_job_id  text PRIMARY KEY,
        reference        text NOT NULL,
        number           text NOT NULL,
        pages            integer NOT NULL,
        submitted_at     double precision NOT NULL,
        send_calls       integer NOT NULL DEFAULT 1,
        cancelled        boolean NOT NULL DEFAULT false,
        UNIQUE (account, reference)
    );
    """,
    # Hot queries on indexes, whatever the history: the tracker's unacknowledged jobs and
    # ``jobs --state``. (Counting per state for /metrics reads an index and blocks no writer.)
    5: """
    CREATE INDEX jobs_unacknowledged ON jobs (account)
        WHERE NOT acknowledged AND provider_job_id IS NOT NULL;
    CREATE INDEX jobs_state_created ON jobs (state, created);
    """,
    # Retention (mailfax.store.retention): what was purged, and the indexes purges look up.
    6: """
    ALTER TABLE mails ADD COLUMN documents_purged_at timestamptz;
    ALTER TABLE inbound_faxes ADD COLUMN image_purged_at timestamptz;
    CREATE INDEX mails_received ON mails (received_at, id);
    CREATE INDEX documents_blob ON documents (blob);
    CREATE INDEX outbox_done ON outbox (created) WHERE state <> 'pending';
    CREATE INDEX inbound_fetched ON inbound_faxes (fetched_at, account, fax_id);
    """,
    # Job counts per state for /metrics without counting the table (a Seq Scan: ~0.1 s at 1M
    # jobs, on every scrape). Triggers append +1/-1 rows, so writers on several instances
    # never wait for one counter row; counts() folds them into one row per state.
    7: """
    CREATE TABLE job_state_counts (state text NOT NULL, jobs bigint NOT NULL);
    INSERT INTO job_state_counts SELECT state, count(*) FROM jobs GROUP BY state;
    CREATE FUNCTION job_state_count() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP IN ('UPDATE', 'DELETE') THEN
            INSERT INTO job_state_counts VALUES (OLD.state, -1);
        END IF;
        IF TG_OP IN ('UPDATE', 'INSERT') THEN
            INSERT INTO job_state_counts VALUES (NEW.state, 1);
        END IF;
        RETURN NULL;
    END $$;
    CREATE TRIGGER job_state_count_insert_delete AFTER INSERT OR DELETE ON jobs
        FOR EACH ROW EXECUTE FUNCTION job_state_count();
    CREATE TRIGGER job_state_count_update AFTER UPDATE OF state ON jobs
        FOR EACH ROW WHEN (OLD.state IS DISTINCT FROM NEW.state)
        EXECUTE FUNCTION job_state_count();
    """,
    # smtp.accept = "spool": mails taken before they are parsed, until intake made them jobs.
    8: """
    CREATE TABLE accept_spool (
        id bigserial PRIMARY KEY,
        received_at timestamptz NOT NULL DEFAULT now(),
        envelope_from text NOT NULL,
        recipients jsonb NOT NULL,
        client text NOT NULL,
        user_name text,
        message bytea NOT NULL,
        leased_until timestamptz NOT NULL DEFAULT '-infinity'
    );
    """,
    # The unconfirmed jobs still looked for at their provider (the tracker settles them once
    # ``unconfirmed_after`` ran out), oldest first, however many settled ones pile up.
    # Service-wide quotas count jobs and pages per 300 s of creation (SERVICE_USAGE_SQL), so
    # the count does not grow with the jobs of the window. Triggers append delta rows (no
    # writer waits for a counter row); FOLD_TOTALS_SQL sums them into one row per bucket.
    9: """
    CREATE INDEX jobs_answer_lost ON jobs (updated)
        WHERE state = 'unconfirmed' AND reason->>'code' = 'answer_lost';
    CREATE TABLE job_created_totals (
        bucket  bigint NOT NULL,
        jobs    bigint NOT NULL,
        pages   bigint NOT NULL,
        folded  boolean NOT NULL DEFAULT false
    );
    CREATE UNIQUE INDEX job_created_totals_folded ON job_created_totals (bucket) WHERE folded;
    CREATE INDEX job_created_totals_deltas ON job_created_totals (bucket) WHERE NOT folded;
    INSERT INTO job_created_totals
        SELECT floor(extract(epoch FROM created) / 300)::bigint, count(*), sum(pages), true
        FROM jobs GROUP BY 1;
    CREATE FUNCTION job_created_total() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP = 'INSERT' THEN
            INSERT INTO job_created_totals (bucket, jobs, pages)
            VALUES (floor(extract(epoch FROM NEW.created) / 300)::bigint, 1, NEW.pages);
        ELSE
            INSERT INTO job_created_totals (bucket, jobs, pages)
            VALUES (floor(extract(epoch FROM OLD.created) / 300)::bigint, 0,
                    NEW.pages - OLD.pages);
        END IF;
        RETURN NULL;
    END $$;
    CREATE TRIGGER job_created_total_insert AFTER INSERT ON jobs
        FOR EACH ROW EXECUTE FUNCTION job_created_total();
    CREATE TRIGGER job_created_total_pages AFTER UPDATE OF pages ON jobs
        FOR EACH ROW WHEN (OLD.pages IS DISTINCT FROM NEW.pages)
        EXECUTE FUNCTION job_created_total();
    """,
    # One call at a time per number, busy backoff per number, priorities (issue 20): the
    # claim looks up a number's live jobs and backoff by index and walks the due jobs of an
    # account in priority order.
    10: """
    ALTER TABLE jobs ADD COLUMN priority smallint NOT NULL DEFAULT 0;
    UPDATE jobs SET priority = 1 WHERE options->>'priority' = 'bulk'
        AND provider_job_id IS NULL AND state IN ('queued', 'retrying');
    CREATE INDEX jobs_claim ON jobs (account, priority, next_attempt_at)
        WHERE provider_job_id IS NULL AND state IN ('queued', 'retrying');
    CREATE INDEX jobs_line_in_use ON jobs (number)
        WHERE provider_job_id IS NOT NULL AND state IN ('submitted', 'sending', 'retrying');
    CREATE INDEX jobs_leased_number ON jobs (number) WHERE lease_owner IS NOT NULL;
    CREATE TABLE number_backoff (
        number      text PRIMARY KEY,
        not_before  timestamptz NOT NULL,
        busy_count  integer NOT NULL
    );
    """,
    # A user's quota counts that user's jobs of the window (issue 19): on
    # created AT TIME ZONE 'UTC', which jobs_created cannot serve (USER_USAGE_SQL), so the
    # planner cannot walk every job of the window instead, as it did with jobs_sender
    # (lower(sender), created) while the jobs of the window lay in the order of the table.
    11: """
    CREATE INDEX jobs_sender_window ON jobs (lower(sender), (created AT TIME ZONE 'UTC'));
    DROP INDEX jobs_sender;
    """,
}
SCHEMA_VERSION = max(MIGRATIONS)

# The states a job waits for the dispatcher in. The queries spell them out as literals,
# ``state IN ('queued', 'retrying')``, as the partial indexes do: a parameter there would keep
# a prepared statement's generic plan off those indexes (planning each call instead).
DISPATCHABLE = [JobState.QUEUED.value, JobState.RETRYING.value]
assert DISPATCHABLE == ["queued", "retrying"]
assert reasons.ANSWER_LOST == "answer_lost"  # spelt out in jobs_answer_lost and its query
FINAL = [JobState.DELIVERED.value, JobState.FAILED.value, JobState.CANCELLED.value]


class SchemaTooNewError(RuntimeError):
    """The database was migrated by a newer mailfax than this one."""


# -- schema migrations ---------------------------------------------------------------------


async def migrate(url: str) -> list[int]:
    """Bring the database at ``url`` to :data:`SCHEMA_VERSION`; the versions applied."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        return await _migrate(conn)


async def _migrate(conn: psycopg.AsyncConnection[Any]) -> list[int]:
    applied: list[int] = []
    while True:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            await conn.execute(
                """
                CREATE TABLE IF NOT EXISTS schema_migrations (
                    version     integer PRIMARY KEY,
                    applied_at  timestamptz NOT NULL DEFAULT now()
                )
                """
            )
            cursor = await conn.execute("SELECT max(version) FROM schema_migrations")
            row = await cursor.fetchone()
            current = int(row[0]) if row and row[0] is not None else 0
            if current > SCHEMA_VERSION:
                raise SchemaTooNewError(
                    f"database schema version {current} is newer than this mailfax "
                    f"({SCHEMA_VERSION}); upgrade mailfax"
                )
            if current == SCHEMA_VERSION:
                return applied
            step = current + 1
            await conn.execute(MIGRATIONS[step])
            await conn.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (step,))
        log.info("applied store schema version %d", step)
        applied.append(step)


# -- rows to objects -----------------------------------------------------------------------


def _utc(value: datetime | None) -> datetime | None:
    return None if value is None else value.astimezone(UTC)


def _at(value: datetime) -> datetime:
    return value.astimezone(UTC)


def _reason(value: dict[str, Any] | None) -> Reason | None:
    return Reason.from_json(value) if value else None


def _reason_json(reason: Reason | None) -> Jsonb | None:
    return Jsonb(reason.to_json()) if reason else None


def _mail(row: DictRow) -> Mail:
    return Mail(
        id=row["id"], envelope_from=row["envelope_from"], message_id=row["message_id"],
        subject=row["subject"], references=row["refs"], from_header=row["from_header"],
        client_address=row["client_address"], auto_submitted=row["auto_submitted"],
        precedence=row["precedence"], language=row["language"],
        received_at=_at(row["received_at"]),
    )


def _job(row: DictRow) -> Job:
    return Job(
        id=row["id"],
        mail_id=row["mail_id"],
        account=row["account"],
        number=row["number"],
        state=JobState(row["state"]),
        pages=row["pages"],
        sender=row["sender"],
        created=_at(row["created"]),
        updated=_at(row["updated"]),
        attempts=row["attempts"],
        next_attempt_at=_utc(row["next_attempt_at"]),
        provider_job_id=row["provider_job_id"],
        reason=_reason(row["reason"]),
        duration_seconds=row["duration"],
        remote_id=row["remote_id"],
        options=row["options"],
        cancel_requested=row["cancel_requested"],
        acknowledged=row["acknowledged"],
    )


def _sorted_jobs(rows: Sequence[DictRow]) -> list[Job]:
    jobs = [_job(row) for row in rows]
    jobs.sort(key=lambda job: (priority_rank(job.options), job.next_attempt_at or job.created,
                               job.id))
    return jobs


def _event(row: DictRow) -> Event:
    return Event(
        id=row["id"],
        job_id=row["job_id"],
        at=_at(row["at"]),
        state=JobState(row["state"]),
        reason=_reason(row["reason"]),
        detail=row["detail"],
    )


_INBOUND_COLUMNS = """account, fax_id, fetched_at, called_number, received_at, originator,
    remote_id, pages, state, deliveries"""


def _inbound(row: DictRow) -> InboundRecord:
    return InboundRecord(
        account=row["account"], fax_id=row["fax_id"], fetched_at=_at(row["fetched_at"]),
        called_number=row["called_number"], received_at=_at(row["received_at"]),
        originator=row["originator"], remote_id=row["remote_id"], pages=row["pages"],
        state=row["state"], deliveries=row["deliveries"],
    )


# A waiting job (``jobs``) whose number's line is in use: another job to it leased (by any
# instance) or at its provider still dialling; literal states, as the partial indexes have.
LINE_IN_USE = """
    (EXISTS (SELECT 1 FROM jobs busy WHERE busy.number = jobs.number
             AND busy.provider_job_id IS NOT NULL
             AND busy.state IN ('submitted', 'sending', 'retrying'))
     OR EXISTS (SELECT 1 FROM jobs held WHERE held.number = jobs.number
                AND held.lease_owner IS NOT NULL AND held.lease_until >= now()
                AND held.state IN ('queued', 'retrying') AND held.id <> jobs.id))
"""
BACKED_OFF = """
    EXISTS (SELECT 1 FROM number_backoff b WHERE b.number = jobs.number
            AND b.not_before > now())
"""


def _held_by_rules(rules: ClaimRules) -> str:
    """The conditions ``rules`` add to a query of waiting jobs (parameter ``held``)."""
    held = " AND NOT (priority = ANY(%(held)s::smallint[]))" if rules.held_priorities else ""
    if rules.one_call_per_number:
        held += f" AND NOT {LINE_IN_USE}"
    return held


async def _claim_limited(cur: psycopg.AsyncCursor[DictRow], owner: str, limit: int,
                         lease_seconds: float, account_limits: Mapping[str, int],
                         rules: ClaimRules = DEFAULT_RULES) -> None:
    """Claims with a per-account limit over all instances (the claimed rows are the
    cursor's result).

    The caller holds the claim lock (``pg_advisory_xact_lock(CLAIM_LOCK)``) in this
    transaction: claims that count leases are serialised by it, and as this statement starts
    after the lock was taken, under READ COMMITTED it sees every lease that earlier claims
    committed, so two instances can never both fill the same free slots (nor both call one
    number). record() and
    renew_leases() do not take the lock. The picked rows are locked with SKIP LOCKED (a
    row another transaction is changing is passed over; one that changed since the snapshot
    is checked again), so the UPDATE can find them by ``ctid``: a TID scan, whatever the
    planner believes of the table (right after a burst of new jobs it has no statistics yet,
    and an index plan over the due jobs cost milliseconds per claim).

    With one call per number, each account's walk takes a few candidates per free slot and
    the first of each number (``DISTINCT ON``) is chosen, then each account's room.
    """
    named = [account for account in account_limits if account != OTHER_ACCOUNTS]
    limit = max(0, limit)
    held = _held_by_rules(rules)
    first_per_number = ("SELECT DISTINCT ON (number) * FROM candidates"
                        " ORDER BY number, priority, next_attempt_at, position"
                        if rules.one_call_per_number else "SELECT * FROM candidates")
    await cur.execute(
        f"""
        WITH room AS (
            SELECT a.account, a.position, greatest(a.cap - (
                       SELECT count(*) FROM jobs
                       WHERE jobs.account = a.account AND lease_owner IS NOT NULL
                         AND lease_until >= now() AND state IN ('queued', 'retrying')
                   ), 0) AS room
            FROM unnest(%(accounts)s::text[], %(caps)s::integer[])
                 WITH ORDINALITY AS a (account, cap, position)
        ),
        named AS (
            SELECT pick.ctid, pick.number, pick.priority, pick.next_attempt_at, room.position,
                   least(room.room, %(limit)s) AS room
            FROM room CROSS JOIN LATERAL (
                SELECT ctid, number, priority, next_attempt_at FROM jobs
                WHERE jobs.account = room.account
                  AND state IN ('queued', 'retrying') AND provider_job_id IS NULL
                  AND next_attempt_at <= now()
                  AND (lease_until IS NULL OR lease_until < now())
                  AND NOT {BACKED_OFF} {held}
                ORDER BY priority, next_attempt_at
                LIMIT least(room.room, %(limit)s) * %(spread)s
                FOR UPDATE SKIP LOCKED
            ) AS pick
            WHERE room.room > 0
        ),
        others AS (
            SELECT ctid, number, priority, next_attempt_at, 0::bigint AS position,
                   %(others)s::bigint AS room FROM jobs
            WHERE %(others)s > 0 AND account <> ALL(%(accounts)s::text[])
              AND state IN ('queued', 'retrying') AND provider_job_id IS NULL
              AND next_attempt_at <= now()
              AND (lease_until IS NULL OR lease_until < now())
              AND NOT {BACKED_OFF} {held}
            ORDER BY priority, next_attempt_at
            LIMIT %(others)s * %(spread)s
            FOR UPDATE SKIP LOCKED
        ),
        candidates AS (SELECT * FROM named UNION ALL SELECT * FROM others),
        firsts AS ({first_per_number}),
        ranked AS (
            SELECT ctid, priority, next_attempt_at, position, room, row_number() OVER (
                PARTITION BY position ORDER BY priority, next_attempt_at) AS rank
            FROM firsts
        ),
        chosen AS (
            SELECT ctid FROM ranked WHERE rank <= room
            ORDER BY priority, next_attempt_at, position
            LIMIT %(limit)s
        )
        UPDATE jobs
        SET lease_owner = %(owner)s,
            lease_until = now() + make_interval(secs => %(lease)s),
            attempts = attempts + 1
        WHERE ctid = ANY(ARRAY(SELECT ctid FROM chosen))
        RETURNING jobs.*
        """,
        {"limit": limit, "owner": owner,
         "lease": float(lease_seconds), "accounts": named,
         "caps": [account_limits[account] for account in named],
         "others": account_limits.get(OTHER_ACCOUNTS, 0),
         "spread": CANDIDATES_PER_SLOT if rules.one_call_per_number else 1,
         "held": sorted(rules.held_priorities)},
    )


# A document larger than this is not in the rows: it is read after them, piece by piece
# (read_large_documents). octet_length() of a bytea stored out of line reads its size from
# the TOAST pointer, not the value.
LARGE_DOCUMENT_BYTES = 1024 * 1024
PIECE_BYTES = 4 * 1024 * 1024  # of a large document read: a round trip each
_MAIL_DOCUMENTS = f"""
    SELECT m.id, m.subject, d.filename, d.content_type, d.pages, d.blob,
           CASE WHEN octet_length(b.data) <= {LARGE_DOCUMENT_BYTES} THEN b.data END AS data
    FROM mails m
    LEFT JOIN documents d ON d.mail_id = m.id
    LEFT JOIN blobs b ON b.sha256 = d.blob
"""
MAILS_BY_ID = _MAIL_DOCUMENTS + "WHERE m.id = ANY(%(mail_ids)s) ORDER BY m.id, d.position"
# The mails of the jobs this transaction leased: now() is the transaction's start, so the
# lease it set is told apart from every other transaction's.
MAILS_OF_THIS_CLAIM = _MAIL_DOCUMENTS + """
    WHERE m.id IN (SELECT mail_id FROM jobs WHERE lease_owner = %(owner)s
                   AND lease_until = now() + make_interval(secs => %(lease)s))
    ORDER BY m.id, d.position
"""


Large = list[tuple[str, int, str]]  # (mail id, position among its documents, blob digest)


def _subjects_and_documents(rows: Sequence[DictRow]
                            ) -> tuple[dict[str, str], dict[str, list[FaxDocument]], Large]:
    """The rows of _MAIL_DOCUMENTS as each mail's subject and its documents in order, and
    the large documents not in them (their data still empty: see read_large_documents)."""
    subjects: dict[str, str] = {}
    documents: dict[str, list[FaxDocument]] = {}
    large: Large = []
    for r in rows:
        subjects[r["id"]] = r["subject"]
        if r["filename"] is None:
            continue
        found = documents.setdefault(r["id"], [])
        if r["data"] is None:
            large.append((r["id"], len(found), r["blob"]))
        found.append(FaxDocument(filename=r["filename"], pages=r["pages"],
                                 content_type=r["content_type"],
                                 data=b"" if r["data"] is None else bytes(r["data"])))
    return subjects, documents, large


async def read_large_documents(conn: psycopg.AsyncConnection[Any],
                               documents: dict[str, list[FaxDocument]], large: Large,
                               spool: Path | None) -> None:
    """Put each large document's bytes in place: read in pieces into an unlinked file in
    ``spool``, or (without one, or when that file cannot be written: a full disk) as one
    value. Once for a blob that several of the documents share."""
    read: dict[str, DocumentBytes] = {}
    for mail_id, position, digest in large:
        if digest not in read:
            read[digest] = await _read_blob(conn, digest, spool)
        found = documents[mail_id]
        found[position] = dataclasses.replace(found[position], data=read[digest])


async def _read_blob(conn: psycopg.AsyncConnection[Any], digest: str, spool: Path | None
                     ) -> DocumentBytes:
    if spool is not None:
        try:
            return await document_file_from(spool, _blob_pieces(conn, digest))
        except OSError as error:
            log.warning("a stored document is read into memory: %s cannot take it (%s)",
                        spool, error.strerror or error)
    cursor = await conn.execute("SELECT data FROM blobs WHERE sha256 = %s", (digest,))
    row = await cursor.fetchone()
    return bytes(row[0]) if row else b""


async def _blob_pieces(conn: psycopg.AsyncConnection[Any], digest: str
                       ) -> AsyncIterator[bytes]:
    """The blob, ``PIECE_BYTES`` at a time: substring of a bytea stored out of line reads only
    the chunks it needs."""
    start = 1  # substring counts from 1
    while True:
        cursor = await conn.execute(
            "SELECT substring(data FROM %s FOR %s) FROM blobs WHERE sha256 = %s",
            (start, PIECE_BYTES, digest))
        row = await cursor.fetchone()
        piece = bytes(row[0]) if row else b""
        if not piece:
            return
        yield piece
        start += len(piece)


# The claim's statements are prepared (psycopg prepares a statement on its fifth use), but
# PostgreSQL's default keeps planning them anew: with the limits known, a custom plan looks
# cheaper than the generic one. Planning the claim costs more than running it (0.5 ms vs
# 0.1 ms, measured with bench/dispatch.py's queue), and the generic plan uses the same
# partial indexes, so the dispatcher's transactions take the generic plans. (One statement
# with the claim lock: a statement less per claim.)
LOCK_FOR_CLAIM = ("SELECT set_config('plan_cache_mode', 'force_generic_plan', true),"
                  " pg_advisory_xact_lock(%s)")

RECORD_SQL = """
    WITH old AS (SELECT state FROM jobs WHERE id = %(id)s FOR UPDATE),
    changed AS (
        UPDATE jobs
        SET state = %(state)s, updated = now(),
            lease_owner = NULL, lease_until = NULL,
            reason = COALESCE(%(reason)s::jsonb, reason),
            provider_job_id = COALESCE(%(provider_job_id)s::text, provider_job_id),
            pages = COALESCE(%(pages)s::integer, pages),
            duration = COALESCE(%(duration)s::double precision, duration),
            remote_id = COALESCE(%(remote_id)s::text, remote_id),
            next_attempt_at = COALESCE(%(next_attempt_at)s::timestamptz,
                                       next_attempt_at)
        WHERE id = %(id)s AND (SELECT state FROM old) = ANY(%(allowed)s)
        RETURNING id
    ),
    event AS (
        INSERT INTO events (job_id, at, state, reason, detail, notify)
        SELECT %(id)s, now(), %(state)s, %(reason)s::jsonb, %(detail)s,
               %(notify)s
        FROM changed WHERE (SELECT state FROM old) <> %(state)s OR %(always_event)s
        RETURNING 1
    )
    SELECT (SELECT state FROM old) AS old_state,
           (SELECT count(*) FROM changed) AS changed
    """


def _record_parameters(job_id: str, transition: Transition,
                       expected: Sequence[JobState] | None) -> dict[str, Any]:
    """RECORD_SQL's parameters. The states the job may be in are computed here from the
    transition table (and ``expected``), so the statement locks the row, checks the state,
    updates it and adds the event in one round trip."""
    allowed = [state.value for state in JobState
               if (state == transition.state or can_transition(state, transition.state))
               and (expected is None or state in expected)]
    reason = _reason_json(transition.reason)
    return {"state": transition.state.value, "reason": reason,
            "provider_job_id": transition.provider_job_id, "pages": transition.pages,
            "duration": transition.duration_seconds, "remote_id": transition.remote_id,
            "next_attempt_at": transition.next_attempt_at, "id": job_id,
            "allowed": allowed, "detail": transition.detail, "notify": transition.notify,
            "always_event": transition.always_event}


def _record_verdict(row: DictRow | None, job_id: str, transition: Transition,
                    expected: Sequence[JobState] | None) -> bool:
    """Whether RECORD_SQL moved the job; why not, when that is an error."""
    if row is None or row["old_state"] is None:
        raise KeyError(job_id)
    if row["changed"]:
        return True
    current = JobState(row["old_state"])
    if expected is not None and current not in expected:
        return False
    raise IllegalTransition(f"job {job_id}: {current} -> {transition.state}")


async def _queue_records(conn: psycopg.AsyncConnection[Any], outcomes: Sequence[Outcome]
                         ) -> list[Cursor]:
    """RECORD_SQL for each outcome, sent (in a pipeline: not yet answered) in job id order,
    the order renew_leases() locks its rows in; the cursors in the order of ``outcomes``."""
    cursors = [conn.cursor(row_factory=dict_row) for _ in outcomes]
    for index in sorted(range(len(outcomes)), key=lambda index: outcomes[index].job_id):
        outcome = outcomes[index]
        await cursors[index].execute(RECORD_SQL, _record_parameters(
            outcome.job_id, outcome.transition, outcome.expected))
    return cursors


async def _recorded(cursors: Sequence[Cursor], outcomes: Sequence[Outcome]) -> list[bool]:
    """Whether each job of :func:`_queue_records` moved (a refused one is logged)."""
    return [_check_recorded(await cursor.fetchone(), outcome)
            for cursor, outcome in zip(cursors, outcomes, strict=True)]


def _check_recorded(row: DictRow | None, outcome: Outcome) -> bool:
    """A refused outcome of :meth:`PostgresStore.claim_work` is logged, not raised: the
    others and the claim are committed with it, and the claimed jobs must be sent. Whether
    the job moved."""
    try:
        return _record_verdict(row, outcome.job_id, outcome.transition, outcome.expected)
    except (KeyError, IllegalTransition) as error:
        log.error("result of job %s not recorded: %s", outcome.job_id, error)
        return False


USAGE_SQL = "SELECT count(*) AS jobs, COALESCE(sum(pages), 0) AS pages FROM jobs "
USAGE_BY_SENDERS = """(%(everyone)s
    OR lower(sender) = ANY(%(addresses)s::text[])
    OR EXISTS (SELECT 1 FROM unnest(%(domains)s::text[]) AS d (domain)
               WHERE right(lower(sender), length(d.domain)) = d.domain))
"""


# The triggers' delta rows summed into the folded row of their bucket (ordered by bucket, so
# two folds lock rows in one order). A fold skips deltas a concurrent one took.
FOLD_DELTAS = """deltas AS (
    DELETE FROM job_created_totals WHERE NOT folded RETURNING bucket, jobs, pages)"""
FOLD_INSERT = """
INSERT INTO job_created_totals AS t (bucket, jobs, pages, folded)
SELECT bucket, sum(jobs), sum(pages), true FROM deltas GROUP BY bucket ORDER BY bucket
ON CONFLICT (bucket) WHERE folded
DO UPDATE SET jobs = t.jobs + excluded.jobs, pages = t.pages + excluded.pages
"""
FOLD_TOTALS_SQL = f"WITH {FOLD_DELTAS} {FOLD_INSERT}"


def service_usage_sql(since: str, *, fold: bool = False) -> str:
    """Everyone's jobs since the SQL expression ``since``: the totals of the buckets after the
    one it falls in (folded rows and deltas not folded yet), and the jobs of that one bucket
    created since it counted one by one (with the triggers' floor, so a job on a bucket's
    edge counts exactly once). Its cost does not grow with the jobs of the window.

    With ``fold``, the statement folds the deltas as well (one round trip): its reads see the
    table as it was before, which holds the same sums."""
    edge = f"floor(extract(epoch FROM {since}) / 300)::bigint"  # the bucket it falls in
    folding = f"WITH {FOLD_DELTAS}, fold AS ({FOLD_INSERT})" if fold else ""
    return f"""{folding}
    SELECT COALESCE(sum(jobs), 0) AS jobs, COALESCE(sum(pages), 0) AS pages FROM (
        SELECT jobs, pages FROM job_created_totals WHERE folded AND bucket > {edge}
        UNION ALL
        SELECT jobs, pages FROM job_created_totals WHERE NOT folded AND bucket > {edge}
        UNION ALL
        SELECT count(*), COALESCE(sum(pages), 0) FROM jobs
        WHERE created >= {since} AND created < {since} + interval '600 s'
          AND floor(extract(epoch FROM created) / 300)::bigint <= {edge}) AS parts
    """


# A user's addresses' jobs since :since, on jobs_sender_window alone: with ``created >=``
# the planner took jobs_created (every job of the window, in the order of the table: cheap by
# its cost model) over the user's jobs, scattered, while the window held some thousands.
USER_USAGE_SQL = (USAGE_SQL + "WHERE lower(sender) = ANY(%(addresses)s::text[])"
                  " AND (created AT TIME ZONE 'UTC') >= ({since}) AT TIME ZONE 'UTC'")


def senders_usage_sql(since: str, senders: Sequence[str]) -> str:
    """The count of ``senders``' jobs since the SQL expression ``since``: USER_USAGE_SQL for
    addresses alone, else (a domain among them) every job of the window tested."""
    if not any(sender.startswith("@") for sender in senders):
        return USER_USAGE_SQL.format(since=since)
    return f"{USAGE_SQL}WHERE created >= {since} AND {USAGE_BY_SENDERS}"


def _usage_parameters(senders: Sequence[str] | None) -> dict[str, Any]:
    """USAGE_BY_SENDERS' parameters: ``"a@b.c"`` exactly, ``"@b.c"`` the whole domain."""
    return {"everyone": senders is None,
            "addresses": [s.lower() for s in senders or () if not s.startswith("@")],
            "domains": [s.lower() for s in senders or () if s.startswith("@")]}


def quota_lock_key(key: str) -> int:
    """The ``pg_advisory_xact_lock`` key of a quota (64 bits of a hash of its key)."""
    return int.from_bytes(hashlib.sha256(f"mailfax quota {key}".encode()).digest()[:8],
                          "big", signed=True)


async def _check_quotas(cur: psycopg.AsyncCursor[DictRow], quotas: Sequence[Quota],
                        jobs: int, pages: int) -> None:
    """Raise QuotaExceeded if this transaction's mail goes over a quota.

    Each quota's advisory lock is taken first (in one order, so two mails never wait for
    each other crosswise) and held until the transaction ends: a mail under the same quota on
    any instance waits here until this one is committed or rolled back. Under READ COMMITTED
    the counts, run after the locks were granted, see every mail committed before.
    """
    keys = sorted({quota_lock_key(quota.key) for quota in quotas})
    await cur.execute("SELECT pg_advisory_xact_lock(k) FROM unnest(%s::bigint[]) AS k",
                      (keys,))
    used: list[int] = []
    folded = False
    for quota in quotas:
        if quota.senders is None:  # the first such count folds the totals' deltas
            await cur.execute(service_usage_sql("now() - make_interval(secs => %(window)s)",
                                                fold=not folded),
                              {"window": float(quota.window_seconds)})
            folded = True
        else:
            await cur.execute(
                senders_usage_sql("now() - make_interval(secs => %(window)s)", quota.senders),
                {"window": float(quota.window_seconds), **_usage_parameters(quota.senders)})
        row = await cur.fetchone()
        assert row is not None
        used.append(int(row["jobs"] if quota.unit == "faxes" else row["pages"]))
    exceeded = first_exceeded(quotas, used, jobs, pages)
    if exceeded is not None:
        raise exceeded


# -- retention -------------------------------------------------------------------------------

RETENTION_LOCK = 0x6D61696C66617872  # pg_try_advisory_lock key: one instance purges at a time
ENDED = list(ENDED_STATES)  # a list: psycopg passes it as an array
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
Cursor = psycopg.AsyncCursor[DictRow]
Key = tuple[Any, ...]


def _busy_job(history: bool) -> str:
    """The condition on a job ``j`` that keeps its mail from a purge: not ended before
    ``%(before)s``; for ``history`` also a status mail about it not yet queued or sent."""
    waiting = """
               OR EXISTS (SELECT 1 FROM events e WHERE e.job_id = j.id AND e.notify)
               OR EXISTS (SELECT 1 FROM outbox o WHERE o.job_id = j.id
                          AND o.state = 'pending')""" if history else ""
    return f"(j.state <> ALL(%(ended)s) OR j.updated >= %(before)s{waiting})"


async def _still_ended(cur: Cursor, mail_ids: list[str], before: datetime,
                       events_and_outbox: bool) -> list[str]:
    """Of these mails, those whose jobs all still ended before ``before``, their jobs locked
    first, so a ``mailfax retry`` running meanwhile either waits or is seen here."""
    await cur.execute("SELECT id FROM jobs WHERE mail_id = ANY(%s) ORDER BY id FOR UPDATE",
                      (mail_ids,))
    await cur.execute(
        "SELECT DISTINCT j.mail_id FROM jobs j WHERE j.mail_id = ANY(%(mails)s)"
        f" AND {_busy_job(events_and_outbox)}",
        {"mails": mail_ids, "ended": ENDED, "before": before})
    busy = {row["mail_id"] for row in await cur.fetchall()}
    return [mail_id for mail_id in mail_ids if mail_id not in busy]


async def _ended_mails(cur: Cursor, before: datetime, after: Key, limit: int, dry_run: bool,
                       *, history: bool) -> tuple[list[str], Key, int]:
    """One batch of mails received before ``before`` (after the key ``after``) whose jobs
    all ended before it (for ``history``: nothing of them waiting to be mailed; else: their
    documents not purged yet), rechecked under lock unless ``dry_run``: (mail ids, the
    batch's last key, rows scanned)."""
    await cur.execute(
        f"""
        SELECT m.id, m.received_at FROM mails m
        WHERE m.received_at < %(before)s AND (m.received_at, m.id) > (%(k0)s, %(k1)s)
          {'' if history else 'AND m.documents_purged_at IS NULL'}
          AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.mail_id = m.id AND {_busy_job(history)})
        ORDER BY m.received_at, m.id LIMIT %(n)s {_lock(dry_run, 'm')}
        """, {"before": before, "k0": after[0], "k1": after[1], "ended": ENDED, "n": limit})
    rows = await cur.fetchall()
    if not rows:
        return [], after, 0
    mail_ids = [str(row["id"]) for row in rows]
    if not dry_run:
        mail_ids = await _still_ended(cur, mail_ids, before, events_and_outbox=history)
    return mail_ids, (rows[-1]["received_at"], rows[-1]["id"]), len(rows)


async def _documents_of(cur: Cursor, mail_ids: list[str], dry_run: bool
                        ) -> tuple[int, int, list[str]]:
    """(documents, bytes of the blobs no other mail uses, their digests); locked unless
    ``dry_run``: an intake storing the same document waits, then finds it gone and fails
    with a transient error (451), and its sender tries again."""
    await cur.execute("SELECT count(*) AS n FROM documents WHERE mail_id = ANY(%s)",
                      (mail_ids,))
    row = await cur.fetchone()
    documents = int(row["n"]) if row else 0
    await cur.execute(
        f"""
        SELECT b.sha256, octet_length(b.data) AS n FROM blobs b
        WHERE b.sha256 IN (SELECT blob FROM documents WHERE mail_id = ANY(%(m)s))
          AND NOT EXISTS (SELECT 1 FROM documents d WHERE d.blob = b.sha256
                          AND NOT d.mail_id = ANY(%(m)s))
        {'' if dry_run else 'FOR UPDATE OF b'}
        """, {"m": mail_ids})
    rows = await cur.fetchall()
    return documents, sum(int(r["n"]) for r in rows), [str(r["sha256"]) for r in rows]


async def _drop_documents(cur: Cursor, mail_ids: list[str], digests: list[str]) -> None:
    await cur.execute("DELETE FROM documents WHERE mail_id = ANY(%s)", (mail_ids,))
    await cur.execute("DELETE FROM blobs b WHERE sha256 = ANY(%s) AND NOT EXISTS"
                      " (SELECT 1 FROM documents d WHERE d.blob = b.sha256)", (digests,))


def _lock(dry_run: bool, of: str) -> str:
    return "" if dry_run else f"FOR UPDATE OF {of} SKIP LOCKED"


async def _purge_documents(cur: Cursor, before: datetime, after: Key, limit: int,
                           dry_run: bool) -> tuple[Purged, Key, int]:
    mail_ids, last, scanned = await _ended_mails(cur, before, after, limit, dry_run,
                                                 history=False)
    if not mail_ids:
        return Purged("documents"), last, scanned
    documents, size, digests = await _documents_of(cur, mail_ids, dry_run)
    if not dry_run:
        await _drop_documents(cur, mail_ids, digests)
        await cur.execute("UPDATE mails SET documents_purged_at = now() WHERE id = ANY(%s)",
                          (mail_ids,))
    return Purged("documents", documents, size), last, scanned


async def _handed_off_faxes(cur: Cursor, before: datetime, after: Key, limit: int,
                            dry_run: bool, only_with_image: bool) -> list[DictRow]:
    """Received faxes deleted at the provider before ``before``, none of their mails
    pending, each with the bytes of its image and of its mails."""
    await cur.execute(
        f"""
        SELECT f.fetched_at, f.account, f.fax_id,
               octet_length(f.image) + COALESCE((SELECT sum(octet_length(o.message))
                   FROM outbox o WHERE o.inbound_account = f.account
                   AND o.inbound_fax_id = f.fax_id), 0) AS n
        FROM inbound_faxes f
        WHERE f.fetched_at < %(before)s AND f.state IN ('deleted', 'blocked', 'duplicate')
          {'AND f.image_purged_at IS NULL' if only_with_image else ''}
          AND (f.fetched_at, f.account, f.fax_id) > (%(k0)s, %(k1)s, %(k2)s)
          AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.inbound_account = f.account
                          AND o.inbound_fax_id = f.fax_id AND o.state = 'pending')
        ORDER BY f.fetched_at, f.account, f.fax_id LIMIT %(n)s {_lock(dry_run, 'f')}
        """, {"before": before, "k0": after[0], "k1": after[1], "k2": after[2], "n": limit})
    return await cur.fetchall()


def _fax_key(rows: Sequence[DictRow], after: Key) -> Key:
    return (rows[-1]["fetched_at"], rows[-1]["account"], rows[-1]["fax_id"]) if rows else after


# The (account, fax id) pairs of a batch of faxes, with the parameters of _fax_params.
FAX_PAIRS = "SELECT * FROM unnest(%(accounts)s::text[], %(ids)s::text[])"


def _fax_params(rows: Sequence[DictRow]) -> dict[str, list[Any]]:
    return {"accounts": [r["account"] for r in rows], "ids": [r["fax_id"] for r in rows]}


def _fax_purge(kind: PurgeKind, statements: Sequence[str], *, only_with_image: bool
               ) -> Callable[..., Awaitable[tuple[Purged, Key, int]]]:
    """A batch of handed-off received faxes (:func:`_handed_off_faxes`), changed by
    ``statements`` (each given the batch's faxes as :data:`FAX_PAIRS`)."""

    async def purge(cur: Cursor, before: datetime, after: Key, limit: int,
                    dry_run: bool) -> tuple[Purged, Key, int]:
        rows = await _handed_off_faxes(cur, before, after, limit, dry_run, only_with_image)
        if rows and not dry_run:
            faxes = _fax_params(rows)
            for statement in statements:
                await cur.execute(statement, faxes)
        return (Purged(kind, len(rows), sum(int(r["n"]) for r in rows)),
                _fax_key(rows, after), len(rows))

    return purge


# The images of received faxes (and the mails that carried them) emptied, the records kept.
_purge_received_images = _fax_purge("received_faxes", (
    "UPDATE inbound_faxes SET image = ''::bytea, image_purged_at = now()"
    f" WHERE (account, fax_id) IN ({FAX_PAIRS})",
    "UPDATE outbox SET message = ''::bytea WHERE (inbound_account, inbound_fax_id) IN"
    f" ({FAX_PAIRS})"), only_with_image=True)
# The records of received faxes deleted, with their mails.
_purge_fax_history = _fax_purge("history", (
    f"DELETE FROM outbox WHERE (inbound_account, inbound_fax_id) IN ({FAX_PAIRS})",
    f"DELETE FROM inbound_faxes WHERE (account, fax_id) IN ({FAX_PAIRS})"),
    only_with_image=False)


def _outbox_purge(kind: str) -> Callable[..., Awaitable[tuple[Purged, Key, int]]]:
    """Sent or given-up mails in the outbox: DSNs (``kind`` "dsn") or all others."""

    async def purge(cur: Cursor, before: datetime, after: Key, limit: int,
                    dry_run: bool) -> tuple[Purged, Key, int]:
        await cur.execute(
            f"""
            SELECT id, octet_length(message) AS n FROM outbox
            WHERE created < %s AND state <> 'pending' AND inbound_fax_id IS NULL
              AND kind {'=' if kind == 'dsn' else '<>'} 'dsn' AND id > %s
            ORDER BY id LIMIT %s {'' if dry_run else 'FOR UPDATE SKIP LOCKED'}
            """, (before, after[0], limit))
        rows = await cur.fetchall()
        if rows and not dry_run:
            await cur.execute("DELETE FROM outbox WHERE id = ANY(%s)",
                              ([row["id"] for row in rows],))
        return (Purged(kind, len(rows), sum(int(r["n"]) for r in rows)),
                (rows[-1]["id"],) if rows else after, len(rows))

    return purge


async def _purge_job_history(cur: Cursor, before: datetime, after: Key, limit: int,
                             dry_run: bool) -> tuple[Purged, Key, int]:
    mail_ids, last, scanned = await _ended_mails(cur, before, after, limit, dry_run,
                                                 history=True)
    if not mail_ids:
        return Purged("history"), last, scanned
    jobs_of_mails = "SELECT id FROM jobs WHERE mail_id = ANY(%(m)s)"
    await cur.execute(
        f"SELECT (SELECT count(*) FROM jobs WHERE mail_id = ANY(%(m)s)) AS jobs,"
        f" (SELECT COALESCE(sum(octet_length(message)), 0) FROM outbox"
        f"  WHERE job_id IN ({jobs_of_mails})) AS n", {"m": mail_ids})
    counted = await cur.fetchone()
    assert counted is not None
    _, size, digests = await _documents_of(cur, mail_ids, dry_run)
    if not dry_run:
        for table in ("outbox", "events"):
            await cur.execute(f"DELETE FROM {table} WHERE job_id IN ({jobs_of_mails})",
                              {"m": mail_ids})
        await cur.execute("DELETE FROM jobs WHERE mail_id = ANY(%s)", (mail_ids,))
        await _drop_documents(cur, mail_ids, digests)
        await cur.execute("DELETE FROM mails WHERE id = ANY(%s)", (mail_ids,))
    return Purged("history", int(counted["jobs"]), size + int(counted["n"])), last, scanned


# Either partial index finds a range of buckets: folded rows, and deltas not folded yet.
_TOTALS_IN = """((folded AND bucket > %(after)s AND bucket {to} %(edge)s)
    OR (NOT folded AND bucket > %(after)s AND bucket {to} %(edge)s))"""


async def _purge_quota_totals(cur: Cursor, before: datetime, after: Key, limit: int,
                              dry_run: bool) -> tuple[Purged, Key, int]:
    """The service-wide quotas' totals of the 300 s ending before ``before`` (buckets after
    ``after``), folded or not: no quota window reaches back that far (QUOTA_TOTALS_DAYS)."""
    await cur.execute(
        f"SELECT DISTINCT bucket FROM job_created_totals WHERE {_TOTALS_IN.format(to='<')}"
        " ORDER BY bucket LIMIT %(n)s",
        {"after": after[0], "edge": int(before.timestamp() // 300), "n": limit})
    buckets = [int(row["bucket"]) for row in await cur.fetchall()]
    if buckets and not dry_run:
        await cur.execute(f"DELETE FROM job_created_totals WHERE {_TOTALS_IN.format(to='<=')}",
                          {"after": after[0], "edge": buckets[-1]})
    return (Purged("quota_totals", len(buckets)), (buckets[-1],) if buckets else after,
            len(buckets))


PurgeBatch = Callable[[Cursor, datetime, Key, int, bool], Awaitable[tuple[Purged, Key, int]]]
PURGE_BATCHES: dict[PurgeKind, tuple[tuple[PurgeBatch, Key], ...]] = {
    "documents": ((_purge_documents, (EPOCH, "")),),
    "received_faxes": ((_purge_received_images, (EPOCH, "", "")),),
    "outbox": ((_outbox_purge("outbox"), (0,)),),
    "dsn": ((_outbox_purge("dsn"), (0,)),),
    "history": ((_purge_job_history, (EPOCH, "")), (_purge_fax_history, (EPOCH, "", ""))),
    "quota_totals": ((_purge_quota_totals, (-(2**62),)),),
}


class PostgresStore:
    """The :class:`~mailfax.store.base.Store` on PostgreSQL (any number of instances)."""

    def __init__(self, url: str, *, min_connections: int = 1, max_connections: int = 10,
                 listen: bool = True):
        self.url = url
        self.min_connections = min_connections
        self.max_connections = max_connections
        self.listen = listen
        self._pool: AsyncConnectionPool | None = None
        self._work = asyncio.Event()
        self._listening = asyncio.Event()
        self._listener: asyncio.Task[None] | None = None
        # Called with the job ids that another instance (or this one) announced as submitted.
        self.on_announced: Callable[[list[str]], None] = lambda job_ids: None

    # -- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        await migrate(self.url)
        pool = AsyncConnectionPool(self.url, min_size=self.min_connections,
                                   max_size=self.max_connections, open=False,
                                   name="mailfax-store", kwargs={"autocommit": True})
        await pool.open(wait=True, timeout=30)
        self._pool = pool
        if self.listen:
            self._listener = asyncio.create_task(self._listen(), name="mailfax-store-listen")
            # Do not miss a NOTIFY sent right after open(): wait until LISTEN took effect.
            await wait_for_event(self._listening, 10)

    async def close(self) -> None:
        if self._listener is not None:
            await cancel_and_wait(self._listener)
            self._listener = None
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    @contextlib.asynccontextmanager
    async def _cursor(self, atomic: bool = True) -> AsyncIterator[psycopg.AsyncCursor[DictRow]]:
        """A cursor in a transaction of its own, committed when the block ends without error.

        ``atomic=False`` is for one statement on its own (atomic by itself): it saves the
        BEGIN and COMMIT round trips.
        """
        if self._pool is None:
            raise RuntimeError("store is not open")
        async with self._pool.connection() as conn:
            if not atomic:
                async with conn.cursor(row_factory=dict_row) as cur:
                    yield cur
                return
            async with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
                yield cur

    # -- work notification ---------------------------------------------------------------------

    async def _listen(self) -> None:
        """LISTEN on a connection of its own; reconnect when it drops."""
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                        self.url, autocommit=True) as conn:
                    await conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    await conn.execute(f"LISTEN {SUBMITTED_CHANNEL}")
                    self._listening.set()
                    async for notify in conn.notifies():
                        if notify.channel == SUBMITTED_CHANNEL:
                            self.on_announced(notify.payload.split(","))
                        else:
                            self._work.set()
            except psycopg.Error as error:
                log.warning("store notification listener: %s; reconnecting", error)
                self._work.set()  # something may have been missed: let the caller look
                await asyncio.sleep(1.0)

    async def wait_for_work(self, timeout: float) -> None:  # noqa: ASYNC109 (a wait, not a limit)
        """Return after ``timeout`` seconds, or earlier when an instance added or freed jobs.

        A wake-up only says "look again"; a NOTIFY that came while nobody waited is kept for
        the next call, so none is lost between a claim and the wait that follows it.
        """
        await wait_for_event(self._work, timeout)
        self._work.clear()

    async def announce_submitted(self, job_ids: Sequence[str]) -> None:
        """Tell every instance (``on_announced``) that these jobs reached their provider: the
        one running the status tracker then polls them soon, as it does its own."""
        payloads: list[str] = []
        for job_id in job_ids:
            if payloads and len(payloads[-1]) + len(job_id) < NOTIFY_PAYLOAD_MAX:
                payloads[-1] += "," + job_id
            else:
                payloads.append(job_id)
        async with self._cursor() as cur:
            for payload in payloads:
                await cur.execute("SELECT pg_notify(%s, %s)", (SUBMITTED_CHANNEL, payload))

    # -- singletons --------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def singleton(self, name: str) -> AsyncIterator[asyncio.Event]:
        """Wait until this instance is the one that runs ``name``; hold it for the block.

        The turn is a session-level ``pg_try_advisory_lock`` on a connection of its own, tried
        every few seconds. If this instance dies, its connection closes and the server frees
        the lock, so another instance's next try takes it. The event yielded is set when the
        connection is lost (the lock may be someone else's by then): stop the work at once.
        """
        key = int.from_bytes(hashlib.sha256(f"mailfax singleton {name}".encode()).digest()[:8],
                             "big", signed=True)
        conn = await self._acquire_singleton(name, key)
        lost = asyncio.Event()
        watcher = asyncio.create_task(self._watch_singleton(name, conn, lost),
                                      name=f"mailfax-singleton-{name}")
        try:
            yield lost
        finally:
            await cancel_and_wait(watcher)
            with contextlib.suppress(psycopg.Error, OSError):
                await conn.close()  # frees the lock

    async def _acquire_singleton(self, name: str, key: int) -> psycopg.AsyncConnection[Any]:
        conn: psycopg.AsyncConnection[Any] | None = None
        waiting_logged = False
        try:
            while True:
                try:
                    if conn is None or conn.closed:
                        conn = await psycopg.AsyncConnection.connect(
                            self.url, autocommit=True, keepalives=1, keepalives_idle=5,
                            keepalives_interval=2, keepalives_count=3)
                    cursor = await conn.execute("SELECT pg_try_advisory_lock(%s)", (key,))
                    row = await cursor.fetchone()
                    if row is not None and row[0]:
                        log.info("this instance now runs %s", name)
                        return conn
                    if not waiting_logged:
                        log.info("%s runs on another instance; taking over if it stops", name)
                        waiting_logged = True
                except (psycopg.Error, OSError) as error:
                    log.warning("singleton %s: %s; retrying", name, error)
                    if conn is not None:
                        with contextlib.suppress(psycopg.Error, OSError):
                            await conn.close()
                    conn = None
                await asyncio.sleep(SINGLETON_RETRY_SECONDS)
        except BaseException:
            if conn is not None:
                with contextlib.suppress(psycopg.Error, OSError):
                    await conn.close()
            raise

    @staticmethod
    async def _watch_singleton(name: str, conn: psycopg.AsyncConnection[Any],
                               lost: asyncio.Event) -> None:
        while True:
            await asyncio.sleep(SINGLETON_CHECK_SECONDS)
            try:
                async with asyncio.timeout(SINGLETON_CHECK_SECONDS * 5):
                    await conn.execute("SELECT 1")
            except (psycopg.Error, OSError, TimeoutError) as error:
                log.warning("lost the database connection that holds %s: %s", name, error)
                lost.set()
                return

    # -- intake ------------------------------------------------------------------------------

    async def add_mail_jobs(
        self, mail: NewMail, jobs: Sequence[NewJob], documents: Sequence[FaxDocument],
        quotas: Sequence[Quota] = (),
    ) -> None:
        pages = sum(document.pages for document in documents)
        async with self._cursor() as cur:
            await cur.execute(
                """
                INSERT INTO mails (id, received_at, envelope_from, message_id, subject, refs,
                                   from_header, client_address, auto_submitted, precedence,
                                   language)
                VALUES (%s, now(), %s, %s, %s, %s, %s, %s, %s, %s, %s)
                """,
                (mail.mail_id, mail.envelope_from, mail.message_id, mail.subject,
                 Jsonb(mail.references), mail.from_header, mail.client_address,
                 mail.auto_submitted, mail.precedence, mail.language),
            )
            digests = [sha256_of(d.data) for d in documents]
            await cur.executemany(  # pipelined: one round trip for all rows; a document in
                # its file is read once, into the query (PostgreSQL's bytea is one value)
                "INSERT INTO blobs (sha256, data) VALUES (%s, %s) ON CONFLICT DO NOTHING",
                list(dict(zip(digests, (memoryview(d.data) for d in documents),
                              strict=True)).items()),
            )
            await cur.executemany(
                """
                INSERT INTO documents (mail_id, position, filename, content_type, pages, blob)
                VALUES (%s, %s, %s, %s, %s, %s)
                """,
                [(mail.mail_id, position, d.filename, d.content_type, d.pages, digest)
                 for position, (d, digest) in enumerate(zip(documents, digests, strict=True))],
            )
            if quotas:  # locked from here to the commit: not while the documents go in
                await _check_quotas(cur, quotas, len(jobs), pages)
            await cur.executemany(
                """
                INSERT INTO jobs (id, mail_id, account, number, state, pages, sender,
                                  created, updated, next_attempt_at, options, priority)
                VALUES (%s, %s, %s, %s, %s, %s, %s, now(), now(),
                        COALESCE(%s::timestamptz, now()), %s, %s)
                """,
                [(job.job_id, mail.mail_id, job.account, job.number, JobState.QUEUED.value,
                  pages, mail.envelope_from, job.hold_until, Jsonb(job.options),
                  priority_rank(job.options))
                 for job in jobs],
            )
            await cur.executemany(
                """
                INSERT INTO events (job_id, at, state, detail, notify)
                VALUES (%s, now(), %s, 'accepted', true)
                """,
                [(job.job_id, JobState.QUEUED.value) for job in jobs],
            )
            if jobs:
                await cur.execute(f"NOTIFY {NOTIFY_CHANNEL}")  # delivered at commit

    async def record_readiness(self, verdict: ReadinessVerdict) -> list[str]:
        marks: dict[str, Any] = {"readiness": verdict.outcome}
        if verdict.findings:
            marks["warnings"] = list(verdict.findings)
        async with self._cursor(atomic=False) as cur:  # one statement: atomic by itself
            await cur.execute(
                """
                WITH recorded AS (
                    UPDATE jobs SET options = options || %(marks)s,
                        next_attempt_at = CASE WHEN state = 'queued' AND attempts = 0
                            AND lease_owner IS NULL AND provider_job_id IS NULL
                            THEN COALESCE(%(release)s::timestamptz, now())
                            ELSE next_attempt_at END
                    WHERE id = ANY(%(ids)s) AND options->>'readiness' = 'pending'
                    RETURNING id, state),
                logged AS (  -- no acceptance mail for a job its sender cancelled
                    INSERT INTO events (job_id, at, state, detail, notify)
                    SELECT id, now(), %(queued)s, %(detail)s, %(notify)s FROM recorded
                    WHERE state <> %(cancelled)s)
                SELECT id FROM recorded
                """,
                {"marks": Jsonb(marks), "release": verdict.release_at,
                 "ids": list(verdict.job_ids), "queued": JobState.QUEUED.value,
                 "cancelled": JobState.CANCELLED.value, "detail": verdict.detail,
                 "notify": verdict.notify})
            recorded = [row["id"] for row in await cur.fetchall()]
            if recorded:  # other instances' dispatchers: jobs may be due now
                await cur.execute(f"NOTIFY {NOTIFY_CHANNEL}")
        return recorded

    async def pending_readiness(self, limit: int) -> list[Job]:
        async with self._cursor(atomic=False) as cur:
            await cur.execute(
                """
                SELECT * FROM jobs
                WHERE state = 'queued' AND provider_job_id IS NULL
                  AND options->>'readiness' = 'pending'
                ORDER BY created LIMIT %s
                """, (limit,))
            return [_job(row) for row in await cur.fetchall()]

    async def get_mail(self, mail_id: str) -> Mail | None:
        async with self._cursor(atomic=False) as cur:
            await cur.execute("SELECT * FROM mails WHERE id = %s", (mail_id,))
            row = await cur.fetchone()
        return None if row is None else _mail(row)

    async def get_mails(self, mail_ids: Sequence[str]) -> list[Mail]:
        if not mail_ids:
            return []
        async with self._cursor(atomic=False) as cur:
            await cur.execute("SELECT * FROM mails WHERE id = ANY(%s)", (list(mail_ids),))
            return [_mail(row) for row in await cur.fetchall()]

    async def load_documents(self, mail_id: str, spool: Path | None = None
                             ) -> list[FaxDocument]:
        if self._pool is None:
            raise RuntimeError("store is not open")
        async with self._pool.connection() as conn:
            cursor = conn.cursor(row_factory=dict_row)
            await cursor.execute(MAILS_BY_ID, {"mail_ids": [mail_id]})
            _, documents, large = _subjects_and_documents(await cursor.fetchall())
            await read_large_documents(conn, documents, large, spool)
        return documents.get(mail_id, [])

    # -- dispatcher --------------------------------------------------------------------------

    async def claim_work(self, owner: str, limit: int, lease_seconds: float,
                         account_limits: Mapping[str, int],
                         finished: Sequence[Outcome] = (),
                         rules: ClaimRules = DEFAULT_RULES,
                         spool: Path | None = None) -> list[Work]:
        """One pipeline, so one round trip: the claim lock, the outcomes, the claim, the
        claimed jobs' mails and documents (but a large document is read after it, in
        pieces, into a file in ``spool``).

        The statements are one transaction without BEGIN and COMMIT: in pipeline mode
        PostgreSQL runs everything up to the pipeline's Sync as one implicit transaction
        (committed at the Sync, rolled back whole if a statement fails), and psycopg sends
        the Sync when the block ends (``test_store`` checks that it does not sync earlier).
        psycopg's ``transaction()`` inside a pipeline syncs at its start and end: two more
        round trips, which cost a third of the dispatcher's CPU in bench/dispatch.py.

        The lock is held only while the server runs the statements. It is taken before the
        outcomes are recorded: recording locks the finished jobs' rows, and a claim holding
        the lock may wait for one of them (a lease that ran out), so taking it last could
        deadlock. Reading the documents under the lock costs other instances' claims the
        time to read them; a fax's documents are small beside the round trip saved.

        The outcomes are recorded in job id order, the order renew_leases() locks its rows
        in: the two run side by side on the same jobs, and in any other order they deadlock
        (seen in bench/dispatch.py)."""
        if self._pool is None:
            raise RuntimeError("store is not open")
        async with self._pool.connection() as conn:
            async with conn.pipeline():  # one implicit transaction: see above
                await conn.execute(LOCK_FOR_CLAIM, (CLAIM_LOCK,))
                recorded = await _queue_records(conn, finished)
                claim = conn.cursor(row_factory=dict_row)
                await _claim_limited(claim, owner, limit, lease_seconds, account_limits,
                                     rules)
                mails = conn.cursor(row_factory=dict_row)
                await mails.execute(MAILS_OF_THIS_CLAIM,
                                    {"owner": owner, "lease": float(lease_seconds)})
            jobs = _sorted_jobs(await claim.fetchall())
            subjects, documents, large = _subjects_and_documents(await mails.fetchall())
            await _recorded(recorded, finished)
            await read_large_documents(conn, documents, large, spool)
        return group_work(jobs, subjects, documents)

    async def renew_leases(self, owner: str, job_ids: Sequence[str],
                           lease_seconds: float) -> int:
        if not job_ids:
            return 0
        async with self._cursor() as cur:
            await cur.execute(
                """
                WITH mine AS (
                    SELECT id FROM jobs
                    WHERE id = ANY(%(ids)s) AND lease_owner = %(owner)s
                      AND state IN ('queued', 'retrying')
                    ORDER BY id
                    FOR UPDATE
                )
                UPDATE jobs SET lease_until = now() + make_interval(secs => %(lease)s)
                FROM mine WHERE jobs.id = mine.id
                """,
                {"lease": float(lease_seconds), "ids": list(job_ids), "owner": owner},
            )
            return cur.rowcount

    async def release_leases(self, owner: str | None = None) -> int:
        async with self._cursor() as cur:
            await cur.execute(
                """
                UPDATE jobs SET lease_owner = NULL, lease_until = NULL
                WHERE lease_owner IS NOT NULL
                  AND (%(owner)s::text IS NULL OR lease_owner = %(owner)s::text)
                """,
                {"owner": owner},
            )
            released = cur.rowcount
            if released:
                await cur.execute(f"NOTIFY {NOTIFY_CHANNEL}")
        return released

    async def next_due_time(self, rules: ClaimRules = DEFAULT_RULES) -> datetime | None:
        async with self._cursor(atomic=False) as cur:
            await cur.execute(
                """
                SELECT min(greatest(next_attempt_at, lease_until, (
                           SELECT not_before FROM number_backoff b
                           WHERE b.number = jobs.number))) AS due
                FROM jobs
                WHERE state IN ('queued', 'retrying') AND provider_job_id IS NULL
                  AND next_attempt_at IS NOT NULL
                """ + _held_by_rules(rules),
                {"held": sorted(rules.held_priorities)},
            )
            row = await cur.fetchone()
        return _utc(row["due"]) if row else None

    async def number_busy(self, number: str, backoff_seconds: Sequence[float]) -> datetime:
        async with self._cursor() as cur:
            await cur.execute(
                "SELECT extract(epoch FROM now()) AS now, b.busy_count,"
                " extract(epoch FROM b.not_before) AS not_before FROM (SELECT 1) one"
                " LEFT JOIN LATERAL (SELECT * FROM number_backoff WHERE number = %s"
                " FOR UPDATE) b ON true", (number,))
            row = await cur.fetchone()
            assert row is not None
            previous = (None if row["busy_count"] is None
                        else (int(row["busy_count"]), float(row["not_before"])))
            count, not_before = busy_step(previous, float(row["now"]), backoff_seconds)
            await cur.execute(
                "INSERT INTO number_backoff (number, not_before, busy_count)"
                " VALUES (%s, to_timestamp(%s), %s) ON CONFLICT (number) DO UPDATE"
                " SET not_before = excluded.not_before, busy_count = excluded.busy_count",
                (number, not_before, count))
        return datetime.fromtimestamp(not_before, UTC)

    async def record(self, job_id: str, transition: Transition,
                     expected: Sequence[JobState] | None = None) -> bool:
        async with self._cursor(atomic=False) as cur:
            await cur.execute(RECORD_SQL, _record_parameters(job_id, transition, expected))
            return _record_verdict(await cur.fetchone(), job_id, transition, expected)

    async def record_all(self, outcomes: Sequence[Outcome]) -> list[bool]:
        """One pipeline, one implicit transaction (as :meth:`claim_work`), the rows locked in
        job id order (as renew_leases locks them)."""
        if not outcomes:
            return []
        if self._pool is None:
            raise RuntimeError("store is not open")
        async with self._pool.connection() as conn:
            async with conn.pipeline():
                cursors = await _queue_records(conn, outcomes)
            return await _recorded(cursors, outcomes)

    # -- tracker -----------------------------------------------------------------------------

    async def tracked_jobs(self, account: str) -> list[Job]:
        states = [s.value for s in (*TRACKED_STATES, JobState.RETRYING)]
        async with self._cursor() as cur:
            await cur.execute(
                """
                SELECT * FROM jobs
                WHERE account = %s AND provider_job_id IS NOT NULL AND state = ANY(%s)
                """,
                (account, states),
            )
            return [_job(row) for row in await cur.fetchall()]

    async def lost_answers_before(self, before: datetime, limit: int) -> list[Job]:
        # Literals, as in jobs_answer_lost's WHERE: a parameter would keep a generic plan
        # off the partial index.
        async with self._cursor(atomic=False) as cur:
            await cur.execute(
                """
                SELECT * FROM jobs
                WHERE state = 'unconfirmed' AND reason->>'code' = 'answer_lost'
                  AND updated < %s
                ORDER BY updated, id LIMIT %s
                """, (before, limit))
            return [_job(row) for row in await cur.fetchall()]

    async def reopen_job(self, job_id: str, detail: str) -> Job | None:
        async with self._cursor() as cur:
            await cur.execute(
                """
                UPDATE jobs SET state = 'queued', updated = now(), next_attempt_at = now(),
                    attempts = 0, provider_job_id = NULL, cancel_requested = false,
                    acknowledged = false, lease_owner = NULL, lease_until = NULL
                WHERE id = %s AND state = ANY(%s) RETURNING *
                """, (job_id, [state.value for state in RETRYABLE_STATES]))
            row = await cur.fetchone()
            if row is not None:
                await cur.execute(
                    "INSERT INTO events (job_id, at, state, reason, detail, notify)"
                    " VALUES (%s, now(), 'queued', NULL, %s, false)", (job_id, detail))
                await cur.execute(f"NOTIFY {NOTIFY_CHANNEL}")  # delivered at commit
                return _job(row)
            await cur.execute("SELECT * FROM jobs WHERE id = %s", (job_id,))
            row = await cur.fetchone()
        return _job(row) if row else None

    async def unacknowledged_final_jobs(self, account: str, limit: int) -> list[Job]:
        async with self._cursor() as cur:
            await cur.execute(
                """
                SELECT * FROM jobs j
                WHERE account = %s AND NOT acknowledged
                  AND provider_job_id IS NOT NULL AND state = ANY(%s)
                  AND NOT EXISTS (SELECT 1 FROM events e WHERE e.job_id = j.id AND e.notify)
                  AND NOT EXISTS (SELECT 1 FROM outbox o
                                  WHERE o.job_id = j.id AND o.state = 'pending')
                LIMIT %s
                """,
                (account, FINAL, limit),
            )
            return [_job(row) for row in await cur.fetchall()]

    async def mark_acknowledged(self, job_ids: Sequence[str]) -> None:
        async with self._cursor() as cur:
            await cur.execute("UPDATE jobs SET acknowledged = true WHERE id = ANY(%s)",
                              (list(job_ids),))

    # -- queries -----------------------------------------------------------------------------

    async def get_job(self, job_id: str) -> Job | None:
        async with self._cursor(atomic=False) as cur:
            await cur.execute("SELECT * FROM jobs WHERE id = %s", (job_id,))
            row = await cur.fetchone()
        return _job(row) if row else None

    async def get_jobs(self, job_ids: Sequence[str]) -> list[Job]:
        async with self._cursor(atomic=False) as cur:
            await cur.execute("SELECT * FROM jobs WHERE id = ANY(%s)", (list(job_ids),))
            return [_job(row) for row in await cur.fetchall()]

    async def open_jobs(self, mail_id: str) -> int:
        async with self._cursor(atomic=False) as cur:
            await cur.execute("SELECT count(*) AS n FROM jobs WHERE mail_id = %s"
                              " AND NOT state = ANY(%s)", (mail_id, ENDED))
            row = await cur.fetchone()
            return int(row["n"]) if row else 0

    async def last_summary_at(self, mail_id: str) -> datetime | None:
        async with self._cursor(atomic=False) as cur:
            await cur.execute(
                "SELECT max(o.created) AS at FROM outbox o JOIN jobs j ON o.job_id = j.id"
                " WHERE j.mail_id = %s AND o.kind = 'summary'", (mail_id,))
            row = await cur.fetchone()
            at: datetime | None = row["at"] if row else None
            return at

    async def mail_jobs(self, mail_id: str) -> list[Job]:
        async with self._cursor(atomic=False) as cur:
            await cur.execute("SELECT * FROM jobs WHERE mail_id = %s ORDER BY created, id",
                              (mail_id,))
            return [_job(row) for row in await cur.fetchall()]

    async def list_jobs(self, limit: int = 1000, state: JobState | None = None) -> list[Job]:
        async with self._cursor() as cur:
            await cur.execute(
                """
                SELECT * FROM jobs
                WHERE %(state)s::text IS NULL OR state = %(state)s::text
                ORDER BY created DESC, id
                LIMIT %(limit)s
                """,
                {"state": state.value if state else None, "limit": limit},
            )
            return [_job(row) for row in await cur.fetchall()]

    async def usage_since(self, since: datetime, senders: Sequence[str] | None = None
                          ) -> tuple[int, int]:
        """(jobs, pages) created since ``since`` by these envelope senders (``"@domain"`` for a
        whole domain; None: everyone); for quotas."""
        async with self._cursor(atomic=False) as cur:
            if senders is None:  # from the kept totals: these count jobs purged since too
                await cur.execute(service_usage_sql("%(since)s::timestamptz"), {"since": since})
            else:
                await cur.execute(senders_usage_sql("%(since)s::timestamptz", senders),
                                  {"since": since, **_usage_parameters(senders)})
            row = await cur.fetchone()
        return (int(row["jobs"]), int(row["pages"])) if row else (0, 0)

    async def job_events(self, job_id: str) -> list[Event]:
        async with self._cursor(atomic=False) as cur:
            await cur.execute("SELECT * FROM events WHERE job_id = %s ORDER BY id", (job_id,))
            return [_event(row) for row in await cur.fetchall()]

    async def request_cancel(self, job_id: str) -> Job | None:
        async with self._cursor() as cur:
            await cur.execute(
                "UPDATE jobs SET cancel_requested = true WHERE id = %s RETURNING *", (job_id,))
            row = await cur.fetchone()
        return _job(row) if row else None

    async def clear_cancel_request(self, job_id: str) -> None:
        async with self._cursor() as cur:
            await cur.execute("UPDATE jobs SET cancel_requested = false WHERE id = %s",
                              (job_id,))

    # -- notifications and outbox -----------------------------------------------------------

    async def pending_notifications(self, limit: int) -> list[Event]:
        async with self._cursor() as cur:
            await cur.execute("SELECT * FROM events WHERE notify ORDER BY id LIMIT %s", (limit,))
            return [_event(row) for row in await cur.fetchall()]

    @staticmethod
    async def _insert_outbox(cur: psycopg.AsyncCursor[DictRow], mail: OutgoingMail) -> int:
        account, fax_id = mail.inbound or (None, None)
        await cur.execute(
            """
            INSERT INTO outbox (created, job_id, kind, envelope_from, recipients, message,
                                next_attempt_at, inbound_account, inbound_fax_id)
            VALUES (now(), %s, %s, %s, %s, %s, now(), %s, %s)
            RETURNING id
            """,
            (mail.job_id, mail.kind, mail.envelope_from, Jsonb(mail.recipients), mail.message,
             account, fax_id),
        )
        row = await cur.fetchone()
        assert row is not None
        return int(row["id"])

    async def claim_notifications(self, owner: str, limit: int,
                                  lease_seconds: float) -> list[Event]:
        rows = await self._claim_rows("events", "notify", owner, limit, lease_seconds)
        return [_event(row) for row in rows]

    async def _claim_rows(self, table: str, ready: str, owner: str, limit: int,
                          lease_seconds: float) -> list[DictRow]:
        """Lease up to ``limit`` rows of ``table`` (events or outbox) that are ``ready`` and
        not leased to another instance, oldest first (``table`` and ``ready`` are ours, never
        input)."""
        async with self._cursor() as cur:
            await cur.execute(
                f"""
                WITH due AS (
                    SELECT id FROM {table}
                    WHERE {ready} AND (claim_until IS NULL OR claim_until < now()
                                       OR claim_owner = %(owner)s)
                    ORDER BY id
                    LIMIT %(limit)s
                    FOR UPDATE SKIP LOCKED
                )
                UPDATE {table}
                SET claim_owner = %(owner)s,
                    claim_until = now() + make_interval(secs => %(lease)s)
                FROM due
                WHERE {table}.id = due.id
                RETURNING {table}.*
                """,
                {"owner": owner, "limit": limit, "lease": float(lease_seconds)},
            )
            rows = await cur.fetchall()
        return sorted(rows, key=lambda row: int(row["id"]))

    async def complete_notifications(
            self, completed: Sequence[tuple[int, Sequence[OutgoingMail]]]) -> None:
        async with self._cursor() as cur:
            # First, and under the rows' locks: a second instance that handled the same
            # events (their lease ran out meanwhile) finds them done and adds nothing.
            await cur.execute(
                """
                UPDATE events SET notify = false, claim_owner = NULL, claim_until = NULL
                WHERE notify AND id IN (SELECT id FROM events WHERE id = ANY(%s) AND notify
                                        ORDER BY id FOR UPDATE)
                RETURNING id
                """,
                ([event_id for event_id, _ in completed],),
            )
            done = {int(row["id"]) for row in await cur.fetchall()}
            for event_id, mails in completed:
                if event_id in done:
                    for mail in mails:
                        await self._insert_outbox(cur, mail)

    async def enqueue_mail(self, mail: OutgoingMail) -> int:
        async with self._cursor() as cur:
            return await self._insert_outbox(cur, mail)

    async def spool_mail(self, envelope_from: str, recipients: Sequence[str], client: str,
                         user: str | None, message: bytes) -> int:
        async with self._cursor(atomic=False) as cur:
            await cur.execute(
                "INSERT INTO accept_spool (envelope_from, recipients, client, user_name, message)"
                " VALUES (%s, %s, %s, %s, %s) RETURNING id",
                (envelope_from, Jsonb(list(recipients)), client, user, message))
            row = await cur.fetchone()
        assert row is not None
        return int(row["id"])

    async def claim_spooled(self, limit: int, lease_seconds: float) -> list[SpooledMail]:
        async with self._cursor(atomic=False) as cur:
            await cur.execute(
                """
                UPDATE accept_spool SET leased_until = now() + make_interval(secs => %s)
                WHERE id IN (SELECT id FROM accept_spool WHERE leased_until <= now()
                             ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED)
                RETURNING *
                """,
                (lease_seconds, limit))
            rows = await cur.fetchall()
        return sorted((SpooledMail(
            id=row["id"], received_at=row["received_at"], envelope_from=row["envelope_from"],
            recipients=list(row["recipients"]), client=row["client"], user=row["user_name"],
            message=bytes(row["message"])) for row in rows), key=lambda mail: mail.id)

    async def unspool_mail(self, spool_id: int) -> None:
        async with self._cursor(atomic=False) as cur:
            await cur.execute("DELETE FROM accept_spool WHERE id = %s", (spool_id,))

    async def status_mails_since(self, recipient: str, since: datetime) -> int:
        async with self._cursor(atomic=False) as cur:
            await cur.execute(
                """
                SELECT count(*) AS n FROM outbox
                WHERE job_id IS NOT NULL AND kind <> 'dsn'
                  AND lower(recipients->>0) = lower(%s) AND created >= %s
                """,
                (recipient, since),
            )
            row = await cur.fetchone()
        return int(row["n"]) if row else 0

    async def due_outbox(self, limit: int) -> list[OutboxItem]:
        async with self._cursor() as cur:
            await cur.execute(
                """
                SELECT * FROM outbox
                WHERE state = 'pending' AND next_attempt_at <= now()
                ORDER BY id
                LIMIT %s
                """,
                (limit,),
            )
            rows = await cur.fetchall()
        return [_outbox_item(row) for row in rows]

    async def claim_outbox(self, owner: str, limit: int, lease_seconds: float
                           ) -> list[OutboxItem]:
        rows = await self._claim_rows(
            "outbox", "state = 'pending' AND next_attempt_at <= now()", owner, limit,
            lease_seconds)
        return [_outbox_item(row) for row in rows]

    async def outbox_sent(self, item_id: int) -> None:
        async with self._cursor() as cur:
            await cur.execute(
                """
                UPDATE outbox SET state = 'sent', attempts = attempts + 1, last_error = NULL,
                                  claim_owner = NULL, claim_until = NULL
                WHERE id = %s
                """,
                (item_id,),
            )

    async def outbox_retry(self, item_id: int, next_attempt_at: datetime, error: str) -> None:
        async with self._cursor() as cur:
            await cur.execute(
                """
                UPDATE outbox SET attempts = attempts + 1, next_attempt_at = %s, last_error = %s,
                                  claim_owner = NULL, claim_until = NULL
                WHERE id = %s
                """,
                (next_attempt_at, error[:1000], item_id),
            )

    async def outbox_give_up(self, item_id: int, error: str) -> None:
        async with self._cursor() as cur:
            await cur.execute(
                """
                UPDATE outbox SET state = 'failed', attempts = attempts + 1, last_error = %s,
                                  claim_owner = NULL, claim_until = NULL
                WHERE id = %s
                """,
                (error[:1000], item_id),
            )

    async def outbox_next_due(self) -> datetime | None:
        async with self._cursor() as cur:
            await cur.execute(
                "SELECT min(next_attempt_at) AS due FROM outbox WHERE state = 'pending'")
            row = await cur.fetchone()
        return _utc(row["due"]) if row else None

    async def outbox_depth(self) -> int:
        async with self._cursor(atomic=False) as cur:
            await cur.execute("SELECT count(*) AS n FROM outbox WHERE state = 'pending'")
            row = await cur.fetchone()
        return int(row["n"]) if row else 0

    async def probe_write(self) -> None:
        # A real row written again as it is (schema_migrations' first: always there, and no
        # job's): refused by a read-only transaction or a standby, and its WAL record is
        # flushed at commit, so a full disk fails it as it would any other write.
        async with self._cursor(atomic=False) as cur:
            await cur.execute(
                "UPDATE schema_migrations SET version = version"
                " WHERE version = (SELECT min(version) FROM schema_migrations)")

    async def counts(self) -> dict[str, dict[str, int]]:
        result: dict[str, dict[str, int]] = {}
        async with self._cursor() as cur:
            # Fold the triggers' +1/-1 rows (those this statement sees: a concurrent fold
            # skips the rows this one deleted) into one row per state, then read them.
            await cur.execute("""
                WITH folded AS (DELETE FROM job_state_counts RETURNING state, jobs)
                INSERT INTO job_state_counts
                SELECT state, sum(jobs) FROM folded GROUP BY state HAVING sum(jobs) <> 0
                """)
            await cur.execute(FOLD_TOTALS_SQL)  # the quotas' totals: also without quotas
            await cur.execute("SELECT state, sum(jobs) AS n FROM job_state_counts"
                              " GROUP BY state HAVING sum(jobs) <> 0")
            result["jobs"] = {str(row["state"]): int(row["n"]) for row in await cur.fetchall()}
            await cur.execute("SELECT state, count(*) AS n FROM inbound_faxes GROUP BY state")
            result["inbound"] = {str(row["state"]): int(row["n"])
                                 for row in await cur.fetchall()}
        return result

    # -- received faxes ----------------------------------------------------------------------

    async def add_inbound_fax(self, account: str, fax: InboundFax) -> InboundRecord:
        async with self._cursor() as cur:
            await cur.execute(
                """
                INSERT INTO inbound_faxes (account, fax_id, fetched_at, called_number,
                                           received_at, originator, remote_id, pages, image)
                VALUES (%s, %s, now(), %s, %s, %s, %s, %s, %s)
                ON CONFLICT (account, fax_id) DO NOTHING
                """,
                (account, fax.fax_id, fax.called_number, fax.received_at, fax.originator,
                 fax.remote_id, fax.pages, fax.image),
            )
            await cur.execute(
                f"SELECT {_INBOUND_COLUMNS} FROM inbound_faxes"
                " WHERE account = %s AND fax_id = %s",
                (account, fax.fax_id),
            )
            row = await cur.fetchone()
        assert row is not None
        return _inbound(row)

    async def inbound_image(self, account: str, fax_id: str) -> bytes:
        async with self._cursor() as cur:
            await cur.execute(
                "SELECT image FROM inbound_faxes WHERE account = %s AND fax_id = %s",
                (account, fax_id),
            )
            row = await cur.fetchone()
        if row is None:
            raise KeyError(fax_id)
        return bytes(row["image"])

    async def queue_inbound_mails(self, account: str, fax_id: str,
                                  mails: Sequence[OutgoingMail], pages: int | None = None
                                  ) -> None:
        async with self._cursor() as cur:
            for mail in mails:
                await self._insert_outbox(cur, mail)
            await cur.execute(
                """
                UPDATE inbound_faxes SET deliveries = deliveries + 1,
                    state = CASE state WHEN 'deleted' THEN 'deleted' ELSE 'queued' END,
                    pages = COALESCE(%s::integer, pages)
                WHERE account = %s AND fax_id = %s
                """,
                (pages, account, fax_id),
            )

    async def inbound_handoff(self, account: str, fax_id: str) -> Handoff:
        async with self._cursor(atomic=False) as cur:
            await cur.execute(
                """
                SELECT count(*) FILTER (WHERE state = 'sent') AS sent,
                       count(*) FILTER (WHERE state = 'pending') AS pending,
                       count(*) FILTER (WHERE state = 'failed') AS failed
                FROM outbox
                WHERE inbound_account = %s AND inbound_fax_id = %s
                """,
                (account, fax_id),
            )
            row = await cur.fetchone()
        assert row is not None  # an aggregate always has its row
        return handoff_of(row["sent"], row["pending"], row["failed"])

    async def mark_inbound_deleted(self, account: str, fax_id: str) -> None:
        async with self._cursor() as cur:
            await cur.execute(
                "UPDATE inbound_faxes SET state = 'deleted' WHERE account = %s AND fax_id = %s",
                (account, fax_id),
            )

    async def mark_inbound_screened(self, account: str, fax_id: str, state: str) -> None:
        async with self._cursor() as cur:
            await cur.execute(
                "UPDATE inbound_faxes SET state = %s WHERE account = %s AND fax_id = %s",
                (state, account, fax_id),
            )

    async def list_inbound(self, limit: int = 1000) -> list[InboundRecord]:
        async with self._cursor() as cur:
            await cur.execute(
                f"SELECT {_INBOUND_COLUMNS} FROM inbound_faxes"
                " ORDER BY received_at DESC LIMIT %s",
                (limit,),
            )
            return [_inbound(row) for row in await cur.fetchall()]

    async def find_inbound(self, fax_id: str) -> list[InboundRecord]:
        async with self._cursor() as cur:
            await cur.execute(
                f"SELECT {_INBOUND_COLUMNS} FROM inbound_faxes WHERE fax_id = %s", (fax_id,))
            return [_inbound(row) for row in await cur.fetchall()]

    # -- retention -------------------------------------------------------------------------

    async def purge(self, kind: PurgeKind, before: datetime, *, dry_run: bool = False,
                    batch_size: int = 200) -> Purged:
        total = Purged(kind)
        for batch, start in PURGE_BATCHES[kind]:
            after = start
            while True:
                async with self._cursor() as cur:  # one short transaction per batch
                    purged, after, rows = await batch(cur, before, after, batch_size, dry_run)
                total += purged
                if rows < batch_size:
                    break
        return total

    async def reclaim_space(self) -> int:
        return 0  # PostgreSQL's autovacuum makes the space of deleted rows reusable

    @contextlib.asynccontextmanager
    async def retention_lock(self) -> AsyncIterator[bool]:
        """A session-level ``pg_try_advisory_lock`` on a connection of its own: a second
        instance (or ``mailfax purge`` beside ``serve``) is told at once, not made to wait."""
        async with await psycopg.AsyncConnection.connect(self.url, autocommit=True) as conn:
            cursor = await conn.execute("SELECT pg_try_advisory_lock(%s)", (RETENTION_LOCK,))
            row = await cursor.fetchone()
            yield bool(row and row[0])  # closing the connection frees it

    # -- the bundled emulator's fax network -----------------------------------------------

    async def emulator_submit(self, account: str, reference: str, number: str,
                              pages: int) -> tuple[str, bool]:
        async with self._cursor() as cur:
            await cur.execute(
                "INSERT INTO emulator_transmissions (account, provider_job_id, reference, number,"
                " pages, submitted_at) VALUES (%s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (account, reference) DO UPDATE"
                " SET send_calls = emulator_transmissions.send_calls + 1"
                " RETURNING provider_job_id, send_calls",
                (account, new_emulator_job_id(), reference, number, pages, time.time()))
            row = await cur.fetchone()
        assert row is not None
        return str(row["provider_job_id"]), int(row["send_calls"]) > 1

    async def emulator_transmissions(self, account: str, provider_job_ids: Sequence[str]
                                     ) -> dict[str, EmulatedTransmission]:
        async with self._cursor() as cur:
            await cur.execute(
                "SELECT * FROM emulator_transmissions WHERE account = %s"
                " AND provider_job_id = ANY(%s)", (account, list(provider_job_ids)))
            rows = await cur.fetchall()
        return {row["provider_job_id"]: EmulatedTransmission(
            provider_job_id=row["provider_job_id"], reference=row["reference"],
            number=row["number"], pages=row["pages"], submitted_at=row["submitted_at"],
            send_calls=row["send_calls"], cancelled=row["cancelled"]) for row in rows}

    async def emulator_cancel(self, account: str, provider_job_id: str) -> None:
        async with self._cursor() as cur:
            await cur.execute(
                "UPDATE emulator_transmissions SET cancelled = true WHERE account = %s"
                " AND provider_job_id = %s", (account, provider_job_id))


def _outbox_item(row: DictRow) -> OutboxItem:
    inbound = (None if row["inbound_fax_id"] is None
               else (row["inbound_account"], row["inbound_fax_id"]))
    return OutboxItem(id=row["id"], envelope_from=row["envelope_from"],
                      recipients=row["recipients"], message=bytes(row["message"]),
                      attempts=row["attempts"], job_id=row["job_id"], inbound=inbound)
