"""SMTP users: scrypt password hashes (standard library) and a throttle for failed logins.

A hash looks like ``scrypt$16384$8$1$<salt>$<key>`` (base64), so the cost can be raised later
without breaking stored hashes. Verification compares in constant time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

from mailfax.trust.ratelimit import SlidingWindow

SCRYPT_N = 2**14  # about 16 MiB and a few tens of milliseconds per check
SCRYPT_R = 8
SCRYPT_P = 1
KEY_BYTES = 32


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    key = _scrypt(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
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


class LoginThrottle(SlidingWindow):
    """At most ``max_failures`` failed logins per client address within ``window`` seconds;
    after that the address is refused without checking the password until the window clears."""

    def __init__(self, max_failures: int = 5, window: float = 300.0):
        super().__init__(max_failures, window)

    def blocked(self, client: str, now: float | None = None) -> bool:
        return self.full(client, now)

    def failed(self, client: str, now: float | None = None) -> None:
        self.add(client, now)

    def succeeded(self, client: str) -> None:
        self.forget(client)
