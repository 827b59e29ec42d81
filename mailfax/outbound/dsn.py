"""A failed fax as a standard bounce: an RFC 3464 delivery status notification.

The layout follows Postfix's bounces, which every mail client and MTA understands:
``multipart/report; report-type=delivery-status`` with the human text first, then the
``message/delivery-status`` part (a per-message block, then one per-recipient block), then the
original message's headers as ``text/rfc822-headers``. The caller sends it from the empty
envelope sender ``<>``, as DSNs are sent, so no mail server ever answers it.
"""

from __future__ import annotations

from datetime import datetime
from email.message import EmailMessage, Message
from email.policy import SMTP
from email.utils import format_datetime, make_msgid

from mailfax.support.text import header_section, to_ascii

# reason code -> (enhanced status subject.detail, permanent whatever happens next)
_STATUS_DETAIL: dict[str, tuple[str, bool]] = {
    "invalid_number": ("1.1", True),  # bad destination mailbox address
    "no_service": ("1.1", True),
    "number_not_allowed": ("7.1", True),  # delivery not authorised
    "blacklisted": ("7.1", True),
    "document_rejected": ("6.0", True),  # media error
    "not_a_fax": ("3.0", False),  # the other side is not a fax machine (right now)
    "busy": ("4.1", False),  # no answer from host
    "no_answer": ("4.1", False),
    "call_failed": ("4.0", False),  # network / routing
    "transmission_failed": ("4.2", False),  # bad connection
    "provider_unavailable": ("4.1", False),
    "provider_error": ("3.0", False),
    "provider_auth": ("3.5", False),  # system incorrectly configured
    "provider_account": ("3.5", False),
    "too_many_attempts": ("4.7", True),  # delivery time expired
    "cancelled": ("0.0", True),
}


def dsn_status_for(reason_code: str, final: bool) -> str:
    """The enhanced status code (RFC 3463) for a mailfax reason code.

    Reasons that no retry can change are always ``5.x.x``; the others are ``4.x.x`` while
    mailfax may still try and ``5.x.x`` once ``final``.
    """
    if reason_code == "delivered":
        return "2.0.0"
    detail, permanent = _STATUS_DETAIL.get(reason_code, ("0.0", False))
    return f"{5 if permanent or final else 4}.{detail}"


def build_dsn(*, reporting_mta: str, original_envelope_from: str, fax_address: str, status: str,
              diagnostic: str, human_text: str, original_headers: bytes | str,
              arrival_date: datetime, from_address: str, message_id: str | None,
              subject: str = "Undelivered Mail Returned to Sender",
              action: str = "failed") -> EmailMessage:
    """A bounce for one fax address, to the original envelope sender.

    ``diagnostic`` is the provider's reason; it is reduced to one line of ASCII, as the
    ``Diagnostic-Code`` field requires. ``original_headers`` may be the whole original message:
    only its header section is kept. ``message_id`` is the original's Message-ID, for threading.
    """
    # A bounce to an internationalised (SMTPUTF8) address carries it raw: it has no ASCII form.
    report = EmailMessage(policy=SMTP if original_envelope_from.isascii()
                          else SMTP.clone(utf8=True))
    report["From"] = from_address
    report["To"] = original_envelope_from
    report["Subject"] = subject
    report["Date"] = format_datetime(datetime.now().astimezone())
    report["Message-ID"] = make_msgid(domain=reporting_mta)
    report["Auto-Submitted"] = "auto-replied"
    if message_id:
        report["In-Reply-To"] = message_id
        report["References"] = message_id
    report["MIME-Version"] = "1.0"
    report["Content-Type"] = "multipart/report"
    report.set_param("report-type", "delivery-status")
    report.attach(_body_part(human_text, "plain", "Notification"))
    report.attach(_delivery_status(
        reporting_mta=reporting_mta, original_envelope_from=original_envelope_from,
        fax_address=fax_address, status=status, action=action, diagnostic=diagnostic,
        arrival_date=arrival_date))
    report.attach(_body_part(_header_section(original_headers), "rfc822-headers",
                             "Undelivered Message Headers"))
    return report


def _delivery_status(*, reporting_mta: str, original_envelope_from: str, fax_address: str,
                     status: str, action: str, diagnostic: str,
                     arrival_date: datetime) -> EmailMessage:
    per_message = Message(policy=SMTP)
    per_message["Reporting-MTA"] = f"dns; {_ascii_line(reporting_mta)}"
    per_message["X-Mailfax-Sender"] = f"rfc822; {_ascii_line(original_envelope_from)}"
    per_message["Arrival-Date"] = format_datetime(arrival_date)
    per_recipient = Message(policy=SMTP)
    per_recipient["Final-Recipient"] = f"rfc822; {_ascii_line(fax_address)}"
    per_recipient["Original-Recipient"] = f"rfc822; {_ascii_line(fax_address)}"
    per_recipient["Action"] = action
    per_recipient["Status"] = status
    per_recipient["Diagnostic-Code"] = f"X-Fax; {_ascii_line(diagnostic) or 'no reason given'}"
    part = EmailMessage(policy=SMTP)
    part["Content-Description"] = "Delivery report"
    part["Content-Type"] = "message/delivery-status"
    part.set_payload([per_message, per_recipient])
    return part


def _header_section(original: bytes | str) -> str:
    raw = original.encode("utf-8", "surrogateescape") if isinstance(original, str) else original
    section = header_section(raw).decode("utf-8", "replace")
    return section.replace("\r\n", "\n") + "\n"


def _body_part(text: str, subtype: str, description: str) -> EmailMessage:
    part = EmailMessage(policy=SMTP)
    part.set_content(text, subtype=subtype, disposition=None)
    del part["MIME-Version"]  # a body part, not a message
    part["Content-Description"] = description
    return part


def _ascii_line(value: str) -> str:
    """One line of printable ASCII: DSN fields may carry nothing else (RFC 3464 2.1.2)."""
    flat = to_ascii(value)
    return " ".join("".join(char if char.isprintable() else " " for char in flat).split())
