"""The dial policy: which numbers a fax may go to. Pure, on phonenumbers' metadata.

A mail-to-fax gateway is a toll-fraud target, so premium-rate and other costly or voice-only
number types are refused by default, before a job exists.
"""

from __future__ import annotations

from dataclasses import dataclass

import phonenumbers
from phonenumbers import PhoneNumberType
from pydantic import BaseModel, ConfigDict, Field, field_validator

TYPE_NAMES: dict[str, int] = {
    "premium_rate": PhoneNumberType.PREMIUM_RATE,
    "shared_cost": PhoneNumberType.SHARED_COST,
    "personal_number": PhoneNumberType.PERSONAL_NUMBER,
    "uan": PhoneNumberType.UAN,
    "voicemail": PhoneNumberType.VOICEMAIL,
    "pager": PhoneNumberType.PAGER,
    "voip": PhoneNumberType.VOIP,
    "toll_free": PhoneNumberType.TOLL_FREE,
    "mobile": PhoneNumberType.MOBILE,
}

TYPE_SENTENCES: dict[str, str] = {
    "premium_rate": "a premium-rate number",
    "shared_cost": "a shared-cost number",
    "personal_number": "a personal (follow-me) number",
    "uan": "a universal access number",
    "voicemail": "a voicemail number",
    "pager": "a pager number",
    "voip": "a VoIP number",
    "toll_free": "a toll-free number",
    "mobile": "a mobile number",
}


class DialPolicySettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    # ISO country codes that may be dialled; empty: every country.
    allowed_countries: list[str] = Field(default_factory=list)
    # Number types that are refused (phonenumbers' classification).
    refused_types: list[str] = Field(default_factory=lambda: [
        "premium_rate", "shared_cost", "personal_number", "uan", "voicemail", "pager"])
    # E.164 prefixes always allowed (checked first) or always refused.
    allow_prefixes: list[str] = Field(default_factory=list)
    deny_prefixes: list[str] = Field(default_factory=list)
    # Numbers phonenumbers does not know as valid (new ranges, or crafted ones that slip past
    # a type check: +49 900 with a digit too many) are refused unless this is on.
    allow_unrecognised: bool = False

    @field_validator("refused_types")
    @classmethod
    def _known_types(cls, values: list[str]) -> list[str]:
        unknown = sorted(set(values) - set(TYPE_NAMES))
        if unknown:
            raise ValueError(f"unknown number types {unknown}; known: {sorted(TYPE_NAMES)}")
        return values

    @field_validator("allowed_countries")
    @classmethod
    def _upper(cls, values: list[str]) -> list[str]:
        return [value.upper() for value in values]

    @field_validator("allow_prefixes", "deny_prefixes")
    @classmethod
    def _e164_prefixes(cls, values: list[str]) -> list[str]:
        return e164_prefixes(values)


def e164_prefixes(values: list[str]) -> list[str]:
    """A validator for settings that list E.164 prefixes (``+49``, ``+4930``)."""
    for value in values:
        if not value.startswith("+") or not value[1:].isdigit():
            raise ValueError(f"{value!r} is not an E.164 prefix such as +49 or +4930")
    return values


@dataclass(frozen=True)
class DialVerdict:
    allowed: bool
    sentence: str = ""
    status: str = "5.7.1"  # 5.1.1 when the number itself is bad, 5.7.1 when it is forbidden


def check_destination(e164: str, policy: DialPolicySettings) -> DialVerdict:
    """May a fax go to ``e164`` under the service's dialling policy? (A user's own prefixes
    are checked by ``Intake.check_user_destination``.)"""
    if any(e164.startswith(prefix) for prefix in policy.allow_prefixes):
        return DialVerdict(True)
    if any(e164.startswith(prefix) for prefix in policy.deny_prefixes):
        return DialVerdict(False, f"Faxes to {e164} are not allowed here.")
    number = phonenumbers.parse(e164, None)
    region = phonenumbers.region_code_for_number(number) or "ZZ"
    if policy.allowed_countries and region not in policy.allowed_countries:
        return DialVerdict(False, f"Faxes to {e164} ({region}) are not allowed here; allowed "
                                  f"countries: {', '.join(policy.allowed_countries)}.")
    if not policy.allow_unrecognised and not phonenumbers.is_valid_number(number):
        return DialVerdict(False, f"{e164} is not a valid number in the numbering plan of "
                                  f"{region}; check it.", status="5.1.1")
    number_type = phonenumbers.number_type(number)
    for name in policy.refused_types:
        if number_type == TYPE_NAMES[name]:
            return DialVerdict(False, f"{e164} is {TYPE_SENTENCES[name]}; faxes to such "
                                      f"numbers are refused.")
    return DialVerdict(True)
