"""Text for systems that take ASCII only (fax headers, station ids, provider file names)."""

from __future__ import annotations

import re
import unicodedata

_HEADER_END = re.compile(rb"\r?\n\r?\n")

# Letters whose ASCII spelling is not the base letter alone (German umlauts first), and
# typographic marks with a plain ASCII form.
SPELLED_OUT = str.maketrans({
    "ä": "ae", "ö": "oe", "ü": "ue", "Ä": "Ae", "Ö": "Oe", "Ü": "Ue", "ß": "ss", "ẞ": "SS",
    "æ": "ae", "Æ": "Ae", "ø": "oe", "Ø": "Oe", "œ": "oe", "Œ": "Oe", "å": "aa", "Å": "Aa",
    "ð": "d", "Ð": "D", "þ": "th", "Þ": "Th", "ł": "l", "Ł": "L", "đ": "d", "Đ": "D",
    "–": "-", "—": "-", "„": '"', "“": '"', "”": '"', "‚": "'", "‘": "'", "’": "'", "€": "EUR",
})


def to_ascii(text: str) -> str:
    """``Müller & Söhne`` → ``Mueller & Soehne``: umlauts spelled out, other accents dropped,
    anything without an ASCII form removed."""
    decomposed = unicodedata.normalize("NFKD", text.translate(SPELLED_OUT))
    return decomposed.encode("ascii", "ignore").decode("ascii")


def header_section(raw: bytes) -> bytes:
    """A mail's header section: everything before its first empty line (LF or CRLF)."""
    return _HEADER_END.split(raw, maxsplit=1)[0]
