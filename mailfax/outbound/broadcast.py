"""The summary status mail of a broadcast list: one mail for all the faxes of a list mail.

A job that came from a list (``options["broadcast"]``, mailfax/intake/broadcast.py) gets no
status mail of its own (unless the list's ``job_mails = "failure"`` or the mail's ``notify``
option asks for some; an unconfirmed fax is always mailed, as it needs a person). Instead,
when the last job of the mail ends, one summary goes to the sender: a table of every number
of the list — delivered, failed with the reason, cancelled, may have been sent (unconfirmed),
or refused by the dial policy (those never became jobs).

Which event sends it: any event of the mail's jobs that finds every job ended (and is its
job's current state), unless a summary was queued since the last change of any of them
(``Store.last_summary_at``; the notifier handles events one after the other, each with its
mails in one transaction). So two events in one batch send one summary; two instances on
one PostgreSQL store handling the last two events at the same moment may send two, never
none. A job that changes again after the summary (``mailfax retry``, an unconfirmed fax
found) brings a new summary once every job has ended again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from email.message import EmailMessage
from email.utils import make_msgid
from typing import TYPE_CHECKING, Any

from mailfax.config import NotifySettings
from mailfax.model import JobState
from mailfax.numbers import format_international
from mailfax.store.base import ENDED_STATES, Event, Job, Mail
from mailfax.trust.policy import split_address

if TYPE_CHECKING:
    from mailfax.outbound.notify import Renderer, StatusMail

BROADCAST = "broadcast"  # the options key (OPTIONS.md); mailfax.intake.broadcast.BROADCAST
OUTCOMES = ("delivered", "failed", "cancelled", "unconfirmed", "refused")


def broadcast_of(job: Job) -> str:
    """The list a job came from, "" for a single fax."""
    value = job.options.get(BROADCAST)
    return value if isinstance(value, str) else ""


def wants_job_mail(kind: str, job: Job) -> bool:
    """Whether a list's job gets this status mail of its own besides the summary."""
    mode = job.options.get("notify")
    return kind == "unconfirmed" or mode == "all" or (mode == "failure" and kind == "failed")


def may_end_broadcast(event: Event, job: Job) -> bool:
    """Whether ``event`` (of ``job``, as it is now) can be the one that sends the summary:
    it ended the job, the job is still so, and the sender did not ask for no mails."""
    return event.state in ENDED_STATES and job.state == event.state and \
        job.options.get("notify") != "none"


def summary_due(event: Event, job: Job, jobs: Sequence[Job],
                last_summary: datetime | None) -> bool:
    """Whether ``event`` (of ``job``, as it is now) sends the summary of the mail whose jobs
    are ``jobs``, the last summary of which was queued at ``last_summary``."""
    if not may_end_broadcast(event, job):
        return False
    if any(other.state not in ENDED_STATES for other in jobs):
        return False
    return last_summary is None or last_summary < max(other.updated for other in jobs)


@dataclass(frozen=True)
class Row:
    index: int
    number: str  # as people read it
    name: str
    outcome: str  # one of OUTCOMES
    reason: str
    pages: int
    attempts: int


def summary_rows(jobs: Sequence[Job], language: str) -> list[Row]:
    """One row per number of the list, in the list's order: its jobs and the refused."""
    rows = [Row(index=int(job.options.get("broadcast_index", 0)),
                number=format_international(job.number),
                name=str(job.options.get("broadcast_name") or ""),
                outcome=job.state.value if job.state in ENDED_STATES else "unconfirmed",
                reason=job.reason.for_language(language)
                if job.reason and job.state != JobState.DELIVERED else "",
                pages=job.pages, attempts=job.attempts)
            for job in jobs]
    for job in jobs:
        for refused in job.options.get("broadcast_refused") or []:
            rows.append(Row(index=int(refused.get("index", 0)),
                            number=_readable(str(refused.get("number", ""))),
                            name=str(refused.get("name") or ""), outcome="refused",
                            reason=str(refused.get("reason") or ""), pages=0, attempts=0))
    return sorted(rows, key=lambda row: row.index)


def _readable(number: str) -> str:
    try:
        return format_international(number)
    except ValueError:
        return number


def render_summary(renderer: Renderer, mail: Mail, jobs: Sequence[Job], language: str,
                   zone: tzinfo = UTC) -> StatusMail:
    rows = summary_rows(jobs, language)
    counts = {outcome: sum(1 for row in rows if row.outcome == outcome) for outcome in OUTCOMES}
    context: dict[str, Any] = {
        "list_name": broadcast_of(jobs[0]),
        "rows": rows,
        "counts": counts,
        "total": len(rows),
        "pages": jobs[0].pages,
        "original_subject": mail.subject,
        "received_at": mail.received_at.astimezone(zone),
        "mail_id": mail.id,
    }
    return renderer.render_named("broadcast", language, context)


def compose_summary(status: StatusMail, mail: Mail, jobs: Sequence[Job],
                    settings: NotifySettings) -> EmailMessage:
    """The summary as a reply to the original mail (threaded, RFC 3834 automatic), made
    as a job's status mail is, but about the mail: its own Message-ID, no job header."""
    from mailfax.outbound.notify import compose

    message = compose(status, jobs[-1], mail, settings)
    _, from_domain = split_address(settings.from_address)
    message.replace_header("Message-ID", make_msgid(idstring=f"list-{mail.id}",
                                                    domain=from_domain or "mailfax"))
    del message["X-Mailfax-Job"]
    message.replace_header("X-Mailfax-State", "summary")
    message["X-Mailfax-Broadcast"] = broadcast_of(jobs[0])
    message["X-Mailfax-Mail"] = mail.id
    return message
