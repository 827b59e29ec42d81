"""The signed header by which mailfax's Postfix policy service tells intake who logged in.

Postfix in front authenticates the user (SASL) and asks mailfax's policy service at each RCPT.
When the answer is yes for a logged-in user, it is ``PREPEND X-Mailfax-Authorized: …``: one
header per accepted fax recipient, binding user, envelope sender, recipient and the time with
an HMAC-SHA256 under mailfax's secret key. Postfix queues the mail and hands it to mailfax's
LMTP/SMTP listener, where intake checks and strips the headers and applies that user's account,
quotas and sender binding. A header that mailfax did not make (bad MAC, malformed) refuses the
mail; so does one older than the allowed age (it waited too long in Postfix's queue, or was
copied from another mail).

What cannot be bound: Postfix's queue id (not known yet at the first RCPT) and the message
itself (the policy service answers before DATA). Sender and recipient are compared as Postfix
hands the mail over, so a sender_canonical_maps or virtual_alias_maps rewrite of a fax address
makes the header not apply (the mail is refused, not sent as someone else).

Pure functions; no I/O.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import quote, unquote

if TYPE_CHECKING:
    from mailfax.intake.spool import MailBytes

HEADER = "X-Mailfax-Authorized"
VERSION = "1"
_KEY_CONTEXT = b"mailfax: Postfix policy service authorization, v1"
FUTURE_SLACK = 300  # seconds a header may seem to come from the future (clocks of instances)
_HEADER_LINE = re.compile(rb"^" + HEADER.encode() + rb"[ \t]*:", re.IGNORECASE)


@dataclass(frozen=True)
class Authorization:
    user: str
    sender: str
    recipient: str
    issued: int  # Unix seconds

    def binds(self, envelope_from: str, recipients: Sequence[str]) -> bool:
        """Was this made for a mail with this envelope sender and one of these recipients?"""
        return (self.sender == envelope_from.lower()
                and self.recipient in {address.lower() for address in recipients})


class AuthorizationError(Exception):
    """A header that must refuse the mail; the message is the sentence for the SMTP reply."""


def _key(secret: bytes) -> bytes:
    """A key of its own, so these MACs can never stand in for another use of the secret
    (push tokens)."""
    return hmac.new(secret, _KEY_CONTEXT, hashlib.sha256).digest()


def _mac(secret: bytes, user: str, sender: str, recipient: str, issued: int) -> str:
    message = "\n".join([VERSION, user, sender, recipient, str(issued)]).encode("utf-8")
    digest = hmac.new(_key(secret), message, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode("ascii").rstrip("=")


def _quote(value: str) -> str:
    return quote(value, safe="@.+-_~")


def header_value(secret: bytes, user: str, sender: str, recipient: str, issued: int) -> str:
    """The header's value for this user, envelope sender and recipient at ``issued``."""
    sender, recipient = sender.lower(), recipient.lower()
    mac = _mac(secret, user, sender, recipient, issued)
    return (f"v={VERSION}; user={_quote(user)}; sender={_quote(sender)}; "
            f"rcpt={_quote(recipient)}; ts={issued}; mac={mac}")


def parse_header(secret: bytes, value: str) -> Authorization:
    """The authorization a header states, if mailfax made it; else AuthorizationError."""
    fields: dict[str, str] = {}
    for part in value.split(";"):
        name, equals, content = part.strip().partition("=")
        if not equals or name in fields:
            raise AuthorizationError(f"The mail carries a malformed {HEADER} header.")
        fields[name] = content
    try:
        if fields.pop("v") != VERSION:
            raise ValueError
        user, sender, recipient = (unquote(fields.pop(name), errors="strict")
                                   for name in ("user", "sender", "rcpt"))
        issued = int(fields.pop("ts"))
        mac = fields.pop("mac")
    except (KeyError, ValueError):
        raise AuthorizationError(f"The mail carries a malformed {HEADER} header.") from None
    expected = _mac(secret, user, sender, recipient, issued)
    if fields or not hmac.compare_digest(mac.encode("ascii", "replace"), expected.encode()):
        raise AuthorizationError(f"The mail carries an {HEADER} header that mailfax did not "
                                 f"make.")
    return Authorization(user=user, sender=sender, recipient=recipient, issued=issued)


def authorized_user(secret: bytes | None, values: Sequence[str], envelope_from: str,
                    recipients: Sequence[str], now: float, max_age: float) -> str | None:
    """The user that the headers ``values`` name for this mail, None without headers.

    Every header must be mailfax's own. Those that bind this mail (sender and a recipient)
    must be fresh and name one user; headers that bind other recipients are from the same
    Postfix transaction (recipients Postfix refused later, or delivered elsewhere) and are
    ignored, but at least one must bind this mail.
    """
    if not values:
        return None
    if secret is None:
        raise AuthorizationError(f"The mail carries an {HEADER} header, which mailfax cannot "
                                 f"check here.")
    found = [parse_header(secret, value) for value in values]
    binding = [item for item in found if item.binds(envelope_from, recipients)]
    if not binding:
        raise AuthorizationError(f"The mail's {HEADER} header was made for another mail "
                                 f"(sender or recipients differ).")
    users = {item.user for item in binding}
    if len(users) > 1:
        raise AuthorizationError(f"The mail's {HEADER} headers name different users.")
    for item in binding:
        if not -FUTURE_SLACK <= now - item.issued <= max_age:
            raise AuthorizationError(
                f"The mail's authorization (given when it was sent to the mail server) is "
                f"older than {max_age:.0f} seconds; please send it again.")
    return users.pop()


def header_end(raw: MailBytes) -> int:
    """Where the blank line that ends the header section starts (the first CRLF CRLF or LF
    LF), -1 if there is none. Neither search goes past it: an unbounded ``find(b"\\n\\n")``
    reads the whole of a CRLF mail (0.1 s for 30 MB, on the event loop)."""
    crlf = raw.find(b"\r\n\r\n")
    lf = raw.find(b"\n\n", 0, len(raw) if crlf < 0 else crlf + 1)
    found = [position for position in (crlf, lf) if position >= 0]
    return min(found) if found else -1


def strip_headers(raw: MailBytes) -> tuple[MailBytes, list[str]]:
    """The mail without its top-level ``X-Mailfax-Authorized`` fields, and their unfolded
    values. Only the header section is touched; line endings stay as they were.

    Runs on every mail, on the event loop: a mail without the field (nearly all) is returned
    as it is, and only the header section is ever split into lines, not a 30 MB body.
    """
    blank = header_end(raw)
    end = blank if blank >= 0 else len(raw)
    if HEADER.lower().encode() not in raw[:end].lower():
        return raw, []
    body_start = raw.find(b"\n", blank) + 1 if blank >= 0 else len(raw)  # the blank line's start
    lines = raw[:body_start].splitlines(keepends=True)
    kept: list[bytes] = []
    values: list[str] = []
    current: list[bytes] | None = None
    for index, line in enumerate(lines):
        if current is not None and line[:1] in (b" ", b"\t"):
            current.append(line)
            continue
        if current is not None:
            values.append(_unfold(current))
            current = None
        if line in (b"\r\n", b"\n"):  # end of the header section
            kept.extend(lines[index:])
            break
        if _HEADER_LINE.match(line):
            current = [line]
        else:
            kept.append(line)
    if current is not None:
        values.append(_unfold(current))
    return b"".join(kept) + raw[body_start:], values


def _unfold(lines: list[bytes]) -> str:
    text = b"".join(line.rstrip(b"\r\n") for line in lines).decode("utf-8", "replace")
    return " ".join(text.split(":", 1)[1].split())
