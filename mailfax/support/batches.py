"""One worker thread for short CPU work that can run beside the event loop, in batches.

A small mail's PDF check takes about half a millisecond, mostly in pikepdf without the GIL:
worth doing beside the loop, but ``asyncio.to_thread`` costs the loop a thread-pool submit
(and often a thread's wake-up) per call, a tenth of its time per mail in a burst. Here calls
that come while the worker is busy wait in a list and run in one go after it, and their
results come back to the loop in one callback per batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

Call = tuple[Callable[[], Any], asyncio.AbstractEventLoop, "asyncio.Future[Any]"]


class BatchWorker:
    """Runs calls in one daemon thread (started on first use), in the order they came."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._waiting: list[Call] = []
        self._ready = threading.Condition(threading.Lock())
        self._thread: threading.Thread | None = None

    async def run(self, function: Callable[..., T], *args: Any) -> T:
        """``function(*args)`` in the worker thread; its result or its exception."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        with self._ready:
            self._waiting.append((lambda: function(*args), loop, future))
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name=self.name,
                                                daemon=True)
                self._thread.start()
            self._ready.notify()
        return await future

    def _work(self) -> None:
        while True:
            with self._ready:
                while not self._waiting:
                    self._ready.wait()
                batch, self._waiting = self._waiting, []
            outcomes: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Any,
                                                              BaseException | None]]] = {}
            for call, loop, future in batch:
                try:
                    outcome: tuple[asyncio.Future[Any], Any, BaseException | None] = (
                        future, call(), None)
                except BaseException as error:  # handed to the caller, as to_thread does
                    outcome = (future, None, error)
                outcomes.setdefault(loop, []).append(outcome)
            for loop, settled in outcomes.items():
                with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits
                    loop.call_soon_threadsafe(_settle, settled)


def settle_all(settled: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
    """:func:`settle` each outcome of a batch: one callback (one wake-up of the loop) for the
    whole batch, not one per call."""
    for future, result, error in settled:
        settle(future, result, error)


_settle = settle_all  # the worker's callback (tests count its calls)


def settle(future: asyncio.Future[Any], result: Any, failure: BaseException | None) -> None:
    """Give a worker's outcome to the future an awaiting coroutine holds (on its loop),
    unless that coroutine was cancelled meanwhile."""
    if future.cancelled():
        return
    if failure is not None:
        future.set_exception(failure)
    else:
        future.set_result(result)
