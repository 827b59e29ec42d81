"""Waiting for a wake-up with a time limit, in a way that a cancellation always ends.

``asyncio.wait_for(event.wait(), timeout)`` on Python 3.11 can swallow a cancellation that
arrives just as the event is set (fixed in 3.12): the loop around it then never stops, and
``Application.stop()`` waits for it forever. ``asyncio.wait`` has no such race.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from typing import Any


async def wait_for_event(event: asyncio.Event, seconds: float) -> bool:
    """True if ``event`` was set within ``seconds``, False if the time ran out."""
    waiter = asyncio.ensure_future(event.wait())
    try:
        done, _ = await asyncio.wait({waiter}, timeout=seconds)
    finally:
        waiter.cancel()
    return bool(done)


async def cancel_all_and_wait(tasks: Iterable[asyncio.Future[Any]]) -> None:
    """Cancel ``tasks`` and wait until all have ended, however each ends. ``gather``, not
    ``suppress(CancelledError)`` around each await: that also swallowed a cancellation of
    the caller itself."""
    waiting = list(tasks)
    for task in waiting:
        task.cancel()
    await asyncio.gather(*waiting, return_exceptions=True)


async def cancel_and_wait(task: asyncio.Future[Any]) -> None:
    """Cancel ``task`` and wait until it has ended, however it ends.

    ``with suppress(CancelledError): await task`` also swallows a cancellation of the
    *caller* that comes while it waits (a stop): the caller's loop then goes on. Here that
    one is raised again; one the caller was already in (a ``finally`` during a stop) is
    left to go on after it, so the rest of the clean-up still runs."""
    current = asyncio.current_task()
    before = current.cancelling() if current is not None else 0
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):  # the task's own end
        await task
    if current is not None and current.cancelling() > before:
        raise asyncio.CancelledError
