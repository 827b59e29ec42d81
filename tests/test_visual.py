"""What a reader sees: pages rendered by poppler (``pdftoppm``) compared with the pictures.

Received faxes: every page of every TIFF (the corpus's, and generated ones for each
Orientation value 1-8 crossed with G4, G3 1-D/2-D, strips, tiles, fill order 2, min-is-black,
cm and unit-less resolutions, 204×98 and 204×196 dpi) is rendered at the TIFF's resolution
and must equal, pixel for pixel, Pillow's decoding of the TIFF with the orientation applied
(``ImageOps.exif_transpose``).
"""

from __future__ import annotations

import io
from pathlib import Path

import pikepdf
import pytest
from PIL import Image

from mailfax.inbound.convert import tiff_to_pdf
from tests.imaging import (
    HAVE_LIBTIFF_TOOLS,
    HAVE_POPPLER,
    VARIANTS,
    differing_pixels,
    find_corpus,
    ink_share,
    oriented_pages,
    render,
    tiff_variant,
)

pytestmark = pytest.mark.skipif(not HAVE_POPPLER, reason="poppler-utils not installed")
needs_libtiff_tools = pytest.mark.skipif(not HAVE_LIBTIFF_TOOLS,
                                         reason="libtiff-tools not installed")
CORPUS = find_corpus()
CORPUS_FAXES = sorted(path.name for path in (CORPUS / "fax-tiff").iterdir()
                      if path.suffix in (".tif", ".tiff")) if CORPUS else []
# The resolution each generated variant declares, as (x, y) dpi along its stored axes.
VARIANT_DPI = {variant: (204.0, 98.0) for variant in VARIANTS}
VARIANT_DPI.update({"g4-fine": (204.0, 196.0), "lzw-grey": (200.0, 200.0),
                    "g4-cm": (80.31 * 2.54, 38.58 * 2.54),
                    # no unit: the pixel aspect (204:98) on the default 200 dpi across
                    "g4-no-unit": (200.0, 200.0 * 98 / 204)})


def _page_sizes(pdf: bytes) -> list[tuple[float, float]]:
    with pikepdf.open(io.BytesIO(pdf)) as document:
        sizes = []
        for page in document.pages:
            unit = float(page.obj.get("/UserUnit", 1))
            box = [float(value) for value in page.MediaBox]
            sizes.append(((box[2] - box[0]) * unit, (box[3] - box[1]) * unit))
        return sizes


def _assert_pages_look_like_the_tiff(tiff: bytes, folder: Path) -> None:
    """Render each page at the resolution that gives the TIFF's pixels; compare them all."""
    converted = tiff_to_pdf(tiff)
    pdf = folder / "fax.pdf"
    pdf.write_bytes(converted.pdf)
    expected = oriented_pages(tiff)
    sizes = _page_sizes(converted.pdf)
    assert len(sizes) == len(expected) == converted.pages
    for number, (picture, (width_pt, height_pt)) in enumerate(zip(expected, sizes, strict=True),
                                                              start=1):
        # poppler rounds the page's pixels up: a hair under the resolution gives exactly them
        resolution = (picture.width / width_pt * 72 - 1e-3, picture.height / height_pt * 72 - 1e-3)
        colours = "-mono" if _bilevel(picture) else "-gray"
        rendered = render(pdf, number, resolution, colours)
        assert rendered.size == picture.size, f"page {number}"
        wrong = differing_pixels(rendered, picture)
        assert wrong == 0, f"page {number}: {wrong} pixels differ"


def _bilevel(picture: Image.Image) -> bool:
    histogram = picture.histogram()
    return histogram[0] + histogram[255] == picture.width * picture.height


@needs_libtiff_tools
@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("variant", VARIANTS)
def test_a_generated_fax_renders_as_pillow_decodes_it(tmp_path: Path, variant: str,
                                                      orientation: int) -> None:
    tiff = tiff_variant(tmp_path, variant, orientation).read_bytes()
    _assert_pages_look_like_the_tiff(tiff, tmp_path)
    # and the page has the oriented size from the declared resolution
    xdpi, ydpi = VARIANT_DPI[variant]
    width_pt, height_pt = 432 / xdpi * 72, 300 / ydpi * 72
    if orientation >= 5:
        width_pt, height_pt = height_pt, width_pt
    (width, height), = _page_sizes(tiff_to_pdf(tiff).pdf)
    assert width == pytest.approx(width_pt, rel=1e-3)
    assert height == pytest.approx(height_pt, rel=1e-3)


@needs_libtiff_tools
@pytest.mark.parametrize("orientation", [2, 6, 8])
def test_a_rotated_single_strip_g4_is_not_blank_and_keeps_its_data(tmp_path: Path,
                                                                   orientation: int) -> None:
    """The bug of issue 17: this page came out blank (the stream kept, width and height
    swapped). Now the stream is kept and placed turned, as tiff2pdf does."""
    path = tiff_variant(tmp_path, "g4", orientation)
    tiff = path.read_bytes()
    with Image.open(path) as image:
        start, length = image.tag_v2[273][0], image.tag_v2[279][0]  # type: ignore[attr-defined]
    converted = tiff_to_pdf(tiff)
    with pikepdf.open(io.BytesIO(converted.pdf)) as document:
        image_object = next(iter(document.pages[0].Resources.XObject.values()))
        assert image_object.read_raw_bytes() == tiff[start:start + length]
    (tmp_path / "fax.pdf").write_bytes(converted.pdf)
    page = render(tmp_path / "fax.pdf", 1, (98.0, 204.0) if orientation >= 5 else (204.0, 98.0),
                  "-mono")
    assert 0.02 < ink_share(page) < 0.5


@pytest.mark.skipif(CORPUS is None, reason="corpus not found")
@pytest.mark.parametrize("name", CORPUS_FAXES)
def test_a_corpus_fax_renders_as_pillow_decodes_it(tmp_path: Path, name: str) -> None:
    assert CORPUS is not None
    _assert_pages_look_like_the_tiff((CORPUS / "fax-tiff" / name).read_bytes(), tmp_path)


def test_a_page_beyond_the_pdf_size_limit_gets_a_user_unit_and_opens(tmp_path: Path) -> None:
    out = io.BytesIO()
    Image.new("1", (1, 65_537), 0).save(out, format="TIFF", compression="group4")
    converted = tiff_to_pdf(out.getvalue())
    with pikepdf.open(io.BytesIO(converted.pdf)) as document:
        page = document.pages[0]
        box = [float(value) for value in page.MediaBox]
        unit = float(page.obj.UserUnit)
        assert max(box[2] - box[0], box[3] - box[1]) <= 14_400
        assert min(box[2] - box[0], box[3] - box[1]) >= 3
        assert (box[3] - box[1]) * unit == pytest.approx(65_537 / 200 * 72, rel=1e-4)
    (tmp_path / "tall.pdf").write_bytes(converted.pdf)
    page_image = render(tmp_path / "tall.pdf", 1, (20.0, 1.0), "-gray")  # opens, has ink
    assert page_image.height > 0 and ink_share(page_image) > 0
