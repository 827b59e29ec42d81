"""``smtp.accept = "spool"``: the two-phase intake.

At DATA the raw mail and its envelope are stored (committed) and answered ``250`` at once;
a worker then takes the spooled mails in order through the same intake as ``"checked"``
(:meth:`~mailfax.intake.service.Intake.accept_mail`). A mail it refuses for good (a broken
PDF, nothing to fax) comes back to the envelope sender as a bounce (an RFC 3464
DSN from ``<>``) instead of a 5xx, so the sender learns of it later and by mail; one refused
for now (a 4xx: a quota full) stays spooled and is tried again, for a day. Senders and
recipients are still checked at MAIL and RCPT, as in ``"checked"``.

Durability: the spooled row goes only once its jobs are stored or its bounce is queued; a
crash in between leaves it spooled and it is taken again (its lease runs out) — so a crash
in that window may give a mail's jobs or bounce twice, never none.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from email.parser import BytesHeaderParser
from email.policy import compat32

from mailfax.intake.assemble import Refusal
from mailfax.intake.service import Intake, StoreUnavailable
from mailfax.intake.spool import MailBytes
from mailfax.outbound.dsn import build_dsn
from mailfax.store.base import OutgoingMail, SpooledMail
from mailfax.support.text import header_section
from mailfax.support.waiting import wait_for_event

log = logging.getLogger(__name__)

# Spooled mails taken per store call, and how long one is theirs before another pass (or
# another instance) may take it again: a crash mid-way leaves it to be retried then.
BATCH = 16
LEASE_SECONDS = 600.0
IDLE_SECONDS = 5.0
# A temporary refusal (a quota full for now, the cover page unavailable) leaves the mail
# spooled, taken again when its lease ends, as a sending MTA would retry; after this long it
# is bounced.
TEMPORARY_FOR_SECONDS = 86400.0


async def spool_reply(intake: Intake, envelope_from: str, recipients: Sequence[str],
                      raw: MailBytes, client: str, user: str | None) -> str:
    """Store the mail for later and the ``250`` for it (durable before it is given)."""
    intake.refuse_unfaxable_sender(envelope_from)  # a bounce could not be bounced
    try:
        spool_id = await intake.store.spool_mail(envelope_from, recipients, client, user,
                                                 bytes(raw))
    except Exception as error:
        raise StoreUnavailable(f"{type(error).__name__}: {error}") from error
    intake.wake_spool()
    log.info("mail from <%s> to %s spooled as %d", envelope_from, ", ".join(recipients),
             spool_id)
    return f"250 2.0.0 spooled as {spool_id}; its documents are checked next"


class AcceptSpool:
    """The worker that turns spooled mails into jobs or bounces, oldest first."""

    def __init__(self, intake: Intake):
        self.intake = intake
        self.store = intake.store
        self.settings = intake.settings
        self._wake = asyncio.Event()
        intake.wake_spool = self._wake.set

    async def run(self) -> None:
        """Forever: the spooled mails (those left by a crash first), then wait for more.
        With ``smtp.accept = "checked"`` it only takes the mails left spooled from a run with
        ``"spool"`` (switched back), then ends."""
        spooling = self.settings.smtp.accept == "spool"
        while True:
            self._wake.clear()
            mails = await self.store.claim_spooled(BATCH, LEASE_SECONDS)
            if not spooling and not mails:
                return
            if not spooling:
                log.warning("taking %d mail(s) left spooled from smtp.accept = \"spool\"",
                            len(mails))
            for mail in mails:
                await self.take(mail)
            if len(mails) < BATCH:
                await wait_for_event(self._wake, IDLE_SECONDS)

    async def take(self, spooled: SpooledMail) -> None:
        try:
            await self.intake.accept_mail(spooled.envelope_from, spooled.recipients,
                                          spooled.message, spooled.client, spooled.user)
        except Refusal as refusal:
            self.intake.count_refusal(refusal)
            age = (datetime.now(UTC) - spooled.received_at).total_seconds()
            if refusal.temporary and age < TEMPORARY_FOR_SECONDS:
                log.info("spooled mail %d from <%s> kept to try again: %s", spooled.id,
                         spooled.envelope_from, refusal.sentence)
                return
            log.info("spooled mail %d from <%s> refused, bounced: %s", spooled.id,
                     spooled.envelope_from, refusal.sentence)
            await self.store.enqueue_mail(self.bounce(spooled, refusal))
            self.intake.wake_outbox()
        except Exception:  # the store down, a bug: kept, taken again once its lease ends
            log.exception("spooled mail %d from <%s> not taken yet", spooled.id,
                          spooled.envelope_from)
            return
        await self.store.unspool_mail(spooled.id)

    def bounce(self, spooled: SpooledMail, refusal: Refusal) -> OutgoingMail:
        """The refusal as a DSN to the envelope sender. It is final (a temporary refusal only
        once mailfax gave up trying again), so its status is 5.x.x."""
        head = header_section(spooled.message)
        headers = BytesHeaderParser(policy=compat32).parsebytes(head)
        recipients = ", ".join(spooled.recipients)
        human = (f"Your mail to {recipients} was received, but it cannot be faxed:\n\n"
                 f"    {refusal.sentence}\n\nNothing was sent. Please correct the mail and "
                 "send it again.\n")
        status = "5" + refusal.status[1:] if refusal.status[:1] in "45" else "5.0.0"
        report = build_dsn(
            reporting_mta=self.settings.smtp.hostname,
            original_envelope_from=spooled.envelope_from,
            fax_address=spooled.recipients[0], status=status,
            diagnostic=f"{refusal.code} {status} {refusal.sentence}", human_text=human,
            original_headers=spooled.message, arrival_date=spooled.received_at,
            from_address=f"Mail Delivery System <{self.settings.notify.from_address}>",
            message_id=_header(headers.get("Message-ID")))
        return OutgoingMail(envelope_from="", recipients=[spooled.envelope_from],
                            message=report.as_bytes(), kind="dsn")


def _header(value: object) -> str | None:
    return (" ".join(str(value).split()) or None) if value is not None else None


def accept_spool_loops(intake: Intake) -> list[tuple[str, Callable[[], Awaitable[None]]]]:
    """The worker's loop for the application: with ``smtp.accept = "checked"`` it ends once
    no mail is left spooled (at once, unless "spool" was used before)."""
    return [("accept spool", AcceptSpool(intake).run)]
