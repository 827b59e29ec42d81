"""The wake-up wait of the service loops: a cancellation always ends it (Python 3.11's
``asyncio.wait_for`` loses one that meets the wake-up, and ``Application.stop()`` then hung)."""

from __future__ import annotations

import asyncio

import pytest

from mailfax.support.waiting import wait_for_event


async def test_a_cancel_that_meets_the_wake_up_still_ends_the_wait() -> None:
    for _ in range(200):
        event = asyncio.Event()
        task = asyncio.create_task(wait_for_event(event, 10))
        await asyncio.sleep(0)
        event.set()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_it_says_whether_the_event_came_or_the_time_ran_out() -> None:
    event = asyncio.Event()
    assert not await wait_for_event(event, 0.01)
    asyncio.get_running_loop().call_later(0.01, event.set)
    assert await wait_for_event(event, 5)
