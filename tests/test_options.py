"""Per-mail options: the pure parser (intake/options.py) and the provider table
(providers/capabilities.py). Over SMTP: tests/test_options_smtp.py."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailfax.intake.assemble import Refusal
from mailfax.intake.options import Clock, fax_header_fields, parse_mail_options
from mailfax.model import JobState
from mailfax.outbound.dispatch import queued_since
from mailfax.outbound.tracking import past_deadline
from mailfax.providers import capabilities
from mailfax.providers.capabilities import Handling
from mailfax.store.base import Job
from tests.test_logic import NOW as JOB_CREATED
from tests.test_logic import _job

BERLIN = ZoneInfo("Europe/Berlin")
NOW = datetime(2026, 12, 1, 15, 0, tzinfo=UTC)  # 16:00 in Berlin
CLOCK = Clock(now=NOW, zone=BERLIN)


def options(*fields: tuple[str, str], tags: tuple[str, ...] = (), subject: str = "",
            codes: bool = False) -> dict[str, object]:
    return parse_mail_options(list(fields), tags, subject, CLOCK, subject_codes=codes).options


def refusal(*fields: tuple[str, str], tags: tuple[str, ...] = (), subject: str = "",
            codes: bool = False) -> Refusal:
    with pytest.raises(Refusal) as refused:
        parse_mail_options(list(fields), tags, subject, CLOCK, subject_codes=codes)
    return refused.value


def test_no_options_is_an_empty_dict() -> None:
    assert options() == {}


def test_send_at_is_read_in_the_senders_zone_and_stored_as_utc() -> None:
    assert options(("x-fax-send-at", "2026-12-24 08:00")) == {
        "send_at": "2026-12-24T07:00:00+00:00"}


def test_send_at_with_its_own_offset_keeps_the_offset() -> None:
    assert options(("x-fax-send-at", "2026-12-24T08:00+02:00")) == {
        "send_at": "2026-12-24T06:00:00+00:00"}
    assert options(("x-fax-send-at", "2026-12-24 08:00 Z")) == {
        "send_at": "2026-12-24T08:00:00+00:00"}


def test_send_at_in_summer_time_uses_the_summer_offset() -> None:
    clock = Clock(now=datetime(2026, 6, 1, tzinfo=UTC), zone=BERLIN)
    found = parse_mail_options([("x-fax-send-at", "2026-06-20 08:00")], (), "", clock)
    assert found.options == {"send_at": "2026-06-20T06:00:00+00:00"}


def test_a_time_the_clocks_skip_is_refused() -> None:
    clock = Clock(now=datetime(2026, 3, 20, tzinfo=UTC), zone=BERLIN)
    with pytest.raises(Refusal) as refused:
        parse_mail_options([("x-fax-send-at", "2026-03-29 02:30")], (), "", clock)
    assert "does not exist in Europe/Berlin" in refused.value.sentence


@given(st.integers(min_value=0, max_value=30 * 24 * 60))
def test_a_delay_in_minutes_is_now_plus_that(minutes: int) -> None:
    found = options(("x-fax-delay", f"{minutes}m"))
    assert datetime.fromisoformat(str(found["send_at"])) == NOW + timedelta(minutes=minutes)


def test_delays_combine_units() -> None:
    assert options(("x-fax-delay", "1d 2h 30m")) == {
        "send_at": (NOW + timedelta(days=1, hours=2, minutes=30)).isoformat()}


@pytest.mark.parametrize(("name", "value", "expected"), [
    ("x-fax-send-at", "2026-12-01 15:00", "is in the past (it is now 2026-12-01 16:00 "
                                          "Europe/Berlin)"),
    ("x-fax-send-at", "2027-01-01 16:01", "more than 30 days ahead"),
    ("x-fax-delay", "31d", "more than 30 days ahead"),
    ("x-fax-send-at", "tomorrow", "is not a valid value; use a date and time"),
    ("x-fax-send-at", "2026-02-30 08:00", "a date and time that exists"),
    ("x-fax-delay", "2 hours", "is not a valid value; use a delay such as 90m"),
    ("x-fax-resolution", "superfine", "use standard or fine"),
    ("x-fax-cover", "maybe", "use yes or no"),
    ("x-fax-priority", "urgent", "use normal or bulk"),
    ("x-fax-notify", "some", "use none or failure or all"),
    ("x-fax-return-document", "pdf", "use yes or no"),
    ("x-fax-station-id", "+49 30 123456 Müller", "ASCII"),
    ("x-fax-station-id", "+49 30 1234567890 ABCD", "22 characters long; at most 20"),
    ("x-fax-header", "x" * 101, "at most 100"),
])
def test_a_bad_value_is_refused_naming_the_header_and_the_value(
        name: str, value: str, expected: str) -> None:
    refused = refusal((name, value))
    assert (refused.code, refused.status) == (554, "5.6.0")
    shown = "-".join(part.capitalize() for part in name.split("-"))
    assert refused.sentence.startswith(shown + ": ")
    assert repr(value)[:30] in refused.sentence
    assert expected in refused.sentence


def test_an_unknown_fax_header_is_refused_with_the_known_ones() -> None:
    refused = refusal(("x-fax-sendat", "2026-12-24 08:00"))
    assert "Unknown fax option header X-Fax-Sendat" in refused.sentence
    assert "X-Fax-Send-At" in refused.sentence and "X-Fax-Delay" in refused.sentence


def test_every_option_from_headers() -> None:
    assert options(("x-fax-header", "  Kanzlei   Müller  "), ("x-fax-station-id", "+49 30 1234"),
                   ("x-fax-resolution", "Fine"), ("x-fax-cover", "no"),
                   ("x-fax-priority", "bulk"), ("x-fax-notify", "failure"),
                   ("x-fax-return-document", "YES")) == {
        "header": "Kanzlei Müller", "station_id": "+49 30 1234", "resolution": "fine",
        "cover": False, "priority": "bulk", "notify": "failure", "return_document": True}


def test_address_tags_give_the_cover_setting_as_before() -> None:
    assert options(tags=("cover", "")) == {"cover": True}
    assert options(tags=("nocover", "cover")) == {"cover": True}
    assert options(tags=("nocover",)) == {"cover": False}
    assert options(tags=("nocover", "")) == {}  # not all recipients: the default decides
    assert options(tags=("nocover",), subject="x") == {"cover": False}


def test_two_places_that_disagree_are_refused_naming_both() -> None:
    refused = refusal(("x-fax-cover", "yes"), tags=("nocover",))
    assert refused.sentence == ("The mail asks for two different cover settings: the address "
                                "tag +nocover and X-Fax-Cover: yes; give one.")
    assert "two different send times" in refusal(("x-fax-send-at", "2026-12-24 08:00"),
                                                 ("x-fax-delay", "2h")).sentence
    assert options(("x-fax-cover", "yes"), tags=("cover",)) == {"cover": True}  # agreeing


def test_subject_codes_are_off_by_default_and_the_subject_is_kept() -> None:
    found = parse_mail_options([], (), "Offer /d 2026-12-24 08:00", CLOCK)
    assert found.options == {}
    assert found.subject == "Offer /d 2026-12-24 08:00"


def test_subject_codes_are_read_and_taken_out_of_the_subject() -> None:
    found = parse_mail_options([], (), "Offer /d 2026-12-24 08:00 for Bob /r fine /n failure",
                               CLOCK, subject_codes=True)
    assert found.options == {"send_at": "2026-12-24T07:00:00+00:00", "resolution": "fine",
                             "notify": "failure"}
    assert found.subject == "Offer for Bob"
    found = parse_mail_options([], (), "/delay 2h /c no /p bulk Invoices", CLOCK,
                               subject_codes=True)
    assert found.options == {"send_at": (NOW + timedelta(hours=2)).isoformat(),
                             "cover": False, "priority": "bulk"}
    assert found.subject == "Invoices"


def test_a_subject_code_with_a_bad_value_is_refused() -> None:
    refused = refusal(subject="Offer /d tomorrow", codes=True)
    assert refused.sentence.startswith("Subject code /d: 'tomorrow' is not a valid value")


def test_a_slash_that_is_no_code_stays_in_the_subject() -> None:
    found = parse_mail_options([], (), "A/B test 1/d and /x", CLOCK, subject_codes=True)
    assert (found.options, found.subject) == ({}, "A/B test 1/d and /x")


@given(st.text(alphabet=st.characters(codec="utf-8", exclude_characters="/"), max_size=60))
def test_a_subject_without_codes_only_loses_extra_spaces(subject: str) -> None:
    found = parse_mail_options([], (), subject, CLOCK, subject_codes=True)
    assert found.options == {}
    assert found.subject == " ".join(subject.split())


@given(st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7e), min_size=1,
               max_size=100).filter(str.strip))
def test_any_printable_header_text_is_kept_with_its_spaces_collapsed(text: str) -> None:
    assert options(("x-fax-header", text)) == {"header": " ".join(text.split())}


def test_header_fields_are_read_from_the_mail_head_decoded() -> None:
    raw = (b"From: a@example.org\r\nX-Fax-Header: =?utf-8?q?M=C3=BCller_GmbH?=\r\n"
           b"X-FAX-Delay: 2h\r\nSubject: x\r\n\r\nX-Fax-Cover: yes\r\n")
    assert fax_header_fields(raw) == [("x-fax-header", "Müller GmbH"), ("x-fax-delay", "2h")]
    assert fax_header_fields(b"Subject: x\r\n\r\nbody") == []


# -- what each provider does with them ----------------------------------------------------

@pytest.mark.parametrize(("provider", "key", "expected"), [
    ("fax.de", "send_at", Handling.PROVIDER), ("faxnummer.de", "send_at", Handling.MAILFAX),
    ("retarus", "send_at", Handling.PROVIDER), ("emulator", "send_at", Handling.MAILFAX),
    ("fax.de", "resolution", Handling.IMPOSSIBLE), ("retarus", "resolution", Handling.PROVIDER),
    ("faxnummer.de", "resolution", Handling.IMPOSSIBLE),
    ("emulator", "header", Handling.IMPOSSIBLE), ("faxnummer.de", "header", Handling.PROVIDER),
    ("retarus", "station_id", Handling.PROVIDER), ("fax.de", "priority", Handling.MAILFAX),
    ("retarus", "notify", Handling.MAILFAX), ("emulator", "cover", Handling.MAILFAX),
])
def test_each_option_is_done_by_the_provider_by_mailfax_or_not_at_all(
        provider: str, key: str, expected: Handling) -> None:
    assert capabilities.handling(provider, key) == expected


def test_refusals_name_the_option_and_the_provider() -> None:
    assert capabilities.refusal("fax.de", {"resolution": "fine"}) == (
        "The option X-Fax-Resolution cannot be used: FAX.de does not let the sender set the "
        "resolution.")
    assert capabilities.refusal("fax.de", {"header": "Ä" * 16}) == (
        "The option X-Fax-Header is 32 characters long; FAX.de takes at most 30.")
    assert capabilities.refusal("fax.de", {"header": "x" * 30}) is None
    assert "Retarus reads as the start of a placeholder" in str(
        capabilities.refusal("retarus", {"header": "100% sure"}))
    assert capabilities.refusal("fax.de", {"station_id": "A;B"}) == (
        "The option X-Fax-Station-Id contains ';', which FAX.de uses to separate its Options; "
        "leave it out.")
    assert "one field for both (sSender)" in str(capabilities.refusal(
        "faxnummer.de", {"header": "Muster", "station_id": "+4930123"}))
    assert capabilities.refusal("faxnummer.de", {"header": "Muster",
                                                 "station_id": "Muster"}) is None
    assert "the bundled emulator does not let the sender set the station id" in str(
        capabilities.refusal("emulator", {"station_id": "+4930123"}))


def test_mailfax_holds_a_schedule_until_its_time_or_the_provider_s_lead_before_it() -> None:
    options = {"send_at": "2026-12-24T07:00:00+00:00"}
    held = datetime(2026, 12, 24, 7, tzinfo=UTC)
    assert capabilities.held_until("faxnummer.de", options) == held
    assert capabilities.held_until("emulator", options) == held
    # a provider with a schedule gets it shortly before (a job there holds its number's line)
    lead = capabilities.PROVIDER_SCHEDULE_LEAD
    assert timedelta(0) < lead <= timedelta(minutes=15)
    assert capabilities.held_until("fax.de", options) == held - lead
    assert capabilities.held_until("retarus", options) == held - lead
    assert capabilities.held_until("emulator", {}) is None
    assert capabilities.future_send_time(options, held) is None  # a retry after the time
    assert capabilities.future_send_time(options, held - timedelta(seconds=1)) == held


# -- a scheduled job's clocks count from its send time -------------------------------------

def scheduled_job(send_at: datetime | None) -> Job:
    return dataclasses.replace(
        _job(JobState.SUBMITTED),
        options={"send_at": send_at.isoformat()} if send_at else {})


def test_a_scheduled_jobs_lifetime_and_delay_notice_count_from_its_send_time() -> None:
    later = JOB_CREATED + timedelta(days=10)
    assert queued_since(scheduled_job(later)) == later
    assert queued_since(scheduled_job(None)) == JOB_CREATED


def test_a_fax_the_provider_holds_is_not_given_up_while_it_waits_for_its_time() -> None:
    limit, lifetime = timedelta(hours=24), timedelta(hours=120)
    later = JOB_CREATED + timedelta(days=10)
    assert past_deadline(scheduled_job(None), JOB_CREATED + timedelta(hours=25), limit,
                         lifetime)
    assert not past_deadline(scheduled_job(later), JOB_CREATED + timedelta(days=9), limit,
                             lifetime)
    assert past_deadline(scheduled_job(later), later + timedelta(hours=25), limit, lifetime)
