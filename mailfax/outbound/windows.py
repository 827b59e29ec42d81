"""Time windows for sending, like HylaFAX's ``TimeOfDay``: when jobs of a priority (bulk only
at night and at weekends) or of an account may be dialled.

A spec is a comma-separated list of items, each days and/or a time range, in local time::

    "Mon-Fri 18:00-07:00, Sat-Sun"     weekday evenings and nights, and whole weekends
    "08:00-20:00"                      every day
    "Mon, Wed-Thu 09:00-12:30"         (a day list is also separated by commas)

Days are ``Mon`` … ``Sun`` (a range may wrap: ``Fri-Mon``), ``Any`` or ``Daily`` for all.
Days run on to the next time range (``Mon, Wed 09:00-12:00``: both days at those times); days
with no time range after them are whole days, and a time range with no days is every day.
A range that ends at or before its start runs past midnight into the next day
(``Mon 18:00-07:00`` is Monday 18:00 to Tuesday 07:00); the days name where it starts.
Pure: :meth:`Window.is_open` and :meth:`Window.next_open` take the time and give answers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from zoneinfo import ZoneInfo

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
ALL_DAYS = frozenset(range(7))
MINUTES_PER_DAY = 24 * 60
_TIME_RANGE = re.compile(r"^([01]?\d|2[0-3]):([0-5]\d)-([01]?\d|2[0-4]):([0-5]\d)$")
_DAY_RANGE = re.compile(r"^([a-z]{3})(?:-([a-z]{3}))?$")


class WindowSpecError(ValueError):
    """A window spec that cannot be read; the message names the part."""


@dataclass(frozen=True)
class Rule:
    """Open on ``days`` (0 = Monday) from ``start`` for ``length`` minutes (≤ one day)."""

    days: frozenset[int]
    start: int
    length: int

    def covers(self, weekday: int, minute: int) -> bool:
        if weekday in self.days and self.start <= minute < self.start + self.length:
            return True
        # The part of a range that runs past midnight, on the day after one of its days.
        overflow = self.start + self.length - MINUTES_PER_DAY
        return overflow > 0 and (weekday - 1) % 7 in self.days and minute < overflow


@dataclass(frozen=True)
class Window:
    rules: tuple[Rule, ...]
    zone: tzinfo
    spec: str = ""

    def is_open(self, at: datetime) -> bool:
        local = at.astimezone(self.zone)
        minute = local.hour * 60 + local.minute
        return any(rule.covers(local.weekday(), minute) for rule in self.rules)

    def next_open(self, now: datetime) -> datetime:
        """``now`` when the window is open, else the first instant after it when it opens
        (a whole minute). A start that does not exist locally (a DST gap) opens at the gap's
        end, when the clock jumps into the window."""
        if self.is_open(now):
            return now
        candidates = [moment for moment in self._starts_after(now) if self.is_open(moment)]
        if not candidates:  # (cannot happen: every rule opens once a week)
            raise WindowSpecError(f"window {self.spec!r} never opens")
        first = min(candidates)
        step = timedelta(minutes=1)
        # A start inside a DST gap is read an hour late; the window opened at the jump.
        while first - step > now and self.is_open(first - step):
            first -= step
        return first

    def _starts_after(self, now: datetime) -> list[datetime]:
        """The instants (both readings of an ambiguous local time) at which a rule starts,
        from the day before ``now`` (local) to 15 days on, that lie after ``now``. Two weeks,
        not one: a weekly window inside the hour the clocks skip in spring (``Sun 02:00-03:00``
        in Berlin) does not open that week at all."""
        today = now.astimezone(self.zone).date()
        starts = []
        for offset in range(-1, 16):
            day = today + timedelta(days=offset)
            for rule in self.rules:
                if day.weekday() in rule.days:
                    starts += [moment for moment in _instants(day, rule.start, self.zone)
                               if moment > now]
        return starts


def _instants(day: date, minute: int, zone: tzinfo) -> list[datetime]:
    """The instants the local time ``minute`` on ``day`` names: one, two (in a DST fold), or,
    in a gap (it does not exist), the end of the gap, the first instant past it."""
    local = datetime.combine(day, time(minute // 60, minute % 60), tzinfo=zone)
    readings = [local.replace(fold=fold).astimezone(UTC) for fold in (0, 1)]
    wall = local.replace(tzinfo=None)
    if readings[0].astimezone(zone).replace(tzinfo=None) == wall:
        return readings
    low, high = min(readings), max(readings)  # the gap lies between its two readings
    while high - low > timedelta(minutes=1):
        middle = low + (high - low) / 2
        if middle.astimezone(zone).replace(tzinfo=None) >= wall:
            high = middle
        else:
            low = middle
    return [_next_minute(high)]


def _next_minute(moment: datetime) -> datetime:
    whole = moment.replace(second=0, microsecond=0)
    return whole if whole == moment else whole + timedelta(minutes=1)


def parse_window(spec: str, zone: tzinfo | str = "UTC") -> Window:
    """A :class:`Window` from a spec (see the module's docstring); ``zone`` is where its
    times are read (an IANA name or a tzinfo)."""
    if isinstance(zone, str):
        zone = ZoneInfo(zone)
    rules: list[Rule] = []
    days: set[int] = set()
    for part in [piece.strip() for piece in spec.split(",")]:
        if not part:
            raise WindowSpecError(f"empty item in window {spec!r}")
        words = part.lower().split()
        times = words.pop() if words and _TIME_RANGE.match(words[-1]) else None
        if len(words) > 1:
            raise WindowSpecError(f"cannot read {part!r} in window {spec!r}")
        if not words:  # a time range alone: every day (days before it were whole days)
            if times is None:
                raise WindowSpecError(f"cannot read {part!r} in window {spec!r}")
            if days:
                rules.append(_rule(frozenset(days), None))
                days = set()
            rules.append(_rule(ALL_DAYS, times))
            continue
        days |= _days(words[0], spec)
        if times is not None:  # the days so far ("Mon, Wed 09:00-12:00") at these times
            rules.append(_rule(frozenset(days), times))
            days = set()
    if days:  # days without a time at the end: whole days
        rules.append(_rule(frozenset(days), None))
    return Window(tuple(rules), zone, spec)


def _rule(days: frozenset[int], times: str | None) -> Rule:
    if times is None:
        return Rule(days, 0, MINUTES_PER_DAY)
    match = _TIME_RANGE.match(times)
    assert match is not None
    start = int(match[1]) * 60 + int(match[2])
    end = int(match[3]) * 60 + int(match[4])
    if end > MINUTES_PER_DAY:
        raise WindowSpecError(f"{times!r}: past 24:00")
    length = end - start if end > start else end + MINUTES_PER_DAY - start
    return Rule(days, start, length)


def _days(word: str, spec: str) -> set[int]:
    if word in ("any", "daily"):
        return set(ALL_DAYS)
    match = _DAY_RANGE.match(word)
    if match is None or match[1] not in DAYS or (match[2] and match[2] not in DAYS):
        raise WindowSpecError(f"cannot read the days {word!r} in window {spec!r}")
    first = DAYS.index(match[1])
    last = DAYS.index(match[2]) if match[2] else first
    return {(first + step) % 7 for step in range((last - first) % 7 + 1)}


@dataclass(frozen=True)
class Held:
    """What the windows hold back at one moment, and when the first of them opens."""

    priorities: frozenset[str]
    accounts: frozenset[str]
    reopens_at: datetime | None

    @property
    def anything(self) -> bool:
        return bool(self.priorities or self.accounts)


@dataclass(frozen=True)
class Schedule:
    """The windows of priorities (``[dispatch.windows]``) and of accounts
    (``[accounts.NAME] windows``); a job may be sent when both of its are open."""

    priorities: dict[str, Window]
    accounts: dict[str, Window]

    @classmethod
    def from_specs(cls, priorities: dict[str, str], accounts: dict[str, str],
                   zone: tzinfo | str) -> Schedule:
        return cls({name: parse_window(spec, zone) for name, spec in priorities.items()},
                   {name: parse_window(spec, zone) for name, spec in accounts.items()})

    def held(self, now: datetime) -> Held:
        closed_priorities = {name for name, window in self.priorities.items()
                             if not window.is_open(now)}
        closed_accounts = {name for name, window in self.accounts.items()
                           if not window.is_open(now)}
        opening = [self.priorities[name].next_open(now) for name in closed_priorities]
        opening += [self.accounts[name].next_open(now) for name in closed_accounts]
        return Held(frozenset(closed_priorities), frozenset(closed_accounts),
                    min(opening) if opening else None)
