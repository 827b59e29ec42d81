"""Received faxes: stored first, mailed as PDF to the route's owners, deleted at the provider
only after the mail was handed off."""

from __future__ import annotations

import asyncio
import email
import email.policy
import io
import logging
import mailbox
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest
from PIL import Image

from mailfax.app import inbound_mailer
from mailfax.inbound.mailer import prepare_files
from mailfax.inbound.poller import InboundPoller
from mailfax.inbound.routing import recipients_for
from mailfax.outbound.outbox import MaildirSink, MailSink, OutboxSender, PermanentRefusal
from mailfax.providers.base import BaseProvider, InboundFax, ProviderContext
from mailfax.store.base import OutboxItem
from mailfax.store.sqlite import SqliteStore
from tests.conftest import make_settings

ROUTES = {"+49 30 1234567": ["sales@example.org", "boss@example.org"]}


def test_a_routed_number_goes_to_its_owners_in_any_spelling() -> None:
    assert recipients_for("0301234567", ROUTES, [], "pm@x", "DE") == [
        "sales@example.org", "boss@example.org"]
    assert recipients_for("+49301234567", ROUTES, [], "pm@x", "DE") == [
        "sales@example.org", "boss@example.org"]


def test_unrouted_number_goes_to_the_default_route_else_the_postmaster() -> None:
    assert recipients_for("+4940999", ROUTES, ["office@example.org"], "pm@x", "DE") == [
        "office@example.org"]
    assert recipients_for("+4940999", ROUTES, [], "pm@x", "DE") == ["pm@x"]
    assert recipients_for("", {}, [], "pm@x", "DE") == ["pm@x"]


def test_preview_takes_the_page_resolution_of_the_pdf() -> None:
    # 1×1 dpi is a placeholder (below MIN_DPI): the page counts as fine mode, 204×196 dpi,
    # so the preview is stretched to square pixels like the PDF page.
    out = io.BytesIO()
    Image.new("1", (1728, 1000), 1).save(out, format="TIFF", compression="group4", dpi=(1, 1))
    files = prepare_files(out.getvalue())
    assert files.preview_png is not None
    with Image.open(io.BytesIO(files.preview_png)) as preview:
        assert preview.size == (480, round(1000 * 204 / 196 * 480 / 1728))


@dataclass
class FakeInbox(BaseProvider):
    """Behaves like FAX.de: hands out the oldest fax until it is deleted."""

    faxes: list[InboundFax] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    fail_next_delete: bool = False
    provider_name: str = "fake"
    supports_inbound: bool = True

    def __post_init__(self) -> None:
        super().__init__(ProviderContext(account="inbox", data_dir=Path(".")))

    async def fetch_inbound(self) -> InboundFax | None:
        return self.faxes[0] if self.faxes else None

    async def delete_inbound(self, fax_id: str) -> None:
        if self.fail_next_delete:
            self.fail_next_delete = False
            raise ConnectionError("connection lost before DeleteReceived answered")
        self.deleted.append(fax_id)
        self.faxes = [fax for fax in self.faxes if fax.fax_id != fax_id]


class FlakySink(MailSink):
    def __init__(self, inner: MailSink):
        self.inner = inner
        self.down = False
        self.refuse = False

    async def deliver(self, item: OutboxItem) -> None:
        if self.down:
            raise ConnectionRefusedError("relay down")
        if self.refuse:
            raise PermanentRefusal("550 5.7.1 recipient refused")
        await self.inner.deliver(item)


def fax(corpus: Path, name: str, fax_id: str, called: str = "+49301234567",
        originator: str = "+49 40 555123", remote_id: str = "Muster GmbH") -> InboundFax:
    image = (corpus / "fax-tiff" / name).read_bytes()
    return InboundFax(fax_id=fax_id, called_number=called,
                      received_at=datetime(2026, 11, 24, 9, 32, tzinfo=UTC),
                      originator=originator, remote_id=remote_id, pages=1, image=image)


@dataclass
class Rig:
    store: SqliteStore
    inbox: FakeInbox
    sink: FlakySink
    outbox: OutboxSender
    poller: InboundPoller
    maildir: Path

    def mails(self) -> list[email.message.EmailMessage]:
        if not self.maildir.exists():
            return []
        return [email.message_from_bytes(bytes(m), policy=email.policy.default)  # type: ignore[misc]
                for m in mailbox.Maildir(self.maildir, create=False)]


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    settings = make_settings(tmp_path, inbound={
        "routes": ROUTES, "postmaster": "postmaster@example.org",
        "from_address": "fax@example.org", "handoff_timeout": 1.0})
    store = SqliteStore(tmp_path / "s.sqlite3")
    await store.open()
    maildir = tmp_path / "outbox"
    sink = FlakySink(MaildirSink(maildir))
    outbox = OutboxSender(store, sink, retry_initial=0.05, retry_max=0.1)
    inbox = FakeInbox()
    poller = InboundPoller("inbox", inbox, store, settings.inbound, inbound_mailer(settings),
                           "DE", wake_outbox=outbox.wake)
    task = asyncio.create_task(outbox.run())
    try:
        yield Rig(store, inbox, sink, outbox, poller, maildir)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await store.close()


async def test_fax_is_mailed_as_pdf_to_its_route_then_deleted(rig: Rig, corpus: Path) -> None:
    rig.inbox.faxes = [fax(corpus, "fax2d.tif", "1001"), fax(corpus, "g4-multi.tiff", "1002",
                                                             called="+4940999")]
    assert await rig.poller.poll_once() == 2
    assert rig.inbox.deleted == ["1001", "1002"]
    mails = {m["X-Mailfax-Fax-Id"]: m for m in rig.mails()}
    first = mails["1001"]
    assert first["To"] == "sales@example.org, boss@example.org"
    assert first["Subject"] == "Fax from +49 40 555123 (Muster GmbH), 1 page"
    [attachment] = list(first.iter_attachments())
    assert attachment.get_filename() == "fax-2026-11-24-1032-from-4940555123.pdf"
    assert attachment.get_content().startswith(b"%PDF")
    html = first.get_body(("html",))
    assert html is not None and 'src="cid:page1"' in html.get_content()
    assert any(part.get_content_type() == "image/png" for part in first.walk())
    assert mails["1002"]["To"] == "postmaster@example.org"
    assert "3 pages" in mails["1002"]["Subject"]
    assert [f.state for f in await rig.store.list_inbound()] == ["deleted", "deleted"]


async def test_relay_outage_keeps_the_fax_at_the_provider_until_the_mail_left(
        rig: Rig, corpus: Path) -> None:
    rig.sink.down = True
    rig.inbox.faxes = [fax(corpus, "fax2d.tif", "2001")]
    assert await rig.poller.poll_once() == 0
    assert rig.inbox.deleted == []
    assert [f.state for f in await rig.store.list_inbound()] == ["queued"]
    assert await rig.poller.poll_once() == 0  # the same fax again: no second mail queued
    assert await rig.store.outbox_depth() == 1
    rig.sink.down = False
    assert await rig.poller.poll_once() == 1
    assert rig.inbox.deleted == ["2001"]
    assert len(rig.mails()) == 1


async def test_crash_between_mail_and_delete_gives_one_mail_and_a_deleted_fax(
        rig: Rig, corpus: Path) -> None:
    rig.inbox.faxes = [fax(corpus, "g3test.tif", "3001")]
    rig.inbox.fail_next_delete = True
    with pytest.raises(ConnectionError):
        await rig.poller.poll_once()
    assert rig.inbox.faxes and rig.inbox.deleted == []
    assert await rig.poller.poll_once() == 1  # fetched again: already mailed, so only deleted
    assert rig.inbox.deleted == ["3001"]
    assert len(rig.mails()) == 1


async def test_undecodable_fax_is_still_delivered_as_the_raw_file(
        rig: Rig, corpus: Path) -> None:
    hostile = InboundFax(fax_id="4001", called_number="+49301234567",
                         received_at=datetime(2026, 11, 24, 9, 32, tzinfo=UTC), originator="",
                         remote_id="", pages=1, image=(corpus / "fax-tiff" / "hostile" /
                                                        "crash-2020-10-test.tif").read_bytes())
    rig.inbox.faxes = [hostile]
    assert await rig.poller.poll_once() == 1
    [mail] = rig.mails()
    [attachment] = list(mail.iter_attachments())
    assert attachment.get_content_type() == "image/tiff"
    assert attachment.get_content() == hostile.image
    body = mail.get_body(("plain",))
    assert body is not None and "could not be converted" in body.get_content()


async def test_values_from_the_fax_network_cannot_inject_headers(
        rig: Rig, corpus: Path) -> None:
    evil = fax(corpus, "fax2d.tif", "5001", originator="+4940555\r\nBcc: victim@example.org",
               remote_id="{{ 7*7 }}\r\nX-Evil: 1")
    rig.inbox.faxes = [evil]
    await rig.poller.poll_once()
    [mail] = rig.mails()
    assert mail["Bcc"] is None and mail["X-Evil"] is None
    assert "{{ 7*7 }}" in mail["Subject"]


async def test_refused_mail_keeps_the_fax_and_does_not_wait_for_the_handoff(
        rig: Rig, corpus: Path, caplog: pytest.LogCaptureFixture) -> None:
    rig.poller.settings = rig.poller.settings.model_copy(update={"handoff_timeout": 30.0})
    rig.sink.refuse = True
    rig.inbox.faxes = [fax(corpus, "fax2d.tif", "6001"), fax(corpus, "g3test.tif", "6002")]
    started = time.monotonic()
    with caplog.at_level(logging.ERROR, logger="mailfax.inbound.poller"):
        assert await rig.poller.poll_once() == 0
    assert time.monotonic() - started < 10  # not the 30 s handoff timeout
    assert rig.inbox.deleted == [] and len(rig.inbox.faxes) == 2  # nothing lost
    assert "mailfax redeliver 6001" in caplog.text
    assert [(f.fax_id, f.state) for f in await rig.store.list_inbound()] == [("6001", "queued")]
    assert await rig.poller.poll_once() == 0  # fetched again: still kept, no second mail
    assert rig.inbox.deleted == [] and rig.mails() == []


async def test_redelivery_after_a_refused_mail_lets_the_fax_be_deleted(
        rig: Rig, corpus: Path) -> None:
    rig.sink.refuse = True
    rig.inbox.faxes = [fax(corpus, "fax2d.tif", "7001"), fax(corpus, "g3test.tif", "7002")]
    assert await rig.poller.poll_once() == 0
    assert rig.inbox.deleted == []
    rig.sink.refuse = False
    [record] = await rig.store.find_inbound("7001")
    await rig.poller.queue_mail(record)  # what 'mailfax redeliver 7001' does
    rig.outbox.wake()
    assert await rig.poller.poll_once() == 2  # the failed first mail no longer blocks
    assert rig.inbox.deleted == ["7001", "7002"]
    assert sorted(m["X-Mailfax-Fax-Id"] for m in rig.mails()) == ["7001", "7002"]


async def test_the_stored_page_count_is_the_faxs_own_not_the_providers(rig: Rig) -> None:
    """A provider that reports 1 page for a 3-page TIFF: ``mailfax inbox`` shows 3."""
    from mailfax.emulators.fax_image import sample_fax

    rig.inbox.faxes = [InboundFax(fax_id="8001", called_number="+49301234567",
                                  received_at=datetime(2026, 11, 24, 9, 32, tzinfo=UTC),
                                  originator="", remote_id="", pages=1,
                                  image=sample_fax("+49301234567", pages=3))]
    assert await rig.poller.poll_once() == 1
    [stored] = await rig.store.list_inbound()
    assert (stored.pages, stored.state) == (3, "deleted")
    await rig.poller.queue_mail(stored)  # what 'mailfax redeliver 8001' does
    [again] = await rig.store.list_inbound()
    assert (again.pages, again.state, again.deliveries) == (3, "deleted", 2)
