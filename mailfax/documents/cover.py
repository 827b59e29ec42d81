"""The cover page: a mail's own text as the first page(s) of its fax.

The layout comes from ``templates/<language>/cover.xml`` (jinja2 producing a small XML
vocabulary, described in the template itself); ReportLab turns it into a PDF. ReportLab is pure
Python and fast (a cover takes a few milliseconds), and with DejaVu Sans (Debian
``fonts-dejavu-core``) umlauts, ß and € render. Everything is black on white, at least 10 pt,
with thick rules only, so the page survives a 204×98 dpi bilevel fax.

All functions here are pure and blocking: the intake calls them in a worker thread.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from mailfax.providers.base import FaxDocument

FONT_DIRS: list[Path] = [
    Path("/usr/share/fonts/truetype/dejavu"),  # Debian, Ubuntu: fonts-dejavu-core
    Path("/usr/share/fonts/dejavu"),  # Fedora, Arch
    Path("/usr/local/share/fonts/dejavu"),
]
REGULAR_FONT = "MailfaxSans"
BOLD_FONT = "MailfaxSans-Bold"
COVER_FILENAME = "cover.pdf"

_SIGNATURE_DELIMITERS = ("-- ", "--")
_BLANK_RUN = re.compile(r"\n{3,}")


class CoverUnavailable(RuntimeError):
    """Cover pages cannot be rendered on this machine (no suitable font installed)."""


@dataclass(frozen=True)
class CoverInfo:
    sender: str
    number: str  # display form, e.g. "+49 30 123456"
    subject: str
    date: datetime
    text: str  # already cleaned with cover_text()
    document_pages: int  # the pages that follow the cover


def cover_text(text: str) -> str:
    """The part of a mail's text that belongs on a cover page.

    Drops the signature (everything from a line ``-- `` on, also ``--`` since many clients
    strip trailing spaces), quoted reply lines (starting with ``>``), trailing spaces and
    surplus blank lines. An empty result means: nothing worth a cover page.
    """
    kept: list[str] = []
    for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        if line in _SIGNATURE_DELIMITERS:
            break
        if line.lstrip().startswith(">"):
            continue
        kept.append(line.rstrip())
    return _BLANK_RUN.sub("\n\n", "\n".join(kept)).strip("\n")


def render_cover(info: CoverInfo, language: str, templates_dir: Path) -> FaxDocument:
    """Render the cover page(s) for ``info``; "page 1 of N" counts the documents' pages too.

    Blocking (CPU, a few ms); raises :class:`CoverUnavailable` when no font is installed and
    :class:`jinja2.TemplateError` or :class:`xml.etree.ElementTree.ParseError` for a broken
    template. ReportLab and Jinja2 (0.15 s to import) are loaded on the first call, in the
    worker thread that renders, not when mailfax starts.
    """
    from mailfax.documents.cover_pdf import render

    return render(info, language, templates_dir)
