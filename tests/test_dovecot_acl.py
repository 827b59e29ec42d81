"""deploy/dovecot's shared fax folders with the ACL plugin, on a real Dovecot: faxes-acl.conf and
mailfax.acl as they are (only the path of the .acl file replaced), the top folder created with
the README's doveadm line, mailfax's [imap_delivery] as the README writes it. mailfax files
faxes into Public/Faxes and creates Public/Faxes/Sales; the office group reads them, may not
file; a user outside the ACL sees nothing; Dovecot logs no error."""

from __future__ import annotations

import contextlib
import imaplib
import re
import shlex
import subprocess
import tomllib
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from mailfax.config import ImapDeliverySettings
from mailfax.imap.client import ImapError
from mailfax.imap.delivery import ImapDeliverySink
from mailfax.outbound.outbox import MaildirSink
from mailfax.providers.base import InboundFax
from mailfax.store.base import OutgoingMail
from mailfax.store.sqlite import SqliteStore
from tests.mailservers import DEPLOY_DOVECOT, PASSWORD, Dovecot, running_dovecot

pytestmark = pytest.mark.integration

README = DEPLOY_DOVECOT / "README.md"
ACL_FILE = DEPLOY_DOVECOT / "mailfax.acl"
INSTALLED_ACL = "/etc/dovecot/mailfax.acl"
FAX = "fax@example.org"  # the user of mailfax.acl and of the README's [imap_delivery]
OFFICE = "alice@example.org"
OUTSIDER = "eve@example.org"


def readme_block(language: str, after: str = "") -> str:
    text = README.read_text(encoding="utf-8")
    match = re.search(rf"{re.escape(after)}.*?```{language}\n(.*?)```", text, re.DOTALL)
    assert match, f"no ```{language} block in {README}"
    return match.group(1)


@contextlib.contextmanager
def dovecot_with_the_acl() -> Iterator[Dovecot]:
    acl_conf = (DEPLOY_DOVECOT / "faxes-acl.conf").read_text(encoding="utf-8")
    assert INSTALLED_ACL in acl_conf
    extra = acl_conf.replace(INSTALLED_ACL, "{root}/mailfax.acl")
    with running_dovecot([FAX, OFFICE, OUTSIDER], extra,
                         {OFFICE: "userdb_acl_groups=office"}) as server:
        (server.root / "mailfax.acl").write_bytes(ACL_FILE.read_bytes())
        yield server


@pytest.fixture(scope="module")
def dovecot() -> Iterator[Dovecot]:
    with dovecot_with_the_acl() as server:
        yield server


def test_the_readme_shows_the_acl_file_as_it_is() -> None:
    assert readme_block("", after="`mailfax.acl`:") == ACL_FILE.read_text(encoding="utf-8")


def login(dovecot: Dovecot, user: str) -> imaplib.IMAP4:
    connection = imaplib.IMAP4("127.0.0.1", dovecot.imap_port, timeout=30)
    connection.login(user, PASSWORD)
    return connection


def folders(dovecot: Dovecot, user: str) -> set[str]:
    connection = login(dovecot, user)
    try:
        status, lines = connection.list()
        assert status == "OK", lines
        return {line.decode().rsplit(' "/" ', 1)[1].strip('"') for line in lines
                if isinstance(line, bytes) and b"\\Noselect" not in line}
    finally:
        connection.logout()


def create_top_folder_as_documented(dovecot: Dovecot) -> None:
    """The README's doveadm lines, pointed at this Dovecot's config."""
    lines = [line for line in readme_block("sh", after="dovecot-install").splitlines()
             if line.startswith("doveadm ") and " mailbox create " in line]
    assert lines, "the README creates no folder with doveadm"
    for line in lines:
        argv = shlex.split(line)
        argv[1:1] = ["-c", str(dovecot.config)]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"{line}: {done.stderr}"


async def test_mailfax_files_faxes_the_office_reads_them_outsiders_see_nothing(
        tmp_path: Path, dovecot: Dovecot) -> None:
    # Without the doveadm line, nobody may create the top folder: the README's reason for it.
    connection = login(dovecot, FAX)
    try:
        status, reply = connection.create('"Public/Faxes"')
        assert status == "NO" and b"NOPERM" in reply[0], reply
    finally:
        connection.logout()
    create_top_folder_as_documented(dovecot)

    documented = tomllib.loads(readme_block("toml"))["imap_delivery"]
    assert documented["username"] == FAX
    settings = ImapDeliverySettings.model_validate(
        {**documented, "host": "127.0.0.1", "port": dovecot.imap_port, "password": PASSWORD})
    [(sales_number, sales_folder)] = settings.folders.items()
    assert (settings.folder, sales_folder) == ("Public/Faxes", "Public/Faxes/Sales")

    store = SqliteStore(tmp_path / "s.sqlite3")
    await store.open()
    try:
        sink = ImapDeliverySink(settings, MaildirSink(tmp_path / "md"), store, "DE")
        received = datetime(2026, 12, 1, 9, 30, tzinfo=UTC)
        for fax_id, called in (("1", "+49301111111"), ("2", sales_number)):
            await store.add_inbound_fax("a", InboundFax(fax_id, called, received, "", "", 1,
                                                        b"II*\0"))
            await store.queue_inbound_mails("a", fax_id, [OutgoingMail(
                "", [OFFICE], f"Subject: fax {fax_id}\r\n\r\nfax\r\n".encode(),
                kind="inbound", inbound=("a", fax_id))])
        for item in await store.due_outbox(10):
            await sink.deliver(item)
    finally:
        await store.close()

    assert {"Public/Faxes", "Public/Faxes/Sales"} <= folders(dovecot, OFFICE)
    assert await dovecot.wait_for(OFFICE, "Public/Faxes",
                                  lambda message: message["Subject"] == "fax 1")
    assert await dovecot.wait_for(OFFICE, "Public/Faxes/Sales",
                                  lambda message: message["Subject"] == "fax 2")
    office = login(dovecot, OFFICE)
    try:
        status, reply = office.append('"Public/Faxes"', None, None, b"Subject: x\r\n\r\nx\r\n")
        assert status == "NO" and b"NOPERM" in reply[0], reply  # reads, does not file
    finally:
        office.logout()
    assert not any(name.startswith("Public/") for name in folders(dovecot, OUTSIDER))
    assert dovecot.messages(OUTSIDER, "Public/Faxes") == []
    log = dovecot.log_text()
    assert "Error:" not in log and "Unknown ID" not in log, log[-2000:]


async def test_without_the_top_folder_mailfax_says_it_cannot_create_it(tmp_path: Path) -> None:
    """Skipping the doveadm line: once a folder below exists, Dovecot lists Public/Faxes as a
    \\Noselect parent. mailfax must not take that for the folder (every APPEND would then fail
    with TRYCREATE) but name the refusal."""
    with dovecot_with_the_acl() as server:
        connection = login(server, FAX)
        try:
            assert connection.create('"Public/Faxes/Sales"')[0] == "OK"  # k on Public/Faxes/*
        finally:
            connection.logout()
        settings = ImapDeliverySettings.model_validate(
            {"host": "127.0.0.1", "port": server.imap_port, "username": FAX,
             "password": PASSWORD, "folder": "Public/Faxes"})
        store = SqliteStore(tmp_path / "s.sqlite3")
        await store.open()
        try:
            await store.add_inbound_fax("a", InboundFax("1", "+49301111111", datetime.now(UTC),
                                                        "", "", 1, b"II*\0"))
            await store.queue_inbound_mails("a", "1", [OutgoingMail(
                "", [OFFICE], b"Subject: fax\r\n\r\nfax\r\n", kind="inbound",
                inbound=("a", "1"))])
            [item] = await store.due_outbox(10)
            sink = ImapDeliverySink(settings, MaildirSink(tmp_path / "md"), store, "DE")
            with pytest.raises(ImapError, match=r"cannot create folder Public/Faxes: .*NOPERM"):
                await sink.deliver(item)
        finally:
            await store.close()
