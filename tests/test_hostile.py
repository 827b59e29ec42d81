"""The hostile cases of ``tests/hostile/cases.json`` against one live service, each with the
reply it must get; afterwards the same service must still take a normal mail.

Most cases speak SMTP over a raw socket (``asyncio.open_connection``): aiosmtplib would refuse
to send much of this abuse. ``tests/hostile/make_cases.py`` writes the case files.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from email import message_from_bytes
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from mailfax.app import Application
from tests.conftest import Service, fax_mail, make_settings

HOSTILE = Path(__file__).resolve().parent / "hostile"
CASES: list[dict[str, Any]] = json.loads((HOSTILE / "cases.json").read_text(encoding="utf-8"))

MAX_MESSAGE_SIZE = 2 * 1024 * 1024
DATA_TIMEOUT = 2.0
MAX_RECIPIENTS = 5
CASE_SECONDS = 10.0  # no single case may take longer
RUN_SECONDS = 60.0  # all of them together, and the normal mail after them
INJECTED_HEADERS = (b"bcc", b"x-injected")

ON_THE_SERVICE_LOOP = pytest.mark.asyncio(loop_scope="module")


@dataclass
class Run:
    service: Service
    started: float


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def hostile(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Run]:
    settings = make_settings(tmp_path_factory.mktemp("hostile"), smtp={
        "listen": ["127.0.0.1:0"], "max_message_size": MAX_MESSAGE_SIZE,
        "max_recipients": MAX_RECIPIENTS, "data_timeout": DATA_TIMEOUT,
        # The trickle case sends its 1.3 kB at ~440 B/s: steady progress above this rate.
        "min_data_rate": 100})
    app = Application(settings)
    await app.start()
    try:
        yield Run(Service(app), time.monotonic())
    finally:
        await app.stop()


# --- a raw SMTP client -------------------------------------------------------------------------

@dataclass
class Reply:
    code: int  # 0: the server closed the connection instead of answering
    lines: list[str]

    @property
    def text(self) -> str:
        return " ".join(line[4:] for line in self.lines)

    def __str__(self) -> str:
        return " | ".join(self.lines) or "(connection closed)"


class RawSmtp:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int) -> RawSmtp:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=2**20)
        return cls(reader, writer)

    async def reply(self, timeout: float = CASE_SECONDS) -> Reply:
        lines: list[str] = []
        while True:
            raw = await asyncio.wait_for(self.reader.readline(), timeout)
            if not raw:
                return Reply(0, lines)
            assert raw.endswith(b"\r\n"), f"reply line without CRLF: {raw!r}"
            line = raw[:-2].decode("utf-8", "replace")
            lines.append(line)
            if len(line) < 4 or line[3] != "-":
                return Reply(int(line[:3]), lines)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def command(self, line: str) -> Reply:
        await self.send(line.encode("utf-8", "surrogateescape") + b"\r\n")
        return await self.reply()

    async def closed(self, timeout: float) -> bool:
        """Does the server close the connection within ``timeout`` (ignoring what it says)?"""
        try:
            async with asyncio.timeout(timeout):
                while await self.reader.read(65536):
                    pass
        except TimeoutError:
            return False
        except ConnectionError:
            pass
        return True

    async def close(self) -> None:
        if not self.writer.is_closing():
            with contextlib.suppress(ConnectionError, TimeoutError):
                self.writer.write(b"QUIT\r\n")
                await asyncio.wait_for(self.writer.drain(), 2)
            self.writer.close()
        with contextlib.suppress(ConnectionError, TimeoutError):
            await asyncio.wait_for(self.writer.wait_closed(), 2)


def stuffed(message: bytes) -> bytes:
    """The message as DATA content: dot-stuffed (RFC 5321 §4.5.2), ending in CRLF . CRLF."""
    if message and not message.endswith(b"\r\n"):
        message += b"\r\n"
    if message.startswith(b"."):
        message = b"." + message
    return message.replace(b"\r\n.", b"\r\n..") + b".\r\n"


# --- the big cases, built at run time ----------------------------------------------------------

def _mail_head(content_type: str) -> bytes:
    return (b"From: alice@example.org\r\nTo: 030123456@fax.local\r\nSubject: generated\r\n"
            b"MIME-Version: 1.0\r\nContent-Type: " + content_type.encode() + b"\r\n\r\n")


def oversized() -> bytes:
    line = b"A" * 76 + b"\r\n"
    filler = line * ((MAX_MESSAGE_SIZE + 1024 * 1024) // len(line))
    return (_mail_head("multipart/mixed; boundary=B") + b"--B\r\nContent-Type: "
            b"application/pdf; name=big.pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n"
            + filler + b"--B--\r\n")


def mime_parts_10000() -> bytes:
    part = b"--B\r\nContent-Type: text/plain\r\n\r\nx\r\n"
    return _mail_head("multipart/mixed; boundary=B") + part * 10_000 + b"--B--\r\n"


def nesting_5000() -> bytes:
    depth = 5000
    opening = b"".join(b"--b%d\r\nContent-Type: multipart/mixed; boundary=b%d\r\n\r\n"
                       % (level, level + 1) for level in range(depth))
    closing = b"".join(b"--b%d--\r\n" % level for level in reversed(range(depth + 1)))
    return (_mail_head("multipart/mixed; boundary=b0") + opening
            + b"--b%d\r\nContent-Type: text/plain\r\n\r\nbottom\r\n" % depth + closing)


GENERATORS: dict[str, Callable[[], bytes]] = {
    "oversized": oversized, "mime_parts_10000": mime_parts_10000, "nesting_5000": nesting_5000}


def content_of(case: dict[str, Any]) -> bytes:
    if "generator" in case:
        return GENERATORS[str(case["generator"])]()
    return (HOSTILE / str(case["file"])).read_bytes()


# --- checks --------------------------------------------------------------------------------------

def assert_reply(reply: Reply, expect: dict[str, Any], what: str) -> None:
    codes = expect["code"] if isinstance(expect["code"], list) else [expect["code"]]
    assert reply.code in codes, f"{what}: expected {expect['code']}, got {reply}"
    for word in expect["words"]:
        assert word in reply.text, f"{what}: {word!r} not in {reply}"
    assert len(reply.lines) == 1, f"{what}: a refusal must be one line, got {reply.lines}"
    assert reply.lines[0].isprintable(), f"{what}: control characters in the reply {reply}"


async def job_ids(service: Service) -> set[str]:
    return {job.id for job in await service.app.store.list_jobs()}


async def assert_accepted(service: Service, reply: Reply, expect: dict[str, Any]) -> None:
    queued = reply.text.split("queued as ", 1)[1].split()
    assert len(queued) == expect.get("jobs", 1), reply
    for job_id in queued:
        job = await service.app.store.get_job(job_id)
        assert job is not None, job_id
        assert job.pages == expect["pages"], f"job {job_id}: {job.pages} pages"
        if "documents" in expect:
            documents = await service.app.store.load_documents(job.mail_id)
            assert [document.filename for document in documents] == expect["documents"]
        if expect.get("clean_status_mail"):
            await assert_clean_status_mail(service, job_id)


async def assert_clean_status_mail(service: Service, job_id: str) -> None:
    """The status mail of the job has no injected header, no NUL and no bare CR or LF."""
    found = await service.wait_for_mail(lambda mail: mail["X-Mailfax-Job"] == job_id,
                                        timeout=CASE_SECONDS)
    raw = found.as_bytes()
    head = raw.split(b"\n\n", 1)[0]
    names = [line.split(b":", 1)[0].strip().lower() for line in head.split(b"\n")
             if line and line[:1] not in (b" ", b"\t")]
    for name in INJECTED_HEADERS:
        assert name not in names, f"injected {name!r} header in the status mail:\n{head!r}"
    assert b"\x00" not in head, f"NUL in the status mail's header:\n{head!r}"
    assert b"\r" not in head.replace(b"\r\n", b""), f"bare CR in the status mail:\n{head!r}"
    parsed = message_from_bytes(raw)
    assert "\n" not in str(parsed["Subject"]).replace("\n ", "").replace("\n\t", "")


# --- the dialogues -------------------------------------------------------------------------------

async def run_mail(service: Service, case: dict[str, Any]) -> None:
    expect = case["expect"]
    before = await job_ids(service)
    client = await RawSmtp.connect(service.port)
    try:
        greeting = await client.reply()
        assert greeting.code == 220, greeting
        assert (await client.command("EHLO hostile.example")).code == 250
        reply = await client.command(f"MAIL FROM:{case['mail_from']}")
        if expect["stage"] == "mail":
            assert_reply(reply, expect, "MAIL")
            return
        assert reply.code == 250, f"MAIL: {reply}"
        rcpt = case["rcpt"]
        for index, address in enumerate(rcpt):
            reply = await client.command(f"RCPT TO:{address}")
            if expect["stage"] == "rcpt" and index == len(rcpt) - 1:
                assert_reply(reply, expect, f"RCPT TO:{address!r}")
                return
            assert reply.code == 250, f"RCPT TO:{address!r}: {reply}"
        reply = await client.command("DATA")
        assert reply.code == 354, f"DATA: {reply}"
        await client.send(stuffed(content_of(case)))
        reply = await client.reply()
        assert_reply(reply, expect, "end of DATA")
        # One message, one reply: nothing smuggled in after it (RFC 5321 §4.5.2). Asked at
        # once: waiting for a status mail below may outlast the session's idle timeout (every
        # case faxes one number, one call at a time).
        assert (await client.command("NOOP")).code == 250
        if reply.code == 250:
            await assert_accepted(service, reply, expect)
    finally:
        await client.close()
        if expect["code"] != 250 or expect["stage"] != "data":
            assert await job_ids(service) == before, "a refused case created a job"


async def run_script(service: Service, case: dict[str, Any]) -> None:
    expect = case["expect"]
    before = await job_ids(service)
    client = await RawSmtp.connect(service.port)
    try:
        data = content_of(case)
        if not case.get("before_greeting"):
            assert (await client.reply()).code == 220
        await client.send(data)
        replies = []
        for _ in expect["replies"]:
            reply = await client.reply()
            replies.append(reply)
            if reply.code == 0:
                break
        assert [reply.code for reply in replies] == expect["replies"], \
            [str(reply) for reply in replies]
        for index, words in expect.get("words", {}).items():
            for word in words:
                assert word in replies[int(index)].text, replies[int(index)]
        if expect.get("closed"):
            assert await client.closed(3.0), "the server kept the connection open"
    finally:
        await client.close()
    new = await job_ids(service) - before
    assert len(new) == expect["jobs"], new
    for job_id in new:
        job = await service.app.store.get_job(job_id)
        assert job is not None and job.pages == expect["pages"]


async def open_data(service: Service) -> RawSmtp:
    client = await RawSmtp.connect(service.port)
    assert (await client.reply()).code == 220
    for line, code in (("EHLO slow.example", 250), ("MAIL FROM:<alice@example.org>", 250),
                       ("RCPT TO:<030123456@fax.local>", 250), ("DATA", 354)):
        reply = await client.command(line)
        assert reply.code == code, f"{line}: {reply}"
    return client


async def run_stall(service: Service, case: dict[str, Any]) -> None:
    """Half a message, then silence: others are served meanwhile; the staller is dropped."""
    before = await job_ids(service)
    message = stuffed(content_of(case))
    client = await open_data(service)
    stalled_at = time.monotonic()
    try:
        await client.send(message[: len(message) // 2])
        errors, reply = await service.send(
            fax_mail([("meanwhile.pdf", (HOSTILE / "tiny.pdf").read_bytes(),
                       "application/pdf")]), "bob@example.org", ["030123456@fax.local"])
        assert errors == {} and "queued as" in reply
        served_after = time.monotonic() - stalled_at
        assert served_after < DATA_TIMEOUT, f"another client waited {served_after:.1f} s"
        assert await client.closed(DATA_TIMEOUT + 3), "the staller was never dropped"
        dropped_after = time.monotonic() - stalled_at
        assert DATA_TIMEOUT * 0.8 <= dropped_after <= DATA_TIMEOUT + 2, dropped_after
    finally:
        await client.close()
    assert len(await job_ids(service) - before) == 1  # the other client's mail, not the staller's


async def run_trickle(service: Service, case: dict[str, Any]) -> None:
    """A slow client that keeps sending for 1.5 × data_timeout is not a staller."""
    message = stuffed(content_of(case))
    client = await open_data(service)
    try:
        chunks = 8
        size = len(message) // chunks + 1
        for start in range(0, len(message), size):
            await client.send(message[start:start + size])
            await asyncio.sleep(DATA_TIMEOUT * 1.5 / chunks)
        reply = await client.reply()
        assert_reply(reply, case["expect"], "end of a slow DATA")
        await assert_accepted(service, reply, case["expect"])
    finally:
        await client.close()


RUNNERS = {"mail": run_mail, "script": run_script, "stall": run_stall, "trickle": run_trickle}


def _params() -> list[Any]:
    return [pytest.param(case, id=case["name"]) for case in CASES]


def test_the_folder_has_enough_cases_and_files() -> None:
    assert len(CASES) >= 40
    for case in CASES:
        assert not ("file" in case and "generator" in case), case["name"]
        if case["expect"]["stage"] in ("data", "script"):
            assert "file" in case or "generator" in case, case["name"]
        assert case["kind"] in RUNNERS, case["name"]
        if "file" in case:
            assert (HOSTILE / case["file"]).is_file(), case["file"]
    committed = sum(path.stat().st_size for path in HOSTILE.iterdir() if path.is_file())
    assert committed < 2 * 1024 * 1024


@ON_THE_SERVICE_LOOP
@pytest.mark.parametrize("case", _params())
async def test_hostile_case(hostile: Run, case: dict[str, Any]) -> None:
    started = time.monotonic()
    await asyncio.wait_for(RUNNERS[case["kind"]](hostile.service, case), 30)
    took = time.monotonic() - started
    assert took < CASE_SECONDS, f"{case['name']} took {took:.1f} s"


@ON_THE_SERVICE_LOOP
async def test_a_normal_mail_is_still_accepted_afterwards(hostile: Run) -> None:
    pdf = (HOSTILE / "tiny.pdf").read_bytes()
    errors, reply = await hostile.service.send(
        fax_mail([("normal.pdf", pdf, "application/pdf")]), "alice@example.org",
        ["030123456@fax.local"])
    assert errors == {}
    assert "queued as" in reply, reply
    job = await hostile.service.app.store.get_job(reply.split("queued as ", 1)[1].split()[0])
    assert job is not None and job.pages == 1
    took = time.monotonic() - hostile.started
    assert took < RUN_SECONDS, f"the hostile run took {took:.0f} s"
