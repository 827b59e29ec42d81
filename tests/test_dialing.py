"""The dial policy refuses costly and voice-only destinations before a job exists."""

from __future__ import annotations

import pytest

from mailfax.trust.dialing import DialPolicySettings, check_destination


@pytest.mark.parametrize("number", ["+499001234567", "+19005550123", "+491801234567"])
def test_premium_and_shared_cost_numbers_are_refused(number: str) -> None:
    verdict = check_destination(number, DialPolicySettings())
    assert not verdict.allowed
    assert number in verdict.sentence


def test_a_digit_too_many_does_not_slip_past_the_type_check() -> None:
    verdict = check_destination("+4990012345678", DialPolicySettings())
    assert not verdict.allowed
    assert "not a valid number" in verdict.sentence


def test_ordinary_fixed_line_numbers_pass() -> None:
    for number in ["+4930123456", "+4922198765", "+4940555123", "+43159900"]:
        assert check_destination(number, DialPolicySettings()).allowed, number


def test_countries_and_prefix_lists() -> None:
    policy = DialPolicySettings(allowed_countries=["de"], deny_prefixes=["+4940"],
                                allow_prefixes=["+4940555"])
    assert not check_destination("+43159900", policy).allowed
    assert not check_destination("+4940123456", policy).allowed
    assert check_destination("+4940555123", policy).allowed


def test_unknown_number_type_names_are_a_config_error() -> None:
    with pytest.raises(ValueError, match="unknown number types"):
        DialPolicySettings(refused_types=["premium"])
