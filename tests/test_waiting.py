"""The wake-up wait of the service loops: a cancellation always ends it (Python 3.11's
``asyncio.wait_for`` loses one that meets the wake-up, and ``Application.stop()`` then hung)."""

from __future__ import annotations

import asyncio

import pytest

from mailfax.support.waiting import cancel_all_and_wait, cancel_and_wait, wait_for_event


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


async def slow_to_end(ended: asyncio.Event, error: BaseException | None = None) -> None:
    """A task that takes a while to end once cancelled (as a connection's close does)."""
    try:
        await asyncio.sleep(3600)
    finally:
        await asyncio.sleep(0.05)
        ended.set()
        if error is not None:
            raise error


async def test_a_stop_that_comes_while_a_task_is_being_cancelled_is_not_swallowed() -> None:
    for error in (None, RuntimeError("its own failure")):
        ended = asyncio.Event()
        inner = asyncio.create_task(slow_to_end(ended, error))
        await asyncio.sleep(0)
        caller = asyncio.create_task(cancel_and_wait(inner))
        await asyncio.sleep(0.01)  # waiting for the inner task to end
        caller.cancel()  # the stop
        with pytest.raises(asyncio.CancelledError):
            await caller
        assert inner.done()


async def test_the_task_s_own_end_is_not_the_caller_s_and_clean_up_after_it_runs() -> None:
    ended = asyncio.Event()
    inner = asyncio.create_task(slow_to_end(ended, RuntimeError("its own failure")))
    await asyncio.sleep(0)
    await cancel_and_wait(inner)  # no error: the caller was not cancelled
    assert ended.is_set()

    cleaned: list[str] = []

    async def stopping() -> None:
        watcher = asyncio.create_task(slow_to_end(asyncio.Event()))
        try:
            await asyncio.sleep(3600)
        finally:  # already cancelled: the watcher is ended, then the rest still runs
            await cancel_and_wait(watcher)
            cleaned.append("connection closed")

    task = asyncio.create_task(stopping())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cleaned == ["connection closed"]


async def test_many_tasks_end_whatever_their_end_and_a_stop_meanwhile_is_raised() -> None:
    ended = [asyncio.Event() for _ in range(3)]
    tasks = [asyncio.create_task(slow_to_end(event, RuntimeError("its own failure")))
             for event in ended]
    await asyncio.sleep(0)
    await cancel_all_and_wait(tasks)  # their own failures are not the caller's
    assert all(event.is_set() for event in ended) and all(task.done() for task in tasks)

    inner = [asyncio.create_task(slow_to_end(asyncio.Event())) for _ in range(3)]
    await asyncio.sleep(0)
    caller = asyncio.create_task(cancel_all_and_wait(inner))
    await asyncio.sleep(0.01)  # waiting for them to end
    caller.cancel()  # the stop
    with pytest.raises(asyncio.CancelledError):
        await caller
