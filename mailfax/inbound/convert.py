"""A received fax (TIFF, every page) → one PDF whose pages have their true physical size.

Fax TIFFs have different horizontal and vertical resolutions (204×98 dpi "normal", 204×196
"fine"), so each page's size is computed from its x and y resolution separately. Pillow decodes
every page (G3 1-D/2-D, G4, either fill order, strips, tiles, LZW, uncompressed) and bilevel pages
are written back as CCITT G4, so the PDF stays about the size of the TIFF.

Pure and CPU-bound: run it in a thread. Anything that cannot be decoded, or would need too much
memory, raises :class:`NotConvertible`; the caller then delivers the original TIFF.
"""

from __future__ import annotations

import io
import re
import warnings
import zlib
from dataclasses import dataclass
from typing import Any

import pikepdf
from PIL import Image, ImageChops, ImageSequence

MAX_PAGES = 500
MAX_PAGE_PIXELS = 40_000_000  # a 400 dpi A3 page is 31 megapixels; fax pages are ~4
FAX_WIDTHS = (1728, 2048, 2432, 3456)  # A4, B4, A3 at 204 dpi, A4 at 408 dpi
DEFAULT_FAX_DPI = (204.0, 196.0)  # a fax-width page without a usable resolution: fine mode
DEFAULT_DPI = (200.0, 200.0)  # any other page without one
MIN_DPI = 50.0  # below this a resolution tag is a placeholder (1×1 is common)


class NotConvertible(Exception):
    """The TIFF cannot become a PDF; the message says why, for the note in the fax mail."""


@dataclass(frozen=True)
class ConvertedFax:
    pdf: bytes
    pages: int
    page_sizes_pt: list[tuple[float, float]]


@dataclass(frozen=True)
class _Page:
    width: int
    height: int
    dpi: tuple[float, float]
    image: pikepdf.Dictionary  # the image XObject's dictionary, stream data set separately
    data: bytes  # the encoded image data

    @property
    def size_pt(self) -> tuple[float, float]:
        return self.width / self.dpi[0] * 72, self.height / self.dpi[1] * 72


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
    """(x dpi, y dpi) of a page; Pillow has already turned centimetre units into inches."""
    dpi: Any = frame.info.get("dpi")
    try:
        xdpi, ydpi = float(dpi[0]), float(dpi[1])
    except (TypeError, ValueError, IndexError):
        xdpi = ydpi = 0.0
    if xdpi >= MIN_DPI and ydpi >= MIN_DPI:
        return xdpi, ydpi
    return DEFAULT_FAX_DPI if frame.width in FAX_WIDTHS else DEFAULT_DPI


def _page(frame: Image.Image, number: int, source: bytes) -> _Page:
    width, height = frame.size
    if width <= 0 or height <= 0 or width * height > MAX_PAGE_PIXELS:
        raise NotConvertible(f"Page {number} is {width}×{height} pixels, more than a fax page "
                             f"can be; it was not converted.")
    dpi = page_resolution(frame)
    passed = _original_g4(frame, source)
    frame.load()  # decode now: a damaged page fails here, not in the PDF viewer
    if passed is not None:
        data, black_is_1 = passed
        return _ccitt_page(width, height, dpi, data, black_is_1)
    if frame.mode == "1":
        return _ccitt_page(width, height, dpi, _encode_g4(frame), black_is_1=False)
    return _flate_page(frame.convert("L" if frame.mode in ("L", "I;16", "I", "F") else "RGB"),
                       dpi)


def _original_g4(frame: Image.Image, source: bytes) -> tuple[bytes, bool] | None:
    """The page's own G4 data, when it can go into the PDF unchanged.

    Only for one strip in the standard bit order: with fill order 2 (least significant bit first,
    as many fax programs write) the bytes would need reversing, and several strips are
    separately coded; such pages are decoded and encoded again instead.
    """
    if getattr(frame, "tile", None) is None or frame.info.get("compression") != "group4":
        return None
    tags = frame.tag_v2  # type: ignore[attr-defined]
    offsets, counts = tags.get(273), tags.get(279)
    fill_order = tags.get(266, 1)
    photometric = tags.get(262, 0)
    if (fill_order != 1 or photometric not in (0, 1) or not offsets or not counts
            or len(offsets) != 1 or len(counts) != 1 or tags.get(322) is not None):
        return None
    start, length = int(offsets[0]), int(counts[0])
    if start <= 0 or length <= 0 or start + length > len(source):
        return None
    return source[start:start + length], photometric == 1


def _encode_g4(page: Image.Image) -> bytes:
    """Bilevel pixels → a G4 stream in which the white runs are white (``BlackIs1`` false).

    Pillow writes mode "1" as min-is-black, so the pixels are inverted first: coding the real
    white as white keeps the stream as small as the fax's own.
    """
    inverted = ImageChops.invert(page)
    out = io.BytesIO()
    inverted.save(out, format="TIFF", compression="group4",
                  strip_size=(page.width + 7) // 8 * page.height + 1)
    with Image.open(io.BytesIO(out.getvalue())) as encoded:
        offsets = encoded.tag_v2[273]  # type: ignore[attr-defined]
        counts = encoded.tag_v2[279]  # type: ignore[attr-defined]
        if len(offsets) != 1:
            raise NotConvertible("The page could not be encoded as one G4 strip.")
        raw = out.getvalue()
        return raw[int(offsets[0]):int(offsets[0]) + int(counts[0])]


def _ccitt_page(width: int, height: int, dpi: tuple[float, float], data: bytes,
                black_is_1: bool) -> _Page:
    parms = pikepdf.Dictionary(K=-1, Columns=width, Rows=height, BlackIs1=black_is_1)
    image = pikepdf.Dictionary(Type=pikepdf.Name.XObject, Subtype=pikepdf.Name.Image,
                               Width=width, Height=height, BitsPerComponent=1,
                               ColorSpace=pikepdf.Name.DeviceGray,
                               Filter=pikepdf.Name.CCITTFaxDecode, DecodeParms=parms)
    return _Page(width, height, dpi, image, data)


def _flate_page(page: Image.Image, dpi: tuple[float, float]) -> _Page:
    space = pikepdf.Name.DeviceGray if page.mode == "L" else pikepdf.Name.DeviceRGB
    image = pikepdf.Dictionary(Type=pikepdf.Name.XObject, Subtype=pikepdf.Name.Image,
                               Width=page.width, Height=page.height, BitsPerComponent=8,
                               ColorSpace=space, Filter=pikepdf.Name.FlateDecode)
    return _Page(page.width, page.height, dpi, image, zlib.compress(page.tobytes(), 6))


def _build_pdf(pages: list[_Page]) -> bytes:
    pdf = pikepdf.new()
    for page in pages:
        image = pikepdf.Stream(pdf, page.data)
        for key, value in page.image.items():
            image[key] = value
        width, height = (round(value, 3) for value in page.size_pt)
        content = pikepdf.Stream(pdf, f"q {width} 0 0 {height} 0 0 cm /Fax Do Q".encode())
        pdf.pages.append(pikepdf.Page(pikepdf.Dictionary(
            Type=pikepdf.Name.Page, MediaBox=[0, 0, width, height], Contents=content,
            Resources=pikepdf.Dictionary(XObject=pikepdf.Dictionary(Fax=image)))))
    out = io.BytesIO()
    pdf.save(out, compress_streams=False)  # the images are compressed already
    return out.getvalue()


def _short(error: Exception) -> str:
    text = re.sub(r"<[^<>]* object at 0x[0-9a-f]+>", "the file", " ".join(str(error).split()))[:120]
    return text or type(error).__name__
