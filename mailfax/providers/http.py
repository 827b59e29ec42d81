"""What the HTTP providers share: reading a ``Retry-After`` header."""

from __future__ import annotations

import time
from email.utils import parsedate_to_datetime

RETRY_AFTER_MAX = 3600.0  # an hour at most, whatever a server asks for


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta seconds or an HTTP date); None if absent
    or unreadable."""
    if not value or not value.strip():
        return None
    value = value.strip()
    if value.isdigit():
        seconds = float(value)
    else:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - (now or time.time())
        except (TypeError, ValueError):
            return None
    return min(max(seconds, 0.0), RETRY_AFTER_MAX)
