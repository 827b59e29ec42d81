"""The batch worker (support/batches.py) that checks small mails' PDFs beside the loop."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

import mailfax.support.batches as batches_module
from mailfax.support.batches import BatchWorker


async def test_calls_run_in_the_worker_in_order_and_give_their_results() -> None:
    worker = BatchWorker("test-batches")
    ran: list[tuple[int, str]] = []

    def work(number: int) -> int:
        ran.append((number, threading.current_thread().name))
        return number * 2

    results = await asyncio.gather(*(worker.run(work, number) for number in range(50)))
    assert results == [number * 2 for number in range(50)]
    assert ran == [(number, "test-batches") for number in range(50)]


async def test_calls_made_while_it_is_busy_come_back_in_one_batch(
        monkeypatch: pytest.MonkeyPatch) -> None:
    worker = BatchWorker("test-batches")
    busy, release = threading.Event(), threading.Event()
    batches: list[int] = []
    real = batches_module._settle

    def counted(settled: list[Any]) -> None:
        batches.append(len(settled))
        real(settled)

    def block() -> str:
        busy.set()
        release.wait(10)
        return "first"

    monkeypatch.setattr(batches_module, "_settle", counted)
    first = asyncio.ensure_future(worker.run(block))
    await asyncio.to_thread(busy.wait, 10)
    rest = [asyncio.ensure_future(worker.run(str, number)) for number in range(10)]
    await asyncio.sleep(0.05)
    release.set()
    assert await first == "first"
    assert await asyncio.gather(*rest) == [str(number) for number in range(10)]
    assert batches == [1, 10]  # one hand-back to the loop for the ten that waited


async def test_an_exception_reaches_the_caller_and_the_worker_goes_on() -> None:
    worker = BatchWorker("test-batches")

    def fail() -> None:
        raise ValueError("bad document")

    with pytest.raises(ValueError, match="bad document"):
        await worker.run(fail)
    assert await worker.run(len, "four") == 4


async def test_a_cancelled_caller_does_not_stop_the_others() -> None:
    worker = BatchWorker("test-batches")
    release = threading.Event()
    slow = asyncio.ensure_future(worker.run(release.wait, 10))
    later = asyncio.ensure_future(worker.run(len, "ab"))
    await asyncio.sleep(0.01)
    slow.cancel()
    release.set()
    assert await later == 2
    assert slow.cancelled()
