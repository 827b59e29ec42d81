"""Attachments → fax-ready PDFs on paper: check PDFs, put images on pages, merge documents.

Every page mailfax hands a provider is A4 or US Letter (portrait or landscape), the sizes a
fax is sent on (Retarus's ``paperFormat`` knows only these two; FAX.de letters are DIN A4):

* **Images** are put on the account's paper (``paper``, A4 unless the account or
  ``[documents]`` says "Letter"), portrait, inside a margin of ``MARGIN_MM`` on every side,
  centred, aspect kept, turned as their EXIF/TIFF Orientation says. An image with a resolution
  has its physical size, shrunk to fit the printable area; one without a resolution (or with a
  placeholder under 30 dpi) fills the printable width or height, but is never enlarged beyond
  ``MIN_IMAGE_DPI`` (100 pixels per inch, about the 98 lines per inch of a fax in normal mode:
  enlarging more shows no detail the fax would not, only bigger blocks). A landscape image is
  turned a quarter anticlockwise (its top to the paper's left edge, as printers print
  landscape) when that prints it larger; one that fits upright at its own size stays upright.
  Every frame of a multi-page TIFF or GIF is a page.
* **PDFs and office documents** keep their own pages when these are A4 or Letter (within
  ``PAPER_TOLERANCE``); pages of any other size are scaled onto the account's paper (same
  orientation, aspect kept, centred). With ``documents.fit_to_paper`` every page that is not
  the account's paper is scaled onto it (a Letter document on an A4 account becomes A4).

Pure and CPU-bound (callers run it in a thread). Every refusal is a :class:`DocumentError` whose
message names the file and says what is wrong, fit for an SMTP reply or a failure mail.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mailfax.documents.mapped import DocumentBytes, DocumentMap
from mailfax.providers.base import FaxDocument
from mailfax.support.lazy import lazy_module

if TYPE_CHECKING:
    import pikepdf
    from PIL import Image, ImageChops, ImageOps, ImageSequence
else:  # 0.1 s to import: the first document loads them, not serve's start-up
    pikepdf = lazy_module("pikepdf")
    Image = lazy_module("PIL.Image")
    ImageChops = lazy_module("PIL.ImageChops")
    ImageOps = lazy_module("PIL.ImageOps")
    ImageSequence = lazy_module("PIL.ImageSequence")

MAX_PAGES = 200  # per document; a fax of more pages is almost always a mistake
MAX_IMAGE_PIXELS = 60_000_000  # a 600 dpi A4 scan is about 35 megapixels
MAX_IMAGE_FRAMES = 50
PDF_TYPES = {"application/pdf", "application/x-pdf", "application/acrobat"}
MARGIN_MM = 5.0  # printable margin around an image on the page
MIN_IMAGE_DPI = 100.0  # an image is never enlarged beyond this many pixels per inch
MIN_USABLE_DPI = 30.0  # below this a resolution is a placeholder (cameras write 1)
PAPER_TOLERANCE = 0.02  # a page within 2 % of a paper size is that paper (596×842 is A4)
JPEG_QUALITY = 85  # greyscale pictures; the fax halftones them at 200 dpi anyway
DRAFT_DPI = 300  # a JPEG is decoded with no more detail than this on the page (fax: ~200)


@dataclass(frozen=True)
class Paper:
    name: str
    width: float  # points, portrait
    height: float


A4 = Paper("A4", 595.28, 841.89)
LETTER = Paper("Letter", 612.0, 792.0)
PAPERS = {"A4": A4, "Letter": LETTER}
A4_POINTS = (A4.width, A4.height)


@dataclass(frozen=True)
class PageSetup:
    """Where a mail's pages go: the account's paper, and whether every page is fitted to it."""

    paper: Paper = A4
    fit_to_paper: bool = False


DEFAULT_SETUP = PageSetup()


class DocumentError(ValueError):
    """A document that cannot be faxed; ``status`` is the enhanced SMTP status code."""

    def __init__(self, sentence: str, status: str = "5.6.0"):
        super().__init__(sentence)
        self.sentence = sentence
        self.status = status


def is_pdf(filename: str, content_type: str) -> bool:
    return content_type.lower() in PDF_TYPES or filename.lower().endswith(".pdf")


def prepare_pdf(filename: str, data: DocumentBytes, setup: PageSetup = DEFAULT_SETUP
                ) -> FaxDocument:
    """Check that a PDF opens without a password, count its pages, put them on paper.

    A PDF encrypted with an owner password only opens for anyone; it is saved again without the
    encryption so every provider can read it. Pages not on paper are scaled onto it (see the
    module's rules). Other PDFs are passed on byte for byte (a large one in its file: qpdf
    reads it there).
    """
    if b"%PDF-" not in data[:1024]:
        raise DocumentError(f"{filename} is not a PDF (its content is something else); "
                            f"export the document as PDF and send it again.")
    try:
        # The check reads the page tree as it is: pushing inherited attributes down to every
        # page (pikepdf's default) costs a third of the time and only matters for a rewrite.
        with pikepdf.open(_source(data), inherit_page_attributes=False) as pdf:
            pages = len(pdf.pages)
            if pdf.get_warnings() and b"%%EOF" not in data[-2048:]:
                # qpdf rebuilt the file from a fragment: what it shows is not the whole
                # document (a truncated download or attachment).
                raise DocumentError(f"{filename} is incomplete (the file is cut off); save or "
                                    f"export it again and resend.")
            _check_pages(filename, pages)
            rewrite = pdf.is_encrypted or any(_off_paper(page, setup) for page in pdf.pages)
        if rewrite:
            with pikepdf.open(_source(data)) as pdf:
                _put_on_paper(pdf, setup)
                data = _save(pdf)
    except pikepdf.PasswordError:
        raise DocumentError(f"{filename} needs a password to open; send it without a "
                            f"password (as a PDF that opens for anyone).") from None
    except pikepdf.PdfError:
        raise DocumentError(f"{filename} is a damaged PDF that cannot be read; save or export "
                            f"it again and resend.") from None
    return FaxDocument(filename=filename, data=data, pages=pages)


def _source(data: DocumentBytes) -> str | io.BytesIO:
    """What pikepdf opens ``data`` from: its file for a mapped one (``BytesIO`` would copy
    it), else a stream over the bytes (no copy)."""
    return data.path if isinstance(data, DocumentMap) else io.BytesIO(data)


def page_count(data: bytes) -> int:
    """The pages of a PDF (one mailfax made, or LibreOffice); 0 if it cannot be read."""
    try:
        with pikepdf.open(io.BytesIO(data)) as pdf:
            return len(pdf.pages)
    except pikepdf.PdfError:
        return 0


def image_to_pdf(filename: str, data: bytes, paper: Paper = A4) -> FaxDocument:
    """An image (every frame of a multi-page TIFF or GIF) → PDF pages on ``paper``.

    How each picture is sized, turned and placed: see the module's docstring.
    """
    # Each frame is encoded at once: only its bytes are kept, never the decoded frames
    # (20 pages of 7000×8500 pixels would hold over a gigabyte).
    pdf = pikepdf.new()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # damaged-tag chatter; damage that matters raises
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                for frame in ImageSequence.Iterator(image):
                    _check_size(filename, frame.size)
                    if len(pdf.pages) >= MAX_IMAGE_FRAMES:
                        raise DocumentError(f"{filename} has more than {MAX_IMAGE_FRAMES} "
                                            f"pages; send it as a PDF.")
                    _add_picture_page(pdf, frame, paper)
    except DocumentError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DocumentError(f"{filename} is too large an image to fax (more than "
                            f"{MAX_IMAGE_PIXELS // 1_000_000} megapixels).") from None
    except Exception:  # Pillow raises many types for damaged or unknown data
        raise DocumentError(f"{filename} is not a readable image (damaged or of an unknown "
                            f"type); send a PDF, JPEG, PNG, GIF or TIFF.") from None
    if not pdf.pages:
        raise DocumentError(f"{filename} is an empty image.")
    pages = len(pdf.pages)
    out = io.BytesIO()
    pdf.save(out, compress_streams=False)  # the pictures are compressed already
    return FaxDocument(filename=filename, data=out.getvalue(), pages=pages)


def fit_to_paper(document: FaxDocument, setup: PageSetup) -> FaxDocument:
    """A PDF (an office document's, say) with its pages on paper, per the module's rules;
    the very same document when every page already is."""
    try:
        with pikepdf.open(io.BytesIO(document.data)) as pdf:
            if not _put_on_paper(pdf, setup):
                return document
            return FaxDocument(filename=document.filename, data=_save(pdf),
                               pages=len(pdf.pages))
    except pikepdf.PdfError:
        raise DocumentError(f"{document.filename} could not be put on paper (its PDF is "
                            f"damaged); export it as PDF and send it again.") from None


def paper_of(size: tuple[float, float]) -> Paper | None:
    """The paper a page of ``size`` points (either orientation) is, if any."""
    short, long = sorted(size)
    for paper in PAPERS.values():
        if (abs(short - paper.width) <= PAPER_TOLERANCE * paper.width
                and abs(long - paper.height) <= PAPER_TOLERANCE * paper.height):
            return paper
    return None


@dataclass(frozen=True)
class Placement:
    """Where a picture goes on its page, in points: its printed size and lower left corner,
    and whether it is turned a quarter anticlockwise."""

    width: float  # printed size of the picture as it is seen upright (before turning)
    height: float
    x: float
    y: float
    turned: bool

    def matrix(self) -> tuple[float, float, float, float, float, float]:
        if self.turned:  # the picture's top at the paper's left edge
            return 0, self.width, -self.height, 0, self.x + self.height, self.y
        return self.width, 0, 0, self.height, self.x, self.y


def place_picture(pixels: tuple[int, int], dpi: tuple[float, float] | None,
                  paper: Paper) -> Placement:
    """Size and place a picture of ``pixels`` (upright) on portrait ``paper``: the rules of
    the module's docstring. ``dpi`` None: no usable resolution."""
    margin = MARGIN_MM / 25.4 * 72
    box = (paper.width - 2 * margin, paper.height - 2 * margin)
    width_px, height_px = pixels
    if dpi is not None:
        natural = (width_px / dpi[0] * 72, height_px / dpi[1] * 72)
    else:  # as large as the box allows (shrunk below), but not beyond MIN_IMAGE_DPI
        most = 72 / MIN_IMAGE_DPI
        natural = (width_px * most, height_px * most)

    def fitted(size: tuple[float, float], area: tuple[float, float]) -> tuple[float, float]:
        scale = min(1.0, area[0] / size[0], area[1] / size[1])  # shrink to fit, never enlarge
        return size[0] * scale, size[1] * scale

    upright = fitted(natural, box)
    turned = fitted(natural, box[::-1])
    turn = natural[0] > natural[1] and turned[0] > upright[0] * 1.001
    width, height = turned if turn else upright
    on_page = (height, width) if turn else (width, height)
    return Placement(width=width, height=height, x=(paper.width - on_page[0]) / 2,
                     y=(paper.height - on_page[1]) / 2, turned=turn)


def merge_pdfs(documents: Sequence[FaxDocument], filename: str) -> FaxDocument:
    """Several PDFs → one, pages in order (for providers that take a single file)."""
    if len(documents) == 1:
        return documents[0]
    merged = pikepdf.new()
    sources = []
    for document in documents:
        source = pikepdf.open(_source(document.data))
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


def _add_picture_page(pdf: pikepdf.Pdf, frame: Image.Image, paper: Paper) -> None:
    turn = _orientation(frame)
    dpi = _usable_dpi(frame)
    if dpi is not None and _swaps_axes(turn):
        dpi = dpi[1], dpi[0]  # the stored rows become columns
    placement = _draft_jpeg(frame, turn, dpi, paper)
    frame.load()  # a TIFF page is turned as it loads; exif_transpose turns a JPEG, PNG, ...
    upright = ImageOps.exif_transpose(frame)
    with _fax_mode(upright) as picture:
        image = _image_xobject(pdf, picture)
        if placement is None:
            placement = place_picture(picture.size, dpi, paper)
    numbers = " ".join(f"{value:.4f}" for value in placement.matrix())
    page = pikepdf.Dictionary(
        Type=pikepdf.Name.Page, MediaBox=[0, 0, paper.width, paper.height],
        Contents=pikepdf.Stream(pdf, f"q {numbers} cm /Im0 Do Q".encode()),
        Resources=pikepdf.Dictionary(XObject=pikepdf.Dictionary(Im0=image)))
    pdf.pages.append(pikepdf.Page(page))


def _draft_jpeg(frame: Image.Image, turn: int, dpi: tuple[float, float] | None,
                paper: Paper) -> Placement | None:
    """For a JPEG: its placement, and let the decoder skip detail beyond ``DRAFT_DPI`` on the
    page (a 12 megapixel photo decodes at half or quarter size, in grey, several times faster)."""
    if frame.format != "JPEG" or frame.mode not in ("RGB", "L", "CMYK", "YCbCr"):
        return None
    upright = frame.size[::-1] if _swaps_axes(turn) else frame.size
    placement = place_picture(upright, dpi, paper)
    wanted = (placement.width / 72 * DRAFT_DPI, placement.height / 72 * DRAFT_DPI)
    if _swaps_axes(turn):
        wanted = wanted[::-1]
    frame.draft("L", (max(1, round(wanted[0])), max(1, round(wanted[1]))))
    return placement


def _swaps_axes(orientation: int) -> bool:
    """EXIF/TIFF orientations 5 to 8 are transposed: the stored rows are the picture's
    columns."""
    return 5 <= orientation <= 8


def _orientation(frame: Image.Image) -> int:
    try:
        value = frame.getexif().get(274, 1)
    except Exception:  # a damaged EXIF block: the picture as stored
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _usable_dpi(frame: Image.Image) -> tuple[float, float] | None:
    """The picture's resolution along its stored axes, None when missing or a placeholder."""
    dpi = frame.info.get("dpi")
    try:
        xdpi, ydpi = (float(dpi[0]), float(dpi[1])) if dpi else (0.0, 0.0)
    except (TypeError, ValueError, IndexError):
        return None
    if not (MIN_USABLE_DPI <= xdpi < 100_000 and MIN_USABLE_DPI <= ydpi < 100_000):
        return None
    return xdpi, ydpi


def _fax_mode(frame: Image.Image) -> Image.Image:
    """Bilevel stays bilevel; everything else becomes greyscale (a fax has no colour)."""
    if frame.mode == "1":
        return frame.copy()
    if frame.mode in ("RGBA", "LA", "PA") or (frame.mode == "P" and "transparency" in frame.info):
        background = Image.new("RGBA", frame.size, "white")
        background.alpha_composite(frame.convert("RGBA"))
        return background.convert("L")
    return frame.convert("L")


def _image_xobject(pdf: pikepdf.Pdf, picture: Image.Image) -> pikepdf.Stream:
    """Bilevel pixels as CCITT G4, grey ones as JPEG, in an image XObject."""
    if picture.mode == "1":
        data = encode_g4(picture)
        parms = pikepdf.Dictionary(K=-1, Columns=picture.width, Rows=picture.height)
        stream = pikepdf.Stream(pdf, data)
        stream.DecodeParms = parms
        stream.Filter = pikepdf.Name.CCITTFaxDecode
        bits = 1
    else:
        out = io.BytesIO()
        picture.save(out, format="JPEG", quality=JPEG_QUALITY)
        stream = pikepdf.Stream(pdf, out.getvalue())
        stream.Filter = pikepdf.Name.DCTDecode
        bits = 8
    stream.Type = pikepdf.Name.XObject
    stream.Subtype = pikepdf.Name.Image
    stream.Width, stream.Height = picture.width, picture.height
    stream.ColorSpace = pikepdf.Name.DeviceGray
    stream.BitsPerComponent = bits
    return stream


def encode_g4(picture: Image.Image) -> bytes:
    """Bilevel pixels → one CCITT G4 stream in which white runs are white (``BlackIs1``
    false), for images on fax pages and re-encoded received faxes alike.

    Pillow writes mode "1" as min-is-black, so the pixels are inverted first: coding the real
    white as white keeps the stream as small as a fax's own. ValueError if it is not one strip.
    """
    out = io.BytesIO()
    ImageChops.invert(picture).save(out, format="TIFF", compression="group4",
                                    strip_size=(picture.width + 7) // 8 * picture.height + 1)
    with Image.open(io.BytesIO(out.getvalue())) as encoded:
        offsets = encoded.tag_v2[273]  # type: ignore[attr-defined]
        counts = encoded.tag_v2[279]  # type: ignore[attr-defined]
    if len(offsets) != 1:
        raise ValueError("the picture did not fit one G4 strip")
    return out.getvalue()[int(offsets[0]):int(offsets[0]) + int(counts[0])]


def _put_on_paper(pdf: pikepdf.Pdf, setup: PageSetup) -> bool:
    """Scale the pages that are not on paper onto ``setup.paper``; whether any was."""
    changed = False
    for index, page in enumerate(pdf.pages):
        if not _off_paper(page, setup):
            continue
        size = _visible_size(page)
        target = setup.paper
        width, height = (target.height, target.width) if size[0] > size[1] else \
            (target.width, target.height)
        if not changed:  # form fields, stamps, notes: what prints becomes page content,
            if pdf.Root.get("/AcroForm") is not None:  # as the overlay takes content only
                pdf.generate_appearance_streams()
            pdf.flatten_annotations("print")
        changed = True
        sheet = pikepdf.Page(pdf.make_indirect(pikepdf.Dictionary(
            Type=pikepdf.Name.Page, MediaBox=[0, 0, width, height],
            Resources=pikepdf.Dictionary(), Contents=pikepdf.Stream(pdf, b""))))
        sheet.add_overlay(pdf.pages[index], pikepdf.Rectangle(0, 0, width, height))
        pdf.pages[index] = sheet
    return changed


def _off_paper(page: pikepdf.Page, setup: PageSetup) -> bool:
    """Whether :func:`_put_on_paper` scales this page onto ``setup.paper``. The turn (/Rotate)
    does not matter (paper is paper either way up); the crop box qpdf looks up in the page
    tree when the page has none, so this holds for a PDF opened without pushing inherited
    attributes down too."""
    paper = paper_of(_box_size(page))
    return paper is None or (paper != setup.paper and setup.fit_to_paper)


def _box_size(page: pikepdf.Page) -> tuple[float, float]:
    """The page's crop box, in points, as stored (not turned)."""
    box = page.cropbox
    width, height = abs(float(box[2]) - float(box[0])), abs(float(box[3]) - float(box[1]))
    unit = float(page.obj.get("/UserUnit", 1))
    return width * unit, height * unit


def _visible_size(page: pikepdf.Page) -> tuple[float, float]:
    """The page as a viewer shows it: its crop box, turned by /Rotate."""
    width, height = _box_size(page)
    rotate = int(page.obj.get("/Rotate", 0)) % 360
    return (height, width) if rotate in (90, 270) else (width, height)
