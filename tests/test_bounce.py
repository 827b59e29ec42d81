"""A failed fax as an RFC 3464 bounce (notify.failure_format = "dsn" or "both")."""

from __future__ import annotations

import email
import email.policy
from pathlib import Path

import pytest

from mailfax.app import Application
from tests.conftest import Service, fax_mail, make_settings


@pytest.mark.parametrize(("failure_format", "kinds"), [
    ("dsn", {"multipart/report"}), ("both", {"multipart/report", "multipart/alternative"})])
async def test_a_failed_fax_comes_back_as_a_delivery_status_notification(
        tmp_path: Path, corpus: Path, failure_format: str, kinds: set[str]) -> None:
    app = Application(make_settings(tmp_path, notify={"failure_format": failure_format}))
    await app.start()
    service = Service(app)
    try:
        pdf = (corpus / "pdf" / "crazyones.pdf").read_bytes()
        mail = fax_mail([("letter.pdf", pdf, "application/pdf")], to="0309991234@fax.local",
                        subject="Angebot")
        await service.send(mail, "alice@example.org", ["0309991234@fax.local"])
        report = await service.wait_for_mail(
            lambda m: m.get_content_type() == "multipart/report", timeout=20)
        if failure_format == "both":
            await service.wait_for_mail(lambda m: m["X-Mailfax-State"] == "failed")
        parsed = email.message_from_bytes(bytes(report), policy=email.policy.default)
        assert parsed.get_content_type() == "multipart/report"
        assert parsed.get_param("report-type") == "delivery-status"
        assert parsed["To"] == "alice@example.org"
        assert parsed["In-Reply-To"] == mail["Message-ID"]
        human, status, headers = parsed.get_payload()
        assert human.get_content_type() == "text/plain"
        assert "+49 30 9991234" in human.get_content()
        assert status.get_content_type() == "message/delivery-status"
        fields = status.as_string()
        assert "Final-Recipient: rfc822; +49309991234@fax.local" in fields
        assert "Action: failed" in fields
        assert "Status: 5." in fields
        assert "Diagnostic-Code:" in fields and "busy" in fields
        assert headers.get_content_type() == "text/rfc822-headers"
        assert "Subject: Angebot" in headers.as_string()
        found = {message.get_content_type() for message in service.outbox_messages()}
        assert found == kinds
    finally:
        await app.stop()
