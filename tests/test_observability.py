"""Observability that tells the truth (issue 18): /readyz fails for real reasons, health and
metrics on a listener of their own, process metrics, failing loops logged at a capped rate."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import sqlite3
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import aiohttp
import aiosmtplib
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mailfax import app as app_module
from mailfax.app import Application
from mailfax.config import DispatchSettings
from mailfax.model import JobState
from mailfax.outbound import dispatch
from mailfax.outbound.dispatch import Dispatcher
from mailfax.providers import emulator
from mailfax.providers.base import FaxDocument, ProviderContext
from mailfax.store.base import DEFAULT_RULES, ClaimRules, NewJob, NewMail, Outcome, Work
from mailfax.store.postgres import PostgresStore
from mailfax.store.sqlite import SqliteStore
from mailfax.support import failing
from mailfax.support.failing import RepeatedFailure
from mailfax.web.health import store_problem
from tests import pg
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
        tmp_path: Path, corpus: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
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
        assert (await get(f"{health}/readyz"))[0] == 503
        not_ready = [record for record in caplog.records
                     if record.getMessage().startswith("not ready: ")]
        assert len(not_ready) == 1  # logged when it became so, not at every probe
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


# -- a failing loop: its traceback once, then a count at a capped rate, then its recovery ----

class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_repeated_failure_logs_one_traceback_then_counts(
        caplog: pytest.LogCaptureFixture) -> None:
    clock, logger = FakeClock(), logging.getLogger("mailfax.test.failing")
    failures = RepeatedFailure(logger, "dispatcher: claiming work", interval=60, clock=clock)
    with caplog.at_level(logging.INFO, logger="mailfax.test.failing"):
        for _ in range(121):  # every 0.5 s for 60 s, as the dispatcher on a full disk did
            try:
                raise sqlite3.OperationalError("database or disk is full")
            except sqlite3.OperationalError:
                failures.failed()
            clock.now += 0.5
        clock.now += 14.5
        failures.succeeded()
        failures.succeeded()  # working on: nothing more to say
    lines = [(record.levelname, record.getMessage(), record.exc_info is not None)
             for record in caplog.records]
    assert lines == [
        ("ERROR", "dispatcher: claiming work failed", True),
        ("ERROR", "dispatcher: claiming work still failing, 120 times in the last 60 s: "
                  "OperationalError: database or disk is full", False),
        ("WARNING", "dispatcher: claiming work works again, after 121 failures in 75 s", False)]
    assert "Traceback" in caplog.text and caplog.text.count("Traceback") == 1


class BrokenClaims(SqliteStore):
    """A store on a full disk: reads work, the dispatcher's claim (a write) fails while
    ``broken`` is set."""

    broken = True
    claims_failed = 0

    async def claim_work(self, owner: str, limit: int, lease_seconds: float,
                         account_limits: Mapping[str, int],
                         finished: Sequence[Outcome] = (),
                         rules: ClaimRules = DEFAULT_RULES,
                         spool: Path | None = None) -> list[Work]:
        if self.broken:
            self.claims_failed += 1
            raise sqlite3.OperationalError("database or disk is full")
        return await super().claim_work(owner, limit, lease_seconds, account_limits, finished,
                                        rules, spool)


async def test_the_dispatcher_on_a_failing_store_logs_once_then_counts_then_recovers(
        tmp_path: Path, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(failing, "REPORT_EVERY_SECONDS", 1.0)
    monkeypatch.setattr(dispatch, "BLOCKED_POLL_SECONDS", 0.05)  # fail often, test quickly
    store = BrokenClaims(tmp_path / "store.sqlite3")
    await store.open()
    fax = emulator.EmulatorProvider(ProviderContext(account="emu", data_dir=tmp_path),
                                    emulator.Settings(delay_seconds=3600, fail=[]))
    mail = NewMail(mail_id="m1", envelope_from="a@example.org", message_id=None, subject="s",
                   references=[], from_header="", client_address="::1")
    await store.add_mail_jobs(mail, [NewJob("j1", "+4930123456", "emu")],
                              [FaxDocument("a.pdf", b"%PDF-1.4 test", 1)])
    dispatcher = Dispatcher(store, {"emu": fax}, DispatchSettings(), "one")
    caplog.set_level(logging.INFO, logger="mailfax.outbound.dispatch")
    task = asyncio.create_task(dispatcher.run())
    try:
        await asyncio.sleep(2.5)
        store.broken = False
        dispatcher.wake()
        deadline = time.monotonic() + 20
        while (await store.get_job("j1")).state != JobState.SUBMITTED:  # type: ignore[union-attr]
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await fax.close()
        await store.close()
    records = [record for record in caplog.records
               if record.name == "mailfax.outbound.dispatch"]
    messages = [record.getMessage() for record in records]
    assert store.claims_failed > 20  # it kept trying ...
    assert len(records) <= 6  # ... and said so in a few lines, not one per failure
    assert [record.exc_info is not None for record in records].count(True) == 1
    assert messages[0].startswith("dispatcher: recording results and claiming work failed")
    counted = [int(found.group(1)) for message in messages
               if (found := re.search(r"still failing, (\d+) times in the last 1 s", message))]
    assert len(counted) >= 2 and sum(counted) < store.claims_failed
    recovered = [message for message in messages if "works again" in message]
    assert len(recovered) == 1 and re.fullmatch(
        f"dispatcher: recording results and claiming work works again, after "
        f"{store.claims_failed} failures in [2-4] s", recovered[0])


async def test_a_loop_that_keeps_crashing_is_restarted_and_logged_at_a_capped_rate(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(failing, "REPORT_EVERY_SECONDS", 0.3)
    monkeypatch.setattr(app_module, "RESTART_DELAY", 0.01)
    monkeypatch.setattr(app_module, "STEADY_SECONDS", 0.3)
    runs, until = 0, time.monotonic() + 1.0

    async def notifier() -> None:
        nonlocal runs
        runs += 1
        if time.monotonic() < until:
            raise ConnectionResetError("outbox relay went away")
        await asyncio.Event().wait()  # then it works, and keeps working

    caplog.set_level(logging.INFO, logger="mailfax")
    task = asyncio.create_task(app_module.supervise("notifier", notifier))
    try:
        deadline = time.monotonic() + 10
        while "works again" not in caplog.text:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    messages = [record.getMessage() for record in caplog.records if record.name == "mailfax"]
    assert runs > 20
    assert messages[0] == "notifier failed; restarting in 0 s"
    assert caplog.text.count("Traceback") == 1
    counted = [int(found.group(1)) for message in messages
               if (found := re.search(r"notifier still failing, (\d+) times", message))]
    assert 2 <= len(counted) <= 5
    assert messages[-1].startswith(f"notifier works again, after {runs - 1} failures in ")


async def test_stop_names_a_loop_that_ignores_its_cancellation_and_still_stops(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    released = asyncio.Event()

    async def stubborn() -> None:
        while not released.is_set():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(3600)

    async def obedient() -> None:
        await asyncio.sleep(3600)

    monkeypatch.setattr(app_module, "STOP_SECONDS", 0.2)
    tasks = [asyncio.create_task(stubborn(), name="stubborn loop"),
             asyncio.create_task(obedient(), name="obedient loop")]
    await asyncio.sleep(0)
    started = time.monotonic()
    await app_module._cancel_all(tasks)
    assert time.monotonic() - started < 5
    assert tasks[1].cancelled() and not tasks[0].done()
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert record.getMessage() == ("stopping without waiting for stubborn loop: not ended "
                                   "0 s after being cancelled")
    released.set()  # the test's own clean-up: the stubborn loop may end now
    tasks[0].cancel()
    await tasks[0]


async def test_metrics_show_zero_for_a_state_once_its_last_job_left_it(
        tmp_path: Path, corpus: Path) -> None:
    """Against the real store and HTTP: a job is seen as submitted, then delivered, and the
    submitted gauge is back at 0 (not left at 1, which a "stuck" alert would fire on)."""
    app, _, health = apart(tmp_path)
    await app.start()

    async def jobs() -> dict[str, float]:
        status, text = await get(f"{health}/metrics")
        assert status == 200
        return {sample.labels["state"]: sample.value
                for family in text_string_to_metric_families(text)
                if family.name == "mailfax_jobs" for sample in family.samples}

    try:
        pdf = (corpus / "pdf" / "two-different-pages.pdf").read_bytes()
        await Service(app).send(fax_mail([("a.pdf", pdf, "application/pdf")]),
                                "a@example.org", ["030123456@fax.local"])
        seen: set[str] = set()
        deadline = time.monotonic() + 30
        while (now := await jobs())["delivered"] != 1:
            seen |= {state for state, count in now.items() if count}
            assert time.monotonic() < deadline, now
            await asyncio.sleep(0.02)
        assert "submitted" in seen or "sending" in seen  # it was counted on its way
        assert now["submitted"] == 0 and now["sending"] == 0 and now["queued"] == 0
    finally:
        await app.stop()


@pytest.fixture(scope="module")
def postgres_server() -> Iterator[pg.PostgresServer]:
    with pg.server_for_tests() as server:
        yield server


async def test_the_postgres_write_probe_fails_on_a_read_only_database(
        postgres_server: pg.PostgresServer) -> None:
    """What /readyz asks PostgreSQL: a read-only database (as a standby, or one set
    read-only by the admin) still answers reads, and the probe says it cannot write."""
    url = postgres_server.create_database()
    store = PostgresStore(url, listen=False)
    await store.open()
    try:
        await store.probe_write()
        database = url.rsplit("/", 1)[1]
        async with await psycopg.AsyncConnection.connect(postgres_server.url(),
                                                         autocommit=True) as admin:
            await admin.execute(f'ALTER DATABASE "{database}" SET default_transaction_read_only'
                                " = on")
            await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                "WHERE datname = %s AND pid <> pg_backend_pid()", (database,))
        deadline = time.monotonic() + 30
        while True:  # the pool replaces the connections that were ended
            try:
                assert await store.outbox_depth() == 0  # reads work ...
                break
            except psycopg.OperationalError:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.1)
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):  # ... the probe does not
            await store.probe_write()
        assert await store_problem(store) == (
            "store cannot write: ReadOnlySqlTransaction: cannot execute UPDATE in a read-only "
            "transaction")
    finally:
        await store.close()
        postgres_server.drop_database(url)
