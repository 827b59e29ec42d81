"""mailfax as a user runs it: the installed ``mailfax`` console script, started in an empty
folder with no config file (so everything lives in ./mailfax-data), spoken to over SMTP, and
judged by what a user reads: the Maildir, ``mailfax jobs --json``, ``mailfax inbox --json``.

The only thing set on the command line is the SMTP port (``serve --listen``): the default
127.0.0.1:2525 may be taken on a shared machine. ``MAILFAX_CONFIG`` is removed from the
environment so no config file is read.
"""

from __future__ import annotations

import contextlib
import email
import email.policy
import json
import mailbox
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from email.message import EmailMessage
from pathlib import Path
from typing import Any, TypeVar, cast

import aiosmtplib

from tests.ports import free_port

MAILFAX = Path(sys.executable).with_name("mailfax")
START_TIMEOUT = 30.0
T = TypeVar("T")


def user_environment() -> dict[str, str]:
    """The environment of a user whose shell has the venv on PATH and no mailfax config."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("MAILFAX_CONFIG", "MAILFAX_LOG")}
    env["PATH"] = f"{MAILFAX.parent}{os.pathsep}{env.get('PATH', '')}"
    return env


class Mailfax:
    """One ``mailfax serve`` in its own empty folder, and the commands a user types there."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.port = free_port()
        self.log_path = folder / "serve.log"
        self.process: subprocess.Popen[bytes] | None = None

    # -- the server --

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [str(MAILFAX), "serve", "--listen", f"127.0.0.1:{self.port}"], cwd=self.folder,
                env=user_environment(), stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"mailfax serve ended: {self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"mailfax serve did not listen: {self.log()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    # -- what a user types and reads --

    def run(self, *args: str, check: bool = True, timeout: float = 60
            ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([str(MAILFAX), *args], cwd=self.folder, env=user_environment(),
                                capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"mailfax {' '.join(args)}: exit {result.returncode}\n"
                                 f"{result.stdout}{result.stderr}")
        return result

    def jobs(self) -> list[dict[str, Any]]:
        data: list[dict[str, Any]] = json.loads(self.run("jobs", "--json").stdout)
        return data

    def job(self, job_id: str) -> dict[str, Any]:
        return next(job for job in self.jobs() if job["id"] == job_id)

    def inbox(self) -> list[dict[str, Any]]:
        data: list[dict[str, Any]] = json.loads(self.run("inbox", "--json").stdout)
        return data

    def emulator_ledger(self, job_id: str) -> tuple[str, int, int] | None:
        """What the bundled emulator received for a job: (number, pages, send calls), read
        from its network, a table in the store (mailfax-data/mailfax.sqlite3), read-only."""
        path = self.folder / "mailfax-data" / "mailfax.sqlite3"
        with contextlib.closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)) as db:
            row = db.execute("SELECT number, pages, send_calls FROM emulator_transmissions"
                             " WHERE reference = ?", (job_id,)).fetchone()
        return None if row is None else (str(row[0]), int(row[1]), int(row[2]))

    @property
    def maildir(self) -> Path:
        return self.folder / "mailfax-data" / "outbox"

    def mails(self) -> list[EmailMessage]:
        """The mails in the Maildir, as a mail reader shows them (headers decoded)."""
        if not self.maildir.exists():
            return []
        folder = mailbox.Maildir(self.maildir, create=False)
        return [cast(EmailMessage, email.message_from_bytes(folder.get_bytes(key),
                                                            policy=email.policy.default))
                for key in folder.iterkeys()]

    async def send(self, message: EmailMessage, sender: str = "alice@example.org"
                   ) -> tuple[int, str]:
        """Deliver over SMTP; the reply to DATA (or to the refused RCPT)."""
        recipients = [str(address) for address in message.get_all("To", [])]
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=self.port, timeout=120) as client:
            try:
                _, reply = await client.send_message(message, sender=sender,
                                                     recipients=recipients)
            except aiosmtplib.SMTPResponseException as error:
                return error.code, error.message
            except aiosmtplib.SMTPRecipientsRefused as error:
                refused = error.recipients[0]
                return refused.code, refused.message
        return 250, reply

    async def queued(self, message: EmailMessage) -> str:
        """Send a mail that must be accepted; its job id."""
        code, reply = await self.send(message)
        assert code == 250, f"{code} {reply}"
        assert reply.startswith("2.0.0 queued as "), reply
        return reply.split()[-1]


def eventually(probe: Callable[[], T | None], timeout: float = 60.0, what: str = "") -> T:
    """``probe()``'s first truthy result, polling up to ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:.0f} s: {what}")
        time.sleep(0.25)


def final_job(mailfax: Mailfax, job_id: str, timeout: float = 60.0) -> dict[str, Any]:
    return eventually(lambda: next((job for job in mailfax.jobs() if job["id"] == job_id
                                    and job["state"] in ("delivered", "failed", "cancelled")),
                                   None), timeout, f"job {job_id} ending")


def status_mail(mailfax: Mailfax, job_id: str, timeout: float = 60.0) -> EmailMessage:
    """The status mail of a job, from the Maildir (it names the job in a header)."""
    def find() -> EmailMessage | None:
        for message in mailfax.mails():
            if job_id in str(message.get("X-Mailfax-Job", "")) or job_id in str(
                    message.get("Message-ID", "")):
                return message
        return None

    return eventually(find, timeout, f"the status mail of job {job_id}")
