"""What a reader sees: pages rendered by poppler (``pdftoppm``) compared with the pictures.

Sent images and documents: page 1 rendered, the page must be the account's paper, have ink,
and show the picture upright (a framed test picture with a block near its top left corner;
where the block lands says which way up the picture went).

Received faxes: every page of every TIFF (the corpus's, and generated ones for each
Orientation value 1-8 crossed with G4, G3 1-D/2-D, strips, tiles, fill order 2, min-is-black,
cm and unit-less resolutions, 204×98 and 204×196 dpi) is rendered at the TIFF's resolution
and must equal, pixel for pixel, Pillow's decoding of the TIFF with the orientation applied
(``ImageOps.exif_transpose``).
"""

from __future__ import annotations

import io
import shutil
from collections.abc import Iterator
from pathlib import Path

import pikepdf
import pytest
from PIL import Image

from mailfax.app import Application
from mailfax.documents import office
from mailfax.documents.office import OfficeLimits, convert_office
from mailfax.documents.pdf import A4, LETTER, PageSetup, fit_to_paper, image_to_pdf, prepare_pdf
from mailfax.inbound.convert import tiff_to_pdf
from tests.conftest import Service, fax_mail, make_settings
from tests.fixtures.build import FAXES
from tests.fixtures.locate import find_corpus
from tests.imaging import (
    HAVE_LIBTIFF_TOOLS,
    HAVE_POPPLER,
    VARIANTS,
    block_corner,
    blurred_difference,
    differing_pixels,
    ink_box,
    ink_share,
    marker_picture,
    oriented_pages,
    render,
    render_png,
    tiff_variant,
    tiffset,
)

pytestmark = pytest.mark.skipif(not HAVE_POPPLER, reason="poppler-utils not installed")
needs_libtiff_tools = pytest.mark.skipif(not HAVE_LIBTIFF_TOOLS,
                                         reason="libtiff-tools not installed")
# The real corpus's faxes, or (without it) those of the stand-in the tests make (conftest's corpus).
CORPUS = find_corpus()
CORPUS_FAXES = sorted(path.name for path in (CORPUS / "fax-tiff").iterdir()
                      if path.suffix in (".tif", ".tiff")) if CORPUS else sorted(FAXES)
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


@pytest.mark.parametrize("name", CORPUS_FAXES)
def test_a_corpus_fax_renders_as_pillow_decodes_it(corpus: Path, tmp_path: Path,
                                                   name: str) -> None:
    _assert_pages_look_like_the_tiff((corpus / "fax-tiff" / name).read_bytes(), tmp_path)


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


# --- images and documents that are sent -------------------------------------------------

def _encoded(picture: Image.Image, format: str, **options: object) -> bytes:
    out = io.BytesIO()
    picture.save(out, format=format, **options)  # type: ignore[arg-type]
    return out.getvalue()


def _rendered_page(pdf: bytes, folder: Path, name: str) -> tuple[tuple[float, float],
                                                                  Image.Image]:
    """Page 1's size in points, and its rendering at 72 dpi (1 pixel a point), kept as a PNG
    in ``folder`` to look at."""
    (folder / f"{name}.pdf").write_bytes(pdf)
    size = _page_sizes(pdf)[0]
    page = render_png(folder / f"{name}.pdf", 1, 72, folder / f"{name}.png")
    assert page.size == (pytest.approx(size[0], abs=1), pytest.approx(size[1], abs=1))
    return size, page


def _assert_paper(size: tuple[float, float], width: float, height: float) -> None:
    assert size[0] == pytest.approx(width, abs=0.5)
    assert size[1] == pytest.approx(height, abs=0.5)


def test_a_phone_photo_with_exif_orientation_6_is_faxed_portrait_and_upright(
        tmp_path: Path) -> None:
    """A phone held upright stores the picture sideways and says so in EXIF (Orientation 6:
    turn 90° clockwise to view). The fax must be portrait with the picture upright."""
    upright = marker_picture((1200, 1600)).convert("RGB")
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # as the sensor saw it
    exif = Image.Exif()
    exif[274] = 6
    photo = _encoded(stored, "JPEG", exif=exif, dpi=(72, 72), quality=90)
    size, page = _rendered_page(image_to_pdf("IMG_0001.jpg", photo).data, tmp_path, "photo")
    _assert_paper(size, A4.width, A4.height)
    box = ink_box(page)
    assert box is not None and box[3] - box[1] > box[2] - box[0]  # the picture is portrait
    assert block_corner(page) == "top left"


def test_a_large_photo_without_resolution_becomes_one_a4_page_turned_to_fill_it(
        tmp_path: Path) -> None:
    """3000×2000 without DPI fills the printable area; landscape, so it is turned a quarter
    anticlockwise (its top at the paper's left edge) where it prints larger."""
    photo = _encoded(marker_picture((3000, 2000)), "JPEG")
    document = image_to_pdf("holiday.jpg", photo)
    assert document.pages == 1
    size, page = _rendered_page(document.data, tmp_path, "landscape")
    _assert_paper(size, A4.width, A4.height)
    left, top, right, bottom = ink_box(page) or (0, 0, 0, 0)
    margin = 5 / 25.4 * 72
    assert bottom - top == pytest.approx(A4.height - 2 * margin, abs=2)  # fills the height
    assert right - left == pytest.approx((A4.height - 2 * margin) * 2 / 3, abs=2)
    assert block_corner(page) == "bottom left"


def test_a_small_image_at_300_dpi_keeps_its_size_of_2_by_1_inch_on_a4(tmp_path: Path) -> None:
    picture = _encoded(marker_picture((600, 300), "1"), "PNG", dpi=(300, 300))
    size, page = _rendered_page(image_to_pdf("stamp.png", picture).data, tmp_path, "stamp")
    _assert_paper(size, A4.width, A4.height)
    left, top, right, bottom = ink_box(page) or (0, 0, 0, 0)
    assert (right - left, bottom - top) == (pytest.approx(144, abs=2), pytest.approx(72, abs=2))
    assert (left + right) / 2 == pytest.approx(A4.width / 2, abs=2)  # centred
    assert block_corner(page) == "top left"  # fits upright at its size: not turned


def test_a_tiny_image_without_resolution_is_not_blown_up(tmp_path: Path) -> None:
    """60×40 pixels without DPI: printed at 100 dpi (0.6×0.4 inch), not across the page."""
    picture = _encoded(marker_picture((60, 40), "1"), "PNG")
    size, page = _rendered_page(image_to_pdf("icon.png", picture).data, tmp_path, "icon")
    _assert_paper(size, A4.width, A4.height)
    left, top, right, bottom = ink_box(page) or (0, 0, 0, 0)
    assert (right - left, bottom - top) == (pytest.approx(43.2, abs=2),
                                            pytest.approx(28.8, abs=2))


def test_an_image_on_a_letter_account_is_on_letter_paper(tmp_path: Path) -> None:
    picture = _encoded(marker_picture((1700, 2200)), "PNG", dpi=(200, 200))
    size, page = _rendered_page(image_to_pdf("scan.png", picture, LETTER).data, tmp_path,
                                "letter")
    _assert_paper(size, LETTER.width, LETTER.height)
    assert block_corner(page) == "top left"


@needs_libtiff_tools
@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_a_tiff_image_sent_by_mail_is_turned_by_its_orientation_tag(tmp_path: Path,
                                                                    orientation: int) -> None:
    """Pillow turns a TIFF as it loads it: the picture must be turned once, not twice."""
    upright = marker_picture((800, 1100), "1")
    stored = upright.transpose({3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90,
                                8: Image.Transpose.ROTATE_270}[orientation])
    path = tmp_path / "scan.tif"
    stored.save(path, format="TIFF", compression="group4", dpi=(150, 150))
    tiffset(path, 274, str(orientation))
    size, page = _rendered_page(image_to_pdf("scan.tif", path.read_bytes()).data, tmp_path,
                                f"tiff-{orientation}")
    _assert_paper(size, A4.width, A4.height)
    assert block_corner(page) == "top left"


def test_every_frame_of_a_gif_is_a_page_on_paper(tmp_path: Path) -> None:
    frames = [marker_picture((300 + 100 * number, 400)).convert("P") for number in range(3)]
    out = io.BytesIO()
    frames[0].save(out, format="GIF", save_all=True, append_images=frames[1:])
    document = image_to_pdf("pages.gif", out.getvalue())
    assert document.pages == 3
    for size in _page_sizes(document.data):
        _assert_paper(size, A4.width, A4.height)


@pytest.mark.parametrize(("name", "setup", "paper", "landscape"), [
    ("crazyones.pdf", PageSetup(), LETTER, False),  # Letter stays Letter on an A4 account
    ("crazyones.pdf", PageSetup(A4, fit_to_paper=True), A4, False),
    ("Seige_of_Vicksburg_Sample_OCR.pdf", PageSetup(), A4, False),  # 6×9 inch onto A4
    ("AutoCad_Diagram.pdf", PageSetup(LETTER), LETTER, True),  # A3 turned 270°
])
def test_pdf_pages_arrive_on_paper_with_their_content(corpus: Path, tmp_path: Path, name: str,
                                                      setup: PageSetup, paper: object,
                                                      landscape: bool) -> None:
    data = (corpus / "pdf" / name).read_bytes()
    document = prepare_pdf(name, data, setup)
    size, page = _rendered_page(document.data, tmp_path, name)
    width, height = (LETTER.width, LETTER.height) if paper is LETTER else (A4.width, A4.height)
    _assert_paper(size, *((height, width) if landscape else (width, height)))
    assert ink_share(page) > 0.005
    # the content as the original shows it: the same ink, scaled to the new page
    (tmp_path / "original.pdf").write_bytes(data)
    original = render_png(tmp_path / "original.pdf", 1, 72, tmp_path / "original.png")
    scale = min(page.width / original.width, page.height / original.height)
    original = original.resize((round(original.width * scale), round(original.height * scale)))
    centred = Image.new("L", page.size, 255)
    centred.paste(original, ((page.width - original.width) // 2,
                             (page.height - original.height) // 2))
    same = blurred_difference(page, centred, 4)  # in grey levels of 255
    turned = blurred_difference(page, centred.transpose(Image.Transpose.ROTATE_180), 4)
    assert same < 6 and turned > 3 * same + 2  # like the original, and not like it upside down


@pytest.fixture
def office_profiles(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    office.configure(OfficeLimits(profile_root=tmp_path_factory.mktemp("profiles")))
    yield
    office.configure(OfficeLimits(profile_root=tmp_path_factory.mktemp("profiles")))


@pytest.mark.skipif(shutil.which("soffice") is None, reason="LibreOffice (soffice) missing")
def test_a_letter_docx_keeps_letter_unless_fit_to_paper_puts_it_on_a4(
        corpus: Path, tmp_path: Path, office_profiles: None) -> None:
    name = "hdr-header-footer.docx"  # US Letter (12240×15840 twips)
    converted = convert_office(name, (corpus / "office" / name).read_bytes())
    kept = fit_to_paper(converted, PageSetup(A4))
    assert kept is converted
    _assert_paper(_page_sizes(kept.data)[0], LETTER.width, LETTER.height)
    fitted = fit_to_paper(converted, PageSetup(A4, fit_to_paper=True))
    assert fitted.pages == converted.pages
    size, page = _rendered_page(fitted.data, tmp_path, "docx-on-a4")
    _assert_paper(size, A4.width, A4.height)
    assert ink_share(page) > 0.001
    (tmp_path / "letter.pdf").write_bytes(converted.data)
    letter = render_png(tmp_path / "letter.pdf", 1, 72, tmp_path / "letter.png")
    letter_box, a4_box = ink_box(letter), ink_box(page)
    assert letter_box is not None and a4_box is not None
    # scaled by 595.28/612 and centred: the text block keeps its place and proportions
    scale = A4.width / LETTER.width
    assert a4_box[0] == pytest.approx(letter_box[0] * scale, abs=3)
    assert (a4_box[2] - a4_box[0]) == pytest.approx((letter_box[2] - letter_box[0]) * scale,
                                                    abs=3)


def _phone_photo() -> bytes:
    upright = marker_picture((900, 1200)).convert("RGB")
    exif = Image.Exif()
    exif[274] = 6
    return _encoded(upright.transpose(Image.Transpose.ROTATE_90), "JPEG", exif=exif,
                    dpi=(72, 72))


@pytest.mark.parametrize(("account", "paper"), [({}, A4), ({"paper": "Letter"}, LETTER)])
async def test_a_phone_photo_mailed_over_smtp_is_queued_upright_on_the_accounts_paper(
        tmp_path: Path, account: dict[str, str], paper: object) -> None:
    settings = make_settings(tmp_path, accounts={"emulator": {
        "provider": "emulator", "delay_seconds": 0.3, "seconds_per_page": 20, **account}})
    app = Application(settings)
    await app.start()
    try:
        mail = fax_mail([("IMG_0001.jpg", _phone_photo(), "image/jpeg")])
        _, reply = await Service(app).send(mail, "alice@example.org", ["030123456@fax.local"])
        job = await app.store.get_job(reply.split()[-1])
        assert job is not None
        documents = await app.store.load_documents(job.mail_id)
    finally:
        await app.stop()
    assert len(documents) == 1 and documents[0].pages == 1
    size, page = _rendered_page(documents[0].data, tmp_path, "queued")
    expected = LETTER if paper is LETTER else A4
    _assert_paper(size, expected.width, expected.height)
    assert block_corner(page) == "top left"


def test_an_annotation_on_a_page_scaled_onto_paper_still_prints(tmp_path: Path) -> None:
    """A stamp drawn as an annotation (not page content) on a 6×9 inch page: scaled onto A4,
    it must still be on the page, where it was."""
    pdf = pikepdf.new()
    page = pdf.add_blank_page(page_size=(432, 648))
    appearance = pikepdf.Stream(pdf, b"0 g 0 0 100 100 re f")
    appearance.Type, appearance.Subtype = pikepdf.Name.XObject, pikepdf.Name.Form
    appearance.BBox = [0, 0, 100, 100]
    page.Annots = pdf.make_indirect(pikepdf.Array([pdf.make_indirect(pikepdf.Dictionary(
        Type=pikepdf.Name.Annot, Subtype=pikepdf.Name.Square, Rect=[36, 512, 136, 612], F=4,
        AP=pikepdf.Dictionary(N=appearance)))]))
    out = io.BytesIO()
    pdf.save(out)
    document = prepare_pdf("stamped.pdf", out.getvalue())
    size, rendered = _rendered_page(document.data, tmp_path, "stamped")
    _assert_paper(size, A4.width, A4.height)
    box = ink_box(rendered)
    assert box is not None
    scale = min(A4.width / 432, A4.height / 648)
    left = (A4.width - 432 * scale) / 2 + 36 * scale
    top = (A4.height - 648 * scale) / 2 + (648 - 612) * scale
    assert box[0] == pytest.approx(left, abs=2) and box[1] == pytest.approx(top, abs=2)
    assert box[2] - box[0] == pytest.approx(100 * scale, abs=2)


@needs_libtiff_tools
@pytest.mark.parametrize("orientation", [1, 6])
def test_the_preview_in_the_fax_mail_is_turned_and_square_like_the_pdf_page(
        tmp_path: Path, orientation: int) -> None:
    from mailfax.inbound.mailer import prepare_files

    tiff = tiff_variant(tmp_path, "g4", orientation).read_bytes()  # 432×300 px, 204×98 dpi
    files = prepare_files(tiff)
    assert files.preview_png is not None
    (width_pt, height_pt), = _page_sizes(tiff_to_pdf(tiff).pdf)
    with Image.open(io.BytesIO(files.preview_png)) as preview:
        assert preview.width / preview.height == pytest.approx(width_pt / height_pt, rel=0.02)
        expected = oriented_pages(tiff)[0].resize(preview.size)
        assert blurred_difference(preview.convert("L"), expected, 4) < 12
