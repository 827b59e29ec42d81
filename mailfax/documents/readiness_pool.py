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
import contextlib
import logging
import os
import select
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from mailfax.documents.faxrender import FaxResolution
from mailfax.documents.mapped import pieces
from mailfax.documents.readiness import Finding, ReadinessLimits, check_documents

if TYPE_CHECKING:
    from concurrent.futures import Executor, Future

log = logging.getLogger(__name__)

NICE = 10  # added to a worker's nice level: it gets the CPU only when intake leaves it
START_SECONDS = 60.0  # for a fresh worker to start and import pdfium (a loaded machine)
START_METHOD = "forkserver"
# A document larger than this goes to a worker as a file in the spool folder, not pickled:
# the pickle would be a second whole copy in the serving process (bench/memory.py: a 25 MB
# mail peaked at 2.5x its size with the pickle, 1.9x without the check).
FILE_ABOVE = 1024 * 1024
STALE_SECONDS = 600.0  # a hand-over file this old is left from a process that died


class Pages(NamedTuple):
    """What the check reads of a document, and all a worker is sent (no class of the
    serving process's to import there): its bytes, or for a large one the file holding
    them (``path``, then ``data`` is empty)."""

    filename: str
    data: bytes
    pages: int
    path: str = ""

    def read(self) -> Pages:
        """With its bytes (in the worker: read from its file)."""
        return self._replace(data=Path(self.path).read_bytes(), path="") if self.path else self


def _start_worker(serving_pid: int) -> None:
    """A worker's initializer: ended with the serving process, niced, and pdfium and Pillow
    loaded before its first page."""
    _end_with(serving_pid)
    os.nice(NICE)
    import PIL.Image  # noqa: F401
    import pypdfium2  # noqa: F401


def _end_with(serving_pid: int) -> None:
    """End this worker when the serving process ends, however it ends (``kill -9`` too).

    Without this a worker outlives it: it waits for work on its queue's pipe, whose other
    end it holds itself, and it keeps the fork server (and that the resource tracker)
    alive: three processes and some 70 MB left behind by every killed ``serve``."""
    try:
        watched = os.pidfd_open(serving_pid)
    except ProcessLookupError:
        os._exit(0)  # gone already
    except (AttributeError, OSError):  # no pidfd (an old kernel): ask once a second
        watched = None

    def watch() -> None:
        if watched is not None:
            select.select([watched], [], [])  # readable once the process has ended
        else:
            while _alive(serving_pid):
                time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="mailfax-readiness-watch", daemon=True).start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _ready() -> int:
    return os.getpid()


def _check(documents: Sequence[Pages], limits: ReadinessLimits,
           resolution: FaxResolution) -> list[Finding]:
    return check_documents([document.read() for document in documents], limits, resolution)


@dataclass(frozen=True)
class Checked:
    """A check's result: the findings, or ``checked`` False with why it was not done."""

    findings: list[Finding]
    checked: bool = True
    why: str = ""


class ReadinessPool:
    """The worker processes; :meth:`check` runs one mail's check in one of them."""

    def __init__(self, workers: int = 1, spool: Path | None = None):
        self.workers = workers
        self.spool = spool  # where documents over FILE_ABOVE are handed over; None: pickled
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
        async with asyncio.timeout(START_SECONDS):
            await asyncio.wrap_future(answer)

    def _launch(self) -> Future[int]:
        if self._executor is None:
            if self.spool is not None:
                _remove_stale_files(self.spool)
            self._executor = _process_pool(self.workers)
        return self._executor.submit(_ready)

    async def check(self, documents: Sequence[Any], limits: ReadinessLimits,
                    resolution: FaxResolution, seconds: float) -> Checked:
        """The findings for ``documents`` (objects with filename, data and pages), in a
        worker; at most ``seconds`` from the moment a worker takes it (waiting for a free
        worker does not count)."""
        async with self._slots:
            try:
                await self.start()
                pages = await self._hand_over(documents)
                try:
                    assert self._executor is not None
                    loop = asyncio.get_running_loop()
                    work = loop.run_in_executor(self._executor, _check, pages, limits,
                                                resolution)
                    async with asyncio.timeout(seconds):
                        return Checked(await work)
                finally:
                    _remove_files(pages)
            except TimeoutError:
                self._replace("it took over %.0f s", seconds)
                return Checked([], checked=False, why=f"it took over {seconds:.0f} s")
            except Exception as error:  # BrokenProcessPool: the worker died (pdfium crashed)
                self._replace("its worker failed: %s", error)
                return Checked([], checked=False, why=f"its worker failed ({error})")

    async def _hand_over(self, documents: Sequence[Any]) -> list[Pages]:
        """What the worker is sent of ``documents``: their bytes, or for one over FILE_ABOVE
        (with a spool folder) the file it was written to (in a thread: many megabytes)."""
        if self.spool is not None and any(len(document.data) > FILE_ABOVE
                                          for document in documents):
            try:
                return await asyncio.to_thread(_in_files, documents, self.spool)
            except OSError as error:  # a full disk: the pickle costs memory, not more
                log.warning("readiness: documents handed to the worker in memory, not as "
                            "files: %s", error)
        # bytes() costs nothing for bytes; a mapped document is read into memory here
        return [Pages(document.filename, bytes(document.data), document.pages)
                for document in documents]

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


def _in_files(documents: Sequence[Any], spool: Path) -> list[Pages]:
    """``documents`` for the worker, each over FILE_ABOVE written to a file of its own in
    ``spool`` (0600) and named, not carried (in a thread: up to many megabytes)."""
    spool.mkdir(mode=0o700, parents=True, exist_ok=True)
    handed: list[Pages] = []
    try:
        for document in documents:
            if len(document.data) <= FILE_ABOVE:
                handed.append(Pages(document.filename, bytes(document.data), document.pages))
                continue
            handle, name = tempfile.mkstemp(prefix="readiness-", suffix=".pdf", dir=spool)
            handed.append(Pages(document.filename, b"", document.pages, path=name))
            with os.fdopen(handle, "wb") as file:  # a full disk: removed with the others
                for piece in pieces(document.data):  # a mapped one: its pages dropped as read
                    file.write(piece)
    except BaseException:
        _remove_files(handed)
        raise
    return handed


def _remove_stale_files(spool: Path) -> None:
    """Hand-over files a killed process left behind (a check holds one for seconds)."""
    stale = time.time() - STALE_SECONDS
    for path in spool.glob("readiness-*.pdf"):
        with contextlib.suppress(OSError):
            if path.stat().st_mtime < stale:
                path.unlink()


def _remove_files(pages: Sequence[Pages]) -> None:
    for page in pages:
        if page.path:
            Path(page.path).unlink(missing_ok=True)


def _process_pool(workers: int) -> Executor:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    context = multiprocessing.get_context(START_METHOD)
    # The fork server loads only this module (not the serving program's __main__, the whole
    # CLI); each worker then loads pdfium itself (_start_worker).
    context.set_forkserver_preload([__name__])
    return ProcessPoolExecutor(max_workers=workers, mp_context=context,
                               initializer=_start_worker, initargs=(os.getpid(),))


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
