"""IMAP delivery of received faxes: the fax mail is APPENDed into a folder (per called number,
e.g. a shared ``Faxes`` folder) instead of being sent through the relay.

It is a :class:`~mailfax.outbox.MailSink` in front of the usual one: the outbox hands it every
mail; fax mails (they carry ``X-Mailfax-Fax-Id``) are APPENDed, all others (status mails,
replies) go to the relay or Maildir as before. The outbox marks a mail sent only after
``deliver`` returned, i.e. after the server answered OK to the APPEND, and the inbound poller
deletes the fax at the provider only then.
"""

from __future__ import annotations

import asyncio
import logging
from email.parser import BytesHeaderParser

from mailfax.config import ImapDeliverySettings
from mailfax.imap.client import ImapError, ImapSession
from mailfax.inbound.routing import normalise_number
from mailfax.outbox import MailSink
from mailfax.store.base import OutboxItem, Store

log = logging.getLogger(__name__)

FAX_ID_HEADER = "X-Mailfax-Fax-Id"
ACCOUNT_HEADER = "X-Mailfax-Account"  # mails queued before it existed lack it


def fax_id_of(message: bytes) -> str | None:
    """The received fax a mail carries, from its header (None for every other mail)."""
    return _header(message, FAX_ID_HEADER)


def account_of(message: bytes) -> str | None:
    """The provider account that received the fax a mail carries, from its header."""
    return _header(message, ACCOUNT_HEADER)


def _header(message: bytes, name: str) -> str | None:
    if name.lower().encode() not in message[:65536].lower():
        return None
    value = BytesHeaderParser().parsebytes(message).get(name)
    return str(value).strip() if value else None


class ImapDeliverySink(MailSink):
    def __init__(self, settings: ImapDeliverySettings, fallback: MailSink, store: Store,
                 default_country: str):
        self.settings = settings
        self.fallback = fallback
        self.store = store
        self.default_country = default_country
        self.folders = {normalise_number(number, default_country): folder
                        for number, folder in settings.folders.items()}
        self._created: set[str] = set()
        self._lock = asyncio.Lock()

    def describe(self) -> str:
        settings = self.settings
        return (f"IMAP {settings.username}@{settings.host}:{settings.port} for received faxes "
                f"(folder {settings.folder}), otherwise {self.fallback.describe()}")

    async def folder_for(self, fax_id: str, account: str | None = None) -> str:
        """The folder for the fax's called number. Fax ids are the provider's, so two accounts
        may share one: with ``account`` only that account's fax counts (without it, as for
        mails queued before they named it, the first fax with that id)."""
        for record in await self.store.find_inbound(fax_id):
            if account is not None and record.account != account:
                continue
            called = normalise_number(record.called_number, self.default_country)
            if called in self.folders:
                return self.folders[called]
        return self.settings.folder

    async def deliver(self, item: OutboxItem) -> None:
        fax_id = fax_id_of(item.message)
        if fax_id is None:
            await self.fallback.deliver(item)
            return
        folder = await self.folder_for(fax_id, account_of(item.message))
        async with self._lock:  # one APPEND at a time: received faxes are few and large
            session = await ImapSession.open(self.settings)
            try:
                if self.settings.create_folders and folder not in self._created:
                    await session.ensure_folder(folder)
                    self._created.add(folder)
                uid = await session.append(item.message, folder)
            except ImapError:
                self._created.discard(folder)
                raise
            finally:
                await session.close()
        log.info("fax %s appended to %s on %s%s", fax_id, folder, self.settings.host,
                 f" (UID {uid})" if uid else "")
