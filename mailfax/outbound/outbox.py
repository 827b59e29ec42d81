"""The outbox sender: delivers queued mails to the relay (aiosmtplib) or into a Maildir.

A mail leaves the outbox table only once the relay accepted it or the Maildir file is synced
to disk; until then it is retried with backoff, across relay outages and restarts. With several
instances on one store, each mail is leased to the instance that delivers it
(``claim_outbox``). An instance that dies after the hand-off but before recording it leaves
the mail to be delivered again; into a Maildir that is harmless, as the file name is made from
the outbox item (id and content), so the second delivery replaces the first file.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import secrets
import time
from abc import ABC, abstractmethod
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from mailfax.config import RelaySettings
from mailfax.outbound.dispatch import retry_delay
from mailfax.store.base import OutboxItem, Store
from mailfax.support.lazy import lazy_module
from mailfax.support.waiting import wait_for_event

if TYPE_CHECKING:
    import aiosmtplib
else:  # the first mail to the relay loads it, not serve's start-up
    aiosmtplib = lazy_module("aiosmtplib")

log = logging.getLogger(__name__)

OUTBOX_LEASE_SECONDS = 30.0
# Mails hold faxes and addresses: the owner writes, its group (a mail reader such as
# Dovecot, if put in it) may read, nobody else.
MAILDIR_FILE_MODE = 0o640
MAILDIR_FOLDER_MODE = 0o750


class PermanentRefusal(Exception):
    """The relay refused the mail for good (5xx); retrying will not help."""


class MailSink(ABC):
    @abstractmethod
    async def deliver(self, item: OutboxItem) -> None:
        """Hand one mail off; raise on failure (PermanentRefusal when it is final)."""

    def describe(self) -> str:
        return type(self).__name__


class MaildirSink(MailSink):
    def __init__(self, path: Path):
        self.path = path

    def describe(self) -> str:
        return f"Maildir {self.path}"

    async def deliver(self, item: OutboxItem) -> None:
        await asyncio.to_thread(self._write, item)

    @staticmethod
    def file_name(item: OutboxItem) -> str:
        """The same name for every delivery of one outbox item, by any instance."""
        return f"mailfax-{item.id}-{hashlib.sha256(item.message).hexdigest()[:24]}"

    def _write(self, item: OutboxItem) -> None:
        for folder in ("tmp", "new", "cur"):
            (self.path / folder).mkdir(MAILDIR_FOLDER_MODE, parents=True, exist_ok=True)
        name = self.file_name(item)
        target = self.path / "new" / name
        temporary = self.path / "tmp" / f"{name}.{os.getpid()}.{secrets.token_hex(4)}"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, MAILDIR_FILE_MODE)
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), MAILDIR_FILE_MODE)  # whatever the umask
            handle.write(item.message)
            handle.flush()
            # A mail counts as handed off only once it is on disk.
            os.fsync(handle.fileno())
        os.replace(temporary, target)  # a second delivery of the same item replaces the first
        directory = os.open(self.path / "new", os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


class RelaySink(MailSink):
    def __init__(self, settings: RelaySettings, local_hostname: str):
        self.settings = settings
        self.local_hostname = local_hostname

    def describe(self) -> str:
        return f"SMTP relay {self.settings.host}:{self.settings.port} (TLS: {self.settings.tls})"

    async def deliver(self, item: OutboxItem) -> None:
        settings = self.settings
        # Not aiosmtplib.send(): it refuses the null sender <> that status mails and bounces
        # must use.
        client = aiosmtplib.SMTP(
            hostname=settings.host, port=settings.port, local_hostname=self.local_hostname,
            use_tls=settings.tls == "implicit", start_tls=settings.tls == "starttls",
            username=settings.username,
            password=settings.password.get_secret_value() if settings.password else None,
            timeout=settings.timeout)
        try:
            async with client:
                await client.sendmail(item.envelope_from, item.recipients, item.message,
                                      mail_options=_mail_options(item))
        except aiosmtplib.SMTPNotSupported as error:
            # An internationalised address, and a relay without SMTPUTF8: RFC 6531 has no
            # downgrade, so waiting cannot help (Postfix would bounce it too).
            raise PermanentRefusal(f"{error} (the relay needs SMTPUTF8)") from None
        except aiosmtplib.SMTPRecipientsRefused as error:
            codes = [r.code for r in error.recipients]
            if codes and all(500 <= code < 600 for code in codes):
                raise PermanentRefusal(str(error)) from None
            raise
        except aiosmtplib.SMTPResponseException as error:
            if 500 <= error.code < 600 and error.code != 530:
                raise PermanentRefusal(f"{error.code} {error.message}") from None
            raise


def _mail_options(item: OutboxItem) -> list[str]:
    """SMTPUTF8 for mail to an internationalised address (a status mail to an SMTPUTF8
    sender); aiosmtplib adds SIZE and BODY=8BITMIME by itself."""
    addresses = [item.envelope_from, *item.recipients]
    return [] if all(address.isascii() for address in addresses) else ["SMTPUTF8"]


class OutboxSender:
    def __init__(self, store: Store, sink: MailSink, *, retry_initial: float = 10.0,
                 retry_max: float = 1800.0, poll_seconds: float = 30.0,
                 owner: str = "mailfax"):
        self.owner = owner
        self.store = store
        self.sink = sink
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self.poll_seconds = poll_seconds
        self._wake = asyncio.Event()

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        while True:
            self._wake.clear()
            sent = await self.send_due()
            if sent:
                continue
            due = await self.store.outbox_next_due()
            timeout = self.poll_seconds
            if due is not None:
                timeout = min(timeout, max(0.05, (due - datetime.now(UTC)).total_seconds()))
            await wait_for_event(self._wake, timeout)

    async def send_due(self, limit: int = 50) -> int:
        """Deliver what is due; returns how many were handed off."""
        items = await self.store.claim_outbox(self.owner, limit, OUTBOX_LEASE_SECONDS)
        deadline = time.monotonic() + OUTBOX_LEASE_SECONDS / 2
        delivered = 0
        for item in items:
            if time.monotonic() > deadline:
                break  # the rest stay leased to us and come back with the next claim
            if await self._deliver(item):
                delivered += 1
        return delivered

    async def _deliver(self, item: OutboxItem) -> bool:
        try:
            await self.sink.deliver(item)
        except PermanentRefusal as error:
            log.error("outbox mail %d refused for good by %s: %s", item.id,
                      self.sink.describe(), error)
            await self.store.outbox_give_up(item.id, str(error))
            return False
        except Exception as error:
            delay = retry_delay(item.attempts + 1, self.retry_initial, self.retry_max)
            log.warning("outbox mail %d not delivered (%s: %s); retry in %.0f s", item.id,
                        type(error).__name__, error, delay)
            await self.store.outbox_retry(item.id, datetime.now(UTC) + timedelta(seconds=delay),
                                          f"{type(error).__name__}: {error}")
            return False
        await self.store.outbox_sent(item.id)
        return True
