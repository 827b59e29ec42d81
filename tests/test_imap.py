"""IMAP against a real Dovecot: intake from a watched mailbox (IDLE, Processed/Rejected, replies,
the sender policy, no double fax after a lost connection) and delivery of received faxes by
APPEND into a shared folder, with the provider's copy deleted only after the APPEND.
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path
from typing import Any

import pytest

from mailfax.app import Application
from mailfax.config import ImapDeliverySettings, ImapIntakeSettings
from mailfax.emulators import faxde as emulator
from mailfax.imap.client import ImapError, ImapSession, imap_utf7
from mailfax.imap.delivery import ImapDeliverySink
from mailfax.imap.intake import MAX_HANDLE_FAILURES, find_numbers
from mailfax.outbound.outbox import MaildirSink
from mailfax.providers.base import InboundFax
from mailfax.store.base import OutgoingMail
from mailfax.store.sqlite import SqliteStore
from tests.conftest import Service, make_settings
from tests.mailservers import PASSWORD, Dovecot, free_port, running_dovecot

FAX = "fax@example.org"
FAX2 = "fax-retry@example.org"  # each test its own mailbox: they share one Dovecot
FAX3 = "fax-poison@example.org"
ALICE = "alice@example.org"
PDF = (b"%PDF-1.4\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj\n"
       b"2 0 obj<</Type/Pages/Kids[3 0 R]/Count 1>>endobj\n"
       b"3 0 obj<</Type/Page/Parent 2 0 R/MediaBox[0 0 595 842]>>endobj\n"
       b"trailer<</Root 1 0 R>>\n%%EOF\n")
FAXDE_PASSWORD = "s3cr3t"


@pytest.fixture(scope="module")
def dovecot() -> Iterator[Dovecot]:
    with running_dovecot([FAX, FAX2, FAX3, ALICE]) as server:
        yield server


def fax_mail(subject: str, *, sender: str = ALICE, to: str = FAX,
             pdf: bool = True) -> bytes:
    message = EmailMessage()
    message["From"] = sender
    message["To"] = to
    message["Subject"] = subject
    message["Message-ID"] = make_msgid(domain="example.org")
    message.set_content("Please fax this.")
    if pdf:
        message.add_attachment(PDF, maintype="application", subtype="pdf",
                               filename="letter.pdf")
    return message.as_bytes()


def intake_settings(tmp_path: Path, dovecot: Dovecot, user: str = FAX, **imap: Any) -> Any:
    return make_settings(
        tmp_path, senders={"allowed_domains": ["example.org"]},
        imap_intake={"host": "127.0.0.1", "port": dovecot.imap_port, "username": user,
                     "password": PASSWORD, "plus_addresses": [FAX], "timeout": 10,
                     "reconnect_initial_seconds": 0.2, "reconnect_max_seconds": 1.0, **imap})


@contextlib.asynccontextmanager
async def running(settings: Any) -> AsyncIterator[Application]:
    app = Application(settings)
    await app.start()
    try:
        yield app
    finally:
        await app.stop()


async def append(dovecot: Dovecot, message: bytes, user: str = FAX,
                 folder: str = "INBOX") -> None:
    await asyncio.to_thread(dovecot.append, user, folder, message)


async def count(dovecot: Dovecot, folder: str, user: str = FAX) -> int:
    return len(await asyncio.to_thread(dovecot.messages, user, folder))


async def wait_for_jobs(app: Application, number: int, timeout: float = 30.0) -> list[Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = await app.store.list_jobs()
        if len(jobs) >= number:
            return jobs
        await asyncio.sleep(0.1)
    raise AssertionError(f"{len(await app.store.list_jobs())} jobs, expected {number}")


def test_numbers_come_from_the_subject_or_a_to_address() -> None:
    from email.parser import BytesHeaderParser
    from email.policy import default

    settings = ImapIntakeSettings(host="h", username="u", password="p",  # type: ignore[arg-type]
                                  plus_addresses=[FAX])

    def numbers(subject: str, to: str = FAX) -> list[str]:
        headers = BytesHeaderParser(policy=default).parsebytes(
            f"From: a@b\r\nTo: {to}\r\nSubject: {subject}\r\n\r\n".encode())
        assert isinstance(headers, EmailMessage)
        return find_numbers(headers, settings, ["fax.local"])

    assert numbers("Fax to +49 30 123456") == ["+49 30 123456"]
    assert numbers("FAX: 030 123456; 040-98765") == ["030 123456", "040-98765"]
    assert numbers("030/123456") == ["030/123456"]
    assert numbers("Invoice 2024-03") == []  # a number alone in a longer subject is no fax
    assert numbers("Letter", "fax+4930123456@example.org") == ["4930123456"]
    assert numbers("Letter", "other+4930123456@example.org") == []  # not our plus-address
    assert numbers("Letter", '"Fax" <+4930123456@fax.local>') == ["+4930123456"]
    assert numbers("Letter", "fax+news@example.org") == []
    assert imap_utf7("Faxe & Briefe/Büro") == "Faxe &- Briefe/B&APw-ro"


async def test_imap_intake_end_to_end(tmp_path: Path, dovecot: Dovecot) -> None:
    # Already waiting when mailfax starts: found by the first scan.
    await append(dovecot, fax_mail("Fax +49 30 123456"))
    settings = intake_settings(tmp_path, dovecot, idle_seconds=120)
    async with running(settings) as app:
        service = Service(app)
        jobs = await wait_for_jobs(app, 1)
        assert jobs[0].number == "+4930123456" and jobs[0].sender == ALICE
        mail = await app.store.get_mail(jobs[0].mail_id)
        assert mail is not None and mail.client_address == "imap:INBOX"
        assert app.imap_intake is not None
        await asyncio.wait_for(app.imap_intake.connected.wait(), 30)

        # Arrives while mailfax IDLEs (idle_seconds=120: only IDLE can pick it up in time).
        await append(dovecot, fax_mail("Invoice", to="Fax <fax+4940123456@example.org>"))
        jobs = await wait_for_jobs(app, 2)
        assert {job.number for job in jobs} == {"+4930123456", "+4940123456"}

        # No number: a reply through the outbox (no relay here: the Maildir), then Rejected.
        await append(dovecot, fax_mail("Hello"))
        reply = await service.wait_for_mail(lambda m: "Fax not sent" in str(m["Subject"]),
                                            timeout=30)
        assert reply["To"] == ALICE and reply["Auto-Submitted"] == "auto-replied"
        assert "names no fax number" in reply.get_payload()
        # A bad number: the reason in the reply.
        await append(dovecot, fax_mail("Fax 0301"))
        bad = await service.wait_for_mail(lambda m: "Fax 0301" in str(m["Subject"]), timeout=30)
        assert "0301" in bad.get_payload()
        # A sender the policy does not allow: Rejected, and no reply (no backscatter).
        await append(dovecot, fax_mail("Fax +49 30 123456", sender="mallory@example.net"))

        await dovecot.wait_for(FAX, "Rejected", count=3)
        processed = await dovecot.wait_for(FAX, "Processed", count=2)
        assert {str(message["Subject"]) for message in processed} == {
            "Fax +49 30 123456", "Invoice"}
        assert await count(dovecot, "INBOX") == 0
        assert len(await app.store.list_jobs()) == 2
        assert not [m for m in service.outbox_messages() if "mallory" in str(m["To"])]


async def test_imap_intake_keeps_the_mail_until_the_job_is_stored_and_never_faxes_twice(
        tmp_path: Path, dovecot: Dovecot, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = intake_settings(tmp_path, dovecot, FAX2, idle_seconds=1)
    async with running(settings) as app:
        assert app.imap_intake is not None
        await asyncio.wait_for(app.imap_intake.connected.wait(), 30)
        real_accept = app.intake.accept_mail
        calls: list[str] = []

        async def failing_accept(*args: Any, **kwargs: Any) -> Any:
            calls.append("accept")
            if len(calls) == 1:
                raise RuntimeError("the store is down")
            return await real_accept(*args, **kwargs)

        real_move = ImapSession.move
        moves: list[int] = []

        async def move_losing_the_connection(session: ImapSession, uid: int, folder: str
                                             ) -> None:
            moves.append(uid)
            if len(moves) == 1:  # the jobs are stored, then the connection breaks
                raise ImapError("connection lost (test)")
            await real_move(session, uid, folder)

        monkeypatch.setattr(app.intake, "accept_mail", failing_accept)
        monkeypatch.setattr(ImapSession, "move", move_losing_the_connection)
        await append(dovecot, fax_mail("Fax 030 5551234", to=FAX2), FAX2)

        await dovecot.wait_for(FAX2, "Processed", timeout=30)
        assert calls == ["accept", "accept"]  # failed once, then stored once
        assert len(moves) == 2  # the first MOVE broke; after reconnecting, no second job
        jobs = await app.store.list_jobs()
        assert [job.number for job in jobs] == ["+49305551234"]
        assert await count(dovecot, "INBOX", FAX2) == 0


async def test_imap_intake_sets_a_mail_aside_after_it_failed_again_and_again(
        tmp_path: Path, dovecot: Dovecot, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = intake_settings(tmp_path, dovecot, FAX3, idle_seconds=1)
    async with running(settings) as app:
        assert app.imap_intake is not None
        await asyncio.wait_for(app.imap_intake.connected.wait(), 30)
        calls: list[str] = []

        async def broken_accept(*args: Any, **kwargs: Any) -> Any:
            calls.append("accept")
            raise RuntimeError("poison mail (test)")

        monkeypatch.setattr(app.intake, "accept_mail", broken_accept)
        await append(dovecot, fax_mail("Fax 030 5551234", to=FAX3), FAX3)

        await dovecot.wait_for(FAX3, "Rejected", timeout=60)
        assert len(calls) == MAX_HANDLE_FAILURES
        assert await count(dovecot, "INBOX", FAX3) == 0
        assert await app.store.list_jobs() == []
        assert app.imap_intake._failures == {}


async def proxy(listen_port: int, target_port: int) -> asyncio.Server:
    """A TCP relay to Dovecot, to switch the IMAP server 'on' during a test."""

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1",
                                                                         target_port)
        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))

    return await asyncio.start_server(handle, "127.0.0.1", listen_port)


def faxde_settings(tmp_path: Path, server: emulator.Emulator, **overrides: Any) -> Any:
    """Settings whose default account is the FAX.de emulator ``server``."""
    return make_settings(
        tmp_path, accounts={"main": {"provider": "fax.de", "account": "123456",
                                     "password": FAXDE_PASSWORD,
                                     "wsdl_url": server.wsdl_url}},
        default_account="main", **overrides)


async def test_received_fax_is_appended_to_the_shared_folder_then_deleted_at_the_provider(
        tmp_path: Path, dovecot: Dovecot, corpus: Path) -> None:
    server = await emulator.start("127.0.0.1", 0, {"password": FAXDE_PASSWORD})
    sales = server.state.add_inbound((corpus / "fax-tiff" / "fax2d.tif").read_bytes(),
                                     called_number="030 1234567", originator="+4940555123")
    imap_port = free_port()  # nothing listens here until the proxy starts
    settings = faxde_settings(
        tmp_path, server,
        inbound={"poll_seconds": 0.2, "handoff_timeout": 1.0, "from_address": FAX,
                 "routes": {"+49301234567": ["sales@example.org"]}},
        outbox={"retry_initial_seconds": 0.2, "retry_max_seconds": 1.0},
        imap_delivery={"host": "127.0.0.1", "port": imap_port, "username": FAX,
                       "password": PASSWORD, "timeout": 10,
                       "folders": {"+49 30 1234567": "Public/Faxes"}})
    relay: asyncio.Server | None = None
    try:
        async with running(settings) as app:
            in_folder_at_delete: list[int] = []
            provider = app.providers["main"]
            real_delete = provider.delete_inbound

            async def delete_inbound(fax_id: str) -> None:
                in_folder_at_delete.append(await count(dovecot, "Public/Faxes", ALICE))
                await real_delete(fax_id)

            provider.delete_inbound = delete_inbound  # type: ignore[method-assign]

            await asyncio.sleep(3)  # the IMAP server is unreachable: the fax stays
            assert server.state.deleted == []
            assert [fax.fax_id for fax in server.state.inbox] == [sales]
            assert await app.store.outbox_depth() == 1

            relay = await proxy(imap_port, dovecot.imap_port)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                if server.state.deleted:
                    break
                await asyncio.sleep(0.1)
            assert server.state.deleted == [sales]
            assert in_folder_at_delete == [1]  # the APPEND was done before the delete

            # Another user sees it in the shared folder, unread, with the PDF.
            faxes = await dovecot.wait_for(ALICE, "Public/Faxes")
            message = faxes[0]
            assert message["X-Mailfax-Fax-Id"] == str(sales)
            assert [part.get_content_type() for part in message.iter_attachments()] == [
                "application/pdf"]
            assert await count(dovecot, "INBOX") == 0  # routed by the called number
            records = await app.store.list_inbound()
            assert [record.state for record in records] == ["deleted"]
    finally:
        if relay is not None:
            relay.close()
        await server.close()


async def test_delivery_folder_is_chosen_by_account_and_fax_id(tmp_path: Path) -> None:
    """Fax ids are the provider's: two accounts may each have a fax 42, for other numbers."""
    store = SqliteStore(tmp_path / "s.sqlite3")
    await store.open()
    try:
        received = datetime(2026, 11, 24, 9, 32, tzinfo=UTC)
        for account, called in (("a", "+49301111"), ("b", "+49302222")):
            await store.add_inbound_fax(account, InboundFax("42", called, received, "", "", 1,
                                                            b"II*\0"))
        settings = ImapDeliverySettings.model_validate({
            "host": "127.0.0.1", "username": FAX, "password": PASSWORD, "folder": "Faxes",
            "folders": {"030 1111": "Faxes-A", "030 2222": "Faxes-B"}})
        sink = ImapDeliverySink(settings, MaildirSink(tmp_path / "md"), store, "DE")
        assert await sink.folder_for("42", "b") == "Faxes-B"
        assert await sink.folder_for("42", "a") == "Faxes-A"
        assert await sink.folder_for("42", "c") == "Faxes"
        await store.queue_inbound_mails("b", "42", [OutgoingMail(
            "", [ALICE], b"Subject: fax\r\n\r\nfax\r\n", kind="inbound", inbound=("b", "42"))])
        [item] = await store.due_outbox(10)
        assert item.inbound == ("b", "42")  # what deliver() passes to folder_for
    finally:
        await store.close()


async def test_routing_rules_choose_the_imap_folder_by_caller_and_station_id(
        tmp_path: Path, dovecot: Dovecot, corpus: Path) -> None:
    """[[inbound.rules]] folder: before imap_delivery.folders (by called number) and the
    default folder. A privacy-mode rule's fax goes there with its document, and its
    recipients get a notice without it through the relay (here: the outbox Maildir)."""
    server = await emulator.start("127.0.0.1", 0, {"password": FAXDE_PASSWORD})
    doctor = server.state.add_inbound((corpus / "fax-tiff" / "fax2d.tif").read_bytes(),
                                      called_number="+4930555", originator="+4940111",
                                      remote_id="PRAXIS")
    other = server.state.add_inbound((corpus / "fax-tiff" / "g3test.tif").read_bytes(),
                                     called_number="+4930555", originator="+4989222")
    settings = faxde_settings(
        tmp_path, server,
        inbound={"poll_seconds": 0.2, "handoff_timeout": 5.0, "from_address": FAX3,
                 "rules": [{"name": "doctor", "tsi": "^praxis", "caller_prefix": ["+4940"],
                            "to": [FAX3], "folder": "Routed/Health", "format": "none"},
                           {"name": "rest", "to": [FAX3]}]},
        imap_delivery={"host": "127.0.0.1", "port": dovecot.imap_port, "username": FAX3,
                       "password": PASSWORD, "timeout": 10, "folder": "Routed/Other",
                       "folders": {"+4930555": "Routed/ByNumber"}})
    try:
        async with running(settings) as app:
            [health] = await dovecot.wait_for(FAX3, "Routed/Health")
            notice = await Service(app).wait_for_mail(lambda message: True)
            [rest] = await dovecot.wait_for(FAX3, "Routed/ByNumber")
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                if len(server.state.deleted) == 2:
                    break
                await asyncio.sleep(0.1)
            assert len(Service(app).outbox_messages()) == 1  # the notice; the faxes: IMAP
        assert health["X-Mailfax-Fax-Id"] == str(doctor)
        assert [part.get_content_type() for part in health.iter_attachments()] == [
            "application/pdf"]
        parsed = email.message_from_bytes(bytes(notice), policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        assert parsed["X-Mailfax-Fax-Id"] == str(doctor) and parsed["To"] == FAX3
        assert list(parsed.iter_attachments()) == []
        body = parsed.get_body(("plain",))
        assert body is not None and "It is in the\nmail folder Routed/Health." in (
            body.get_content())
        assert rest["X-Mailfax-Fax-Id"] == str(other)
        assert [part.get_content_type() for part in rest.iter_attachments()] == [
            "application/pdf"]
        assert await count(dovecot, "Routed/Other", FAX3) == 0
        assert server.state.deleted == [doctor, other]
    finally:
        await server.close()
