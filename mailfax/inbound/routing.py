"""Who gets a received fax, and how: pure, from what the provider said about it (called
number, caller id, station id, account) and the configured rules (``[[inbound.rules]]``, or
the older ``routes``/``default_route``)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mailfax.config import InboundFormat, InboundRoute, InboundSettings
from mailfax.support.lazy import lazy_module

if TYPE_CHECKING:
    import phonenumbers

    from mailfax.store.base import InboundRecord
else:  # the first received fax loads it, not serve's start-up
    phonenumbers = lazy_module("phonenumbers")


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


# -- routing rules ([[inbound.rules]]) -------------------------------------------------------


# A station id is at most 20 characters (T.30); only this much of what a provider says is
# searched, so a configured regular expression never runs long on a hostile value.
MAX_TSI = 64


@dataclass(frozen=True)
class FaxFacts:
    """What a received fax is routed on (as the provider said; untrusted, only compared)."""

    called: str
    caller: str = ""
    tsi: str = ""  # the remote station id
    account: str = ""


def facts_of(record: InboundRecord) -> FaxFacts:
    return FaxFacts(called=record.called_number, caller=record.originator,
                    tsi=record.remote_id, account=record.account)


@dataclass(frozen=True)
class RouteChoice:
    """The rule that matched, its number (1-based; None for the implicit last rule) and why."""

    rule: InboundRoute
    number: int | None
    reasons: tuple[str, ...]

    @property
    def label(self) -> str:
        name = f" {self.rule.name!r}" if self.rule.name else ""
        return f"rule {self.number}{name}" if self.number is not None else (
            f"the implicit default{name}")


def effective_rules(settings: InboundSettings) -> tuple[list[InboundRoute], InboundRoute | None]:
    """The rules to try and the implicit last one (None when the last rule matches every fax).

    The older form (``routes``: called number → addresses, ``default_route``) is read as rules
    matching the called number exactly, then the default route; without a default rule the
    postmaster gets the fax: never nowhere."""
    rules = list(settings.rules) or [
        InboundRoute(name=f"routes.{number}", called=[number], to=list(addresses))
        for number, addresses in settings.routes.items() if addresses]
    if rules and rules[-1].matches_everything:
        return rules, None
    if not settings.rules and settings.default_route:
        return rules, InboundRoute(name="default_route", to=list(settings.default_route))
    return rules, InboundRoute(name="postmaster", to=[settings.postmaster])


def choose_route(facts: FaxFacts, settings: InboundSettings,
                 default_country: str) -> RouteChoice:
    """The first rule that matches ``facts`` (else the implicit default), with the reasons."""
    rules, fallback = effective_rules(settings)
    for number, rule in enumerate(rules, start=1):
        reasons = rule_reasons(rule, facts, default_country)
        if reasons is not None:
            return RouteChoice(rule, number, tuple(reasons))
    assert fallback is not None  # when the last rule matches everything, it matched
    return RouteChoice(fallback, None, ("no rule matched",))


def rule_reasons(rule: InboundRoute, facts: FaxFacts, default_country: str
                 ) -> list[str] | None:
    """Why ``rule`` matches ``facts`` (one sentence per match field), or None if it does not."""
    reasons: list[str] = []
    called = normalise_number(facts.called, default_country) if facts.called.strip() else ""
    caller = normalise_number(facts.caller, default_country) if facts.caller.strip() else ""
    for what, value, exact, prefixes in (("called", called, rule.called, rule.called_prefix),
                                         ("caller", caller, rule.caller, rule.caller_prefix)):
        if exact:
            if _exact(value, exact, default_country) is None:
                return None
            reasons.append(f"{what} {value} is one of {', '.join(exact)}")
        if prefixes:
            prefix = _prefix(value, prefixes)
            if prefix is None:
                return None
            reasons.append(f"{what} {value} starts with {prefix}")
    if rule.account:
        if facts.account not in rule.account:
            return None
        reasons.append(f"account {facts.account}")
    if rule.tsi is not None:
        found = re.search(rule.tsi, facts.tsi[:MAX_TSI], re.IGNORECASE)
        if found is None:
            return None
        reasons.append(f"station id {facts.tsi!r} matches /{rule.tsi}/")
    return reasons or ["matches every fax"]


def _exact(number: str, wanted: Sequence[str], default_country: str) -> str | None:
    for entry in wanted:
        if number and normalise_number(entry, default_country) == number:
            return number
    return None


def _prefix(number: str, prefixes: Sequence[str]) -> str | None:
    matching = [prefix for prefix in prefixes if number.startswith(prefix)]
    return max(matching, key=len) if number and matching else None


def envelope_recipients(rule: InboundRoute, postmaster: str, tell_postmaster: bool
                        ) -> list[str]:
    """To, Cc and Bcc (and the postmaster when told), each address once, in that order."""
    addresses = [*rule.to, *rule.cc, *rule.bcc]
    if tell_postmaster or rule.notify_postmaster:
        addresses.append(postmaster)
    seen: set[str] = set()
    unique = []
    for address in addresses:
        if address.lower() not in seen:
            seen.add(address.lower())
            unique.append(address)
    return unique


def attachment_format(rule: InboundRoute, attach_tiff: bool) -> InboundFormat:
    """The rule's attachment format; unset: PDF, and the TIFF too with ``attach_tiff``."""
    if rule.format is not None:
        return rule.format
    return "pdf+tiff" if attach_tiff else "pdf"
