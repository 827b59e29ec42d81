"""What a status mail carries besides its text: the transmission report (PDF attachment),
page 1 as faxed (inline PNG in the HTML part) and, when asked for, the whole document as
faxed (HylaFAX's ``RETURNFILETYPE``).

The delivered mail gets them, and so does the mail of a partial send (reason ``partial``),
whose report shows how many pages got through. Rendering is CPU work (pdfium, Pillow,
ReportLab, pikepdf): it runs in a worker thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta, tzinfo
from email.message import EmailMessage
from typing import TYPE_CHECKING

from mailfax import reasons
from mailfax.documents.mapped import DocumentBytes
from mailfax.model import JobState
from mailfax.numbers import format_international
from mailfax.providers.base import FaxDocument
from mailfax.store.base import Event, Job, Mail

if TYPE_CHECKING:
    from mailfax.documents.report import PageOne, ReportFacts, TransmissionReport

log = logging.getLogger(__name__)

RESULT_TEXT = {
    "en": "Sent: the fax service confirmed that all pages were transmitted.",
    "de": "Gesendet: Der Faxdienst hat bestätigt, dass alle Seiten übertragen wurden.",
}
FAXED_FILENAME = {"en": "fax-as-sent-{job}.pdf", "de": "fax-wie-gesendet-{job}.pdf"}


@dataclass(frozen=True)
class ReportAttachments:
    report: TransmissionReport
    image_cid: str  # Content-ID of the inline page image, without the angle brackets
    faxed: FaxDocument | None  # the whole document as faxed, when asked for


def wants_report(event: Event) -> bool:
    """Delivered, or failed because only some pages were sent."""
    if event.state == JobState.DELIVERED:
        return True
    return event.state == JobState.FAILED and reasons.partial_pages(event.reason) is not None


def wants_document(job: Job, account_default: bool | None, notify_default: bool) -> bool:
    """The mail's own ``return_document`` option, else the account's, else ``[notify]``'s."""
    chosen = job.options.get("return_document")
    if isinstance(chosen, bool):
        return chosen
    return notify_default if account_default is None else account_default


def report_facts(job: Job, mail: Mail, event: Event, documents: list[FaxDocument],
                 language: str, zone: tzinfo, provider: str) -> ReportFacts:
    from mailfax.documents.report import ReportFacts
    from mailfax.outbound.notify import format_duration

    partial = reasons.partial_pages(event.reason)
    sent, submitted = partial or (job.pages, sum(document.pages for document in documents))
    # When the provider gives no start time, the start is the end (when we learnt of it)
    # less the call's duration.
    started = (event.at - timedelta(seconds=job.duration_seconds)
               if job.duration_seconds is not None else None)
    result = (event.reason.for_language(language) if partial and event.reason
              else RESULT_TEXT.get(language, RESULT_TEXT["en"]))
    return ReportFacts(
        sender=mail.from_header or mail.envelope_from, subject=mail.subject,
        number=format_international(job.number), remote_id=job.remote_id or "",
        started_at=started.astimezone(zone) if started else None,
        duration=format_duration(job.duration_seconds), pages_sent=sent,
        pages_submitted=submitted, attempts=job.attempts, provider=provider,
        provider_job_id=job.provider_job_id or "", job_id=job.id, result=result)


class PageCache:
    """Page 1 as faxed of the last few mails: a mail to ten numbers has ten reports with the
    same page, rendered once (most of a report's cost)."""

    def __init__(self, size: int = 16):
        self.size = size
        self._pages: OrderedDict[tuple[str, str], PageOne] = OrderedDict()
        self._lock = threading.Lock()

    def page_one(self, mail_id: str, resolution_name: str, pdf: DocumentBytes) -> PageOne:
        from mailfax.documents.faxrender import resolution_named
        from mailfax.documents.report import render_page_one

        key = (mail_id, resolution_name)
        with self._lock:
            if key in self._pages:
                self._pages.move_to_end(key)
                return self._pages[key]
        page = render_page_one(pdf, resolution_named(resolution_name))
        with self._lock:
            self._pages[key] = page
            while len(self._pages) > self.size:
                self._pages.popitem(last=False)
        return page


PAGES = PageCache()


def _render(job: Job, facts: ReportFacts, documents: list[FaxDocument], language: str,
            with_document: bool) -> ReportAttachments:
    from mailfax.documents.pdf import merge_pdfs
    from mailfax.documents.report import build_report

    resolution = "fine" if job.options.get("resolution") == "fine" else "standard"
    page = PAGES.page_one(job.mail_id, resolution, documents[0].data)
    report = build_report(facts, page, language)
    faxed = None
    if with_document:
        name = FAXED_FILENAME.get(language, FAXED_FILENAME["en"]).format(job=job.id)
        whole = merge_pdfs(documents, name)
        faxed = FaxDocument(filename=name, data=whole.data, pages=whole.pages)
    return ReportAttachments(report=report, image_cid=f"page1.{job.id}@mailfax",
                             faxed=faxed)


async def report_attachments(documents_of: Callable[[str], Awaitable[list[FaxDocument]]],
                             job: Job, mail: Mail, event: Event, language: str,
                             zone: tzinfo, provider: str,
                             with_document: bool) -> ReportAttachments | None:
    """The attachments of ``event``'s status mail, or None when it has none (or its report
    cannot be made: the mail then goes without, and the log says why). ``provider``: the
    fax service as the report names it, e.g. "main (fax.de)"; ``documents_of``: a mail's
    documents by its id."""
    if not wants_report(event):
        return None
    documents = await documents_of(job.mail_id)
    if not documents:
        log.warning("job %s: no documents stored, no transmission report", job.id)
        return None
    facts = report_facts(job, mail, event, documents, language, zone, provider)
    try:
        return await asyncio.to_thread(_render, job, facts, documents, language, with_document)
    except Exception:
        log.exception("job %s: the transmission report could not be made", job.id)
        return None


def attach(message: EmailMessage, attachments: ReportAttachments) -> None:
    """Page 1 inline beside the HTML part (multipart/related), then the report and the
    document as faxed as attachments."""
    html = message.get_body(("html",))
    if html is not None:
        html.add_related(attachments.report.preview_png, maintype="image", subtype="png",
                         cid=f"<{attachments.image_cid}>", filename="page-1.png",
                         disposition="inline")
    message.add_attachment(attachments.report.pdf, maintype="application", subtype="pdf",
                           filename=attachments.report.filename)
    if attachments.faxed is not None:
        message.add_attachment(attachments.faxed.data, maintype="application", subtype="pdf",
                               filename=attachments.faxed.filename)
