"""What a fax machine would send: a PDF, an image or a TIFF as a bilevel G4 TIFF in fine mode
(204 × 196 dpi), for the emulators' received faxes (``mailfax emulate receive``).

Blocking and CPU-bound: call it from a thread. PDFs are rasterised with poppler's ``pdftoppm``.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # Pillow is imported where used: the config loads this module, the CLI
    from PIL import Image  # need not pay for Pillow

FINE = (204, 196)  # dpi: horizontal, vertical
FAX_WIDTH = 1728  # pixels: an A4 line at 204 dpi, as fax machines scan it
A4_HEIGHT = 2292  # 297 mm at 196 dpi
TIFF_SUFFIXES = (".tif", ".tiff")
PDFTOPPM_TIMEOUT = 120.0


class FaxImageError(Exception):
    """The file cannot be made into a fax; the message says why."""


def tiff_pages(image: bytes) -> int:
    """How many pages a TIFF holds; 0 when it does not open."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(image)) as picture:
            return int(getattr(picture, "n_frames", 1))
    except Exception:  # Pillow raises many types for damaged data
        return 0


def fax_image_of(path: Path) -> bytes:
    """``path`` as a fax TIFF: a TIFF as it is, a PDF or image rendered in fine mode."""
    suffix = path.suffix.lower()
    try:
        data = path.read_bytes()
    except OSError as error:
        raise FaxImageError(f"{path}: {error.strerror}") from None
    from PIL import Image, ImageSequence

    if suffix in TIFF_SUFFIXES:
        if not tiff_pages(data):
            raise FaxImageError(f"{path}: not a TIFF that opens")
        return data
    if suffix == ".pdf" or data.startswith(b"%PDF"):
        return _tiff([_bilevel(page) for page in _pdf_pages(path)])
    try:
        with Image.open(io.BytesIO(data)) as picture:
            frames = [_fit(frame.convert("L")) for frame in ImageSequence.Iterator(picture)]
    except Exception as error:
        raise FaxImageError(f"{path}: neither a PDF nor an image ({error})") from None
    return _tiff([_bilevel(frame) for frame in frames])


def sample_fax(called: str, pages: int = 2) -> bytes:
    """A fax of ``pages`` pages that says what it is, for trying fax → mail without a file."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=56)
    small = ImageFont.load_default(size=36)
    sheets = []
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    for number in range(1, pages + 1):
        page = Image.new("L", (FAX_WIDTH, A4_HEIGHT), 255)
        draw = ImageDraw.Draw(page)
        draw.text((140, 200), "mailfax test fax", font=font, fill=0)
        draw.text((140, 320), f"Page {number} of {pages}", font=font, fill=0)
        draw.text((140, 480), f"To {called}, sent {now} by the bundled emulator.",
                  font=small, fill=0)
        draw.rectangle((140, 600, FAX_WIDTH - 140, 1200), outline=0, width=6)
        sheets.append(_bilevel(page))
    return _tiff(sheets)


def _pdf_pages(path: Path) -> list[Image.Image]:
    from PIL import Image

    if shutil.which("pdftoppm") is None:
        raise FaxImageError("rendering a PDF needs pdftoppm (Debian: poppler-utils); "
                            "give a TIFF or an image instead")
    with tempfile.TemporaryDirectory(prefix="mailfax-fax-") as folder:
        prefix = Path(folder) / "page"
        try:
            subprocess.run(["pdftoppm", "-gray", "-rx", str(FINE[0]), "-ry", str(FINE[1]),
                            str(path), str(prefix)], check=True, capture_output=True,
                           timeout=PDFTOPPM_TIMEOUT)
        except subprocess.CalledProcessError as error:
            message = error.stderr.decode(errors="replace").strip()
            raise FaxImageError(f"{path}: pdftoppm could not render it ({message})") from None
        except subprocess.TimeoutExpired:
            raise FaxImageError(f"{path}: rendering took too long") from None
        pages = []
        for rendered in sorted(Path(folder).glob("page*.pgm")):
            with Image.open(rendered) as picture:
                pages.append(picture.copy())
    if not pages:
        raise FaxImageError(f"{path}: the PDF has no pages")
    return pages


def _fit(picture: Image.Image) -> Image.Image:
    """An image scaled to the fax width, its height in fine mode's taller pixels."""
    scale = FAX_WIDTH / picture.width
    height = max(1, round(picture.height * scale * FINE[1] / FINE[0]))
    return picture.resize((FAX_WIDTH, height))


def _bilevel(picture: Image.Image) -> Image.Image:
    return picture.convert("L").point(lambda value: 255 if value > 160 else 0).convert("1")


def _tiff(pages: list[Image.Image]) -> bytes:
    out = io.BytesIO()
    pages[0].save(out, format="TIFF", save_all=True, append_images=pages[1:],
                  compression="group4", dpi=FINE)
    return out.getvalue()
