"""The dispatcher: hands stored jobs to their provider as soon as they are stored.

Event-driven: the intake wakes it after each commit; a timer wakes it for retries that come
due, and a slow idle tick picks up jobs queued by another process (``mailfax send``). On a
store that can tell (PostgreSQL's LISTEN/NOTIFY: ``wait_for_work``) another instance's new
jobs wake it at once too.

Several instances share the work through leases: a claimed job is leased to this instance
for :data:`LEASE_SECONDS`, renewed every :data:`RENEW_SECONDS` while its send is in flight,
so a send slower than the lease keeps it and a dead instance's jobs come back within a lease.
``dispatch.concurrency`` is the most sends at once per account, counted by the store over
the live leases of all instances.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta

from mailfax import reasons
from mailfax.config import DispatchSettings
from mailfax.model import JobState
from mailfax.providers.base import (
    FaxDocument,
    Provider,
    ProviderError,
    SendReceipt,
    SendRequest,
)
from mailfax.store.base import OTHER_ACCOUNTS, Job, Store, Transition

log = logging.getLogger(__name__)

IDLE_TICK_SECONDS = 5.0
LEASE_SECONDS = 20.0
RENEW_SECONDS = LEASE_SECONDS / 4
# Jobs are due but none could be claimed: their accounts are at their limit (sends of other
# instances) or another instance is claiming them. Look again after this long, unless woken.
BLOCKED_POLL_SECONDS = 0.5
WAITING = (JobState.QUEUED, JobState.RETRYING)


def retry_delay(attempt: int, initial: float, maximum: float,
                rand: Callable[[], float] = random.random) -> float:
    """Exponential backoff with jitter: between half and all of initial × 2^(attempt-1)."""
    ceiling = min(maximum, initial * 2.0 ** max(0, attempt - 1))
    return float(ceiling * (0.5 + rand() / 2))


def outcome_of_error(error: ProviderError, attempt: int, settings: DispatchSettings,
                     now: datetime) -> Transition:
    """What a failed send means for the job: a retry later, or the end."""
    if error.transient and attempt < settings.max_attempts:
        delay = error.retry_after or retry_delay(
            attempt, settings.retry_initial_seconds, settings.retry_max_seconds)
        return Transition(
            state=JobState.RETRYING, reason=error.reason,
            detail=f"attempt {attempt} failed: {error.reason.detail or error.reason.code}",
            next_attempt_at=now + timedelta(seconds=delay),
        )
    detail = error.reason.detail or error.reason.code
    if error.transient:
        detail = f"gave up after {attempt} attempts: {detail}"
    return Transition(state=JobState.FAILED, reason=error.reason, detail=detail)


class Dispatcher:
    def __init__(
        self,
        store: Store,
        providers: Mapping[str, Provider],
        settings: DispatchSettings,
        owner: str,
        on_submitted: Callable[[Sequence[str]], None] = lambda job_ids: None,
    ):
        self.store = store
        self.providers = providers
        self.settings = settings
        self.owner = owner
        self.on_submitted = on_submitted
        self._wake = asyncio.Event()
        self._tasks: dict[asyncio.Task[None], list[Job]] = {}  # sends in flight and their jobs
        self._next_sweep = 0.0

    def wake(self) -> None:
        self._wake.set()

    @property
    def in_flight(self) -> int:
        """Jobs this instance is sending now."""
        return sum(len(jobs) for jobs in self._tasks.values())

    async def run(self) -> None:
        renewer = asyncio.create_task(self._renew_leases(), name="dispatch lease renewal")
        try:
            while True:
                self._wake.clear()
                claimed = await self._claim_and_start()
                if claimed:
                    continue
                await self._sleep_until_due(blocked=self.in_flight < self._capacity())
        finally:
            renewer.cancel()
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(renewer, *self._tasks, return_exceptions=True)

    def _capacity(self) -> int:
        return self.settings.concurrency * max(1, len(self.providers))

    async def _claim_and_start(self) -> int:
        free = self._capacity() - self.in_flight
        if free <= 0:
            return 0
        limits: dict[str, int] = dict.fromkeys(self.providers, self.settings.concurrency)
        now = time.monotonic()
        if now >= self._next_sweep:
            # Now and then also jobs of accounts that are not configured (any more), so they
            # fail with a reason instead of waiting for ever; not on every claim, as finding
            # them means looking past all the others.
            self._next_sweep = now + IDLE_TICK_SECONDS
            limits[OTHER_ACCOUNTS] = free
        jobs = await self.store.claim_due_jobs(self.owner, free, LEASE_SECONDS,
                                               account_limits=limits)
        for group in _group_by_mail(jobs):
            task = asyncio.create_task(self._send_group(group))
            self._tasks[task] = group
            task.add_done_callback(self._task_done)
        return len(jobs)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.pop(task, None)
        if not task.cancelled() and task.exception() is not None:
            log.error("dispatch task failed", exc_info=task.exception())
        self._wake.set()  # a slot is free

    async def _renew_leases(self) -> None:
        """Keep the leases of the jobs being sent (a slow provider must not lose them)."""
        while True:
            await asyncio.sleep(RENEW_SECONDS)
            job_ids = [job.id for jobs in self._tasks.values() for job in jobs]
            if not job_ids:
                continue
            try:
                held = await self.store.renew_leases(self.owner, job_ids, LEASE_SECONDS)
            except Exception:
                log.exception("renewing the leases of %d jobs failed", len(job_ids))
                continue
            if held < len(job_ids):
                # Recorded meanwhile (normal), or the lease ran out and another instance may
                # send too: the provider's duplicate protection keeps that to one fax.
                log.debug("renewed %d of %d leases", held, len(job_ids))

    async def _sleep_until_due(self, blocked: bool = False) -> None:
        """Wait for a wake-up, the next job to come due, or the idle tick.

        ``blocked``: the last claim had room but got nothing, so jobs that are due now wait
        for a free slot of their account rather than for us.
        """
        due = await self.store.next_due_time()
        timeout = IDLE_TICK_SECONDS
        if due is not None:
            timeout = min(timeout, max(0.0, (due - datetime.now(UTC)).total_seconds()))
            if blocked and timeout <= 0:
                timeout = BLOCKED_POLL_SECONDS
        if self.in_flight >= self._capacity():
            timeout = IDLE_TICK_SECONDS  # woken by a finishing task
        timeout = max(timeout, 0.01)
        waits: list[asyncio.Task[None]] = [asyncio.create_task(self._wait_local())]
        wait_for_work = getattr(self.store, "wait_for_work", None)
        if wait_for_work is not None:  # another instance's jobs wake us at once
            waits.append(asyncio.create_task(wait_for_work(timeout)))
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits:
                waiting.cancel()
            await asyncio.gather(*waits, return_exceptions=True)

    async def _wait_local(self) -> None:
        await self._wake.wait()

    async def _send_group(self, jobs: Sequence[Job]) -> None:
        """Send the jobs of one mail for one account, sharing the documents."""
        to_send = [job for job in jobs if not await self._cancelled_before_send(job)]
        if not to_send:
            return
        first = to_send[0]
        provider = self.providers.get(first.account)
        if provider is None:
            for job in to_send:
                await self.store.record(job.id, Transition(
                    state=JobState.FAILED, reason=reasons.reason("provider_account"),
                    detail=f"no such account {first.account!r}"), expected=WAITING)
            return
        documents, mail = await asyncio.gather(self.store.load_documents(first.mail_id),
                                               self.store.get_mail(first.mail_id))
        requests = [self._request(job, documents, mail.subject if mail else "") for job in to_send]
        try:
            results = await provider.send_many(requests)
        except ProviderError as error:
            results = [error] * len(requests)
        except Exception as error:  # a bug or an unexpected answer: retry, never lose the job
            log.exception("provider %s failed unexpectedly", first.account)
            results = [ProviderError(reasons.reason("provider_error", type(error).__name__),
                                     transient=True)] * len(requests)
        now = datetime.now(UTC)
        for job, result in zip(to_send, results, strict=True):
            await self._record_result(job, result, now)
        self.on_submitted([job.id for job, result in zip(to_send, results, strict=True)
                           if isinstance(result, SendReceipt)])

    async def _cancelled_before_send(self, job: Job) -> bool:
        if not job.cancel_requested:
            return False
        await self.store.record(job.id, Transition(
            state=JobState.CANCELLED, reason=reasons.reason("cancelled"),
            detail="cancelled before it was sent"), expected=WAITING)
        return True

    def _request(self, job: Job, documents: Sequence[FaxDocument], subject: str) -> SendRequest:
        return SendRequest(
            job_id=job.id, number=job.number, documents=documents, pages=job.pages,
            subject=subject, sender=job.sender, attempt=job.attempts,
            station_id=job.options.get("station_id"), header=job.options.get("header"),
            cover_text=job.options.get("cover_text"),
        )

    async def _record_result(self, job: Job, result: SendReceipt | ProviderError,
                             now: datetime) -> None:
        if isinstance(result, SendReceipt):
            detail = f"accepted by {job.account} as {result.provider_job_id}"
            if result.duplicate:
                detail += " (the provider already had it from an earlier attempt)"
            log.info("job %s submitted to %s as %s", job.id, job.account, result.provider_job_id)
            transition = Transition(state=JobState.SUBMITTED, detail=detail,
                                    provider_job_id=result.provider_job_id,
                                    pages=result.pages, notify=False)
        else:
            transition = outcome_of_error(result, job.attempts, self.settings, now)
            log.warning("job %s: %s", job.id, result)
        await self.store.record(job.id, transition, expected=WAITING)


def _group_by_mail(jobs: Sequence[Job]) -> list[list[Job]]:
    groups: dict[tuple[str, str], list[Job]] = defaultdict(list)
    for job in jobs:
        groups[(job.mail_id, job.account)].append(job)
    return list(groups.values())
