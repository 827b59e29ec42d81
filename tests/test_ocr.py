"""Received faxes get a text layer; when OCR cannot help, the fax still goes out unchanged."""

from __future__ import annotations

import io
import shutil
import time
from pathlib import Path

import pypdf
import pytest

from mailfax.inbound import ocr
from mailfax.inbound.convert import tiff_to_pdf
from mailfax.inbound.ocr import add_text_layer, first_lines, ocr_available

needs_ocr = pytest.mark.skipif(not ocr_available("deu+eng"),
                               reason="needs ocrmypdf with tesseract-ocr-deu and -eng")


@pytest.fixture(scope="module")
def fax_pdf(corpus: Path) -> bytes:
    """A real received fax (G3 2-D, 204×98 dpi) as the PDF the inbound path mails."""
    return tiff_to_pdf((corpus / "fax-tiff" / "fax2d.tif").read_bytes()).pdf


def extracted_text(pdf: bytes) -> str:
    return "".join(page.extract_text() for page in pypdf.PdfReader(io.BytesIO(pdf)).pages)


def fake_ocrmypdf(tmp_path: Path, body: str) -> str:
    script = tmp_path / "ocrmypdf"
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(0o755)
    return str(script)


@needs_ocr
async def test_corpus_fax_gains_a_text_layer(fax_pdf: bytes) -> None:
    assert extracted_text(fax_pdf).strip() == ""
    result = await add_text_layer(fax_pdf, pages=1)
    assert result.searchable and result.note == ""
    assert "backup" in extracted_text(result.pdf).lower()  # "UNIX Programmer's Manual: backup"
    assert "backup" in result.text.lower()
    assert len(pypdf.PdfReader(io.BytesIO(result.pdf)).pages) == 1
    assert any("backup" in line.lower() for line in first_lines(result.text, 6))


@needs_ocr
async def test_forced_timeout_returns_the_original_with_a_note(fax_pdf: bytes) -> None:
    started = time.monotonic()
    result = await add_text_layer(fax_pdf, pages=1, timeout_per_page=0.05)
    assert time.monotonic() - started < 5
    assert result.pdf == fax_pdf
    assert result.problem == "timeout"
    assert "too long" in result.note
    assert result.text == ""


async def test_timeout_kills_ocr_and_its_children(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    pids = tmp_path / "pids"
    monkeypatch.setattr(ocr, "OCRMYPDF",
                        fake_ocrmypdf(tmp_path, f"sleep 60 &\necho $! > {pids}\nwait\n"))
    result = await add_text_layer(b"%PDF-1.4", pages=2, timeout_per_page=0.2)
    assert result.problem == "timeout"
    assert not _still_running(pids.read_text().strip()), "the child outlived the timeout"


def _still_running(pid: str) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and " Z " not in stat.read_text()  # a zombie is dead, not yet reaped


async def test_failing_ocr_returns_the_original_with_a_note(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    monkeypatch.setattr(ocr, "OCRMYPDF",
                        fake_ocrmypdf(tmp_path, "echo 'InputFileError: broken' >&2\nexit 2\n"))
    result = await add_text_layer(b"%PDF-1.4 broken", pages=1)
    assert (result.pdf, result.problem, result.text) == (b"%PDF-1.4 broken", "failed", "")
    assert result.note


async def test_without_ocrmypdf_the_fax_is_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ocr, "OCRMYPDF", "/nonexistent/ocrmypdf")
    result = await add_text_layer(b"%PDF-1.4", pages=1)
    assert (result.pdf, result.problem) == (b"%PDF-1.4", "not_installed")
    assert not result.searchable


def test_first_lines_come_from_page_one_only() -> None:
    text = "\n  Rechnung Nr. 42  \n\nMüller GmbH\nSeite 1\fSeite 2\n"
    assert first_lines(text) == ["Rechnung Nr. 42", "Müller GmbH", "Seite 1"]
    assert first_lines(text, 1) == ["Rechnung Nr. 42"]
    assert first_lines("") == []


@needs_ocr  # without OCR every language is "not available" and this would prove nothing
def test_unknown_language_means_ocr_is_not_available() -> None:
    assert ocr_available("deu+eng") is True
    assert ocr_available("deu+eng+tlh") is False


def test_visual_lines_read_columns_side_by_side_top_to_bottom() -> None:
    # pdftotext lists the blocks in Tesseract's order: the left column first, the letterhead
    # at the top right last.
    words = [(700, 130, "Invoice"), (760, 130, "payable"), (700, 1000, "Reference"),
             (100, 1000, "Sender"), (100, 1300, "Company"), (160, 1000, "Street")]
    body = "".join(f'<word xMin="{x}" yMin="{y}" xMax="{x + 200}" yMax="{y + 40}">{text}</word>'
                   for y, x, text in words)
    xhtml = (f'<html xmlns="http://www.w3.org/1999/xhtml"><body><doc><page>{body}</page>'
             f'</doc></body></html>').encode()
    assert ocr.visual_lines(xhtml) == ["Sender Company", "Street", "Invoice Reference",
                                       "payable"]
    assert ocr.visual_lines(b"not xml") == []


def letterhead_page() -> bytes:
    """A sparse letter: a letterhead at the top right, then two columns lower down."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", 40)
    image = Image.new("L", (1700, 2200), 255)
    draw = ImageDraw.Draw(image)
    for index, line in enumerate(["Sender Company", "Harbour Street 7"]):
        draw.text((1000, 120 + index * 60), line, font=font, fill=0)
    for index, line in enumerate(["Invoice number fourteen", "for the delivery of",
                                  "twelve boxes of paper", "and one printer",
                                  "payable within thirty", "days of receipt"]):
        draw.text((120, 700 + index * 60), line, font=font, fill=0)
    for index, line in enumerate(["Reference alpha", "Customer beta"]):
        draw.text((1000, 700 + index * 60), line, font=font, fill=0)
    out = io.BytesIO()
    image.convert("1").save(out, "PDF", resolution=200)
    return out.getvalue()


@needs_ocr
@pytest.mark.skipif(not Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf").exists(),
                    reason="needs fonts-dejavu-core to draw the test page")
@pytest.mark.skipif(shutil.which("pdftotext") is None, reason="needs poppler-utils' pdftotext")
async def test_the_first_lines_of_a_sparse_page_are_its_visual_top() -> None:
    result = await add_text_layer(letterhead_page(), pages=1)
    assert result.searchable
    # Tesseract's own order starts in the left column; the mail shows the page's top.
    assert result.first_lines(3) == ["Sender Company", "Harbour Street 7",
                                     "Invoice number fourteen Reference alpha"]
