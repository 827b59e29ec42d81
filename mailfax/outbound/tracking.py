"""The status tracker: polls providers for jobs in flight and records what changed.

Polling is the fallback; pushes from providers (``report_status``/``wake``) arrive sooner.
Right after a submission it polls quickly (1 s, 2 s, 4 s, ...) up to the configured interval.
With several instances on PostgreSQL the tracker runs on one of them at a time (see
``mailfax.app``); the others announce the jobs they submit to it through the store.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta

from mailfax import reasons
from mailfax.model import TRACKED_STATES, JobState, Reason
from mailfax.outbound.accounts import AccountHealth
from mailfax.providers.base import (
    ErrorKind,
    Provider,
    ProviderError,
    ProviderRef,
    StatusReport,
)
from mailfax.providers.capabilities import send_time
from mailfax.store.base import Job, Outcome, Store, Transition
from mailfax.support.failing import RepeatedFailure
from mailfax.support.waiting import wait_for_event

log = logging.getLogger(__name__)

IN_FLIGHT = (*TRACKED_STATES, JobState.RETRYING)
FIRST_FAST_POLL = 1.0
SETTLE_BATCH = 200  # unconfirmed jobs read at a time by settle_unconfirmed


def transition_for(job: Job, report: StatusReport) -> Transition | None:
    """The change a provider report means for a job, or None when nothing is new."""
    if report.state == job.state:
        return None
    if is_partial(job, report):
        return partial_transition(job, report)
    detail = report.reason.detail if report.reason and report.reason.detail else ""
    if report.state == JobState.DELIVERED and report.remote_id:
        detail = f"remote station {report.remote_id}"
    return Transition(
        # A failed call reports 0 pages sent; the job keeps the page count of its documents.
        state=report.state, reason=report.reason, detail=detail, pages=report.pages or None,
        duration_seconds=report.duration_seconds, remote_id=report.remote_id,
        provider_job_id=report.provider_job_id,
        notify=report.state not in TRACKED_STATES,
    )


def is_partial(job: Job, report: StatusReport) -> bool:
    """Whether a "delivered" report sent fewer pages than the job has: not delivered (a
    provider may say "done" after a call that dropped, even with 0 pages)."""
    return (report.state == JobState.DELIVERED and report.pages is not None
            and report.pages < job.pages)


def partial_transition(job: Job, report: StatusReport) -> Transition:
    """A partial send as a failure (reason ``partial``, with both page counts); the job
    keeps its submitted page count, the reason says how many of them were sent."""
    sent = report.pages or 0
    station = f"remote station {report.remote_id}; " if report.remote_id else ""
    reason = reasons.partial(sent, job.pages, f"{station}the provider reported it delivered")
    return Transition(
        state=JobState.FAILED, reason=reason, detail=reason.detail,
        duration_seconds=report.duration_seconds, remote_id=report.remote_id,
        provider_job_id=report.provider_job_id)


def unconfirmed_ran_out(job: Job, now: datetime, after: timedelta) -> Transition | None:
    """The "may have been sent" mail for an unconfirmed job still looked for at its
    provider (reason ``answer_lost``) longer than ``after``; None while the search goes on."""
    if job.state != JobState.UNCONFIRMED or job.reason is None:
        return None
    if job.reason.code != reasons.ANSWER_LOST or now - job.updated < after:
        return None
    hours = after.total_seconds() / 3600
    return Transition(
        state=JobState.UNCONFIRMED, reason=reasons.reason("unconfirmed", job.reason.detail),
        detail=f"not found at {job.account} within {hours:g} h; not resent", always_event=True)


def cancel_groups(requested: Sequence[Job], tracked: Sequence[Job]
                  ) -> tuple[list[list[Job]], dict[str, list[str]]]:
    """Which cancel requests can be carried out. Jobs that share a provider job id (FAX.de's
    bulk mode: one JobId, several recipients) are cancelled together, because the provider
    cancels all its recipients at once, and so only when every one of them is being
    cancelled. Returns the groups to cancel (the first job stands for the provider job) and,
    for each job held back, the ids of the others that are not being cancelled."""
    groups: list[list[Job]] = []
    held: dict[str, list[str]] = {}
    seen: set[str] = set()
    for job in requested:
        if job.id in seen:
            continue
        siblings = [other for other in tracked if other.provider_job_id == job.provider_job_id
                    and other.id != job.id] if job.provider_job_id else []
        group = [job, *siblings]
        seen.update(member.id for member in group)
        wanted = {member.id for member in requested}
        waiting = [member.id for member in siblings
                   if not member.cancel_requested and member.id not in wanted]
        if waiting:
            for member in group:
                if member.cancel_requested or member.id in wanted:
                    held[member.id] = waiting
        else:
            groups.append(group)
    return groups, held


def refs_of(jobs: Sequence[Job]) -> list[ProviderRef]:
    return [ProviderRef(job.id, job.provider_job_id or "", since=job.updated) for job in jobs]


TRACKING_DEADLINE = "tracking_deadline"  # the reason code of a job that ran out of time


def past_deadline(job: Job, now: datetime, limit: timedelta, lifetime: timedelta) -> bool:
    """Whether a tracked job has waited too long for a final status: ``limit`` since its
    last change of state, or in any case ``lifetime + limit`` since its mail came in (so a
    status that keeps flapping cannot keep it either). A fax the provider holds until its
    ``send_at`` counts from then."""
    scheduled = send_time(job.options)
    if scheduled is not None and scheduled > job.updated:
        return now - scheduled >= limit or now - scheduled >= lifetime + limit
    return now - job.updated >= limit or now - job.created >= lifetime + limit


def deadline_reason(provider_name: str, limit: timedelta) -> Reason:
    hours = f"{limit.total_seconds() / 3600:g} h"
    return reasons.custom(
        TRACKING_DEADLINE,
        f"No final status from {provider_name} after {hours}. The fax may or may not have "
        "been sent; please check with the recipient before sending it again.",
        f"Keine abschließende Rückmeldung von {provider_name} nach {hours}. Das Fax wurde "
        "vielleicht gesendet, vielleicht nicht; bitte fragen Sie beim Empfänger nach, bevor "
        "Sie es erneut senden.",
        detail=f"no final status from {provider_name} after {hours}")


class Tracker:
    """Polls every in-flight job at the regular interval, and a job just submitted more often.

    A fresh job is asked about after 1 s, 2 s, 4 s, ... until that reaches the interval; only
    those jobs are asked in between, so a thousand faxes in flight do not make every fast poll
    a poll of all of them.
    """

    def __init__(self, store: Store, providers: Mapping[str, Provider], interval: float,
                 on_change: Callable[[], None] = lambda: None, *,
                 deadlines: Mapping[str, timedelta] | None = None,
                 default_deadline: timedelta = timedelta(hours=24),
                 lifetime: timedelta = timedelta(days=5),
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC),
                 on_deadline: Callable[[str], None] = lambda account: None,
                 accounts: AccountHealth | None = None,
                 unconfirmed_after: timedelta = timedelta(hours=6),
                 busy_backoff: Sequence[float] = ()):
        self.accounts = accounts  # a status call refused for the account pauses it too
        self.busy_backoff = busy_backoff  # a busy result holds the number's jobs back
        self.on_change = on_change
        self.deadlines = dict(deadlines or {})
        self.default_deadline = default_deadline
        self.lifetime = lifetime
        self.clock = clock
        self.on_deadline = on_deadline
        self.unconfirmed_after = unconfirmed_after
        self.store = store
        self.providers = providers
        self.interval = interval
        self._wake = asyncio.Event()
        self._fresh: dict[str, tuple[float, float]] = {}  # job id -> (due at, current delay)
        self._full_poll_due = 0.0
        self._running = False
        self._failures: dict[str, RepeatedFailure] = {}  # per account
        self._unconfirmed_failures = RepeatedFailure(log, "tracker: checking unconfirmed jobs")

    @property
    def running(self) -> bool:
        """Whether this instance tracks now (with several, one of them does)."""
        return self._running

    def wake(self, job_ids: Sequence[str] = ()) -> None:
        """Jobs were submitted (or something else changed): look soon."""
        if not self._running:
            return  # another instance tracks (its full polls find these jobs)
        due = time.monotonic() + FIRST_FAST_POLL
        for job_id in job_ids:
            self._fresh[job_id] = (due, FIRST_FAST_POLL)
        if not job_ids:
            self._full_poll_due = 0.0
        self._wake.set()

    async def run(self) -> None:
        self._running = True
        self._full_poll_due = 0.0  # a new turn (also after taking over): everything at once
        try:
            await self._run()
        finally:
            self._running = False
            self._fresh.clear()

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            now = time.monotonic()
            if now >= self._full_poll_due:
                self._full_poll_due = now + self.interval
                await self.poll_all()
            else:
                await self._poll_fresh(now)
            next_due = min([self._full_poll_due, *(due for due, _ in self._fresh.values())])
            await wait_for_event(self._wake, max(next_due - time.monotonic(), 0.01))

    async def poll_all(self) -> None:
        self._fresh.clear()  # everything in flight is asked now
        await asyncio.gather(*(self._poll_safely(account, provider)
                               for account, provider in self.providers.items()))
        try:
            await self.settle_unconfirmed()
        except Exception:
            self._unconfirmed_failures.failed()
        else:
            self._unconfirmed_failures.succeeded()

    async def settle_unconfirmed(self) -> int:
        """Mail the sender and the admin about unconfirmed jobs their provider did not turn
        up within ``unconfirmed_after``; returns how many."""
        now = self.clock()
        mailed = 0
        while True:  # oldest first, a batch at a time: each one settled leaves the query
            due = await self.store.lost_answers_before(now - self.unconfirmed_after,
                                                       SETTLE_BATCH)
            settled = 0
            for job in due:
                transition = unconfirmed_ran_out(job, now, self.unconfirmed_after)
                if transition is None:
                    continue
                if await self.store.record(job.id, transition,
                                           expected=[JobState.UNCONFIRMED]):
                    log.warning("job %s: %s", job.id, transition.detail)
                    settled += 1
            mailed += settled
            if len(due) < SETTLE_BATCH or not settled:
                break
        if mailed:
            self.on_change()
        return mailed

    async def _poll_safely(self, account: str, provider: Provider) -> None:
        try:
            await self.poll_account(account, provider)
        except Exception:
            self._poll_failures(account).failed()
        else:
            self._poll_failures(account).succeeded()

    def _poll_failures(self, account: str) -> RepeatedFailure:
        if account not in self._failures:
            self._failures[account] = RepeatedFailure(
                log, f"tracker: status poll of account {account}")
        return self._failures[account]

    async def poll_account(self, account: str, provider: Provider) -> None:
        jobs = await self.store.tracked_jobs(account)
        try:
            await self._poll_jobs(account, provider, jobs)
        finally:  # also when the provider cannot be asked: a deadline is a deadline
            await self.expire_overdue(account, provider, jobs)
        await self._acknowledge(account, provider)

    async def expire_overdue(self, account: str, provider: Provider,
                             jobs: Sequence[Job]) -> int:
        """Fail the jobs at the provider (submitted, sending, or retrying there) past their
        deadline, unless they moved on meanwhile; the sender is told by the failure mail.
        Returns how many."""
        limit = self.deadlines.get(account, self.default_deadline)
        now = self.clock()
        expired = 0
        for job in jobs:
            # An unconfirmed job has a bounded search of its own and its one mail
            # (settle_unconfirmed); failing it later would say less, and mail again.
            at_provider = (job.state in IN_FLIGHT and job.state != JobState.UNCONFIRMED
                           and job.provider_job_id is not None)
            if not at_provider or not past_deadline(job, now, limit, self.lifetime):
                continue
            reason = deadline_reason(provider.provider_name, limit)
            moved = await self.store.record(job.id, Transition(
                state=JobState.FAILED, reason=reason,
                detail=f"{reason.detail} (provider job {job.provider_job_id}, last state "
                       f"{job.state} since {job.updated:%Y-%m-%d %H:%M} UTC)"),
                expected=[job.state])
            if moved:
                expired += 1
                log.warning("job %s: no final status from %s (%s) after %s; failed",
                            job.id, account, job.provider_job_id, limit)
                self.on_deadline(account)
        if expired:
            self.on_change()
        return expired

    async def _poll_fresh(self, now: float) -> None:
        delays = {job_id: self._fresh.pop(job_id)[1]
                  for job_id, (due, _) in list(self._fresh.items()) if due <= now}
        jobs: dict[str, list[Job]] = {}
        for job in await self.store.get_jobs(list(delays)) if delays else []:
            if job.state not in TRACKED_STATES:
                continue
            jobs.setdefault(job.account, []).append(job)
            delay = delays[job.id]
            if delay * 2 < self.interval:
                self._fresh[job.id] = (now + delay * 2, delay * 2)
        for account, account_jobs in jobs.items():
            provider = self.providers.get(account)
            if provider is not None:
                try:
                    await self._poll_jobs(account, provider, account_jobs)
                except Exception:
                    self._poll_failures(account).failed()
                else:
                    self._poll_failures(account).succeeded()

    async def _poll_jobs(self, account: str, provider: Provider, jobs: Sequence[Job]) -> None:
        requested = [job for job in jobs if job.cancel_requested]
        if requested:
            await self._cancel_requested(account, provider, requested)
        if not jobs:
            return
        try:
            reports = await provider.status(refs_of(jobs))
        except ProviderError as error:
            log.warning("status of %d jobs at %s: %s", len(jobs), account, error)
            if error.kind == ErrorKind.ACCOUNT and self.accounts is not None:
                await self.accounts.hold(account, error)
            return
        await self.apply(reports, jobs)

    async def apply_reports(self, reports: Mapping[str, StatusReport]) -> None:
        """Record pushed reports (our job id → report); returns once they are stored."""
        await self.apply(reports, await self.store.get_jobs(list(reports)))

    async def apply(self, reports: Mapping[str, StatusReport], jobs: Sequence[Job]) -> None:
        """Record what the reports say changed, all in one store call."""
        changes = [(job, transition) for job in jobs if job.id in reports
                   and (transition := transition_for(job, reports[job.id])) is not None]
        moved = await self.store.record_all([Outcome(job.id, transition, IN_FLIGHT)
                                             for job, transition in changes])
        for (job, transition), done in zip(changes, moved, strict=True):
            if done:
                log.info("job %s: %s -> %s", job.id, job.state, transition.state)
                if reasons.is_busy(transition.reason) and self.busy_backoff:
                    until = await self.store.number_busy(job.number, self.busy_backoff)
                    log.info("%s was busy: its next call not before %s", job.number, until)
        if any(done and transition.notify
               for (_, transition), done in zip(changes, moved, strict=True)):
            self.on_change()

    async def _cancel_requested(self, account: str, provider: Provider,
                                requested: Sequence[Job]) -> None:
        shared = any(job.provider_job_id for job in requested)
        tracked = await self.store.tracked_jobs(account) if shared else []
        groups, held = cancel_groups(requested, tracked)
        for job_id, waiting in held.items():
            log.info("job %s: cancel waits: its provider job also sends %s, not being "
                     "cancelled", job_id, ", ".join(waiting))
        for first, *others in groups:
            if await self._cancel(first, provider):
                for other in others:
                    await self.store.record(other.id, Transition(
                        state=JobState.CANCELLED, reason=reasons.reason("cancelled"),
                        detail="cancelled at the provider with the other recipients"),
                        expected=IN_FLIGHT)

    async def _cancel(self, job: Job, provider: Provider) -> bool:
        try:
            cancelled = await provider.cancel(ProviderRef(job.id, job.provider_job_id or ""))
        except ProviderError as error:
            log.warning("cancel of job %s failed: %s", job.id, error)
            return False
        if not cancelled:
            log.warning("job %s could not be cancelled: it was already sent", job.id)
            await self.store.clear_cancel_request(job.id)
            return False
        await self.store.record(job.id, Transition(
            state=JobState.CANCELLED, reason=reasons.reason("cancelled"),
            detail="cancelled at the provider"), expected=IN_FLIGHT)
        return True

    async def _acknowledge(self, account: str, provider: Provider) -> None:
        jobs = await self.store.unacknowledged_final_jobs(account, limit=1000)
        if not jobs:
            return
        try:
            await provider.acknowledge(
                [ProviderRef(job.id, job.provider_job_id or "") for job in jobs])
        except ProviderError as error:
            log.warning("acknowledging %d jobs at %s failed: %s", len(jobs), account, error)
            return
        await self.store.mark_acknowledged([job.id for job in jobs])
