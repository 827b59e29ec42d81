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
from datetime import timedelta
from pathlib import Path

from mailfax.config import InboundRoute, InboundSettings
from mailfax.inbound import ocr
from mailfax.inbound.mailer import FaxFiles, InboundMailer, prepare_files
from mailfax.inbound.routing import choose_route, envelope_recipients, facts_of, normalise_number
from mailfax.inbound.screening import (
    SCREENED_STATES,
    blocked_by,
    page_hashes,
    read_block_list,
    same_fax,
)
from mailfax.providers.base import InboundFax, Provider, ProviderError
from mailfax.store.base import Handoff, InboundRecord, OutgoingMail, Store
from mailfax.support.failing import RepeatedFailure

log = logging.getLogger(__name__)

MAX_FAXES_PER_ROUND = 500


async def queue_fax_mail(store: Store, record: InboundRecord, settings: InboundSettings,
                         mailer: InboundMailer, default_country: str,
                         imap_delivery: bool = False) -> None:
    """Convert a stored fax, route it, and put its mail into the outbox.

    A fax that cannot be read (no pages, an image that does not decode) is never silent: it
    goes to the route's recipients with the raw file and a sentence, and to the postmaster.

    With ``imap_delivery``, a privacy-mode rule with a ``folder`` gets two mails: the fax with
    its document, APPENDed to that folder (the fax is deleted at the provider after that), and
    a notice without it, through the relay to the rule's recipients."""
    image = await store.inbound_image(record.account, record.fax_id)
    choice = choose_route(facts_of(record), settings, default_country)
    rule = choice.rule
    privacy = mailer.format_of(rule) == "none"
    split = privacy and imap_delivery and rule.folder is not None
    files = await asyncio.to_thread(prepare_files, image)
    # Privacy mode mails neither the PDF nor its text, unless the rule allows the first lines.
    wants_text = not privacy or split or rule.privacy_first_lines
    if files.note:
        log.warning("fax %s could not be converted (%s): delivered as it came, the postmaster"
                    " told", record.fax_id, files.note)
    elif files.pdf is not None and wants_text and await ocr_wanted(settings):
        files = await with_text_layer(files, settings)
    recipients = envelope_recipients(rule, settings.postmaster,
                                     tell_postmaster=bool(files.note))
    log.info("fax %s from %s to %s: %s (%s)", record.fax_id, record.originator or "unknown",
             record.called_number, choice.label, "; ".join(choice.reasons))

    def render(route: InboundRoute, folder: str = "") -> bytes:  # base64: off the loop
        return mailer.compose(record, files, image, list(route.to), route,
                              document_folder=folder).as_bytes()

    fax_mail = rule.model_copy(update={"format": None}) if split else rule
    mails = [OutgoingMail(envelope_from=settings.from_address, recipients=recipients,
                          message=await asyncio.to_thread(render, fax_mail), kind="inbound",
                          inbound=(record.account, record.fax_id))]
    if split:  # not marked as the fax's: the outbox sends it through the relay, not IMAP
        mails.append(OutgoingMail(envelope_from=settings.from_address, recipients=recipients,
                                  message=await asyncio.to_thread(render, rule,
                                                                  rule.folder or ""),
                                  kind="inbound"))
    await store.queue_inbound_mails(record.account, record.fax_id, mails,
                                    pages=files.pages or None)  # whatever the provider said


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
                 wake_outbox: Callable[[], None] = lambda: None,
                 block_file: Path | None = None, imap_delivery: bool = False):
        self.account = account
        self.block_file = block_file  # mailfax block's entries, beside the config's
        self.imap_delivery = imap_delivery  # fax mails are APPENDed ([imap_delivery])
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
            screened = await self.screen(record, fax)
            if screened is not None:
                await self.store.mark_inbound_screened(self.account, fax.fax_id, screened)
                record = dataclasses.replace(record, state=screened)
        if record.state in SCREENED_STATES:  # not mailed: only deleted (again, after a crash)
            await self.provider.delete_inbound(fax.fax_id)
            return True
        if record.state == "deleted":
            log.warning("fax %s from %s fetched again from %s after it was mailed and deleted"
                        " (the same provider id): not mailed again, deleted again", fax.fax_id,
                        record.originator or "unknown", self.account)
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

    async def screen(self, record: InboundRecord, fax: InboundFax) -> str | None:
        """``blocked`` (junk: a blocked caller or station id), ``duplicate`` (the same pages
        to the same number within the window), or None: mail it."""
        blocks = await asyncio.to_thread(read_block_list, self.block_file, self.settings)
        for problem in blocks.problems:
            log.warning("block file %s, %s: skipped", self.block_file, problem)
        reason = blocked_by(facts_of(record), blocks, self.default_country)
        if reason is not None:
            log.warning("fax %s blocked as junk (%s): deleted at %s, not mailed", fax.fax_id,
                        reason, self.account)
            return "blocked"
        original = await self.find_original(record, fax.image)
        if original is not None:
            log.warning("fax %s from %s is a duplicate of fax %s (the same pages within %g"
                        " minutes): deleted at %s, not mailed again", fax.fax_id,
                        record.originator or "unknown", original, self.settings.
                        duplicate_window_minutes, self.account)
            return "duplicate"
        return None

    async def find_original(self, record: InboundRecord, image: bytes) -> str | None:
        """The id of an earlier fax to the same number with the same pages, received within
        ``duplicate_window_minutes`` of this one; None if there is none (or the check is off)."""
        window = timedelta(minutes=self.settings.duplicate_window_minutes)
        if not window or not image:  # an empty fax is told every time, never dropped
            return None
        called = normalise_number(record.called_number, self.default_country)
        candidates = [
            other for other in await self.store.list_inbound()
            if (other.account, other.fax_id) != (record.account, record.fax_id)
            and other.state != "blocked" and abs(other.received_at - record.received_at) <= window
            and normalise_number(other.called_number, self.default_country) == called]
        if not candidates:
            return None
        mine = await asyncio.to_thread(page_hashes, image)
        for other in candidates:
            earlier = await self.store.inbound_image(other.account, other.fax_id)
            if earlier and same_fax(mine, await asyncio.to_thread(page_hashes, earlier)):
                return other.fax_id
        return None

    async def queue_mail(self, record: InboundRecord) -> None:
        await queue_fax_mail(self.store, record, self.settings, self.mailer,
                             self.default_country, self.imap_delivery)

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
