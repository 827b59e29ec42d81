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
import dataclasses
import logging
import random
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from mailfax import reasons
from mailfax.config import DispatchSettings, NotifySettings, Settings
from mailfax.model import JobState, Reason
from mailfax.outbound.accounts import AccountHealth
from mailfax.outbound.windows import Held, Schedule
from mailfax.providers import capabilities
from mailfax.providers.base import (
    ErrorKind,
    FaxDocument,
    Provider,
    ProviderError,
    ResendHandling,
    SendReceipt,
    SendRequest,
    resend_handling,
    unconfirmed_ref,
)
from mailfax.store.base import (
    OTHER_ACCOUNTS,
    PRIORITIES,
    ClaimRules,
    IllegalTransition,
    Job,
    Outcome,
    Store,
    Transition,
    Work,
)
from mailfax.support.failing import RepeatedFailure

log = logging.getLogger(__name__)

IDLE_TICK_SECONDS = 5.0
LEASE_SECONDS = 20.0
RENEW_SECONDS = LEASE_SECONDS / 4
# Jobs are due but none could be claimed: their accounts are at their limit (sends of other
# instances) or another instance is claiming them. Look again after this long, unless woken.
BLOCKED_POLL_SECONDS = 0.5
WAITING = (JobState.QUEUED, JobState.RETRYING)
DELAYED = "delayed"  # the reason code of the one "delayed" notice of a job


def utc_now() -> datetime:
    return datetime.now(UTC)


def dispatch_schedule(settings: Settings) -> Schedule:
    """The time windows of ``[dispatch] windows`` and ``[accounts.NAME] windows``, read in
    ``dispatch.timezone`` (or ``notify.timezone``)."""
    accounts = {name: account.windows for name, account in settings.accounts.items()
                if account.windows}
    priorities = {str(name): spec for name, spec in settings.dispatch.windows.items()}
    return Schedule.from_specs(priorities, accounts,
                               settings.dispatch.timezone or settings.notify.timezone)


def claim_rules(settings: DispatchSettings, held: Held) -> ClaimRules:
    """What a claim holds back now: see :class:`~mailfax.store.base.ClaimRules`."""
    return ClaimRules(one_call_per_number=settings.one_call_per_number,
                      held_priorities=frozenset(PRIORITIES[name] for name in held.priorities))


def retry_delay(attempt: int, initial: float, maximum: float,
                rand: Callable[[], float] = random.random) -> float:
    """Exponential backoff with jitter: between half and all of initial × 2^(attempt-1)."""
    ceiling = min(maximum, initial * 2.0 ** max(0, attempt - 1))
    return float(ceiling * (0.5 + rand() / 2))


def outcome_of_error(error: ProviderError, attempt: int, settings: DispatchSettings,
                     now: datetime, queued_at: datetime | None = None,
                     last_failure_at: datetime | None = None) -> Transition:
    """What a failed send means for the job: a retry later, or the end.

    A transient error is retried until the job is ``dispatch.max_age`` old (from
    ``queued_at``; and, when set, until ``max_attempts``); the backoff is capped at
    ``retry_max_seconds`` and the last retry falls on the end of the lifetime. The retry that
    first passes ``delay_warning`` after ``queued_at`` is marked for one "delayed" mail.
    """
    age = now - queued_at if queued_at is not None else timedelta(0)
    attempts_left = settings.max_attempts is None or attempt < settings.max_attempts
    if error.transient and attempts_left and age < settings.max_age:
        delay = error.retry_after or retry_delay(
            attempt, settings.retry_initial_seconds, settings.retry_max_seconds)
        next_at = now + timedelta(seconds=delay)
        if queued_at is not None:
            next_at = min(next_at, queued_at + settings.max_age)
        reason = error.reason
        warn = delay_warning_due(settings, now, queued_at, last_failure_at)
        if warn:
            reason = delayed_reason(error.reason, age)
        return Transition(
            state=JobState.RETRYING, reason=reason,
            detail=f"attempt {attempt} failed: {error.reason.detail or error.reason.code}",
            next_attempt_at=next_at, notify=True, always_event=warn,
        )
    detail = error.reason.detail or error.reason.code
    if not error.transient:
        return Transition(state=JobState.FAILED, reason=error.reason, detail=detail)
    return Transition(state=JobState.FAILED, reason=expired_reason(error.reason, age, attempt),
                      detail=f"gave up after {attempt} attempts in {hours(age)}: {detail}")


def queued_since(job: Job) -> datetime:
    """Where a job's lifetime and its "delayed" notice count from: its scheduled send time
    (``send_at``), else when it was queued."""
    return capabilities.send_time(job.options) or job.created


def delay_warning_due(settings: DispatchSettings, now: datetime, queued_at: datetime | None,
                      last_failure_at: datetime | None) -> bool:
    """Whether this failure is the first one past the delay warning time (so one mail is
    sent per job, however many retries follow)."""
    warning = settings.delay_warning
    if warning is None or queued_at is None or now < queued_at + warning:
        return False
    return last_failure_at is None or last_failure_at < queued_at + warning


def hours(age: timedelta) -> str:
    total = age.total_seconds()
    if total < 3600:
        return f"{total / 60:.0f} min"
    return f"{total / 3600:.1f} h".replace(".0 h", " h")


def delayed_reason(cause: Reason, age: timedelta) -> Reason:
    """The "delayed" notice: not sent yet after ``age``, still trying, and why."""
    return reasons.custom(
        DELAYED, f"Not sent after {hours(age)}: {cause.for_language('en')}",
        f"Nach {hours(age)} noch nicht gesendet: {cause.for_language('de')}",
        detail=cause.detail)


RETRY_PROMISES = ("; we will try again.", "; wir versuchen es erneut.")


def without_retry_promise(text: str) -> str:
    """A transient reason's sentence without its "we will try again" (we will not)."""
    for promise in RETRY_PROMISES:
        if text.endswith(promise):
            return text[:-len(promise)] + "."
    return text


def expired_reason(cause: Reason, age: timedelta, attempts: int) -> Reason:
    """The end of the retry lifetime."""
    return reasons.custom(
        "too_many_attempts",
        f"We gave up after {attempts} attempts in {hours(age)}. "
        f"Last error: {without_retry_promise(cause.for_language('en'))}",
        f"Wir haben nach {attempts} Versuchen in {hours(age)} aufgegeben. "
        f"Letzter Fehler: {without_retry_promise(cause.for_language('de'))}",
        detail=cause.detail)


def held_transition(error: ProviderError, account: str, now: datetime,
                    probe_seconds: float) -> Transition:
    """An account-wide refusal: the job waits (no mail) until the account works again; it
    comes due at the next probe."""
    return Transition(
        state=JobState.RETRYING, reason=error.reason,
        detail=f"held: account {account} paused: {error.reason.detail or error.reason.code}",
        next_attempt_at=now + timedelta(seconds=probe_seconds), notify=False)


def outcome_unknown(job: Job, result: SendReceipt | ProviderError, provider: object,
                    settings: DispatchSettings, now: datetime) -> Transition | None:
    """What a send means whose outcome we do not know, or None when we do.

    A send may have reached the provider though we got no (readable) answer, or the
    provider has the job without telling us its id. Whether to send it again is the
    provider's declaration (:class:`ResendHandling`), not a guess: where a resend is
    recognised or refused as a duplicate, it is retried as usual (marked, so a duplicate
    refusal is read as "you sent it already"); where it is not, the job is not resent but
    ``unconfirmed``.
    """
    if isinstance(result, SendReceipt):
        if result.confirmed:
            return None
        return unconfirmed_transition(result.provider_job_id or None,
                                      f"{job.account} has it under an id it did not tell")
    answer_lost_before = job.reason is not None and job.reason.code == reasons.ANSWER_LOST
    if not (result.maybe_sent or (answer_lost_before and result.transient)):
        return None  # (a later transient error does not make an earlier lost answer known)
    detail = result.reason.detail or result.reason.code
    if resend_handling(provider) != ResendHandling.NOT_RECOGNISED:
        # Retried as any transient error (lifetime, backoff, the one "delayed" mail), marked.
        retry = outcome_of_error(
            result, job.attempts, settings, now, queued_at=queued_since(job),
            last_failure_at=job.updated if job.state == JobState.RETRYING else None)
        if retry.state == JobState.RETRYING:
            reason = (retry.reason if retry.always_event
                      else reasons.reason(reasons.ANSWER_LOST, detail))
            return dataclasses.replace(
                retry, reason=reason, detail=f"attempt {job.attempts}: answer lost ({detail}); "
                                             "the provider recognises a resend")
    return unconfirmed_transition(unconfirmed_ref(provider, job.id), detail)


def interrupted_send(job: Job) -> bool:
    """Whether an earlier claim of this job ended without a recorded outcome: an instance
    died (or was stopped) while sending it. Only then is a queued job claimed a second time
    (``mailfax retry`` starts over from attempt 0). A retrying job's interrupted attempt
    cannot be told apart from its recorded failure: that one gap remains."""
    return job.state == JobState.QUEUED and job.attempts > 1


def unconfirmed_transition(placeholder: str | None, detail: str) -> Transition:
    """The job goes ``unconfirmed``: looked for under ``placeholder`` (no mail yet: the
    tracker mails when the search runs out, see ``dispatch.unconfirmed_hours``), or, when
    the provider offers no way to find it, with the "may have been sent" mail at once."""
    if placeholder:
        return Transition(state=JobState.UNCONFIRMED,
                          reason=reasons.reason(reasons.ANSWER_LOST, detail),
                          detail=f"answer lost ({detail}); looking for it at the provider",
                          provider_job_id=placeholder, notify=False)
    return Transition(state=JobState.UNCONFIRMED, reason=reasons.reason("unconfirmed", detail),
                      detail=f"answer lost ({detail}); the provider cannot be asked, "
                             "not resent")


class Dispatcher:
    """Claims due jobs and sends them, up to ``dispatch.concurrency`` per account at once.

    One loop does all the store work: each pass records the outcomes of the sends that
    ended since the last pass and claims work for the slots they freed, in one store call
    (:meth:`Store.claim_work`). Sends that end while a pass runs wait for the next one, so
    under load one call serves many slots. The sends themselves only talk to providers.
    """

    def __init__(
        self,
        store: Store,
        providers: Mapping[str, Provider],
        settings: DispatchSettings,
        owner: str,
        on_submitted: Callable[[Sequence[str]], None] = lambda job_ids: None,
        clock: Callable[[], datetime] = utc_now,
        accounts: AccountHealth | None = None,
        schedule: Schedule | None = None,
        spool: Path | None = None,
    ):
        self.clock = clock
        self.spool = spool  # where a large document is read to, to be sent from its file
        self.schedule = schedule or Schedule.from_specs(
            {str(name): spec for name, spec in settings.windows.items()}, {},
            settings.timezone or NotifySettings().timezone)
        self._held = self.schedule.held(clock())
        self.accounts = accounts or AccountHealth(settings.account_probe_seconds, clock=clock)
        self.store = store
        self.providers = providers
        self.settings = settings
        self.owner = owner
        self.on_submitted = on_submitted
        self._wake = asyncio.Event()
        self._tasks: dict[asyncio.Task[None], list[Job]] = {}  # sends in flight and their jobs
        self._finished: list[Outcome] = []  # outcomes of ended sends, not recorded yet
        self._next_sweep = 0.0
        self._claim_failures = RepeatedFailure(log, "dispatcher: recording results and "
                                               "claiming work")
        self._renew_failures = RepeatedFailure(log, "dispatcher: renewing leases")

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
                filled_all = await self._record_and_claim()
                if filled_all or self._finished:
                    continue
                await self._sleep_until_due(blocked=self.in_flight < self._capacity())
        finally:
            renewer.cancel()
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(renewer, *self._tasks, return_exceptions=True)
            await self._record_one_by_one()

    async def run_once(self) -> None:
        """What the loop does until nothing is left to do now: claim what is due, send it,
        record the outcomes. For a caller with a clock of its own (tests, tools)."""
        while True:
            await self._record_and_claim()
            if not self._tasks and not self._finished:
                return
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def _capacity(self) -> int:
        return self.settings.concurrency * max(1, len(self.providers))

    async def _record_and_claim(self) -> bool:
        """Record the ended sends' outcomes and claim work for the free slots: one store
        call. Returns whether it filled every free slot (so more may be waiting); when it
        did not, the store had no more due jobs, or the account limit is taken up by other
        instances, and asking again before something changes would be a wasted call."""
        finished, self._finished = self._finished, []
        free = self._capacity() - self.in_flight
        if free <= 0 and not finished:
            return False
        self._held = self.schedule.held(self.clock())
        limits = self._account_limits()
        now = time.monotonic()
        if free > 0 and now >= self._next_sweep:
            # Now and then also jobs of accounts that are not configured (any more), so they
            # fail with a reason instead of waiting for ever; not on every claim, as finding
            # them means looking past all the others.
            self._next_sweep = now + IDLE_TICK_SECONDS
            limits[OTHER_ACCOUNTS] = free
        try:
            work = await self.store.claim_work(self.owner, max(0, free), LEASE_SECONDS, limits,
                                               finished=finished,
                                               rules=claim_rules(self.settings, self._held),
                                               spool=self.spool)
        except Exception:
            self._claim_failures.failed(
                f"{len(finished)} send results wait to be recorded" if finished else "")
            self._finished[:0] = finished
            await self._record_one_by_one()
            return False
        self._claim_failures.succeeded()
        self._submitted(finished)
        for unit in work:
            task = asyncio.create_task(self._send(unit))
            self._tasks[task] = unit.jobs
            task.add_done_callback(self._task_done)
        return free > 0 and sum(len(unit.jobs) for unit in work) >= free

    def _account_limits(self) -> dict[str, int]:
        """Sends at once per account; 0 for a paused account or one outside its time window
        (its jobs wait, as they are named, and not claimed with the other accounts')."""
        return {account: 0 if self.accounts.paused(account) or account in self._held.accounts
                else self.settings.concurrency for account in self.providers}

    async def _record_one_by_one(self) -> None:
        """The fallback when the combined call fails: each outcome on its own, so one bad
        outcome does not hold up the others. What cannot be recorded now is kept and tried
        again (its lease is kept renewed meanwhile)."""
        finished, self._finished = self._finished, []
        for index, outcome in enumerate(finished):
            try:
                await self.store.record(outcome.job_id, outcome.transition, outcome.expected)
            except (KeyError, IllegalTransition) as error:  # a bug: retrying will not help
                log.error("result of job %s not recorded: %s", outcome.job_id, error)
            except Exception:
                log.exception("recording the result of job %s failed; trying again later",
                              outcome.job_id)
                self._finished[:0] = finished[index:]
                await asyncio.sleep(BLOCKED_POLL_SECONDS)
                return
            else:
                self._submitted([outcome])

    def _submitted(self, recorded: Sequence[Outcome]) -> None:
        job_ids = [outcome.job_id for outcome in recorded
                   if outcome.transition.state == JobState.SUBMITTED]
        if job_ids:
            self.on_submitted(job_ids)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.pop(task, None)
        if not task.cancelled() and task.exception() is not None:
            log.error("dispatch task failed", exc_info=task.exception())
        self._wake.set()  # its slots are free, and its outcomes wait to be recorded

    async def _renew_leases(self) -> None:
        """Keep the leases of the jobs being sent, or whose outcome waits to be recorded
        (a slow provider, or a slow store, must not lose them)."""
        while True:
            await asyncio.sleep(RENEW_SECONDS)
            job_ids = [job.id for jobs in self._tasks.values() for job in jobs]
            job_ids += [outcome.job_id for outcome in self._finished]
            if not job_ids:
                continue
            try:
                held = await self.store.renew_leases(self.owner, job_ids, LEASE_SECONDS)
            except Exception:
                self._renew_failures.failed(f"{len(job_ids)} jobs")
                continue
            self._renew_failures.succeeded()
            if held < len(job_ids):
                # Recorded meanwhile (normal), or the lease ran out and another instance may
                # send too: the provider's duplicate protection keeps that to one fax.
                log.debug("renewed %d of %d leases", held, len(job_ids))

    async def _sleep_until_due(self, blocked: bool = False) -> None:
        """Wait for a wake-up, the next job to come due, or the idle tick.

        ``blocked``: the last claim had room but got nothing, so jobs that are due now wait
        for a free slot of their account rather than for us. With every slot busy there is
        nothing to look up: an ending send wakes us.
        """
        timeout = IDLE_TICK_SECONDS
        if self.in_flight < self._capacity():
            due = await self.store.next_due_time(claim_rules(self.settings, self._held))
            if due is not None:
                timeout = min(timeout, max(0.0, (due - datetime.now(UTC)).total_seconds()))
                if blocked and timeout <= 0:
                    # Due jobs of a paused account (or one outside its time window) stay
                    # due: do not look every half second.
                    timeout = IDLE_TICK_SECONDS if (
                        self.accounts.any_paused() or self._held.accounts) else (
                        BLOCKED_POLL_SECONDS)
            if self._held.reopens_at is not None:  # a window opens: look then
                timeout = min(timeout, max(0.0, (self._held.reopens_at
                                                 - self.clock()).total_seconds()))
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

    async def _send(self, work: Work) -> None:
        """Send the jobs of one mail for one account, sharing the documents; their outcomes
        are left for the loop to record."""
        outcomes = [Outcome(job.id, Transition(
            state=JobState.CANCELLED, reason=reasons.reason("cancelled"),
            detail="cancelled before it was sent"), expected=WAITING)
            for job in work.jobs if job.cancel_requested]
        to_send = [job for job in work.jobs if not job.cancel_requested]
        provider = self.providers.get(work.jobs[0].account) if work.jobs else None
        if provider is not None and (
                resend_handling(provider) == ResendHandling.NOT_RECOGNISED):
            interrupted = [job for job in to_send if interrupted_send(job)]
            outcomes += [Outcome(job.id, unconfirmed_transition(
                unconfirmed_ref(provider, job.id),
                "an earlier send was interrupted"), WAITING) for job in interrupted]
            to_send = [job for job in to_send if job not in interrupted]
        if to_send:
            results = await self._results(to_send, work)
            await self._hold_refused_accounts(to_send, results)
            await self._hold_busy_numbers(to_send, results)
            now = self.clock()
            outcomes += [Outcome(job.id, self._transition(job, result, now), WAITING)
                         for job, result in zip(to_send, results, strict=True)]
        self._finished += outcomes

    async def _results(self, jobs: Sequence[Job], work: Work
                       ) -> Sequence[SendReceipt | ProviderError]:
        account = jobs[0].account
        provider = self.providers.get(account)
        if provider is None:
            missing = reasons.reason("provider_account", f"no such account {account!r}")
            return [ProviderError(missing, transient=False, kind=ErrorKind.PERMANENT)] * len(jobs)
        requests = [self._request(job, work.documents, work.subject) for job in jobs]
        try:
            return await provider.send_many(requests)
        except ProviderError as error:
            return [error] * len(requests)
        except Exception as error:  # a bug or an unexpected answer: never lose the job
            log.exception("provider %s failed unexpectedly", account)
            # It may have failed after a request went out: the provider's declaration
            # decides whether it is sent again (see outcome_unknown).
            return [ProviderError(reasons.reason("provider_error", type(error).__name__),
                                  transient=True, maybe_sent=True)] * len(requests)

    async def _hold_refused_accounts(self, jobs: Sequence[Job],
                                     results: Sequence[SendReceipt | ProviderError]) -> None:
        for job, result in zip(jobs, results, strict=True):
            if isinstance(result, ProviderError) and result.kind == ErrorKind.ACCOUNT:
                await self.accounts.hold(job.account, result)
                return  # one send's refusal says it for the whole account

    async def _hold_busy_numbers(self, jobs: Sequence[Job],
                                 results: Sequence[SendReceipt | ProviderError]) -> None:
        """A send the provider answered "busy": the number's jobs wait its busy backoff."""
        busy = {job.number for job, result in zip(jobs, results, strict=True)
                if isinstance(result, ProviderError) and reasons.is_busy(result.reason)}
        for number in sorted(busy):
            try:
                until = await self.store.number_busy(number, self.settings.busy_backoff_seconds)
            except Exception:  # the job's own retry still waits its backoff
                log.exception("recording that %s was busy failed", number)
            else:
                log.info("%s was busy: its next call not before %s", number, until)

    def _request(self, job: Job, documents: Sequence[FaxDocument], subject: str) -> SendRequest:
        return SendRequest(
            job_id=job.id, number=job.number, documents=documents, pages=job.pages,
            subject=subject, sender=job.sender, attempt=job.attempts,
            # Any earlier claim may have reached the provider unless its failure said
            # otherwise; only a provider's duplicate refusal (FAX.de -77) reads this.
            earlier_may_have_arrived=job.attempts > 1,
            station_id=job.options.get("station_id"), header=job.options.get("header"),
            cover_text=job.options.get("cover_text"),
            send_at=capabilities.future_send_time(job.options, datetime.now(UTC)),
            resolution=job.options.get("resolution"),
        )

    def _transition(self, job: Job, result: SendReceipt | ProviderError,
                    now: datetime) -> Transition:
        unknown = outcome_unknown(job, result, self.providers.get(job.account), self.settings,
                                  now)
        if unknown is not None:
            log.warning("job %s: %s (%s)", job.id, unknown.detail, unknown.state)
            return unknown
        if isinstance(result, SendReceipt):
            detail = f"accepted by {job.account} as {result.provider_job_id}"
            if result.duplicate:
                detail += " (the provider already had it from an earlier attempt)"
            log.info("job %s submitted to %s as %s", job.id, job.account, result.provider_job_id)
            return Transition(state=JobState.SUBMITTED, detail=detail,
                              provider_job_id=result.provider_job_id,
                              pages=result.pages, notify=False)
        log.warning("job %s: %s", job.id, result)
        if result.kind == ErrorKind.ACCOUNT and job.account in self.providers:
            return held_transition(result, job.account, now, self.settings.account_probe_seconds)
        last_failure = job.updated if job.state == JobState.RETRYING else None
        transition = outcome_of_error(result, job.attempts, self.settings, now,
                                      queued_at=queued_since(job), last_failure_at=last_failure)
        if transition.state == JobState.FAILED and result.transient:
            self.accounts.count_expired(job.account, "lifetime")
        return transition
