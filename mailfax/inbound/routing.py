"""Who gets a received fax: pure, from the called number and the configured routes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import phonenumbers


def normalise_number(number: str, default_country: str) -> str:
    """E.164 if the number parses, else the digits and a leading + as given."""
    cleaned = number.strip()
    try:
        parsed = phonenumbers.parse(cleaned, default_country)
    except phonenumbers.NumberParseException:
        return "".join(ch for ch in cleaned if ch.isdigit() or ch == "+")
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)


def recipients_for(called_number: str, routes: Mapping[str, Sequence[str]],
                   default_route: Sequence[str], postmaster: str,
                   default_country: str) -> list[str]:
    """The mail addresses for a fax to ``called_number``: its route, else the default route,
    else the postmaster. Never empty."""
    called = normalise_number(called_number, default_country)
    for number, addresses in routes.items():
        if addresses and normalise_number(number, default_country) == called:
            return list(addresses)
    if default_route:
        return list(default_route)
    return [postmaster]
