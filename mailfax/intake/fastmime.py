"""A fast MIME scan for the shapes mail clients send every day; None for anything unusual.

The email package's feed parser reads a mail line by line and compiles a regular expression per
boundary; for a one-page PDF mail that is most of intake's parse time. This scan finds the parts
in the bytes instead (``bytes.find`` for the boundaries), parses only the header lines, and
decodes base64 straight from a ``memoryview`` (``pybase64``, no joined copy).

It builds the same tree of :class:`email.message.Message` objects the feed parser would (same
header values, through the same ``compat32.header_source_parse``; same payload bytes), so
:mod:`mailfax.intake.mime` reads both alike: file names, dispositions, charsets, TNEF and the
part limits are decided once, by the same code. Whatever the scan cannot prove it reads exactly
as the feed parser does (a bare CR in a header or next to a boundary, a missing blank line or
boundary, ``multipart/digest``, ``message/delivery-status``, boundaries one line could end both
of, repeated boundary lines, a ``From`` line amid the headers, deep nesting …) makes
:func:`scan` return None, and the caller parses the mail with the email package. Payloads it
does not decode itself (quoted-printable, uuencode, base64 with stray characters or bad
padding) are decoded by the email package's own ``get_payload``, so the bytes are the same.

Pure: no I/O (reading a mapped mail, it tells the kernel which pages it is done with).
"""

from __future__ import annotations

import mmap
import re
from email.message import Message
from email.policy import compat32
from itertools import pairwise
from typing import Any, TypeAlias

import pybase64

from mailfax.documents.mapped import drop_read_pages

# Beyond these the mail is hostile; the email package path refuses it with the usual sentence.
SCAN_MAX_PARTS = 1000
SCAN_MAX_DEPTH = 32

# A header line as the feed parser's ``headerRE`` sees one, with a name (a line ``:value``
# or ``From …`` is a defect the email package handles its own way).
_HEADER_NAME = re.compile(rb"[\041-\071\073-\176]+:")
_BASE64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_OWN_DECODING = ("quoted-printable", "x-uuencode", "uuencode", "uue", "x-uue")


# What the scan reads: the mail's bytes, or the mapped spool file of a large one (read in
# place: a copy would double the memory a large mail takes).
Buffer: TypeAlias = bytes | bytearray | mmap.mmap
# base64 is checked in pieces of this size, so the check holds no copy of a large part.
CHECK_BYTES = 1 << 20


class _Unusual(Exception):
    """A shape the scan does not read: the email package must."""


class ScannedPart(Message):
    """A part whose payload stays in the mail's bytes until it is asked for.

    ``get_payload`` answers like the email package's for a part it parsed: the text (surrogate
    escapes for 8-bit bytes) or, with ``decode=True``, the decoded bytes."""

    def __init__(self) -> None:
        super().__init__()
        self.buffer: Buffer = b""
        self.region: tuple[int, int] | None = None  # start, end of a leaf's payload

    def get_payload(self, i: Any = None, decode: bool = False) -> Any:
        if self.region is None:
            return super().get_payload(i, decode)  # type: ignore[call-overload]
        start, end = self.region
        if i is not None:
            raise TypeError("Expected list, got str")
        if not decode:
            return self._as_message().get_payload()
        transfer = str(self.get("content-transfer-encoding", "")).lower()
        if transfer == "base64" and _clean_base64(self.buffer, start, end):
            # pybase64 (SIMD): 6 µs for a 15 KB part where binascii.a2b_base64 takes 50-70;
            # that was a tenth of the event loop's time per PDF mail (py-spy, bench/intake.py).
            # On a clean region both drop the line ends and decode the same.
            return pybase64.b64decode(memoryview(self.buffer)[start:end])
        if transfer == "base64" or transfer in _OWN_DECODING:
            return self._as_message().get_payload(decode=True)
        return bytes(self.buffer[start:end])

    def clean_base64(self) -> tuple[int, int] | None:
        """The region of a leaf's base64 payload that decodes alike however it is read (see
        :func:`_clean_base64`), for a caller that decodes it itself; else None."""
        if self.region is None or \
                str(self.get("content-transfer-encoding", "")).lower() != "base64":
            return None
        return self.region if _clean_base64(self.buffer, *self.region) else None

    def _as_message(self) -> Message:
        """The part as the email package holds it (text payload): for the rare decodings."""
        assert self.region is not None
        start, end = self.region
        message = Message()
        for name, value in self.raw_items():
            message.set_raw(name, value)
        message.set_payload(bytes(self.buffer[start:end]).decode("ascii", "surrogateescape"))
        return message


def scan(raw: Buffer | memoryview) -> ScannedPart | None:
    """The mail as the email package's compat32 parser would read it, or None when its shape
    is one the scan leaves to that parser."""
    buffer = _searchable(raw)
    try:
        return _Scanner(buffer).message(0, len(buffer), depth=0, in_multipart=False)
    except _Unusual:
        return None


def _searchable(raw: Buffer | memoryview) -> Buffer:
    """Something ``find`` and slicing work on, without a copy when the view is the whole."""
    if isinstance(raw, bytes | bytearray | mmap.mmap):
        return raw
    owner = raw.obj
    if isinstance(owner, bytes | bytearray) and raw.contiguous and raw.nbytes == len(owner):
        return owner
    return raw.tobytes()


def _clean_base64(buffer: Buffer, start: int, end: int) -> bool:
    """Whether the region decodes alike with and without the email package's care: only
    alphabet characters and line ends, padding at the very end, whole quantums.

    ``translate`` passes over pieces of CHECK_BYTES (the regular expression the email package
    validates with costs four times as much): what is left once the alphabet is gone are line
    ends and padding."""
    rest = b"".join(_read_once(buffer, piece, min(piece + CHECK_BYTES, end))
                    .translate(None, _BASE64_ALPHABET) for piece in range(start, end, CHECK_BYTES))
    padding = rest.translate(None, b"\r\n")
    if padding not in (b"", b"=", b"=="):
        return False  # a stray character, or padding amid the data
    if padding and not buffer[max(start, end - len(rest)):end].rstrip(b"\r\n") \
            .endswith(padding):
        return False  # the padding is not at the end
    return (end - start - len(rest) + len(padding)) % 4 == 0


def _read_once(buffer: Buffer, start: int, end: int) -> bytes | bytearray:
    """``buffer[start:end]``; from a mapped mail, its pages are dropped from the process
    afterwards (a large mail's body is read piece by piece, never all of it counted at once)."""
    piece = buffer[start:end]
    if isinstance(buffer, mmap.mmap):
        drop_read_pages(buffer, end, start)
    return piece


def _find(buffer: Buffer, separator: bytes, start: int, end: int) -> int:
    """``buffer.find(separator, start, end)``; in a mapped mail, a window of CHECK_BYTES at a
    time, each window's pages dropped from the process once searched (see :func:`_read_once`)."""
    if not isinstance(buffer, mmap.mmap):
        return buffer.find(separator, start, end)
    position = start
    while position < end:
        window_end = min(position + CHECK_BYTES + len(separator) - 1, end)
        hit = buffer.find(separator, position, window_end)
        drop_read_pages(buffer, window_end, position)
        if hit >= 0 or window_end == end:
            return hit
        position += CHECK_BYTES
    return -1


def _starts(buffer: Buffer, prefix: bytes, start: int, end: int) -> bool:
    """``buffer.startswith(prefix, start, end)``, which an mmap does not have."""
    return end - start >= len(prefix) and buffer[start:start + len(prefix)] == prefix


def _ends(buffer: Buffer, suffix: bytes, start: int, end: int) -> bool:
    """``buffer.endswith(suffix, start, end)``, which an mmap does not have."""
    return end - start >= len(suffix) and buffer[end - len(suffix):end] == suffix


def _ambiguous(one: bytes, other: bytes) -> bool:
    """Whether one line can be a boundary line of both separators (``--b`` and ``--b--``:
    the closing line of one is an opening line of the other); ``--b`` and ``--b_alt`` are not."""
    short, long = sorted((one, other), key=len)
    return long.startswith(short) and long[len(short):] in (b"", b"-", b"--")


class _Scanner:
    def __init__(self, buffer: Buffer):
        self.buffer = buffer
        self.parts = 0
        self.boundaries: list[bytes] = []  # the enclosing multiparts', innermost last

    def message(self, start: int, end: int, depth: int, in_multipart: bool) -> ScannedPart:
        """The part in ``buffer[start:end]``: headers, then its body by its type."""
        self.parts += 1
        if self.parts > SCAN_MAX_PARTS or depth > SCAN_MAX_DEPTH:
            raise _Unusual
        part = ScannedPart()
        part.buffer = self.buffer
        body = self.headers(part, start, end)
        content_type = part.get_content_type()
        if content_type in ("message/delivery-status", "multipart/digest"):
            raise _Unusual  # blocks of headers; parts whose default type is message/rfc822
        if part.get_content_maintype() == "message":
            # The feed parser strips the line end of the last part it made, the leaf at the
            # bottom of a forward too when the forward is a part of a multipart.
            part.attach(self.message(body, end, depth + 1, in_multipart=in_multipart))
        elif part.get_content_maintype() == "multipart":
            self.multipart(part, body, end, depth)
        else:
            if in_multipart:  # the line end before a boundary belongs to the boundary
                if _ends(self.buffer, b"\r\n", body, end):
                    end -= 2
                elif _ends(self.buffer, b"\n", body, end):
                    end -= 1
            part.region = (body, end)
        return part

    def headers(self, part: Message, start: int, end: int) -> int:
        """Set the header lines up to the blank line on ``part``; where its body starts."""
        buffer = self.buffer
        lines: list[str] = []
        position = start
        while True:
            newline = buffer.find(b"\n", position, end)
            if newline < 0:
                raise _Unusual  # no blank line: headers only, or a cut-off part
            following = newline + 1
            if buffer.find(b"\r", position, newline - 1) >= 0:
                raise _Unusual  # a bare CR ends a line for the feed parser
            if following - position <= 2 and buffer[position] in b"\r\n":
                break  # the blank line
            if position == start and _starts(buffer, b"From ", start, end):
                # An mbox envelope line (forwards saved from mbox have one): the feed parser
                # keeps it apart, without its line end.
                part.set_unixfrom(buffer[start:following].decode("ascii", "surrogateescape")
                                  .removesuffix("\n").removesuffix("\r"))
                position = following
                continue
            if buffer[position] in b" \t":
                if not lines:
                    raise _Unusual  # a continuation without a header before it
            elif _HEADER_NAME.match(buffer, position, newline) is None:
                raise _Unusual  # body text where a header should be
            elif lines:
                part.set_raw(*compat32.header_source_parse(lines))
                lines = []
            lines.append(buffer[position:following].decode("ascii", "surrogateescape"))
            position = following
        if lines:
            part.set_raw(*compat32.header_source_parse(lines))
        return following

    def multipart(self, part: ScannedPart, start: int, end: int, depth: int) -> None:
        boundary = part.get_boundary()
        if not boundary or not boundary.isascii():
            raise _Unusual  # none, or 8-bit bytes the email package turns into U+FFFD
        separator = b"--" + boundary.encode("ascii")
        if any(_ambiguous(outer, separator) for outer in self.boundaries):
            raise _Unusual  # a line could end both: the feed parser's order decides
        delimiters = self.delimiters(separator, start, end)
        if not delimiters or delimiters[0][2] or not delimiters[-1][2]:
            raise _Unusual  # no first boundary, or no closing one
        self.boundaries.append(separator)
        for (_, line_end, closing), (next_start, _, _) in pairwise(delimiters):
            if closing:
                break
            if next_start == line_end:
                raise _Unusual  # boundary lines in a row: the feed parser skips them
            part.attach(self.message(line_end, next_start, depth + 1, in_multipart=True))
        self.boundaries.pop()

    def delimiters(self, separator: bytes, start: int, end: int) -> list[tuple[int, int, bool]]:
        """The boundary lines in ``buffer[start:end]``: (line start, line end, closing), as the
        feed parser's boundary expression matches a whole line; up to the first closing one."""
        buffer = self.buffer
        found: list[tuple[int, int, bool]] = []
        position = start
        while True:
            hit = _find(buffer, separator, position, end)
            if hit < 0:
                return found
            position = hit + len(separator)
            if hit != start and buffer[hit - 1] != 0x0A:
                if buffer[hit - 1] == 0x0D:
                    raise _Unusual  # at the start of a line only for the feed parser
                continue  # not at the start of a line
            after = position
            closing = _starts(buffer, b"--", after, end)
            if closing:
                after += 2
            while after < end and buffer[after] in b" \t":
                after += 1
            if _starts(buffer, b"\r\n", after, end):
                line_end = after + 2
            elif _starts(buffer, b"\n", after, end):
                line_end = after + 1
            elif after == len(buffer):
                line_end = after
            elif _starts(buffer, b"\r", after, end):
                raise _Unusual  # a boundary line ended by a bare CR
            else:
                continue  # more text on the line: not a boundary line
            found.append((hit, line_end, closing))
            if closing:
                return found
            position = line_end
