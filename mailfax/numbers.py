"""Fax numbers in mail addresses: ``030-123456+cover@fax.local`` → ``+4930123456``, ``cover``.

Pure logic on top of phonenumbers. The local part of an address is untrusted input: anything but
digits, a leading ``+``, the usual separators and an RFC 5233 sub-address tag is refused with a
sentence that says what is wrong.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mailfax.support.lazy import lazy_module

if TYPE_CHECKING:
    import phonenumbers
else:  # the first recipient loads it (0.03 s), not serve's start-up
    phonenumbers = lazy_module("phonenumbers")

SEPARATORS = " -./()"
MIN_NATIONAL_DIGITS = 4  # phonenumbers deems two digits "possible" in some countries
MAX_DIGITS = 17  # E.164 allows 15; leave room for a national trunk prefix
_TAG = re.compile(r"^[A-Za-z0-9_-]{1,32}$")


class InvalidNumber(ValueError):
    """A local part that is not a fax number; ``sentence`` is fit for an SMTP reply."""

    def __init__(self, sentence: str):
        super().__init__(sentence)
        self.sentence = sentence


@dataclass(frozen=True)
class FaxAddress:
    number: str  # E.164, e.g. "+4930123456"
    tag: str = ""  # RFC 5233 sub-address, lower case, e.g. "cover"


def parse_fax_local_part(local: str, default_country: str) -> FaxAddress:
    """Parse the local part of a fax address (or a number typed on the command line)."""
    text = _unquote(local.strip())
    _refuse_strange_characters(local, text)
    number_text, tag = _split_tag(text)
    digits = _strip_separators(local, number_text)
    return FaxAddress(number=_to_e164(local, digits, default_country), tag=tag)


def format_international(e164: str) -> str:
    """``+4930123456`` → ``+49 30 123456`` for people to read."""
    try:
        parsed = phonenumbers.parse(e164, None)
    except phonenumbers.NumberParseException as error:
        raise ValueError(f"{e164!r} is not an E.164 number") from error
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.INTERNATIONAL)


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == text[-1] == '"':
        return text[1:-1].replace('\\"', '"').replace("\\\\", "\\")
    return text


def _refuse_strange_characters(original: str, text: str) -> None:
    shown = _shown(original)
    if not text:
        raise InvalidNumber("The address has no fax number before the @.")
    for char in text:
        if not char.isascii() or not char.isprintable():
            name = unicodedata.name(char, f"U+{ord(char):04X}")
            raise InvalidNumber(f"{shown} is not a fax number: it contains the character "
                                f"{name}; use the digits 0-9 only.")


def _split_tag(text: str) -> tuple[str, str]:
    """``030123456+cover`` → (``030123456``, ``cover``); a leading ``+`` is the country sign."""
    head, plus, tail = text[1:].rpartition("+")
    if not plus:
        return text, ""
    if not _TAG.match(tail):
        raise InvalidNumber(f"{_shown(text)} is not a fax number: {tail!r} after the + is not "
                            f"a valid tag (letters, digits, - and _ only).")
    return text[0] + head, tail.lower()


def _strip_separators(original: str, text: str) -> str:
    cleaned = "".join(char for char in text if char not in SEPARATORS)
    if cleaned.startswith("00"):
        cleaned = "+" + cleaned[2:]
    body = cleaned[1:] if cleaned.startswith("+") else cleaned
    if not body.isdigit():
        raise InvalidNumber(f"{_shown(original)} is not a fax number: only digits, a leading + "
                            f"and the separators - . / ( ) may appear before the @.")
    if len(body) > MAX_DIGITS:
        raise InvalidNumber(f"{_shown(original)} is too long for a phone number "
                            f"(at most 15 digits in international form).")
    return cleaned


def _to_e164(original: str, digits: str, default_country: str) -> str:
    try:
        parsed = phonenumbers.parse(digits, default_country)
    except phonenumbers.NumberParseException:
        raise InvalidNumber(f"{_shown(original)} is not a fax number.") from None
    if len(str(parsed.national_number)) < MIN_NATIONAL_DIGITS \
            or not phonenumbers.is_possible_number(parsed):
        raise InvalidNumber(f"{_shown(original)} is not a possible phone number "
                            f"(wrong length for its country); check the digits.")
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)


def _shown(text: str) -> str:
    """The user's input, safe to quote in one line of an SMTP reply."""
    printable = "".join(char if char.isascii() and char.isprintable() else "?" for char in text)
    return f'"{printable[:40]}"'
