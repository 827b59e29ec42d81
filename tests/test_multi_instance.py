"""Three ``mailfax serve`` on one PostgreSQL, one of them killed with -9 in the middle.

One FAX.de emulator (in this process, so its state can be read) serves all three. Mails are
submitted over SMTP to all three; after a third of them one instance (the one that runs the
status tracker and the inbound poller) is killed. Then every job must end, each job must
have reached FAX.de exactly once, each job must have exactly one status mail in the shared
outbox Maildir, and a fax received after the kill must be mailed once and deleted by the
instance that took the inbound poller over.
"""

from __future__ import annotations

import asyncio
import collections
import mailbox
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import aiosmtplib
import pytest

from mailfax.emulators import faxde as emulator
from mailfax.model import JobState
from mailfax.store.postgres import PostgresStore
from tests import pg
from tests.conftest import fax_mail
from tests.test_crash_recovery import free_port, wait_for_port

pytestmark = pytest.mark.slow

INSTANCES = 3
MAILS = 200
RECIPIENTS = 10  # per mail: MAILS × RECIPIENTS jobs
CLIENTS = 6
FINAL = {JobState.DELIVERED, JobState.FAILED, JobState.CANCELLED}


@pytest.fixture(scope="module")
def postgres_server() -> Iterator[pg.PostgresServer]:
    with pg.server_for_tests() as server:
        yield server


@pytest.fixture
def database(postgres_server: pg.PostgresServer) -> str:
    """A database of its own for each test: one test's jobs are not the next one's."""
    return postgres_server.create_database()


def write_config(folder: Path, port: int, url: str, wsdl_url: str, maildir: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "mailfax.toml"
    config.write_text(f"""
data_dir = "data"
default_account = "main"
[smtp]
listen = ["127.0.0.1:{port}"]
max_recipients = {RECIPIENTS}
[store]
url = "{url}"
[outbox]
maildir = "{maildir}"
[dispatch]
concurrency = 20
status_poll_seconds = 1
retry_initial_seconds = 0.5
retry_max_seconds = 2
[quotas]
status_mails_per_hour = 100000
[notify]
from_address = "fax@mailfax.test"
[inbound]
poll_seconds = 0.5
ocr = "off"
postmaster = "pm@example.org"
from_address = "fax@example.org"
[accounts.main]
provider = "fax.de"
account = "123456"
password = "secret"
wsdl_url = "{wsdl_url}"
""")
    return config


def start_instance(config: Path) -> subprocess.Popen[bytes]:
    log = config.parent / "serve.log"
    return subprocess.Popen([sys.executable, "-m", "mailfax", "-c", str(config), "serve"],
                            stdout=log.open("ab"), stderr=subprocess.STDOUT,
                            cwd=config.parent)


def stop_instances(processes: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM to each instance still running, then wait (kill after 30 s)."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


async def submit(ports: list[int], mails: list[EmailMessage]) -> None:
    queue: asyncio.Queue[EmailMessage] = asyncio.Queue()
    for mail in mails:
        queue.put_nowait(mail)

    async def client(port: int) -> None:
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=60) as smtp:
            while not queue.empty():
                await smtp.send_message(queue.get_nowait())

    await asyncio.gather(*(client(ports[index % len(ports)]) for index in range(CLIENTS)))


def make_mails(pdf: bytes) -> list[EmailMessage]:
    mails = []
    for index in range(MAILS):
        numbers = [f"030{index:04d}{recipient:02d}@fax.local" for recipient in range(RECIPIENTS)]
        mail = fax_mail([("doc.pdf", pdf, "application/pdf")], subject=f"mail {index}",
                        to=numbers[0])
        del mail["To"]
        mail["To"] = ", ".join(numbers)
        mails.append(mail)
    return mails


def log_of(config: Path) -> str:
    return (config.parent / "serve.log").read_text(errors="replace")


async def wait_until(what: str, check: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check() if callable(check) else check  # type: ignore[operator]
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        await asyncio.sleep(0.5)
    raise AssertionError(f"timed out waiting for: {what}")


async def test_three_instances_share_the_work_and_survive_a_kill_9(
        database: str, tmp_path: Path, corpus: Path) -> None:
    started = time.monotonic()
    # -77 with the existing JobId (the emulator's optimistic option): this test is about the
    # instances; what a -77 without it means is tested in test_faxde.py.
    fake = await emulator.start("127.0.0.1", 0, {"delay": "0.5", "duplicate_job_id": "1"})
    maildir = tmp_path / "outbox"
    ports = [free_port() for _ in range(INSTANCES)]
    configs = [write_config(tmp_path / f"instance{index}", port, database, fake.wsdl_url,
                            maildir) for index, port in enumerate(ports)]
    store = PostgresStore(database, listen=False)
    processes: list[subprocess.Popen[bytes]] = []
    try:
        # The first instance starts alone, so it takes the tracker and the inbound poller.
        processes.append(start_instance(configs[0]))
        await wait_for_port(ports[0], timeout=60)
        await wait_until("instance 0 runs the inbound poller",
                         lambda: "now runs inbound main" in log_of(configs[0]), 30)
        processes += [start_instance(config) for config in configs[1:]]
        for port in ports[1:]:
            await wait_for_port(port, timeout=60)
        await store.open()

        mails = make_mails((corpus / "pdf" / "crazyones.pdf").read_bytes())
        third = len(mails) // 3
        await submit(ports, mails[:third])
        await wait_until("dispatching has begun", lambda: len(fake.state.jobs) > 0, 30)
        os.kill(processes[0].pid, signal.SIGKILL)  # mid-run: jobs leased, mails queued
        processes[0].wait()
        killed_at = time.monotonic()
        tiff = (corpus / "fax-tiff" / "fax2d.tif").read_bytes()
        fax_id = fake.state.add_inbound(tiff, called_number="+4989999")
        await submit(ports[1:], mails[third:])
        submitted = time.monotonic()

        async def all_final() -> bool:
            jobs = await store.list_jobs(limit=100_000)
            return len(jobs) == MAILS * RECIPIENTS and all(job.state in FINAL for job in jobs)

        await wait_until("every job in a final state", all_final, 150)

        async def all_mailed() -> bool:
            return (not await store.pending_notifications(1)
                    and await store.outbox_depth() == 0 and fax_id in fake.state.deleted)

        await wait_until("every status mail and the fax handed off", all_mailed, 60)
        finished = time.monotonic()
    finally:
        stop_instances(processes)
        await store.close()
        await fake.close()

    jobs = await _jobs(database)
    assert len(jobs) == MAILS * RECIPIENTS
    assert {job for job, state in jobs.items() if state != JobState.DELIVERED} == set()

    # Each job reached FAX.de exactly once (a resend after the kill was answered with -77).
    references = collections.Counter(recipient.reference for job in fake.state.jobs.values()
                                     for recipient in job.recipients)
    assert set(references) == set(jobs)
    assert [ref for ref, count in references.items() if count != 1] == []

    # Exactly one status mail per job, and the received fax mailed once.
    box = mailbox.Maildir(maildir, create=False)
    status: collections.Counter[str] = collections.Counter()
    inbound = 0
    for message in box:
        if message["X-Mailfax-Job"]:
            status[message["X-Mailfax-Job"]] += 1
        elif "pm@example.org" in str(message["To"]):
            inbound += 1
    assert set(status) == set(jobs)
    assert [job for job, count in status.items() if count != 1] == []
    assert inbound == 1
    assert fake.state.inbox == [] and fake.state.deleted == [fax_id]

    # Another instance took the poller and the tracker over; all three dispatched.
    survivors = "".join(log_of(config) for config in configs[1:])
    assert "now runs inbound main" in survivors and "now runs tracker" in survivors
    resent = survivors.count("a resend after a lost answer")
    print(f"\n{MAILS * RECIPIENTS} jobs; killed after {killed_at - started:.0f} s, "
          f"submitted by {submitted - started:.0f} s, all done by {finished - started:.0f} s; "
          f"{resent} sends of the killed instance resumed (-77)")


async def _jobs(url: str) -> dict[str, JobState]:
    store = PostgresStore(url, listen=False)
    await store.open()
    try:
        return {job.id: job.state for job in await store.list_jobs(limit=100_000)}
    finally:
        await store.close()


def write_emulator_config(folder: Path, port: int, url: str, maildir: Path) -> Path:
    """An instance on the bundled emulator, with a data dir of its own (``folder/data``)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "mailfax.toml"
    config.write_text(f"""
data_dir = "data"
[smtp]
listen = ["127.0.0.1:{port}"]
[store]
url = "{url}"
[outbox]
maildir = "{maildir}"
[dispatch]
status_poll_seconds = 1
retry_initial_seconds = 0.5
retry_max_seconds = 2
[quotas]
status_mails_per_hour = 100000
[notify]
from_address = "fax@mailfax.test"
[accounts.emulator]
provider = "emulator"
delay_seconds = 0.5
""")
    return config


async def test_two_instances_with_their_own_data_dirs_share_one_emulator_network(
        database: str, tmp_path: Path, corpus: Path) -> None:
    """Issue 22: the emulator's ledger was per data dir, so the instance that ran the tracker
    never saw the other's jobs (5 of 10 stayed ``submitted``). Now the store is the network."""
    maildir = tmp_path / "outbox"
    ports = [free_port() for _ in range(2)]
    configs = [write_emulator_config(tmp_path / f"host{index}", port, database, maildir)
               for index, port in enumerate(ports)]
    store = PostgresStore(database, listen=False)
    processes: list[subprocess.Popen[bytes]] = []
    pdf = (corpus / "pdf" / "crazyones.pdf").read_bytes()
    mails = [fax_mail([("doc.pdf", pdf, "application/pdf")], subject=f"mail {index}",
                      to=f"030{index:06d}@fax.local") for index in range(MAILS)]
    try:
        processes.append(start_instance(configs[0]))  # alone first: it takes the tracker
        await wait_for_port(ports[0], timeout=60)
        await wait_until("instance 0 runs the tracker",
                         lambda: "now runs tracker" in log_of(configs[0]), 30)
        processes.append(start_instance(configs[1]))
        await wait_for_port(ports[1], timeout=60)
        await store.open()
        half = MAILS // 2
        await submit(ports, mails[:half])
        os.kill(processes[0].pid, signal.SIGKILL)  # the tracker's instance, mid-run
        processes[0].wait()
        await submit(ports[1:], mails[half:])

        async def all_done() -> bool:
            jobs = await store.list_jobs(limit=100_000)
            return (len(jobs) == MAILS and all(job.state in FINAL for job in jobs)
                    and not await store.pending_notifications(1)
                    and await store.outbox_depth() == 0)

        try:
            await wait_until("every job final and mailed", all_done, 150)
        except AssertionError:
            jobs = await store.list_jobs(limit=100_000)
            states = collections.Counter(job.state.value for job in jobs)
            raise AssertionError(
                f"not done: {len(jobs)} jobs {dict(states)}, pending notifications: "
                f"{len(await store.pending_notifications(1000))}, outbox: "
                f"{await store.outbox_depth()}\n{log_of(configs[1])[-3000:]}") from None
        transmissions = await store.emulator_transmissions(
            "emulator", [job.provider_job_id or "" for job in
                         await store.list_jobs(limit=100_000)])
    finally:
        stop_instances(processes)
        await store.close()

    jobs = await _jobs(database)
    assert len(jobs) == MAILS
    assert {job for job, state in jobs.items() if state != JobState.DELIVERED} == set()
    # Every job reached the (one) emulator network exactly once: one transmission each.
    references = collections.Counter(item.reference for item in transmissions.values())
    assert set(references) == set(jobs)
    assert [ref for ref, count in references.items() if count != 1] == []
    # Neither instance wrote a ledger file of its own.
    ledger_files = await asyncio.to_thread(
        lambda: list(tmp_path.glob("host*/data/emulator/*.sqlite3")))
    assert ledger_files == []
    status = collections.Counter(message["X-Mailfax-Job"]
                                 for message in mailbox.Maildir(maildir, create=False))
    assert set(status) == set(jobs)
    assert [job for job, count in status.items() if count != 1] == []
