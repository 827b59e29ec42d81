"""What every intake (SMTP, LMTP, the CLI, later IMAP) asks: may this sender send, is this a
fax recipient, and "store this mail as jobs". No sockets here.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mailfax.config import Settings
from mailfax.dialing import check_destination
from mailfax.intake.assemble import FaxContent, Refusal, assemble
from mailfax.model import new_job_id
from mailfax.numbers import FaxAddress, InvalidNumber, parse_fax_local_part
from mailfax.policy import check_sender, is_fax_domain, split_address
from mailfax.providers.base import FaxDocument
from mailfax.store.base import NewJob, NewMail, Store

log = logging.getLogger(__name__)

# Mails up to this size are parsed on the event loop (well under 2 ms of CPU each); larger ones
# in a worker thread, so a big attachment never stalls the other SMTP sessions.
INLINE_ASSEMBLY_BYTES = 64 * 1024


@dataclass(frozen=True)
class Accepted:
    mail_id: str
    job_ids: list[str]
    pages: int
    job_for_number: dict[str, str]  # E.164 number -> job id


class Intake:
    def __init__(self, settings: Settings, store: Store,
                 on_stored: Callable[[], None] = lambda: None):
        self.settings = settings
        self.store = store
        self.on_stored = on_stored
        # Pure for a given configuration, and asked twice per recipient (RCPT, then DATA).
        self.check_recipient = functools.lru_cache(maxsize=4096)(self._check_recipient)

    def check_sender(self, envelope_from: str, client_ip: str | None) -> None:
        verdict = check_sender(envelope_from, client_ip, self.settings.senders)
        if not verdict.allowed:
            raise Refusal(550, "5.7.1", f"Not allowed: {verdict.reason}.")

    def _check_recipient(self, address: str) -> FaxAddress:
        local, domain = split_address(address)
        if not domain or not is_fax_domain(domain, self.settings.fax_domains):
            raise Refusal(550, "5.7.1", f"Relaying denied: <{address}> is not a fax address "
                          f"here; write to <number>@{self.settings.fax_domains[0]}.")
        try:
            fax = parse_fax_local_part(local, self.settings.numbers.default_country)
        except InvalidNumber as error:
            raise Refusal(550, "5.1.1", error.sentence) from None
        verdict = check_destination(fax.number, self.settings.dial)
        if not verdict.allowed:
            raise Refusal(550, verdict.status, verdict.sentence)
        return fax

    async def accept_mail(self, envelope_from: str, recipients: Sequence[str], raw: bytes,
                          client: str) -> Accepted:
        """Turn a mail into one job per fax number; durable when this returns."""
        addresses = [self.check_recipient(address) for address in recipients]
        if len(raw) <= INLINE_ASSEMBLY_BYTES:
            content = assemble(raw)  # a thread hand-off would cost more than the work
        else:
            content = await asyncio.to_thread(assemble, raw)
        return await self.store_jobs(envelope_from, addresses, content, client)

    async def store_jobs(self, envelope_from: str, addresses: Sequence[FaxAddress],
                         content: FaxContent, client: str) -> Accepted:
        mail = content.mail
        new_mail = NewMail(
            mail_id=secrets.token_hex(8), envelope_from=envelope_from,
            message_id=mail.message_id, subject=mail.subject, references=mail.references,
            from_header=mail.from_header, client_address=client,
            auto_submitted=mail.auto_submitted, precedence=mail.precedence,
            language=self.settings.notify.language,
        )
        return await self._store(new_mail, addresses, content.documents)

    async def store_documents(self, envelope_from: str, addresses: Sequence[FaxAddress],
                              documents: Sequence[FaxDocument], subject: str,
                              client: str) -> Accepted:
        """Jobs without a mail (``mailfax send``)."""
        new_mail = NewMail(mail_id=secrets.token_hex(8), envelope_from=envelope_from,
                           message_id=None, subject=subject, references=[], from_header="",
                           client_address=client, language=self.settings.notify.language)
        return await self._store(new_mail, addresses, documents)

    async def _store(self, mail: NewMail, addresses: Sequence[FaxAddress],
                     documents: Sequence[FaxDocument]) -> Accepted:
        numbers = list(dict.fromkeys(address.number for address in addresses))  # dedupe, keep order
        jobs = [NewJob(job_id=new_job_id(), number=number,
                       account=self.settings.default_account) for number in numbers]
        await self.store.add_mail_jobs(mail, jobs, documents)
        self.on_stored()
        pages = sum(document.pages for document in documents)
        for job in jobs:
            log.info("job %s queued: %s, %d pages, from <%s>", job.job_id, job.number, pages,
                     mail.envelope_from)
        return Accepted(mail_id=mail.mail_id, job_ids=[job.job_id for job in jobs], pages=pages,
                        job_for_number={job.number: job.job_id for job in jobs})
