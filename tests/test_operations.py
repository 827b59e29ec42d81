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


class _CountsOnly:
    """The two store calls ``Metrics.render`` makes, with counts the test sets."""

    def __init__(self) -> None:
        self.jobs: dict[str, int] = {}

    async def counts(self) -> dict[str, dict[str, int]]:
        return {"jobs": dict(self.jobs), "inbound": {}}

    async def outbox_depth(self) -> int:
        return 0


async def test_a_state_gauge_drops_to_zero_when_its_last_job_leaves() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from mailfax.web.metrics import Metrics

    def gauges(text: bytes) -> dict[str, float]:
        return {sample.labels["state"]: sample.value
                for family in text_string_to_metric_families(text.decode())
                if family.name == "mailfax_jobs" for sample in family.samples}

    metrics, store = Metrics(), _CountsOnly()
    store.jobs = {"sending": 1, "queued": 2}
    assert gauges(await metrics.render(store))["sending"] == 1  # type: ignore[arg-type]
    store.jobs = {"delivered": 3}  # the store no longer lists "sending" at all
    after = gauges(await metrics.render(store))  # type: ignore[arg-type]
    assert after["sending"] == 0 and after["queued"] == 0 and after["delivered"] == 3


def test_under_journald_every_line_has_its_syslog_priority(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    script = ("import logging; from mailfax import logs; logs.configure(False, False); "
              "log = logging.getLogger('mailfax.test'); log.error('disk full'); "
              "log.warning('slow relay'); log.info('started')\n"
              "try:\n    1 / 0\nexcept ZeroDivisionError:\n    log.exception('crashed')")
    stderr_path = tmp_path / "stderr"
    with stderr_path.open("wb") as stderr:
        status = os.fstat(stderr.fileno())
        environment = {**os.environ, "JOURNAL_STREAM": f"{status.st_dev}:{status.st_ino}"}
        subprocess.run([sys.executable, "-c", script], stderr=stderr, env=environment,
                       check=True, timeout=60)
    lines = stderr_path.read_text().splitlines()
    assert lines[:3] == ["<3>ERROR mailfax.test: disk full", "<4>WARNING mailfax.test: slow relay",
                         "<6>INFO mailfax.test: started"]
    assert lines[3] == "<3>ERROR mailfax.test: crashed"
    assert len(lines) > 4 and all(line.startswith("<3>") for line in lines[4:])  # traceback

    # Not the journal (JOURNAL_STREAM names another file): plain lines with a time stamp.
    with stderr_path.open("wb") as stderr:
        subprocess.run([sys.executable, "-c", script], stderr=stderr, check=True, timeout=60,
                       env={**os.environ, "JOURNAL_STREAM": "1:2"})
    assert " ERROR mailfax.test: disk full" in stderr_path.read_text().splitlines()[0]
    assert not stderr_path.read_text().startswith("<")
