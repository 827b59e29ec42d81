"""The dispatcher against a real store and the bundled emulator: slots, batching, and what
happens when the store call that records results fails."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from mailfax.config import DispatchSettings
from mailfax.model import JobState
from mailfax.outbound.dispatch import Dispatcher
from mailfax.providers import emulator
from mailfax.providers.base import FaxDocument, ProviderContext, SendRequest, SendResult
from mailfax.store.base import NewJob, NewMail, Outcome, Work
from mailfax.store.sqlite import SqliteStore

PDF = FaxDocument("a.pdf", b"%PDF-1.4 test", 1)


class CountingProvider(emulator.EmulatorProvider):
    """The emulator, counting sends at once and sends per job."""

    def __init__(self, context: ProviderContext, settings: emulator.Settings):
        super().__init__(context, settings)
        self.now = self.most = 0
        self.sends: dict[str, int] = {}

    async def send_many(self, requests: Sequence[SendRequest]) -> list[SendResult]:
        self.now += len(requests)
        self.most = max(self.most, self.now)
        for request in requests:
            self.sends[request.job_id] = self.sends.get(request.job_id, 0) + 1
        try:
            return await super().send_many(requests)
        finally:
            self.now -= len(requests)


class FlakyStore(SqliteStore):
    """Fails every third call that hands back results (as a database that goes away would)."""

    def __init__(self, path: Path):
        super().__init__(path)
        self.calls = self.failed = 0

    async def claim_work(self, owner: str, limit: int, lease_seconds: float,
                         account_limits: Mapping[str, int],
                         finished: Sequence[Outcome] = ()) -> list[Work]:
        if finished:
            self.calls += 1
            if self.calls % 3 == 0:
                self.failed += 1
                raise OSError("database went away")
        return await super().claim_work(owner, limit, lease_seconds, account_limits, finished)


async def run_until_submitted(store: SqliteStore, dispatcher: Dispatcher, count: int) -> None:
    task = asyncio.create_task(dispatcher.run())
    try:
        deadline = time.monotonic() + 30
        while (await store.counts())["jobs"].get(JobState.SUBMITTED.value, 0) < count:
            assert time.monotonic() < deadline, await store.counts()
            await asyncio.sleep(0.02)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def queue(store: SqliteStore, count: int) -> None:
    for index in range(count):
        mail = NewMail(mail_id=f"m{index}", envelope_from="a@example.org", message_id=None,
                       subject="s", references=[], from_header="", client_address="::1")
        await store.add_mail_jobs(mail, [NewJob(f"j{index:03d}", "+4930123456", "emu")], [PDF])


def provider(tmp_path: Path) -> CountingProvider:
    return CountingProvider(ProviderContext(account="emu", data_dir=tmp_path),
                            emulator.Settings(delay_seconds=3600, send_latency_seconds=0.01,
                                              fail=[]))


async def test_every_job_is_sent_once_within_the_limit_and_reported(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "store.sqlite3")
    await store.open()
    fax = provider(tmp_path)
    reported: list[str] = []
    try:
        await queue(store, 60)
        dispatcher = Dispatcher(store, {"emu": fax}, DispatchSettings(concurrency=4), "one",
                                on_submitted=reported.extend)
        await run_until_submitted(store, dispatcher, 60)
        assert fax.sends == {f"j{index:03d}": 1 for index in range(60)}
        assert fax.most == 4  # the limit, and used
        assert sorted(reported) == sorted(fax.sends)  # each reported once, after recording
        assert all(job.attempts == 1 for job in await store.list_jobs())
    finally:
        await fax.close()
        await store.close()


async def test_results_survive_a_failing_store_call(tmp_path: Path) -> None:
    """When recording with the next claim fails, the results are recorded one by one: no job
    is sent twice or left waiting, and the failures do not stop the dispatcher."""
    store = FlakyStore(tmp_path / "store.sqlite3")
    await store.open()
    fax = provider(tmp_path)
    try:
        await queue(store, 40)
        dispatcher = Dispatcher(store, {"emu": fax}, DispatchSettings(concurrency=4), "one")
        await run_until_submitted(store, dispatcher, 40)
        assert store.failed >= 3
        assert fax.sends == {f"j{index:03d}": 1 for index in range(40)}
        jobs = await store.list_jobs()
        assert {job.state for job in jobs} == {JobState.SUBMITTED}
        assert all(job.provider_job_id for job in jobs)
    finally:
        await fax.close()
        await store.close()
