"""Received fax TIFFs → PDF: page count, true page size, bilevel data kept small, and the pixels.

Sizes alone pass a blank fax, so every page is also read back out of the PDF by poppler
(``pdfimages``, its own CCITT decoder) and compared pixel for pixel with Pillow's decoding of the
TIFF, and rendered (``pdftoppm``) to see that ink is where it should be.
"""

from __future__ import annotations

import io
import json
import resource
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pikepdf
import pytest
from PIL import Image, ImageChops, ImageSequence

from mailfax.inbound.convert import DEFAULT_DPI, DEFAULT_FAX_DPI, NotConvertible, tiff_to_pdf
from tests.fixtures.locate import is_generated

pytestmark = pytest.mark.every_corpus  # the real corpus, and the stand-in the tests make

needs_poppler = pytest.mark.skipif(shutil.which("pdfimages") is None,
                                   reason="poppler-utils not installed")
FAXES = ["fax2d.tif", "g3test.tif", "pport_g4.tif", "g4-multi.tiff", "g4-fillorder-test.tif",
         "hopper_g4.tif", "seq-1c-1b-fax3-lsb-71f6a21a.tiff", "fax4.tiff", "multipage.tiff"]
HOSTILE = ["crash-2020-10-test.tif", "oom-225817ca0f8c663be7ab4b9e717b02c661e66834.tif",
           "decompression_bomb.gif", "png_decompression_dos.png"]


def _media_boxes(pdf_data: bytes) -> list[tuple[float, float]]:
    with pikepdf.open(io.BytesIO(pdf_data)) as pdf:
        return [(float(page.MediaBox[2]) - float(page.MediaBox[0]),
                 float(page.MediaBox[3]) - float(page.MediaBox[1])) for page in pdf.pages]


@pytest.mark.parametrize("name", FAXES)
def test_each_page_has_its_true_size(corpus: Path, expected: dict[str, Any], name: str) -> None:
    want = expected["fax-tiff"][name]
    converted = tiff_to_pdf((corpus / "fax-tiff" / name).read_bytes())
    assert converted.pages == want["pages"]
    boxes = _media_boxes(converted.pdf)
    assert len(boxes) == want["pages"]
    if want.get("page_pt"):
        for width, height in boxes:
            assert width == pytest.approx(want["page_pt"][0], abs=1)
            assert height == pytest.approx(want["page_pt"][1], abs=1)


# Page sizes in pt, worked out by hand from tiffinfo's pixels and resolution (pixels / dpi * 72),
# not from the module under test. Without a usable resolution tag mailfax documents 200×200 dpi
# (204×196 for a 1728-pixel fax width; none of these has that width).
PAGE_PT: dict[str, list[tuple[float, float]]] = {
    "fax2d.tif": [(609.88, 794.94)],  # 1728×1082 px at 204×98 dpi
    "g3test.tif": [(609.88, 810.37)],  # 1728×1103 px at 204×98 dpi
    "pport_g4.tif": [(917.28, 1186.56)],  # 2548×3296 px at 200 dpi
    "g4-multi.tiff": [(595.26, 841.86)] * 3,  # 3307×4677 px at 400 dpi, 3 pages
    "g4-fillorder-test.tif": [(52.32, 20.16)],  # 218×84 px at 300 dpi
    "hopper_g4.tif": [(96.01, 96.01)],  # 128×128 px at 37.79 px/cm = 95.99 dpi
    "seq-1c-1b-fax3-lsb-71f6a21a.tiff": [(5.76, 5.76)],  # 16×16 px, no resolution: 200 dpi
    "fax4.tiff": [(388.8, 241.56)],  # 1080×671 px, no resolution: 200 dpi
    "multipage.tiff": [(3.6, 3.6), (3.6, 3.6), (7.2, 7.2)],  # 10, 10, 20 px square, 0×0 dpi
}


def _wanted_page_pt(corpus: Path, expected: dict[str, Any], name: str
                    ) -> list[tuple[float, float]]:
    """The hand-worked table for the real corpus; for the stand-in, the pixels and resolution
    its generator wrote (the documented 200 dpi where it wrote none)."""
    if not is_generated(corpus):
        return PAGE_PT[name]
    return [(width, height) for width, height in expected["fax-tiff"][name]["page_pt_each"]]


@pytest.mark.parametrize("name", FAXES)
def test_media_box_is_pixels_over_dpi_in_each_direction(corpus: Path, expected: dict[str, Any],
                                                        name: str) -> None:
    wanted = _wanted_page_pt(corpus, expected, name)
    boxes = _media_boxes(tiff_to_pdf((corpus / "fax-tiff" / name).read_bytes()).pdf)
    assert len(boxes) == len(wanted)
    for (width, height), (want_w, want_h) in zip(boxes, wanted, strict=True):
        assert width == pytest.approx(want_w, rel=0.01)
        assert height == pytest.approx(want_h, rel=0.01)


@pytest.mark.parametrize("name", ["seq-1c-1b-fax3-lsb-71f6a21a.tiff", "fax4.tiff"])
def test_a_page_without_resolution_gets_the_documented_default(corpus: Path, name: str) -> None:
    with Image.open(corpus / "fax-tiff" / name) as image:
        width, height = image.size
    converted = tiff_to_pdf((corpus / "fax-tiff" / name).read_bytes())
    xdpi, ydpi = DEFAULT_FAX_DPI if width == 1728 else DEFAULT_DPI
    assert converted.page_sizes_pt[0] == pytest.approx((width / xdpi * 72, height / ydpi * 72))


@pytest.mark.parametrize("name", [name for name in FAXES if name != "multipage.tiff"])
def test_bilevel_faxes_stay_bilevel_and_small(corpus: Path, name: str) -> None:
    tiff = (corpus / "fax-tiff" / name).read_bytes()
    converted = tiff_to_pdf(tiff)
    assert len(converted.pdf) <= 1.05 * len(tiff) + 2048 * converted.pages
    with pikepdf.open(io.BytesIO(converted.pdf)) as pdf:
        for page in pdf.pages:
            for image in page.Resources.XObject.values():
                assert image.BitsPerComponent == 1
                assert image.Filter == pikepdf.Name.CCITTFaxDecode


def _tiff_pages(path: Path) -> list[Image.Image]:
    with Image.open(path) as image:
        return [frame.convert("L") for frame in ImageSequence.Iterator(image)]


def _differing(a: Image.Image, b: Image.Image) -> int:
    difference = ImageChops.difference(a.convert("L"), b.convert("L"))
    return sum(1 for value in difference.get_flattened_data() if value > 128)


@needs_poppler
@pytest.mark.parametrize("name", FAXES)
def test_the_pdf_holds_exactly_the_fax_pixels(corpus: Path, tmp_path: Path, name: str) -> None:
    converted = tiff_to_pdf((corpus / "fax-tiff" / name).read_bytes())
    (tmp_path / "fax.pdf").write_bytes(converted.pdf)
    subprocess.run(["pdfimages", "-png", str(tmp_path / "fax.pdf"), str(tmp_path / "image")],
                   check=True, capture_output=True)
    extracted = sorted(tmp_path.glob("image-*.png"))
    originals = _tiff_pages(corpus / "fax-tiff" / name)
    assert len(extracted) == len(originals)
    for path, original in zip(extracted, originals, strict=True):
        with Image.open(path) as decoded:
            assert decoded.size == original.size
            assert _differing(decoded, original) == 0


@needs_poppler
@pytest.mark.parametrize("name", ["fax2d.tif", "g3test.tif", "g4-fillorder-test.tif",
                                  "seq-1c-1b-fax3-lsb-71f6a21a.tiff", "pport_g4.tif"])
def test_rendered_pages_show_the_fax_not_a_blank_or_black_page(corpus: Path, tmp_path: Path,
                                                              name: str) -> None:
    converted = tiff_to_pdf((corpus / "fax-tiff" / name).read_bytes())
    (tmp_path / "fax.pdf").write_bytes(converted.pdf)
    original = _tiff_pages(corpus / "fax-tiff" / name)[0]
    with Image.open(corpus / "fax-tiff" / name) as image:
        from mailfax.inbound.convert import page_resolution
        xdpi, ydpi = page_resolution(image)
    rendered = subprocess.run(["pdftoppm", "-f", "1", "-l", "1", "-rx", str(xdpi), "-ry",
                               str(ydpi), "-gray", "-aa", "no", str(tmp_path / "fax.pdf")],
                              check=True, capture_output=True)
    assert b"wrong length" not in rendered.stderr
    with Image.open(io.BytesIO(rendered.stdout)) as page:
        page = page.convert("L")
        assert page.size[0] == pytest.approx(original.width, abs=1)  # poppler rounds
        assert page.size[1] == pytest.approx(original.height, abs=1)
        page = page.resize(original.size)
        ink = sum(1 for value in page.get_flattened_data() if value < 128) / (page.width
                                                                              * page.height)
        want = sum(1 for value in original.get_flattened_data() if value < 128) / (
            page.width * page.height)
        assert 0.005 < ink < 0.9
        assert ink == pytest.approx(want, abs=0.02)
        assert _differing(page, original) / (page.width * page.height) < 0.03


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_files_are_not_convertible_quickly_and_within_memory(corpus: Path,
                                                                      name: str) -> None:
    data = (corpus / "fax-tiff" / "hostile" / name).read_bytes()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.monotonic()
    with pytest.raises(NotConvertible) as raised:
        tiff_to_pdf(data)
    assert time.monotonic() - started < 5
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mib < 512
    assert "0x" not in str(raised.value)  # no object reprs in the note a person reads


def test_a_g4_strip_cut_off_is_decoded_and_encoded_again_not_kept() -> None:
    """Without its end-of-facsimile-block code a strip may be cut short: the PDF then holds
    a G4 stream of what Pillow decoded (poppler reads it without a "wrong length" error)."""
    out = io.BytesIO()
    page = Image.new("1", (864, 400), 1)
    page.paste(0, (100, 20, 700, 120))
    page.save(out, format="TIFF", compression="group4", dpi=(204, 196))
    data = bytearray(out.getvalue())
    with Image.open(io.BytesIO(bytes(data))) as image:
        start, length = image.tag_v2[273][0], image.tag_v2[279][0]  # type: ignore[attr-defined]
    data[start + length - 6:start + length] = bytes(6)  # the last bytes lost
    converted = tiff_to_pdf(bytes(data))
    with pikepdf.open(io.BytesIO(converted.pdf)) as pdf:
        image_object = next(iter(pdf.pages[0].Resources.XObject.values()))
        kept = image_object.read_raw_bytes()
        assert image_object.Filter == pikepdf.Name.CCITTFaxDecode
    assert kept != bytes(data[start:start + length])
    with Image.open(io.BytesIO(bytes(data))) as image:
        decoded = image.convert("L")
    assert decoded.getpixel((400, 70)) == 0  # the black block survived


@needs_poppler
def test_a_fine_mode_fax_in_msb_order_keeps_its_size_and_pixels(generated_corpus: Path,
                                                                 tmp_path: Path) -> None:
    """Not in the real corpus: fine mode (204×196 dpi), G3 2-D written MSB first."""
    facts = json.loads((generated_corpus / "expected.json").read_text())["fax-tiff"]
    want = facts["fine-mode-msb.tif"]
    assert want["dpi"] == [204, 196]
    path = generated_corpus / "fax-tiff" / "fine-mode-msb.tif"
    converted = tiff_to_pdf(path.read_bytes())
    assert converted.pages == 1
    assert converted.page_sizes_pt[0] == pytest.approx(tuple(want["page_pt"]), abs=0.1)
    (tmp_path / "fax.pdf").write_bytes(converted.pdf)
    subprocess.run(["pdfimages", "-png", str(tmp_path / "fax.pdf"), str(tmp_path / "image")],
                   check=True, capture_output=True)
    [extracted] = sorted(tmp_path.glob("image-*.png"))
    with Image.open(extracted) as decoded:
        assert _differing(decoded, _tiff_pages(path)[0]) == 0
