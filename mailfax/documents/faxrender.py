"""A PDF page as the recipient's fax machine receives it: 1-bit black and white at fax resolution.

A fax is sent as a bilevel image (ITU-T T.4): 1728 dots across the 215 mm of an A4 line
(about 204 per inch) and 3.85 lines per millimetre (98 per inch, "standard") or 7.7
(196 per inch, "fine"). Providers turn a PDF into that image themselves, and none of the
provider docs says how they treat grey: we read it pessimistically, as a plain threshold at
half brightness (no dithering), so light colours and grey text vanish and dark photos turn
black here exactly when they may do so at the recipient's machine.

The transmission report shows page 1 rendered this way, and the fax-readiness check measures
how much of each page is left. Pure and CPU-bound (callers run it in a thread); pdfium renders
the page (``pypdfium2``, a wheel with no system libraries), Pillow thresholds it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mailfax.documents.mapped import DocumentBytes, DocumentMap
from mailfax.support.lazy import lazy_module

if TYPE_CHECKING:
    import pypdfium2
    from PIL import Image
else:  # only when a page is rendered: not at start-up
    pypdfium2 = lazy_module("pypdfium2")
    Image = lazy_module("PIL.Image")

HORIZONTAL_DPI = 204  # 1728 dots over an A4 line
STANDARD_LINES_PER_INCH = 98
FINE_LINES_PER_INCH = 196
THRESHOLD = 128  # of 255: darker is black, lighter is white

# PDFium is not thread-safe, not even with different documents: two threads in it at once may
# crash the process (pypdfium2's docs, "Incompatibility with Threading"). Reports are made
# in worker threads, several at a time, so every call into it, including closing what it
# made, holds this lock. (The fax-readiness check runs in processes of its own,
# readiness_pool.py: there the lock is never contended.)
PDFIUM_LOCK = threading.Lock()


@dataclass(frozen=True)
class FaxResolution:
    horizontal_dpi: int
    vertical_dpi: int


STANDARD = FaxResolution(HORIZONTAL_DPI, STANDARD_LINES_PER_INCH)
FINE = FaxResolution(HORIZONTAL_DPI, FINE_LINES_PER_INCH)


def resolution_named(name: str) -> FaxResolution:
    """``"standard"`` or ``"fine"`` (the names the per-mail option and the config use)."""
    return FINE if name == "fine" else STANDARD


def page_count(pdf: bytes) -> int:
    with PDFIUM_LOCK:
        document = pypdfium2.PdfDocument(pdf)
        try:
            return len(document)
        finally:
            document.close()


def _opened(pdf: DocumentBytes) -> pypdfium2.PdfDocument:
    """pdfium's document of ``pdf``. A mapped one it reads from its file, block by block
    (pdfium takes no ``mmap``, and a copy would be the whole document in memory), through a
    file of its own: the map's file has one offset for everyone."""
    if isinstance(pdf, DocumentMap):
        return pypdfium2.PdfDocument(open(pdf.path, "rb"), autoclose=True)
    return pypdfium2.PdfDocument(pdf)


def rendered_page(pdf: DocumentBytes, page_index: int, dpi: float, grayscale: bool
                  ) -> Image.Image:
    """Page ``page_index`` of ``pdf`` rendered by pdfium at ``dpi`` (``"L"`` or ``"RGB"``),
    as a Pillow image of its own: nothing of pdfium's is left open when it returns."""
    with PDFIUM_LOCK:
        document = _opened(pdf)
        try:
            page = document[page_index]
            try:
                bitmap = page.render(scale=dpi / 72, grayscale=grayscale)
                try:
                    image: Image.Image = bitmap.to_pil().convert("L" if grayscale else "RGB")
                finally:
                    bitmap.close()
            finally:
                page.close()
        finally:
            document.close()
    return image


def render_as_faxed(pdf: DocumentBytes, page_index: int = 0,
                    resolution: FaxResolution = STANDARD) -> Image.Image:
    """Page ``page_index`` (0-based) of ``pdf`` as a mode ``"1"`` image at ``resolution``.

    The image has the fax's own pixel grid (e.g. 1728 × 1145 for an A4 page in standard
    mode), so its pixels are not square; :func:`as_square_pixels` makes a picture of it.
    """
    grey = rendered_page(pdf, page_index, resolution.horizontal_dpi, grayscale=True)
    lines = max(1, round(grey.height * resolution.vertical_dpi / resolution.horizontal_dpi))
    grey = grey.resize((grey.width, lines), Image.Resampling.BOX)
    return grey.point(lambda value: 255 if value >= THRESHOLD else 0, mode="1")


def as_square_pixels(image: Image.Image, resolution: FaxResolution) -> Image.Image:
    """A fax image stretched back to square pixels (each line repeated), still 1-bit: what
    the page looks like printed at the recipient's end, for a picture in a report."""
    height = round(image.height * resolution.horizontal_dpi / resolution.vertical_dpi)
    return image.resize((image.width, height), Image.Resampling.NEAREST)


def black_fraction(image: Image.Image) -> float:
    """How much of a 1-bit image is black, 0.0 (blank) to 1.0 (all black)."""
    # Mode "1" counts black in bin 0 as it is (no copy of the page to convert it).
    histogram = (image if image.mode == "1" else image.convert("L")).histogram()
    total = image.width * image.height
    return histogram[0] / total if total else 0.0
