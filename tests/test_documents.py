"""Attachments → fax PDFs, against the real PDFs and images of the corpus (expected.json)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pikepdf
import pytest
from PIL import Image

from mailfax.documents.pdf import (
    A4,
    LETTER,
    DocumentError,
    PageSetup,
    image_to_pdf,
    merge_pdfs,
    paper_of,
    place_picture,
    prepare_pdf,
)
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


def _picture_box(document_data: bytes) -> tuple[float, float, float, float, float, float]:
    """The ``cm`` matrix that places the picture on page 1."""
    with pikepdf.open(io.BytesIO(document_data)) as pdf:
        operators = pikepdf.parse_content_stream(pdf.pages[0])
        matrix = next(operands for operands, operator in operators if str(operator) == "cm")
        a, b, c, d, e, f = (float(value) for value in matrix)
        return a, b, c, d, e, f


MARGIN_PT = 5 / 25.4 * 72


def test_a_full_page_scan_is_put_on_a4_inside_the_margins() -> None:
    document = image_to_pdf("scan.jpg", _jpeg((1240, 1754), (150, 150)))  # A4 at 150 dpi
    width, height = _page_size(document.data)
    assert (width, height) == (pytest.approx(A4.width), pytest.approx(A4.height))
    a, _, _, d, e, f = _picture_box(document.data)
    assert a == pytest.approx(A4.width - 2 * MARGIN_PT, abs=0.1)  # shrunk to the margins
    assert a / d == pytest.approx(1240 / 1754, rel=0.001)  # aspect kept
    assert e == pytest.approx(MARGIN_PT, abs=0.1) and f == pytest.approx((A4.height - d) / 2)


def test_a_photo_without_resolution_is_turned_and_fills_portrait_a4() -> None:
    width, height = _page_size(image_to_pdf("photo.jpg", _jpeg((4000, 3000), None)).data)
    assert (width, height) == (pytest.approx(A4.width), pytest.approx(A4.height))
    a, b, c, d, _, _ = _picture_box(image_to_pdf("photo.jpg", _jpeg((4000, 3000), None)).data)
    assert a == d == 0  # turned a quarter
    assert -c == pytest.approx(A4.width - 2 * MARGIN_PT, abs=0.1)  # its height across the page
    assert b == pytest.approx(-c * 4 / 3, rel=0.001)


@pytest.mark.parametrize(("pixels", "dpi", "printed", "turned"), [
    ((600, 300), (300, 300), (144, 72), False),  # its own size: 2×1 inch
    ((600, 300), None, (432, 216), False),  # no resolution, small: 100 dpi, not the page
    ((1000, 2000), None, (406.77, 813.54), False),  # no resolution, large: the printable
    ((2000, 1000), None, (813.54, 406.77), True),  # height; turned when landscape
    ((16, 16), None, (11.52, 11.52), False),  # an icon stays an icon
    ((600, 800), (72, 72), (566.93, 755.91), False),  # 72 dpi: 8×11 inch, shrunk to width
    ((800, 600), (72, 72), (755.91, 566.93), True),
])
def test_pictures_are_sized_by_the_documented_rule(pixels: tuple[int, int],
                                                   dpi: tuple[float, float] | None,
                                                   printed: tuple[float, float],
                                                   turned: bool) -> None:
    placement = place_picture(pixels, dpi, A4)
    assert placement.turned is turned
    assert (placement.width, placement.height) == (pytest.approx(printed[0], abs=0.05),
                                                   pytest.approx(printed[1], abs=0.05))


def test_a_landscape_picture_is_turned_only_when_that_prints_it_larger() -> None:
    assert place_picture((3000, 2000), None, A4).turned
    assert place_picture((1000, 800), None, A4).turned  # 127 dpi across, 100 dpi turned
    assert not place_picture((600, 300), (300, 300), A4).turned  # fits at its size
    assert not place_picture((2000, 3000), None, A4).turned  # portrait already
    turned = place_picture((3000, 2000), None, LETTER)
    assert turned.width == pytest.approx(LETTER.height - 2 * MARGIN_PT, abs=0.1)


@pytest.mark.parametrize(("size", "paper"), [
    ((595.28, 841.89), A4), ((596, 842), A4), ((842, 595), A4), ((612, 792), LETTER),
    ((792, 612), LETTER), ((842, 1191), None), ((432, 648), None), ((612, 1008), None),
])
def test_paper_sizes_are_recognised_in_either_orientation(size: tuple[float, float],
                                                          paper: object) -> None:
    assert paper_of(size) is paper


@pytest.mark.parametrize(("name", "setup", "unchanged"), [
    ("git.pdf", PageSetup(), True),  # A4 on A4
    ("crazyones.pdf", PageSetup(), True),  # Letter is a paper: kept
    ("crazyones.pdf", PageSetup(A4, fit_to_paper=True), False),
    ("git.pdf", PageSetup(LETTER, fit_to_paper=True), False),
    ("Seige_of_Vicksburg_Sample_OCR.pdf", PageSetup(), False),  # 6×9 inch is no paper
])
def test_a_pdf_is_passed_on_unless_a_page_is_off_paper(corpus: Path, name: str,
                                                       setup: PageSetup,
                                                       unchanged: bool) -> None:
    data = (corpus / "pdf" / name).read_bytes()
    document = prepare_pdf(name, data, setup)
    assert (document.data == data) is unchanged
    with pikepdf.open(io.BytesIO(document.data)) as pdf, pikepdf.open(io.BytesIO(data)) as old:
        assert len(pdf.pages) == len(old.pages) == document.pages
        for page in pdf.pages:
            box = [float(value) for value in page.MediaBox]
            paper = paper_of((box[2] - box[0], box[3] - box[1]))
            assert paper is not None
            if setup.fit_to_paper or not unchanged:
                assert paper is setup.paper


def _inheriting_pdf(box: list[float], rotate: int) -> bytes:
    """A PDF whose only page takes its MediaBox and /Rotate from the page tree's root."""
    pdf = pikepdf.new()
    pdf.add_blank_page(page_size=(100, 100))
    page = pdf.pages[0].obj
    del page["/MediaBox"]
    pdf.Root.Pages.MediaBox = pikepdf.Array(box)
    pdf.Root.Pages.Rotate = rotate
    out = io.BytesIO()
    pdf.save(out)
    return out.getvalue()


@pytest.mark.parametrize(("box", "rotate", "setup", "unchanged"), [
    ([0, 0, 842, 595], 90, PageSetup(), True),  # A4 landscape turned upright: on paper
    ([0, 0, 612, 792], 0, PageSetup(), True),  # Letter
    ([0, 0, 612, 792], 90, PageSetup(A4, fit_to_paper=True), False),  # Letter onto A4
    ([0, 0, 432, 648], 0, PageSetup(), False),  # 6×9 inch is no paper
])
def test_page_attributes_inherited_from_the_page_tree_count(box: list[float], rotate: int,
                                                           setup: PageSetup,
                                                           unchanged: bool) -> None:
    data = _inheriting_pdf(box, rotate)
    document = prepare_pdf("tree.pdf", data, setup)
    assert (document.data == data) is unchanged
    with pikepdf.open(io.BytesIO(document.data)) as pdf:
        page = pdf.pages[0]
        size = (float(page.mediabox[2]), float(page.mediabox[3]))
        turned = int(page.obj.get("/Rotate", 0)) % 180 == 90
        seen = size[::-1] if turned else size
        assert paper_of(seen) is not None
        if not unchanged:
            assert paper_of(seen) is setup.paper
            assert (seen[0] > seen[1]) == ((box[2] > box[3]) != (rotate % 180 == 90))


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
