"""A received fax (TIFF, every page) → one PDF whose pages look as the TIFF says they look.

Every TIFF field that changes how a page looks is honoured:

* **Resolution**, x and y separately (204×98 dpi "normal", 204×196 "fine"), in inches or
  centimetres; with ``ResolutionUnit`` 1 (no unit) the two values still give the aspect of a
  pixel, applied to the default x resolution. A missing or placeholder resolution (below
  ``MIN_DPI``) counts as fine mode for a fax-width page and 200 dpi for any other.
* **Orientation** (all 8 values): the page has the oriented size; the image keeps its stored
  rows and is placed by the content stream's matrix (rotated and/or mirrored), as libtiff's
  ``tiff2pdf`` does, so no pixel is moved.
* **FillOrder**, **PhotometricInterpretation** (min-is-white or min-is-black), **strips and
  tiles**: a G4 page in one strip goes into the PDF as its own CCITT data (bit-reversed for fill
  order 2, ``BlackIs1`` for min-is-black), which the PDF then describes exactly. Anything else
  (G3, several strips, tiles, LZW, uncompressed, ...) is decoded by Pillow and bilevel pages are
  encoded again as G4, so the PDF stays about the size of the TIFF.
* Pages larger than a PDF page may be (14,400 units a side) get ``/UserUnit`` so they keep
  their true size and open everywhere; a side under 3 units is widened with white.

A G4 strip that ends with its end-of-facsimile-block code (every conforming encoder writes
one) is complete and goes in without being decoded, as img2pdf and tiff2pdf do. One without it
may be cut off: it is decoded (libtiff fills what is missing with white, what it cannot decode
fails here) and encoded again, so the PDF holds exactly what was decoded and no viewer meets a
stream that ends early.

Pure and CPU-bound: run it in a thread. Anything that cannot be decoded, or would need too much
memory, raises :class:`NotConvertible`; the caller then delivers the original TIFF.
"""

from __future__ import annotations

import io
import math
import re
import warnings
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mailfax.documents.pdf import encode_g4
from mailfax.support.lazy import lazy_module

if TYPE_CHECKING:
    import pikepdf
    from PIL import Image, ImageSequence
else:  # the first received fax loads them, not serve's start-up
    pikepdf = lazy_module("pikepdf")
    Image = lazy_module("PIL.Image")
    ImageSequence = lazy_module("PIL.ImageSequence")

MAX_PAGES = 500
MAX_PAGE_PIXELS = 40_000_000  # a 400 dpi A3 page is 31 megapixels; fax pages are ~4
FAX_WIDTHS = (1728, 2048, 2432, 3456)  # A4, B4, A3 at 204 dpi, A4 at 408 dpi
DEFAULT_FAX_DPI = (204.0, 196.0)  # a fax-width page without a usable resolution: fine mode
DEFAULT_DPI = (200.0, 200.0)  # any other page without one
MIN_DPI = 50.0  # below this a resolution tag is a placeholder (1×1 is common)
MAX_PDF_UNITS = 14_400.0  # the largest page side PDF readers accept (PDF 1.7, Annex C)
MIN_PDF_UNITS = 3.0  # and the smallest
_REVERSED_BITS = bytes(int(f"{value:08b}"[::-1], 2) for value in range(256))
_FLIP_BITS = bytes.maketrans(bytes(range(256)), _REVERSED_BITS)
EOFB = 0x001001  # G4's end of facsimile block: two EOL codes, 24 bits


class NotConvertible(Exception):
    """The TIFF cannot become a PDF; the message says why, for the note in the fax mail."""


@dataclass(frozen=True)
class ConvertedFax:
    pdf: bytes
    pages: int
    page_sizes_pt: list[tuple[float, float]]


@dataclass(frozen=True)
class _Page:
    width: int  # stored pixels, before the orientation is applied
    height: int
    dpi: tuple[float, float]  # along the stored rows (x) and columns (y)
    orientation: int  # TIFF Orientation, 1-8
    image: pikepdf.Dictionary  # the image XObject's dictionary, stream data set separately
    data: bytes  # the encoded image data

    @property
    def transposed(self) -> bool:
        """Orientations 5-8 turn stored rows into the page's columns."""
        return self.orientation >= 5

    @property
    def size_pt(self) -> tuple[float, float]:
        """The page as the reader sees it, orientation applied, in points."""
        width, height = self.width / self.dpi[0] * 72, self.height / self.dpi[1] * 72
        return (height, width) if self.transposed else (width, height)


def tiff_to_pdf(data: bytes) -> ConvertedFax:
    pages: list[_Page] = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                for number, frame in enumerate(ImageSequence.Iterator(image), start=1):
                    if number > MAX_PAGES:
                        raise NotConvertible(f"The fax has more than {MAX_PAGES} pages.")
                    pages.append(_page(frame, number, data))
    except NotConvertible:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise NotConvertible("The fax image is far too large to convert (a decompression "
                             "bomb?).") from None
    except Exception as error:  # Pillow raises many types for damaged data
        raise NotConvertible(f"The fax image could not be decoded ({_short(error)}).") from None
    if not pages:
        raise NotConvertible("The fax image has no pages.")
    return ConvertedFax(pdf=_build_pdf(pages), pages=len(pages),
                        page_sizes_pt=[page.size_pt for page in pages])


def page_resolution(frame: Image.Image) -> tuple[float, float]:
    """(x dpi, y dpi) of a page along its stored rows and columns (before the orientation).

    ResolutionUnit 2 (inch, also when the tag is missing) and 3 (cm) give dpi; 1 (no unit)
    gives only the pixel aspect, applied to the default x resolution. Placeholders below
    ``MIN_DPI`` count as no resolution.
    """
    default = DEFAULT_FAX_DPI if stored_size(frame)[0] in FAX_WIDTHS else DEFAULT_DPI
    tags = getattr(frame, "tag_v2", None)
    if tags is None:  # not a TIFF: Pillow's dpi is all there is
        xres, yres = _pair(frame.info.get("dpi"))
        unit: Any = 2
    else:
        xres, yres = _number(tags.get(282)), _number(tags.get(283))
        unit = tags.get(296, 2)
    if unit == 3:
        xres, yres = xres * 2.54, yres * 2.54
    elif unit not in (2, 3):  # no absolute unit: only the aspect of a pixel is known
        if xres > 0 and yres > 0 and 0.1 < yres / xres < 10:
            return default[0], default[0] * yres / xres
        return default
    if xres >= MIN_DPI and yres >= MIN_DPI:
        return xres, yres
    return default


def display_resolution(frame: Image.Image) -> tuple[float, float]:
    """(x dpi, y dpi) across and down the page as it is seen (Pillow's oriented pixels)."""
    xdpi, ydpi = page_resolution(frame)
    return (ydpi, xdpi) if orientation(frame) >= 5 else (xdpi, ydpi)


def orientation(frame: Image.Image) -> int:
    """The TIFF Orientation of a page, 1 (also for missing or invalid values) to 8."""
    tags = getattr(frame, "tag_v2", None)
    value = tags.get(274, 1) if tags is not None else 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _number(value: Any) -> float:
    try:
        number = float(value[0] if isinstance(value, tuple) else value)
    except (TypeError, ValueError, IndexError, ZeroDivisionError):
        return 0.0
    return number if math.isfinite(number) else 0.0


def _pair(value: Any) -> tuple[float, float]:
    try:
        return _number(value[0]), _number(value[1])
    except (TypeError, IndexError):
        return 0.0, 0.0


def _page(frame: Image.Image, number: int, source: bytes) -> _Page:
    width, height = stored_size(frame)
    if width <= 0 or height <= 0 or width * height > MAX_PAGE_PIXELS:
        raise NotConvertible(f"Page {number} is {width}×{height} pixels, more than a fax page "
                             f"can be; it was not converted.")
    dpi = page_resolution(frame)
    turn = orientation(frame)
    coded = _original_g4(frame, source)
    if coded is not None and _ends_with_eofb(coded[0]):
        return _ccitt_page(width, height, dpi, turn, *coded)
    frame.load()  # decode now: a damaged page fails here, not in the PDF viewer
    if orientation(frame) == 1 and turn != 1:  # Pillow turned the pixels as it loaded them
        if turn >= 5:
            dpi = dpi[1], dpi[0]
        turn = 1
    if frame.mode == "1":
        return _ccitt_page(frame.width, frame.height, dpi, turn, _encode_g4(frame),
                           black_is_1=False)
    return _flate_page(frame.convert("L" if frame.mode in ("L", "I;16", "I", "F") else "RGB"),
                       dpi, turn)


def stored_size(frame: Image.Image) -> tuple[int, int]:
    """A page's pixels as stored, columns × rows (Pillow's ``size`` is already oriented)."""
    tags = getattr(frame, "tag_v2", None)
    if tags is None or not isinstance(tags.get(256), int) or not isinstance(tags.get(257), int):
        return frame.size
    return tags[256], tags[257]


def _original_g4(frame: Image.Image, source: bytes) -> tuple[bytes, bool] | None:
    """The page's own G4 data (in PDF bit order), when the PDF can describe it exactly.

    That is one strip (several strips are coded separately, each from a white line; tiles
    likewise), either photometric interpretation (``BlackIs1`` for min-is-black) and either
    fill order (fill order 2, least significant bit first as many fax programs write, is
    reversed byte by byte: the same code, read in the order PDF reads).
    """
    if getattr(frame, "tile", None) is None or frame.info.get("compression") != "group4":
        return None
    tags = frame.tag_v2  # type: ignore[attr-defined]
    offsets, counts = tags.get(273), tags.get(279)
    fill_order = tags.get(266, 1)
    photometric = tags.get(262, 0)
    if (fill_order not in (1, 2) or photometric not in (0, 1) or not offsets or not counts
            or len(offsets) != 1 or len(counts) != 1 or tags.get(322) is not None
            or tags.get(258, 1) not in (1, (1,)) or tags.get(277, 1) != 1
            or tags.get(293, 0) & 0b110):  # T6Options: uncompressed mode, not in PDF's G4
        return None
    start, length = int(offsets[0]), int(counts[0])
    if start <= 0 or length <= 0 or start + length > len(source):
        return None
    data = source[start:start + length]
    return (data.translate(_FLIP_BITS) if fill_order == 2 else data), photometric == 1


def _ends_with_eofb(data: bytes) -> bool:
    """Whether G4 data ends with EOFB (then only zero padding): a stream not cut off."""
    trimmed = data.rstrip(b"\0")
    if len(trimmed) < 4:
        return False
    tail = int.from_bytes(trimmed[-4:], "big")
    tail >>= (tail & -tail).bit_length() - 1  # drop the zero bits that pad the last byte
    return tail & 0xFFFFFF == EOFB


def _encode_g4(page: Image.Image) -> bytes:
    try:
        return encode_g4(page)
    except ValueError:
        raise NotConvertible("The page could not be encoded as one G4 strip.") from None


def _ccitt_page(width: int, height: int, dpi: tuple[float, float], turn: int, data: bytes,
                black_is_1: bool) -> _Page:
    parms = pikepdf.Dictionary(K=-1, Columns=width, Rows=height, BlackIs1=black_is_1)
    image = pikepdf.Dictionary(Type=pikepdf.Name.XObject, Subtype=pikepdf.Name.Image,
                               Width=width, Height=height, BitsPerComponent=1,
                               ColorSpace=pikepdf.Name.DeviceGray,
                               Filter=pikepdf.Name.CCITTFaxDecode, DecodeParms=parms)
    return _Page(width, height, dpi, turn, image, data)


def _flate_page(page: Image.Image, dpi: tuple[float, float], turn: int) -> _Page:
    space = pikepdf.Name.DeviceGray if page.mode == "L" else pikepdf.Name.DeviceRGB
    image = pikepdf.Dictionary(Type=pikepdf.Name.XObject, Subtype=pikepdf.Name.Image,
                               Width=page.width, Height=page.height, BitsPerComponent=8,
                               ColorSpace=space, Filter=pikepdf.Name.FlateDecode)
    return _Page(page.width, page.height, dpi, turn, image, zlib.compress(page.tobytes(), 6))


def placement(turn: int, width: float, height: float) -> tuple[float, ...]:
    """The ``cm`` matrix that draws an image (unit square, stored row 0 at the top) on a
    ``width``×``height`` page as TIFF Orientation ``turn`` says the rows and columns lie.

    1: row 0 at the top, column 0 at the left; 2: column 0 at the right (mirrored); 3: turned
    180°; 4: row 0 at the bottom (mirrored); 5: row 0 at the left, column 0 at the top
    (transposed); 6: row 0 at the right (turned 90° clockwise to be read); 7: row 0 at the right,
    column 0 at the bottom (transverse); 8: row 0 at the left, column 0 at the bottom (turned
    90° anticlockwise).
    """
    w, h = width, height
    return {
        1: (w, 0, 0, h, 0, 0),
        2: (-w, 0, 0, h, w, 0),
        3: (-w, 0, 0, -h, w, h),
        4: (w, 0, 0, -h, 0, h),
        5: (0, -h, -w, 0, w, h),
        6: (0, -h, w, 0, 0, h),
        7: (0, h, w, 0, 0, 0),
        8: (0, h, -w, 0, w, 0),
    }[turn]


def _build_pdf(pages: list[_Page]) -> bytes:
    pdf = pikepdf.new()
    version = "1.4"
    for page in pages:
        image = pikepdf.Stream(pdf, page.data)
        for key, value in page.image.items():
            image[key] = value
        width, height = page.size_pt
        unit = max(1.0, width / MAX_PDF_UNITS, height / MAX_PDF_UNITS)
        width, height = width / unit, height / unit
        box_w, box_h = max(width, MIN_PDF_UNITS), max(height, MIN_PDF_UNITS)
        matrix = list(placement(page.orientation, width, height))
        matrix[4] += (box_w - width) / 2  # a sliver of a page sits in the middle of 3 units
        matrix[5] += (box_h - height) / 2
        numbers = " ".join(_pdf_number(value) for value in matrix)
        content = pikepdf.Stream(pdf, f"q {numbers} cm /Fax Do Q".encode())
        page_dict = pikepdf.Dictionary(
            Type=pikepdf.Name.Page,
            MediaBox=[0, 0, float(_pdf_number(box_w)), float(_pdf_number(box_h))],
            Contents=content, Resources=pikepdf.Dictionary(XObject=pikepdf.Dictionary(Fax=image)))
        if unit > 1:
            page_dict.UserUnit = round(unit, 6)
            version = "1.6"
        pdf.pages.append(pikepdf.Page(page_dict))
    out = io.BytesIO()
    pdf.save(out, compress_streams=False, min_version=version)  # images are compressed already
    return out.getvalue()


def _pdf_number(value: float) -> str:
    text = f"{value:.4f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def _short(error: Exception) -> str:
    text = re.sub(r"<[^<>]* object at 0x[0-9a-f]+>", "the file", " ".join(str(error).split()))[:120]
    return text or type(error).__name__
