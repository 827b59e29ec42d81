"""What the HTTP (and SOAP-over-HTTP) providers share: reading a ``Retry-After`` header,
preparing each request's documents once, off the event loop."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from email.utils import parsedate_to_datetime
from typing import TypeVar

from mailfax.providers.base import FaxDocument, SendRequest

Prepared = TypeVar("Prepared")

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


async def prepare_documents(requests: Sequence[SendRequest],
                            prepare: Callable[[Sequence[FaxDocument]], Prepared]
                            ) -> list[Prepared]:
    """``prepare(request.documents)`` for each request, in order, computed once per documents
    list (the recipients of one mail share it) and in a worker thread: merging PDFs with
    pikepdf is CPU work that would otherwise block the event loop."""
    prepared: dict[int, Prepared] = {}
    for request in requests:
        if id(request.documents) not in prepared:
            prepared[id(request.documents)] = await asyncio.to_thread(prepare,
                                                                      request.documents)
    return [prepared[id(request.documents)] for request in requests]
