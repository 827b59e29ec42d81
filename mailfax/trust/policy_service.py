"""A Postfix SMTP Access Policy Delegation service (Postfix's SMTPD_POLICY_README).

Postfix in front of mailfax asks it with ``check_policy_service inet:127.0.0.1:10040`` for
every recipient in the fax domains (deploy/postfix/main.cf). A request is ``name=value``
lines ended by an empty line; the answer is one ``action=…`` line and an empty line, any
action of Postfix's access(5) tables. mailfax answers with the verdicts of its own RCPT stage
(:meth:`Intake.check_sender`, :meth:`Intake.check_rcpt`), using the real client address and
the SASL login that Postfix knows:

- a refusal: ``550 5.1.1 <mailfax's sentence>`` (the code and status mailfax itself would
  reply), a quota: ``DEFER_IF_PERMIT 4.7.1 <sentence>``;
- yes for a logged-in user: ``PREPEND X-Mailfax-Authorized: …`` (trust/authorization.py), so
  the user reaches the job; Postfix's restriction class then permits (permit_sasl_authenticated);
- yes for a trusted network: ``DUNNO`` (Postfix's permit_mynetworks decides);
- ``postmaster@<fax domain>``: ``OK`` (RFC 5321 §4.5.1), forwarded by intake;
- anything else (other domains, other protocol states): ``DUNNO``.

Counted against quotas are the recipients answered yes in the same Postfix transaction
(``instance``); the jobs themselves count when intake stores them. The parsing and answering
are pure; :func:`start_policy_service` is the asyncio server. On trouble (the store cannot
be asked) the service, as the protocol asks, sends no answer and closes the connection;
Postfix then applies its smtpd_policy_service_default_action (451 4.3.5).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from mailfax.intake.assemble import Refusal
from mailfax.intake.service import Intake
from mailfax.trust.authorization import HEADER, header_value
from mailfax.trust.policy import is_fax_domain, split_address

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 64 * 1024  # Postfix's requests are well under 2 KiB
DUNNO = "DUNNO"


class BadRequest(Exception):
    """Not a policy request; the connection is closed without an answer."""


def parse_request(block: bytes) -> dict[str, str]:
    """``name=value`` lines (without the ending empty line) → attributes.

    A name sent twice keeps its first value (the README allows either).
    """
    attributes: dict[str, str] = {}
    for raw_line in block.split(b"\n"):
        line = raw_line.rstrip(b"\r")
        if not line:
            continue
        name, equals, value = line.partition(b"=")
        if not equals or not name:
            raise BadRequest(f"not a name=value line: {line[:80]!r}")
        attributes.setdefault(name.decode("utf-8", "replace"), value.decode("utf-8", "replace"))
    if "request" not in attributes:
        raise BadRequest("no request attribute")
    return attributes


def format_answer(action: str) -> bytes:
    """``action=…`` and the empty line; a line break in ``action`` would end it early."""
    single_line = " ".join(action.split())
    return f"action={single_line}\n\n".encode()


def refusal_action(refusal: Refusal) -> str:
    """mailfax's own reply as a Postfix action: permanent with its code and status, temporary
    (quotas) as DEFER_IF_PERMIT, so a permanent refusal by a later restriction still wins."""
    reply = refusal.reply()  # one line of printable text
    if 400 <= refusal.code < 500:
        return f"DEFER_IF_PERMIT {reply.split(' ', 1)[1]}"
    return reply


@dataclass
class Transaction:
    """What one policy connection remembers about the mail Postfix is receiving: its
    ``instance``, the recipients answered yes so far, and the stored counts once read."""

    instance: str = ""
    accepted: int = 0
    usage: dict[str, int] = field(default_factory=dict)

    def follow(self, instance: str) -> None:
        """A different instance means the previous mail was completed or aborted."""
        if instance != self.instance or not instance:
            self.instance, self.accepted, self.usage = instance, 0, {}


class PolicyDecider:
    """The answer to one request, from intake's RCPT-stage checks."""

    def __init__(self, intake: Intake, secret_key: bytes,
                 clock: Callable[[], float] = time.time):
        self.intake = intake
        self.secret_key = secret_key
        self.clock = clock

    async def decide(self, request: Mapping[str, str], transaction: Transaction) -> str:
        if request.get("request") != "smtpd_access_policy" or \
                request.get("protocol_state", "").upper() != "RCPT":
            return DUNNO
        recipient = request.get("recipient", "")
        _, domain = split_address(recipient)
        if not domain or not is_fax_domain(domain, self.intake.settings.fax_domains):
            return DUNNO
        if self.intake.is_postmaster(recipient):
            return "OK"
        transaction.follow(request.get("instance", ""))
        sender = request.get("sender", "")
        user = request.get("sasl_username") or None
        try:
            self._check_size(request.get("size", ""))
            self.intake.refuse_unfaxable_sender(sender)
            self.intake.check_sender(sender, request.get("client_address") or None, user)
            fax = await self.intake.check_rcpt(sender, recipient, user, transaction.accepted,
                                               transaction.usage)
        except Refusal as refusal:
            self.intake.count_refusal(refusal)
            log.info("policy: refused <%s> -> <%s> (client %s, login %s): %s", sender,
                     recipient, request.get("client_address", "?"), user or "-",
                     refusal.sentence)
            return refusal_action(refusal)
        transaction.accepted += 1
        log.info("policy: <%s> -> <%s> (fax to %s) allowed for %s", sender, recipient,
                 fax.number, f"user {user}" if user else
                 f"client {request.get('client_address', '?')}")
        if user is None:
            return DUNNO
        value = header_value(self.secret_key, user, sender, recipient, int(self.clock()))
        return f"PREPEND {HEADER}: {value}"

    def _check_size(self, size: str) -> None:
        limit = self.intake.settings.smtp.max_message_size
        if size.isdigit() and int(size) > limit:
            raise Refusal(552, "5.3.4", f"Message too big: mailfax takes mails of at most "
                          f"{limit} bytes.")


async def serve_connection(decider: PolicyDecider, reader: asyncio.StreamReader,
                           writer: asyncio.StreamWriter) -> None:
    """Requests and answers on one connection until Postfix closes it."""
    transaction = Transaction()
    peer = writer.get_extra_info("peername")
    try:
        while True:
            block = await _read_request(reader)
            if block is None:
                return
            request = parse_request(block)
            answer = await decider.decide(request, transaction)
            writer.write(format_answer(answer))
            await writer.drain()
    except BadRequest as error:
        log.warning("policy service: bad request from %s: %s; closing", peer, error)
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    except Exception:  # no answer, as the protocol wants: Postfix retries or defers
        log.exception("policy service: cannot answer %s; closing without an answer", peer)
    finally:
        writer.close()


async def _read_request(reader: asyncio.StreamReader) -> bytes | None:
    """One request without its ending empty line; None when the connection ends first."""
    lines: list[bytes] = []
    size = 0
    while True:
        line = await reader.readline()
        if not line:
            if lines:
                raise BadRequest("connection closed in the middle of a request")
            return None
        if line in (b"\n", b"\r\n"):
            if lines:
                return b"".join(lines)
            continue
        size += len(line)
        if size > MAX_REQUEST_BYTES:
            raise BadRequest("request too long")
        lines.append(line)


class PolicyService:
    """The listener: Postfix keeps its connections open between requests, so stopping closes
    them too (Postfix reconnects to the next instance that listens)."""

    def __init__(self, decider: PolicyDecider):
        self.decider = decider
        self.server: asyncio.Server | None = None
        self._connections: set[asyncio.StreamWriter] = set()

    async def start(self, host: str, port: int) -> asyncio.Server:
        self.server = await asyncio.start_server(self._handle, host=host, port=port,
                                                 limit=MAX_REQUEST_BYTES)
        return self.server

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections.add(writer)
        try:
            await serve_connection(self.decider, reader, writer)
        finally:
            self._connections.discard(writer)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for writer in list(self._connections):
            writer.close()
