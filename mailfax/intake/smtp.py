"""The SMTP and LMTP edge: translates between SMTP and :class:`~mailfax.intake.service.Intake`.

The aiosmtpd protocol machine runs on mailfax's own event loop (no Controller thread).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import mmap
import re
import ssl
import time
import weakref
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from mailfax.config import ListenAddress, SmtpSettings, UserSettings
from mailfax.documents.readiness import short_text
from mailfax.intake.accept_spool import spool_reply
from mailfax.intake.assemble import Refusal
from mailfax.intake.broadcast import ListRecipient, broadcast_reply
from mailfax.intake.limits import (
    Connections,
    Progress,
    RefusalLog,
    SessionCounters,
    SessionLimits,
    Slot,
)
from mailfax.intake.service import Accepted, Intake, StoreUnavailable
from mailfax.intake.spool import (
    BUDGET_SPENT,
    MailBytes,
    ReceivingBudget,
    Reservation,
    Spool,
    declared_size,
)
from mailfax.numbers import FaxAddress
from mailfax.trust.auth import LoginThrottle, unmatchable_hash, verify_password

log = logging.getLogger(__name__)


class FaxHandler:
    """aiosmtpd handler hooks."""

    def __init__(self, intake: Intake, max_recipients: int):
        self.intake = intake
        self.max_recipients = max_recipients
        self.budget = ReceivingBudget(intake.settings.smtp.receiving_budget_bytes)
        # Per envelope (aiosmtpd makes a new one for each mail): the hourly counts read at
        # its first RCPT, so later RCPTs count on from them instead of asking the store again.
        self._usage: weakref.WeakKeyDictionary[Envelope, dict[str, int]] = \
            weakref.WeakKeyDictionary()
        # Envelopes of an MTA's recipient verification probes: answered at RCPT only.
        self._probes: weakref.WeakSet[Envelope] = weakref.WeakSet()
        # Envelopes whose sender the MTA's own networks may not use, waiting at DATA for the
        # policy service's header naming a user who may (Intake.may_authorize_later).
        self._deferred: weakref.WeakKeyDictionary[Envelope, Refusal] = \
            weakref.WeakKeyDictionary()

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, mail_options: list[str]) -> str:
        try:
            if _user(session) is None and self.intake.is_verification_probe(
                    address, _client_ip(session)):
                self._probes.add(envelope)
            else:
                self.intake.check_sender(address, _client_ip(session), _user(session))
        except Refusal as refusal:
            if self.intake.may_authorize_later(_client_ip(session), _user(session)):
                self._deferred[envelope] = refusal
                envelope.mail_from = address
                envelope.mail_options.extend(mail_options)
                return "250 2.1.0 OK"
            self.intake.count_refusal(refusal)
            log.info("refused sender <%s> from %s: %s", address, session.peer, refusal.sentence)
            return refusal.reply()
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        if len(envelope.rcpt_tos) >= self.max_recipients:
            return f"452 4.5.3 Too many recipients (at most {self.max_recipients} per mail)"
        if self.intake.is_postmaster(address):
            envelope.rcpt_tos.append(address)
            return "250 2.1.5 OK, to the postmaster"
        mixed = self._mixes_list(envelope, address)
        if mixed:
            return mixed
        try:
            fax: FaxAddress | ListRecipient
            if envelope in self._probes:  # the number and the dial policy; no quota
                fax = self.intake.probe_recipient(address)
            else:
                fax = await self.intake.check_rcpt(
                    envelope.mail_from or "", address, _user(session),
                    len(envelope.rcpt_tos), self._usage.setdefault(envelope, {}))
        except Refusal as refusal:
            self.intake.count_refusal(refusal)
            log.info("refused recipient <%s>: %s", address, refusal.sentence)
            return refusal.reply()
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return f"250 2.1.5 OK, fax to {fax.number}"

    def _mixes_list(self, envelope: Envelope, address: str) -> str | None:
        """A broadcast list goes in a mail of its own: a 452 for a recipient that would mix
        it with other fax recipients (the client sends that one in another transaction).
        A list taken is so the only fax recipient: only the first one need be looked at."""
        first = next((rcpt for rcpt in envelope.rcpt_tos if not self.intake.is_postmaster(rcpt)),
                     None)
        if first is not None and (self.intake.is_list_address(address) or
                                  self.intake.is_list_address(first)):
            return ("452 4.5.3 A broadcast list is sent in a mail of its own; send this "
                    "recipient in another mail")
        return None

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or envelope.content or b""
        if isinstance(raw, str):
            raw = raw.encode("utf-8", "surrogateescape")
        assert isinstance(raw, bytes | mmap.mmap)
        recipients = list(envelope.rcpt_tos)
        per_recipient = isinstance(server, LMTP)
        to_postmaster = [address for address in recipients if self.intake.is_postmaster(address)]
        faxes = [address for address in recipients if address not in to_postmaster]
        reply = "250 2.0.0 OK"
        replies: dict[str, str] = {}
        if faxes:
            reply, replies = await self._store_faxes(server, session, envelope, faxes, raw)
        if to_postmaster and (per_recipient or reply.startswith("2")):
            forwarded = await self._forward(envelope, to_postmaster, raw)
            replies.update(dict.fromkeys(to_postmaster, forwarded))
            if not faxes:
                reply = forwarded
        if not per_recipient:
            return reply
        # LMTP (RFC 2033): one reply per accepted recipient, in RCPT order.
        return "\r\n".join(replies[address] for address in recipients)

    async def _store_faxes(self, server: SMTP, session: Session, envelope: Envelope,
                           faxes: list[str], raw: MailBytes) -> tuple[str, dict[str, str]]:
        """The SMTP reply for the fax recipients, and the LMTP reply of each."""
        outcome = await self._take_faxes(server, session, envelope, faxes, raw)
        if isinstance(outcome, str):  # one reply for every fax recipient
            return outcome, dict.fromkeys(faxes, outcome)
        if outcome.broadcast:
            reply = broadcast_reply(outcome.broadcast, len(outcome.job_ids), outcome.refused,
                                    outcome.mail_id)
            return reply, dict.fromkeys(faxes, reply)
        replies = {}
        warning = _warning(outcome)
        for address in faxes:
            number = self.intake.check_recipient(address).number
            replies[address] = (f"250 2.0.0 <{address}> queued as "
                                f"{outcome.job_for_number[number]}{warning}")
        return f"250 2.0.0 queued as {' '.join(outcome.job_ids)}{warning}", replies

    async def _take_faxes(self, server: SMTP, session: Session, envelope: Envelope,
                          faxes: list[str], raw: MailBytes) -> Accepted | str:
        """The stored jobs, or the one reply for all fax recipients (spooled, refused)."""
        sender = envelope.mail_from or ""
        try:
            raw, user = await self.intake.authorize(sender, faxes, raw, _user(session))
            if user is None and envelope in self._deferred:
                raise self._deferred[envelope]
            if self.intake.settings.smtp.accept == "spool":
                return await spool_reply(self.intake, sender, faxes, raw,
                                         _client_ip(session) or "", user)
            with _not_idle(server):
                return await self.intake.accept_mail(sender, faxes, raw,
                                                     _client_ip(session) or "", user)
        except Refusal as refusal:  # 5xx: permanent, says what to do; 4xx: temporary
            self.intake.count_refusal(refusal)
            log.info("refused mail from <%s>: %s", sender, refusal.sentence)
            return refusal.reply()
        except StoreUnavailable as error:
            log.warning("could not store mail from <%s>: %s", sender, error)
            return ("451 4.3.0 Temporary failure: the fax queue is unavailable right now; "
                    "please try again later")
        except OSError as error:
            if error.errno in (errno.ENOSPC, errno.EDQUOT):
                log.error("no room to take the mail from <%s>: %s", sender, error)
                return ("452 4.3.1 Temporary failure: the server's disk is full; please try "
                        "again later")
            return _unexpected_reply(envelope)
        except Exception:
            return _unexpected_reply(envelope)

    async def _forward(self, envelope: Envelope, recipients: list[str], raw: MailBytes) -> str:
        try:
            await self.intake.forward_to_postmaster(envelope.mail_from or "", recipients, raw)
        except Refusal as refusal:
            return refusal.reply()
        except Exception:
            log.exception("could not forward mail to the postmaster")
            return "451 4.3.0 Temporary failure forwarding to the postmaster; try again later"
        return "250 2.0.0 forwarded to the postmaster"


def _warning(outcome: Accepted) -> str:
    """``; warning: page 2 may arrive blank (light grey text)`` (``documents.readiness``)."""
    return f"; warning: {short_text(outcome.warnings)}" if outcome.warnings else ""


@contextlib.contextmanager
def _not_idle(server: SMTP) -> Iterator[None]:
    """While mailfax works on a received mail (LibreOffice may take a minute a document) the
    client waits for the answer: it is not idle, so the idle timeout is paused, and starts
    afresh once the answer is ready."""
    handle: asyncio.TimerHandle | None = getattr(server, "_timeout_handle", None)
    if handle is not None:
        handle.cancel()
    try:
        yield
    finally:
        transport = server.transport
        if handle is not None and transport is not None and not transport.is_closing():
            server._reset_timeout()


def _unexpected_reply(envelope: Envelope) -> str:
    """A bug or an unforeseen condition: logged with its traceback, answered as temporary
    (4xx) so that no mail is lost while it is looked into."""
    log.exception("unexpected error taking the mail from <%s>", envelope.mail_from)
    return ("451 4.3.0 Temporary failure: an unexpected error on the server (it is logged); "
            "please try again later")



def _user(session: Session) -> str | None:
    """The SMTP AUTH login of this session, if any."""
    data = session.auth_data
    if not session.authenticated or not isinstance(data, LoginPassword):
        return None
    return data.login.decode("utf-8", "replace")


def _client_ip(session: Session) -> str | None:
    peer = session.peer
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return None


class StrictPaths:
    """What mailfax changes in aiosmtpd's protocol (mixed into SMTP and LMTP).

    - Paths with comments are malformed: RFC 5321 has none, and aiosmtpd's parser would drop
      ``(089)`` from ``(089)30123456@fax.local`` and fax a different number.
    - Control characters (NUL, …) in a path are malformed too.
    - ``timeout`` is an idle timeout that only progress restarts: a complete command line,
      or data at ``min_data_rate`` or faster (:class:`~mailfax.intake.limits.Progress`), so
      a slow upload is not cut off, while a client that stops, or trickles, still is.
    - The session limits of :class:`~mailfax.intake.limits.SessionCounters`: junk commands
      and 5xx errors beyond their limit end the session with ``421 4.7.0``, and every few
      replies the session yields to the event loop.
    """

    _timeout_handle: asyncio.TimerHandle | None
    _handler_coroutine: asyncio.Task[None] | None
    _smtp_methods: dict[str, Callable[[str | None], Awaitable[Any]]]
    transport: asyncio.BaseTransport | None
    loop: asyncio.AbstractEventLoop
    hostname: str
    local_part_limit: int
    _timeout_duration: float
    _idle_until = 0.0  # the loop's time the idle timeout ends at, unless progress comes first
    connection_slot: Slot | None = None  # set by _Gate: given back when the connection ends

    def __init__(self, *args: Any, limits: SessionLimits | None = None, **kwargs: Any):
        self._limits = limits or SessionLimits()
        self._counters = SessionCounters(self._limits)
        self._progress = Progress(self._limits.min_data_rate)
        super().__init__(*args, **kwargs)
        self._smtp_methods = {name: self._counted(name, method)
                              for name, method in self._smtp_methods.items()}

    def _counted(self, name: str, method: Callable[[str | None], Awaitable[Any]]
                 ) -> Callable[[str | None], Awaitable[Any]]:
        @functools.wraps(method)
        async def counted(arg: str | None) -> Any:
            reason = self._counters.command(name)
            if reason is not None:
                return await self._end_session(reason)
            return await method(arg)
        return counted

    async def push(self, status: Any) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        await super().push(status)  # type: ignore[misc]
        text = status if isinstance(status, str) else status.decode("ascii", "replace")
        reason = self._counters.reply(text)
        if reason is not None:
            await self._end_session(reason)
        elif self._counters.turn_over():
            await asyncio.sleep(0)  # let the other sessions (and the dispatcher) run

    async def _end_session(self, reason: str) -> None:
        """``421 4.7.0`` and close; the session's task ends here (cancelled, as by QUIT),
        without answering the commands still buffered."""
        log.warning("ending the SMTP session of %s: %s",
                    getattr(getattr(self, "session", None), "peer", "?"), reason)
        await super().push(f"421 4.7.0 {self.hostname} {reason}")  # type: ignore[misc]
        if self.transport is not None:
            self.transport.close()
        if self._handler_coroutine is not None:
            self._handler_coroutine.cancel()
        await asyncio.sleep(0)

    def connection_lost(self, error: Exception | None) -> None:
        super().connection_lost(error)  # type: ignore[misc]
        if self.connection_slot is not None:
            self.connection_slot.release()

    def _reset_timeout(self, duration: float | None = None) -> None:
        """Restart the idle timer. Its handle is kept when it fires no later than the new
        end (:meth:`_timeout_cb` then sets it again for the time left): cancelling and
        scheduling a handle at every command and every chunk of DATA was 4 % of the loop's
        time per mail (py-spy, bench/intake.py)."""
        now = self.loop.time()
        self._progress.restart(now)
        self._idle_until = now + (duration or self._timeout_duration)
        handle = self._timeout_handle
        if handle is None or handle.cancelled() or handle.when() > self._idle_until:
            super()._reset_timeout(duration)  # type: ignore[misc]

    def _timeout_cb(self) -> None:
        left = self._idle_until - self.loop.time()
        if left > 0:  # progress came since the handle was set
            self._timeout_handle = self.loop.call_later(left, self._timeout_cb)
            return
        super()._timeout_cb()  # type: ignore[misc]

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        path = arg.split(">", 1)[0] if arg.lstrip().startswith("<") else arg.split(" ", 1)[0]
        if "(" in path or ")" in path or any(ord(char) < 32 or ord(char) == 127
                                              for char in path):
            return None, None
        plain = plain_path(arg, self.local_part_limit)
        if plain is not None:
            return plain
        result: tuple[str | None, str | None] = super()._getaddr(arg)  # type: ignore[misc]
        return result

    def data_received(self, data: bytes) -> None:
        if self._timeout_handle is not None and self._progress.data(len(data), self.loop.time()):
            self._reset_timeout()
        super().data_received(data)  # type: ignore[misc]


ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
PLAIN_PATH = re.compile(rf"<((?:{ATEXT}\.)*{ATEXT}@(?:[A-Za-z0-9-]+\.)*[A-Za-z0-9-]+)>"
                        r"(?:[ \t]+(?=[^ \t])|$)")


def plain_path(arg: str, local_part_limit: int) -> tuple[str | None, str | None] | None:
    """``MAIL FROM:``/``RCPT TO:``'s ``<local@domain> PARAMS`` in the common plain shape (a
    dot-atom local part, a domain of labels), as aiosmtpd's ``_getaddr`` reads it; None for
    anything else, which aiosmtpd's parser reads (the email package's: about a tenth of the
    loop's time per mail, as it also defines a class on every call).
    tests/test_smtp_limits.py checks both give the same."""
    match = PLAIN_PATH.match(arg)
    if match is None or "(" in arg:  # a comment: the email package's parser drops it
        return None
    address = match.group(1)
    if local_part_limit and len(address.rpartition("@")[0]) > local_part_limit:
        return None, None
    return address, arg[match.end():]


@dataclass(frozen=True)
class _Deferred:
    """What :meth:`FaxSMTP._authenticate` hands back instead of a verdict: the decoded
    credentials, for :meth:`FaxSMTP._verify` to check off the event loop."""

    mechanism: str
    auth_data: Any


class SpooledData:
    """DATA as aiosmtpd reads it (line by line, dot-unstuffing, ``500`` for a line over
    1000 bytes, ``552`` over ``data_size_limit``, both only after the final dot), but kept
    in a :class:`~mailfax.intake.spool.Spool` instead of a list of lines joined at the end,
    and within the handler's :class:`~mailfax.intake.spool.ReceivingBudget`: a DATA while
    it is spent, or a mail whose cost does not fit, is answered ``452 4.3.1``."""

    envelope: Envelope | None
    event_handler: FaxHandler
    data_size_limit: int | None
    line_length_limit: int
    transport: asyncio.BaseTransport | None
    _reader: asyncio.StreamReader
    _writer: asyncio.StreamWriter

    async def smtp_DATA(self, arg: str) -> None:
        server: Any = self  # aiosmtpd's SMTP, which this is mixed into
        if await server.check_helo_needed() or await server.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await server.push("503 Error: need RCPT command")
            return
        if arg:
            await server.push("501 Syntax: DATA")
            return
        budget = self.event_handler.budget
        reservation = budget.reserve(declared_size(self.envelope.mail_options))
        if reservation is None:
            log.warning("DATA refused: the receiving budget (%d bytes) is spent", budget.limit)
            server._set_post_data_state()
            await server.push(BUDGET_SPENT)
            return
        try:
            status = await self._receive_and_handle(reservation)
        finally:
            reservation.release()
        server._set_post_data_state()
        await server.push(status)

    async def _receive_and_handle(self, reservation: Reservation) -> str:
        """The reply to the mail: refused as it came, or the handler's."""
        server: Any = self
        await server.push("354 End data with <CR><LF>.<CR><LF>")
        spool = Spool(self.event_handler.intake.spool_folder)
        try:
            refusal = await self._receive(spool)
            if refusal is not None:
                return refusal
            if not reservation.grow_to(spool.size):
                log.warning("mail of %d bytes refused: the receiving budget is spent",
                            spool.size)
                return BUDGET_SPENT
            envelope: Any = self.envelope  # aiosmtpd types its content as bytes | str
            envelope.content = envelope.original_content = await spool.content()
            status: str = await server._call_handler_hook("DATA")
            envelope.content = envelope.original_content = None
            return status
        finally:
            spool.close()

    async def _receive(self, spool: Spool) -> str | None:
        """Read the mail up to its final dot into ``spool``; the refusal if it is not
        taken (too large, a line too long).

        Read in runs up to the next ``.<CR><LF>`` (where the final dot may be), not line by
        line: a 16 KB PDF mail is about 300 lines, and a read per line was a quarter of the
        event loop's time per mail. Nothing after the final dot is read (a pipelining
        client's next command stays in the stream)."""
        reader = self._reader
        limit = self.data_size_limit
        received = 0
        refusal: str | None = None
        pending = b""  # the line begun and not yet ended (of a line too long: its last bytes)
        at_line_start = True  # pending starts where its line starts
        while self.transport is not None:
            found = True
            try:
                try:
                    chunk = await reader.readuntil(b".\r\n")
                except asyncio.LimitOverrunError as error:  # none within the stream's limit
                    found = False
                    chunk = await reader.read(error.consumed)
            except asyncio.CancelledError:  # the connection was reset during DATA
                log.info("Connection lost during DATA")
                self._writer.close()
                raise
            received += len(chunk)
            data = pending + chunk if pending else chunk
            final = found and (data[-5:-3] == b"\r\n" or (len(data) == 3 and at_line_start))
            if final:
                received -= 3
                body, pending = data[:-3], b""
            else:
                cut = data.rfind(b"\r\n") + 2
                body, pending = (data[:cut], data[cut:]) if cut >= 2 else (b"", data)
            if refusal is None and limit and received > limit:
                refusal = "552 Error: Too much mail data"
                spool.discard()
            if refusal is None and (len(pending) >= self.line_length_limit
                                    or _has_long_line(body, self.line_length_limit)):
                refusal = "500 Line too long (see RFC5321 4.5.3.1.6)"
                spool.discard()
            if refusal is None and body:
                await spool.write(_unstuffed(body, at_line_start))
            if body:
                at_line_start = True
            if len(pending) >= self.line_length_limit:  # refused: keep what may end it
                pending, at_line_start = pending[-2:], False
            if final:
                break
        return refusal


def _has_long_line(lines: bytes, limit: int) -> bool:
    """Whether a line of ``lines`` (complete lines) is longer than ``limit`` with its CR LF.

    A line that long holds a whole window of half the limit, aligned to it, without a CR LF:
    the windows are searched first, and only if one has none are the lines measured."""
    window = max((limit - 1) // 2, 1)
    find = lines.find
    for start in range(0, len(lines) - window, window):
        if find(b"\r\n", start, start + window + 1) < 0:
            return max(map(len, lines.split(b"\r\n"))) + 2 > limit
    return False


def _unstuffed(lines: bytes, at_line_start: bool) -> bytes:
    """Complete lines as the client meant them: the dot it doubled at a line's start taken
    off (RFC 5321 4.5.2)."""
    if at_line_start and lines.startswith(b"."):
        lines = lines[1:]
    return lines.replace(b"\r\n.", b"\r\n")


class FaxSMTP(SpooledData, StrictPaths, SMTP):
    """aiosmtpd's AUTH PLAIN and LOGIN (challenges, base64, splitting) as they are, but the
    password check (scrypt, ~44 ms) runs in a worker thread: aiosmtpd calls the authenticator
    synchronously, which would stall every other session on the loop meanwhile."""

    def _authenticate(self, mechanism: str, auth_data: Any) -> AuthResult:
        # Called by aiosmtpd's auth_PLAIN/auth_LOGIN once the credentials are decoded. A
        # result that is not completed by _verify is a failure (fail closed).
        return AuthResult(success=False, handled=False,
                          auth_data=_Deferred(mechanism, auth_data))

    async def auth_PLAIN(self, server: SMTP, args: list[str]) -> AuthResult:
        return await self._verify(await super().auth_PLAIN(server, args))

    async def auth_LOGIN(self, server: SMTP, args: list[str]) -> AuthResult:
        return await self._verify(await super().auth_LOGIN(server, args))

    async def _verify(self, result: AuthResult) -> AuthResult:
        deferred = result.auth_data
        if not isinstance(deferred, _Deferred):  # refused before the credentials were read
            return result
        authenticator = self._authenticator
        if isinstance(authenticator, Authenticator):
            assert self.session is not None
            return await authenticator.verify(self.session, deferred.auth_data)
        return await asyncio.to_thread(super()._authenticate, deferred.mechanism,
                                       deferred.auth_data)


class FaxLMTP(SpooledData, StrictPaths, LMTP):
    pass


class Authenticator:
    """SMTP AUTH against ``[users.*]``, with failed logins throttled per client address and
    per user name (:class:`~mailfax.trust.auth.LoginThrottle`)."""

    def __init__(self, users: Mapping[str, UserSettings], throttle: LoginThrottle):
        self.users = users
        self.throttle = throttle
        self._dummy_hash = unmatchable_hash()  # not hash_password(): 0.05 s at start-up

    def __call__(self, server: SMTP, session: Session, envelope: Envelope, mechanism: str,
                 auth_data: Any) -> AuthResult:
        """aiosmtpd's synchronous interface; blocks for the password check. FaxSMTP awaits
        :meth:`verify` instead."""
        refused = self._before(session, auth_data)
        if refused is not None:
            return refused
        return self._after(session, auth_data, self._password_valid(auth_data))

    async def verify(self, session: Session, auth_data: Any) -> AuthResult:
        """As a call, with the password check in a worker thread. Parallel sessions from one
        address (or for one user) wait for a check slot (``LoginThrottle.checking``), so
        together they get no more guesses than the limit."""
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        async with self.throttle.checking(_client_ip(session) or "?", _login(auth_data)):
            refused = self._before(session, auth_data)
            if refused is not None:
                return refused
            valid = await asyncio.to_thread(self._password_valid, auth_data)
            return self._after(session, auth_data, valid)

    def _before(self, session: Session, auth_data: Any) -> AuthResult | None:
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        client = _client_ip(session) or "?"
        if self.throttle.blocked(client, _login(auth_data)):
            log.warning("login refused for %s: too many failed logins", client)
            return AuthResult(success=False, handled=False,
                              message="454 4.7.0 Too many failed logins; try again later")
        return None

    def _password_valid(self, auth_data: LoginPassword) -> bool:
        login = _login(auth_data)
        password = auth_data.password.decode("utf-8", "replace")
        user = self.users.get(login)
        # A check for an unknown user costs the same, so timing does not tell who exists.
        stored = user.password_hash if user else None
        valid = verify_password(password, stored or self._dummy_hash)
        return stored is not None and valid

    def _after(self, session: Session, auth_data: LoginPassword, valid: bool) -> AuthResult:
        client = _client_ip(session) or "?"
        login = _login(auth_data)
        if not valid:
            self.throttle.failed(client, login)
            log.warning("failed SMTP login as %r from %s", login[:64], client)
            return AuthResult(success=False, handled=False)
        self.throttle.succeeded(client, login)
        log.info("SMTP login as %s from %s", login, client)
        return AuthResult(success=True, auth_data=auth_data)


def _login(auth_data: LoginPassword) -> str:
    return auth_data.login.decode("utf-8", "replace")


def tls_context(settings: SmtpSettings) -> ssl.SSLContext | None:
    """Server TLS (1.2 and newer) from the configured certificate and key."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(settings.tls_cert), str(settings.tls_key))
    return context


class _Gate(asyncio.Protocol):
    """The protocol a new connection starts with: it asks :class:`Connections` for a slot
    and only then sets up the SMTP session and hands the transport to it. Beyond the limits
    the connection costs a ``421 4.7.0`` line and is closed, with no session made."""

    def __init__(self, connections: Connections, refusals: RefusalLog, hostname: str,
                 make_session: Callable[[], SMTP]):
        self.connections = connections
        self.refusals = refusals
        self.hostname = hostname
        self.make_session = make_session

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        peer = transport.get_extra_info("peername")
        client = str(peer[0]) if isinstance(peer, tuple) and peer else "?"
        slot = self.connections.admit(client)
        if isinstance(slot, str):
            count = self.refusals.refused(time.monotonic())
            if count is not None:
                log.warning("refused %d connection(s), the last from %s: %s (%d open)",
                            count, client, slot, self.connections.open)
            transport.write(f"421 4.7.0 {self.hostname} {slot}\r\n".encode())
            transport.close()
            return
        session = self.make_session()
        assert isinstance(session, StrictPaths)
        session.connection_slot = slot
        transport.set_protocol(session)
        session.connection_made(transport)


def session_limits(settings: SmtpSettings) -> SessionLimits:
    return SessionLimits(junk_command_limit=settings.junk_command_limit,
                         hard_error_limit=settings.hard_error_limit,
                         commands_per_turn=settings.commands_per_turn,
                         min_data_rate=settings.min_data_rate)


async def start_listeners(intake: Intake, settings: SmtpSettings,
                          users: Mapping[str, UserSettings] | None = None
                          ) -> list[asyncio.Server]:
    """Start the SMTP (and LMTP, and implicit-TLS SMTP) listeners on the running loop."""
    handler = FaxHandler(intake, settings.max_recipients)
    loop = asyncio.get_running_loop()
    context = tls_context(settings)
    options: dict[str, Any] = {
        "data_size_limit": settings.max_message_size,
        "enable_SMTPUTF8": True,
        "decode_data": False,
        "hostname": settings.hostname,
        "ident": "mailfax",
        "timeout": settings.data_timeout,
        "limits": session_limits(settings),
    }
    authenticator = Authenticator(users or {}, LoginThrottle(
        settings.max_login_failures, settings.login_failure_window))
    submission = {**options, "authenticator": authenticator, "auth_require_tls": True,
                  "tls_context": context}
    # Implicit TLS: the connection is encrypted from the first byte, so AUTH may go at once.
    implicit = {**options, "authenticator": authenticator, "auth_require_tls": False}
    listeners: list[tuple[str, type[SMTP], dict[str, Any], ssl.SSLContext | None]] = [
        *((listen, FaxSMTP, submission, None) for listen in settings.listen),
        *((listen, FaxLMTP, options, None) for listen in settings.lmtp_listen),
        *((listen, FaxSMTP, implicit, context) for listen in settings.implicit_tls_listen),
    ]
    servers = []
    connections = Connections(settings.max_connections, settings.max_connections_per_client)
    refusals = RefusalLog()
    for listen, protocol, protocol_options, server_tls in listeners:
        address = ListenAddress(listen)
        make_session = functools.partial(protocol, handler, loop=loop, **protocol_options)
        server = await loop.create_server(
            functools.partial(_Gate, connections, refusals, settings.hostname, make_session),
            host=address.host, port=address.port, ssl=server_tls)
        servers.append(server)
    return servers
