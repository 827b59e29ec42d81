"""``mailfax health`` as a container runtime calls it: a real ``mailfax serve`` (healthy), the
same config with serve stopped (unhealthy), a store that cannot be opened, and a listener that
does not greet with 220. Each answer is one line and exit status 0 or 1."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from mailfax.health import Health, check_health
from tests import pg
from tests.conftest import make_settings
from tests.ports import free_port
from tests.test_crash_recovery import wait_for_port

pytestmark = pytest.mark.slow


def write_config(folder: Path, port: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "mailfax.toml"
    config.write_text(f'data_dir = "data"\n[smtp]\nlisten = ["0.0.0.0:{port}"]\n'
                      '[senders]\ntrusted_networks = ["127.0.0.0/8", "10.0.0.0/8"]\n'
                      '[accounts.emulator]\nprovider = "emulator"\n', encoding="utf-8")
    return config


def health(config: Path, cwd: Path) -> tuple[int, list[str]]:
    """Run as the Dockerfile's HEALTHCHECK does: no -c, the config from MAILFAX_CONFIG."""
    env = {"PATH": os.environ["PATH"], "MAILFAX_CONFIG": str(config)}
    done = subprocess.run([sys.executable, "-m", "mailfax", "health"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60)
    return done.returncode, done.stdout.splitlines()


@pytest.fixture
def serving(tmp_path: Path) -> Iterator[tuple[Path, int, subprocess.Popen[bytes]]]:
    port = free_port()
    config = write_config(tmp_path / "etc", port)
    log = (tmp_path / "serve.log").open("wb")
    server = subprocess.Popen([sys.executable, "-m", "mailfax", "-c", str(config), "serve"],
                              stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        asyncio.run(wait_for_port(port))
        yield config, port, server
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=30)
        log.close()


def test_healthy_while_serve_runs_unhealthy_once_it_stopped(
        serving: tuple[Path, int, subprocess.Popen[bytes]], tmp_path: Path) -> None:
    config, port, server = serving
    status, lines = health(config, tmp_path)
    assert status == 0, lines
    # 0.0.0.0 is knocked on at loopback; the store is the one serve created.
    assert lines == [f"healthy: smtp 127.0.0.1:{port} answers 220, store writable"]
    assert (config.parent / "data" / "mailfax.sqlite3").is_file()

    server.send_signal(signal.SIGTERM)
    assert server.wait(timeout=30) == 0
    status, lines = health(config, tmp_path)
    assert status == 1
    assert len(lines) == 1
    assert lines[0].startswith(f"unhealthy: smtp 127.0.0.1:{port}: ")
    assert "store" not in lines[0]  # the store itself still opens and writes


def test_unhealthy_when_the_store_cannot_be_opened(
        serving: tuple[Path, int, subprocess.Popen[bytes]], tmp_path: Path) -> None:
    """The listener answers, but this config's database is not one."""
    _, port, _ = serving
    other = write_config(tmp_path / "other", port)
    (other.parent / "data").mkdir()
    (other.parent / "data" / "mailfax.sqlite3").write_bytes(b"not a database\n" * 100)
    status, lines = health(other, tmp_path)
    assert status == 1
    assert len(lines) == 1
    assert lines[0].startswith("unhealthy: store: ")
    assert "not a database" in lines[0]


async def test_unhealthy_when_the_listener_does_not_greet_with_220(tmp_path: Path) -> None:
    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"554 5.3.2 not accepting mail\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(refuse, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    config = write_config(tmp_path / "etc", port)
    async with server:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "mailfax", "health", cwd=tmp_path,
            env={"PATH": os.environ["PATH"], "MAILFAX_CONFIG": str(config)},
            stdout=asyncio.subprocess.PIPE)
        out, _ = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 1
    assert out.decode().splitlines() == [
        f"unhealthy: smtp 127.0.0.1:{port}: banner '554 5.3.2 not accepting mail', not 220"]


async def greeting_server() -> asyncio.Server:
    async def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 mailfax.test ESMTP\r\n")
        await writer.drain()
        await reader.readline()  # QUIT
        writer.close()

    return await asyncio.start_server(greet, "127.0.0.1", 0)


@pytest.fixture(scope="module")
def postgres() -> Iterator[pg.PostgresServer]:
    with pg.server_for_tests() as server:
        yield server


async def test_unhealthy_when_postgresql_takes_no_writes(
        tmp_path: Path, postgres: pg.PostgresServer) -> None:
    """The store check writes: a database that only answers reads is unhealthy."""
    url = postgres.create_database()
    server = await greeting_server()
    port = server.sockets[0].getsockname()[1]
    settings = make_settings(tmp_path, store={"url": url},
                             smtp={"listen": [f"127.0.0.1:{port}"]})
    try:
        async with server:
            healthy = await check_health(settings)
            assert healthy == Health(True, f"healthy: smtp 127.0.0.1:{port} answers 220, "
                                           "store writable")
            name = url.rsplit("/", 1)[1]
            with psycopg.connect(postgres.url(), autocommit=True) as conn:
                conn.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
            unhealthy = await check_health(settings)
    finally:
        postgres.drop_database(url)
    assert not unhealthy.ok
    assert unhealthy.line.startswith("unhealthy: store: ")
    assert "read-only transaction" in unhealthy.line
    assert "\n" not in unhealthy.line
