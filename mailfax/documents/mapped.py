"""A large document's bytes in a file rather than in memory.

A part of a large mail (over :data:`mailfax.intake.spool.DECODE_TO_FILE_ABOVE`) is decoded
piece by piece into an unlinked file in ``<data_dir>/spool``, and so is a large stored
document read for the page check, the send or the transmission report
(``Store.load_documents(mail_id, spool)``, ``Store.claim_work(…, spool=)``); each is handed
on as a :class:`DocumentMap`: a read-only map of that file. It is a buffer like ``bytes``
(length, slices, ``hashlib``, ``file.write``), but it costs no heap, and the code that reads
a whole document reads it the way that keeps it out of memory: qpdf and pdfium open the file
themselves (:attr:`DocumentMap.path`), the store and a provider's request read it in pieces,
dropping the pages read (:func:`pieces`). The file goes with the map: unlinked from the
start, it is gone when the map is, even after a crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import mmap
import tempfile
from collections.abc import AsyncIterable, Iterable, Iterator
from pathlib import Path
from typing import IO, TypeAlias

PIECE_BYTES = 1024 * 1024


class DocumentMap(mmap.mmap):
    """A read-only map of the unlinked file holding one decoded document."""

    file: IO[bytes]  # kept open as long as the map: the file's only name is its descriptor

    @classmethod
    def of(cls, file: IO[bytes]) -> DocumentMap:
        """The map of ``file`` (written and flushed, not empty)."""
        mapped = cls(file.fileno(), 0, access=mmap.ACCESS_READ)
        mapped.file = file
        return mapped

    @property
    def path(self) -> str:
        """A name the file opens by (Linux): for a library that reads files itself."""
        return f"/proc/self/fd/{self.file.fileno()}"


def unlinked_file(folder: Path) -> IO[bytes]:
    """A new file in ``folder`` (made 0700 if need be) that has no name: gone when closed."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    return tempfile.TemporaryFile(dir=folder)


def document_file(folder: Path, content: Iterable[bytes | memoryview]) -> DocumentMap:
    """``content``, piece by piece, in an unlinked file in ``folder``, mapped. ValueError if
    there is none (an empty file cannot be mapped). Blocking: in a worker thread."""
    file = unlinked_file(folder)
    try:
        for piece in content:
            file.write(piece)
        return _mapped(file)
    except BaseException:
        file.close()
        raise


async def document_file_from(folder: Path, content: AsyncIterable[bytes]) -> DocumentMap:
    """:func:`document_file` for pieces that come from the event loop's I/O (a database's
    answers): the file's work in worker threads."""
    file = await asyncio.to_thread(unlinked_file, folder)
    try:
        async for piece in content:
            await asyncio.to_thread(file.write, piece)
        return await asyncio.to_thread(_mapped, file)
    except BaseException:
        file.close()
        raise


def _mapped(file: IO[bytes]) -> DocumentMap:
    """``file``, written, flushed and mapped; ValueError if it is empty."""
    file.flush()
    if not file.tell():
        raise ValueError("no content to map")
    return DocumentMap.of(file)


DocumentBytes: TypeAlias = bytes | DocumentMap
"""A document's bytes: in memory, or (a large decoded part) in its file."""


def pieces(data: DocumentBytes, size: int = PIECE_BYTES) -> Iterator[memoryview]:
    """``data`` in views of ``size`` bytes, each valid until the next is asked for. From a
    :class:`DocumentMap` the pages read are dropped from the process as it goes (they stay in
    the page cache), so reading a large document whole does not make it count in memory."""
    view = memoryview(data)
    try:
        for start in range(0, len(view), size):
            piece = view[start:start + size]
            try:
                yield piece
            finally:
                piece.release()
            if isinstance(data, DocumentMap):
                drop_read_pages(data, start + size, start)
    finally:
        view.release()


def drop_read_pages(data: mmap.mmap, end: int, start: int = 0) -> None:
    """Drop the whole mapped pages in ``[start, end)`` from the process (they stay in the
    page cache and come back if read again), so a mapped file read once is not counted in the
    process's memory."""
    start += -start % mmap.PAGESIZE
    end = min(end, len(data))
    end -= end % mmap.PAGESIZE
    if end > start and hasattr(mmap, "MADV_DONTNEED"):
        with contextlib.suppress(OSError, ValueError):
            data.madvise(mmap.MADV_DONTNEED, start, end - start)


def sha256_of(data: DocumentBytes) -> str:
    """The hex SHA-256 of ``data``, a mapped one read in :func:`pieces` (out of memory)."""
    if isinstance(data, bytes):
        return hashlib.sha256(data).hexdigest()
    digest = hashlib.sha256()
    for piece in pieces(data):
        digest.update(piece)
    return digest.hexdigest()
