"""The dial policy refuses costly and voice-only destinations before a job exists."""

from __future__ import annotations

from typing import Any, cast

import pytest

from mailfax.config import Settings
from mailfax.intake.assemble import Refusal
from mailfax.intake.service import Intake
from mailfax.store.base import Store
from mailfax.trust.dialing import DialPolicySettings, check_destination


@pytest.mark.parametrize("number", ["+499001234567", "+19005550123", "+491801234567"])
def test_premium_and_shared_cost_numbers_are_refused(number: str) -> None:
    verdict = check_destination(number, DialPolicySettings(), "DE")
    assert not verdict.allowed
    assert number in verdict.sentence


def test_a_digit_too_many_does_not_slip_past_the_type_check() -> None:
    verdict = check_destination("+4990012345678", DialPolicySettings(), "DE")
    assert not verdict.allowed
    assert "not a valid number" in verdict.sentence


def test_ordinary_fixed_line_numbers_pass() -> None:
    for number in ["+4930123456", "+4922198765", "+4940555123", "+43159900"]:
        assert check_destination(number, DialPolicySettings(), "DE").allowed, number


def test_countries_and_prefix_lists() -> None:
    policy = DialPolicySettings(allowed_countries=["de"], deny_prefixes=["+4940"],
                                allow_prefixes=["+4940555"])
    assert not check_destination("+43159900", policy, "DE").allowed
    assert not check_destination("+4940123456", policy, "DE").allowed
    assert check_destination("+4940555123", policy, "DE").allowed


def test_unknown_number_type_names_are_a_config_error() -> None:
    with pytest.raises(ValueError, match="unknown number types"):
        DialPolicySettings(refused_types=["premium"])


@pytest.mark.parametrize(("number", "words"), [
    ("+881631234567", "+881 is the Global Mobile Satellite System"),
    ("+88163123", "+881 is the Global Mobile Satellite System"),
    ("+80812345678", "+808 is the international shared-cost service"),
    ("+97912345678", "+979 is the international premium-rate service"),
    ("+882345678901", "+882 is international networks"),
    ("+88312345678", "+883 is international networks"),
    ("+252612345678", "(Somalia, SO) are not allowed here"),
    ("+18765551234", "(Jamaica, JM) are not allowed here"),  # +1, but not the US or Canada
    ("+5511987654321", "(Brazil, BR) are not allowed here"),
])
def test_satellite_shared_cost_and_far_countries_are_refused_by_default(
        number: str, words: str) -> None:
    verdict = check_destination(number, DialPolicySettings(), "DE")
    assert not verdict.allowed and verdict.status == "5.7.1"
    assert words in verdict.sentence and number in verdict.sentence


@pytest.mark.parametrize("number", ["+4930123456", "+33142345678", "+390612345678",
                                    "+41446681800", "+442079460000", "+12125550100",
                                    "+14165550100", "+4722123456"])
def test_the_home_country_europe_and_north_america_are_allowed_by_default(number: str) -> None:
    assert check_destination(number, DialPolicySettings(), "DE").allowed, number


def test_home_is_the_configured_default_country() -> None:
    assert not check_destination("+61298765432", DialPolicySettings(), "DE").allowed
    assert check_destination("+61298765432", DialPolicySettings(), "AU").allowed
    verdict = check_destination("+61298765432", DialPolicySettings(), "DE")
    assert "allowed countries: DE, EEA, CH, GB, US, CA" in verdict.sentence


def test_configuration_opens_countries_and_ranges() -> None:
    every = DialPolicySettings(allowed_countries=["*"])
    assert check_destination("+252612345678", every, "DE").allowed
    assert not check_destination("+881631234567", every, "DE").allowed  # ranges: separate
    opened = DialPolicySettings(allowed_countries=["*"], refused_ranges=[])
    assert check_destination("+881631234567", opened, "DE").allowed
    one = DialPolicySettings(allow_prefixes=["+8816"], allowed_countries=["home", "so"])
    assert check_destination("+881631234567", one, "DE").allowed
    assert not check_destination("+881231234567", one, "DE").allowed
    assert check_destination("+252612345678", one, "DE").allowed
    assert not check_destination("+33142345678", one, "DE").allowed  # no EEA now
    closed = DialPolicySettings(refused_ranges=["+808", "+3314"])
    assert not check_destination("+33142345678", closed, "DE").allowed


@pytest.mark.parametrize("countries", [[], ["Germany"], ["E1"], ["home", "XYZ"]])
def test_allowed_countries_must_name_something(countries: list[str]) -> None:
    with pytest.raises(ValueError, match=r'is empty|not a country code') as refused:
        DialPolicySettings(allowed_countries=countries)
    if not countries:  # it used to mean every country: the error says how to write that
        assert '["*"]' in str(refused.value)


def test_the_refusal_comes_at_rcpt_and_names_the_range() -> None:
    """Through Intake, as SMTP's RCPT asks (no store needed to check a recipient)."""
    intake = Intake(Settings(), cast(Store, object()))
    with pytest.raises(Refusal) as refused:
        intake.check_recipient("00881631234567@fax.local")
    assert refused.value.code == 550 and "Global Mobile Satellite System" in (
        refused.value.sentence)
    with pytest.raises(Refusal) as refused:
        intake.check_recipient("+252612345678@fax.local")
    assert "Somalia" in refused.value.sentence
    assert intake.check_recipient("0033142345678@fax.local").number == "+33142345678"
    assert intake.check_recipient("030123456@fax.local").number == "+4930123456"
    opened = Intake(Settings.model_validate(cast(dict[str, Any], {
        "dial": {"allowed_countries": ["*"], "refused_ranges": []}})), cast(Store, object()))
    assert opened.check_recipient("+252612345678@fax.local").number == "+252612345678"
    assert opened.check_recipient("00881631234567@fax.local").number == "+881631234567"
