"""A page rendered as the fax receives it: 1-bit, at fax resolution, grey below half gone."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from reportlab.lib.pagesizes import A4
from reportlab.pdfgen import canvas

from mailfax.documents.faxrender import (
    FINE,
    STANDARD,
    as_square_pixels,
    black_fraction,
    page_count,
    render_as_faxed,
)


def _page(grey: float) -> bytes:
    """One A4 page with a filled 10 × 10 cm square in ``grey`` (0 black, 1 white)."""
    buffer = io.BytesIO()
    drawing = canvas.Canvas(buffer, pagesize=A4)
    drawing.setFillGray(grey)
    drawing.rect(100, 300, 283.5, 283.5, stroke=0, fill=1)
    drawing.showPage()
    drawing.save()
    return buffer.getvalue()


def test_a_page_is_one_bit_on_the_fax_grid() -> None:
    image = render_as_faxed(_page(0.0))
    assert image.mode == "1"
    assert 1680 <= image.width <= 1700  # 210 mm at 204 dots per inch
    assert 1140 <= image.height <= 1150  # 297 mm at 98 lines per inch
    assert render_as_faxed(_page(0.0), resolution=FINE).height == 2 * image.height


def test_dark_grey_turns_black_and_light_grey_vanishes() -> None:
    square = (100 / 25.4 * 204) * (100 / 25.4 * 98) / (1687 * 1146)  # share of the page
    assert abs(black_fraction(render_as_faxed(_page(0.3))) - square) < 0.01
    assert black_fraction(render_as_faxed(_page(0.8))) == 0.0


def test_square_pixels_restore_the_page_aspect() -> None:
    image = as_square_pixels(render_as_faxed(_page(0.0)), STANDARD)
    assert image.mode == "1"
    assert abs(image.height / image.width - 297 / 210) < 0.01
    assert page_count(_page(0.5)) == 1


def test_pdfium_is_only_entered_under_the_process_wide_lock(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """PDFium crashes the process when two threads are in it at once (even with different
    documents): each way mailfax opens a document does so holding PDFIUM_LOCK."""
    import pypdfium2

    from mailfax.documents import faxrender, readiness

    opened: list[bool] = []
    real = pypdfium2.PdfDocument

    def checked(*args: Any, **kwargs: Any) -> Any:
        opened.append(faxrender.PDFIUM_LOCK.locked())
        return real(*args, **kwargs)

    monkeypatch.setattr(pypdfium2, "PdfDocument", checked)
    pdf = _page(0.0)
    render_as_faxed(pdf)
    page_count(pdf)
    readiness._render_original(pdf, 0)
    assert opened == [True, True, True]


def test_pages_rendered_in_many_threads_at_once_come_out_the_same() -> None:
    pdf = _page(0.3)
    alone = render_as_faxed(pdf).tobytes()
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda _: render_as_faxed(pdf).tobytes(), range(32)))
    assert results == [alone] * 32
