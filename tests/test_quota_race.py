"""Quotas hold against parallel mails: the count and the check happen in the transaction
that stores the jobs (SQLite: in the one writer thread's batch; PostgreSQL: under an advisory
lock per quota, over every instance on the database), not only at RCPT."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from mailfax.app import Application
from mailfax.trust.auth import hash_password
from tests import pg
from tests.conftest import fax_mail, make_settings
from tests.test_security import self_signed_certificate

PASSWORD = "a long and correct password"
SESSIONS = 10
NUMBERS = ("030123456", "030123457")  # each session: RCPT twice


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return self_signed_certificate(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def password_hash() -> str:
    return hash_password(PASSWORD)


@pytest.fixture(scope="module")
def postgres_server() -> Iterator[pg.PostgresServer]:
    with pg.server_for_tests() as server:
        yield server


@pytest.fixture(scope="module")
def postgres_url(postgres_server: pg.PostgresServer) -> str:
    return postgres_server.create_database()


def settings_for(folder: Path, tls: tuple[Path, Path], password_hash: str,
                 **overrides: Any) -> Any:
    cert, key = tls
    return make_settings(
        folder,
        smtp={"listen": ["127.0.0.1:0"], "tls_cert": str(cert), "tls_key": str(key),
              "max_login_failures": 100},
        senders={"trusted_networks": []},  # everyone logs in
        users={"alice": {"password_hash": password_hash, "addresses": ["alice@example.org"],
                         "faxes_per_hour": 2}},
        **overrides)


def port_of(app: Application) -> int:
    port: int = app.smtp_servers[0].sockets[0].getsockname()[1]
    return port


async def race(ports: list[int], pdf: bytes) -> list[tuple[int, str]]:
    """SESSIONS sessions (spread over ``ports``) log in, each RCPTs NUMBERS (each session
    alone is within the quota), then all send DATA at once; the DATA replies."""
    ready = asyncio.Barrier(SESSIONS)
    message = fax_mail([("letter.pdf", pdf, "application/pdf")]).as_bytes()

    async def session(port: int) -> tuple[int, str]:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=60,
                                 validate_certs=False, start_tls=False)
        async with client:
            await client.starttls()
            await client.login("alice", PASSWORD)
            await client.mail("alice@example.org")
            for number in NUMBERS:
                await client.rcpt(f"{number}@fax.local")  # 250: no mail stored yet
            await ready.wait()
            try:
                reply = await client.data(message)
            except aiosmtplib.SMTPDataError as refused:
                return refused.code, refused.message
            return reply.code, reply.message

    return await asyncio.gather(*(session(ports[index % len(ports)])
                                  for index in range(SESSIONS)))


def assert_exactly_the_quota(replies: list[tuple[int, str]]) -> None:
    accepted = [message for code, message in replies if code == 250]
    refused = [message for code, message in replies if code != 250]
    assert len(accepted) == 1, replies  # one mail of 2 faxes: the quota
    assert len(refused) == SESSIONS - 1
    for code, message in replies:
        if code != 250:
            assert code == 452 and message.startswith("4.7.1"), (code, message)
            assert ("user alice may send at most 2 faxes per hour; 2 already used, this mail "
                    "needs 2") in message


async def test_parallel_mails_get_exactly_the_hourly_quota(
        tmp_path: Path, tls_files: tuple[Path, Path], password_hash: str,
        corpus: Path) -> None:
    app = Application(settings_for(tmp_path, tls_files, password_hash))
    await app.start()
    try:
        replies = await race([port_of(app)], (corpus / "pdf" / "crazyones.pdf").read_bytes())
        assert_exactly_the_quota(replies)
        jobs = await app.store.list_jobs()
        assert sorted(job.number for job in jobs) == ["+4930123456", "+4930123457"]
    finally:
        await app.stop()


async def send_two_pages(port: int, pdf: bytes, number: str) -> int:
    """One mail of ``pdf`` (2 pages) to ``number`` without login; the DATA reply's code."""
    mail = fax_mail([("letter.pdf", pdf, "application/pdf")])
    try:
        await aiosmtplib.send(mail, sender="alice@example.org",
                              recipients=[f"{number}@fax.local"],
                              hostname="127.0.0.1", port=port, timeout=60)
    except aiosmtplib.SMTPDataError as refused:
        assert refused.code == 452 and "5 pages per day" in refused.message
        return refused.code
    return 250


async def test_the_service_quota_holds_for_parallel_mails_without_login(
        tmp_path: Path, corpus: Path) -> None:
    app = Application(make_settings(tmp_path, quotas={"pages_per_day": 5}))
    await app.start()
    pdf = (corpus / "pdf" / "two-different-pages.pdf").read_bytes()  # 2 pages
    try:
        codes = await asyncio.gather(*(send_two_pages(port_of(app), pdf, f"03012345{index}")
                                       for index in range(6)))
        assert sorted(codes) == [250, 250, 452, 452, 452, 452]  # 2 × 2 pages fit in 5
        assert sum(job.pages for job in await app.store.list_jobs()) == 4
    finally:
        await app.stop()


async def test_two_instances_on_one_postgresql_share_the_service_quota(
        tmp_path: Path, corpus: Path, postgres_server: pg.PostgresServer) -> None:
    """The service-wide count comes from totals that every instance's mails add to (and
    whose rows a quota check folds): parallel mails on two instances still fit it exactly."""
    url = postgres_server.create_database()
    apps = [Application(make_settings(tmp_path / name, quotas={"pages_per_day": 5},
                                      store={"url": url}), instance=name)
            for name in ("one", "two")]
    for app in apps:
        await app.start()
    pdf = (corpus / "pdf" / "two-different-pages.pdf").read_bytes()  # 2 pages
    try:
        codes = await asyncio.gather(*(send_two_pages(port_of(apps[index % 2]), pdf,
                                                      f"03012345{index}")
                                       for index in range(8)))
        assert sorted(codes) == [250, 250] + [452] * 6  # 2 × 2 pages fit in 5
        assert sum(job.pages for job in await apps[0].store.list_jobs()) == 4
    finally:
        for app in apps:
            await app.stop()


async def test_two_instances_on_one_postgresql_share_the_quota(
        tmp_path: Path, tls_files: tuple[Path, Path], password_hash: str, corpus: Path,
        postgres_url: str) -> None:
    apps = [Application(settings_for(tmp_path / name, tls_files, password_hash,
                                     store={"url": postgres_url}), instance=name)
            for name in ("one", "two")]
    for app in apps:
        await app.start()
    try:
        replies = await race([port_of(app) for app in apps],
                             (corpus / "pdf" / "crazyones.pdf").read_bytes())
        assert_exactly_the_quota(replies)
        jobs = await apps[1].store.list_jobs()
        assert sorted(job.number for job in jobs) == ["+4930123456", "+4930123457"]
    finally:
        for app in apps:
            await app.stop()
