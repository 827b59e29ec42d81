"""Cost that does not grow with history: intake and dispatch throughput, and the hot queries'
timings, with 0, 100k and 1M finished jobs in the SQLite store.

For each size a fresh store is made with the store's own schema, and the finished jobs are
put in in bulk (one ``INSERT ... SELECT`` from a recursive CTE: delivered, acknowledged, spread
over the past year), not through SMTP. Then, on that store:

* intake: ``--jobs`` mails stored with ``add_mail_jobs`` by 20 concurrent writers, each with a
  per-user and a service quota (the store's part of accepting a mail: the quota counts and the
  inserts, in the one writer thread);
* dispatch: a Dispatcher with the bundled emulator (no send latency, 20 at once) hands those
  jobs over; the rate is jobs per second until the last one is submitted;
* the hot queries, each run ``--repeat`` times (median): the dispatcher's live-lease count,
  ``unacknowledged_final_jobs`` (every full status poll), ``counts()`` (every /metrics
  scrape), ``list_jobs(state=...)`` (``mailfax jobs --state S``).

``--before`` also runs every size with migration 4's indexes dropped and counts taken with
``COUNT(*) ... GROUP BY`` (what main did before migration 4), in the same run. Ratios are to
the empty store of the same variant.

``--recent 0,2000,20000`` runs only intake with quotas on stores holding that many jobs from
the last day (what the service-wide ``pages_per_day`` quota counts), side by side; with
``--postgres`` on PostgreSQL (a server from tests/pg.py, a fresh database per store and
round, ``--writers`` at once), also timing a user's count of the last hour.

    python bench/history.py [--sizes 0,100000,1000000] [--jobs 1000] [--rounds 3] [--before]
    python bench/history.py --recent 0,2000,20000 [--jobs 1000] [--rounds 3]
    python bench/history.py --recent 0,20000 --postgres --writers 1 [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mailfax.config import DispatchSettings  # noqa: E402
from mailfax.model import JobState  # noqa: E402
from mailfax.outbound.dispatch import Dispatcher  # noqa: E402
from mailfax.providers import emulator  # noqa: E402
from mailfax.providers.base import FaxDocument, ProviderContext  # noqa: E402
from mailfax.store.base import NewJob, NewMail, Quota, Store  # noqa: E402
from mailfax.store.sqlite import SqliteStore  # noqa: E402

ACCOUNT = "emu"
PDF = FaxDocument("a.pdf", b"%PDF-1.4 bench", 1)
WRITERS = 20
MIGRATION_4_INDEXES = ("jobs_live_leases", "jobs_unacknowledged", "jobs_state_created",
                       "outbox_job")

FILL_HISTORY = """
INSERT INTO jobs (id, mail_id, account, number, state, pages, sender, created, updated,
                  attempts, provider_job_id, duration, acknowledged)
WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < :count)
SELECT printf('h%08d', i), 'history', :account, '+4930' || (1000000 + i % 9000000), 'delivered',
       1 + i % 5, 'user' || (i % 50) || '@example.org', :now - 86400 - i * (31536000.0 / :count),
       :now - 86400 - i * (31536000.0 / :count) + 120, 1, 'P' || i, 60.0, 1
FROM n
"""


# Jobs from the last day (the service-wide pages_per_day window), spread over 23 hours.
FILL_RECENT = """
INSERT INTO jobs (id, mail_id, account, number, state, pages, sender, created, updated,
                  attempts, provider_job_id, duration, acknowledged)
WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < :count)
SELECT printf('recent%08d', i), 'history', :account, '+4930' || (1000000 + i), 'delivered',
       1 + i % 5, 'user' || (i % 50) || '@example.org', :now - i * (82800.0 / :count),
       :now - i * (82800.0 / :count) + 120, 1, 'R' || i, 60.0, 1
FROM n
"""


def build_history(path: Path, count: int) -> float:
    """``count`` finished jobs of one mail, in one statement; the seconds it took."""
    started = time.perf_counter()
    conn = sqlite3.connect(path)
    with conn:
        now = time.time()
        conn.execute("INSERT INTO mails (id, received_at, envelope_from, message_id, subject,"
                     " refs, from_header, client_address, auto_submitted, precedence, language)"
                     " VALUES ('history', ?, 'history@example.org', NULL, 'history', '[]', '',"
                     " '::1', NULL, NULL, 'en')", (now,))
        if count:
            conn.execute(FILL_HISTORY, {"count": count, "account": ACCOUNT, "now": now})
    conn.close()
    return time.perf_counter() - started


def build_recent(path: Path, count: int) -> None:
    """``count`` jobs created over the last 23 hours, in one statement."""
    build_history(path, 0)
    conn = sqlite3.connect(path)
    with conn:
        if count:
            conn.execute(FILL_RECENT, {"count": count, "account": ACCOUNT, "now": time.time()})
    conn.close()


def copy_store(path: Path, copy: Path) -> Path:
    shutil.copyfile(path, copy)
    return copy


def drop_store(path: Path) -> None:
    for leftover in path.parent.glob(f"{path.name}*"):  # with its -wal and -shm
        leftover.unlink()


async def quota_rows(sizes: Sequence[int], mails: int, rounds: int, repeat: int,
                     folder: Path) -> None:
    """Intake with the quotas (a user's faxes per hour, the service's pages per day) on
    stores holding ``sizes`` jobs from the last day, in alternating rounds; and the service
    quota's count alone."""
    paths = {size: folder / f"recent-{size}.sqlite3" for size in sizes}
    rates: dict[int, list[float]] = {size: [] for size in sizes}
    counts: dict[int, float] = {}
    for size, path in paths.items():
        store = SqliteStore(path)
        await store.open()
        await store.close()
        build_recent(path, size)
    for round_number in range(rounds):
        order = sizes if round_number % 2 == 0 else list(reversed(sizes))
        for size in order:  # each round on a fresh copy: the mails of the last one do not count
            copy = copy_store(paths[size], folder / f"round-{size}.sqlite3")
            store = SqliteStore(copy)
            await store.open()
            try:
                rates[size].append(await intake(store, mails, f"q{round_number}"))
            finally:
                await store.close()
                drop_store(copy)
    for size, path in paths.items():
        store = SqliteStore(path)
        await store.open()
        try:
            counts[size] = await timed(repeat, lambda store=store: store.usage_since(
                datetime.now(UTC) - timedelta(days=1)))
        finally:
            await store.close()
    print(f"\nintake with quotas, {mails} mails per store and round, {rounds} alternating "
          f"rounds (medians); service count: usage_since(1 day), median of {repeat}")
    quota_table(sizes, rates, counts, "count ms")


def quota_table(sizes: Sequence[int], rates: dict[int, list[float]], counts: dict[int, float],
                count_label: str) -> None:
    """Per store: intake's median rate, its ratio to the first store's, a count's time."""
    print(f"{'jobs of last day':>16} {'intake/s':>9} {'ratio':>6} {count_label:>9}")
    base = statistics.median(rates[sizes[0]])
    for size in sizes:
        rate = statistics.median(rates[size])
        print(f"{size:>16,} {rate:>9.0f} {rate / base:>6.2f} {counts[size] * 1000:>9.3f}")


# FILL_RECENT on PostgreSQL (after HISTORY_MAIL_PG): jobs over the last 23 hours.
HISTORY_MAIL_PG = """
INSERT INTO mails (id, received_at, envelope_from, message_id, subject, refs, from_header,
                   client_address, language)
VALUES ('history', now(), 'history@example.org', NULL, 'history', '[]', '', '::1', 'en')
"""
FILL_RECENT_PG = """
INSERT INTO jobs (id, mail_id, account, number, state, pages, sender, created, updated,
                  attempts, provider_job_id, duration, acknowledged)
SELECT 'recent' || i, 'history', %(account)s, '+4930' || (1000000 + i), 'delivered', 1 + i %% 5,
       'user' || (i %% 50) || '@example.org', now() - i * (interval '23 hours' / %(count)s),
       now() - i * (interval '23 hours' / %(count)s) + interval '2 min', 1, 'R' || i, 60.0, true
FROM generate_series(1, %(count)s) AS i
"""


async def postgres_store_with_recent(url: str, count: int) -> Store:
    """An open PostgresStore on ``url`` (migrated) holding ``count`` jobs of the last day."""
    import psycopg

    from mailfax.store.postgres import PostgresStore

    store = PostgresStore(url, listen=False)
    await store.open()
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute(HISTORY_MAIL_PG)
        if count:
            await conn.execute(FILL_RECENT_PG, {"account": ACCOUNT, "count": count})
        await conn.execute("VACUUM ANALYZE")  # what autovacuum does after such a bulk insert
    return store


async def postgres_quota_rows(sizes: Sequence[int], mails: int, rounds: int, repeat: int,
                              writers: int) -> None:
    """:func:`quota_rows` on PostgreSQL, with a user's count of the last hour timed after
    each store's last round (the quota check intake runs for that user)."""
    from tests import pg

    server = pg.start_postgres()
    rates: dict[int, list[float]] = {size: [] for size in sizes}
    counts: dict[int, float] = {}
    try:
        for round_number in range(rounds):
            for size in sizes if round_number % 2 == 0 else list(reversed(sizes)):
                url = server.create_database()
                store = await postgres_store_with_recent(url, size)
                try:
                    rates[size].append(await intake(store, mails, f"q{round_number}", writers))
                    counts[size] = await timed(repeat, lambda store=store: store.usage_since(
                        datetime.now(UTC) - timedelta(hours=1), ["user1@example.org"]))
                finally:
                    await store.close()
                    server.drop_database(url)
    finally:
        server.stop()
    print(f"\nPostgreSQL intake with quotas, {mails} mails per store and round, {writers} "
          f"writer(s), {rounds} alternating rounds (medians); a user's count of the last "
          f"hour: usage_since, median of {repeat} (last round)")
    quota_table(sizes, rates, counts, "user ms")


def drop_migration_4_indexes(path: Path) -> None:
    conn = sqlite3.connect(path)
    with conn:
        for index in MIGRATION_4_INDEXES:
            conn.execute(f"DROP INDEX {index}")
    conn.close()


def quotas_for(sender: str) -> list[Quota]:
    return [Quota(f"user {sender}", f"user {sender}", 10**9, "faxes", 3600, (sender,)),
            Quota("service", "this service", 10**9, "pages", 86400)]


async def intake(store: Store, total: int, prefix: str, writers: int = WRITERS) -> float:
    """Mails per second stored by ``writers`` concurrent writers, with quotas checked."""
    queue = list(range(total))

    async def writer() -> None:
        while queue:
            index = queue.pop()
            sender = f"user{index % 50}@example.org"
            mail = NewMail(mail_id=f"{prefix}m{index}", envelope_from=sender, message_id=None,
                           subject="bench", references=[], from_header="", client_address="::1")
            # A number each (also across rounds): one number gets one call at a time, and
            # the jobs of earlier rounds stay at the emulator (submitted) for the whole run.
            number = f"+4931{''.join(filter(str.isdigit, prefix))}{index:06d}"
            await store.add_mail_jobs(mail, [NewJob(f"{prefix}j{index:06d}", number,
                                                    ACCOUNT)], [PDF], quotas_for(sender))

    started = time.perf_counter()
    await asyncio.gather(*(writer() for _ in range(writers)))
    return total / (time.perf_counter() - started)


async def dispatch(store: SqliteStore, total: int, data_dir: Path) -> float:
    """Jobs per second handed over until ``total`` jobs are submitted."""
    provider = emulator.EmulatorProvider(
        ProviderContext(account=ACCOUNT, data_dir=data_dir, emulator_network=store),
        emulator.Settings(delay_seconds=3600, send_latency_seconds=0, fail=[]))
    submitted: list[str] = []
    done = asyncio.Event()

    def on_submitted(job_ids: Sequence[str]) -> None:
        submitted.extend(job_ids)
        if len(submitted) >= total:
            done.set()

    dispatcher = Dispatcher(store, {ACCOUNT: provider}, DispatchSettings(concurrency=20),
                            owner="bench", on_submitted=on_submitted)
    started = time.perf_counter()
    task = asyncio.create_task(dispatcher.run())
    try:
        await done.wait()
        return total / (time.perf_counter() - started)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await provider.close()


async def timed(repeat: int, query: Callable[[], Awaitable[object]]) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        await query()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def lease_count(conn: sqlite3.Connection) -> object:
    """The dispatcher's count of live leases, as ``_claim`` runs it on every pass."""
    return conn.execute(
        "SELECT account, COUNT(*) FROM jobs WHERE lease_owner IS NOT NULL"
        " AND lease_until >= ? AND state IN (?, ?) GROUP BY account",
        (time.time(), JobState.QUEUED.value, JobState.RETRYING.value)).fetchall()


def unacknowledged_before(conn: sqlite3.Connection) -> object:
    """``unacknowledged_final_jobs`` as main ran it (no INDEXED BY: the index is dropped)."""
    return conn.execute(
        "SELECT * FROM jobs j WHERE account = ? AND acknowledged = 0"
        " AND provider_job_id IS NOT NULL AND state IN ('delivered','failed','cancelled')"
        " AND NOT EXISTS (SELECT 1 FROM events e WHERE e.job_id = j.id AND e.notify = 1)"
        " AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.job_id = j.id"
        "                 AND o.state = 'pending') LIMIT ?", (ACCOUNT, 100)).fetchall()


def counted_states(conn: sqlite3.Connection) -> object:
    """What ``counts()`` ran before migration 4: a count of the whole jobs table."""
    return conn.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()


async def hot_queries(store: SqliteStore, repeat: int, before: bool) -> dict[str, float]:
    async def on_store(operation: Callable[[sqlite3.Connection], object]) -> object:
        return await store._call(operation)

    queries: dict[str, Callable[[], Awaitable[object]]] = {
        "lease count": lambda: on_store(lease_count),
        "unacknowledged_final_jobs": (lambda: on_store(unacknowledged_before)) if before
        else lambda: store.unacknowledged_final_jobs(ACCOUNT, 100),
        "counts()": (lambda: on_store(counted_states)) if before else store.counts,
        "jobs --state failed": lambda: store.list_jobs(limit=1000, state=JobState.FAILED),
        # 50 rows: with 1000 the time is making 1000 Job objects (~0.2 ms each), not the query
        "jobs --state delivered": lambda: store.list_jobs(limit=50, state=JobState.DELIVERED),
    }
    return {name: await timed(repeat, query) for name, query in queries.items()}


@dataclass
class Result:
    size: int
    before: bool
    path: Path
    build_seconds: float = 0.0
    intake_rates: list[float] = field(default_factory=list)
    dispatch_rates: list[float] = field(default_factory=list)
    queries: dict[str, float] = field(default_factory=dict)

    @property
    def intake_rate(self) -> float:
        return statistics.median(self.intake_rates)

    @property
    def dispatch_rate(self) -> float:
        return statistics.median(self.dispatch_rates)


async def build_store(result: Result) -> None:
    store = SqliteStore(result.path)
    await store.open()  # the schema, all migrations
    await store.close()
    result.build_seconds = build_history(result.path, result.size)
    if result.before:
        drop_migration_4_indexes(result.path)


async def run_round(result: Result, jobs: int, round_number: int, folder: Path) -> None:
    """One round on one store: ``jobs`` mails in, then dispatched."""
    store = SqliteStore(result.path)
    await store.open()
    try:
        result.intake_rates.append(await intake(store, jobs, f"r{round_number}"))
        result.dispatch_rates.append(await dispatch(store, jobs, folder))
    finally:
        await store.close()


async def time_queries(result: Result, repeat: int) -> None:
    store = SqliteStore(result.path)
    await store.open()
    try:
        result.queries = await hot_queries(store, repeat, result.before)
    finally:
        await store.close()


def report(title: str, results: list[Result]) -> None:
    empty = results[0]
    print(f"\n{title}")
    print(f"{'finished jobs':>13} {'built in':>9} {'intake/s':>9} {'ratio':>6} "
          f"{'dispatch/s':>10} {'ratio':>6}")
    for result in results:
        print(f"{result.size:>13,} {result.build_seconds:>8.1f}s {result.intake_rate:>9.0f} "
              f"{result.intake_rate / empty.intake_rate:>6.2f} {result.dispatch_rate:>10.0f} "
              f"{result.dispatch_rate / empty.dispatch_rate:>6.2f}")
    names = list(empty.queries)
    print(f"{'query (median ms)':<26}" + "".join(f"{r.size:>12,}" for r in results))
    for name in names:
        print(f"{name:<26}" + "".join(f"{r.queries[name] * 1000:>12.2f}" for r in results))


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="0,100000,1000000")
    parser.add_argument("--jobs", type=int, default=1000,
                        help="mails taken in and dispatched per store and round")
    parser.add_argument("--before-jobs", type=int, default=200,
                        help="the same for the before variant (13 jobs/s at 1M)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=21, help="runs of each hot query")
    parser.add_argument("--before", action="store_true",
                        help="also without migration 4's indexes (main before issue 19)")
    parser.add_argument("--dir", type=Path, help="where the stores are built (default: tmp)")
    parser.add_argument("--recent", default="",
                        help="only intake with quotas on stores holding these numbers of jobs"
                             " from the last day, e.g. 0,2000,20000")
    parser.add_argument("--postgres", action="store_true",
                        help="--recent on PostgreSQL (a server started from tests/pg.py)")
    parser.add_argument("--writers", type=int, default=WRITERS,
                        help="--postgres: mails stored at once")
    args = parser.parse_args()
    if args.recent and args.postgres:
        await postgres_quota_rows([int(size) for size in args.recent.split(",")], args.jobs,
                                  args.rounds, args.repeat, args.writers)
        return
    if args.recent:
        with tempfile.TemporaryDirectory(prefix="mailfax-bench-quota-", dir=args.dir) as name:
            await quota_rows([int(size) for size in args.recent.split(",")], args.jobs,
                             args.rounds, args.repeat, Path(name))
        return
    sizes = [int(size) for size in args.sizes.split(",")]
    variants = [False, True] if args.before else [False]
    results: dict[bool, list[Result]] = {variant: [] for variant in variants}
    with tempfile.TemporaryDirectory(prefix="mailfax-bench-history-", dir=args.dir) as name:
        folder = Path(name)
        for size in sizes:
            for variant in variants:
                result = Result(size, variant, folder / f"history-{size}-{variant}.sqlite3")
                await build_store(result)
                results[variant].append(result)
        # Rounds over every store in turn: a change in the machine's load hits every size.
        for round_number in range(args.rounds):
            for variant in variants:
                for result in results[variant]:
                    jobs = args.before_jobs if variant else args.jobs
                    await run_round(result, jobs, round_number, folder)
        for variant in variants:
            for result in results[variant]:
                await time_queries(result, args.repeat)
    print(f"{args.jobs} mails ({args.before_jobs} before) taken in ({WRITERS} writers, quotas "
          f"checked) and dispatched per store and round, {args.rounds} rounds over all stores "
          f"in turn (medians); hot queries: median of {args.repeat}")
    report("now (migration 4: partial indexes, counts kept by triggers)", results[False])
    if args.before:
        report("before (migration 4's indexes dropped, counts() as COUNT(*) GROUP BY)",
               results[True])
        print("\nnow / before, dispatch/s and intake/s:")
        for now, old in zip(results[False], results[True], strict=True):
            print(f"{now.size:>13,}  intake {now.intake_rate / old.intake_rate:.2f}  "
                  f"dispatch {now.dispatch_rate / old.dispatch_rate:.2f}")


if __name__ == "__main__":
    asyncio.run(main())
