"""Time windows (mailfax.outbound.windows): the spec, ``is_open`` and ``next_open``, also
across the DST changes of Europe/Berlin, checked against a minute-by-minute walk."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailfax.outbound.windows import Schedule, WindowSpecError, parse_window

BERLIN = "Europe/Berlin"
SPECS = [
    "Mon-Fri 18:00-07:00, Sat-Sun",
    "08:00-20:00",
    "Mon, Wed-Thu 09:00-12:30",
    "Fri-Mon 22:00-02:00",
    "02:30-03:10",  # inside the spring gap, and twice in the autumn fold
    "Sun 02:00-03:00",
    "Sat",
    "00:00-00:00",  # all day
    "Tue 23:59-00:01",
]
# Instants around both DST changes of 2026 (29 March 01:00 UTC, 25 October 01:00 UTC) and
# through the rest of the year.
DST_DAYS = st.sampled_from([datetime(2026, 3, 29, 1, tzinfo=UTC),
                            datetime(2026, 10, 25, 1, tzinfo=UTC)])
NEAR_DST = st.builds(lambda base, minutes: base + timedelta(minutes=minutes), DST_DAYS,
                     st.integers(min_value=-3 * 24 * 60, max_value=3 * 24 * 60))
ANY_TIME = st.datetimes(min_value=datetime(2026, 1, 1), max_value=datetime(2026, 12, 31),
                        timezones=st.just(UTC))


def berlin(text: str) -> datetime:
    """A local Berlin time as an aware UTC instant."""
    from zoneinfo import ZoneInfo

    return datetime.fromisoformat(text).replace(tzinfo=ZoneInfo(BERLIN)).astimezone(UTC)


def first_open_by_walking(spec: str, now: datetime) -> datetime:
    """The slow, obviously right answer: minute by minute (windows open on whole minutes)."""
    window = parse_window(spec, BERLIN)
    if window.is_open(now):
        return now
    moment = now.replace(second=0, microsecond=0) + timedelta(minutes=1)
    while not window.is_open(moment):
        moment += timedelta(minutes=1)
    return moment


def test_bulk_window_nights_and_weekends() -> None:
    window = parse_window("Mon-Fri 18:00-07:00, Sat-Sun", BERLIN)
    assert not window.is_open(berlin("2026-12-01T10:00"))  # a Tuesday morning
    assert window.is_open(berlin("2026-12-01T18:00"))
    assert window.is_open(berlin("2026-12-02T06:59"))  # Tuesday's night, into Wednesday
    assert not window.is_open(berlin("2026-12-02T07:00"))
    assert window.is_open(berlin("2026-12-05T12:00"))  # Saturday
    assert window.next_open(berlin("2026-12-01T10:00")) == berlin("2026-12-01T18:00")
    # Friday's night runs into the weekend; Monday morning is Sunday's whole day, then closed.
    assert window.is_open(berlin("2026-12-07T06:00")) is False  # Sunday's rule ends at 24:00
    assert window.next_open(berlin("2026-12-07T06:00")) == berlin("2026-12-07T18:00")


def test_a_start_in_the_spring_gap_opens_when_the_clock_jumps_into_the_window() -> None:
    window = parse_window("02:30-03:10", BERLIN)
    # 29 March 2026: 02:00 CET is followed by 03:00 CEST (01:00 UTC).
    assert window.next_open(datetime(2026, 3, 28, 23, 0, tzinfo=UTC)) == datetime(
        2026, 3, 29, 1, 0, tzinfo=UTC)
    # 25 October 2026: 02:30 comes twice; the window is open in both.
    assert window.is_open(datetime(2026, 10, 25, 0, 40, tzinfo=UTC))  # 02:40 CEST
    assert window.is_open(datetime(2026, 10, 25, 1, 40, tzinfo=UTC))  # 02:40 CET
    assert window.next_open(datetime(2026, 10, 25, 1, 5, tzinfo=UTC)) == datetime(
        2026, 10, 25, 1, 30, tzinfo=UTC)  # between them: closed from 03:10 CEST


def test_a_weekly_window_inside_the_skipped_hour_opens_the_week_after() -> None:
    """Sunday 02:00-03:00 does not exist on 29 March 2026 in Berlin: the next opening is a
    week later (found by hypothesis: the search looked only 8 days ahead)."""
    window = parse_window("Sun 02:00-03:00", BERLIN)
    assert window.next_open(datetime(2026, 3, 27, 22, 59, tzinfo=UTC)) == datetime(
        2026, 4, 5, 0, 0, tzinfo=UTC)  # 02:00 CEST


@pytest.mark.parametrize("spec", ["", "Mon-Fri 18:00", "Someday", "25:00-26:00",
                                  "Mon Tue 10:00-11:00", "Mon 10:00-24:30", "Mon,,Tue"])
def test_unreadable_specs_are_refused(spec: str) -> None:
    with pytest.raises(WindowSpecError):
        parse_window(spec)


@settings(max_examples=150, deadline=None)
@given(spec=st.sampled_from(SPECS), now=st.one_of(NEAR_DST, ANY_TIME))
def test_next_open_is_the_first_open_instant(spec: str, now: datetime) -> None:
    window = parse_window(spec, BERLIN)
    opens = window.next_open(now)
    assert opens >= now
    assert window.is_open(opens)
    assert opens == first_open_by_walking(spec, now)


@settings(max_examples=100, deadline=None)
@given(spec=st.sampled_from(SPECS), now=st.one_of(NEAR_DST, ANY_TIME))
def test_open_and_closed_are_local_wall_clock_minutes(spec: str, now: datetime) -> None:
    """is_open depends only on the local weekday and minute, and a window that is open is
    open for a whole minute."""
    window = parse_window(spec, BERLIN)
    start_of_minute = now.replace(second=0, microsecond=0)
    assert window.is_open(now) == window.is_open(start_of_minute)
    assert window.is_open(now) == window.is_open(start_of_minute + timedelta(seconds=59))


def test_schedule_holds_closed_priorities_and_accounts_until_the_first_opens() -> None:
    schedule = Schedule.from_specs({"bulk": "Mon-Fri 18:00-07:00, Sat-Sun"},
                                   {"office": "Mon-Fri 08:00-17:00"}, BERLIN)
    tuesday_morning = schedule.held(berlin("2026-12-01T07:30"))
    assert tuesday_morning.priorities == {"bulk"} and tuesday_morning.accounts == {"office"}
    assert tuesday_morning.reopens_at == berlin("2026-12-01T08:00")
    evening = schedule.held(berlin("2026-12-01T18:30"))
    assert evening.priorities == set() and evening.accounts == {"office"}
    assert evening.reopens_at == berlin("2026-12-02T08:00")
