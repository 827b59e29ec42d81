"""Fax numbers in the local part of an address: what is accepted, what is refused and how."""

from __future__ import annotations

import phonenumbers
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailfax.numbers import FaxAddress, InvalidNumber, format_international, parse_fax_local_part


@pytest.mark.parametrize(("local", "number"), [
    ("030123456", "+4930123456"),
    ("030-123456", "+4930123456"),
    ("030/12 34 56", "+4930123456"),
    ("(030) 123.456", "+4930123456"),
    ("004930123456", "+4930123456"),
    ("+4930123456", "+4930123456"),
    ("0221-98765", "+4922198765"),
    ('"030 123456"', "+4930123456"),
    ("0041441234567", "+41441234567"),
])
def test_national_and_international_forms_become_e164(local: str, number: str) -> None:
    assert parse_fax_local_part(local, "DE") == FaxAddress(number=number)


@pytest.mark.parametrize(("local", "number", "tag"), [
    ("030123456+cover", "+4930123456", "cover"),
    ("030123456+NoCover", "+4930123456", "nocover"),
    ("+4930123456+cover", "+4930123456", "cover"),
    ("004930123456+urgent_1", "+4930123456", "urgent_1"),
])
def test_a_sub_address_tag_is_split_off_without_breaking_the_number(
        local: str, number: str, tag: str) -> None:
    assert parse_fax_local_part(local, "DE") == FaxAddress(number=number, tag=tag)


def test_default_country_decides_national_numbers() -> None:
    assert parse_fax_local_part("0201234567", "GB").number == "+44201234567"
    assert parse_fax_local_part("2125551234", "US").number == "+12125551234"


@pytest.mark.parametrize(("local", "words"), [
    ("", "no fax number"),
    ("info", "only digits"),
    ("030 123456x", "only digits"),
    ("０３０１２３４５６", "FULLWIDTH DIGIT ZERO"),
    ("030\u202e123456", "RIGHT-TO-LEFT OVERRIDE"),
    ("030\r\n123", "contains the character"),
    ("12", "not a possible phone number"),
    ("0301234567890123456789", "too long"),
    ("030123456+a b", "not a valid tag"),
])
def test_bad_local_parts_are_refused_with_a_sentence(local: str, words: str) -> None:
    with pytest.raises(InvalidNumber) as raised:
        parse_fax_local_part(local, "DE")
    assert words in raised.value.sentence
    assert "\r" not in raised.value.sentence and "\n" not in raised.value.sentence


def test_format_international_is_readable() -> None:
    assert format_international("+4930123456") == "+49 30 123456"
    with pytest.raises(ValueError):
        format_international("not a number")


@given(st.text(max_size=40))
def test_any_text_is_either_a_valid_e164_number_or_a_clean_refusal(text: str) -> None:
    try:
        address = parse_fax_local_part(text, "DE")
    except InvalidNumber as error:
        assert error.sentence.isprintable()
        return
    parsed = phonenumbers.parse(address.number, None)
    assert address.number.startswith("+")
    assert phonenumbers.is_possible_number(parsed)
    assert address.tag == address.tag.lower()


@given(st.sampled_from(["DE", "AT", "CH", "FR", "GB", "US", "NL"]),
       st.integers(min_value=0, max_value=10**9))
def test_a_number_formatted_by_phonenumbers_parses_back_to_itself(region: str,
                                                                  seed: int) -> None:
    example = phonenumbers.example_number_for_type(region, phonenumbers.PhoneNumberType.FIXED_LINE)
    assert example is not None
    e164 = phonenumbers.format_number(example, phonenumbers.PhoneNumberFormat.E164)
    national = phonenumbers.format_number(example, phonenumbers.PhoneNumberFormat.NATIONAL)
    assert parse_fax_local_part(e164, "DE").number == e164
    assert parse_fax_local_part(national, region).number == e164
    tag = f"t{seed}"
    assert parse_fax_local_part(f"{e164}+{tag}", "DE") == FaxAddress(e164, tag)
