"""Per-mail options (issue 20): what a sender asks of one fax, read from the mail itself.

Three places, in the conventions fax users know:

* the recipient address tag: ``030123456+cover@fax.local`` / ``+nocover`` (any recipient with
  ``+cover`` turns the cover page on, ``+nocover`` on all of them turns it off);
* ``X-Fax-*`` header fields, like HylaFAX's ``X-FAX-<param>``: ``X-Fax-Send-At``,
  ``X-Fax-Delay``, ``X-Fax-Header``, ``X-Fax-Station-Id``, ``X-Fax-Resolution``,
  ``X-Fax-Cover``, ``X-Fax-Priority``, ``X-Fax-Notify``, ``X-Fax-Return-Document``;
* subject codes (``[options] subject_codes = true``, off by default), InterFAX style:
  ``/d 2026-12-24 08:00``, ``/delay 2h``, ``/r fine``, ``/c no``, ``/p bulk``, ``/n failure``;
  they are taken out of the subject.

The result is a dict with the keys of OPTIONS.md (absent: the configured default), or a
:class:`~mailfax.intake.assemble.Refusal` naming the field and the value. Two places asking
for different values of one option are refused too: which one was meant cannot be guessed.
Pure: no I/O, the time is passed in.
"""

from __future__ import annotations

import email.parser
import email.policy
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any

from mailfax.intake.assemble import Refusal
from mailfax.intake.spool import MailBytes
from mailfax.trust.authorization import header_end

BAD_VALUE = (554, "5.6.0")
# A time within this much of now is "now" (a time written to the minute is not yet past
# while its minute lasts).
NOW_GRACE = timedelta(seconds=60)
HEADER_MAX = 100  # longer than any provider's header line (each one's limit is checked apart)
STATION_ID_MAX = 20  # T.30's TSI/CSID is 20 characters

CHOICES: dict[str, tuple[str, ...]] = {
    "resolution": ("standard", "fine"),
    "priority": ("normal", "bulk"),
    "notify": ("none", "failure", "all"),
}
YES_NO = {"yes": True, "no": False}

# header field (lower case) -> option key; send-at and delay both give send_at
HEADER_FIELDS: dict[str, str] = {
    "x-fax-send-at": "send_at", "x-fax-delay": "send_at", "x-fax-header": "header",
    "x-fax-station-id": "station_id", "x-fax-resolution": "resolution",
    "x-fax-cover": "cover", "x-fax-priority": "priority", "x-fax-notify": "notify",
    "x-fax-return-document": "return_document",
}

_DATE = r"\d{4}-\d{2}-\d{2}[ T]\d{1,2}:\d{2}(?::\d{2})?(?:\s*(?:Z|[+-]\d{2}:?\d{2}))?"
_DELAY = r"(?:\d+\s*[dhms]\s*)+"
# subject code -> (option key, the value's pattern)
SUBJECT_CODES: dict[str, tuple[str, str]] = {
    "d": ("send_at", _DATE), "delay": ("send_at", _DELAY), "r": ("resolution", "fine|standard"),
    "c": ("cover", "yes|no"), "p": ("priority", "normal|bulk"),
    "n": ("notify", "none|failure|all"),
}
_CODE = re.compile(r"(?:^|\s)/(" + "|".join(sorted(SUBJECT_CODES, key=len, reverse=True))
                   + r")(?=\s|$)", re.IGNORECASE)
_DELAY_PART = re.compile(r"(\d+)\s*([dhms])", re.IGNORECASE)
_UNITS = {"d": 86400, "h": 3600, "m": 60, "s": 1}


@dataclass(frozen=True)
class MailOptions:
    options: dict[str, Any]  # OPTIONS.md's keys
    subject: str  # the subject without its option codes


@dataclass(frozen=True)
class Clock:
    """What a relative or local time is read against: now, the sender's zone, the limit."""

    now: datetime  # aware
    zone: tzinfo
    max_ahead: timedelta = timedelta(days=30)


def fax_header_fields(raw: MailBytes) -> list[tuple[str, str]]:
    """The mail's top-level ``X-Fax-*`` fields, (lower-case name, decoded unfolded value)."""
    end = header_end(raw)
    head = bytes(raw[:end if end >= 0 else len(raw)])
    if b"x-fax-" not in head.lower():
        return []
    message = email.parser.BytesParser(policy=email.policy.default).parsebytes(
        head + b"\r\n\r\n", headersonly=True)
    return [(name.lower(), " ".join(str(value).split())) for name, value in message.items()
            if name.lower().startswith("x-fax-")]


def parse_mail_options(fields: Sequence[tuple[str, str]], tags: Iterable[str], subject: str,
                       clock: Clock, *, subject_codes: bool = False) -> MailOptions:
    """The options one mail asks for (see the module's docstring), or a Refusal."""
    found = _Found()
    _from_tags(found, set(tags))
    for name, value in fields:
        _from_field(found, name, value, clock)
    if subject_codes:
        subject = _from_subject(found, subject, clock)
    return MailOptions(options=found.options, subject=subject)


class _Found:
    """The options gathered so far, and where each came from (for a conflict's sentence)."""

    def __init__(self) -> None:
        self.options: dict[str, Any] = {}
        self.sources: dict[str, str] = {}

    def add(self, key: str, value: Any, source: str) -> None:
        if key in self.options and self.options[key] != value:
            raise Refusal(*BAD_VALUE, f"The mail asks for two different {_label(key)}s: "
                          f"{self.sources[key]} and {source}; give one.")
        self.options[key] = value
        self.sources[key] = source


def _label(key: str) -> str:
    return {"send_at": "send time", "return_document": "return-document setting",
            "station_id": "station id", "cover": "cover setting",
            "notify": "notification setting"}.get(key, key)


def _from_tags(found: _Found, tags: set[str]) -> None:
    if "cover" in tags:
        found.add("cover", True, "the address tag +cover")
    elif tags == {"nocover"}:
        found.add("cover", False, "the address tag +nocover")


def _from_field(found: _Found, name: str, value: str, clock: Clock) -> None:
    key = HEADER_FIELDS.get(name)
    if key is None:
        known = ", ".join(_shown_name(field) for field in HEADER_FIELDS)
        raise Refusal(*BAD_VALUE, f"Unknown fax option header {_shown_name(name)}: "
                      f"{value!r}; the known ones are {known}.")
    field = _shown_name(name)
    kind = {"x-fax-delay": "delay", "x-fax-send-at": "time"}.get(name, "")
    found.add(key, _parsed(kind, key, value, field, clock), f"{field}: {value}")


def _shown_name(name: str) -> str:
    """``x-fax-send-at`` → ``X-Fax-Send-At``."""
    return "-".join(part.capitalize() for part in name.split("-"))


def _parsed(kind: str, key: str, value: str, field: str, clock: Clock) -> Any:
    """A header's or code's value: a ``delay`` from now or a ``time`` (both as the UTC ISO
    time to send at), else a value of ``key``; checked."""
    if kind == "delay":
        return _iso(_after_delay(value, field, clock))
    if kind == "time":
        return _iso(_at_time(value, field, clock))
    return _value(key, value, field)


def _value(key: str, value: str, field: str) -> Any:
    """A header's or code's value for ``key``, checked."""
    wanted = value.strip().lower()
    if key in CHOICES:
        if wanted not in CHOICES[key]:
            raise _bad(field, value, " or ".join(CHOICES[key]))
        return wanted
    if key in ("cover", "return_document"):
        if wanted not in YES_NO:
            raise _bad(field, value, "yes or no")
        return YES_NO[wanted]
    return _text(key, value, field)


def _text(key: str, value: str, field: str) -> str:
    text = " ".join(value.split())
    limit = STATION_ID_MAX if key == "station_id" else HEADER_MAX
    if not text:
        raise _bad(field, value, "some text")
    if not all(char.isprintable() for char in text):
        raise _bad(field, value, "printable characters")
    if key == "station_id" and not text.isascii():
        raise _bad(field, value, "letters, digits, + and spaces in ASCII (a fax machine "
                   "shows nothing else)")
    if len(text) > limit:
        raise Refusal(*BAD_VALUE, f"{field}: {text!r} is {len(text)} characters long; at most "
                      f"{limit} fit.")
    return text


def _bad(field: str, value: str, wanted: str) -> Refusal:
    return Refusal(*BAD_VALUE, f"{field}: {value!r} is not a valid value; use {wanted}.")


def _after_delay(value: str, field: str, clock: Clock) -> datetime:
    text = value.strip()
    if not re.fullmatch(_DELAY, text, re.IGNORECASE):
        raise _bad(field, value, "a delay such as 90m, 2h or 1d 12h")
    seconds = sum(int(amount) * _UNITS[unit.lower()]
                  for amount, unit in _DELAY_PART.findall(text))
    return _checked(clock.now + timedelta(seconds=seconds), field, value, clock)


def _at_time(value: str, field: str, clock: Clock) -> datetime:
    """``2026-12-24 08:00`` in the sender's zone, or with its own offset (``+01:00``, ``Z``)."""
    text = value.strip()
    if not re.fullmatch(_DATE, text):
        raise _bad(field, value, "a date and time such as 2026-12-24 08:00 (optionally with "
                   "an offset such as +01:00)")
    try:
        when = datetime.fromisoformat(re.sub(r"\s+(?=[Z+-]\d*:?\d*$)", "", text))
    except ValueError:
        raise _bad(field, value, "a date and time that exists, such as 2026-12-24 08:00") \
            from None
    if when.tzinfo is None:
        local = when.replace(tzinfo=clock.zone)
        if local.astimezone(UTC).astimezone(clock.zone).replace(tzinfo=None) != when:
            raise Refusal(*BAD_VALUE, f"{field}: {value!r} does not exist in {clock.zone} (the "
                          "clocks skip that hour); give another time.")
        when = local
    return _checked(when, field, value, clock)


def _checked(when: datetime, field: str, value: str, clock: Clock) -> datetime:
    if when < clock.now - NOW_GRACE:
        shown = clock.now.astimezone(clock.zone).strftime("%Y-%m-%d %H:%M")
        raise Refusal(*BAD_VALUE, f"{field}: {value!r} is in the past (it is now {shown} "
                      f"{clock.zone}); give a time to come.")
    if when > clock.now + clock.max_ahead:
        days = clock.max_ahead / timedelta(days=1)
        raise Refusal(*BAD_VALUE, f"{field}: {value!r} is more than {days:g} days ahead; "
                      f"faxes can be scheduled at most {days:g} days in advance.")
    return when


def _iso(when: datetime) -> str:
    return when.astimezone(UTC).isoformat(timespec="seconds")


def _from_subject(found: _Found, subject: str, clock: Clock) -> str:
    """Take the subject codes out of ``subject`` into ``found``; the subject left over."""
    kept: list[str] = []
    position = 0
    for match in _CODE.finditer(subject):
        if match.start() < position:
            continue  # inside the previous code's value
        code = match.group(1).lower()
        key, pattern = SUBJECT_CODES[code]
        rest = subject[match.end():]
        value_match = re.match(r"\s+(" + pattern + r")(?=\s|$)", rest, re.IGNORECASE)
        if value_match is None:
            raise Refusal(*BAD_VALUE, f"Subject code /{code}: {rest.strip()[:40]!r} is not a "
                          f"valid value; see the README's \"Per-mail options\".")
        value = value_match.group(1)
        field = f"subject code /{code}"
        kind = {"delay": "delay", "d": "time"}.get(code, "")
        found.add(key, _parsed(kind, key, value, field, clock), f"{field} {value}")
        kept.append(subject[position:match.start()])
        position = match.end() + value_match.end()
    kept.append(subject[position:])
    return " ".join("".join(kept).split())
