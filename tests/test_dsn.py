"""Failed faxes as RFC 3464 bounces: parsed back with Python's email package and compared with
the structure of a Postfix bounce and a real sendmail DSN from the corpus."""

from __future__ import annotations

import email
import email.policy
from datetime import UTC, datetime
from email.message import EmailMessage, Message
from pathlib import Path
from typing import Any

import pytest

from mailfax.outbound.dsn import build_dsn, dsn_status_for

ORIGINAL = (b"Return-Path: <jg@example.de>\r\nFrom: J\xc3\xbcrgen Gro\xc3\x9f <jg@example.de>\r\n"
            b"To: 030123456@fax.local\r\nSubject: Angebot\r\n"
            b"Message-ID: <angebot-1@example.de>\r\n\r\n%PDF-1.7 the body stays out\r\n")

# The shape of a Postfix bounce (bounce(8), RFC 3464), reduced to what the comparison reads.
POSTFIX_BOUNCE = b"""\
From: MAILER-DAEMON@mx.example.net (Mail Delivery System)
Subject: Undelivered Mail Returned to Sender
To: jg@example.de
Auto-Submitted: auto-replied
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status;
\tboundary="4B1C2A0F.1700000000/mx.example.net"
Message-Id: <20260302090000.0001@mx.example.net>

This is a MIME-encapsulated message.

--4B1C2A0F.1700000000/mx.example.net
Content-Description: Notification
Content-Type: text/plain; charset=us-ascii

I'm sorry to have to inform you that your message could not be delivered.

--4B1C2A0F.1700000000/mx.example.net
Content-Description: Delivery report
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.example.net
X-Postfix-Queue-ID: 4B1C2A0F
X-Postfix-Sender: rfc822; jg@example.de
Arrival-Date: Mon,  2 Mar 2026 09:00:00 +0100 (CET)

Final-Recipient: rfc822; nobody@example.org
Original-Recipient: rfc822;nobody@example.org
Action: failed
Status: 5.1.1
Remote-MTA: dns; mail.example.org
Diagnostic-Code: smtp; 550 5.1.1 <nobody@example.org>: Recipient address rejected

--4B1C2A0F.1700000000/mx.example.net
Content-Description: Undelivered Message Headers
Content-Type: text/rfc822-headers

From: jg@example.de
Subject: hello

--4B1C2A0F.1700000000/mx.example.net--
"""


def bounce(**overrides: Any) -> EmailMessage:
    arguments: dict[str, Any] = {
        "reporting_mta": "fax.example.com", "original_envelope_from": "jg@example.de",
        "fax_address": "030123456@fax.local", "status": "5.4.1",
        "diagnostic": "Besetzt – Gegenstelle nimmt nicht ab",
        "human_text": "Ihr Fax an 030 123456 konnte nicht zugestellt werden.\nGrüße, mailfax",
        "original_headers": ORIGINAL, "arrival_date": datetime(2026, 3, 2, 8, 0, tzinfo=UTC),
        "from_address": "MAILER-DAEMON@fax.example.com (Mail Delivery System)",
        "message_id": "<angebot-1@example.de>",
    }
    return build_dsn(**(arguments | overrides))


def reparse(message: EmailMessage) -> EmailMessage:
    parsed = email.message_from_bytes(message.as_bytes(), policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    return parsed


def shape(message: Message) -> list[tuple[str, list[list[str]] | None]]:
    """Content types in order; for the delivery status, the field names of each block."""
    parts: list[tuple[str, list[list[str]] | None]] = []
    for part in message.get_payload():
        blocks = None
        if part.get_content_type() == "message/delivery-status":
            blocks = [[name.lower() for name in block] for block in part.get_payload()]
        parts.append((part.get_content_type(), blocks))
    return parts


def test_bounce_parses_as_a_delivery_status_report() -> None:
    report = reparse(bounce())
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    assert report["Auto-Submitted"] == "auto-replied"
    assert report["To"] == "jg@example.de"
    assert report["In-Reply-To"] == "<angebot-1@example.de>"
    human, status, headers = report.iter_parts()
    assert isinstance(human, EmailMessage) and isinstance(headers, EmailMessage)
    assert human.get_content_type() == "text/plain"
    assert "Grüße" in human.get_content()  # the human text comes first, in any language
    per_message, per_recipient = status.get_payload()
    assert per_message["Reporting-MTA"] == "dns; fax.example.com"
    assert per_message["Arrival-Date"] == "Mon, 02 Mar 2026 08:00:00 +0000"
    assert per_recipient["Final-Recipient"] == "rfc822; 030123456@fax.local"
    assert per_recipient["Action"] == "failed"
    assert per_recipient["Status"] == "5.4.1"
    assert per_recipient["Diagnostic-Code"] == "X-Fax; Besetzt - Gegenstelle nimmt nicht ab"
    assert headers.get_content_type() == "text/rfc822-headers"
    assert "Subject: Angebot" in headers.get_content()
    assert "Message-ID: <angebot-1@example.de>" in headers.get_content()
    assert "the body stays out" not in headers.get_content()


def test_bounce_has_the_structure_of_a_postfix_bounce() -> None:
    postfix = email.message_from_bytes(POSTFIX_BOUNCE, policy=email.policy.default)
    ours = reparse(bounce())
    assert [kind for kind, _ in shape(ours)] == [kind for kind, _ in shape(postfix)]
    [(_, postfix_blocks)] = [item for item in shape(postfix) if item[1]]
    [(_, our_blocks)] = [item for item in shape(ours) if item[1]]
    assert postfix_blocks is not None and our_blocks is not None
    for postfix_fields, our_fields in zip(postfix_blocks, our_blocks, strict=True):
        standard = {name for name in postfix_fields if not name.startswith(("x-", "remote-"))}
        assert standard <= set(our_fields)
    for header in ("From", "To", "Subject", "Auto-Submitted", "Message-ID"):
        assert ours[header]
    assert [part["Content-Description"] for part in ours.iter_parts()] == \
           [part["Content-Description"] for part in postfix.iter_parts()]


@pytest.mark.every_corpus
def test_bounce_reads_like_the_real_sendmail_dsn_in_the_corpus(corpus: Path) -> None:
    real = (corpus / "mime" / "raw_email_with_mimepart_without_content_type.eml").read_bytes()
    sendmail = email.message_from_bytes(real, policy=email.policy.default)
    report = sendmail.get_payload()[0] if sendmail.get_content_type() != "multipart/report" \
        else sendmail
    ours = reparse(bounce())
    assert report.get_param("report-type") == ours.get_param("report-type")
    their_status = next(part for part in report.iter_parts()
                        if part.get_content_type() == "message/delivery-status")
    our_status = next(part for part in ours.iter_parts()
                      if part.get_content_type() == "message/delivery-status")
    assert len(their_status.get_payload()) == len(our_status.get_payload()) == 2
    for theirs, mine in zip(their_status.get_payload(), our_status.get_payload(), strict=True):
        required = {"reporting-mta", "final-recipient", "action", "status"}
        assert {name.lower() for name in theirs} & required == \
               {name.lower() for name in mine} & required


def test_provider_text_cannot_break_out_of_its_field() -> None:
    report = reparse(bounce(diagnostic="line one\r\nStatus: 2.0.0\r\n\r\nFinal-Recipient: x"))
    _, status, _ = report.iter_parts()
    per_recipient = status.get_payload()[1]
    assert per_recipient.get_all("Status") == ["5.4.1"]
    assert per_recipient.get_all("Final-Recipient") == ["rfc822; 030123456@fax.local"]
    assert len(status.get_payload()) == 2


def test_diagnostic_spells_umlauts_out_in_ascii() -> None:
    report = reparse(bounce(diagnostic="Gegenstelle hat aufgelegt (Übertragung gestört)"))
    _, status, _ = report.iter_parts()
    per_recipient = status.get_payload()[1]
    assert per_recipient["Diagnostic-Code"] == (
        "X-Fax; Gegenstelle hat aufgelegt (Uebertragung gestoert)")


def test_whole_original_message_as_text_keeps_only_its_headers() -> None:
    report = reparse(bounce(original_headers=ORIGINAL.decode(), message_id=None))
    assert report["In-Reply-To"] is None
    headers = list(report.iter_parts())[2]
    assert isinstance(headers, EmailMessage)
    assert "Jürgen Groß" in headers.get_content()
    assert "%PDF" not in headers.get_content()


def test_a_delayed_report_for_a_retry() -> None:
    report = reparse(bounce(status="4.4.1", action="delayed"))
    per_recipient = list(report.iter_parts())[1].get_payload()[1]
    assert (per_recipient["Action"], per_recipient["Status"]) == ("delayed", "4.4.1")


@pytest.mark.parametrize(("code", "final", "status"), [
    ("invalid_number", False, "5.1.1"),
    ("invalid_number", True, "5.1.1"),
    ("no_service", True, "5.1.1"),
    ("busy", False, "4.4.1"),
    ("busy", True, "5.4.1"),
    ("no_answer", True, "5.4.1"),
    ("transmission_failed", False, "4.4.2"),
    ("number_not_allowed", False, "5.7.1"),
    ("blacklisted", True, "5.7.1"),
    ("document_rejected", False, "5.6.0"),
    ("too_many_attempts", True, "5.4.7"),
    ("provider_auth", False, "4.3.5"),
    ("delivered", True, "2.0.0"),
    ("something_new", False, "4.0.0"),
    ("something_new", True, "5.0.0"),
])
def test_reason_codes_map_to_enhanced_status_codes(code: str, final: bool, status: str) -> None:
    assert dsn_status_for(code, final) == status
