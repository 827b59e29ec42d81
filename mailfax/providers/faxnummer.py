"""Faxnummer.de (Portunity ISPSuite "webrequests", product-voip): send faxes over HTTP.

Wire protocol, from the vendor's API page (``shared/provider-docs/faxnummer-de-api.de.md``):
every call is a POST to one URL with ``sProductLogin``, ``sProductCode`` and ``sCommand``.
``SendFax`` uploads one PDF as the multipart file part ``sFax`` and answers ``WR_Status`` (ok or
failed), ``WR_Comment`` and ``WR_Request_UUID``; ``GetSentFaxStatus`` takes that UUID as
``sJobUUID`` and answers ``WR_DataList_<n>_<Field>`` entries.

What is *not* documented, and so assumed here:

* The body format of the answers. :func:`parse_response` is the one place that reads them and
  accepts ``key=value`` lines, ``key: value`` lines, one URL-encoded line, a JSON object or flat
  XML; keys and ``WR_Status`` are compared case-insensitively.
* The time zone of ``LastChangeDateTime``: read as German local time.
* Duplicate protection: the API has none. The docs say of ``sFaxFileName`` only "Diese
  Zeichenkette hat keine besondere Funktion und wird lediglich bei Statusabfragen und
  Status-Mails mit angegeben"; a resend is faxed again. So the adapter declares
  :attr:`ResendHandling.NOT_RECOGNISED`, and a ``SendFax`` whose answer is lost, unreadable
  or cut off after the upload began is never resent automatically: the job goes
  ``unconfirmed``. Nothing can be asked about it either: ``GetSentFaxStatus`` needs the
  ``WR_Request_UUID`` that did not come back. Our job id still travels at the end of
  ``sFaxFileName`` as `` [job id]``, so Faxnummer.de's own status mails (to ``sEmail``, the
  administrator) name it. (``WR_Duplicate`` is read only because the emulator can be told to
  invent it, option ``duplicates=reference``; the real service is not known to send it.)
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import urllib.parse
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import httpx

from mailfax import reasons
from mailfax.documents.pdf import merge_pdfs
from mailfax.model import JobState
from mailfax.providers import q850
from mailfax.providers.account_settings import FaxnummerSettings
from mailfax.providers.base import (
    AccountCheck,
    BaseProvider,
    ErrorKind,
    FaxDocument,
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
from mailfax.providers.http import request_may_have_arrived, status_error, status_may_have_acted
from mailfax.providers.upload import Upload
from mailfax.support import xmlsafe
from mailfax.support.text import to_ascii

log = logging.getLogger(__name__)

Settings = FaxnummerSettings  # the module's account settings (see mailfax.providers)

PROVIDER_TIMEZONE = ZoneInfo("Europe/Berlin")
SENDER_MAX = 20  # sSender: "maximal 20 Zeichen, nur druckbare ASCII-Zeichen und Leerzeichen"
NAME_MAX = 60  # of sFaxFileName before our reference; the docs name no limit


# -- the answer format (pure) -----------------------------------------------------------------

class ResponseFormatError(ValueError):
    """The answer is in none of the formats :func:`parse_response` knows."""


_LINE = re.compile(r"^\s*([A-Za-z][\w.-]*)\s*[=:][ \t]?(.*?)\s*$")


def parse_response(body: str) -> dict[str, str]:
    """The flat mapping in a webrequests answer, keys lower-cased.

    Accepts ``key=value`` lines, ``key: value`` lines, one URL-encoded line, a JSON object and
    flat XML, because the real format is not documented publicly; nested JSON/XML is flattened
    with ``_`` (a JSON list counts from 1, like ``WR_DataList_1_Status``).
    """
    text = body.strip().lstrip("\ufeff")
    if text.startswith("{"):
        pairs = _json_pairs(text)
    elif text.startswith("<"):
        pairs = _xml_pairs(text)
    elif "=" in text and not any(char.isspace() for char in text):
        pairs = _urlencoded_pairs(text)
    else:
        pairs = _line_pairs(text)
    fields = {key.lower(): value.strip() for key, value in pairs}
    if not fields:
        raise ResponseFormatError("empty answer")
    return fields


def _json_pairs(text: str) -> list[tuple[str, str]]:
    try:
        data = json.loads(text)
    except ValueError as error:
        raise ResponseFormatError(f"bad JSON: {error}") from None
    if not isinstance(data, dict):
        raise ResponseFormatError("JSON answer is not an object")
    return list(_flatten(data, ""))


def _flatten(value: Any, prefix: str) -> Iterator[tuple[str, str]]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _flatten(item, f"{prefix}_{key}" if prefix else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value, 1):
            yield from _flatten(item, f"{prefix}_{index}")
    elif isinstance(value, bool):
        yield prefix, "1" if value else "0"
    else:
        yield prefix, "" if value is None else str(value)


def _xml_pairs(text: str) -> list[tuple[str, str]]:
    try:
        xmlsafe.refuse_dtd(text)
    except xmlsafe.UnsafeXML as error:
        raise ResponseFormatError(str(error)) from None
    try:
        root = ElementTree.fromstring(text)
    except ElementTree.ParseError as error:
        raise ResponseFormatError(f"bad XML: {error}") from None
    return list(_xml_leaves(root, ""))


def _xml_leaves(element: ElementTree.Element, prefix: str) -> Iterator[tuple[str, str]]:
    for child in element:
        key = f"{prefix}_{child.tag}" if prefix else child.tag
        if len(child):
            yield from _xml_leaves(child, key)
        else:
            yield key, child.text or ""


def _urlencoded_pairs(text: str) -> list[tuple[str, str]]:
    try:
        return urllib.parse.parse_qsl(text, keep_blank_values=True, strict_parsing=True)
    except ValueError as error:
        raise ResponseFormatError(f"bad URL-encoded answer: {error}") from None


def _line_pairs(text: str) -> list[tuple[str, str]]:
    pairs = []
    for line in text.splitlines():
        if not line.strip():
            continue
        match = _LINE.match(line)
        if match is None:
            raise ResponseFormatError(f"unreadable line {line[:80]!r}")
        pairs.append((match.group(1), match.group(2)))
    return pairs


# -- what the answers mean (pure) -------------------------------------------------------------

@dataclass(frozen=True)
class _Refusal:
    reason: str  # mailfax reason code
    transient: bool
    text: tuple[str, str] | None = None  # our own (english, german) instead of the catalogue's


# WR_Comment of a failed call, lower-cased, as the vendor documents them.
_REFUSALS: dict[str, _Refusal] = {
    "failed to send fax": _Refusal("provider_error", transient=True),
    "fax wrong format": _Refusal("document_rejected", transient=False),
    "destination wrong format": _Refusal("invalid_number", transient=False),
    "email wrong format": _Refusal("provider_account", transient=False, text=(
        "The fax service refused the status e-mail address configured for this account; "
        "the administrator has to fix it.",
        "Der Faxdienst hat die für dieses Konto eingestellte Status-E-Mail-Adresse abgelehnt; "
        "der Administrator muss sie korrigieren.")),
    "productcode invalid": _Refusal("provider_auth", transient=False),
    "webrequest is not available for this account": _Refusal("provider_auth", transient=False),
}
# Refusals an administrator has to fix: logged at ERROR.
ADMIN_REASONS = frozenset({"provider_auth", "provider_account"})

STATES: dict[str, JobState] = {
    "NEW": JobState.SUBMITTED,
    "RUNNING": JobState.SENDING,
    # The provider dials again later by itself; RETRYING keeps the job tracked (it has a
    # provider job id, so the dispatcher does not send it again) and tells the sender why.
    "RETRY": JobState.RETRYING,
    "DONE-OK": JobState.DELIVERED,
    "DONE-ERROR": JobState.FAILED,
}

_ENTRY_KEY = re.compile(r"^wr_datalist_(\d+)_(.+)$")


def answer_error(fields: Mapping[str, str]) -> ProviderError | None:
    """None for ``WR_Status`` ok (any case), else the error the answer means."""
    status = fields.get("wr_status", "").strip().lower()
    if status == "ok":
        return None
    comment = fields.get("wr_comment", "").strip()
    detail = f"WR_Status={fields.get('wr_status', '')!r} WR_Comment={comment!r}"
    refusal = next((refusal for text, refusal in _REFUSALS.items()
                    if comment.lower().startswith(text)), None)
    if refusal is None:  # undocumented: may pass, so try again (a refused job was not queued)
        return ProviderError(reasons.reason("provider_error", detail), transient=True)
    if refusal.text:
        reason = reasons.custom(refusal.reason, *refusal.text, detail=detail)
    else:
        reason = reasons.reason(refusal.reason, detail)
    return ProviderError(reason, transient=refusal.transient)


def send_answer(fields: Mapping[str, str]) -> tuple[str, bool]:
    """(WR_Request_UUID, duplicate) of an ok ``SendFax`` answer.

    ``WR_Duplicate`` is the emulator's, not the vendor's: the real service never sets it.
    """
    uuid = fields.get("wr_request_uuid") or fields.get("jobuuid") or ""
    if not uuid.strip():  # the job may exist, we cannot know its UUID
        raise ProviderError(reasons.reason("provider_error", "ok without WR_Request_UUID"),
                            transient=True, maybe_sent=True)
    duplicate = fields.get("wr_duplicate", "").strip().lower() in {"1", "true", "yes"}
    return uuid.strip(), duplicate


def status_entry(fields: Mapping[str, str], job_uuid: str) -> dict[str, str] | None:
    """The ``WR_DataList_<n>_`` entry of ``job_uuid`` (or the first one), keys without prefix."""
    entries: dict[int, dict[str, str]] = {}
    for key, value in fields.items():
        match = _ENTRY_KEY.match(key)
        if match:
            entries.setdefault(int(match.group(1)), {})[match.group(2)] = value
    for _, entry in sorted(entries.items()):
        if entry.get("jobuuid", job_uuid) == job_uuid:
            return entry
    return entries[min(entries)] if entries else None


def report_for(entry: Mapping[str, str]) -> StatusReport | None:
    """The normalised report of one status entry; None for a ``Status`` we do not know."""
    state = STATES.get(entry.get("status", "").strip().upper())
    if state is None:
        return None
    cause = _number(entry.get("statusq850cause"))
    reason = None
    if state == JobState.FAILED:
        reason = q850.reason_for(cause)
    elif state == JobState.RETRYING:
        tries = entry.get("sendtriesremaining", "?")
        reason = q850.reason_for(cause, f"{tries} tries remaining")
    return StatusReport(
        state=state,
        pages=_number(entry.get("pagessent")),
        duration_seconds=_number(entry.get("connectionduration")),
        remote_id=entry.get("remotetsi", "").strip() or None,
        reason=reason,
        finished_at=_provider_time(entry.get("lastchangedatetime")) if state.is_final else None,
        detail=dict(entry),
    )


def _number(text: str | None) -> int | None:
    try:
        return int(float(text)) if text and text.strip() else None
    except ValueError:
        return None


def _provider_time(text: str | None) -> datetime | None:
    try:
        local = datetime.strptime((text or "").strip(), "%Y-%m-%d %H:%M:%S")
    except ValueError:
        return None
    return local.replace(tzinfo=PROVIDER_TIMEZONE).astimezone(UTC)


def may_have_created_a_job(status: int, body: str) -> bool:
    """Whether a ``SendFax`` answered with a transient error may still have created a job: a
    5xx that may come after the work was done, or a 2xx that is unreadable or has no
    ``WR_Status`` we know. Only ``WR_Status`` failed is a refusal that created nothing."""
    if not 200 <= status < 300:
        return status_may_have_acted(status)
    try:
        fields = parse_response(body)
    except ResponseFormatError:
        return True
    return fields.get("wr_status", "").strip().lower() != "failed"


def http_error(status: int, retry_after: str | None, command: str) -> ProviderError | None:
    """The error an HTTP status means, before the body is looked at; None for 2xx."""
    if 200 <= status < 300:
        return None
    return status_error(status, retry_after, command)


# -- what we send (pure) ----------------------------------------------------------------------

def fax_sender(text: str) -> str:
    """``sSender``: at most 20 printable ASCII characters, German umlauts spelled out."""
    spaced = " ".join(text.split())  # tabs and line breaks are not printable
    ascii_only = "".join(char for char in to_ascii(spaced) if " " <= char <= "~")
    return " ".join(ascii_only.split())[:SENDER_MAX].rstrip()


def dial_string(number: str) -> str:
    """``+4930...`` → ``004930...``, the format the docs recommend."""
    return "00" + number[1:] if number.startswith("+") else number


def fax_reference(request: SendRequest) -> str:
    """``sFaxFileName``: the file name (or the subject for several files), then our job id."""
    documents = request.documents
    name = documents[0].filename if len(documents) == 1 else request.subject
    name = " ".join((name or documents[0].filename).split())[:NAME_MAX]
    return f"{name} [{request.job_id}]"


def send_fields(request: SendRequest, settings: Settings) -> dict[str, str]:
    """The text fields of ``SendFax`` (credentials apart)."""
    fields = {
        "sCommand": "SendFax",
        "sDestination": dial_string(request.number),
        "sEmail": settings.status_email,
        "mimeType": "application/pdf",
        "sFaxFileName": fax_reference(request),
    }
    sender = fax_sender(request.header or request.station_id or settings.sender_name)
    if sender:
        fields["sSender"] = sender
    if settings.source_number:
        fields["sSource"] = dial_string(settings.source_number)
    return fields


def merge_to_one(documents: Sequence[FaxDocument]) -> FaxDocument:
    """The one PDF ``SendFax`` takes."""
    return merge_pdfs(documents, "fax.pdf")


# -- the adapter (I/O) ------------------------------------------------------------------------

def make_client(settings: Settings) -> httpx.AsyncClient:
    """One client per account: pooled connections, timeouts, retried connection attempts."""
    limits = httpx.Limits(max_connections=settings.max_connections,
                          max_keepalive_connections=settings.max_connections)
    transport = httpx.AsyncHTTPTransport(retries=settings.connect_retries, limits=limits)
    timeout = httpx.Timeout(settings.timeout_seconds, connect=settings.connect_timeout_seconds)
    return httpx.AsyncClient(transport=transport, timeout=timeout, follow_redirects=False,
                             headers={"User-Agent": "mailfax"})


class FaxnummerProvider(BaseProvider):
    provider_name = "faxnummer.de"
    # No idempotency, no reference lookup: see the module's docstring.
    resend_handling = ResendHandling.NOT_RECOGNISED

    def __init__(self, context: ProviderContext, settings: Settings,
                 client: httpx.AsyncClient | None = None):
        super().__init__(context)
        self.settings = settings
        self.client = client or make_client(settings)

    async def send(self, request: SendRequest) -> SendReceipt:
        result = (await self.send_many([request]))[0]
        if isinstance(result, ProviderError):
            raise result
        return result

    async def send_many(self, requests: Sequence[SendRequest]) -> list[SendResult]:
        """Merges each set of documents once (the API takes one PDF), then sends in parallel."""
        merged = await prepare_documents(requests, merge_to_one)
        results = await asyncio.gather(
            *(self._send_one(request, document)
              for request, document in zip(requests, merged, strict=True)),
            return_exceptions=True)
        return [self._as_result(result) for result in results]

    async def _send_one(self, request: SendRequest, document: FaxDocument) -> SendReceipt:
        fields = await self._call("SendFax", send_fields(request, self.settings), document)
        provider_job_id, duplicate = send_answer(fields)
        return SendReceipt(job_id=request.job_id, provider_job_id=provider_job_id,
                           pages=document.pages, duplicate=duplicate)

    @staticmethod
    def _as_result(result: SendReceipt | BaseException) -> SendResult:
        if isinstance(result, SendReceipt | ProviderError):
            return result
        if not isinstance(result, Exception):
            raise result
        log.error("faxnummer.de send failed unexpectedly", exc_info=result)
        return ProviderError(reasons.reason("provider_error", type(result).__name__),
                             transient=True, maybe_sent=True)  # perhaps after the POST

    async def status(self, refs: Sequence[ProviderRef]) -> dict[str, StatusReport]:
        results = await asyncio.gather(*(self._status_one(ref) for ref in refs),
                                       return_exceptions=True)
        reports: dict[str, StatusReport] = {}
        errors: list[ProviderError] = []
        for ref, result in zip(refs, results, strict=True):
            if isinstance(result, StatusReport):
                reports[ref.job_id] = result
            elif isinstance(result, ProviderError):
                errors.append(result)
            elif isinstance(result, BaseException):
                raise result
        permanent = [error for error in errors if not error.transient]
        if permanent or (errors and not reports):
            raise (permanent or errors)[0]
        if errors:
            log.warning("faxnummer.de %s: status of %d of %d jobs failed, first: %s",
                        self.account, len(errors), len(refs), errors[0])
        return reports

    async def _status_one(self, ref: ProviderRef) -> StatusReport | None:
        fields = await self._call("GetSentFaxStatus", {"sCommand": "GetSentFaxStatus",
                                                       "sJobUUID": ref.provider_job_id})
        entry = status_entry(fields, ref.provider_job_id)
        report = report_for(entry) if entry else None
        if report is None:
            log.warning("faxnummer.de %s: no usable status for %s in %s", self.account,
                        ref.provider_job_id, sorted(fields))
        return report

    async def check_account(self) -> AccountCheck:
        """``GetSentFaxStatus`` of a job that does not exist: the documented refusals of the
        login ("Productcode invalid", "Webrequest is not available ...") raise; any other
        answer, "ok" or a "failed" about the job, means the login was accepted."""
        uuid = f"mailfax-check-{self.account}-0"
        facts = [("URL", self.settings.url), ("login", self.settings.product_login)]
        try:
            fields = await self._call("GetSentFaxStatus", {"sCommand": "GetSentFaxStatus",
                                                           "sJobUUID": uuid})
        except ProviderError as error:
            if error.kind == ErrorKind.ACCOUNT or not error.reason.detail.startswith(
                    "WR_Status="):
                error.facts = facts
                raise
            facts.append(("credentials", f"accepted (an unknown job answered "
                                         f"{error.reason.detail})"))
            return AccountCheck(facts=facts)
        facts.append(("credentials", f"accepted (an unknown job answered WR_Status="
                                     f"{fields.get('wr_status', '')!r}, "
                                     f"{fields.get('wr_datalist_objectcount', '0')} entries)"))
        return AccountCheck(facts=facts)

    async def _call(self, command: str, fields: dict[str, str],
                    document: FaxDocument | None = None) -> dict[str, str]:
        """One POST; returns the parsed answer of a ``WR_Status`` ok, raises otherwise."""
        data = {"sProductLogin": self.settings.product_login,
                "sProductCode": self.settings.product_code.get_secret_value(), **fields}
        try:
            if document is None:
                response = await self.client.post(self.settings.url, data=data)
            else:
                response = await self._post_with(document, data)
        except httpx.HTTPError as error:
            raise ProviderError(reasons.reason(
                "provider_unavailable", f"{command}: {type(error).__name__} {error}".strip()),
                transient=True, maybe_sent=command == "SendFax" and request_may_have_arrived(
                    error)) from error
        try:
            answer = self._answer(command, response)
        except ProviderError as error:
            self._log_refusal(command, error)
            if command == "SendFax" and error.transient and may_have_created_a_job(
                    response.status_code, response.text):
                raise ProviderError(error.reason, transient=True, retry_after=error.retry_after,
                                    maybe_sent=True) from None
            raise
        return answer

    async def _post_with(self, document: FaxDocument, data: dict[str, str]) -> httpx.Response:
        """The form with ``document`` as its ``sFax`` file, read as the body goes out (see
        providers.upload): httpx encodes the form around a marker for the file."""
        upload = Upload()
        files = {"sFax": (document.filename, upload.raw_marker(document.data), "application/pdf")}
        form = self.client.build_request("POST", self.settings.url, data=data, files=files)
        body = upload.body(form.read())
        return await self.client.post(self.settings.url, content=body, headers={
            "Content-Type": form.headers["Content-Type"], **body.headers})

    def _answer(self, command: str, response: httpx.Response) -> dict[str, str]:
        error = http_error(response.status_code, response.headers.get("Retry-After"), command)
        if error is not None:
            raise error
        try:
            answer = parse_response(response.text)
        except ResponseFormatError as bad:
            log.warning("faxnummer.de %s %s: unreadable answer %r", self.account, command,
                        response.text[:200])
            raise ProviderError(reasons.reason("provider_error", f"{command}: {bad}"),
                                transient=True) from None
        error = answer_error(answer)
        if error is not None:
            raise error
        return answer

    def _log_refusal(self, command: str, error: ProviderError) -> None:
        if error.reason.code in ADMIN_REASONS:
            log.error("faxnummer.de account %s (login %s) refused %s: %s; check [accounts.%s]",
                      self.account, self.settings.product_login, command, error.reason.detail,
                      self.account)

    async def close(self) -> None:
        await self.client.aclose()


def create(context: ProviderContext, settings: Settings) -> FaxnummerProvider:
    return FaxnummerProvider(context, settings)
