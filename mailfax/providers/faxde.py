"""FAX.de over SOAP: SendJob, JobStatus, CancelJob, RequestReceived, DeleteReceived.

Our job id travels as the recipient's reference (``+4930123456[k8x40c88txje]``) and comes back
as REFID in the StatusFile and as $CID in status pushes.

What a resend means, from the docs (``shared/provider-docs/fax-de-soap-api.{en.md,de.txt}``):
SendJob result -77 is "Identical job already established (duplicate?)" / "Ein gleicher
Auftrag ist bereits eingerichtet (Doppelbeauftragung?)". So FAX.de documents that it refuses
an identical job, and the adapter declares :attr:`ResendHandling.REFUSED`: after a lost
answer the dispatcher sends the identical request again (same recipient, reference, files
and options). What the docs do not say:

* what "identical" is: we assume the same request is;
* that -77 returns the JobId of the job already there. So -77 on a resend after a lost
  answer, without a JobId, leaves the job ``unconfirmed``: the STATURL push FAX.de calls when
  the first request's job finishes carries its id (``$JID``), which makes it trackable
  (JobStatus, checked against REFID); without a push nothing can be asked, and the sender is
  told at once. -77 on a first attempt is FAX.de refusing a duplicate of an earlier job, and
  reported as that (permanent failure, reason ``duplicate_refused``).

JobStatus 5 ("Job id not found" / "Kein Protokoll-Eintrag mit dieser JobId gefunden") within
``status_grace_seconds`` of the job's submission means "not logged yet", not a failure.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import logging
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from zeep import xsd

from mailfax import reasons
from mailfax.documents.pdf import merge_pdfs
from mailfax.model import JobState
from mailfax.providers import faxde_codes as codes
from mailfax.providers.account_settings import FaxDeSettings
from mailfax.providers.base import (
    AccountCheck,
    BaseProvider,
    FaxDocument,
    InboundFax,
    ProviderContext,
    ProviderError,
    ProviderRef,
    ResendHandling,
    SendReceipt,
    SendRequest,
    SendResult,
    StatusReport,
    prepare_documents,
)
from mailfax.providers.faxde_soap import MAX_CONNECTIONS, SoapClient, SoapError
from mailfax.providers.upload import Upload
from mailfax.store.base import Job
from mailfax.support.text import to_ascii

log = logging.getLogger(__name__)

Settings = FaxDeSettings  # the module's account settings (see mailfax.providers)

MAX_FILES = 3
MAX_STATURL = 128
FAX_JOB = 0
UNKNOWN_JOB_PREFIX = "dup:"  # a -77 answer without a job id: the job exists, its id is unknown


class FaxDeProvider(BaseProvider):
    provider_name = "fax.de"
    resend_handling = ResendHandling.REFUSED  # -77, see the module's docstring

    def __init__(self, context: ProviderContext, settings: Settings):
        super().__init__(context)
        self.settings = settings
        self.supports_inbound = settings.inbound
        self.soap = SoapClient(
            settings.wsdl_url, context.data_dir / "faxde" / f"{context.account}.wsdl",
            settings.endpoint_url, settings.timeout_seconds,
            allow_plain_http=context.allow_plain_http)
        # our job id -> FAX.de JobId learnt from a STATURL push, for jobs whose id was unknown
        self._pushed_ids: dict[str, str] = {}

    def unconfirmed_ref(self, job_id: str) -> str | None:
        """Only a STATURL push can turn up a job whose SendJob answer was lost."""
        return UNKNOWN_JOB_PREFIX + job_id if self._status_url(job_id) else None

    # -- sending -----------------------------------------------------------------------------

    async def send_many(self, requests: Sequence[SendRequest]) -> list[SendResult]:
        """One job per recipient (or one bulk job); the files are prepared once per set of
        documents, not once per recipient."""
        if self.settings.bulk and len(requests) > 1:
            return await self._send_bulk(requests)
        prepared = await prepare_documents(requests, fax_files)
        results: list[SendResult] = []
        for request, files in zip(requests, prepared, strict=True):
            try:
                results.append(await self._send_single(request, files))
            except ProviderError as error:
                results.append(error)
        return results

    async def send(self, request: SendRequest) -> SendReceipt:
        (files,) = await prepare_documents([request], fax_files)
        return await self._send_single(request, files)

    async def _send_single(self, request: SendRequest, files: list[FaxDocument]
                           ) -> SendReceipt:
        recipient = f"{request.number}[{request.job_id}]"
        answer = await self._send_job(request, files, recipient=recipient, recipient_file=b"")
        return self._receipt(request.job_id, answer)

    async def _send_bulk(self, requests: Sequence[SendRequest]) -> list[SendResult]:
        lines = [f"{request.number},{request.job_id}" for request in requests]
        recipient_file = ("\r\n".join(lines) + "\r\n").encode("ascii")
        (files,) = await prepare_documents(requests[:1], fax_files)
        try:
            answer = await self._send_job(requests[0], files, recipient="",
                                          recipient_file=recipient_file)
        except ProviderError as error:
            return [error] * len(requests)
        if answer.get("RecipientsCount") not in (None, len(requests)):
            log.warning("FAX.de accepted %s of %d recipients of job %s; the StatusFile will say "
                        "which", answer.get("RecipientsCount"), len(requests), answer.get("JobId"))
        return [self._receipt(request.job_id, answer) for request in requests]

    async def _send_job(self, request: SendRequest, files: list[FaxDocument], *,
                        recipient: str, recipient_file: bytes) -> dict[str, Any]:
        parameters: dict[str, Any] = {
            "JobType": FAX_JOB, "Recipient": recipient, "RecipientFile": recipient_file,
            "SendText": request.cover_text or "",
            "SendDateTime": request.send_at.astimezone(UTC) if request.send_at else xsd.SkipValue,
            "Options": self._options(request),
        }
        upload = Upload()  # the files are read as the request goes out (providers.upload)
        for index in range(MAX_FILES):
            document = files[index] if index < len(files) else None
            parameters[f"SendFilename{index + 1}"] = document.filename if document else ""
            parameters[f"SendFile{index + 1}"] = upload.base64_marker(document.data) \
                if document else b""
        answer = await self._call("SendJob", parameters, upload)
        result = int(answer["return"])
        code = codes.code_for("SendJob", result)
        if code.kind == "duplicate" and request.earlier_may_have_arrived:
            log.info("FAX.de already has job %s (-77): a resend after a lost answer",
                     request.job_id)
            answer["duplicate"] = True
            return answer
        if code.kind == "duplicate":  # nothing of ours can be that job: FAX.de refuses this
            log.warning("FAX.de refused job %s as a duplicate of an earlier job (-77)",
                        request.job_id)
            raise ProviderError(reasons.reason("duplicate_refused", detail=(
                f"FAX.de SendJob {result}: {code.text}")), transient=False)
        if code.kind == "ok":
            return answer
        if code.reason == "provider_auth":
            log.error("FAX.de refused account %s (SendJob %d: %s); check the credentials",
                      self.settings.account, result, code.text)
        raise codes.error_for("SendJob", result)

    def _receipt(self, job_id: str, answer: dict[str, Any]) -> SendReceipt:
        provider_job_id = str(answer.get("JobId") or "")
        pages = answer.get("PageCount")
        if not provider_job_id or provider_job_id == "0":  # accepted (or -77) without an id
            return SendReceipt(job_id=job_id, provider_job_id=self.unconfirmed_ref(job_id) or "",
                               pages=int(pages) if pages else None,
                               duplicate=bool(answer.get("duplicate")), confirmed=False)
        return SendReceipt(job_id=job_id, provider_job_id=provider_job_id,
                           pages=int(pages) if pages else None,
                           duplicate=bool(answer.get("duplicate")))

    def _options(self, request: SendRequest) -> str:
        settings = self.settings
        options = {
            "STATIONID": option_text(request.station_id or settings.station_id, 20),
            "FAXHEADER": option_text(request.header or settings.fax_header, 30),
            "CALLERID": settings.caller_id or "",
            "FAXRETRY": "" if settings.fax_retry is None else str(settings.fax_retry),
            "STATURL": self._status_url(request.job_id),
        }
        return ";".join(f"{key}={value}" for key, value in options.items() if value)

    def _status_url(self, job_id: str) -> str:
        base = self.context.push_base_url
        if not self.settings.status_push or not base:
            return ""
        # The token in the query, not the path: a proxy's access log can then leave it out
        # (log the path only); FAX.de gives no other place for it (README: FAX.de).
        url = f"{base}/{job_id}?t={self.push_token(job_id)}&cid=$CID&jid=$JID"
        if len(url) > MAX_STATURL:
            log.warning("STATURL would be %d characters (FAX.de takes %d); shorten "
                        "web.public_url. Status is polled instead.", len(url), MAX_STATURL)
            return ""
        return url

    # -- status ------------------------------------------------------------------------------

    async def status(self, refs: Sequence[ProviderRef]) -> dict[str, StatusReport]:
        by_job: dict[str, list[ProviderRef]] = {}
        learnt: dict[str, list[ProviderRef]] = {}  # unknown ids a push told us
        for ref in refs:
            if not ref.provider_job_id.startswith(UNKNOWN_JOB_PREFIX):
                by_job.setdefault(ref.provider_job_id, []).append(ref)
            elif ref.job_id in self._pushed_ids:
                learnt.setdefault(self._pushed_ids[ref.job_id], []).append(ref)
        # One JobStatus per FAX.de job, concurrently, but no more at once than the client
        # has connections.
        slots = asyncio.Semaphore(MAX_CONNECTIONS)

        async def job_status(provider_job_id: str, job_refs: list[ProviderRef]
                             ) -> dict[str, StatusReport]:
            async with slots:
                return await self._job_status(provider_job_id, job_refs)

        results = await asyncio.gather(*(job_status(provider_job_id, job_refs)
                                         for provider_job_id, job_refs in by_job.items()),
                                       *(self._pushed_job_status(provider_job_id, job_refs)
                                         for provider_job_id, job_refs in learnt.items()),
                                       return_exceptions=True)
        reports: dict[str, StatusReport] = {}
        for result in results:
            if isinstance(result, BaseException):
                raise result  # the first failure in job order, as when asked one by one
            reports.update(result)
        return reports

    async def _job_status(self, provider_job_id: str,
                          refs: Sequence[ProviderRef]) -> dict[str, StatusReport]:
        answer = await self._call("JobStatus", {"JobId": int(provider_job_id)})
        result = int(answer["return"])
        if result == codes.IN_PROGRESS:
            return {ref.job_id: StatusReport(state=JobState.SENDING) for ref in refs}
        if result == codes.JOB_NOT_FOUND:
            return self._not_found(refs)
        if result != 0:
            raise codes.error_for("JobStatus", result)
        return reports_from_status(answer, refs)

    def _not_found(self, refs: Sequence[ProviderRef]) -> dict[str, StatusReport]:
        """JobStatus 5: "not logged yet" for jobs submitted within the grace period (left
        out: no news), a failure for the others."""
        now = datetime.now(UTC)
        grace = self.settings.status_grace_seconds
        reason = codes.reason_for_code("JobStatus", codes.JOB_NOT_FOUND)
        # A ref without ``since`` (not from the tracker) is taken as fresh.
        return {ref.job_id: StatusReport(state=JobState.FAILED, reason=reason) for ref in refs
                if ref.since is not None and (now - ref.since).total_seconds() > grace}

    async def _pushed_job_status(self, provider_job_id: str, refs: Sequence[ProviderRef]
                                 ) -> dict[str, StatusReport]:
        """Jobs whose JobId only a push told: believed only where the StatusFile's REFID
        names them, and then known under that id from now on."""
        if not provider_job_id.isdigit():
            return {}
        answer = await self._call("JobStatus", {"JobId": int(provider_job_id)})
        if int(answer["return"]) != 0:
            return {}  # a push comes when the job is done; anything else: ask again later
        named = {row.reference for row in codes.parse_status_file(
            _bytes(answer.get("StatusFile")))}
        mine = [ref for ref in refs if ref.job_id in named]
        for ref in refs:  # asked and answered: a JobId that is not the job's is forgotten
            if ref not in mine:
                log.warning("FAX.de job %s, pushed for job %s, does not name it", provider_job_id,
                            ref.job_id)
            self._pushed_ids.pop(ref.job_id, None)
        reports = reports_from_status(answer, mine)
        return {job_id: dataclasses.replace(report, provider_job_id=provider_job_id)
                for job_id, report in reports.items()}

    # -- the account --------------------------------------------------------------------------

    async def check_account(self) -> AccountCheck:
        """Load the WSDL as sending would, then JobStatus of job 0: an accepted login answers
        5 (no such job); 1-4 refuse the account."""
        await self.soap.load()
        facts = [("WSDL", self.soap.wsdl_source), ("endpoint", self.soap.address),
                 ("reconstruction", "yes: namespace and SOAPAction are guessed"
                  if self.soap.reconstruction else "no")]
        facts += [("WSDL not loaded from", tried) for tried in self.soap.wsdl_tried]
        try:
            answer = await self._call("JobStatus", {"JobId": 0})
            result = int(answer["return"])
            code = codes.code_for("JobStatus", result)
            if code.reason in ("provider_auth", "provider_account") or code.kind == "transient":
                raise codes.error_for("JobStatus", result)
        except ProviderError as error:
            error.facts = facts
            raise
        facts.append(("login", f"accepted (JobStatus of job 0 answered {result}: {code.text})"))
        return AccountCheck(facts=facts, warnings=self.warnings())

    async def prepare(self) -> None:
        """Load the WSDL at start, so a reconstruction is reported at once (not first when a
        fax is sent)."""
        await self.soap.load()

    def warnings(self) -> list[str]:
        if not self.soap.reconstruction:
            return []
        return [f"account {self.account}: FAX.de WSDL could not be loaded; running on "
                "mailfax's reconstruction (namespace and SOAPAction guessed)"]

    # -- cancel ------------------------------------------------------------------------------

    async def cancel(self, ref: ProviderRef) -> bool:
        if ref.provider_job_id.startswith(UNKNOWN_JOB_PREFIX):
            return False
        answer = await self._call("CancelJob", {"JobId": int(ref.provider_job_id)})
        result = int(answer["return"])
        if result == 0:
            return True
        if codes.code_for("CancelJob", result).kind == "ok":  # 1: finished, -2: unknown job
            return False
        raise codes.error_for("CancelJob", result)

    # -- inbound -----------------------------------------------------------------------------

    async def fetch_inbound(self) -> InboundFax | None:
        answer = await self._call("RequestReceived", {})
        result = int(answer["return"])
        if result == codes.INBOX_EMPTY:
            return None
        if result != 0:
            raise codes.error_for("RequestReceived", result)
        received = answer.get("ReceiveDate")
        return InboundFax(
            fax_id=str(answer.get("FaxId")),
            called_number=str(answer.get("CalledNumber") or ""),
            received_at=_utc(received) if isinstance(received, datetime) else datetime.now(UTC),
            originator=str(answer.get("Originator") or ""),
            remote_id=str(answer.get("RemoteId") or ""),
            pages=int(answer.get("Pages") or 0),
            image=_bytes(answer.get("FaxImage")),
        )

    async def delete_inbound(self, fax_id: str) -> None:
        answer = await self._call("DeleteReceived", {"FaxId": int(fax_id)})
        result = int(answer["return"])
        if result == codes.UNKNOWN_FAX:
            log.info("FAX.de fax %s was already deleted", fax_id)
            return
        if result != 0:
            raise codes.error_for("DeleteReceived", result)

    # -- push --------------------------------------------------------------------------------

    async def handle_push(self, request: web.Request, subpath: str) -> web.StreamResponse:
        """STATURL: ``{push_base_url}/{job id}?t={token}&cid=…&jid=…``.

        Nothing authenticates FAX.de's call (the token stood in a URL that FAX.de and proxies
        may log), so the pushed values are not trusted: a valid token for a job of this
        account only makes the tracker ask FAX.de (JobStatus) about the job at once.
        """
        job_id = subpath
        job = await self.pushed_job(job_id, request.query.get("t", "")) if job_id else None
        if job is None:
            log.info("FAX.de status push refused: unknown job or wrong token")
            raise web.HTTPNotFound()
        job_ids = [job_id]
        cid = request.query.get("cid", "")
        if cid != job_id and re.fullmatch(r"[0-9a-z]{12}", cid) and await self._same_fax_de_job(
                job, cid):
            job_ids.append(cid)  # another recipient of the same bulk job
        jid = request.query.get("jid", "")
        if re.fullmatch(r"[0-9]{1,18}", jid):
            # The job's FAX.de id: what a job whose SendJob answer was lost lacks. Checked
            # against the StatusFile's REFID before it is believed (_pushed_job_status).
            for pushed in job_ids:
                self._pushed_ids[pushed] = jid
        if self.context.wake_tracker is not None:
            await self.context.wake_tracker(job_ids)
        return web.Response(text="OK\n")

    async def _same_fax_de_job(self, job: Job, other_id: str) -> bool:
        """Whether ``other_id`` is a job of this account in the same FAX.de job as ``job``."""
        if self.context.get_job is None or not job.provider_job_id:
            return False
        other = await self.context.get_job(other_id)
        return (other is not None and other.account == self.account
                and other.provider_job_id == job.provider_job_id)

    async def close(self) -> None:
        await self.soap.close()

    async def _call(self, operation: str, parameters: dict[str, Any],
                    upload: Upload | None = None) -> dict[str, Any]:
        """One SOAP operation with this account's credentials added to ``parameters``."""
        credentials = {"Account": self.settings.account,
                       "Password": self.settings.password.get_secret_value()}
        try:
            return await self.soap.call(operation, upload=upload, **credentials, **parameters)
        except SoapError as error:
            raise ProviderError(reasons.reason("provider_unavailable", detail=str(error)),
                                transient=True, maybe_sent=(
                                    operation == "SendJob" and error.may_have_arrived)) from None


def reports_from_status(answer: dict[str, Any],
                        refs: Sequence[ProviderRef]) -> dict[str, StatusReport]:
    """A finished JobStatus → one report per job: from the StatusFile rows (matched by REFID),
    or for a single-recipient job from SendResult when there is no usable row."""
    rows = codes.parse_status_file(_bytes(answer.get("StatusFile")))
    by_reference = {row.reference: row for row in rows if row.reference}
    reports: dict[str, StatusReport] = {}
    for ref in refs:
        row = by_reference.get(ref.job_id)
        if row is None and len(refs) == 1 and len(rows) == 1:
            row = rows[0]
        if row is not None:
            state, reason = codes.outcome_of_send_result(row.result)
            reports[ref.job_id] = StatusReport(
                state=state, reason=reason, pages=row.pages, remote_id=row.remote_id or None,
                duration_seconds=row.duration_seconds, finished_at=row.sent_at)
        elif len(refs) == 1 and str(answer.get("SendResult") or "").lower() != "multi":
            state, reason = codes.outcome_of_send_result(str(answer.get("SendResult") or ""))
            sent = answer.get("SendDateTime")
            reports[ref.job_id] = StatusReport(
                state=state, reason=reason, remote_id=str(answer.get("RemoteId") or "") or None,
                finished_at=_utc(sent) if isinstance(sent, datetime) else None)
    return reports


def fax_files(documents: Sequence[FaxDocument]) -> list[FaxDocument]:
    """At most three files with ``.pdf`` names: documents after the second are merged into
    the third."""
    named = [FaxDocument(pdf_filename(document.filename, index), document.data, document.pages)
             for index, document in enumerate(documents, start=1)]
    if len(named) <= MAX_FILES:
        return named
    rest = merge_pdfs(named[MAX_FILES - 1:], named[MAX_FILES - 1].filename)
    return [*named[:MAX_FILES - 1], rest]


def pdf_filename(filename: str, index: int) -> str:
    """FAX.de tells the file type by the extension; keep the name readable, ASCII, ``.pdf``."""
    ascii_name = to_ascii(filename)
    stem = re.sub(r"[^A-Za-z0-9._ -]+", "_", ascii_name).strip(" ._")
    stem = re.sub(r"\.pdf$", "", stem, flags=re.IGNORECASE)[:80] or f"document{index}"
    return f"{stem}.pdf"


def option_text(value: str | None, limit: int) -> str:
    """An Options value: printable ASCII, no ``;`` (the separator), at most ``limit`` chars."""
    if not value:
        return ""
    ascii_text = to_ascii(value)
    cleaned = "".join(char for char in ascii_text if char.isprintable() and char not in ";=")
    return cleaned.strip()[:limit]


def _bytes(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str) and value:
        try:
            return base64.b64decode(value, validate=False)
        except ValueError:
            return b""
    return b""


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def create(context: ProviderContext, settings: Settings) -> FaxDeProvider:
    return FaxDeProvider(context, settings)
