"""Text for systems that take ASCII only (fax headers, station ids, provider file names)."""

from __future__ import annotations

import unicodedata

# German (and a few other) letters whose ASCII spelling is not the base letter alone.
SPELLED_OUT = str.maketrans({"ä": "ae", "ö": "oe", "ü": "ue", "Ä": "Ae", "Ö": "Oe", "Ü": "Ue",
                             "ß": "ss", "ẞ": "SS", "æ": "ae", "Æ": "AE", "ø": "o", "Ø": "O",
                             "œ": "oe", "Œ": "OE", "ł": "l", "Ł": "L", "đ": "d", "Đ": "D",
                             "€": "EUR"})


def to_ascii(text: str) -> str:
    """``Müller & Söhne`` → ``Mueller & Soehne``: umlauts spelled out, other accents dropped,
    anything without an ASCII form removed."""
    decomposed = unicodedata.normalize("NFKD", text.translate(SPELLED_OUT))
    return decomposed.encode("ascii", "ignore").decode("ascii")
