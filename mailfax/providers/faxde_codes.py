"""FAX.de result codes and send results → mailfax outcomes. Pure data and lookups.

Every code FAX.de documents for its five operations is here, in the English and the German
description (the German one has 46 and 47, which the English one folds into 45).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from mailfax import reasons
from mailfax.model import JobState, Reason
from mailfax.providers.base import ErrorKind, ProviderError

Kind = Literal["ok", "transient", "permanent", "duplicate"]


@dataclass(frozen=True)
class Code:
    kind: Kind
    reason: str  # mailfax reason code (see mailfax.reasons)
    text: str  # FAX.de's own wording, for the detail line


SEND_JOB: dict[int, Code] = {
    0: Code("ok", "delivered", "Job accepted and scheduled"),
    -1: Code("permanent", "provider_auth", "Invalid/wrong password"),
    -2: Code("permanent", "provider_auth", "Unknown customer id"),
    -3: Code("permanent", "document_rejected", "Document does not exist"),
    -4: Code("transient", "provider_error", "Server error"),
    -5: Code("permanent", "number_not_allowed", "Recipient number blocked"),
    -6: Code("permanent", "document_rejected", "Unsupported document type"),
    -7: Code("permanent", "document_rejected", "Error converting document"),
    -8: Code("permanent", "number_not_allowed",
             "Not authorized for foreign destinations or this job type"),
    -14: Code("permanent", "document_rejected", "Error converting document"),
    -65: Code("transient", "provider_error", "Internal error handling the recipients file"),
    -66: Code("transient", "provider_error", "Internal error handling the document"),
    # Documented as a refusal; whether it means "yours, from a lost answer" only the caller
    # can tell (SendRequest.earlier_may_have_arrived).
    -77: Code("duplicate", "duplicate_refused", "Identical job already established (duplicate?)"),
    -1309: Code("permanent", "provider_account",
                "Document with more than 3 pages while in evaluation period"),
    1: Code("permanent", "provider_auth", "Not authorized"),
    2: Code("permanent", "provider_auth", "Blank customer id"),
    3: Code("permanent", "provider_account", "Evaluation period expired"),
    4: Code("permanent", "provider_error", "Invalid job type"),
    6: Code("permanent", "provider_account", "Credit not yet available (first debit + 14 days)"),
    7: Code("permanent", "provider_account", "Insufficient credit"),
    8: Code("permanent", "invalid_number", "No valid recipient"),
    9: Code("permanent", "blacklisted", "Recipient is blacklisted"),
    10: Code("permanent", "provider_error", "Internal error on QSign"),
    11: Code("permanent", "provider_error", "QSign: iLetter with multiple recipients not allowed"),
    15: Code("permanent", "document_rejected", "SendFile does not exist"),
    45: Code("permanent", "number_not_allowed", "Recipient number not allowed (premium number)"),
    46: Code("permanent", "invalid_number", "Recipient number invalid"),
    47: Code("permanent", "invalid_number", "Recipient number malformed"),
    54: Code("permanent", "provider_account", "No incoming payment (J5)"),
    58: Code("permanent", "document_rejected", "Error converting document"),
    61: Code("permanent", "provider_account", "Insufficient prepaid quantity"),
    75: Code("permanent", "document_rejected", "No SendText nor SendFiles given"),
}

# JobStatus, RequestReceived and DeleteReceived share 1..4; 5 and 6 differ per operation.
_ACCOUNT_CODES: dict[int, Code] = {
    1: Code("permanent", "provider_auth", "Unknown customer id"),
    2: Code("permanent", "provider_auth", "Invalid/wrong password"),
    3: Code("permanent", "provider_account", "Evaluation period expired"),
    4: Code("permanent", "provider_account", "Account locked"),
}
JOB_STATUS: dict[int, Code] = {
    0: Code("ok", "delivered", "Job finished"),
    **_ACCOUNT_CODES,
    5: Code("permanent", "provider_error", "Job id not found"),
    6: Code("ok", "delivered", "Job is still in progress"),
}
CANCEL_JOB: dict[int, Code] = {
    0: Code("ok", "cancelled", "Job cancelled"),
    1: Code("ok", "cancelled", "Job already finished; not cancelled"),
    -1: Code("permanent", "provider_auth", "Unknown customer id or password mismatch"),
    -2: Code("ok", "cancelled", "Unknown job id"),
    -3: Code("permanent", "provider_account", "Account locked"),
}
REQUEST_RECEIVED: dict[int, Code] = {
    0: Code("ok", "delivered", "A new received fax was found"),
    **_ACCOUNT_CODES,
    5: Code("ok", "delivered", "No new faxes found in inbox"),
}
DELETE_RECEIVED: dict[int, Code] = {
    0: Code("ok", "delivered", "Fax was deleted"),
    **_ACCOUNT_CODES,
    5: Code("ok", "delivered", "Unknown fax id"),
}
OPERATION_CODES = {"SendJob": SEND_JOB, "JobStatus": JOB_STATUS, "CancelJob": CANCEL_JOB,
                   "RequestReceived": REQUEST_RECEIVED, "DeleteReceived": DELETE_RECEIVED}
IN_PROGRESS = 6  # JobStatus
JOB_NOT_FOUND = 5  # JobStatus: FAX.de does not know the job (any more)
INBOX_EMPTY = 5  # RequestReceived
UNKNOWN_FAX = 5  # DeleteReceived

# SendResult (JobStatus, StatusFile) and $STAT (STATURL), normalised to upper-case letters.
SEND_RESULTS: dict[str, str | None] = {
    "OK": None,
    "BUSY": "busy",
    "NOANSWER": "no_answer",
    "NORING": "no_answer",
    "VOICE": "not_a_fax",
    "NOSERVICE": "no_service",
    "SENDFAIL": "transmission_failed",
    "CALLFAILED": "call_failed",
    "ISDNERR": "call_failed",
    "BLACKLIST": "blacklisted",
    # The German doc's wordings (JobStatus SendResult): "busy", "No answer", "Call failed",
    # "Send failed", "Blacklist", "Canceled"; the English one's "Send-Fail", "Black-List".
    "SENDFAILED": "transmission_failed",
    "CANCELED": "cancelled",
    "CANCELLED": "cancelled",
}
CANCELLED_RESULTS = frozenset({"CANCELED", "CANCELLED"})


def code_for(operation: str, result: int) -> Code:
    """The meaning of an operation's result; an undocumented code is a transient error."""
    known = OPERATION_CODES[operation].get(result)
    if known is not None:
        return known
    return Code("transient", "provider_error", f"undocumented result code {result}")


def reason_for_code(operation: str, result: int) -> Reason:
    code = code_for(operation, result)
    return reasons.reason(code.reason, detail=f"FAX.de {operation} {result}: {code.text}")


# Account reasons that concern one job only: the next, smaller or faxed, job may pass, so
# they fail the job rather than hold the account.
JOB_LEVEL = frozenset({("SendJob", -1309), ("SendJob", 7)})


def error_for(operation: str, result: int) -> ProviderError:
    """The error an operation's (non-ok) result code means: transient or not by its kind;
    credentials, credit and payment (1-4, 6, 54, 61, -1, -2, -3) are about the account."""
    code = code_for(operation, result)
    kind = ErrorKind.PERMANENT if (operation, result) in JOB_LEVEL else None
    return ProviderError(reason_for_code(operation, result), transient=code.kind == "transient",
                         kind=kind)


def outcome_of_send_result(send_result: str) -> tuple[JobState, Reason | None]:
    """A fax's SendResult ("OK", "Busy", "No Answer", …) → final state and reason."""
    key = "".join(char for char in send_result.upper() if char.isalpha())
    if key == "OK":
        return JobState.DELIVERED, None
    if key in CANCELLED_RESULTS:
        return JobState.CANCELLED, reasons.reason("cancelled",
                                                  detail=f"FAX.de send result: {send_result}")
    code = SEND_RESULTS.get(key, "unknown")
    return JobState.FAILED, reasons.reason(code or "unknown",
                                           detail=f"FAX.de send result: {send_result}")


@dataclass(frozen=True)
class StatusRow:
    recipient: str
    result: str
    remote_id: str
    pages: int | None
    sent_at: datetime | None
    duration_seconds: float | None
    reference: str


def parse_status_file(data: bytes) -> list[StatusRow]:
    """The StatusFile CSV of JobStatus, one row per recipient; tolerant of column order."""
    text = data.decode("utf-8-sig", errors="replace")
    rows = list(csv.reader(io.StringIO(text)))
    if not rows:
        return []
    header = [name.strip().upper() for name in rows[0]]
    parsed = []
    for row in rows[1:]:
        if not any(cell.strip() for cell in row):
            continue
        values = {name: (row[index].strip() if index < len(row) else "")
                  for index, name in enumerate(header)}
        parsed.append(StatusRow(
            recipient=values.get("RECIPIENT", ""), result=values.get("RESULT", ""),
            remote_id=values.get("REMOTEID", ""), pages=_int(values.get("PAGES", "")),
            sent_at=_timestamp(values.get("SENDDATETIME", "")),
            duration_seconds=_float(values.get("DURATION", "")),
            reference=values.get("REFID", ""),
        ))
    return parsed


def _int(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


def _float(text: str) -> float | None:
    try:
        return float(text.replace(",", "."))
    except ValueError:
        return None


def _timestamp(text: str) -> datetime | None:
    try:
        return datetime.strptime(text, "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)
    except ValueError:
        return None
