"""The status tracker: a job just submitted is asked about quickly, the rest only at the
regular interval, so many faxes in flight do not turn every fast poll into a poll of all."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

from mailfax.model import JobState
from mailfax.outbound.tracking import Tracker
from mailfax.providers.base import BaseProvider, ProviderContext, ProviderRef, StatusReport
from mailfax.store.base import NewJob, NewMail, Transition
from mailfax.store.sqlite import SqliteStore


class CountingProvider(BaseProvider):
    provider_name = "counting"

    def __init__(self, context: ProviderContext):
        super().__init__(context)
        self.asked: list[list[str]] = []
        self.delivered: set[str] = set()

    async def status(self, refs: Sequence[ProviderRef]) -> dict[str, StatusReport]:
        self.asked.append(sorted(ref.job_id for ref in refs))
        return {ref.job_id: StatusReport(JobState.DELIVERED if ref.job_id in self.delivered
                                         else JobState.SENDING) for ref in refs}


async def _submitted_jobs(store: SqliteStore, count: int) -> list[str]:
    ids = [f"job{index:03d}" for index in range(count)]
    mail = NewMail(mail_id="m1", envelope_from="a@example.org", message_id=None, subject="s",
                   references=[], from_header="", client_address="127.0.0.1")
    await store.add_mail_jobs(mail, [NewJob(job_id=i, number="+4930123456", account="acct")
                                     for i in ids], [])
    for job_id in ids:
        await store.record(job_id, Transition(state=JobState.SUBMITTED, provider_job_id=job_id,
                                              notify=False))
    return ids


async def test_fast_polls_ask_only_for_the_fresh_job(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "store.sqlite3")
    await store.open()
    provider = CountingProvider(ProviderContext(account="acct", data_dir=tmp_path))
    tracker = Tracker(store, {"acct": provider}, interval=30.0)
    task = asyncio.create_task(tracker.run())
    try:
        ids = await _submitted_jobs(store, 50)
        tracker.wake()  # the first, full poll: all 50 in flight
        await asyncio.sleep(0.3)
        assert provider.asked and len(provider.asked[-1]) == 50
        provider.asked.clear()
        provider.delivered.add(ids[7])
        tracker.wake([ids[7]])
        await asyncio.sleep(1.5)  # the first fast poll is after 1 s
        assert provider.asked == [[ids[7]]]
        job = await store.get_job(ids[7])
        assert job is not None and job.state == JobState.DELIVERED
        await asyncio.sleep(2.5)  # delivered: not asked about again before the interval
        assert provider.asked == [[ids[7]]]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await store.close()
