"""The dial policy: which numbers a fax may go to. Pure, on phonenumbers' metadata.

A mail-to-fax gateway is a toll-fraud target, so premium-rate and other costly or voice-only
number types are refused by default, before a job exists.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, field_validator

# phonenumbers.PhoneNumberType attributes by name (phonenumbers is imported where used: it
# costs ~25 ms, and the config loads this module for every command)
TYPE_NAMES: dict[str, str] = {
    "premium_rate": "PREMIUM_RATE",
    "shared_cost": "SHARED_COST",
    "personal_number": "PERSONAL_NUMBER",
    "uan": "UAN",
    "voicemail": "VOICEMAIL",
    "pager": "PAGER",
    "voip": "VOIP",
    "toll_free": "TOLL_FREE",
    "mobile": "MOBILE",
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


# The European Economic Area: the EU's 27 and Iceland, Liechtenstein, Norway.
EEA = ("AT", "BE", "BG", "CY", "CZ", "DE", "DK", "EE", "ES", "FI", "FR", "GR", "HR", "HU",
       "IE", "IT", "LT", "LU", "LV", "MT", "NL", "PL", "PT", "RO", "SE", "SI", "SK",
       "IS", "LI", "NO")
HOME = "home"  # in allowed_countries: numbers.default_country
EVERY_COUNTRY = "*"
COUNTRY_GROUPS: dict[str, tuple[str, ...]] = {"EEA": EEA}
# The default: the home country, the EEA, Switzerland, the UK, and the US and Canada (of the
# +1 area only those two: not the Caribbean +1 countries that one-ring fraud uses).
DEFAULT_COUNTRIES = (HOME, "EEA", "CH", "GB", "US", "CA")

# Non-geographic ranges refused by default (ITU-T E.164 shared codes): costly, and classic
# toll-fraud destinations. A range is opened with allow_prefixes (e.g. "+8816") or by leaving
# it out of refused_ranges.
RANGE_NAMES: dict[str, str] = {
    "+881": "the Global Mobile Satellite System (satellite phones)",
    "+882": "international networks (satellite and other carriers)",
    "+883": "international networks",
    "+979": "the international premium-rate service",
    "+808": "the international shared-cost service",
}


class DialPolicySettings(BaseModel):
    # Built when first validated (inside the config's Settings), not on import.
    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)
    # ISO country codes that may be dialled; "home" is numbers.default_country, "EEA" the
    # European Economic Area, "*" every country.
    allowed_countries: list[str] = Field(default_factory=lambda: list(DEFAULT_COUNTRIES))
    # Non-geographic ranges refused (satellite, international shared-cost and premium-rate).
    refused_ranges: list[str] = Field(default_factory=lambda: list(RANGE_NAMES))
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
    def _countries(cls, values: list[str]) -> list[str]:
        if not values:  # it used to mean every country: say which is meant
            raise ValueError(f'is empty: list the countries faxes may go to, or '
                             f'["{EVERY_COUNTRY}"] for every country')
        countries = []
        for value in values:
            if value.lower() == HOME:
                countries.append(HOME)
            elif value == EVERY_COUNTRY or value.upper() in COUNTRY_GROUPS or (
                    len(value) == 2 and value.isalpha()):
                countries.append(value.upper())
            else:
                raise ValueError(f"{value!r} is not a country code (such as DE), "
                                 f"{', '.join(COUNTRY_GROUPS)}, {HOME!r} or {EVERY_COUNTRY!r}")
        return countries

    @field_validator("allow_prefixes", "deny_prefixes", "refused_ranges")
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


def allowed_regions(policy: DialPolicySettings, home_country: str) -> frozenset[str] | None:
    """The region codes ``allowed_countries`` stands for; None: every country."""
    if EVERY_COUNTRY in policy.allowed_countries:
        return None
    regions: set[str] = set()
    for entry in policy.allowed_countries:
        regions.update((home_country.upper(),) if entry == HOME else
                       COUNTRY_GROUPS.get(entry, (entry,)))
    return frozenset(regions)


def check_destination(e164: str, policy: DialPolicySettings, home_country: str) -> DialVerdict:
    """May a fax go to ``e164`` under the service's dialling policy? ``home_country`` is what
    "home" in ``allowed_countries`` means (``numbers.default_country``). (A user's own
    prefixes are checked by ``Intake.check_user_destination``.)"""
    if any(e164.startswith(prefix) for prefix in policy.allow_prefixes):
        return DialVerdict(True)
    if any(e164.startswith(prefix) for prefix in policy.deny_prefixes):
        return DialVerdict(False, f"Faxes to {e164} are not allowed here.")
    for prefix in policy.refused_ranges:
        if e164.startswith(prefix):
            name = RANGE_NAMES.get(prefix, "a range refused here")
            return DialVerdict(False, f"Faxes to {e164} are refused: {prefix} is {name}, a "
                                      f"costly destination (dial.refused_ranges).")
    import phonenumbers

    number = phonenumbers.parse(e164, None)
    region = phonenumbers.region_code_for_number(number) or "ZZ"
    regions = allowed_regions(policy, home_country)
    if regions is not None and region not in regions:
        from phonenumbers import geocoder  # its data costs 0.4 s to import: only when needed

        country = geocoder.country_name_for_number(number, "en") or "international"
        return DialVerdict(False, f"Faxes to {e164} ({country}, {region}) are not allowed "
                                  f"here; allowed countries: "
                                  f"{describe_countries(policy, home_country)} "
                                  f"(dial.allowed_countries).")
    if not policy.allow_unrecognised and not phonenumbers.is_valid_number(number):
        return DialVerdict(False, f"{e164} is not a valid number in the numbering plan of "
                                  f"{region}; check it.", status="5.1.1")
    number_type = phonenumbers.number_type(number)
    for name in policy.refused_types:
        if number_type == getattr(phonenumbers.PhoneNumberType, TYPE_NAMES[name]):
            return DialVerdict(False, f"{e164} is {TYPE_SENTENCES[name]}; faxes to such "
                                      f"numbers are refused.")
    return DialVerdict(True)


def describe_countries(policy: DialPolicySettings, home_country: str) -> str:
    """``allowed_countries`` for a refusal: "DE, EEA, CH, …" with "home" resolved."""
    return ", ".join(dict.fromkeys(home_country.upper() if entry == HOME else entry
                                   for entry in policy.allowed_countries))
