"""Operations: /healthz, /readyz and /metrics on the web endpoint, and JSON log lines."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import aiohttp
import aiosmtplib
import pytest

from mailfax.app import Application
from mailfax.logs import JsonLines
from tests.conftest import Service, fax_mail, make_settings
from tests.ports import free_port


async def test_health_readiness_and_metrics(tmp_path: Path, corpus: Path) -> None:
    port = free_port()
    app = Application(make_settings(tmp_path, web={"listen": f"127.0.0.1:{port}"}))
    await app.start()
    service = Service(app)
    try:
        pdf = (corpus / "pdf" / "two-different-pages.pdf").read_bytes()
        await service.send(fax_mail([("a.pdf", pdf, "application/pdf")]), "a@example.org",
                           ["030123456@fax.local"])
        with pytest.raises(aiosmtplib.SMTPRecipientsRefused):  # not a fax domain: 550 5.7.1
            await service.send(fax_mail([]), "a@example.org", ["info@example.org"])
        await service.wait_for_mail(lambda m: m["X-Mailfax-State"] == "delivered")
        async with aiohttp.ClientSession() as http:
            base = f"http://127.0.0.1:{port}"
            async with http.get(f"{base}/healthz") as response:
                assert response.status == 200
            async with http.get(f"{base}/readyz") as response:
                assert response.status == 200
            async with http.get(f"{base}/metrics") as response:
                assert response.status == 200
                text = await response.text()
        assert "mailfax_mails_accepted_total 1.0" in text
        assert 'mailfax_mails_refused_total{status="5.7.1"} 1.0' in text
        assert 'mailfax_jobs{state="delivered"} 1.0' in text
        assert 'operation="send",outcome="ok",provider="emulator"' in text
        assert "mailfax_outbox_depth 0.0" in text
        await app.store.close()  # the store is gone: not ready any more
        async with aiohttp.ClientSession() as http, http.get(f"{base}/readyz") as response:
            assert response.status == 503
    finally:
        await app.stop()


def test_json_log_lines_carry_the_job_id() -> None:
    record = logging.LogRecord("mailfax.outbound.dispatch", logging.INFO, __file__, 1,
                               "job %s submitted to %s", ("k8x40c88txje", "emulator"), None)
    entry = json.loads(JsonLines().format(record))
    assert entry["job"] == "k8x40c88txje" and entry["level"] == "info"
    assert entry["message"] == "job k8x40c88txje submitted to emulator"
    plain = logging.LogRecord("mailfax", logging.INFO, __file__, 1, "fax domains: x", (), None)
    assert "fax" not in json.loads(JsonLines().format(plain))
