"""IMAP delivery of received faxes: the fax mail is APPENDed into a folder (per called number,
e.g. a shared ``Faxes`` folder) instead of being sent through the relay.

It is a :class:`~mailfax.outbound.outbox.MailSink` in front of the usual one: the outbox hands
it every mail; fax mails (the outbox knows the received fax each carries) are APPENDed, all others
(status mails, replies) go to the relay or Maildir as before. The outbox marks a mail sent
only after ``deliver`` returned, i.e. after the server answered OK to the APPEND, and the
inbound poller deletes the fax at the provider only then.
"""

from __future__ import annotations

import asyncio
import logging

from mailfax.config import ImapDeliverySettings, InboundSettings
from mailfax.imap.client import ImapError, ImapSession
from mailfax.inbound.routing import choose_route, facts_of, normalise_number
from mailfax.outbound.outbox import MailSink
from mailfax.store.base import OutboxItem, Store

log = logging.getLogger(__name__)

class ImapDeliverySink(MailSink):
    def __init__(self, settings: ImapDeliverySettings, fallback: MailSink, store: Store,
                 default_country: str, inbound: InboundSettings | None = None):
        self.settings = settings
        self.inbound = inbound  # its rules' ``folder`` comes before ``folders``
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

    async def folder_for(self, fax_id: str, account: str) -> str:
        """The folder for ``account``'s fax ``fax_id``: its routing rule's ``folder``, else the
        one for its called number, else the default (fax ids are the provider's, so two
        accounts may each have one with the same id)."""
        for record in await self.store.find_inbound(fax_id):
            if record.account != account:
                continue
            if self.inbound is not None:
                rule = choose_route(facts_of(record), self.inbound,
                                    self.default_country).rule
                if rule.folder:
                    return rule.folder
            called = normalise_number(record.called_number, self.default_country)
            if called in self.folders:
                return self.folders[called]
        return self.settings.folder

    async def deliver(self, item: OutboxItem) -> None:
        if item.inbound is None:
            await self.fallback.deliver(item)
            return
        account, fax_id = item.inbound
        folder = await self.folder_for(fax_id, account)
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
