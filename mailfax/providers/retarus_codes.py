"""Retarus Fax4A, the pure part: status codes, document names, report and push parsing.

No I/O here, so every quirk of the wire format is tested without a socket. The adapter in
:mod:`mailfax.providers.retarus` does the HTTP.

Sources: Retarus' developer portal and SDKs, and two third-party clients of its older SOAP API
(whose report format the status push still uses); see ``shared/research/providers.md`` §3.
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from mailfax import reasons
from mailfax.model import JobState, Reason
from mailfax.providers.base import ProviderError, StatusReport
from mailfax.providers.http import http_detail, status_error
from mailfax.support import xmlsafe
from mailfax.support.text import to_ascii

MAX_IDS_PER_REQUEST = 1000  # bulk POST /reports: "The maximum number of jobs per POST"
MAX_NAME_LENGTH = 32  # documents[].name: at most 32 of [a-zA-Z0-9-_.]
SUCCESS = "OK"
IN_PROGRESS = "PENDING"

JsonDict = dict[str, Any]
T = TypeVar("T")


@dataclass(frozen=True)
class Code:
    """What a Retarus status means: a catalogue reason code, optionally with our own texts."""

    reason: str
    english: str = ""
    german: str = ""

    def make(self, detail: str) -> Reason:
        if self.english:
            return reasons.custom(self.reason, self.english, self.german, detail)
        return reasons.reason(self.reason, detail)


# Every status but OK (delivered) and PENDING (in progress) is a failure. Vendor codes
# (transmission-status-codes-outbound-fax) first, then those seen in third-party clients.
STATUS_CODES: dict[str, Code] = {
    "BUSY": Code("busy"),
    "NOFAX": Code("not_a_fax"),
    "NOFAX_DIS": Code("not_a_fax", "A person answered and hung up.",
                      "Ein Mensch hat abgenommen und aufgelegt."),
    "NOFAX_TO": Code("not_a_fax", "The call was answered, but no fax machine replied.",
                     "Der Anruf wurde angenommen, aber kein Faxgerät hat geantwortet."),
    "RING_TO": Code("no_answer"),
    "WOUT_TO": Code("no_answer", "Nothing answered after dialling; the number may lack an "
                    "extension.", "Nach dem Wählen kam keine Reaktion; vielleicht fehlt der "
                    "Nummer eine Durchwahl."),
    "DIAL_NC": Code("invalid_number"),
    "WRONG_NO": Code("invalid_number"),
    "CHANGED_NO": Code("no_service", "The number has changed (the line plays an announcement).",
                       "Die Rufnummer hat sich geändert (eine Ansage läuft)."),
    "BLACKLIST": Code("blacklisted"),
    "PBLACKLIST": Code("blacklisted", "The number is on this account's own do-not-fax list and "
                       "was not called.", "Die Nummer steht auf der Sperrliste dieses Kontos und "
                       "wurde nicht angerufen."),
    "EOD_FAILED": Code("transmission_unconfirmed", "The fax machine did not confirm receipt; "
                       "the fax may still have arrived.", "Das Faxgerät hat den Empfang nicht "
                       "bestätigt; das Fax kann trotzdem angekommen sein."),
    "NO_TRAIN": Code("transmission_failed"),
    "PAGE_SEND_ERR": Code("transmission_failed"),
    "PAGE_SEND_ERROR": Code("transmission_failed"),
    "REM_DIS": Code("transmission_failed", "The remote fax machine hung up during the "
                    "transmission.", "Das Faxgerät der Gegenstelle hat während der Übertragung "
                    "aufgelegt."),
    "NO_REMOTEINFO": Code("transmission_failed"),
    "BAD_LINES": Code("transmission_failed"),
    "FANS_GF": Code("transmission_failed"),
    "DIAL_GF": Code("call_failed"),
    "COMERROR": Code("call_failed"),
    "MISSING_FAX_FILE": Code("document_rejected"),
    "UNKNOWN_FAX_FILE": Code("document_rejected"),
    "TIFF_PAGE_ERR": Code("document_rejected"),
    "RENDERING_ERROR": Code("document_rejected", "The fax service could not convert the "
                            "document (a protected PDF?).", "Der Faxdienst konnte das Dokument "
                            "nicht umwandeln (ein geschütztes PDF?)."),
    "CANCELLED": Code("cancelled", "The fax was cancelled in the Retarus portal.",
                      "Das Fax wurde im Retarus-Portal storniert."),
}


def chunked(items: Sequence[T], size: int = MAX_IDS_PER_REQUEST) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


# --- reports -----------------------------------------------------------------------------

def reports_in(body: Any) -> list[JsonDict]:
    """The report items of a list or bulk answer (``{"reports": …}``, or the mock's
    ``{"value": {"reports": …}}``); anything else yields none."""
    if isinstance(body, dict) and isinstance(body.get("value"), dict):
        body = body["value"]
    items = body.get("reports") if isinstance(body, dict) else body
    if not isinstance(items, list):
        return []
    return [item for item in items if isinstance(item, dict) and isinstance(item.get("jobId"),
                                                                            str)]


def customer_defined_id(report: Mapping[str, Any]) -> str | None:
    reference = report.get("reference")
    if isinstance(reference, dict) and isinstance(reference.get("customerDefinedId"), str):
        return str(reference["customerDefinedId"])
    return None


def recipient_status(report: Mapping[str, Any]) -> JsonDict | None:
    """The first recipient's status (mailfax sends one recipient per job)."""
    statuses = report.get("recipientStatus")
    if isinstance(statuses, list) and statuses and isinstance(statuses[0], dict):
        return statuses[0]
    return None


def has_status(report: Mapping[str, Any]) -> bool:
    """Whether a bulk item is a report (and not a "not found" placeholder)."""
    recipient = recipient_status(report)
    return recipient is not None and isinstance(recipient.get("status"), str)


def is_final(report: Mapping[str, Any]) -> bool:
    recipient = recipient_status(report)
    return recipient is not None and str(recipient.get("status", IN_PROGRESS)).upper() not in (
        IN_PROGRESS, "")


def status_report(report: Mapping[str, Any]) -> StatusReport:
    """A Retarus report (JSON shape) as mailfax's normalised report."""
    recipient = recipient_status(report) or {}
    status = str(recipient.get("status") or IN_PROGRESS).strip().upper()
    if status == IN_PROGRESS:
        return StatusReport(state=JobState.SUBMITTED)
    raw_reason = str(recipient.get("reason") or "")
    detail = f"Retarus {status}" + (f": {raw_reason}" if raw_reason and raw_reason != status
                                    else "")
    finished = _timestamp(recipient.get("sentTs"))
    duration = _number(recipient.get("durationInSecs"))
    remote = str(recipient.get("remoteCsid") or "").strip() or None
    raw = {"retarus_job_id": report.get("jobId"), "status": status, "reason": raw_reason,
           "sent_to": recipient.get("sentToNumber")}
    if status == SUCCESS:
        pages = _number(report.get("pages"))
        return StatusReport(state=JobState.DELIVERED, pages=int(pages) if pages else None,
                            duration_seconds=duration, remote_id=remote, finished_at=finished,
                            detail=raw)
    code = STATUS_CODES.get(status, Code("unknown"))
    return StatusReport(state=JobState.FAILED, pages=0, duration_seconds=duration,
                        remote_id=remote, reason=code.make(detail), finished_at=finished,
                        detail=raw)


def _timestamp(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def _number(value: Any) -> float | None:
    try:
        return float(value) if value is not None and value != "" else None
    except (TypeError, ValueError):
        return None


# --- document names ----------------------------------------------------------------------

_NOT_ALLOWED = re.compile(r"[^A-Za-z0-9._-]")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,32}$")


def _plain(text: str) -> str:
    """ASCII (umlauts spelled out, accents dropped), then ``_`` for what Retarus refuses."""
    return _NOT_ALLOWED.sub("_", to_ascii(text))


def document_names(filenames: Sequence[str], extension: str = ".pdf") -> list[str]:
    """Names Retarus accepts (≤32 of ``[A-Za-z0-9._-]``), unique, ending in ``extension``.

    Retarus decides the file type by the extension, so it is always kept whole.
    """
    names: list[str] = []
    taken: set[str] = set()
    for filename in filenames:
        base = filename.rsplit("/", 1)[-1].rsplit("\\", 1)[-1]
        if base.lower().endswith(extension.lower()):
            base = base[:-len(extension)]
        stem = _plain(base).strip("._") or "document"
        name = _fit(stem, "", extension)
        counter = 1
        while name.lower() in taken:
            counter += 1
            name = _fit(stem, f"-{counter}", extension)
        taken.add(name.lower())
        names.append(name)
    return names


def _fit(stem: str, suffix: str, extension: str) -> str:
    room = MAX_NAME_LENGTH - len(suffix) - len(extension)
    return stem[:room].rstrip("._-") + suffix + extension


# --- status push -------------------------------------------------------------------------

class PushFormatError(ValueError):
    """A status push we cannot read (a 400 for the sender)."""


def parse_push(body: bytes, content_type: str) -> list[JsonDict]:
    """The report(s) of a status push, in the JSON report shape.

    Retarus pushes its SOAP-era ``faxJobReport`` XML by default; JSON (a report as in the
    bulk answer, or ``{"reports": […]}``) can be configured.
    """
    stripped = body.lstrip()
    if "xml" in content_type.lower() or stripped.startswith(b"<") or stripped.startswith(
            (b"\xef\xbb\xbf<", b"\xff\xfe", b"\xfe\xff")):
        return [_xml_report(body)]
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, ValueError) as error:
        raise PushFormatError(f"neither XML nor JSON: {error}") from None
    if isinstance(data, dict) and ("reports" in data or "value" in data):
        found = reports_in(data)
    elif isinstance(data, dict) and isinstance(data.get("jobId"), str):
        found = [data]
    else:
        found = []
    if not found:
        raise PushFormatError("JSON without a report")
    return found


def refuse_dtd(body: bytes) -> None:
    try:
        xmlsafe.refuse_dtd(body)
    except xmlsafe.UnsafeXML as error:
        raise PushFormatError(str(error)) from None


def _xml_report(body: bytes) -> JsonDict:
    refuse_dtd(body)
    root = ET.fromstring(body)
    if _local(root.tag) != "faxJobReport":
        root = next((e for e in root.iter() if _local(e.tag) == "faxJobReport"), root)
        if _local(root.tag) != "faxJobReport":
            raise PushFormatError("XML without a faxJobReport")
    fields = {_local(child.tag): child for child in root}
    job_id = _text(fields.get("jobId"))
    if not job_id:
        raise PushFormatError("faxJobReport without a jobId")
    recipients = []
    for element in root:
        if _local(element.tag) != "faxRecipient":
            continue
        values = {_local(child.tag): (child.text or "").strip() for child in element}
        recipients.append({
            "number": values.get("number", ""), "status": values.get("status", ""),
            "reason": values.get("reason", ""),
            "sentTs": values.get("sentTS") or values.get("sentTs") or None,
            "durationInSecs": _int(values.get("durationInSecs")),
            "sentToNumber": values.get("sentToNumber", ""),
            "remoteCsid": values.get("remoteCsid", ""),
        })
    if not recipients:
        raise PushFormatError("faxJobReport without a faxRecipient")
    report: JsonDict = {"jobId": job_id, "recipientStatus": recipients,
                        "pages": _int(_text(fields.get("pages")))}
    reference = fields.get("reference")
    if reference is not None:
        report["reference"] = {_local(child.tag): (child.text or "").strip()
                               for child in reference}
    return report


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _text(element: ET.Element | None) -> str:
    return (element.text or "").strip() if element is not None else ""


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value else None
    except ValueError:
        return None


def push_xml(report: Mapping[str, Any], push_url: str = "") -> bytes:
    """A report as Retarus' default XML push (used by the emulator, and as a test oracle)."""
    namespace = "http://retarus.com/fax4ba/faxws/3/0"
    root = ET.Element("faxJobReport", xmlns=namespace)
    ET.SubElement(root, "jobId").text = str(report["jobId"])
    push = ET.SubElement(root, "httpStatusPush")
    ET.SubElement(push, "url").text = push_url
    ET.SubElement(push, "authMethod").text = "HTTP_BASIC"
    for recipient in report.get("recipientStatus") or []:
        element = ET.SubElement(root, "faxRecipient")
        for tag, key in (("number", "number"), ("status", "status"), ("reason", "reason"),
                         ("sentTS", "sentTs"), ("durationInSecs", "durationInSecs"),
                         ("sentToNumber", "sentToNumber"), ("remoteCsid", "remoteCsid")):
            value = recipient.get(key)
            ET.SubElement(element, tag).text = "" if value is None else str(value)
    if report.get("pages") is not None:
        ET.SubElement(root, "pages").text = str(report["pages"])
    reference = report.get("reference")
    if isinstance(reference, dict):
        element = ET.SubElement(root, "reference")
        for key, value in reference.items():
            ET.SubElement(element, key).text = str(value)
    text = ET.tostring(root, encoding="unicode")
    return ('<?xml version="1.0" encoding="UTF-8"?>\n' + text).encode()


# --- HTTP answers ------------------------------------------------------------------------

def http_error(status: int, body: str, retry_after_header: str | None,
               operation: str) -> ProviderError:
    """An error answer as a normalised, typed error (sendjobrequest / report pages).

    As :func:`mailfax.providers.http.status_error` (401/403 AUTHENTICATION_FAILURE, also
    used for IP allowlists; 429/502-504 overload or maintenance; 500 "cannot accept job" and
    520 "UNKNOWN_ERROR … backend adaptor" transient; 400 BAD_REQUEST permanent), except 404."""
    what = f"Retarus {operation}"
    if status == 404:  # an unknown customer number (a wrong URL looks the same)
        return ProviderError(reasons.reason("provider_account", http_detail(what, status, body)),
                             transient=False)
    return status_error(status, retry_after_header, what, body)
