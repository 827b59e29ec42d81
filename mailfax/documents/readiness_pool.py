"""The fax-readiness check (:mod:`mailfax.documents.readiness`) in worker processes of its own.

Rendering a page at fax resolution costs some 22 ms of CPU, and pdfium works one page at a
time per process (``faxrender.PDFIUM_LOCK``): run in the serving process it would take the
CPU and the lock from the SMTP sessions. Here it runs in ``documents.readiness_workers``
processes (default 1) started with "forkserver" (never a fork of the threaded serving
process), each lowered by :data:`NICE` so intake and the SMTP clients get the CPU first. A
worker is its own process, so pdfium needs no lock there (each worker renders one page at a
time anyway).

The pool is made at the first check (or when the checker loop starts, once the port
accepts). A check that takes longer than its limit (``readiness_max_seconds`` plus a page's
grace) has its worker killed and the pool replaced: the mail is "not checked", and the
queue goes on. A worker that died (BrokenProcessPool) is replaced the same way.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from mailfax.documents.faxrender import FaxResolution
from mailfax.documents.readiness import Finding, ReadinessLimits, check_documents

if TYPE_CHECKING:
    from concurrent.futures import Executor, Future

log = logging.getLogger(__name__)

NICE = 10  # added to a worker's nice level: it gets the CPU only when intake leaves it
START_SECONDS = 60.0  # for a fresh worker to start and import pdfium (a loaded machine)
START_METHOD = "forkserver"


class Pages(NamedTuple):
    """What the check reads of a document, and all a worker is sent (no class of the
    serving process's to import there)."""

    filename: str
    data: bytes
    pages: int


def _lower_priority() -> None:
    """A worker's initializer: niced, and pdfium and Pillow loaded before its first page."""
    os.nice(NICE)
    import PIL.Image  # noqa: F401
    import pypdfium2  # noqa: F401


def _ready() -> int:
    return os.getpid()


def _check(documents: Sequence[Pages], limits: ReadinessLimits,
           resolution: FaxResolution) -> list[Finding]:
    return check_documents(documents, limits, resolution)


@dataclass(frozen=True)
class Checked:
    """A check's result: the findings, or ``checked`` False with why it was not done."""

    findings: list[Finding]
    checked: bool = True
    why: str = ""


class ReadinessPool:
    """The worker processes; :meth:`check` runs one mail's check in one of them."""

    def __init__(self, workers: int = 1):
        self.workers = workers
        self._executor: Executor | None = None
        self._slots = asyncio.Semaphore(workers)
        self._started: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Make the workers (once) and wait until one answers."""
        started = self._started
        if started is None or (started.done() and (started.cancelled()
                                                   or started.exception() is not None)):
            self._started = started = asyncio.ensure_future(self._start())
        await asyncio.shield(started)

    async def _start(self) -> None:
        # The first task starts the processes, and with "forkserver" its server first: that
        # waits for them, so not on the event loop.
        answer = await asyncio.to_thread(self._launch)
        await asyncio.wait_for(asyncio.wrap_future(answer), START_SECONDS)

    def _launch(self) -> Future[int]:
        if self._executor is None:
            self._executor = _process_pool(self.workers)
        return self._executor.submit(_ready)

    async def check(self, documents: Sequence[Any], limits: ReadinessLimits,
                    resolution: FaxResolution, seconds: float) -> Checked:
        """The findings for ``documents`` (objects with filename, data and pages), in a
        worker; at most ``seconds`` from the moment a worker takes it (waiting for a free
        worker does not count)."""
        pages = [Pages(document.filename, document.data, document.pages)
                 for document in documents]
        async with self._slots:
            try:
                await self.start()
                assert self._executor is not None
                loop = asyncio.get_running_loop()
                work = loop.run_in_executor(self._executor, _check, pages, limits, resolution)
                return Checked(await asyncio.wait_for(work, seconds))
            except TimeoutError:
                self._replace("it took over %.0f s", seconds)
                return Checked([], checked=False, why=f"it took over {seconds:.0f} s")
            except Exception as error:  # BrokenProcessPool: the worker died (pdfium crashed)
                self._replace("its worker failed: %s", error)
                return Checked([], checked=False, why=f"its worker failed ({error})")

    def _replace(self, why: str, *args: object) -> None:
        """Kill the workers (the hung or dead one, and any other check in them: those are
        "not checked" too) and make new ones at the next check."""
        log.warning("readiness: mail not checked: " + why + "; worker replaced", *args)
        self.close()

    def close(self) -> None:
        """Stop the workers now (a check in them is dropped: its jobs' hold still ends)."""
        executor, self._executor, self._started = self._executor, None, None
        if executor is not None:
            kill(executor)


def _process_pool(workers: int) -> Executor:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    context = multiprocessing.get_context(START_METHOD)
    # The fork server loads only this module (not the serving program's __main__, the whole
    # CLI); each worker then loads pdfium itself (_lower_priority).
    context.set_forkserver_preload([__name__])
    return ProcessPoolExecutor(max_workers=workers, mp_context=context,
                               initializer=_lower_priority)


def kill(executor: Executor) -> None:
    """Kill a process pool's workers and shut it down without waiting for them."""
    processes: dict[int, Any] = dict(getattr(executor, "_processes", None) or {})
    for process in processes.values():
        if process.is_alive():
            process.kill()
    executor.shutdown(wait=False, cancel_futures=True)


def worker_pids(pool: ReadinessPool) -> list[int]:
    """The process ids of the pool's workers now (for tests and the log)."""
    processes: dict[int, Any] = dict(getattr(pool._executor, "_processes", None) or {})
    return [pid for pid, process in processes.items() if process.is_alive()]
