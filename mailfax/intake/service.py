"""What every intake (SMTP, LMTP, the CLI, later IMAP) asks: may this sender send, is this a
fax recipient, and "store this mail as jobs". No sockets here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from mailfax.config import BroadcastListSettings, Settings
from mailfax.documents.cover import CoverInfo, CoverUnavailable, cover_text, render_cover
from mailfax.documents.pdf import PAPERS, PageSetup
from mailfax.documents.readiness import PENDING, READINESS_OPTION, Finding, refusal_text
from mailfax.documents.readiness_pool import ReadinessPool
from mailfax.intake.assemble import (
    FaxContent,
    Refusal,
    assemble,
    convert_documents,
    needs_worker,
    nothing_to_fax,
    read_mail,
)
from mailfax.intake.broadcast import (
    BroadcastList,
    Expansion,
    ListRecipient,
    check_allowed,
    expand,
    find_list,
    list_name_of,
    load_lists,
)
from mailfax.intake.options import Clock, fax_header_fields, parse_mail_options
from mailfax.intake.readiness_check import ReadinessChecker, check_in_pool
from mailfax.intake.spool import MailBytes
from mailfax.model import new_job_id
from mailfax.numbers import FaxAddress, InvalidNumber, format_international, parse_fax_local_part
from mailfax.providers import capabilities
from mailfax.providers.base import FaxDocument
from mailfax.store.base import NewJob, NewMail, OutgoingMail, Quota, QuotaExceeded, Store
from mailfax.support.batches import BatchWorker
from mailfax.trust.authorization import (
    AuthorizationError,
    authorized_user,
    header_end,
    strip_headers,
)
from mailfax.trust.dialing import check_destination
from mailfax.trust.policy import (
    address_allowed,
    check_sender,
    from_trusted_network,
    is_fax_domain,
    quota_refusal,
    split_address,
)
from mailfax.web.metrics import Metrics

log = logging.getLogger(__name__)

# Mails up to this size are parsed on the event loop (well under 2 ms of CPU each); larger ones
# in a worker thread, so a big attachment never stalls the other SMTP sessions.
INLINE_ASSEMBLY_BYTES = 64 * 1024
HOUR = 3600.0
DAY = 86400.0
# Small mails' PDF checks, one after the other beside the event loop (support/batches.py).
PDF_CHECKS = BatchWorker("mailfax-pdf")


def quota_sentence(over: QuotaExceeded) -> str:
    """The refusal of a mail the store found over a quota, with the figures."""
    quota = over.quota
    sentence = quota_refusal(quota.who, quota.limit, over.used, over.adding, quota.period)
    assert sentence is not None  # over.used + over.adding > quota.limit
    return sentence


class StoreUnavailable(Exception):
    """The store could not take the jobs (database down, locked, its disk full): temporary."""


@dataclass(frozen=True)
class Accepted:
    mail_id: str
    job_ids: list[str]
    pages: int
    job_for_number: dict[str, str]  # E.164 number -> job id
    # documents.readiness findings of a check before the 250 (none in "warn": it follows it)
    warnings: list[Finding] = field(default_factory=list)
    broadcast: str = ""  # the broadcast list the mail went to
    refused: int = 0  # numbers of that list the dial policy refused


def page_setup(settings: Settings, account: str | None) -> PageSetup:
    """The paper an account's faxes go on (``paper``, ``documents.fit_to_paper``)."""
    return PageSetup(paper=PAPERS[settings.paper_for(account)],
                     fit_to_paper=settings.documents.fit_to_paper)


class Intake:
    def __init__(self, settings: Settings, store: Store,
                 on_stored: Callable[[], None] = lambda: None,
                 metrics: Metrics | None = None, secret_key: bytes | None = None):
        self.metrics = metrics
        self.settings = settings
        self.store = store
        self.on_stored = on_stored
        self.secret_key = secret_key  # checks the policy service's headers; None: refused
        # Large mails being received, the large parts decoded from them, and the documents
        # handed to the readiness workers: unlinked files, or gone after their use.
        self.spool_folder = settings.data_dir / "spool"
        self.wake_outbox: Callable[[], None] = lambda: None
        self.wake_spool: Callable[[], None] = lambda: None  # smtp.accept = "spool"
        # Pure for a given configuration, and asked twice per recipient (RCPT, then DATA).
        self.check_recipient = functools.lru_cache(maxsize=4096)(self._check_recipient)
        self.clock: Callable[[], datetime] = lambda: datetime.now(UTC)  # read by the options
        # The broadcast lists, read at the first use (``serve`` reads them at start, in a
        # thread) and again if the settings' lists change.
        self._lists: tuple[dict[str, BroadcastListSettings], dict[str, BroadcastList]] | None \
            = None
        # A list's numbers past the dial policy and a user's prefixes: asked at RCPT and
        # again at DATA (twice there for a policy-service user); pure for given lists.
        self._checked_numbers = functools.lru_cache(maxsize=64)(self._check_numbers)
        # documents.readiness: the worker processes (made at the first check) and, in the
        # application, the loop that checks "warn" mails after their 250 (without it they
        # are checked before it, as in "refuse").
        self.readiness_pool: ReadinessPool | None = None
        self.readiness_checker: ReadinessChecker | None = None

    def check_sender(self, envelope_from: str, client_ip: str | None,
                     user: str | None = None) -> None:
        """A logged-in user may send only with its own addresses; anyone else only from a
        trusted network (and, if listed, an allowed address or domain)."""
        if user is not None:
            settings = self.settings.users.get(user)
            if settings is None or not address_allowed(envelope_from, settings.addresses):
                raise Refusal(550, "5.7.1", f"Not allowed: user {user} may not send as "
                              f"<{envelope_from}>.")
            return
        verdict = check_sender(envelope_from, client_ip, self.settings.senders)
        if not verdict.allowed:
            hint = " Log in (SMTP AUTH) first." if self.settings.users else ""
            raise Refusal(550, "5.7.1", f"Not allowed: {verdict.reason}.{hint}")

    async def check_rcpt(self, envelope_from: str, address: str, user: str | None,
                         pending: int, usage: dict[str, int] | None = None
                         ) -> FaxAddress | ListRecipient:
        """The RCPT stage's checks of one fax recipient, in order: the number and the dial
        policy, the user's prefixes, the hourly quotas. mailfax's SMTP/LMTP listeners and
        its Postfix policy service (trust/policy_service.py) both ask this. A broadcast
        list's address: who may use it, and the quotas for its numbers."""
        if self.is_list_address(address):
            return await self.check_list_rcpt(envelope_from, address, user, pending, usage)
        fax = self.check_recipient(address)
        self.check_user_destination(fax, user)
        await self.check_rate(envelope_from, user, pending, usage)
        return fax

    # -- broadcast lists (mailfax/intake/broadcast.py) --

    def broadcast_lists(self) -> dict[str, BroadcastList]:
        """The lists of the settings in use, read once per settings (ConfigError if bad)."""
        if self._lists is None or self._lists[0] is not self.settings.lists:
            self._lists = (self.settings.lists, load_lists(self.settings))
            self._checked_numbers.cache_clear()
        return self._lists[1]

    def is_list_address(self, address: str) -> bool:
        return list_name_of(address, self.settings) is not None

    async def check_list_rcpt(self, envelope_from: str, address: str, user: str | None,
                              pending: int, usage: dict[str, int] | None) -> ListRecipient:
        """A list address at RCPT: 550 5.1.1 for an unknown list, 550 5.7.1 for a sender
        the list does not allow; the hourly quotas for its numbers that may be dialled."""
        expansion = self.expand_list(envelope_from, address, user)
        await self.check_rate(envelope_from, user, pending + len(expansion.addresses) - 1,
                              usage)
        return ListRecipient(expansion.broadcast.name, len(expansion.addresses))

    def expand_list(self, envelope_from: str, address: str, user: str | None) -> Expansion:
        broadcast, tag = find_list(address, self.broadcast_lists(), self.settings)
        check_allowed(broadcast, envelope_from)
        return self._checked_numbers(broadcast.name, tag, user)

    def _check_numbers(self, name: str, tag: str, user: str | None) -> Expansion:
        domain = self.settings.fax_domains[0]

        def check(fax: FaxAddress) -> None:
            self.check_recipient(f"{fax.number}@{domain}")  # the dial policy
            self.check_user_destination(fax, user)

        return expand(self.broadcast_lists()[name], tag, check)

    def probe_recipient(self, address: str) -> FaxAddress | ListRecipient:
        """An MTA's verification probe: does the number (or the list) exist here?"""
        if not self.is_list_address(address):
            return self.check_recipient(address)
        broadcast, _ = find_list(address, self.broadcast_lists(), self.settings)
        return ListRecipient(broadcast.name, len(broadcast.entries))

    def _expansion_of(self, envelope_from: str, recipients: Sequence[str],
                      user: str | None) -> Expansion | None:
        """The list a mail goes to (it must then be its only fax recipient), or None."""
        lists = [address for address in recipients if self.is_list_address(address)]
        if not lists:
            return None
        if len(recipients) > 1:
            raise Refusal(550, "5.5.3", "A mail to a broadcast list may have no other fax "
                          "recipient; send one mail per list.")
        return self.expand_list(envelope_from, lists[0], user)

    def check_user_destination(self, fax: FaxAddress, user: str | None) -> None:
        settings = self.settings.users.get(user) if user else None
        if settings and settings.allowed_prefixes and not fax.number.startswith(
                tuple(settings.allowed_prefixes)):
            raise Refusal(550, "5.7.1", f"User {user} may not send faxes to {fax.number} "
                          f"(allowed: {', '.join(settings.allowed_prefixes)}).")

    async def check_rate(self, envelope_from: str, user: str | None, pending: int,
                         usage: dict[str, int] | None = None) -> None:
        """Faxes per hour, for the user and for everyone; ``pending`` are the recipients of
        this mail accepted so far. ``usage``, kept by the caller for one envelope, holds the
        stored counts once read, so they are queried once per mail, not on every RCPT."""
        usage = {} if usage is None else usage
        settings = self.settings.users.get(user) if user else None
        if settings and settings.faxes_per_hour is not None:
            jobs = await self._jobs_last_hour(usage, "user", settings.addresses)
            self._refuse_over(quota_refusal(f"user {user}", settings.faxes_per_hour, jobs,
                                            pending + 1, "faxes per hour"))
        limit = self.settings.quotas.faxes_per_hour
        if limit is not None:
            jobs = await self._jobs_last_hour(usage, "service", None)
            self._refuse_over(quota_refusal("this service", limit, jobs, pending + 1,
                                            "faxes per hour"))

    async def _jobs_last_hour(self, usage: dict[str, int], key: str,
                              senders: Sequence[str] | None) -> int:
        if key not in usage:
            since = datetime.now(UTC) - timedelta(hours=1)
            usage[key], _ = await self.store.usage_since(since, senders)
        return usage[key]

    def quotas_for(self, user: str | None) -> list[Quota]:
        """The quotas a mail of ``user`` (None: not logged in) is stored under: the store
        counts and checks them in the transaction that stores the jobs, so parallel mails
        cannot together go over a limit that each passed at RCPT."""
        quotas: list[Quota] = []
        settings = self.settings.users.get(user) if user else None
        if settings is not None:
            senders = tuple(settings.addresses)
            if settings.faxes_per_hour is not None:
                quotas.append(Quota(f"user {user}", f"user {user}", settings.faxes_per_hour,
                                    "faxes", HOUR, senders))
            if settings.pages_per_day is not None:
                quotas.append(Quota(f"user {user}", f"user {user}", settings.pages_per_day,
                                    "pages", DAY, senders))
        service = self.settings.quotas
        if service.faxes_per_hour is not None:
            quotas.append(Quota("service", "this service", service.faxes_per_hour, "faxes",
                                HOUR))
        if service.pages_per_day is not None:
            quotas.append(Quota("service", "this service", service.pages_per_day, "pages", DAY))
        return quotas

    def count_refusal(self, refusal: Refusal) -> None:
        if self.metrics is not None:
            self.metrics.mails_refused.labels(refusal.status).inc()

    @staticmethod
    def _refuse_over(sentence: str | None) -> None:
        if sentence is not None:
            raise Refusal(452, "4.7.1", sentence)

    def _check_recipient(self, address: str) -> FaxAddress:
        local, domain = split_address(address)
        if not domain or not is_fax_domain(domain, self.settings.fax_domains):
            raise Refusal(550, "5.7.1", f"Relaying denied: <{address}> is not a fax address "
                          f"here; write to <number>@{self.settings.fax_domains[0]}.")
        try:
            fax = parse_fax_local_part(local, self.settings.numbers.default_country)
        except InvalidNumber as error:
            raise Refusal(550, "5.1.1", error.sentence) from None
        verdict = check_destination(fax.number, self.settings.dial,
                                    self.settings.numbers.default_country)
        if not verdict.allowed:
            raise Refusal(550, verdict.status, verdict.sentence)
        return fax

    # -- Postfix in front: verification probes, postmaster, the policy service's header --

    def is_verification_probe(self, envelope_from: str, client_ip: str | None) -> bool:
        """An MTA's recipient verification probe (Postfix: reject_unverified_recipient) from
        a trusted network: answered at RCPT; it never sends DATA."""
        return self.is_probe_sender(envelope_from) and from_trusted_network(
            client_ip, self.settings.senders)

    def is_probe_sender(self, envelope_from: str) -> bool:
        if not envelope_from or envelope_from == "<>":
            return "" in self.settings.policy_service.probe_senders
        local, _ = split_address(envelope_from.lower())
        return any(envelope_from.lower() == entry.lower() if "@" in entry
                   else bool(entry) and local == entry.lower()
                   for entry in self.settings.policy_service.probe_senders)

    def may_authorize_later(self, client_ip: str | None, user: str | None) -> bool:
        """With the policy service on, a sender refused from the MTA's trusted network may
        still be a user's, named by the signed header in the mail: decided at DATA."""
        return user is None and self.settings.policy_service.listen is not None and \
            from_trusted_network(client_ip, self.settings.senders)

    def refuse_unfaxable_sender(self, envelope_from: str) -> None:
        """Bounces, delivery reports and probes are never faxed: nobody asked for the fax
        (a forged sender in our fax domain would otherwise have its bounce faxed)."""
        if not envelope_from or envelope_from == "<>" or self.is_probe_sender(envelope_from):
            shown = "" if envelope_from == "<>" else envelope_from
            raise Refusal(550, "5.7.1", f"Mail from <{shown}> (a bounce, report or address "
                          f"probe) is not faxed.")

    def is_postmaster(self, address: str) -> bool:
        """``postmaster@<fax domain>`` or plain ``postmaster`` (RFC 5321 §4.5.1)."""
        local, domain = split_address(address)
        return local.lower() == "postmaster" and (
            not domain or is_fax_domain(domain, self.settings.fax_domains))

    async def forward_to_postmaster(self, envelope_from: str, recipients: Sequence[str],
                                    raw: MailBytes) -> None:
        """Into the outbox, to ``inbound.postmaster``, with the null sender (no bounce of it
        can loop back); a mail that already passed here is refused as a loop."""
        raw, _ = strip_headers(raw)
        blank = header_end(raw)
        head = raw[:blank if blank >= 0 else len(raw)].lower()
        if head.startswith(b"x-mailfax-postmaster:") or b"\nx-mailfax-postmaster:" in head:
            raise Refusal(554, "5.4.6", "Mail loop: this mail was already forwarded to the "
                          "postmaster.")
        trace = (f"X-Mailfax-Postmaster: forwarded for {', '.join(recipients)} from "
                 f"<{envelope_from}>\r\n").encode("utf-8", "replace")
        await self.store.enqueue_mail(OutgoingMail(
            envelope_from="", recipients=[self.settings.inbound.postmaster],
            message=trace + raw, kind="postmaster"))
        self.wake_outbox()
        log.info("mail from <%s> to %s forwarded to %s", envelope_from, ", ".join(recipients),
                 self.settings.inbound.postmaster)

    async def authorize(self, envelope_from: str, recipients: Sequence[str], raw: MailBytes,
                        user: str | None) -> tuple[MailBytes, str | None]:
        """The mail without the policy service's headers, and the user it names (else
        ``user``); a header mailfax did not make, or a stale one, refuses the mail. For
        that user the RCPT stage's checks run again (the quota may have filled meanwhile)."""
        raw, values = strip_headers(raw)
        try:
            named = authorized_user(self.secret_key, values, envelope_from, recipients,
                                    time.time(), self.settings.policy_service.authorization_max_age)
        except AuthorizationError as error:
            raise Refusal(550, "5.7.1", str(error)) from None
        if user is not None or named is None:
            return raw, user
        self.check_sender(envelope_from, None, named)
        expansion = self._expansion_of(envelope_from, recipients, named)
        if expansion is not None:
            await self.check_rate(envelope_from, named, len(expansion.addresses) - 1)
            return raw, named
        numbers = {self.check_recipient(address).number for address in recipients}
        for address in recipients:
            self.check_user_destination(self.check_recipient(address), named)
        await self.check_rate(envelope_from, named, len(numbers) - 1)
        return raw, named

    async def accept_mail(self, envelope_from: str, recipients: Sequence[str], raw: MailBytes,
                          client: str, user: str | None = None) -> Accepted:
        """Turn a mail into one job per fax number; durable when this returns."""
        expansion = self._expansion_of(envelope_from, recipients, user)
        addresses = expansion.addresses if expansion else \
            [self.check_recipient(address) for address in recipients]
        account = (expansion.broadcast.settings.account if expansion else None) or \
            self._account_for(user)
        setup = page_setup(self.settings, account)
        if len(raw) > INLINE_ASSEMBLY_BYTES:
            content = await asyncio.to_thread(assemble, raw, allow_empty=True, setup=setup,
                                              spool=self.spool_folder)
        else:  # parsing a small mail costs less than a thread hand-off; checking its
            # documents does not: pikepdf works mostly without the GIL, so in the PDF worker
            # the check of one mail overlaps the loop's work on the others. Images and
            # LibreOffice may take seconds (see needs_worker): in threads of their own.
            mail = read_mail(raw)
            content = await (asyncio.to_thread(convert_documents, mail, setup)
                             if needs_worker(mail) else
                             PDF_CHECKS.run(convert_documents, mail, setup))
        content, options = self.read_options(raw, addresses, content, account)
        content = await self._with_cover(content, addresses, envelope_from, options,
                                         shown=None if expansion is None else "")
        if not content.documents:
            raise nothing_to_fax(content, self._cover_address(recipients, addresses, content))
        # Bounces are never faxed; one without documents is refused as such first (554).
        self.refuse_unfaxable_sender(envelope_from)
        if user is not None:
            self._check_from_header(content.mail.from_address, user)
        options = await self.readiness_options(content.documents, options)
        if expansion is not None:
            accepted = await self._store_broadcast(expansion, envelope_from, content, client,
                                                   account, user, options)
        else:
            accepted = await self.store_jobs(envelope_from, addresses, content, client,
                                             account, self.quotas_for(user), options)
        self._check_after(accepted, account, options)
        return accepted

    def read_options(self, raw: MailBytes, addresses: Sequence[FaxAddress],
                     content: FaxContent, account: str) -> tuple[FaxContent, dict[str, Any]]:
        """The per-mail options (intake/options.py) and the content with the subject codes
        taken out; refused when a value is bad or the account's provider cannot do one."""
        found = parse_mail_options(
            fax_header_fields(raw), (address.tag for address in addresses),
            content.mail.subject, self._option_clock(),
            subject_codes=self.settings.options.subject_codes)
        provider = self.settings.accounts[account].provider
        impossible = capabilities.refusal(provider, found.options)
        if impossible is not None:
            raise Refusal(554, "5.3.3", impossible)
        if found.subject != content.mail.subject:
            content = FaxContent(mail=dataclasses.replace(content.mail, subject=found.subject),
                                 documents=content.documents)
        return content, found.options

    def _option_clock(self) -> Clock:
        return Clock(now=self.clock(), zone=ZoneInfo(self.settings.notify.timezone),
                     max_ahead=timedelta(days=self.settings.options.max_days_ahead))

    async def readiness_options(self, documents: Sequence[FaxDocument],
                                options: dict[str, Any]) -> dict[str, Any]:
        """``options`` with what ``documents.readiness`` adds before the 250: in "warn" mode
        (with the checker loop running) the mark that the check follows the 250 (the jobs
        are held until it is done); else the findings of a check made now ("refuse":
        refused if there are any)."""
        if self.settings.documents.readiness == "warn" and self.readiness_checker is not None:
            return {**options, READINESS_OPTION: PENDING}
        warnings = await self.check_readiness(documents, options.get("resolution", "standard"))
        return {**options, "warnings": warnings} if warnings else options

    def _check_after(self, accepted: Accepted, account: str, options: Mapping[str, Any]) -> None:
        """Hand the stored mail to the checker loop, if its check follows the 250."""
        if self.readiness_checker is None or options.get(READINESS_OPTION) != PENDING:
            return
        self.readiness_checker.submit(self.readiness_checker.pending_check(
            accepted.mail_id, accepted.job_ids, account, options))

    def pool(self) -> ReadinessPool:
        if self.readiness_pool is None:
            self.readiness_pool = ReadinessPool(self.settings.documents.readiness_workers,
                                                spool=self.spool_folder)
        return self.readiness_pool

    async def check_readiness(self, documents: Sequence[FaxDocument],
                              resolution: str = "standard") -> list[Finding]:
        """The pages that may arrive blank or black at the fax (``documents.readiness``), by a
        check made now, in a worker process; with "refuse" such a mail is refused. A check
        that fails or takes too long (the worker is replaced) finds nothing: it only warns."""
        if self.settings.documents.readiness == "off":
            return []
        result = await check_in_pool(self.pool(), self.settings, documents, resolution)
        findings = result.findings
        for item in findings:
            log.info("readiness: %s", item["text"])
        if findings and self.settings.documents.readiness == "refuse":
            raise Refusal(554, "5.6.0", refusal_text(findings))
        return findings

    async def _store_broadcast(self, expansion: Expansion, envelope_from: str,
                               content: FaxContent, client: str, account: str,
                               user: str | None, options: dict[str, Any]) -> Accepted:
        """A list's jobs, each with the mail's options and its own (the list, the name, the
        refused numbers)."""
        accepted = await self.store_jobs(envelope_from, expansion.addresses, content, client,
                                         account, self.quotas_for(user), options,
                                         job_options=expansion.job_options())
        log.info("mail %s to the broadcast list %s: %d jobs, %d numbers refused",
                 accepted.mail_id, expansion.broadcast.name, len(accepted.job_ids),
                 len(expansion.refused))
        return dataclasses.replace(accepted, broadcast=expansion.broadcast.name,
                                   refused=len(expansion.refused))

    async def _with_cover(self, content: FaxContent, addresses: Sequence[FaxAddress],
                          envelope_from: str, options: dict[str, Any],
                          shown: str | None = None) -> FaxContent:
        """Put the mail's text in front as a cover page, if this mail asks for one.

        The option ``cover`` (``+cover`` on any recipient, ``+nocover`` on all, or
        ``X-Fax-Cover``) decides; without it ``documents.cover`` does. Without text there is
        no cover. One cover serves all recipients of the mail (it lists their numbers, or
        ``shown``: "" for a broadcast list, whose recipients must not see each other's), as
        the documents are shared.
        """
        wanted = options.get("cover")
        if wanted is False or (wanted is None and self.settings.documents.cover == "never"):
            return content
        text = cover_text(content.mail.text)
        if not text:
            return content
        numbers = shown if shown is not None else ", ".join(
            format_international(number)
            for number in dict.fromkeys(address.number for address in addresses))
        info = CoverInfo(sender=content.mail.from_header or envelope_from, number=numbers,
                         subject=content.mail.subject,
                         date=self._local_time(content.mail.date), text=text,
                         document_pages=content.pages)
        # the status mails' module, loaded once the port accepts (mailfax.app.LOOP_MODULES)
        from mailfax.outbound.notify import TEMPLATES_DIR

        try:
            cover = await asyncio.to_thread(render_cover, info, self.settings.notify.language,
                                            self.settings.templates_dir or TEMPLATES_DIR)
        except CoverUnavailable as error:
            raise Refusal(451, "4.3.0", f"The cover page cannot be made here ({error}); this is "
                          "temporary until the server is fixed, please try again later.") \
                from None
        return FaxContent(mail=content.mail, documents=[cover, *content.documents])

    def _local_time(self, when: datetime | None) -> datetime:
        """A time as the cover page shows it: in ``notify.timezone`` (a mail's Date header has
        the sender's offset, or none)."""
        when = when or datetime.now(UTC)
        if when.tzinfo is None:  # "-0000": the sender's zone is unknown, the time is UTC
            when = when.replace(tzinfo=UTC)
        return when.astimezone(ZoneInfo(self.settings.notify.timezone))

    @staticmethod
    def _cover_address(recipients: Sequence[str], addresses: Sequence[FaxAddress],
                       content: FaxContent) -> str:
        """Where this mail's text would be faxed as a cover page (``<number>+cover@domain``),
        or "" when it has no text for one."""
        if not recipients or not cover_text(content.mail.text):
            return ""
        local, domain = split_address(recipients[0])
        tag = addresses[0].tag
        if tag and local.lower().endswith(f"+{tag}"):
            local = local[:-len(tag) - 1]
        return f"{local}+cover@{domain}"

    def _check_from_header(self, from_address: str, user: str) -> None:
        settings = self.settings.users[user]
        if not address_allowed(from_address, settings.addresses):
            raise Refusal(550, "5.7.1", f"Not allowed: user {user} may not send mail "
                          f"From: <{from_address}>.")

    def _account_for(self, user: str | None) -> str:
        settings = self.settings.users.get(user) if user else None
        return settings.account if settings and settings.account else \
            self.settings.default_account

    async def store_jobs(self, envelope_from: str, addresses: Sequence[FaxAddress],
                         content: FaxContent, client: str,
                         account: str | None = None,
                         quotas: Sequence[Quota] = (),
                         options: dict[str, Any] | None = None,
                         job_options: Mapping[str, dict[str, Any]] | None = None) -> Accepted:
        mail = content.mail
        new_mail = NewMail(
            mail_id=secrets.token_hex(8), envelope_from=envelope_from,
            message_id=mail.message_id, subject=mail.subject, references=mail.references,
            from_header=mail.from_header, client_address=client,
            auto_submitted=mail.auto_submitted, precedence=mail.precedence,
            language=self.settings.notify.language,
        )
        return await self._store(new_mail, addresses, content.documents, account, quotas,
                                 options or {}, job_options)

    async def store_documents(self, envelope_from: str, addresses: Sequence[FaxAddress],
                              documents: Sequence[FaxDocument], subject: str,
                              client: str) -> Accepted:
        """Jobs without a mail (``mailfax send``)."""
        new_mail = NewMail(mail_id=secrets.token_hex(8), envelope_from=envelope_from,
                           message_id=None, subject=subject, references=[], from_header="",
                           client_address=client, language=self.settings.notify.language)
        return await self._store(new_mail, addresses, documents)

    async def _store(self, mail: NewMail, addresses: Sequence[FaxAddress],
                     documents: Sequence[FaxDocument], account: str | None = None,
                     quotas: Sequence[Quota] = (),
                     options: dict[str, Any] | None = None,
                     job_options: Mapping[str, dict[str, Any]] | None = None) -> Accepted:
        """``options`` apply to every job of the mail; ``job_options`` ({number: options})
        add to them per number (a broadcast list's name and place)."""
        numbers = list(dict.fromkeys(address.number for address in addresses))  # dedupe, keep order
        account = account or self.settings.default_account
        options = options or {}
        hold = capabilities.held_until(self.settings.accounts[account].provider, options)
        if options.get(READINESS_OPTION) == PENDING:  # until its check is done, at most this
            hold = max(hold or datetime.now(UTC), datetime.now(UTC) + timedelta(
                seconds=self.settings.documents.readiness_hold_seconds))
        jobs = [NewJob(job_id=new_job_id(), number=number, account=account,
                       options={**options, **(job_options or {}).get(number, {})},
                       hold_until=hold) for number in numbers]
        try:
            await self.store.add_mail_jobs(mail, jobs, documents, quotas)
        except QuotaExceeded as over:
            raise Refusal(452, "4.7.1", quota_sentence(over)) from None
        except Exception as error:
            raise StoreUnavailable(f"{type(error).__name__}: {error}") from error
        self.on_stored()
        if self.metrics is not None:
            self.metrics.mails_accepted.inc()
        pages = sum(document.pages for document in documents)
        for job in jobs:
            log.info("job %s queued: %s, %d page(s), from <%s>", job.job_id, job.number, pages,
                     mail.envelope_from)
        return Accepted(mail_id=mail.mail_id, job_ids=[job.job_id for job in jobs], pages=pages,
                        job_for_number={job.number: job.job_id for job in jobs},
                        warnings=list((options or {}).get("warnings", [])))
