"""Attachments → fax-ready PDFs: check PDFs, turn images into PDF pages, merge documents.

Pure and CPU-bound (callers run it in a thread). Every refusal is a :class:`DocumentError` whose
message names the file and says what is wrong, fit for an SMTP reply or a failure mail.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence

import pikepdf
from PIL import Image, ImageSequence

from mailfax.providers.base import FaxDocument

MAX_PAGES = 200  # per document; a fax of more pages is almost always a mistake
MAX_IMAGE_PIXELS = 60_000_000  # a 600 dpi A4 scan is about 35 megapixels
MAX_IMAGE_FRAMES = 50
A4_POINTS = (595.28, 841.89)
PDF_TYPES = {"application/pdf", "application/x-pdf", "application/acrobat"}


class DocumentError(ValueError):
    """A document that cannot be faxed; ``status`` is the enhanced SMTP status code."""

    def __init__(self, sentence: str, status: str = "5.6.0"):
        super().__init__(sentence)
        self.sentence = sentence
        self.status = status


def is_pdf(filename: str, content_type: str) -> bool:
    return content_type.lower() in PDF_TYPES or filename.lower().endswith(".pdf")


def prepare_pdf(filename: str, data: bytes) -> FaxDocument:
    """Check that a PDF opens without a password and count its pages.

    A PDF encrypted with an owner password only opens for anyone; it is saved again without the
    encryption so every provider can read it. Other PDFs are passed on byte for byte.
    """
    if b"%PDF-" not in data[:1024]:
        raise DocumentError(f"{filename} is not a PDF (its content is something else); "
                            f"export the document as PDF and send it again.")
    try:
        with pikepdf.open(io.BytesIO(data)) as pdf:
            if pdf.get_warnings() and b"%%EOF" not in data[-2048:]:
                # qpdf rebuilt the file from a fragment: what it shows is not the whole
                # document (a truncated download or attachment).
                raise DocumentError(f"{filename} is incomplete (the file is cut off); save or "
                                    f"export it again and resend.")
            pages = len(pdf.pages)
            _check_pages(filename, pages)
            if pdf.is_encrypted:
                data = _save(pdf)
    except pikepdf.PasswordError:
        raise DocumentError(f"{filename} needs a password to open; send it without a "
                            f"password (as a PDF that opens for anyone).") from None
    except pikepdf.PdfError:
        raise DocumentError(f"{filename} is a damaged PDF that cannot be read; save or export "
                            f"it again and resend.") from None
    return FaxDocument(filename=filename, data=data, pages=pages)


def page_count(data: bytes) -> int:
    """The pages of a PDF (one mailfax made, or LibreOffice); 0 if it cannot be read."""
    try:
        with pikepdf.open(io.BytesIO(data)) as pdf:
            return len(pdf.pages)
    except pikepdf.PdfError:
        return 0


def image_to_pdf(filename: str, data: bytes) -> FaxDocument:
    """An image (every frame of a multi-page TIFF or GIF) → PDF pages that fit A4.

    The page keeps the image's physical size from its resolution when it has one and fits on
    A4; larger images, and images without a resolution, are scaled to fit the page.
    """
    # Each frame becomes its page PDF at once: only bytes are kept, never the decoded frames
    # (20 pages of 7000×8500 pixels would hold over a gigabyte).
    single_pages: list[FaxDocument] = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # damaged-tag chatter; damage that matters raises
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                for frame in ImageSequence.Iterator(image):
                    _check_size(filename, frame.size)
                    if len(single_pages) >= MAX_IMAGE_FRAMES:
                        raise DocumentError(f"{filename} has more than {MAX_IMAGE_FRAMES} "
                                            f"pages; send it as a PDF.")
                    with _fax_mode(frame) as page:
                        single_pages.append(FaxDocument(
                            filename, _page_pdf(page, _page_resolution(frame)), 1))
    except DocumentError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DocumentError(f"{filename} is too large an image to fax (more than "
                            f"{MAX_IMAGE_PIXELS // 1_000_000} megapixels).") from None
    except Exception:  # Pillow raises many types for damaged or unknown data
        raise DocumentError(f"{filename} is not a readable image (damaged or of an unknown "
                            f"type); send a PDF, JPEG, PNG, GIF or TIFF.") from None
    if not single_pages:
        raise DocumentError(f"{filename} is an empty image.")
    pdf_bytes = merge_pdfs(single_pages, filename).data
    return FaxDocument(filename=filename, data=pdf_bytes, pages=len(single_pages))


def merge_pdfs(documents: Sequence[FaxDocument], filename: str) -> FaxDocument:
    """Several PDFs → one, pages in order (for providers that take a single file)."""
    if len(documents) == 1:
        return documents[0]
    merged = pikepdf.new()
    sources = []
    for document in documents:
        source = pikepdf.open(io.BytesIO(document.data))
        sources.append(source)
        merged.pages.extend(source.pages)
    data = _save(merged)
    for source in sources:
        source.close()
    return FaxDocument(filename=filename, data=data, pages=len(merged.pages))


def _save(pdf: pikepdf.Pdf) -> bytes:
    out = io.BytesIO()
    pdf.save(out)  # without ``encryption`` pikepdf writes the file unencrypted
    return out.getvalue()


def _check_pages(filename: str, pages: int) -> None:
    if pages == 0:
        raise DocumentError(f"{filename} has no pages.")
    if pages > MAX_PAGES:
        raise DocumentError(f"{filename} has {pages} pages; a fax may have at most "
                            f"{MAX_PAGES} pages per document.")


def _check_size(filename: str, size: tuple[int, int]) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise DocumentError(f"{filename} is an empty image.")
    if width * height > MAX_IMAGE_PIXELS:
        raise DocumentError(f"{filename} is too large an image to fax ({width}×{height} "
                            f"pixels; at most {MAX_IMAGE_PIXELS // 1_000_000} megapixels).")


def _fax_mode(frame: Image.Image) -> Image.Image:
    """Bilevel stays bilevel; everything else becomes greyscale (a fax has no colour)."""
    if frame.mode == "1":
        return frame.copy()
    if frame.mode in ("RGBA", "LA", "PA") or (frame.mode == "P" and "transparency" in frame.info):
        background = Image.new("RGBA", frame.size, "white")
        background.alpha_composite(frame.convert("RGBA"))
        return background.convert("L")
    return frame.convert("L")


def _page_resolution(frame: Image.Image) -> tuple[float, float]:
    """Pixels per inch (x, y) so the page is the image's true size, or fits A4."""
    width, height = frame.size
    dpi = frame.info.get("dpi")
    try:
        xdpi, ydpi = (float(dpi[0]), float(dpi[1])) if dpi else (0.0, 0.0)
    except (TypeError, ValueError, IndexError):
        xdpi = ydpi = 0.0
    if xdpi < 30 or ydpi < 30:  # missing, or a placeholder such as 1 or 72 from a camera
        xdpi = ydpi = 0.0
    page_w, page_h = A4_POINTS if height >= width else A4_POINTS[::-1]
    if xdpi:
        points_w, points_h = width / xdpi * 72, height / ydpi * 72
        if points_w <= page_w and points_h <= page_h:
            return xdpi, ydpi
        scale = max(points_w / page_w, points_h / page_h)
        return xdpi * scale, ydpi * scale
    scale = max(width / page_w, height / page_h)  # pixels per point to fit the page
    return scale * 72, scale * 72


def _page_pdf(page: Image.Image, resolution: tuple[float, float]) -> bytes:
    out = io.BytesIO()
    page.save(out, format="PDF", dpi=resolution)
    return out.getvalue()
