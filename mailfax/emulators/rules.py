"""Number rules shared by the emulators: the longest matching prefix wins."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TypeVar

T = TypeVar("T")
V = TypeVar("V")


def longest_prefix(number: str, rules: Iterable[T], prefix: Callable[[T], str]) -> T | None:
    """The rule whose ``prefix(rule)`` is the longest that ``number`` starts with (the first
    of equally long ones), or None when none matches."""
    best: T | None = None
    best_length = -1
    for rule in rules:
        start = prefix(rule)
        if len(start) > best_length and number.startswith(start):
            best, best_length = rule, len(start)
    return best


def prefix_value(number: str, rules: Mapping[str, V]) -> V | None:
    """The value of the longest key of ``rules`` that ``number`` starts with, or None."""
    key = longest_prefix(number, rules, lambda start: start)
    return None if key is None else rules[key]


def pages_sent(number: str, partial: Mapping[str, int], pages: int) -> int:
    """The pages a call to ``number`` sends of ``pages``: all of them, or fewer when a
    ``partial`` rule (number prefix -> pages sent) matches it."""
    cut = prefix_value(number, partial)
    return pages if cut is None else min(cut, pages)
