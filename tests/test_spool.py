"""DATA through the spool (intake/spool.py): large mails faxed intact, the bytes of a mail as
sent, the size limits as before, and the receiving budget that refuses DATA beyond it."""

from __future__ import annotations

import asyncio
import io
import mailbox
from pathlib import Path

import aiosmtplib
import pikepdf
import pydantic
import pytest

from bench.memory import memory, pdf_mail, random_pdf, reset_peak
from mailfax.app import Application
from mailfax.config import Settings
from mailfax.intake.spool import (
    IN_MEMORY_BYTES,
    MEMORY_PER_BYTE,
    ReceivingBudget,
    declared_size,
    memory_cost,
)
from mailfax.model import JobState
from tests.conftest import Service, fax_mail, make_settings
from tests.ports import free_port
from tests.test_crash_recovery import start_server, wait_for_port

MB = 1_000_000


async def _smtp_session(port: int) -> aiosmtplib.SMTP:
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=120)
    await client.connect()
    return client


async def test_a_large_mail_is_faxed_intact_through_the_spool(service: Service) -> None:
    pdf = random_pdf(3 * MB, pages=5)
    mail = fax_mail([("scan.pdf", pdf, "application/pdf")], subject="Large scan")
    assert len(mail.as_bytes()) > 10 * IN_MEMORY_BYTES  # in the spool file, not in memory
    errors, reply = await service.send(mail, "alice@example.org", ["030123456@fax.local"])
    assert errors == {} and reply.startswith("2.0.0 queued as ")
    job = await service.app.store.get_job(reply.split()[-1])
    assert job is not None and job.pages == 5
    documents = await service.app.store.load_documents(job.mail_id)
    assert [(document.filename, document.pages) for document in documents] == [("scan.pdf", 5)]
    assert documents[0].data == pdf  # byte for byte: a PDF on paper is passed on as it came
    with pikepdf.open(io.BytesIO(documents[0].data)) as stored:
        assert len(stored.pages) == 5
    await service.wait_for_mail(lambda m: m["X-Mailfax-State"] == "delivered")
    delivered = await service.app.store.get_job(job.id)
    assert delivered is not None and delivered.state == JobState.DELIVERED
    spool = service.app.settings.data_dir / "spool"
    assert spool.is_dir() and list(spool.iterdir()) == []  # the spool file is unlinked


async def test_the_bytes_of_a_spooled_mail_arrive_as_sent(service: Service) -> None:
    # Lines starting with dots are dot-stuffed on the wire and must come back unstuffed;
    # the postmaster's copy is the mail as mailfax received it.
    lines = [f"{'.' * (index % 3)}line {index} {'x' * 60}" for index in range(4000)]
    mail = fax_mail([], to="postmaster@fax.local", subject="Dotted", body="\n".join(lines))
    raw = mail.as_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    assert len(raw) > IN_MEMORY_BYTES
    errors, reply = await service.send(raw, "someone@example.net", ["postmaster@fax.local"])
    assert errors == {} and reply == "2.0.0 forwarded to the postmaster"
    await service.wait_for_mail(lambda m: m["Subject"] == "Dotted")
    box = mailbox.Maildir(service.maildir, create=False)
    [stored] = [box.get_bytes(key) for key in box.iterkeys() if box[key]["Subject"] == "Dotted"]
    assert stored.split(b"\r\n", 1)[1] == raw  # the trace header, then the mail unchanged


async def test_too_large_and_too_long_lines_are_refused_as_before(tmp_path: Path) -> None:
    app = Application(make_settings(tmp_path, smtp={"listen": ["127.0.0.1:0"],
                                                    "max_message_size": 200_000}))
    await app.start()
    try:
        port = Service(app).port
        big = fax_mail([("scan.pdf", random_pdf(300_000, pages=1), "application/pdf")])
        client = await _smtp_session(port)
        try:
            for data, code in ((big.as_bytes(), 552),  # no SIZE= declared: seen at the end
                               (b"Subject: long\r\n\r\n" + b"y" * 5000 + b"\r\n", 500)):
                await client.mail("alice@example.org")
                await client.rcpt("030123456@fax.local")
                with pytest.raises(aiosmtplib.SMTPDataError) as refused:
                    await client.data(data)
                assert refused.value.code == code
            response = await client.noop()  # the session goes on
            assert response.code == 250
        finally:
            client.close()
    finally:
        await app.stop()


def test_the_budget_holds_what_fits_and_refuses_the_rest() -> None:
    budget = ReceivingBudget(memory_cost(100))
    first = budget.reserve(60)
    assert first is not None and budget.in_use == memory_cost(60)
    assert budget.reserve(50) is None  # declared, does not fit
    second = budget.reserve()  # size unknown: taken while anything is left
    assert second is not None
    assert not second.grow_to(41)  # at the end of its DATA it is larger than what is left
    assert second.grow_to(40) and budget.in_use == budget.limit
    assert budget.reserve() is None  # spent
    first.release()
    second.release()
    assert budget.in_use == 0
    assert declared_size(["BODY=8BITMIME", "size=1234"]) == 1234
    assert declared_size(["SIZE=x"]) == 0


def test_the_default_budget_follows_the_message_size(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, smtp={"max_message_size": 10 * MB})
    assert settings.smtp.receiving_budget_bytes == 4 * MEMORY_PER_BYTE * 10 * MB
    with pytest.raises(pydantic.ValidationError, match="receiving_budget"):
        make_settings(tmp_path, smtp={"max_message_size": 10 * MB,
                                      "receiving_budget": 10 * MB})


async def _send(port: int, raw: bytes) -> tuple[int, str]:
    try:
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=300) as client:
            await client.sendmail("bench@example.org", ["030123456@fax.local"], raw)
    except aiosmtplib.SMTPResponseException as error:
        return error.code, error.message
    return 250, ""


async def test_ten_parallel_30_mb_mails_stay_within_the_budget(tmp_path: Path) -> None:
    raw = pdf_mail(30 * MB)
    max_size = len(raw) + MB
    budget = 2 * memory_cost(max_size)  # two such mails at once
    port = free_port()
    config = tmp_path / "mailfax.toml"
    config.write_text(
        f'data_dir = "data"\n[smtp]\nlisten = ["127.0.0.1:{port}"]\n'
        f'max_message_size = {max_size}\nreceiving_budget = {budget}\n'
        '[accounts.emulator]\nprovider = "emulator"\ndelay_seconds = 3600\n')
    Settings.model_validate({"smtp": {"max_message_size": max_size,
                                      "receiving_budget": budget}})
    process = start_server(config, tmp_path / "serve.log")
    try:
        await wait_for_port(port, timeout=60)
        assert (await _send(port, pdf_mail(100_000)))[0] == 250  # the mail path imported
        await asyncio.sleep(1.0)
        reset_peak(process.pid)
        before, _ = memory(process.pid)
        replies = await asyncio.gather(*(_send(port, raw) for _ in range(10)))
        await asyncio.sleep(1.0)
        _, peak = memory(process.pid)
        accepted = [reply for reply in replies if reply[0] == 250]
        refused = [reply for reply in replies if reply[0] == 452]
        assert len(accepted) + len(refused) == 10, replies
        assert 1 <= len(accepted) <= 2
        assert all(message.startswith("4.3.1 ") for _, message in refused)
        assert peak - before < budget, (peak - before, budget)
        # With the budget free again, the next mail is taken.
        again = await _send(port, raw)
        assert again[0] == 250, again
    finally:
        process.terminate()
        process.wait(timeout=30)


async def _reply(reader: asyncio.StreamReader) -> bytes:
    """One SMTP reply, all its lines."""
    lines = [await reader.readline()]
    while lines[-1][3:4] == b"-":
        lines.append(await reader.readline())
    return b"".join(lines)


async def test_data_read_in_odd_pieces_keeps_the_mail_and_leaves_the_next_command(
        service: Service) -> None:
    """DATA is read in runs up to each ``.<CR><LF>``: pieces cut anywhere (inside a CR LF,
    between a line's dot and its end) give the mail as sent, dots unstuffed; the command
    pipelined right after the final dot is still read and answered."""
    body = ("Tricky lines follow.\n.\n..\n...x\nend.\n.end\n\n.\nlast line.")
    mail = fax_mail([], to="postmaster@fax.local", subject="Pieces", body=body)
    raw = mail.as_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    stuffed = raw.replace(b"\r\n.", b"\r\n..")
    assert b"\r\n..\r\n" in stuffed and b"\r\n...\r\n" in stuffed
    wire = stuffed + b".\r\nMAIL FROM:<bob@example.org>\r\n"
    reader, writer = await asyncio.open_connection("127.0.0.1", service.port)
    try:
        assert (await _reply(reader)).startswith(b"220")
        for command in (b"EHLO client.example", b"MAIL FROM:<someone@example.net>",
                        b"RCPT TO:<postmaster@fax.local>", b"DATA"):
            writer.write(command + b"\r\n")
            assert (await _reply(reader))[:1] in b"23", command
        start = 0
        for size in [1, 2, 1, 3, 1, 1, 2, 5, 7] * 400:  # every cut, over and over
            writer.write(wire[start:start + size])
            await writer.drain()
            start += size
            if start >= len(wire):
                break
            if start % 5 == 0:
                await asyncio.sleep(0)  # let the server read what came so far
        writer.write(wire[start:])
        assert (await _reply(reader)).startswith(b"250 2.0.0 forwarded to the postmaster")
        assert (await _reply(reader)).startswith(b"250")  # the pipelined MAIL FROM
        writer.write(b"QUIT\r\n")
        assert (await _reply(reader)).startswith(b"221")
    finally:
        writer.close()
    await service.wait_for_mail(lambda m: m["Subject"] == "Pieces")
    box = mailbox.Maildir(service.maildir, create=False)
    [stored] = [box.get_bytes(key) for key in box.iterkeys() if box[key]["Subject"] == "Pieces"]
    assert stored.split(b"\r\n", 1)[1] == raw
