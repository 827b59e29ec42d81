"""Waiting for a wake-up with a time limit, in a way that a cancellation always ends.

``asyncio.wait_for(event.wait(), timeout)`` on Python 3.11 can swallow a cancellation that
arrives just as the event is set (fixed in 3.12): the loop around it then never stops, and
``Application.stop()`` waits for it forever. ``asyncio.wait`` has no such race.
"""

from __future__ import annotations

import asyncio


async def wait_for_event(event: asyncio.Event, seconds: float) -> bool:
    """True if ``event`` was set within ``seconds``, False if the time ran out."""
    waiter = asyncio.ensure_future(event.wait())
    try:
        done, _ = await asyncio.wait({waiter}, timeout=seconds)
    finally:
        waiter.cancel()
    return bool(done)
