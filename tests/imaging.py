"""Test pictures and page renderings for the visual tests (tests/test_visual.py).

The pictures are asymmetric under every rotation and mirroring (a flag shape, an arrow, a block
in one corner), so a page placed the wrong way round differs from the expected pixels.
TIFF variants are made with Pillow and libtiff's own tools (tiffcp, tiffset), as fax software
writes them.
"""

from __future__ import annotations

import io
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageChops, ImageDraw, ImageOps

HAVE_POPPLER = shutil.which("pdftoppm") is not None
HAVE_LIBTIFF_TOOLS = shutil.which("tiffcp") is not None and shutil.which("tiffset") is not None


def flag_picture(size: tuple[int, int], mode: str = "1") -> Image.Image:
    """White page, black ink: a flag "F" at the top left, an arrow pointing right at the
    bottom, a solid block in the top right corner. No rotation or mirror maps it onto itself."""
    width, height = size
    picture = Image.new("L", size, 255)
    draw = ImageDraw.Draw(picture)
    unit = max(2, min(width, height) // 16)
    left, top = 2 * unit, 2 * unit
    draw.rectangle((left, top, left + unit, top + 8 * unit), fill=0)  # the F's stem
    draw.rectangle((left, top, left + 5 * unit, top + unit), fill=0)  # its top bar
    draw.rectangle((left, top + 4 * unit, left + 3 * unit, top + 5 * unit), fill=0)  # middle
    middle = height - 4 * unit
    draw.rectangle((2 * unit, middle - unit // 2, width - 5 * unit, middle + unit // 2), fill=0)
    draw.polygon([(width - 5 * unit, middle - 2 * unit), (width - 2 * unit, middle),
                  (width - 5 * unit, middle + 2 * unit)], fill=0)  # the arrow's head
    draw.rectangle((width - 4 * unit, unit, width - unit, 3 * unit), fill=0)
    for row in range(0, height // 3, max(1, unit // 2)):  # fine stripes: detail to get right
        draw.line((width // 2, top + row, width // 2 + 3 * unit, top + row), fill=0)
    return picture.convert(mode) if mode != "L" else picture


def save_tiff(picture: Image.Image, path: Path, **options: object) -> Path:
    picture.save(path, format="TIFF", **options)  # type: ignore[arg-type]
    return path


def tiffcp(source: Path, target: Path, *arguments: str) -> Path:
    subprocess.run(["tiffcp", *arguments, str(source), str(target)], check=True,
                   capture_output=True)
    return target


def tiffset(path: Path, tag: int, value: str) -> Path:
    subprocess.run(["tiffset", "-s", str(tag), value, str(path)], check=True,
                   capture_output=True)
    return path


def min_is_white(picture: Image.Image, path: Path, **options: object) -> Path:
    """A bilevel TIFF as faxes are: min-is-white (Pillow writes "1" as min-is-black, so the
    pixels are inverted and relabelled; Pillow then decodes ``picture`` again)."""
    save_tiff(ImageChops.invert(picture.convert("L")).convert("1"), path, **options)
    return tiffset(path, 262, "0")


VARIANTS = ["g4", "g4-fine", "g3-1d", "g3-2d", "g4-strips", "g4-tiles", "g4-lsb", "g3-lsb",
            "g4-min-is-black", "g4-cm", "g4-no-unit", "uncompressed", "lzw-grey"]


def tiff_variant(folder: Path, variant: str, orientation: int) -> Path:
    """One received-fax TIFF of the given kind, with the Orientation tag set."""
    picture = flag_picture((432, 300))  # a quarter fax line wide, small to render quickly
    base = folder / f"{variant}-{orientation}-base.tif"
    target = folder / f"{variant}-{orientation}.tif"
    normal: dict[str, object] = {"dpi": (204, 98)}
    copies = {  # variant -> tiffcp arguments from an uncompressed min-is-white page
        "g3-1d": ["-c", "g3:1d"],
        "g3-2d": ["-c", "g3:2d:fill"],
        "g4-strips": ["-c", "g4", "-r", "37"],
        "g4-tiles": ["-c", "g4", "-t", "-w", "128", "-l", "128"],
        "g4-lsb": ["-c", "g4", "-f", "lsb2msb", "-r", "100000"],  # one strip, fill order 2
        "g3-lsb": ["-c", "g3:2d", "-f", "lsb2msb"],
    }
    if variant in copies:
        tiffcp(min_is_white(picture, base, **normal), target, *copies[variant])
        base.unlink()
    elif variant == "g4":
        min_is_white(picture, target, compression="group4", **normal)
    elif variant == "g4-fine":
        min_is_white(picture, target, compression="group4", dpi=(204, 196))
    elif variant == "g4-min-is-black":  # Pillow's own way of writing mode "1"
        save_tiff(picture, target, compression="group4", **normal)
    elif variant == "g4-cm":  # 80.31 × 38.58 px/cm = 204 × 98 dpi
        min_is_white(picture, target, compression="group4", **normal)
        for tag, value in ((296, "3"), (282, "80.31"), (283, "38.58")):
            tiffset(target, tag, value)
    elif variant == "g4-no-unit":  # only the pixel aspect is known: 204/98
        min_is_white(picture, target, compression="group4", **normal)
        tiffset(target, 296, "1")
    elif variant == "uncompressed":
        min_is_white(picture, target, **normal)
    elif variant == "lzw-grey":
        save_tiff(flag_picture((432, 300), "L"), target, compression="tiff_lzw", dpi=(200, 200))
    else:
        raise ValueError(variant)
    return tiffset(target, 274, str(orientation))


def tiff_tag(path: Path, tag: int) -> object:
    with Image.open(path) as image:
        return image.tag_v2.get(tag)  # type: ignore[attr-defined]


def oriented_pages(data: bytes) -> list[Image.Image]:
    """Every page as Pillow decodes it, orientation applied, in grey.

    Pillow 9+ turns a TIFF page as it loads it (and drops the tag); ``exif_transpose`` does it
    where it did not. Either way the size must be the stored one, turned for orientations 5-8.
    """
    pages = []
    with Image.open(io.BytesIO(data)) as image:
        for number in range(getattr(image, "n_frames", 1)):
            image.seek(number)
            tags = image.tag_v2  # type: ignore[attr-defined]
            stored, turn = (tags[256], tags[257]), tags.get(274, 1)
            image.load()
            page = ImageOps.exif_transpose(image)
            assert page.size == (stored[::-1] if 5 <= turn <= 8 else stored)
            pages.append(page.convert("L"))
    return pages


def render(pdf: Path, page: int, resolution: tuple[float, float], colours: str) -> Image.Image:
    """One page through poppler at the given resolution; ``colours`` "-mono" or "-gray"."""
    result = subprocess.run(["pdftoppm", "-f", str(page), "-l", str(page), "-rx",
                             f"{resolution[0]:.4f}", "-ry", f"{resolution[1]:.4f}", colours,
                             "-aa", "no", "-aaVector", "no", str(pdf)],
                            check=True, capture_output=True)
    assert b"Error" not in result.stderr, result.stderr.decode(errors="replace")
    with Image.open(io.BytesIO(result.stdout)) as rendered:
        return rendered.convert("L")


def render_png(pdf: Path, page: int, dpi: int, target: Path) -> Image.Image:
    """A page at ``dpi`` as a PNG file (to look at) and as a grey image."""
    subprocess.run(["pdftoppm", "-f", str(page), "-l", str(page), "-r", str(dpi), "-gray",
                    "-png", "-singlefile", str(pdf), str(target.with_suffix(""))],
                   check=True, capture_output=True)
    with Image.open(target) as rendered:
        return rendered.convert("L")


def differing_pixels(a: Image.Image, b: Image.Image) -> int:
    """Pixels whose grey differs by more than half the range (black vs white)."""
    difference = ImageChops.difference(a.convert("L"), b.convert("L"))
    histogram = difference.histogram()
    return sum(histogram[129:])


def ink_box(page: Image.Image, threshold: int = 128) -> tuple[int, int, int, int] | None:
    """The bounding box of the dark pixels."""
    return page.point(lambda value: 255 if value < threshold else 0).getbbox()


def ink_share(page: Image.Image, box: Sequence[int] | None = None) -> float:
    region = page.crop(tuple(box)) if box else page  # type: ignore[arg-type]
    histogram = region.convert("L").histogram()
    return sum(histogram[:128]) / max(1, region.width * region.height)


def marker_picture(size: tuple[int, int], mode: str = "L") -> Image.Image:
    """A framed picture with one solid block near its top left corner: where the block lands
    on a rendered page tells which way up the picture was put."""
    width, height = size
    picture = Image.new("L", size, 255)
    draw = ImageDraw.Draw(picture)
    line = max(2, min(width, height) // 50)
    draw.rectangle((0, 0, width - 1, height - 1), outline=0, width=line)
    draw.rectangle((width // 10, height // 10, width * 3 // 10, height * 3 // 10), fill=0)
    return picture.convert(mode) if mode != "L" else picture


def block_corner(page: Image.Image) -> str:
    """Which corner of the framed picture on ``page`` holds the block: "top left", ...

    The frame's bounding box is the picture; the block sits 10-30 % in from one corner."""
    box = ink_box(page)
    assert box is not None, "no ink on the page"
    left, top, right, bottom = box
    width, height = right - left, bottom - top
    shares = {}
    for vertical in ("top", "bottom"):
        for horizontal in ("left", "right"):
            x = left + width * (0.15 if horizontal == "left" else 0.75)
            y = top + height * (0.15 if vertical == "top" else 0.75)
            region = (int(x), int(y), int(x + width * 0.1), int(y + height * 0.1))
            shares[f"{vertical} {horizontal}"] = ink_share(page, region)
    dark = [corner for corner, share in shares.items() if share > 0.9]
    assert len(dark) == 1, shares
    return dark[0]


def blurred_difference(a: Image.Image, b: Image.Image, factor: int = 8) -> float:
    """Mean grey difference of two same-size pages seen from afar (``factor`` pixels averaged
    each way), so resampled text still matches where it is while a shifted, turned or missing
    block does not."""
    size = (max(1, a.width // factor), max(1, a.height // factor))
    small_a = a.convert("L").resize(size, Image.Resampling.BOX)
    small_b = b.convert("L").resize(size, Image.Resampling.BOX)
    histogram = ImageChops.difference(small_a, small_b).histogram()
    return sum(value * count for value, count in enumerate(histogram)) / (size[0] * size[1])
