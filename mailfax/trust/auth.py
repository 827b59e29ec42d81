"""SMTP users: scrypt password hashes (standard library) and a throttle for failed logins
(per client address and per user name).

A hash looks like ``scrypt$16384$8$1$<salt>$<key>`` (base64), so the cost can be raised later
without breaking stored hashes. Verification compares in constant time.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import secrets
from collections.abc import AsyncIterator

from mailfax.trust.ratelimit import SlidingWindow

SCRYPT_N = 2**14  # about 16 MiB and a few tens of milliseconds per check
SCRYPT_R = 8
SCRYPT_P = 1
KEY_BYTES = 32


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    key = _scrypt(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    return _encoded(salt, key)


def unmatchable_hash() -> str:
    """A hash like :func:`hash_password`'s that no password matches: its key is random, not
    derived. Checking a password against it costs what checking a real one costs (so the
    check for an unknown user does), and making it costs nothing (a real hash: 0.05 s)."""
    return _encoded(secrets.token_bytes(16), secrets.token_bytes(KEY_BYTES))


def _encoded(salt: bytes, key: bytes) -> str:
    return "$".join(["scrypt", str(SCRYPT_N), str(SCRYPT_R), str(SCRYPT_P),
                     _b64(salt), _b64(key)])


def verify_password(password: str, encoded: str) -> bool:
    """True if ``password`` matches ``encoded``; False for a wrong password or a bad hash."""
    try:
        scheme, n, r, p, salt, key = encoded.split("$")
        if scheme != "scrypt":
            return False
        wanted = base64.b64decode(key)
        found = _scrypt(password, base64.b64decode(salt), int(n), int(r), int(p))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(found, wanted)


def is_password_hash(value: str) -> bool:
    parts = value.split("$")
    return len(parts) == 6 and parts[0] == "scrypt" and all(parts[1:4]) and parts[1].isdigit()


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p,
                          maxmem=256 * 1024 * 1024, dklen=KEY_BYTES)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class LoginThrottle:
    """Failed logins, counted per client address *and* per user name, each at most
    ``max_failures`` within ``window`` seconds; beyond that, logins from that address, or as
    that user, are refused without checking the password until the window clears.

    A successful login forgets that user's failures (from anywhere, and the address's failures
    for that user) but not the address's failures for other users: an attacker with one
    account of its own cannot reset its count by logging in to it in between. A check in
    progress is not a failure; instead, no more checks run at once for an address or a user
    name than failures it has left (:meth:`checking`), so parallel sessions cannot get more
    guesses than the limit, while parallel correct logins all pass (they wait their turn).
    """

    def __init__(self, max_failures: int = 5, window: float = 300.0):
        self.max_failures = max_failures
        self._clients = SlidingWindow(max_failures, window)  # tagged with the user tried
        self._users = SlidingWindow(max_failures, window)
        self._running: dict[str, int] = {}  # checks in progress per "client:…"/"user:…" key
        self._finished: asyncio.Condition | None = None

    def __len__(self) -> int:
        """How many addresses and user names are remembered (for memory bounds)."""
        return len(self._clients) + len(self._users)

    def blocked(self, client: str, user: str = "", now: float | None = None) -> bool:
        return self._clients.full(client, now) or (
            bool(user) and self._users.full(user, now))

    def failed(self, client: str, user: str = "", now: float | None = None) -> None:
        self._clients.add(client, now, tag=user)
        if user:
            self._users.add(user, now)

    def succeeded(self, client: str, user: str = "") -> None:
        self._clients.forget(client, tag=user)
        self._users.forget(user)

    @contextlib.asynccontextmanager
    async def checking(self, client: str, user: str) -> AsyncIterator[None]:
        """Hold one of the check slots of ``client`` and ``user`` for the block: wait while
        their failures plus the checks in progress reach the limit (returns at once when the
        failures alone do: :meth:`blocked` then refuses)."""
        if self._finished is None:
            self._finished = asyncio.Condition()
        keys = (f"client:{client}", f"user:{user}")
        async with self._finished:
            await self._finished.wait_for(lambda: self._has_room(client, user, keys))
            for key in keys:
                self._running[key] = self._running.get(key, 0) + 1
        try:
            yield
        finally:
            async with self._finished:
                for key in keys:
                    self._running[key] -= 1
                    if not self._running[key]:
                        del self._running[key]
                self._finished.notify_all()

    def _has_room(self, client: str, user: str, keys: tuple[str, str]) -> bool:
        if self.blocked(client, user):
            return True  # no need to wait for a refusal
        used = (self._clients.count(client), self._users.count(user))
        return all(failures + self._running.get(key, 0) < self.max_failures
                   for failures, key in zip(used, keys, strict=True))
