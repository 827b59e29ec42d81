"""Dispatch throughput against the ideal: 5,000 queued jobs, a provider that takes 50 ms per
send, an account limit of 20 sends at once. The ideal is 20 / 0.05 s = 400 sends/s.

Two set-ups: one instance on SQLite (in this process), and three instances on one PostgreSQL
(three processes, each a Dispatcher with its own PostgresStore; the server is started with
tests/pg.py unless --url names one). Every send is timed; the sends per second over the whole
run are divided by the ideal, and the most sends at once (over all instances) is checked
against the limit.

    python bench/dispatch.py [--jobs 5000] [--latency 0.05] [--limit 20] [--url postgresql://…]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mailfax.config import DispatchSettings  # noqa: E402
from mailfax.model import JobState  # noqa: E402
from mailfax.outbound.dispatch import Dispatcher  # noqa: E402
from mailfax.providers import emulator  # noqa: E402
from mailfax.providers.base import (  # noqa: E402
    FaxDocument,
    ProviderContext,
    SendRequest,
    SendResult,
)
from mailfax.store import open_store  # noqa: E402
from mailfax.store.base import NewJob, NewMail, Store  # noqa: E402

ACCOUNT = "emu"
PDF = FaxDocument("a.pdf", b"%PDF-1.4 bench", 1)


class TimedProvider(emulator.EmulatorProvider):
    """The bundled emulator, with each send's start and end (wall clock) kept."""

    def __init__(self, context: ProviderContext, settings: emulator.Settings):
        super().__init__(context, settings)
        self.intervals: list[tuple[float, float]] = []

    async def send_many(self, requests: Sequence[SendRequest]) -> list[SendResult]:
        started = time.time()
        try:
            return await super().send_many(requests)
        finally:
            self.intervals += [(started, time.time())] * len(requests)


async def queue_jobs(store: Store, count: int) -> None:
    async def one(index: int) -> None:
        mail = NewMail(mail_id=f"m{index}", envelope_from="bench@example.org", message_id=None,
                       subject="bench", references=[], from_header="", client_address="::1")
        # A number each, as faxes to many recipients (one number gets one call at a time).
        await store.add_mail_jobs(mail, [NewJob(f"j{index:05d}", f"+4930{index:07d}", ACCOUNT)],
                                  [PDF])

    for start in range(0, count, 500):
        await asyncio.gather(*(one(index) for index in range(start, min(count, start + 500))))


async def dispatch(url: str, owner: str, total: int, limit: int, latency: float,
                   data_dir: Path) -> list[tuple[float, float]]:
    """Run one instance's dispatcher until every job was handed over; its send intervals."""
    store = open_store(url)
    await store.open()
    provider = TimedProvider(
        ProviderContext(account=ACCOUNT, data_dir=data_dir),
        emulator.Settings(delay_seconds=3600, send_latency_seconds=latency, fail=[]))
    dispatcher = Dispatcher(store, {ACCOUNT: provider},
                            DispatchSettings(concurrency=limit), owner=owner)
    task = asyncio.create_task(dispatcher.run())
    try:
        while True:
            counts = (await store.counts())["jobs"]
            if counts.get(JobState.SUBMITTED.value, 0) >= total:
                break
            # Seldom: counting is a scan of the jobs table, and three instances asking 10
            # times a second took CPU from the work being measured. (The rate is taken from
            # the sends' own times, so stopping late does not change it.)
            await asyncio.sleep(0.5)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await provider.close()
        await store.close()
    return provider.intervals


def summary(intervals: list[tuple[float, float]], limit: int, latency: float) -> dict[str, float]:
    first = min(start for start, _ in intervals)
    last = max(end for _, end in intervals)
    rate = len(intervals) / (last - first)
    edges = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    busiest = current = 0
    for _, step in edges:
        current += step
        busiest = max(busiest, current)
    return {"sends": len(intervals), "seconds": last - first, "rate": rate,
            "ratio": rate / (limit / latency), "most_at_once": busiest}


async def sqlite_run(jobs: int, limit: int, latency: float) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="mailfax-bench-") as folder:
        url = f"sqlite:///{folder}/store.sqlite3"
        store = open_store(url)
        await store.open()
        await queue_jobs(store, jobs)
        await store.close()
        intervals = await dispatch(url, "one", jobs, limit, latency, Path(folder))
    return summary(intervals, limit, latency)


async def postgres_run(url: str, jobs: int, limit: int, latency: float,
                       instances: int) -> dict[str, float]:
    store = open_store(url)
    await store.open()  # creates the schema
    await queue_jobs(store, jobs)
    await store.close()
    with tempfile.TemporaryDirectory(prefix="mailfax-bench-") as folder:
        workers = [await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--worker", url, f"instance{index}", str(jobs),
            str(limit), str(latency), str(Path(folder) / f"instance{index}"),
            stdout=asyncio.subprocess.PIPE) for index in range(instances)]
        outputs = await asyncio.gather(*(worker.communicate() for worker in workers))
    intervals = [tuple(pair) for stdout, _ in outputs for pair in json.loads(stdout)]
    return summary(intervals, limit, latency)  # type: ignore[arg-type]


def report(name: str, result: dict[str, float], limit: int) -> None:
    print(f"{name}: {result['sends']:.0f} sends in {result['seconds']:.2f} s ="
          f" {result['rate']:.0f}/s, ratio to ideal {result['ratio']:.2f};"
          f" at most {result['most_at_once']:.0f} at once (limit {limit})")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--latency", type=float, default=0.05)
    parser.add_argument("--limit", type=int, default=20)
    parser.add_argument("--instances", type=int, default=3)
    parser.add_argument("--url", default="", help="an empty PostgreSQL database to use")
    args = parser.parse_args()
    print(f"{args.jobs} jobs, {args.latency * 1000:.0f} ms a send, {args.limit} at once:"
          f" ideal {args.limit / args.latency:.0f} sends/s")
    sqlite = await sqlite_run(args.jobs, args.limit, args.latency)
    report("SQLite, 1 instance", sqlite, args.limit)
    server = None
    url = args.url
    if not url:
        from tests import pg

        server = pg.start_postgres()
        url = server.create_database()
    try:
        postgres = await postgres_run(url, args.jobs, args.limit, args.latency, args.instances)
    finally:
        if server is not None:
            server.stop()
    report(f"PostgreSQL, {args.instances} instances", postgres, args.limit)
    print(f"ratios: sqlite {sqlite['ratio']:.2f}, postgresql {postgres['ratio']:.2f}")


def worker(argv: list[str]) -> None:
    url, owner, total, limit, latency, data_dir = argv
    intervals = asyncio.run(dispatch(url, owner, int(total), int(limit), float(latency),
                                     Path(data_dir)))
    print(json.dumps(intervals))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2:])
    else:
        asyncio.run(main())
