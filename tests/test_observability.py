"""Observability that tells the truth (issue 18): /readyz fails for real reasons, health and
metrics on a listener of their own, process metrics, failing loops logged at a capped rate."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import aiohttp
import aiosmtplib
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mailfax.app import Application
from mailfax.store.sqlite import SqliteStore
from tests.conftest import Service, fax_mail, make_settings
from tests.ports import free_port


async def get(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        return response.status, await response.text()


def read_only_connection(path: Path) -> sqlite3.Connection:
    """The database opened as SQLite opens it from a read-only medium: every write fails
    with "attempt to write a readonly database", reads work (also as root, where chmod
    would not stop a write)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None,
                           check_same_thread=False)
    conn.row_factory = sqlite3.Row
    return conn


def apart(tmp_path: Path) -> tuple[Application, str, str]:
    """An application with the push listener and the health listener apart."""
    push, health = free_port(), free_port()
    app = Application(make_settings(tmp_path, web={
        "listen": f"127.0.0.1:{push}", "health_listen": f"127.0.0.1:{health}"}))
    return app, f"http://127.0.0.1:{push}", f"http://127.0.0.1:{health}"


async def test_readyz_is_503_while_the_store_cannot_write(
        tmp_path: Path, corpus: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    app, _, health = apart(tmp_path)
    await app.start()
    try:
        assert await get(f"{health}/readyz") == (200, "ready\n")
        store = app.store
        assert isinstance(store, SqliteStore)
        await store.close()  # reopened read-only: reads answer, writes fail
        monkeypatch.setattr(store, "_connect", lambda: read_only_connection(store.path))
        monkeypatch.setattr(store, "_migrate", lambda conn: None)
        await store.open()
        assert await store.outbox_depth() == 0  # a read alone would say "fine"
        status, body = await get(f"{health}/readyz")
        assert status == 503
        assert body.startswith("not ready\n")
        assert "problem: store cannot write: OperationalError: attempt to write a readonly " \
               "database" in body
        # And that is the truth: a fax mail is not taken now (4xx: it may work later).
        with pytest.raises(aiosmtplib.SMTPResponseException) as refused:
            pdf = (corpus / "pdf" / "two-different-pages.pdf").read_bytes()
            await Service(app).send(fax_mail([("a.pdf", pdf, "application/pdf")]),
                                    "a@example.org", ["030123456@fax.local"])
        assert 400 <= refused.value.code < 500
    finally:
        await app.stop()


async def test_readyz_is_503_while_the_smtp_listeners_are_down(tmp_path: Path) -> None:
    app, _, health = apart(tmp_path)
    await app.start()
    try:
        assert (await get(f"{health}/readyz"))[0] == 200
        for server in app.smtp_servers:
            server.close()
        status, body = await get(f"{health}/readyz")
        assert status == 503
        assert "problem: 1 of 1 SMTP listeners are not serving" in body
    finally:
        await app.stop()


async def test_health_and_metrics_are_on_their_own_listener(tmp_path: Path) -> None:
    app, push, health = apart(tmp_path)
    await app.start()
    try:
        for path in ("/healthz", "/readyz", "/metrics"):
            assert (await get(f"{push}{path}"))[0] == 404, path  # the public listener
            assert (await get(f"{health}{path}"))[0] == 200, path
        assert (await get(f"{health}/push/emulator/x"))[0] == 404
        status, text = await get(f"{health}/metrics")
        assert status == 200
        families = list(text_string_to_metric_families(text))
        samples = {sample.name: sample.value for family in families
                   for sample in family.samples}
        assert samples["process_resident_memory_bytes"] > 10_000_000
        assert samples["process_open_fds"] > 3
        assert samples["process_start_time_seconds"] > 1_700_000_000
        assert "process_cpu_seconds_total" in samples
        assert "python_gc_collections_total" in samples
        jobs = [sample for family in families if family.name == "mailfax_jobs"
                for sample in family.samples]
        assert len(jobs) > 5 and all(sample.value == 0 for sample in jobs)
    finally:
        await app.stop()
