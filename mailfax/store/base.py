"""The store interface. It speaks in intentions (add a mail's jobs, claim due jobs, record a
transition, hand out pending notifications), not in rows, so each backend can do each its own
best way. Every method returns only after its change is durable.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, Protocol

from mailfax.model import FINAL_STATES, JobState, Reason
from mailfax.providers.base import EmulatedTransmission, FaxDocument, InboundFax


@dataclass(frozen=True)
class NewMail:
    """The mail a set of jobs came from: what the status mails need to thread to it."""

    mail_id: str
    envelope_from: str
    message_id: str | None
    subject: str
    references: list[str]
    from_header: str
    client_address: str
    auto_submitted: str | None = None
    precedence: str | None = None
    language: str = "en"


@dataclass(frozen=True)
class NewJob:
    job_id: str
    number: str
    account: str
    options: dict[str, Any] = field(default_factory=dict)
    # The first attempt's time, when mailfax holds a scheduled fax itself (None: at once).
    hold_until: datetime | None = None


@dataclass(frozen=True)
class Job:
    id: str
    mail_id: str
    account: str
    number: str
    state: JobState
    pages: int
    sender: str
    created: datetime
    updated: datetime
    attempts: int
    next_attempt_at: datetime | None
    provider_job_id: str | None
    reason: Reason | None
    duration_seconds: float | None
    remote_id: str | None
    options: dict[str, Any]
    cancel_requested: bool
    acknowledged: bool

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "state": self.state.value,
            "number": self.number,
            "pages": self.pages,
            "sender": self.sender,
            "account": self.account,
            "created": self.created.isoformat(),
            "updated": self.updated.isoformat(),
            "attempts": self.attempts,
            "provider_job_id": self.provider_job_id,
            "duration_seconds": self.duration_seconds,
            "remote_id": self.remote_id,
            "reason": self.reason.for_language("en") if self.reason else None,
            "reason_code": self.reason.code if self.reason else None,
            "next_attempt_at": self.next_attempt_at.isoformat() if self.next_attempt_at
            else None,
            "options": dict(self.options),  # the per-mail options (README "Per-mail options")
        }


@dataclass(frozen=True)
class Mail:
    id: str
    envelope_from: str
    message_id: str | None
    subject: str
    references: list[str]
    from_header: str
    client_address: str
    auto_submitted: str | None
    precedence: str | None
    language: str
    received_at: datetime


@dataclass(frozen=True)
class Event:
    id: int
    job_id: str
    at: datetime
    state: JobState
    reason: Reason | None
    detail: str


@dataclass(frozen=True)
class OutgoingMail:
    envelope_from: str
    recipients: list[str]
    message: bytes
    job_id: str | None = None
    kind: str = "status"
    inbound: tuple[str, str] | None = None  # (account, fax id) of a received fax it carries


@dataclass(frozen=True)
class SpooledMail:
    """A mail taken with ``smtp.accept = "spool"``: its raw bytes and envelope, stored before
    the 250 and turned into jobs (or a bounce) afterwards."""

    id: int
    received_at: datetime
    envelope_from: str
    recipients: list[str]
    client: str
    user: str | None
    message: bytes


@dataclass(frozen=True)
class InboundRecord:
    """A received fax as stored (the image is loaded separately)."""

    account: str
    fax_id: str
    fetched_at: datetime
    called_number: str
    received_at: datetime
    originator: str
    remote_id: str
    pages: int
    state: str  # received → queued (mail in the outbox) → deleted (at the provider)
    deliveries: int


@dataclass(frozen=True)
class OutboxItem:
    id: int
    envelope_from: str
    recipients: list[str]
    message: bytes
    attempts: int
    job_id: str | None
    inbound: tuple[str, str] | None = None  # (account, fax id) of a received fax it carries


@dataclass(frozen=True)
class Transition:
    """A state change to record; fields left None keep their value."""

    state: JobState
    reason: Reason | None = None
    detail: str = ""
    provider_job_id: str | None = None
    pages: int | None = None
    duration_seconds: float | None = None
    remote_id: str | None = None
    next_attempt_at: datetime | None = None
    notify: bool = True
    # Log an event (and so, with notify, a mail) even when the state stays the same: the one
    # "delayed" notice of a job that keeps retrying.
    always_event: bool = False


@dataclass(frozen=True)
class ReadinessVerdict:
    """The fax-readiness check of one mail's jobs, done after their 250, for
    :meth:`Store.record_readiness` (``documents.readiness = "warn"``)."""

    job_ids: Sequence[str]
    findings: Sequence[Mapping[str, Any]]  # documents.readiness.Finding, in page order
    outcome: str  # job.options["readiness"] from now on: "checked" or "not checked"
    detail: str  # the event's text in the job history
    notify: bool  # whether the event is to be mailed (findings, or "accepted" wanted)
    release_at: datetime | None = None  # the first attempt once released: a schedule; None: now


Handoff = Literal["handed_off", "failed", "waiting"]

OTHER_ACCOUNTS = "*"  # in claim_work's account_limits: every account not named

# ``job.options["priority"]`` as the store's ``priority`` column: claimed in this order.
PRIORITIES = {"normal": 0, "bulk": 1}
# Where a job handed to its provider is still being dialled (until its final state): the
# line to its number is in use. A job at the provider that retries there dials again.
LINE_IN_USE_STATES = ("submitted", "sending", "retrying")
# How many due jobs a claim looks at per free slot when it takes one job per number (both
# stores: the first job of each number among them is taken).
CANDIDATES_PER_SLOT = 4


def priority_rank(options: Mapping[str, Any]) -> int:
    """The claim order of a job's ``priority`` option: "normal" (the default) before "bulk"."""
    return PRIORITIES.get(str(options.get("priority") or "normal"), 0)


def busy_step(previous: tuple[int, float] | None, now: float,
              backoff_seconds: Sequence[float]) -> tuple[int, float]:
    """(busy results in a row, not before) after one more busy result at ``now`` (Unix
    time), from the number's ``previous`` (count, not before), if any. The n-th busy result
    in a row waits the n-th step (the last step from then on); the row is broken once the
    number was not busy for the last step's length after its backoff ended."""
    steps = list(backoff_seconds) or [0.0]
    count = 1
    if previous is not None and now < previous[1] + steps[-1]:
        count = previous[0] + 1
    return count, now + steps[min(count, len(steps)) - 1]


@dataclass(frozen=True)
class ClaimRules:
    """What the dispatcher's configuration and clock hold back from a claim (both stores).

    ``one_call_per_number``: a job is not claimed while another job to its number is leased
    (by any instance) or at its provider in one of :data:`LINE_IN_USE_STATES`, and one claim
    takes at most one job per number (HylaFAX's MaxConcurrentCalls per destination = 1).
    ``held_priorities``: priority ranks outside their time window now. A number in its busy
    backoff (:meth:`Store.number_busy`) is held in any case."""

    one_call_per_number: bool = True
    held_priorities: frozenset[int] = frozenset()


DEFAULT_RULES = ClaimRules()


@dataclass(frozen=True)
class Outcome:
    """A finished send's result, for :meth:`Store.claim_work` to record."""

    job_id: str
    transition: Transition
    expected: Sequence[JobState] | None = None


@dataclass(frozen=True)
class Work:
    """Claimed jobs of one mail for one account, with what sending them needs."""

    jobs: list[Job]
    subject: str
    documents: list[FaxDocument]


def group_work(jobs: Sequence[Job], subjects: Mapping[str, str],
               documents: Mapping[str, list[FaxDocument]]) -> list[Work]:
    """The claimed ``jobs`` as units of work: one per mail and account, in claim order."""
    groups: dict[tuple[str, str], list[Job]] = {}
    for job in jobs:
        groups.setdefault((job.mail_id, job.account), []).append(job)
    return [Work(jobs=group, subject=subjects.get(mail_id, ""),
                 documents=documents.get(mail_id, []))
            for (mail_id, _), group in groups.items()]


def handoff_of(sent: int, pending: int, failed: int) -> Handoff:
    """A received fax's hand-off from how many of its mails were sent, wait, or failed. A
    mail refused for good does not block once a later delivery (``mailfax redeliver``) went
    out; one still pending always waits."""
    if pending:
        return "waiting"
    if sent:
        return "handed_off"
    return "failed" if failed else "waiting"


class IllegalTransition(Exception):
    pass


# The longest window a quota counts over (a day: ``pages_per_day``). The service-wide totals
# per 300 s (job_created_totals) are kept QUOTA_TOTALS_DAYS, this and a day to spare for the
# clocks of instances and database, then purged with the other kinds (``quota_totals``).
LONGEST_QUOTA_WINDOW = 86400.0
QUOTA_TOTALS_DAYS = 2 * LONGEST_QUOTA_WINDOW / 86400


@dataclass(frozen=True)
class Quota:
    """A limit that :meth:`Store.add_mail_jobs` checks in the transaction that stores a mail's
    jobs, counting what is stored and what is being stored under one lock, so parallel mails
    cannot all pass a check made before any of them was stored."""

    key: str  # what the limit belongs to ("user alice", "service"); one lock per key
    who: str  # for the refusal: "user alice", "this service"
    limit: int
    unit: Literal["faxes", "pages"]  # jobs, or pages times jobs
    window_seconds: float  # counted over this long up to now
    senders: tuple[str, ...] | None = None  # whose jobs count (``usage_since``); None: all

    def __post_init__(self) -> None:
        if not 0 < self.window_seconds <= LONGEST_QUOTA_WINDOW:  # the totals kept no longer
            raise ValueError(f"a quota's window is up to {LONGEST_QUOTA_WINDOW:g} s, "
                             f"not {self.window_seconds:g}")

    @property
    def period(self) -> str:
        per = {3600.0: "hour", 86400.0: "day"}.get(self.window_seconds,
                                                    f"{self.window_seconds:g} s")
        return f"{self.unit} per {per}"

    def needs(self, jobs: int, pages: int) -> int:
        """How much of this quota a mail of ``jobs`` jobs with ``pages`` pages each takes."""
        return jobs if self.unit == "faxes" else jobs * pages


class QuotaExceeded(Exception):
    """A mail's jobs would go over a quota; nothing of the mail was stored."""

    def __init__(self, quota: Quota, used: int, adding: int):
        super().__init__(f"{quota.who}: {used} + {adding} > {quota.limit} {quota.period}")
        self.quota = quota
        self.used = used
        self.adding = adding


def first_exceeded(quotas: Sequence[Quota], used: Sequence[int], jobs: int,
                   pages: int) -> QuotaExceeded | None:
    """The first of ``quotas`` (with these counts ``used``) the mail would exceed."""
    for quota, count in zip(quotas, used, strict=True):
        adding = quota.needs(jobs, pages)
        if count + adding > quota.limit:
            return QuotaExceeded(quota, count, adding)
    return None


# Jobs a purge may take (with their mail): final ones and unconfirmed ones, both backends.
ENDED_STATES: tuple[str, ...] = tuple(sorted(
    state.value for state in (*FINAL_STATES, JobState.UNCONFIRMED)))
PurgeKind = Literal["documents", "received_faxes", "outbox", "dsn", "history", "quota_totals"]
PURGE_KINDS: tuple[PurgeKind, ...] = ("documents", "received_faxes", "outbox", "dsn",
                                      "history", "quota_totals")  # the order a purge runs them



@dataclass(frozen=True)
class Purged:
    """What a purge of one kind deleted (or, in a dry run, would delete): ``items`` of it
    (documents, faxes, mails, jobs and fax records, the quotas' 300-s totals) and the
    ``bytes`` of content they held (none for the totals)."""

    kind: str
    items: int = 0
    bytes: int = 0

    def __add__(self, other: Purged) -> Purged:
        return Purged(self.kind, self.items + other.items, self.bytes + other.bytes)


class Store(Protocol):
    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def add_mail_jobs(
        self, mail: NewMail, jobs: Sequence[NewJob], documents: Sequence[FaxDocument],
        quotas: Sequence[Quota] = (),
    ) -> None:
        """Store a mail's jobs and documents; durable when it returns (before the 250).

        With ``quotas``, only if none of them would be exceeded, counted in the same
        transaction (over every instance on this store); else raise :class:`QuotaExceeded`
        and store nothing.
        """
        ...

    async def record_readiness(self, verdict: ReadinessVerdict) -> list[str]:
        """Record a mail's after-the-250 check in its jobs, in one transaction: for each job
        whose ``options["readiness"]`` is still "pending", the findings go into its options
        (``warnings``), the mark becomes ``verdict.outcome``, an event (queued, with
        ``verdict.detail``; mailed when ``verdict.notify``) is logged unless the job was
        cancelled, and — if it is still queued and untried — its hold ends: due at
        ``verdict.release_at`` (or now). A job
        already recorded is left alone, so a second check adds nothing. Returns the ids of
        the jobs recorded."""
        ...

    async def pending_readiness(self, limit: int) -> list[Job]:
        """Queued jobs whose after-the-250 check was not recorded (``options["readiness"]``
        is "pending"), oldest first: asked once at start-up, for the checks a stop cut
        short."""
        ...

    async def claim_work(self, owner: str, limit: int, lease_seconds: float,
                         account_limits: Mapping[str, int],
                         finished: Sequence[Outcome] = (),
                         rules: ClaimRules = DEFAULT_RULES,
                         spool: Path | None = None) -> list[Work]:
        """Record ``finished``, then lease up to ``limit`` jobs that wait for the dispatcher
        and are due now, and load what they need to be sent: their mail's subject and
        documents (a large one into a file in ``spool``, as :meth:`load_documents` does).
        Normal jobs are claimed before bulk ones, then by due time; ``rules`` hold some back
        (see :class:`ClaimRules`).

        ``account_limits`` ({account: most sends at once}): only jobs of those accounts are
        claimed, each account up to its limit minus the live leases it already has — the
        leases of every instance on this store, so the limit holds across all of them. The
        key :data:`OTHER_ACCOUNTS` stands for every account not named (no lease count: at most
        that many of them in this claim).

        One transaction, because this is what a dispatcher does whenever sends end: the slots
        the finished sends free are claimable in the same step, so a freed slot costs one
        round trip, not three. An outcome whose job is no longer in its ``expected`` states
        is skipped (as :meth:`record` returning False); one the state table refuses, or of a
        job that does not exist, is skipped and logged as an error (a bug) — the others and
        the claim still count, as the claimed jobs must then be sent.
        """
        ...

    async def renew_leases(self, owner: str, job_ids: Sequence[str],
                           lease_seconds: float) -> int:
        """Extend the leases that ``owner`` holds on these jobs (still waiting to be sent) to
        ``lease_seconds`` from now; returns how many it still held."""
        ...

    async def release_leases(self, owner: str | None = None) -> int: ...

    async def next_due_time(self, rules: ClaimRules = DEFAULT_RULES) -> datetime | None:
        """When the next job comes due that ``rules`` let a claim take (one whose number's
        line is in use counts as not due: the end of that call wakes the dispatcher)."""
        ...

    async def number_busy(self, number: str, backoff_seconds: Sequence[float]) -> datetime:
        """A call to ``number`` found it busy: no job to it is claimed before the time
        returned, the next step of ``backoff_seconds`` (3, 6, 12 min: one step further per
        busy result in a row; the count starts over once the number was not busy for the
        last step's length). Seen by every instance on this store."""
        ...

    async def load_documents(self, mail_id: str, spool: Path | None = None
                             ) -> list[FaxDocument]:
        """A mail's documents, in order. With ``spool`` (a folder) a large one is read into
        an unlinked file there, piece by piece, rather than into memory (its data a
        :class:`~mailfax.documents.mapped.DocumentMap`); into memory after all when that
        file cannot be written (a full disk)."""
        ...

    async def record(self, job_id: str, transition: Transition,
                     expected: Sequence[JobState] | None = None) -> bool:
        """Move a job to a new state (checked against the state table) and log the event.

        With ``expected``, only when the job is in one of those states; returns whether it moved.
        Clears the job's lease.
        """
        ...

    async def record_all(self, outcomes: Sequence[Outcome]) -> list[bool]:
        """:meth:`record` for many jobs in one transaction (one round trip): for each
        outcome, whether its job moved. One the state table refuses, or of a job that does
        not exist, is logged as an error and did not move (as in :meth:`claim_work`)."""
        ...

    async def tracked_jobs(self, account: str) -> list[Job]:
        """Jobs handed to the provider whose outcome is not known yet."""
        ...

    async def lost_answers_before(self, before: datetime, limit: int) -> list[Job]:
        """Unconfirmed jobs still looked for at their provider (reason
        :data:`~mailfax.reasons.ANSWER_LOST`; the "may have been sent" mail not yet
        recorded) last changed before ``before``, oldest first, up to ``limit``."""
        ...

    async def reopen_job(self, job_id: str, detail: str) -> Job | None:
        """The deliberate resend (``mailfax retry``): a job in one of
        :data:`~mailfax.model.RETRYABLE_STATES` goes back to queued, due now, with its
        provider job id, attempt count, cancel request and acknowledgement cleared, and an
        event logged (not mailed). Returns the job as it is now (unchanged when its state is
        not retryable), or None when there is no such job."""
        ...

    async def get_job(self, job_id: str) -> Job | None: ...

    async def get_jobs(self, job_ids: Sequence[str]) -> list[Job]:
        """The jobs that exist among ``job_ids``, in one query (order not kept)."""
        ...

    async def get_mail(self, mail_id: str) -> Mail | None: ...

    async def open_jobs(self, mail_id: str) -> int:
        """How many jobs of a mail have not ended (:data:`ENDED_STATES`): a cheap look
        before :meth:`mail_jobs`, asked at every ended job of a broadcast list."""
        ...

    async def last_summary_at(self, mail_id: str) -> datetime | None:
        """When the last summary mail (outbox kind "summary") of a broadcast mail was
        queued, None if none is (any more): so one is sent once per state of its jobs."""
        ...

    async def mail_jobs(self, mail_id: str) -> list[Job]:
        """The jobs of one mail, in the order they were stored (a broadcast's summary)."""
        ...

    async def get_mails(self, mail_ids: Sequence[str]) -> list[Mail]:
        """The mails that exist among ``mail_ids``, in one query (order not kept)."""
        ...

    async def list_jobs(self, limit: int = 1000, state: JobState | None = None) -> list[Job]: ...

    async def usage_since(self, since: datetime, senders: Sequence[str] | None = None
                          ) -> tuple[int, int]:
        """(jobs, pages) created since ``since`` by these envelope senders (``"@domain"`` for a
        whole domain; None: everyone); for quotas."""
        ...

    async def job_events(self, job_id: str) -> list[Event]: ...

    async def request_cancel(self, job_id: str) -> Job | None: ...

    async def pending_notifications(self, limit: int) -> list[Event]:
        """Events still to be notified (a plain look; see :meth:`claim_notifications`)."""
        ...

    async def claim_notifications(self, owner: str, limit: int,
                                  lease_seconds: float) -> list[Event]:
        """Pending events for ``owner`` to notify: leased to it, so another instance does not
        take them until the lease runs out (events it already holds are handed out again)."""
        ...

    async def complete_notifications(
            self, completed: Sequence[tuple[int, Sequence[OutgoingMail]]]) -> None:
        """For each (event id, mails): queue the mails for the event (a status mail, a bounce,
        both or none) and mark it done, all in one transaction — only if it is not done yet
        (then its mails are dropped), so an event is never mailed twice even if two instances
        handled it."""
        ...

    async def enqueue_mail(self, mail: OutgoingMail) -> int: ...

    async def spool_mail(self, envelope_from: str, recipients: Sequence[str], client: str,
                         user: str | None, message: bytes) -> int:
        """Keep a received mail for later intake; durable when it returns (before the 250)."""
        ...

    async def claim_spooled(self, limit: int, lease_seconds: float) -> list[SpooledMail]:
        """The oldest spooled mails, in order, leased for ``lease_seconds`` (another instance
        takes them only once the lease ran out: a crash never loses one)."""
        ...

    async def unspool_mail(self, spool_id: int) -> None: ...

    async def status_mails_since(self, recipient: str, since: datetime) -> int:
        """Status mails about jobs (not bounces) queued for ``recipient``, compared without
        case, since ``since``: by every instance on this store."""
        ...

    async def due_outbox(self, limit: int) -> list[OutboxItem]:
        """Mails due for delivery (a plain look; see :meth:`claim_outbox`)."""
        ...

    async def claim_outbox(self, owner: str, limit: int, lease_seconds: float
                           ) -> list[OutboxItem]:
        """Due mails for ``owner`` to deliver, leased to it like :meth:`claim_notifications`."""
        ...

    async def outbox_sent(self, item_id: int) -> None: ...

    async def outbox_retry(self, item_id: int, next_attempt_at: datetime, error: str) -> None: ...

    async def outbox_give_up(self, item_id: int, error: str) -> None: ...

    async def clear_cancel_request(self, job_id: str) -> None: ...

    async def outbox_next_due(self) -> datetime | None: ...

    async def outbox_depth(self) -> int: ...

    async def probe_write(self) -> None:
        """Commit one small write (raises when the store cannot write: read-only, disk
        full, a standby server): what ``/readyz`` asks, as a read succeeds in those cases."""
        ...

    async def counts(self) -> dict[str, dict[str, int]]:
        """{"jobs": {state: n}, "inbound": {state: n}}, for metrics."""
        ...

    async def unacknowledged_final_jobs(self, account: str, limit: int) -> list[Job]:
        """Final jobs whose status mails are all handed off but the provider was not told."""
        ...

    async def mark_acknowledged(self, job_ids: Sequence[str]) -> None: ...

    # -- received faxes --

    async def add_inbound_fax(self, account: str, fax: InboundFax) -> InboundRecord:
        """Store a fetched fax (idempotent per account and fax id); returns what is stored."""
        ...

    async def inbound_image(self, account: str, fax_id: str) -> bytes: ...

    async def queue_inbound_mails(self, account: str, fax_id: str,
                                  mails: Sequence[OutgoingMail], pages: int | None = None
                                  ) -> None:
        """Put a fax's mails into the outbox and mark it queued (a fax already deleted at
        the provider stays so), atomically. ``pages``: the count the conversion found, which
        replaces the provider's."""
        ...

    async def inbound_handoff(self, account: str, fax_id: str) -> Handoff:
        """Where this fax's mails are: ``handed_off`` when one was sent (relay took it,
        Maildir synced) and none is pending; ``failed`` when none is pending and none was sent
        (refused for good: waiting cannot help); ``waiting`` otherwise, also with no mail."""
        ...

    async def mark_inbound_deleted(self, account: str, fax_id: str) -> None: ...

    async def mark_inbound_screened(self, account: str, fax_id: str, state: str) -> None:
        """``blocked`` or ``duplicate``: a fax that is not mailed (it is deleted at the
        provider next, and keeps this state after)."""
        ...

    async def list_inbound(self, limit: int = 1000) -> list[InboundRecord]: ...

    async def find_inbound(self, fax_id: str) -> list[InboundRecord]: ...

    # -- retention ---------------------------------------------------------------------------

    async def purge(self, kind: PurgeKind, before: datetime, *, dry_run: bool = False,
                    batch_size: int = 200) -> Purged:
        """Delete the data of ``kind`` that is older than ``before`` (see
        :class:`~mailfax.config.RetentionSettings`), ``batch_size`` rows per transaction so
        no lock is held for long; with ``dry_run``, only count it."""
        ...

    async def reclaim_space(self) -> int:
        """Give the space freed by purges back to the file system where the backend does not
        reuse it by itself (SQLite: incremental vacuum); the bytes given back."""
        ...

    def retention_lock(self) -> AbstractAsyncContextManager[bool]:
        """Held while purging: yields False when another instance holds it (then skip)."""
        ...

    # -- the bundled emulator's fax network (providers.base.EmulatorNetwork) -----------------

    async def emulator_submit(self, account: str, reference: str, number: str,
                              pages: int) -> tuple[str, bool]: ...

    async def emulator_transmissions(self, account: str, provider_job_ids: Sequence[str]
                                     ) -> dict[str, EmulatedTransmission]: ...

    async def emulator_cancel(self, account: str, provider_job_id: str) -> None: ...
