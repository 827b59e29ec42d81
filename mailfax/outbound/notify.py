"""The notifier: turns job events into status mails, rendered from ``templates/``.

Each event is handled exactly once: its mail (or the decision not to send one) is written to
the outbox in the same transaction that marks the event done. With several instances on one
store, events are leased to the instance that renders them (``claim_notifications``), and the
store adds an event's mails only if the event was not done yet.
"""

from __future__ import annotations

import asyncio
import email.policy
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from email.headerregistry import Address
from email.message import EmailMessage
from email.policy import Policy
from email.utils import format_datetime, make_msgid
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

from mailfax import reasons
from mailfax.config import AccountSettings, NotifySettings
from mailfax.documents.readiness import checked_after_acceptance, is_check_event
from mailfax.model import JobState
from mailfax.numbers import format_international
from mailfax.outbound.accounts import Pause
from mailfax.outbound.broadcast import (
    broadcast_of,
    compose_summary,
    may_end_broadcast,
    render_summary,
    summary_due,
    wants_job_mail,
)
from mailfax.outbound.dsn import build_dsn, dsn_status_for
from mailfax.outbound.report_mail import (
    ReportAttachments,
    attach,
    report_attachments,
    wants_document,
)
from mailfax.store.base import Event, Job, Mail, OutgoingMail, Store
from mailfax.support.lazy import lazy_module
from mailfax.support.waiting import wait_for_event
from mailfax.trust.policy import split_address, status_mail_allowed

if TYPE_CHECKING:
    import jinja2

    from mailfax.providers.base import FaxDocument
else:  # 0.05 s to import: the first status mail loads it, not serve's start-up
    jinja2 = lazy_module("jinja2")

log = logging.getLogger(__name__)

NOTIFY_LEASE_SECONDS = 30.0
# Woken by a stored job, the notifier waits this long before it claims: the events of a burst
# of mails are claimed together. Claiming at once took the events of one or two mails a pass,
# three store calls each time (claim, jobs, mails): more of the writer's time than the
# intake's own. A status mail is no later by a tenth of a second that anyone can tell.
NOTIFY_GATHER_SECONDS = 0.1


def _templates_dir() -> Path:
    """The templates installed inside the package (``mailfax/templates``: setup.py maps the
    repository's templates/ there, so a wheel carries them in any prefix, venv or --target
    directory), else the repository's templates/ (a checkout or an editable install)."""
    package = Path(__file__).resolve().parents[1]
    installed = package / "templates"
    if installed.is_dir():
        return installed
    return package.parent / "templates"


TEMPLATES_DIR = _templates_dir()

# Which notification an event is, if any (submitted/sending are never mailed).
EVENT_KINDS: dict[JobState, str] = {
    JobState.QUEUED: "accepted",
    JobState.RETRYING: "retrying",
    JobState.DELIVERED: "delivered",
    JobState.FAILED: "failed",
    JobState.CANCELLED: "cancelled",
    JobState.UNCONFIRMED: "unconfirmed",
}
# Always mailed, whatever ``notify.events`` says, and to the admin too: only a person can
# decide whether to send the fax again (``mailfax retry``).
ALWAYS_MAILED = frozenset({"unconfirmed"})
# Mailed, whatever ``notify.events`` says, when the job carries fax-readiness warnings (pages
# that may arrive blank or black): the sender can still cancel it and send a better one. A
# job checked after its 250 ("warn") gets its acceptance mail from the event that records
# its check (:func:`acceptance_waits`), not from that of its creation.
MAILED_WITH_WARNINGS = frozenset({"accepted"})


DELAYED = "delayed"  # the reason code the dispatcher gives a job's one delay notice


def event_kind(event: Event) -> str | None:
    """The notification an event is: by its state, except the one "delayed" notice, a
    retry whose reason says so."""
    if event.state == JobState.RETRYING and event.reason and event.reason.code == DELAYED:
        return "delayed"
    return EVENT_KINDS.get(event.state)


def acceptance_waits(kind: str, job: Job, event: Event) -> bool:
    """Whether this is the creation event of a job whose fax-readiness check follows its
    250: its acceptance mail comes with the event of the check, which has the findings."""
    return kind == "accepted" and checked_after_acceptance(job.options) and \
        not is_check_event(event.detail)


def sender_wants(kind: str, options: dict[str, Any]) -> bool:
    """The per-mail option ``notify`` (``X-Fax-Notify``): "none" or "failure" (only the
    failure mail); absent or "all": what ``notify.events`` says."""
    wanted = options.get("notify", "all")
    return wanted == "all" or (wanted == "failure" and kind == "failed")


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    total = round(seconds)
    return f"{total // 60}:{total % 60:02d}"


@dataclass(frozen=True)
class StatusMail:
    subject: str
    text: str
    html: str


class Renderer:
    """Renders status mails from ``<templates>/<language>/status.{subject,txt,html}``."""

    def __init__(self, templates_dir: Path = TEMPLATES_DIR):
        self.templates_dir = templates_dir

    @cached_property
    def text_env(self) -> jinja2.Environment:
        return jinja2.Environment(loader=jinja2.FileSystemLoader(str(self.templates_dir)),
                                  autoescape=False, undefined=jinja2.StrictUndefined,
                                  keep_trailing_newline=True)

    @cached_property
    def html_env(self) -> jinja2.Environment:
        return jinja2.Environment(loader=jinja2.FileSystemLoader(str(self.templates_dir)),
                                  autoescape=True, undefined=jinja2.StrictUndefined)

    def render(self, kind: str, job: Job, mail: Mail, event: Event,
               language: str, zone: tzinfo = UTC, report_image: str = "") -> StatusMail:
        """``zone``: the time zone of the times shown (``notify.timezone``);
        ``report_image``: the Content-ID of page 1 as faxed, when the mail carries it."""
        context: dict[str, Any] = {
            "kind": kind,
            "job": job,
            "number": format_international(job.number),
            "pages": job.pages,
            "duration": format_duration(job.duration_seconds),
            "reason": event.reason.for_language(language) if event.reason else "",
            "reason_code": event.reason.code if event.reason else "",
            "detail": event.detail,
            "warnings": job.options.get("warnings", []) if kind == "accepted" else [],

            "partial": reasons.partial_pages(event.reason),  # (sent, submitted) or None
            "report_image": report_image,
            "original_subject": mail.subject,
            # A job queued with ``mailfax send`` came with no mail to reply to: its "subject"
            # is the file name (or --subject), and the templates say so instead of "Re: …".
            "from_mail": not is_cli_mail(mail),
            "received_at": mail.received_at.astimezone(zone),
            "at": event.at.astimezone(zone),
            "next_attempt_at": job.next_attempt_at.astimezone(zone) if job.next_attempt_at
            else None,
        }
        return self.render_named("status", language, context)

    def render_named(self, name: str, language: str, context: Mapping[str, Any]) -> StatusMail:
        """``<language>/<name>.{subject,txt,html}`` with ``context``; the subject on one line."""
        subject = self.text_env.get_template(f"{language}/{name}.subject").render(context)
        return StatusMail(
            subject=" ".join(subject.split()),
            text=self.text_env.get_template(f"{language}/{name}.txt").render(context),
            html=self.html_env.get_template(f"{language}/{name}.html").render(context),
        )


def header_policy(recipient: str) -> Policy:
    return email.policy.default if recipient.isascii() else email.policy.default.clone(utf8=True)


CLI_CLIENT = "cli"  # the client address of jobs queued with ``mailfax send``


def is_cli_mail(mail: Mail) -> bool:
    return mail.client_address == CLI_CLIENT and mail.message_id is None


def compose(status: StatusMail, job: Job, mail: Mail, settings: NotifySettings) -> EmailMessage:
    """A reply to the original mail: threaded, marked as automatic (RFC 3834).

    Non-ASCII text in headers goes out as encoded words, which every relay takes; only a
    mail to an internationalised address (an SMTPUTF8 sender's) carries raw UTF-8 headers,
    since such an address cannot be encoded (RFC 6532) and needs an SMTPUTF8 relay anyway.
    """
    message = EmailMessage(policy=header_policy(mail.envelope_from))
    _, from_domain = split_address(settings.from_address)
    message["From"] = Address(settings.from_name, addr_spec=settings.from_address)
    message["To"] = mail.envelope_from
    message["Subject"] = status.subject
    message["Date"] = format_datetime(datetime.now(UTC), usegmt=True)
    message["Message-ID"] = make_msgid(idstring=f"{job.id}", domain=from_domain or "mailfax")
    if mail.message_id:
        message["In-Reply-To"] = mail.message_id
        message["References"] = " ".join([*mail.references, mail.message_id][-20:])
    message["Auto-Submitted"] = "auto-replied"
    message["X-Mailfax-Job"] = job.id
    message["X-Mailfax-State"] = job.state.value
    message.set_content(status.text)
    message.add_alternative(status.html, subtype="html")
    return message


def _header_line(name: str, value: str) -> str:
    """One header of the original for a DSN's text/rfc822-headers part, with non-ASCII text
    as encoded words, as the original would have carried it without SMTPUTF8."""
    parsed = email.policy.SMTP.header_factory(name, value)
    return str(email.policy.SMTP.fold(name, parsed))


class Notifier:
    def __init__(self, store: Store, settings: NotifySettings, renderer: Renderer,
                 on_queued: Callable[[], None] = lambda: None, poll_seconds: float = 5.0,
                 mails_per_hour: int = 60, fax_domain: str = "fax.local",
                 hostname: str = "mailfax.localhost", owner: str = "mailfax",
                 admin_address: str | None = None,
                 accounts: Mapping[str, AccountSettings] | None = None,
                 spool: Path | None = None):
        self.owner = owner
        self.spool = spool  # where a large document is read to for the transmission report
        # For the transmission report: each account's provider and return_document.
        self.accounts = dict(accounts or {})
        self.admin_address = admin_address
        self.fax_domain = fax_domain
        self.hostname = hostname
        self.store = store
        self.settings = settings
        self.zone = ZoneInfo(settings.timezone)
        self.renderer = renderer
        self.on_queued = on_queued
        self.poll_seconds = poll_seconds
        self._wake = asyncio.Event()
        self.mails_per_hour = mails_per_hour
        # The documents of the mail whose status mails were made last (see _documents_of).
        self._last_documents: tuple[str, list[FaxDocument]] | None = None

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        limit = 100
        while True:
            self._wake.clear()
            handled = await self.handle_pending(limit)
            if handled >= limit:
                continue  # more are waiting
            if not handled:
                await wait_for_event(self._wake, self.poll_seconds)
            await asyncio.sleep(NOTIFY_GATHER_SECONDS)

    async def handle_pending(self, limit: int = 100) -> int:
        events = await self.store.claim_notifications(self.owner, limit, NOTIFY_LEASE_SECONDS)
        deadline = time.monotonic() + NOTIFY_LEASE_SECONDS / 2
        jobs, mails = await self._jobs_and_mails(
            [event for event in events if event_kind(event) is not None])
        # Events that mail nothing (a burst's "accepted" events: half the SQLite writer's
        # operations, one each) are completed together. An event's mails are stored before
        # the next event is looked at: its flood limit and a list's summary read the outbox.
        unstored: list[tuple[int, list[OutgoingMail]]] = []  # handled, not yet marked done
        try:
            for event in events:
                if time.monotonic() > deadline:
                    break  # the rest stay leased to us and come back with the next claim
                outgoing = await self._mails_for(event, jobs, mails)
                unstored.append((event.id, outgoing))
                if outgoing:
                    await self.store.complete_notifications(unstored)
                    unstored = []
                    self.on_queued()
        finally:  # what was made before an event that failed is still stored
            self._last_documents = None  # not held between claims
            if unstored:
                await self.store.complete_notifications(unstored)
        return len(events)

    def _mailed(self, kind: str, job: Job) -> bool:
        """Whether ``job`` gets this kind of mail: ``notify.events`` asks for it, it is
        always mailed, or the job carries fax-readiness warnings the mail tells of."""
        return (kind in self.settings.events or kind in ALWAYS_MAILED
                or (kind in MAILED_WITH_WARNINGS and bool(job.options.get("warnings"))))

    async def _jobs_and_mails(self, events: Sequence[Event]
                              ) -> tuple[dict[str, Job], dict[str, Mail]]:
        """The jobs and mails of a claim's events: two store calls, not two per event."""
        if not events:
            return {}, {}
        jobs = {job.id: job for job in await self.store.get_jobs(
            list(dict.fromkeys(event.job_id for event in events)))}
        mail_ids = list(dict.fromkeys(job.mail_id for job in jobs.values()))
        return jobs, {mail.id: mail for mail in await self.store.get_mails(mail_ids)}

    async def _mails_for(self, event: Event, jobs: Mapping[str, Job],
                         mails: Mapping[str, Mail]) -> list[OutgoingMail]:
        kind = event_kind(event)
        job = jobs.get(event.job_id) if kind is not None else None
        if kind is not None and job is not None and broadcast_of(job):
            return await self._broadcast_mails(kind, job, event, jobs, mails)
        return await self._job_mails(event, jobs, mails)

    async def _broadcast_mails(self, kind: str, job: Job, event: Event, jobs: Mapping[str, Job],
                               mails: Mapping[str, Mail]) -> list[OutgoingMail]:
        """A broadcast list's job: its own status mail only if asked for; the list's one
        summary if this event is the one that sends it (mailfax/outbound/broadcast.py)."""
        own = await self._job_mails(event, jobs, mails) if wants_job_mail(kind, job) else []
        if not may_end_broadcast(event, job) or await self.store.open_jobs(job.mail_id):
            return own  # cheap looks first: a list may have thousands of jobs
        listed = await self.store.mail_jobs(job.mail_id)
        if not summary_due(event, job, listed, await self.store.last_summary_at(job.mail_id)):
            return own
        mail = mails.get(job.mail_id)
        if mail is None:
            return own
        if not status_mail_allowed(mail.envelope_from, mail.auto_submitted, mail.precedence):
            log.info("mail %s: no broadcast summary to <%s> (automatic or bounce)", mail.id,
                     mail.envelope_from)
            return own
        return [*own, self._summary_mail(job, mail, listed)]

    def _summary_mail(self, job: Job, mail: Mail, jobs: list[Job]) -> OutgoingMail:
        status = self._in_language(mail, "broadcast summary", lambda language: render_summary(
            self.renderer, mail, jobs, language, self.zone))
        message = compose_summary(status, mail, jobs, self.settings)
        log.info("mail %s: broadcast summary of %d jobs to <%s>", mail.id, len(jobs),
                 mail.envelope_from)
        return OutgoingMail(envelope_from="", recipients=[mail.envelope_from],
                            message=message.as_bytes(), job_id=job.id, kind="summary")

    async def _job_mails(self, event: Event, jobs: Mapping[str, Job],
                         mails: Mapping[str, Mail]) -> list[OutgoingMail]:
        kind = event_kind(event)
        job = jobs.get(event.job_id)
        mail = mails.get(job.mail_id) if job else None
        if kind is None or job is None or mail is None or not self._mailed(kind, job) \
                or acceptance_waits(kind, job, event):
            return []
        if kind in ALWAYS_MAILED:
            return self._unconfirmed_mail(kind, job, mail, event)
        if not sender_wants(kind, job.options):
            log.info("job %s: no %s mail: the sender asked for notify=%s", job.id, kind,
                     job.options.get("notify"))
            return []
        if not status_mail_allowed(mail.envelope_from, mail.auto_submitted, mail.precedence):
            log.info("job %s: no status mail to <%s> (automatic or bounce)", job.id,
                     mail.envelope_from)
            return []
        if await self._flooded(mail.envelope_from):
            log.warning("job %s: no status mail to <%s>: %d in the last hour already", job.id,
                        mail.envelope_from, self.mails_per_hour)
            return []
        status = self._status_mail(kind, job, mail, event, await self._attachments(
            job, mail, event))
        if kind != "failed" or self.settings.failure_format == "mail":
            return [status]
        bounce = self._bounce(job, mail, event)
        return [bounce] if self.settings.failure_format == "dsn" else [status, bounce]

    async def _flooded(self, recipient: str) -> bool:
        """Whether ``recipient`` had ``mails_per_hour`` status mails in the last hour. Counted
        in the store's outbox, so the limit holds over all instances (two instances deciding
        at the same moment may each send one more)."""
        since = datetime.now(UTC) - timedelta(hours=1)
        return await self.store.status_mails_since(recipient, since) >= self.mails_per_hour

    def _bounce(self, job: Job, mail: Mail, event: Event) -> OutgoingMail:
        """The failure as an RFC 3464 delivery status notification, from ``<>``."""
        language = mail.language or self.settings.language
        reason = event.reason
        human = (f"Your fax to {format_international(job.number)} could not be delivered.\n\n"
                 f"{reason.for_language(language) if reason else ''}\n")
        headers = "".join(_header_line(name, value) for name, value in (
            ("From", mail.from_header or mail.envelope_from), ("Subject", mail.subject),
            ("Message-ID", mail.message_id or ""),
            ("Date", format_datetime(mail.received_at))) if value)
        report = build_dsn(
            reporting_mta=self.hostname, original_envelope_from=mail.envelope_from,
            fax_address=f"{job.number}@{self.fax_domain}",
            status=dsn_status_for(reason.code if reason else "unknown", final=True),
            diagnostic=(f"{reason.code}: {reason.for_language('en')} {reason.detail or ''}"
                        if reason else "failed"),
            human_text=human, original_headers=headers, arrival_date=mail.received_at,
            from_address=f"Mail Delivery System <{self.settings.from_address}>",
            message_id=mail.message_id)
        return OutgoingMail(envelope_from="", recipients=[mail.envelope_from],
                            message=report.as_bytes(), job_id=job.id, kind="dsn")

    def _unconfirmed_mail(self, kind: str, job: Job, mail: Mail,
                          event: Event) -> list[OutgoingMail]:
        """The one "may have been sent" mail: to the sender (unless the mail was automatic
        or a bounce) and, as a copy, to the admin."""
        to_sender = status_mail_allowed(mail.envelope_from, mail.auto_submitted,
                                        mail.precedence)
        message = compose(self._render(kind, job, mail, event), job, mail, self.settings)
        recipients = [mail.envelope_from] if to_sender else []
        admin = self.admin_address
        if admin and admin.lower() != mail.envelope_from.lower():
            recipients.append(admin)
            if to_sender:
                message["Cc"] = admin
            else:
                message.replace_header("To", admin)
        if not recipients:
            return []
        return [OutgoingMail(envelope_from="", recipients=recipients,
                             message=message.as_bytes(), job_id=job.id, kind=kind)]

    def _render(self, kind: str, job: Job, mail: Mail, event: Event,
                report_image: str = "") -> StatusMail:
        return self._in_language(mail, f"status mail ({kind})", lambda language: (
            self.renderer.render(kind, job, mail, event, language, self.zone, report_image)))

    def _in_language(self, mail: Mail, what: str,
                     render: Callable[[str], StatusMail]) -> StatusMail:
        """``render`` in the mail's language; in English when that language's template fails."""
        language = mail.language or self.settings.language
        try:
            return render(language)
        except jinja2.TemplateError:
            log.exception("%s template for %s failed", what, language)
            return render("en")

    async def _attachments(self, job: Job, mail: Mail,
                           event: Event) -> ReportAttachments | None:
        """The transmission report (and the document as faxed) of a delivered or partly
        sent fax; None for other mails."""
        language = mail.language or self.settings.language
        account = self.accounts.get(job.account)
        with_document = wants_document(job, account.return_document if account else None,
                                       self.settings.return_document)
        provider = f"{job.account} ({account.provider})" if account else job.account
        return await report_attachments(self._documents_of, job, mail, event, language,
                                        self.zone, provider, with_document)

    async def _documents_of(self, mail_id: str) -> list[FaxDocument]:
        """A mail's documents, kept for the next report of the same mail: a mail to several
        numbers has its jobs' events side by side in a claim, so its documents are read
        once, not once per number (and only one mail's are held)."""
        if self._last_documents is None or self._last_documents[0] != mail_id:
            self._last_documents = None  # its files (a large one's) closed before the next
            self._last_documents = (mail_id, await self.store.load_documents(mail_id,
                                                                             self.spool))
        return self._last_documents[1]

    def _status_mail(self, kind: str, job: Job, mail: Mail, event: Event,
                     attachments: ReportAttachments | None = None) -> OutgoingMail:
        status = self._render(kind, job, mail, event,
                              attachments.image_cid if attachments else "")
        message = compose(status, job, mail, self.settings)
        if attachments is not None:
            attach(message, attachments)
        # The envelope sender of a status mail is empty, as for any automatic reply that
        # must not itself cause bounces to loop back (RFC 3834, 5321 §4.5.5).
        return OutgoingMail(envelope_from="", recipients=[mail.envelope_from],
                            message=message.as_bytes(), job_id=job.id, kind=kind)


class AdminAlerts:
    """Mails to the administrator (the postmaster), through the outbox like status mails:
    an account paused because its provider refused it as a whole."""

    def __init__(self, store: Store, renderer: Renderer, settings: NotifySettings,
                 admin_address: str, on_queued: Callable[[], None] = lambda: None):
        self.store = store
        self.renderer = renderer
        self.settings = settings
        self.admin_address = admin_address
        self.on_queued = on_queued

    async def account_paused(self, pause: Pause) -> None:
        context = {"account": pause.account, "since": pause.since,
                   "reason": pause.reason.for_language(self.settings.language),
                   "detail": pause.reason.detail, "code": pause.reason.code}
        language = self.settings.language
        env = self.renderer.text_env
        subject = env.get_template(f"{language}/admin.subject").render(context)
        message = EmailMessage()
        _, from_domain = split_address(self.settings.from_address)
        message["From"] = Address(self.settings.from_name, addr_spec=self.settings.from_address)
        message["To"] = self.admin_address
        message["Subject"] = " ".join(subject.split())
        message["Date"] = format_datetime(datetime.now(UTC), usegmt=True)
        message["Message-ID"] = make_msgid(idstring=f"account-{pause.account}",
                                           domain=from_domain or "mailfax")
        message["Auto-Submitted"] = "auto-generated"
        message["X-Mailfax-Account"] = pause.account
        message.set_content(env.get_template(f"{language}/admin.txt").render(context))
        await self.store.enqueue_mail(OutgoingMail(
            envelope_from="", recipients=[self.admin_address], message=message.as_bytes(),
            kind="admin"))
        self.on_queued()
