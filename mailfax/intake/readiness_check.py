"""The fax-readiness check after the 250 (``documents.readiness = "warn"``).

Rendering every page at fax resolution costs about 22 ms of CPU a page: before the 250 it
would bound intake to what the CPU can render. So in "warn" mode a mail's jobs are stored
as usual (durable before the 250, which carries no warning), marked ``options["readiness"]
= "pending"`` and held from dispatch for at most ``documents.readiness_hold_seconds``. This
loop then checks each such mail once (a broadcast list's jobs share one check) in the
niced worker processes of :mod:`mailfax.documents.readiness_pool`, and records the result
in one store call (:meth:`~mailfax.store.base.Store.record_readiness`): the findings in the
jobs' options, the mark "checked" (or "not checked"), an event the notifier turns into the
acceptance mail (when there are findings, or ``accepted`` is in ``notify.events``), and the
hold released. A mail whose hold ran out before its check is sent unchecked; its check and
its acceptance mail still come.

The queue holds mail and job ids only (the documents are read from the store when a worker
is free), up to :data:`QUEUE_SIZE`; past that, and at start-up (the checks a stop cut short),
the pending jobs are read from the store instead.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from mailfax.config import Settings
from mailfax.documents.faxrender import resolution_named
from mailfax.documents.readiness import (
    CHECKED,
    NOT_CHECKED,
    ReadinessLimits,
    check_event_detail,
)
from mailfax.documents.readiness_pool import Checked, ReadinessPool
from mailfax.providers import capabilities
from mailfax.store.base import Job, ReadinessVerdict, Store

log = logging.getLogger(__name__)

QUEUE_SIZE = 10_000  # mails; beyond, their pending jobs are read back from the store
PENDING_BATCH = 1000  # pending jobs read per store call (start-up, after an overflow)
GRACE_SECONDS = 5.0  # past documents.readiness_max_seconds: one page's render


@dataclass(frozen=True)
class PendingCheck:
    """A mail whose jobs wait for their check: what the check needs besides the documents."""

    mail_id: str
    job_ids: tuple[str, ...]
    resolution: str  # the mail's "standard" or "fine"
    release_at: datetime | None  # the jobs' first attempt once checked: a schedule, or now


def limits_of(settings: Settings) -> ReadinessLimits:
    documents = settings.documents
    return ReadinessLimits(empty_below=documents.readiness_empty_percent / 100,
                           black_above=documents.readiness_black_percent / 100,
                           max_pages=documents.readiness_max_pages,
                           max_seconds=documents.readiness_max_seconds)


async def check_in_pool(pool: ReadinessPool, settings: Settings, documents: Sequence[object],
                        resolution: str) -> Checked:
    """One mail's check in the worker processes, with the configured limits."""
    limits = limits_of(settings)
    return await pool.check(documents, limits, resolution_named(resolution),
                            limits.max_seconds + GRACE_SECONDS)


class ReadinessChecker:
    """The loop that checks the mails :meth:`submit` hands it, and records each."""

    def __init__(self, store: Store, settings: Settings, pool: ReadinessPool,
                 on_recorded: Callable[[], None] = lambda: None):
        self.store = store
        self.settings = settings
        self.pool = pool
        self.on_recorded = on_recorded  # wakes the dispatcher and the notifier
        self._queue: asyncio.Queue[PendingCheck] = asyncio.Queue(QUEUE_SIZE)
        self._queued: set[str] = set()  # mail ids queued or being checked
        self._overflowed = False

    def submit(self, check: PendingCheck) -> None:
        """Check this mail next (after those queued); never blocks the 250."""
        if check.mail_id in self._queued:
            return
        try:
            self._queue.put_nowait(check)
        except asyncio.QueueFull:
            self._overflowed = True  # its jobs are pending in the store: read back later
            return
        self._queued.add(check.mail_id)

    async def run(self) -> None:
        """Forever: start the workers, take up the checks a stop cut short, then check
        what comes, ``documents.readiness_workers`` mails at a time."""
        if self.settings.documents.readiness != "off":
            await self.pool.start()
        await self.take_pending()
        try:
            async with asyncio.TaskGroup() as workers:  # one fails: all stop, run() is restarted
                for _ in range(self.settings.documents.readiness_workers):
                    workers.create_task(self._work())
        finally:
            self.pool.close()

    async def take_pending(self) -> int:
        """Queue the mails of jobs still pending in the store (a restart, an overflow): one
        store call per :data:`PENDING_BATCH` jobs. Returns how many mails were queued."""
        self._overflowed = False
        jobs = await self.store.pending_readiness(PENDING_BATCH)
        checks = self.pending_checks(jobs)
        for check in checks:
            self.submit(check)
        if checks:
            log.info("readiness: %d mail(s) from the store to check", len(checks))
        if len(jobs) == PENDING_BATCH:
            self._overflowed = True  # more: read once these are done
        return len(checks)

    def pending_checks(self, jobs: Sequence[Job]) -> list[PendingCheck]:
        by_mail: dict[str, list[Job]] = {}
        for job in jobs:
            by_mail.setdefault(job.mail_id, []).append(job)
        return [self.pending_check(mail_id, [job.id for job in group], group[0].account,
                                   group[0].options)
                for mail_id, group in by_mail.items()]

    def pending_check(self, mail_id: str, job_ids: Sequence[str], account: str,
                      options: Mapping[str, object]) -> PendingCheck:
        """The check of a mail whose jobs (``job_ids``, of ``account``, with the mail's
        ``options``) were stored pending: just taken in, or read back from the store."""
        return PendingCheck(mail_id, tuple(job_ids), str(options.get("resolution", "standard")),
                            self.release_time(account, options))

    def release_time(self, account: str, options: Mapping[str, object]) -> datetime | None:
        """When a checked job is first sent: its schedule if mailfax holds it, else now."""
        settings = self.settings.accounts.get(account)
        return capabilities.held_until(settings.provider, options) if settings else None

    async def _work(self) -> None:
        while True:
            check = await self._queue.get()
            try:
                await self.check(check)
            except Exception:  # the store down: the jobs stay pending; read back later
                log.exception("readiness: the check of mail %s was not recorded",
                              check.mail_id)
                self._overflowed = True
            finally:
                self._queued.discard(check.mail_id)
            if self._queue.empty() and self._overflowed:
                await self.take_pending()

    async def check(self, check: PendingCheck) -> list[str]:
        """Check one mail and record it in its jobs; the ids of the jobs recorded."""
        documents = await self.store.load_documents(check.mail_id, self.pool.spool)
        if self.settings.documents.readiness == "off":
            result = Checked([], checked=False, why='documents.readiness is "off"')
        else:
            result = await check_in_pool(self.pool, self.settings, documents,
                                         check.resolution)
        for item in result.findings:
            log.info("readiness: mail %s: %s", check.mail_id, item["text"])
        mailed = bool(result.findings) or "accepted" in self.settings.notify.events
        recorded = await self.store.record_readiness(ReadinessVerdict(
            job_ids=check.job_ids, findings=result.findings,
            outcome=CHECKED if result.checked else NOT_CHECKED,
            detail=check_event_detail(result.findings, result.checked, result.why),
            notify=mailed, release_at=check.release_at))
        if recorded:
            self.on_recorded()
        return recorded
