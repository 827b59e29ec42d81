"""kill -9 right after a burst of accepted mails loses nothing and faxes nothing twice."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import aiosmtplib
import pytest

from tests.conftest import fax_mail
from tests.ports import free_port

pytestmark = pytest.mark.slow

BURST = 200


def write_config(folder: Path, port: int) -> Path:
    config = folder / "mailfax.toml"
    config.write_text(f"""
data_dir = "data"
[smtp]
listen = ["127.0.0.1:{port}"]
[dispatch]
status_poll_seconds = 1
retry_initial_seconds = 0.5
retry_max_seconds = 2
[accounts.emulator]
provider = "emulator"
delay_seconds = 1.0
""")
    return config


def start_server(config: Path, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "mailfax", "-c", str(config), "serve"],
                            stdout=log.open("ab"), stderr=subprocess.STDOUT)


async def wait_for_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.1)
    raise AssertionError(f"nothing listens on port {port}")


async def send_burst(port: int, pdf: bytes, count: int) -> list[str]:
    job_ids: list[str] = []
    queue: asyncio.Queue[int] = asyncio.Queue()
    for index in range(count):
        queue.put_nowait(index)

    async def worker() -> None:
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=60) as client:
            while not queue.empty():
                index = queue.get_nowait()
                mail = fax_mail([("doc.pdf", pdf, "application/pdf")],
                                subject=f"burst {index}", to=f"0301234{index:03d}@fax.local")
                _, reply = await client.send_message(mail)
                job_ids.append(reply.split()[-1])

    await asyncio.gather(*(worker() for _ in range(10)))
    return job_ids


def jobs_in(folder: Path, config: Path) -> list[dict[str, object]]:
    out = subprocess.run([sys.executable, "-m", "mailfax", "-c", str(config), "jobs", "--json",
                          "--limit", "10000"], capture_output=True, check=True, cwd=folder)
    jobs: list[dict[str, object]] = json.loads(out.stdout)
    return jobs


async def test_kill_9_after_a_burst_then_restart_finishes_every_job_once(
        tmp_path: Path, corpus: Path) -> None:
    port = free_port()
    config = write_config(tmp_path, port)
    log = tmp_path / "serve.log"
    server = start_server(config, log)
    try:
        await wait_for_port(port)
        accepted = await send_burst(port, (corpus / "pdf" / "crazyones.pdf").read_bytes(), BURST)
        os.kill(server.pid, signal.SIGKILL)
        server.wait()
    finally:
        if server.poll() is None:
            server.kill()
    assert len(set(accepted)) == BURST

    stored = {job["id"] for job in jobs_in(tmp_path, config)}
    assert set(accepted) <= stored, "a job that got its 250 is missing after kill -9"

    server = start_server(config, log)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            jobs = jobs_in(tmp_path, config)
            if all(job["state"] in ("delivered", "failed", "cancelled") for job in jobs):
                break
            await asyncio.sleep(1)
        else:
            raise AssertionError("not every job reached a final state after the restart")
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)

    assert {job["state"] for job in jobs} == {"delivered"}
    # The emulator's network is the store: what it "faxed", each reference once.
    ledger = sqlite3.connect(tmp_path / "data" / "mailfax.sqlite3")
    transmissions = ledger.execute("SELECT reference FROM emulator_transmissions").fetchall()
    references = [row[0] for row in transmissions]
    assert len(references) == len(set(references)) == BURST
    assert set(references) == set(accepted)
