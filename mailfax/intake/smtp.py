"""The SMTP and LMTP edge: translates between SMTP and :class:`~mailfax.intake.service.Intake`.

The aiosmtpd protocol machine runs on mailfax's own event loop (no Controller thread).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any

from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP, Envelope, Session

from mailfax.config import ListenAddress, SmtpSettings
from mailfax.intake.assemble import Refusal
from mailfax.intake.service import Intake

log = logging.getLogger(__name__)


class FaxHandler:
    """aiosmtpd handler hooks."""

    def __init__(self, intake: Intake, max_recipients: int):
        self.intake = intake
        self.max_recipients = max_recipients

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, mail_options: list[str]) -> str:
        try:
            self.intake.check_sender(address, _client_ip(session))
        except Refusal as refusal:
            log.info("refused sender <%s> from %s: %s", address, session.peer, refusal.sentence)
            return refusal.reply()
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        if len(envelope.rcpt_tos) >= self.max_recipients:
            return f"452 4.5.3 Too many recipients (at most {self.max_recipients} per mail)"
        try:
            fax = self.intake.check_recipient(address)
        except Refusal as refusal:
            log.info("refused recipient <%s>: %s", address, refusal.sentence)
            return refusal.reply()
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return f"250 2.1.5 OK, fax to {fax.number}"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or envelope.content or b""
        if isinstance(raw, str):
            raw = raw.encode("utf-8", "surrogateescape")
        recipients = list(envelope.rcpt_tos)
        per_recipient = isinstance(server, LMTP)
        try:
            accepted = await self.intake.accept_mail(
                envelope.mail_from or "", recipients, raw, _client_ip(session) or "")
        except Refusal as refusal:
            log.info("refused mail from <%s>: %s", envelope.mail_from, refusal.sentence)
            return _for_each(recipients, refusal.reply(), per_recipient)
        except Exception:
            log.exception("could not store mail from <%s>", envelope.mail_from)
            reply = "451 4.3.0 Temporary failure storing the fax job; please try again later"
            return _for_each(recipients, reply, per_recipient)
        if not per_recipient:
            return f"250 2.0.0 queued as {' '.join(accepted.job_ids)}"
        # LMTP (RFC 2033): one reply per accepted recipient, in RCPT order.
        replies = []
        for address in recipients:
            number = self.intake.check_recipient(address).number
            replies.append(f"250 2.0.0 <{address}> queued as {accepted.job_for_number[number]}")
        return "\r\n".join(replies)


def _for_each(recipients: list[str], reply: str, per_recipient: bool) -> str:
    """SMTP answers DATA once; LMTP once per recipient (RFC 2033 §4.2)."""
    if not per_recipient:
        return reply
    return "\r\n".join([reply] * max(1, len(recipients)))


def _client_ip(session: Session) -> str | None:
    peer = session.peer
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return None


async def start_listeners(intake: Intake, settings: SmtpSettings) -> list[asyncio.Server]:
    """Start the SMTP (and LMTP) listeners on the running loop."""
    handler = FaxHandler(intake, settings.max_recipients)
    loop = asyncio.get_running_loop()
    servers = []
    options: dict[str, Any] = {
        "data_size_limit": settings.max_message_size,
        "enable_SMTPUTF8": True,
        "decode_data": False,
        "hostname": settings.hostname,
        "ident": "mailfax",
        "timeout": settings.data_timeout,
    }
    listeners: list[tuple[str, type[SMTP]]] = [
        *((listen, SMTP) for listen in settings.listen),
        *((listen, LMTP) for listen in settings.lmtp_listen),
    ]
    for listen, protocol in listeners:
        address = ListenAddress(listen)
        server = await loop.create_server(
            functools.partial(protocol, handler, loop=loop, **options),
            host=address.host, port=address.port)
        servers.append(server)
    return servers
