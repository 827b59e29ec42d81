"""The inbound poller: fetch received faxes, store them, mail them, and only then delete them
at the provider.

FAX.de hands out the oldest fax again and again until it is deleted, so faxes go through one
at a time: fetch → store (durable) → queue the mail → wait until the relay took it → delete →
fetch the next. A relay outage stops the round with the fax still stored and still at the
provider; the next round finds it again, sees its mail queued, and waits once more. A crash
between the relay's acceptance and the delete gives at most one duplicate mail, never a loss.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable

from mailfax.config import InboundSettings
from mailfax.inbound import ocr
from mailfax.inbound.mailer import FaxFiles, InboundMailer, prepare_files
from mailfax.inbound.routing import recipients_for
from mailfax.providers.base import InboundFax, Provider, ProviderError
from mailfax.store.base import Handoff, InboundRecord, OutgoingMail, Store
from mailfax.support.failing import RepeatedFailure

log = logging.getLogger(__name__)

MAX_FAXES_PER_ROUND = 500


async def queue_fax_mail(store: Store, record: InboundRecord, settings: InboundSettings,
                         mailer: InboundMailer, default_country: str) -> None:
    """Convert a stored fax, route it, and put its mail into the outbox."""
    image = await store.inbound_image(record.account, record.fax_id)
    files = await asyncio.to_thread(prepare_files, image)
    if files.note:
        log.warning("fax %s could not be converted (%s): delivered as TIFF", record.fax_id,
                    files.note)
    elif files.pdf is not None and await ocr_wanted(settings):
        files = await with_text_layer(files, settings)
    recipients = recipients_for(record.called_number, settings.routes, settings.default_route,
                                settings.postmaster, default_country)

    def render() -> bytes:  # base64 of a multi-page PDF and a preview: off the event loop
        return mailer.compose(record, files, image, recipients).as_bytes()

    message = await asyncio.to_thread(render)
    await store.queue_inbound_mails(record.account, record.fax_id, [OutgoingMail(
        envelope_from=settings.from_address, recipients=recipients,
        message=message, kind="inbound", inbound=(record.account, record.fax_id))],
        pages=files.pages or None)  # the pages it has, whatever the provider said


async def ocr_wanted(settings: InboundSettings) -> bool:
    """``on``, or ``auto`` with OCRmyPDF and Tesseract with ``ocr_languages`` installed (found
    out once, by running ``tesseract --list-langs`` in a thread)."""
    if settings.ocr != "auto":
        return settings.ocr == "on"
    return await asyncio.to_thread(ocr.ocr_available, settings.ocr_languages)


async def with_text_layer(files: FaxFiles, settings: InboundSettings) -> FaxFiles:
    """The fax PDF with an invisible text layer; unchanged, with a note, when OCR fails."""
    assert files.pdf is not None
    result = await ocr.add_text_layer(files.pdf, languages=settings.ocr_languages,
                                      timeout_per_page=settings.ocr_seconds_per_page,
                                      pages=max(files.pages, 1))
    if result.problem:
        log.warning("OCR of a received fax: %s", result.problem)
    return dataclasses.replace(files, pdf=result.pdf, ocr_note=result.note,
                               text_lines=tuple(result.first_lines()))


class InboundPoller:
    def __init__(self, account: str, provider: Provider, store: Store,
                 settings: InboundSettings, mailer: InboundMailer, default_country: str,
                 wake_outbox: Callable[[], None] = lambda: None):
        self.account = account
        self.provider = provider
        self.store = store
        self.settings = settings
        self.mailer = mailer
        self.default_country = default_country
        self.wake_outbox = wake_outbox

    async def run(self) -> None:
        failures = RepeatedFailure(log, f"inbound poll of {self.account}",
                                   level=logging.WARNING, traceback=False)
        while True:
            try:
                await self.poll_once()
            except ProviderError:
                failures.failed()
            else:
                failures.succeeded()
            await asyncio.sleep(self.poll_interval)

    @property
    def poll_interval(self) -> float:
        """``inbound.poll_seconds``, unless the provider asks for its own (the bundled
        emulator's folder is cheap to look at, so it is looked at every second)."""
        hint = getattr(self.provider, "inbound_poll_seconds", None)
        if isinstance(hint, int | float) and hint > 0:
            return float(hint)
        return self.settings.poll_seconds

    async def poll_once(self) -> int:
        """Fetch until the provider's inbox is empty; returns how many faxes were deleted."""
        done = 0
        for _ in range(MAX_FAXES_PER_ROUND):
            fax = await self.provider.fetch_inbound()
            if fax is None:
                break
            if not await self.handle(fax):
                break  # its mail is not handed off yet: the provider would return it again
            done += 1
        return done

    async def handle(self, fax: InboundFax) -> bool:
        """Store, mail and delete one fax; False if its mail is still waiting for the relay."""
        record = await self.store.add_inbound_fax(self.account, fax)
        if record.state == "received":
            await self.queue_mail(record)
            self.wake_outbox()
        handoff = await self._wait_for_handoff(record)
        if handoff == "failed":
            log.error("fax %s from %s: the relay refused its mail for good; kept at %s, which"
                      " hands it out again until it is deleted, so later faxes wait: fix the"
                      " cause, then run 'mailfax redeliver %s'", fax.fax_id,
                      record.originator or "unknown", self.account, fax.fax_id)
            return False
        if handoff == "waiting":
            log.warning("fax %s from %s: mail not handed off yet; kept at %s", fax.fax_id,
                        record.originator or "unknown", self.account)
            return False
        await self.provider.delete_inbound(fax.fax_id)
        await self.store.mark_inbound_deleted(self.account, fax.fax_id)
        log.info("fax %s mailed and deleted at %s", fax.fax_id, self.account)
        return True

    async def queue_mail(self, record: InboundRecord) -> None:
        await queue_fax_mail(self.store, record, self.settings, self.mailer,
                             self.default_country)

    async def _wait_for_handoff(self, record: InboundRecord) -> Handoff:
        """Until the fax's mail was handed off or refused for good, or ``handoff_timeout``."""
        deadline = time.monotonic() + self.settings.handoff_timeout
        delay = 0.05
        while True:
            handoff = await self.store.inbound_handoff(record.account, record.fax_id)
            if handoff != "waiting" or time.monotonic() >= deadline:
                return handoff
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
