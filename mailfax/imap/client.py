"""A small typed layer over aioimaplib: connect, log in, and the handful of commands mailfax
needs (SELECT, UID SEARCH/FETCH/MOVE/STORE, APPEND, CREATE, IDLE), each with a timeout and an
:class:`ImapError` for anything but OK. A lost connection ends every wait at once.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import re
import ssl
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

from mailfax.config import ImapServerSettings
from mailfax.support.lazy import lazy_module
from mailfax.support.waiting import cancel_and_wait

if TYPE_CHECKING:
    import aioimaplib  # type: ignore[import-untyped]
else:  # the first IMAP connection loads it, not serve's start-up
    aioimaplib = lazy_module("aioimaplib")

log = logging.getLogger(__name__)

_UIDVALIDITY = re.compile(rb"\[UIDVALIDITY (\d+)\]")
_APPENDUID = re.compile(rb"\[APPENDUID (\d+) (\d+)\]")


class ImapError(Exception):
    """The server refused a command, or the connection failed or timed out."""


def imap_utf7(name: str) -> str:
    """A mailbox name in IMAP's modified UTF-7 (RFC 3501 §5.1.3)."""
    out: list[str] = []
    pending: list[str] = []

    def flush() -> None:
        if pending:
            data = "".join(pending).encode("utf-16-be")
            out.append("&" + base64.b64encode(data).decode().rstrip("=").replace("/", ",") + "-")
            pending.clear()

    for char in name:
        if 0x20 <= ord(char) <= 0x7E:
            flush()
            out.append("&-" if char == "&" else char)
        else:
            pending.append(char)
    flush()
    return "".join(out)


def mailbox_argument(name: str) -> str:
    """A mailbox name as a quoted IMAP string."""
    encoded = imap_utf7(name)
    return '"' + encoded.replace("\\", "\\\\").replace('"', '\\"') + '"'


def crlf(message: bytes) -> bytes:
    """IMAP literals carry CRLF line ends."""
    return re.sub(rb"\r?\n", b"\r\n", message)


class ImapSession:
    """One logged-in IMAP connection."""

    def __init__(self, settings: ImapServerSettings):
        self.settings = settings
        self.timeout = settings.timeout
        self._lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._client: Any = None
        self.selected: str | None = None

    def describe(self) -> str:
        return f"{self.settings.username}@{self.settings.host}:{self.settings.port}"

    @classmethod
    async def open(cls, settings: ImapServerSettings) -> ImapSession:
        session = cls(settings)
        await session._connect()
        return session

    def _connection_lost(self, error: Exception | None) -> None:
        if not self._lost.done():
            self._lost.set_result(None)

    async def _connect(self) -> None:
        settings = self.settings
        context = ssl.create_default_context() if settings.tls == "implicit" else None
        try:
            self._client = aioimaplib.IMAP4(host=settings.host, port=settings.port,
                                            timeout=self.timeout,
                                            conn_lost_cb=self._connection_lost,
                                            ssl_context=context)
            await self._guard(self._client.wait_hello_from_server())
            response = await self._guard(self._client.login(
                settings.username, settings.password.get_secret_value()))
        except ImapError:
            await self.close()
            raise
        if response.result != "OK":
            await self.close()
            raise ImapError(f"login as {settings.username} refused by {settings.host}: "
                            f"{_text(response)}")
        # Capabilities change after login (MOVE, UIDPLUS, IDLE …).
        await self._guard(self._client.protocol.capability())

    def has(self, capability: str) -> bool:
        return bool(self._client.has_capability(capability))

    @property
    def lost(self) -> bool:
        return self._lost.done()

    async def _guard(self, operation: Awaitable[Any]) -> Any:
        """Run one command: a timeout, a lost connection or a protocol error is an ImapError."""
        if self._lost.done():
            if asyncio.iscoroutine(operation):
                operation.close()
            raise ImapError(f"connection to {self.describe()} lost")
        task = asyncio.ensure_future(operation)
        try:
            done, _ = await asyncio.wait({task, self._lost}, timeout=self.timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            raise
        if task not in done:
            await cancel_and_wait(task)
            what = "lost" if self._lost.done() else f"timed out after {self.timeout:.0f} s"
            raise ImapError(f"connection to {self.describe()} {what}")
        try:
            return task.result()
        except (aioimaplib.AioImapException, OSError, TimeoutError, ValueError) as error:
            raise ImapError(f"{self.describe()}: {type(error).__name__}: {error}") from error

    async def _ok(self, operation: Awaitable[Any], what: str) -> list[Any]:
        response = await self._guard(operation)
        if response.result != "OK":
            raise ImapError(f"{what}: {response.result} {_text(response)}")
        lines: list[Any] = list(response.lines)
        return lines

    async def select(self, mailbox: str) -> int:
        """SELECT a mailbox; returns its UIDVALIDITY."""
        lines = await self._ok(self._client.select(mailbox_argument(mailbox)),
                               f"SELECT {mailbox}")
        self.selected = mailbox
        for line in lines:
            if isinstance(line, bytes | bytearray) and (match := _UIDVALIDITY.search(line)):
                return int(match.group(1))
        return 0

    async def ensure_folder(self, name: str) -> None:
        """CREATE a folder unless it exists."""
        response = await self._guard(self._client.create(mailbox_argument(name)))
        if response.result == "OK":
            log.info("created IMAP folder %s on %s", name, self.describe())
            return
        lines = await self._ok(self._client.list('""', mailbox_argument(name)), f"LIST {name}")
        if not any(_selectable(line) for line in lines):
            raise ImapError(f"cannot create folder {name}: {_text(response)}")

    async def uid_search(self, *criteria: str) -> list[int]:
        lines = await self._ok(self._client.uid_search(*criteria, charset=None), "UID SEARCH")
        uids: list[int] = []
        for line in lines[:-1]:  # the last line is the completion text
            if not isinstance(line, bytes | bytearray):
                continue
            parts = line.split()
            if parts and parts[0].upper() == b"SEARCH":  # aioimaplib strips it; be sure
                parts = parts[1:]
            if all(part.isdigit() for part in parts):
                uids.extend(int(part) for part in parts)
        return sorted(uids)

    async def fetch_message(self, uid: int) -> bytes | None:
        """The whole message (BODY.PEEK[]: not marked \\Seen), or None if it is gone."""
        lines = await self._ok(self._client.uid("fetch", str(uid), "(BODY.PEEK[])"),
                               f"UID FETCH {uid}")
        for line in lines:
            if isinstance(line, bytearray):
                return bytes(line)
        return None

    async def move(self, uid: int, folder: str) -> None:
        target = mailbox_argument(folder)
        if self.has("MOVE"):
            await self._ok(self._client.uid("move", str(uid), target), f"UID MOVE {uid}")
            return
        await self._ok(self._client.uid("copy", str(uid), target), f"UID COPY {uid}")
        await self.add_flags(uid, "\\Deleted")
        if self.has("UIDPLUS"):
            await self._ok(self._client.uid("expunge", str(uid)), f"UID EXPUNGE {uid}")
        else:
            await self._ok(self._client.expunge(), "EXPUNGE")

    async def add_flags(self, uid: int, *flags: str) -> None:
        await self._ok(self._client.uid("store", str(uid), "+FLAGS.SILENT",
                                        f"({' '.join(flags)})"), f"UID STORE {uid}")

    async def append(self, message: bytes, folder: str) -> str:
        """APPEND a message (no flags: the server sets \\Recent); returns the APPENDUID if any."""
        lines = await self._ok(self._client.append(crlf(message), mailbox_argument(folder)),
                               f"APPEND to {folder}")
        for line in lines:
            if isinstance(line, bytes | bytearray) and (match := _APPENDUID.search(line)):
                return match.group(2).decode()
        return ""

    async def wait_for_news(self, seconds: float) -> None:
        """IDLE until the server reports a change or ``seconds`` pass; then DONE."""
        client = self._client
        idle = await self._guard(client.idle_start(timeout=seconds))
        try:
            push = asyncio.ensure_future(client.wait_server_push(timeout=seconds + self.timeout))
            try:
                await asyncio.wait({push, self._lost}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                await cancel_and_wait(push)
            if self._lost.done():
                raise ImapError(f"connection to {self.describe()} lost during IDLE")
        finally:
            if not self._lost.done() and client.has_pending_idle():
                client.idle_done()
                await self._guard(asyncio.shield(idle))
            else:
                idle.cancel()

    async def noop(self) -> None:
        await self._ok(self._client.noop(), "NOOP")

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        if not self._lost.done():
            with contextlib.suppress(Exception):
                async with asyncio.timeout(min(5.0, self.timeout)):
                    await client.logout()
        transport = getattr(client.protocol, "transport", None)
        if transport is not None:
            transport.close()
        if not self._lost.done():
            self._lost.set_result(None)


def _selectable(line: Any) -> bool:
    """A LIST line naming a mailbox one can APPEND to. aioimaplib strips "* LIST": a listed
    mailbox is a line "(\\flags) "/" name". A \\Noselect one is only the parent of others
    (Dovecot lists Public/Faxes so when only Public/Faxes/Sales exists)."""
    if not isinstance(line, bytes | bytearray):
        return False
    line = bytes(line).lstrip(b"* LIST")
    if not line.startswith(b"("):
        return False
    flags = line[1:line.find(b")")].lower().split()
    return b"\\noselect" not in flags and b"\\nonexistent" not in flags


def _text(response: Any) -> str:
    parts = [bytes(line).decode("utf-8", "replace") for line in response.lines
             if isinstance(line, bytes | bytearray)]
    return " ".join(" ".join(parts).split())[:300]
