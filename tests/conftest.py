"""Shared fixtures: the corpus, settings in a temp folder, and the whole service on loopback."""

from __future__ import annotations

import asyncio
import json
import mailbox
import time
from collections.abc import AsyncIterator, Callable
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from mailfax.app import Application
from mailfax.config import Settings
from tests.fixtures.build import build_corpus
from tests.fixtures.locate import find_corpus

# The real-world corpus: $MAILFAX_CORPUS, else ../shared/corpus beside the repository (or beside
# the main checkout of a git worktree). Without it the tests use a stand-in they make themselves
# (tests/fixtures/build.py): same layout and names, files made to have the same properties.
CORPUS = find_corpus()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "every_corpus: run a test that takes `corpus` against the real corpus and "
        "against the generated stand-in (when the real one is there; else the stand-in only)")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if (CORPUS is not None and "corpus" in metafunc.fixturenames
            and metafunc.definition.get_closest_marker("every_corpus")):
        metafunc.parametrize("corpus", ["real", "generated"], indirect=True, scope="session")


@pytest.fixture(scope="session")
def generated_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The stand-in corpus, written once per test session."""
    return build_corpus(tmp_path_factory.mktemp("generated-corpus"))


@pytest.fixture(scope="session")
def corpus(request: pytest.FixtureRequest) -> Path:
    """The real corpus when there is one, else the generated stand-in (both with a marker:
    the one ``request.param`` names)."""
    wanted = getattr(request, "param", "real" if CORPUS is not None else "generated")
    if wanted == "real" and CORPUS is not None:
        return CORPUS
    generated: Path = request.getfixturevalue("generated_corpus")
    return generated


@pytest.fixture(scope="session")
def expected(corpus: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((corpus / "expected.json").read_text())
    return data


@pytest.fixture
def documents_read(monkeypatch: pytest.MonkeyPatch) -> list[type]:
    """The type of each document a send request read piece by piece as it went out
    (providers.upload): a DocumentMap was sent from its file."""
    from mailfax.providers import upload

    read: list[type] = []
    pieces = upload.pieces

    def recorded(data: Any, size: int) -> Any:
        read.append(type(data))
        return pieces(data, size)

    monkeypatch.setattr(upload, "pieces", recorded)
    return read


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    raw: dict[str, Any] = {
        "data_dir": str(tmp_path / "data"),
        "smtp": {"listen": ["127.0.0.1:0"]},
        "dispatch": {"status_poll_seconds": 0.5, "retry_initial_seconds": 0.2,
                     "retry_max_seconds": 1.0},
        "accounts": {"emulator": {"provider": "emulator", "delay_seconds": 0.3,
                                  "seconds_per_page": 20}},
        "notify": {"from_address": "fax@mailfax.test"},
        "inbound": {"ocr": "off"},  # OCR takes seconds a page; tests that want it turn it on
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return Settings.model_validate(raw)


class Service:
    """The whole of mailfax running in this process, with helpers to talk to it."""

    def __init__(self, app: Application):
        self.app = app

    @property
    def port(self) -> int:
        port: int = self.app.smtp_servers[0].sockets[0].getsockname()[1]
        return port

    @property
    def maildir(self) -> Path:
        return self.app.settings.maildir_path

    async def send(self, message: EmailMessage | bytes, sender: str, recipients: list[str]
                   ) -> tuple[dict[str, Any], str]:
        return await aiosmtplib.send(message, sender=sender, recipients=recipients,
                                     hostname="127.0.0.1", port=self.port, timeout=30)

    async def fax_pdf(self, pdf: bytes, number: str = "004930123456",
                      filename: str = "offer.pdf") -> str:
        """Mail ``pdf`` from alice to ``<number>@fax.local`` as a user does; the SMTP reply."""
        to = f"{number}@fax.local"
        mail = fax_mail([(filename, pdf, "application/pdf")], to=to)
        _, reply = await self.send(mail, "alice@example.org", [to])
        return reply

    def outbox_messages(self) -> list[mailbox.MaildirMessage]:
        if not (self.maildir / "cur").exists():  # (not yet, or half made: new/ before cur/)
            return []
        return list(mailbox.Maildir(self.maildir, create=False))

    async def wait_for_mail(self, predicate: Callable[[mailbox.MaildirMessage], bool],
                            timeout: float = 20.0) -> mailbox.MaildirMessage:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for message in self.outbox_messages():
                if predicate(message):
                    return message
            await asyncio.sleep(0.1)
        raise AssertionError(f"no matching mail in {self.maildir} within {timeout} s")


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[Service]:
    app = Application(make_settings(tmp_path))
    await app.start()
    try:
        yield Service(app)
    finally:
        await app.stop()


def fax_mail(attachments: list[tuple[str, bytes, str]], *, sender: str = "alice@example.org",
             to: str = "030123456@fax.local", subject: str = "Letter",
             body: str = "Please fax this.") -> EmailMessage:
    message = EmailMessage()
    message["From"] = sender
    message["To"] = to
    message["Subject"] = subject
    message["Message-ID"] = make_msgid(domain="example.org")
    message.set_content(body)
    for filename, data, content_type in attachments:
        maintype, subtype = content_type.split("/")
        message.add_attachment(data, maintype=maintype, subtype=subtype, filename=filename)
    return message
