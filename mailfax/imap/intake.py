"""IMAP intake: fax mails read from a watched mailbox, for sites that cannot route a fax domain
to mailfax.

For each mail in the mailbox: decide the sender (the From address) and apply the sender policy
(the mailbox is not a trust boundary), find the fax numbers (subject and/or a To address),
store the jobs through :meth:`Intake.accept_mail` — durable when it returns — and only then
move the mail to the processed folder. A mail that cannot become a job gets a failure reply
through the outbox (like status mails) and goes to the rejected folder. Nothing is deleted.

A small ledger (``<data_dir>/imap/<mailbox>.ledger``) remembers which mails are already jobs,
so a crash or a lost connection between storing the jobs and the MOVE does not fax twice.

The loop waits with IDLE (or polls), and reconnects with exponential backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.policy
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.headerregistry import Address
from email.message import EmailMessage
from email.parser import BytesHeaderParser
from email.utils import format_datetime, getaddresses, make_msgid
from pathlib import Path

from mailfax.config import ImapIntakeSettings, Settings
from mailfax.imap.client import ImapError, ImapSession
from mailfax.intake.assemble import Refusal
from mailfax.intake.mime import repair_8bit_headers
from mailfax.intake.service import Intake
from mailfax.store.base import OutgoingMail, Store
from mailfax.trust.policy import is_fax_domain, split_address, status_mail_allowed

log = logging.getLogger(__name__)

QUEUED_KEYWORD = "$MailfaxQueued"
REJECTED_KEYWORD = "$MailfaxRejected"
# A mail whose handling raised this often (each IDLE wake or poll tries again) is set aside
# with the rejected ones, so that one poison mail is not retried forever.
MAX_HANDLE_FAILURES = 5
_NUMBER_DETAIL = re.compile(r"^\+?[0-9][0-9.()/-]*$")
_SPLIT_NUMBERS = re.compile(r"[,;]")

REPLY_TEXT = {
    "en": ("Fax not sent: {subject}",
           "Your mail could not be turned into a fax:\n\n    {reason}\n\n"
           "Write the fax number into the subject (for example \"Fax +49 30 123456\")"
           "{plus_hint} and attach the document as PDF.\n"),
    "de": ("Fax nicht gesendet: {subject}",
           "Aus Ihrer Mail konnte kein Fax werden:\n\n    {reason}\n\n"
           "Schreiben Sie die Faxnummer in den Betreff (zum Beispiel \"Fax +49 30 123456\")"
           "{plus_hint} und hängen Sie das Dokument als PDF an.\n"),
}


@dataclass(frozen=True)
class Outcome:
    """What became of one mail."""

    queued: bool
    job_ids: list[str]
    reason: str = ""


class Ledger:
    """``uidvalidity uid mail_id`` lines for mails that are jobs but may not be moved yet."""

    def __init__(self, path: Path):
        self.path = path
        self.entries: dict[tuple[int, int], str] = {}

    async def load(self) -> None:
        self.entries = await asyncio.to_thread(self._read)

    def _read(self) -> dict[tuple[int, int], str]:
        entries: dict[tuple[int, int], str] = {}
        with contextlib.suppress(FileNotFoundError), open(self.path, encoding="ascii") as handle:
            for line in handle:
                parts = line.split()
                if len(parts) == 3 and parts[0].isdigit() and parts[1].isdigit():
                    entries[(int(parts[0]), int(parts[1]))] = parts[2]
        return entries

    def get(self, uidvalidity: int, uid: int) -> str | None:
        return self.entries.get((uidvalidity, uid))

    async def add(self, uidvalidity: int, uid: int, mail_id: str) -> None:
        self.entries[(uidvalidity, uid)] = mail_id
        await asyncio.to_thread(self._append, f"{uidvalidity} {uid} {mail_id}\n")

    def _append(self, line: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="ascii") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())

    async def keep_only(self, uidvalidity: int, uids: set[int]) -> None:
        """Forget mails that left the mailbox (moved, or deleted by someone)."""
        kept = {key: value for key, value in self.entries.items()
                if key[0] == uidvalidity and key[1] in uids}
        if kept != self.entries:
            self.entries = kept
            await asyncio.to_thread(self._rewrite)

    def _rewrite(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_suffix(".tmp")
        with open(temporary, "w", encoding="ascii") as handle:
            for (validity, uid), mail_id in sorted(self.entries.items()):
                handle.write(f"{validity} {uid} {mail_id}\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, self.path)


def find_numbers(headers: EmailMessage, settings: ImapIntakeSettings,
                 fax_domains: list[str]) -> list[str]:
    """The fax numbers a mail asks for, as written (not yet checked), in order."""
    found: list[str] = []
    for source in settings.number_from:
        if source == "to":
            found.extend(_numbers_from_addresses(headers, settings, fax_domains))
        else:
            found.extend(_numbers_from_subject(str(headers.get("Subject", "")), settings))
    return list(dict.fromkeys(found))


def _numbers_from_subject(subject: str, settings: ImapIntakeSettings) -> list[str]:
    subject = " ".join(subject.split())
    for pattern in settings.subject_patterns:
        match = re.search(pattern, subject)
        if match and match.group(1):
            return [part.strip() for part in _SPLIT_NUMBERS.split(match.group(1)) if part.strip()]
    return []


def _numbers_from_addresses(headers: EmailMessage, settings: ImapIntakeSettings,
                            fax_domains: list[str]) -> list[str]:
    values = [str(value) for name in ("To", "Cc") for value in headers.get_all(name, [])]
    bases = {address.lower() for address in settings.plus_addresses}
    numbers: list[str] = []
    for _, address in getaddresses(values):
        local, domain = split_address(address)
        if not local or not domain:
            continue
        if is_fax_domain(domain, fax_domains):
            numbers.append(local)
            continue
        base, separator, detail = local.partition(settings.plus_separator)
        if not separator or not _NUMBER_DETAIL.match(detail):
            continue
        if bases and f"{base}@{domain}".lower() not in bases:
            continue
        numbers.append(detail)
    return numbers


def sender_of(headers: EmailMessage) -> str:
    """The From address (the person who wrote the mail), or "" if there is none."""
    addresses = [address for _, address in getaddresses(
        [str(value) for value in headers.get_all("From", [])]) if "@" in address]
    return addresses[0] if len(addresses) == 1 else ""


def is_automatic(headers: EmailMessage, sender: str) -> bool:
    """A bounce or an automatic mail: never answered (RFC 3834)."""
    if str(headers.get("Return-Path", "")).strip() == "<>":
        return True
    auto_submitted = headers.get("Auto-Submitted")
    precedence = headers.get("Precedence")
    return not status_mail_allowed(sender, None if auto_submitted is None else str(auto_submitted),
                                   None if precedence is None else str(precedence))


class ImapIntake:
    """Watches ``settings.imap_intake.mailbox`` and turns its mails into jobs."""

    def __init__(self, settings: Settings, intake: Intake, store: Store,
                 wake_outbox: Callable[[], None] = lambda: None):
        if settings.imap_intake is None:
            raise ValueError("imap_intake is not configured")
        self.settings = settings
        self.imap = settings.imap_intake
        self.intake = intake
        self.store = store
        self.wake_outbox = wake_outbox
        senders = settings.senders
        if not (senders.allowed_addresses or senders.allowed_domains or
                self.imap.allow_any_sender):
            raise ValueError(
                "imap_intake: anyone who can mail the watched mailbox could send faxes; set "
                "senders.allowed_addresses or senders.allowed_domains (or, knowingly, "
                "imap_intake.allow_any_sender = true)")
        name = re.sub(r"[^A-Za-z0-9_.@-]", "_",
                      f"{self.imap.username}@{self.imap.host}-{self.imap.mailbox}")
        self.ledger = Ledger(settings.data_dir / "imap" / f"{name}.ledger")
        self.client = f"imap:{self.imap.mailbox}"
        self.connected = asyncio.Event()  # set while a session is logged in (for tests, health)
        self._failures: dict[tuple[int, int], int] = {}  # (UIDVALIDITY, UID) -> failed handles

    def describe(self) -> str:
        imap = self.imap
        return f"{imap.username}@{imap.host}:{imap.port} mailbox {imap.mailbox}"

    async def run(self) -> None:
        await self.ledger.load()
        delay = self.imap.reconnect_initial_seconds
        while True:
            try:
                session = await ImapSession.open(self.imap)
            except ImapError as error:
                log.warning("IMAP intake %s: %s; reconnecting in %.0f s", self.describe(),
                            error, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.imap.reconnect_max_seconds)
                continue
            delay = self.imap.reconnect_initial_seconds
            try:
                await self._watch(session)
            except ImapError as error:
                log.warning("IMAP intake %s: %s; reconnecting in %.0f s", self.describe(),
                            error, delay)
            finally:
                self.connected.clear()
                await session.close()
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.imap.reconnect_max_seconds)

    async def _watch(self, session: ImapSession) -> None:
        imap = self.imap
        for folder in (imap.processed_folder, imap.rejected_folder):
            if folder:
                await session.ensure_folder(folder)
        uidvalidity = await session.select(imap.mailbox)
        use_idle = imap.idle and session.has("IDLE")
        log.info("IMAP intake watching %s (%s)", self.describe(),
                 "IDLE" if use_idle else f"polling every {imap.poll_seconds:.0f} s")
        self.connected.set()
        pruned = False
        while True:
            await self.process_mailbox(session, uidvalidity, prune=not pruned)
            pruned = True
            if use_idle:
                await session.wait_for_news(imap.idle_seconds)
            else:
                await asyncio.sleep(imap.poll_seconds)
                await session.noop()

    async def process_mailbox(self, session: ImapSession, uidvalidity: int,
                              prune: bool = False) -> int:
        """Handle every mail not handled yet; returns how many were handled."""
        criteria = ["UNDELETED"]
        if not self.imap.processed_folder:
            criteria += ["UNKEYWORD", QUEUED_KEYWORD]
        if not self.imap.rejected_folder:
            criteria += ["UNKEYWORD", REJECTED_KEYWORD]
        uids = await session.uid_search(*criteria)
        if prune:
            await self.ledger.keep_only(uidvalidity, set(await session.uid_search("ALL")))
        handled = 0
        for uid in uids:
            if await self._process(session, uidvalidity, uid):
                handled += 1
        return handled

    async def _process(self, session: ImapSession, uidvalidity: int, uid: int) -> bool:
        mail_id = self.ledger.get(uidvalidity, uid)
        if mail_id is None:
            raw = await session.fetch_message(uid)
            if raw is None:
                return False  # gone meanwhile
            key = (uidvalidity, uid)
            try:
                outcome = await self.handle(raw)
            except Exception:
                failures = self._failures[key] = self._failures.get(key, 0) + 1
                if failures < MAX_HANDLE_FAILURES:
                    log.exception("IMAP intake: mail UID %d could not be stored (attempt %d of"
                                  " %d); it stays in %s", uid, failures, MAX_HANDLE_FAILURES,
                                  self.imap.mailbox)
                    return False
                where = (f"moved to {self.imap.rejected_folder}" if self.imap.rejected_folder
                         else f"flagged {REJECTED_KEYWORD}")
                log.exception("IMAP intake: mail UID %d could not be stored in %d attempts; "
                              "given up: %s, no fax sent, no reply. Fix the cause, then put "
                              "it back into %s (unflagged) to try again", uid, failures, where,
                              self.imap.mailbox)
                await self._file(session, uid, self.imap.rejected_folder, REJECTED_KEYWORD)
                del self._failures[key]
                return True
            self._failures.pop(key, None)
            if not outcome.queued:
                await self._file(session, uid, self.imap.rejected_folder, REJECTED_KEYWORD)
                log.info("IMAP intake: mail UID %d rejected: %s", uid, outcome.reason)
                return True
            mail_id = ",".join(outcome.job_ids)  # the jobs are durable already
            await self.ledger.add(uidvalidity, uid, mail_id)
        await self._file(session, uid, self.imap.processed_folder, QUEUED_KEYWORD)
        log.info("IMAP intake: mail UID %d queued as %s", uid, mail_id)
        return True

    async def _file(self, session: ImapSession, uid: int, folder: str, keyword: str) -> None:
        if folder:
            await session.move(uid, folder)
        else:
            await session.add_flags(uid, "\\Seen", keyword)

    async def handle(self, raw: bytes) -> Outcome:
        """Store one mail as jobs, or queue its failure reply. Durable when it returns."""
        headers = BytesHeaderParser(policy=email.policy.default).parsebytes(raw)
        assert isinstance(headers, EmailMessage)
        repair_8bit_headers(headers)  # a raw UTF-8 subject still reads "Fax an Müller"
        sender = sender_of(headers)
        automatic = not sender or is_automatic(headers, sender)
        if not sender:
            return Outcome(False, [], "no single From address")
        if not self._sender_allowed(sender):
            reason = f"sender <{sender}> may not send faxes"
            if self.imap.reply_to_refused_senders and not automatic:
                await self._reply(headers, sender, reason + ".")
            return Outcome(False, [], reason)
        try:
            recipients = self._recipients(headers)
            accepted = await self.intake.accept_mail(sender, recipients, raw, self.client)
        except Refusal as refusal:
            if not automatic:
                await self._reply(headers, sender, refusal.sentence)
            return Outcome(False, [], refusal.sentence)
        return Outcome(True, accepted.job_ids)

    def _sender_allowed(self, sender: str) -> bool:
        policy = self.settings.senders
        if not policy.allowed_addresses and not policy.allowed_domains:
            return self.imap.allow_any_sender
        address = sender.lower()
        if address in (allowed.lower() for allowed in policy.allowed_addresses):
            return True
        _, domain = split_address(address)
        return bool(domain) and domain in (allowed.lower() for allowed in policy.allowed_domains)

    def _recipients(self, headers: EmailMessage) -> list[str]:
        """The numbers as fax addresses, as written: accept_mail checks them (check_recipient)
        and refuses a bad one."""
        numbers = find_numbers(headers, self.imap, self.settings.fax_domains)
        if not numbers:
            raise Refusal(550, "5.1.3", "The mail names no fax number.")
        domain = self.settings.fax_domains[0]
        return [f"{number}@{domain}" for number in numbers]

    async def _reply(self, headers: EmailMessage, sender: str, reason: str) -> None:
        notify = self.settings.notify
        language = notify.language if notify.language in REPLY_TEXT else "en"
        subject_template, body_template = REPLY_TEXT[language]
        original_subject = " ".join(str(headers.get("Subject", "")).split())[:200]
        plus_hint = ""
        if "to" in self.imap.number_from and self.imap.plus_addresses:
            base, _, domain = self.imap.plus_addresses[0].partition("@")
            plus_hint = (f" or write to {base}{self.imap.plus_separator}4930123456@{domain}"
                         if language == "en" else
                         f" oder schreiben Sie an {base}{self.imap.plus_separator}"
                         f"4930123456@{domain}")
        message = EmailMessage()
        _, from_domain = split_address(notify.from_address)
        message["From"] = Address(notify.from_name, addr_spec=notify.from_address)
        message["To"] = sender
        message["Subject"] = subject_template.format(subject=original_subject or "-")
        message["Date"] = format_datetime(datetime.now(UTC), usegmt=True)
        message["Message-ID"] = make_msgid(idstring="rejected", domain=from_domain or "mailfax")
        original_id = str(headers.get("Message-ID", "")).strip()
        if original_id:
            message["In-Reply-To"] = original_id
            references = str(headers.get("References", "")).split()[-19:]
            message["References"] = " ".join([*references, original_id])
        message["Auto-Submitted"] = "auto-replied"
        message.set_content(body_template.format(reason=reason, plus_hint=plus_hint))
        # Empty envelope sender, as for status mails: an automatic reply must not loop.
        await self.store.enqueue_mail(OutgoingMail(
            envelope_from="", recipients=[sender], message=message.as_bytes(), kind="rejected"))
        self.wake_outbox()
