"""Attachments → fax PDFs, against the real PDFs and images of the corpus (expected.json)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pikepdf
import pytest
from PIL import Image

from mailfax.documents.pdf import DocumentError, image_to_pdf, merge_pdfs, prepare_pdf
from tests.fixtures import pdfs

pytestmark = pytest.mark.every_corpus  # the real corpus, and the stand-in the tests make

PDFS = ["crazyones.pdf", "VIA_Nytt_1402.pdf", "Seige_of_Vicksburg_Sample_OCR.pdf", "git.pdf",
        "two-different-pages.pdf", "AutoCad_Diagram.pdf", "r2-owner-password.pdf",
        "libreoffice-writer-password.pdf"]


@pytest.mark.parametrize("name", PDFS)
def test_corpus_pdf_is_accepted_with_its_page_count_or_refused_by_name(
        corpus: Path, expected: dict[str, Any], name: str) -> None:
    want = expected["pdf"][name]
    data = (corpus / "pdf" / name).read_bytes()
    if want["accept"]:
        document = prepare_pdf(name, data)
        assert document.pages == want["pages"]
        with pikepdf.open(io.BytesIO(document.data)) as pdf:  # opens without a password
            assert len(pdf.pages) == want["pages"]
            assert not pdf.is_encrypted
    else:
        with pytest.raises(DocumentError) as raised:
            prepare_pdf(name, data)
        assert name in str(raised.value)
        assert want["reason"] in str(raised.value)


def test_an_unencrypted_pdf_passes_byte_for_byte(corpus: Path) -> None:
    data = (corpus / "pdf" / "git.pdf").read_bytes()
    assert prepare_pdf("git.pdf", data).data == data


@pytest.mark.parametrize(("data", "words"), [
    (b"blah blah", "is not a PDF"),
    (b"<html><body>Download</body></html>", "is not a PDF"),
    (b"%PDF-1.4\n1 0 obj\n<< /Type /Catalog >>\ngarbage", "damaged PDF"),
])
def test_what_is_not_a_readable_pdf_is_refused_by_name(data: bytes, words: str) -> None:
    with pytest.raises(DocumentError) as raised:
        prepare_pdf("letter.pdf", data)
    assert str(raised.value).startswith("letter.pdf ")
    assert words in str(raised.value)
    assert raised.value.status == "5.6.0"


def test_a_cut_off_pdf_is_refused_as_incomplete() -> None:
    with pytest.raises(DocumentError) as raised:
        prepare_pdf("download.pdf", pdfs.truncated_pdf())
    assert "download.pdf is incomplete" in str(raised.value)


def test_merged_pdfs_keep_every_page_in_order(corpus: Path) -> None:
    documents = [prepare_pdf(name, (corpus / "pdf" / name).read_bytes())
                 for name in ("VIA_Nytt_1402.pdf", "git.pdf", "two-different-pages.pdf")]
    merged = merge_pdfs(documents, "all.pdf")
    assert merged.pages == 5
    with pikepdf.open(io.BytesIO(merged.data)) as pdf:
        sizes = [tuple(float(v) for v in page.MediaBox) for page in pdf.pages]
    with pikepdf.open(io.BytesIO(documents[2].data)) as last:
        assert sizes[3:] == [tuple(float(v) for v in page.MediaBox) for page in last.pages]


def _jpeg(size: tuple[int, int], dpi: tuple[int, int] | None) -> bytes:
    out = io.BytesIO()
    picture = Image.new("RGB", size, "white")
    picture.paste((0, 0, 0), (size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2))
    picture.save(out, format="JPEG", **({"dpi": dpi} if dpi else {}))
    return out.getvalue()


def _page_size(document_data: bytes) -> tuple[float, float]:
    with pikepdf.open(io.BytesIO(document_data)) as pdf:
        box = [float(v) for v in pdf.pages[0].MediaBox]
    return box[2] - box[0], box[3] - box[1]


def test_a_scan_keeps_its_physical_size() -> None:
    document = image_to_pdf("scan.jpg", _jpeg((1240, 1754), (150, 150)))  # A4 at 150 dpi
    width, height = _page_size(document.data)
    assert width == pytest.approx(595.2, abs=1) and height == pytest.approx(842, abs=1)


def test_a_photo_without_resolution_is_fitted_to_a4() -> None:
    width, height = _page_size(image_to_pdf("photo.jpg", _jpeg((4000, 3000), None)).data)
    assert width <= 842.9 and height <= 596.3  # a landscape photo on A4 landscape
    assert width == pytest.approx(841.9, abs=1) or height == pytest.approx(595.3, abs=1)
    assert width / height == pytest.approx(4 / 3, rel=0.01)


def test_the_corpus_jpeg_of_a_mail_becomes_one_page(corpus: Path) -> None:
    import email
    import email.policy

    raw = (corpus / "mime" / "attachment_with_quoted_filename.eml").read_bytes()
    message = email.message_from_bytes(raw, policy=email.policy.default)
    part = next(part for part in message.walk() if part.get_content_type() == "image/jpeg")
    data = part.get_payload(decode=True)
    assert isinstance(data, bytes)
    document = image_to_pdf("Eelanalüüsi päring.jpg", data)
    assert document.pages == 1


@pytest.mark.parametrize("name", ["decompression_bomb.gif", "png_decompression_dos.png",
                                  "crash-2020-10-test.tif"])
def test_hostile_images_are_refused_with_a_clear_reason(corpus: Path, name: str) -> None:
    with pytest.raises(DocumentError) as raised:
        image_to_pdf(name, (corpus / "fax-tiff" / "hostile" / name).read_bytes())
    assert name in str(raised.value)
    assert "too large" in str(raised.value) or "not a readable image" in str(raised.value)
