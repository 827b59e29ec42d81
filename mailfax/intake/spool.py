"""Mails being received: their bytes kept in a spool file rather than in memory, and the
byte budget that bounds how much memory the mails being received at once may take.

aiosmtpd's own DATA keeps every line of a mail as a ``bytearray`` and then joins them: about
four times the message in memory before mailfax has looked at it. :class:`Spool` keeps a
small mail in memory and writes a larger one to an unlinked file in ``<data_dir>/spool``;
downstream gets ``bytes`` for the first and a read-only ``mmap`` of the file for the second
(a buffer that costs no heap, and whose pages the parser hands back as it goes,
:func:`buffer_chunks`).

A large base64 part is decoded piece by piece into a file of its own as well
(:func:`decode_base64_to_file`, :mod:`mailfax.documents.mapped`). Reading, parsing and
storing a mail still takes memory in proportion to its size, most for a shape the email
package must read (:data:`MEMORY_PER_BYTE`, measured by ``bench/memory.py``).
:class:`ReceivingBudget` counts that for the mails in hand; a new DATA while it is spent,
or a mail that does not fit, is answered ``452 4.3.1`` (try later), so peak memory stays
within ``smtp.receiving_budget``.
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pybase64

from mailfax.documents.mapped import DocumentMap, document_file, drop_read_pages, unlinked_file

# Up to this size a mail stays in memory (and is parsed on the event loop, see
# intake.service.INLINE_ASSEMBLY_BYTES); beyond it, it goes to the spool file.
IN_MEMORY_BYTES = 64 * 1024
# Written to the spool file in pieces of this size, each in a worker thread.
WRITE_BYTES = 256 * 1024
# Peak memory growth per byte of a mail while mailfax parses and stores it (the mapped spool
# file as the fast scan reads it, the decoded parts, the PDF check, the store's copy):
# bench/memory.py measures 0.4-1.2 for one 10-30 MB PDF mail (its part decoded into a file),
# and 3.1-3.5 for a shape the email package must read (its line lists and joined text alone
# are 2.8). With the dispatcher loading the first job meanwhile and memory the allocator
# keeps, the budget charges each mail this many times its size.
MEMORY_PER_BYTE = 4
# The parser is fed in pieces of this size; mmap pages behind it are dropped.
FEED_BYTES = 1024 * 1024
# A base64 part whose text is longer than this is decoded into a file of its own, not into
# memory (documents.mapped), in pieces of DECODE_PIECE_BYTES of text.
DECODE_TO_FILE_ABOVE = 1024 * 1024
DECODE_PIECE_BYTES = 1024 * 1024

MailBytes = bytes | mmap.mmap
"""A received mail as downstream gets it: ``bytes``, or an ``mmap`` of its spool file."""

BUDGET_SPENT = ("452 4.3.1 Too many large mails are being received right now; please try "
                "again later")


def memory_cost(size: int) -> int:
    """What receiving and handling a mail of ``size`` bytes may take in memory."""
    return size * MEMORY_PER_BYTE


class ReceivingBudget:
    """The memory the mails in hand may take together, in bytes (:func:`memory_cost` per
    mail). Used on the event loop only, so no lock."""

    def __init__(self, limit: int):
        self.limit = limit
        self.in_use = 0

    def reserve(self, declared_size: int = 0) -> Reservation | None:
        """A reservation for a new DATA, holding the cost of the size the client declared
        (``MAIL FROM ... SIZE=``); None (refuse it) when the budget is spent or that size
        does not fit."""
        if self.in_use >= self.limit:
            return None
        reservation = Reservation(self)
        return reservation if reservation.grow_to(declared_size) else None


class Reservation:
    """What one mail holds of a :class:`ReceivingBudget`; give it back with :meth:`release`."""

    def __init__(self, budget: ReceivingBudget):
        self.budget = budget
        self.held = 0

    def grow_to(self, size: int) -> bool:
        """Hold the cost of a mail of ``size`` bytes (a mail larger than it declared); False
        if that does not fit, holding what it held."""
        extra = memory_cost(size) - self.held
        if extra <= 0:
            return True
        if self.budget.in_use + extra > self.budget.limit:
            return False
        self.budget.in_use += extra
        self.held += extra
        return True

    def release(self) -> None:
        self.budget.in_use -= self.held
        self.held = 0


def declared_size(mail_options: list[str]) -> int:
    """The ``SIZE=`` of ``MAIL FROM`` (RFC 1870), 0 when absent or malformed."""
    for option in mail_options:
        name, _, value = option.partition("=")
        if name.upper() == "SIZE" and value.isdigit():
            return int(value)
    return 0


class Spool:
    """One mail's bytes as they arrive: in memory up to ``in_memory`` bytes, then in an
    unlinked temporary file in ``folder`` (nothing is left behind, even after a crash)."""

    def __init__(self, folder: Path, in_memory: int = IN_MEMORY_BYTES):
        self.folder = folder
        self.in_memory = in_memory
        self.size = 0
        self._pending = bytearray()
        self._file: IO[bytes] | None = None
        self._map: mmap.mmap | None = None

    async def write(self, data: bytes | bytearray) -> None:
        self._pending += data
        self.size += len(data)
        if self.size > self.in_memory and len(self._pending) >= WRITE_BYTES:
            await self._flush()

    async def content(self) -> MailBytes:
        """The whole mail: ``bytes`` if it stayed in memory, else a read-only map of the
        file (valid until :meth:`close`)."""
        if self._file is None and self.size <= self.in_memory:
            return bytes(self._pending)
        await self._flush()
        assert self._file is not None
        if self.size == 0:
            return b""
        self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        return self._map

    def discard(self) -> None:
        """Forget what was received (a mail refused as too large keeps being read)."""
        self._pending.clear()

    async def _flush(self) -> None:
        if self._file is None:
            self._file = await asyncio.to_thread(unlinked_file, self.folder)
        file = self._file
        data, self._pending = self._pending, bytearray()  # handed over, not copied
        if data:
            await asyncio.to_thread(_append, file, data)

    def close(self) -> None:
        if self._map is not None:
            with contextlib.suppress(BufferError):  # a view still open: the GC unmaps it
                self._map.close()
            self._map = None
        if self._file is not None:
            self._file.close()
            self._file = None
        self._pending = bytearray()


def _append(file: IO[bytes], data: bytes | bytearray) -> None:
    file.write(data)
    file.flush()  # the map reads the file, not the buffer


def buffer_chunks(data: MailBytes, size: int = FEED_BYTES) -> Iterator[bytes]:
    """``data`` in pieces of ``size`` bytes. From an mmap, the pages already handed out are
    dropped from the process (they stay in the page cache), so reading a mapped 30 MB mail
    does not leave 30 MB of it counted in the process's memory."""
    view = memoryview(data)
    try:
        for start in range(0, len(view), size):
            yield bytes(view[start:start + size])
            if isinstance(data, mmap.mmap) and start:
                drop_read_pages(data, start, start - size)
    finally:
        view.release()


def decode_base64_to_file(buffer: bytes | bytearray | mmap.mmap, start: int, end: int,
                          folder: Path) -> DocumentMap:
    """The clean base64 (alphabet, line ends, final padding: ``fastmime``'s check) of
    ``buffer[start:end]`` decoded piece by piece into an unlinked file in ``folder``. Neither
    the text nor the decoded bytes are ever whole in memory; the mail's mapped pages read are
    dropped as it goes. ValueError for a part with nothing in it. Blocking: call it in a
    worker thread."""
    return document_file(folder, _decoded_pieces(buffer, start, end))


def _decoded_pieces(buffer: bytes | bytearray | mmap.mmap, start: int, end: int
                    ) -> Iterator[bytes]:
    carry = b""
    for piece_start in range(start, end, DECODE_PIECE_BYTES):
        piece_end = min(piece_start + DECODE_PIECE_BYTES, end)
        text = carry + bytes(buffer[piece_start:piece_end]).translate(None, b"\r\n")
        whole = len(text) - len(text) % 4 if piece_end < end else len(text)
        yield pybase64.b64decode(text[:whole])
        carry = text[whole:]
        if isinstance(buffer, mmap.mmap):
            drop_read_pages(buffer, piece_end, piece_start)
