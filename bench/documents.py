"""Time per page of the document steps of issue 10, next to the plain PDF path as 1.0.

    python bench/documents.py [--repeat 5]

Rows: the PDF-only path (``mailfax.documents.pdf.prepare_pdf`` on a corpus PDF already on A4),
the same for a PDF whose 6×9 inch pages are scaled onto A4, a phone photo (12 megapixel JPEG,
EXIF Orientation 6) put on A4 (``image_to_pdf``), a cover page (ReportLab), a .docx through
LibreOffice (warm: one conversion first to create the profile) and OCR of a received fax as
mailfax mails it (``tiff_to_pdf``, then OCRmyPDF). Each figure is the median of ``--repeat``
runs divided by the pages produced. Goals: cover ≤ 50 ms, office ≤ 3 s per document warm,
OCR ≤ 5 s per page on 2 cores.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CORPUS = next((folder / "shared" / "corpus" for folder in ROOT.parents
               if (folder / "shared" / "corpus").is_dir()), ROOT.parent / "shared" / "corpus")

from mailfax.documents import office  # noqa: E402
from mailfax.documents.cover import CoverInfo, render_cover  # noqa: E402
from mailfax.documents.pdf import image_to_pdf, prepare_pdf  # noqa: E402
from mailfax.inbound.convert import tiff_to_pdf  # noqa: E402
from mailfax.inbound.ocr import add_text_layer, ocr_available  # noqa: E402

PDF = CORPUS / "pdf" / "VIA_Nytt_1402.pdf"
OFF_PAPER_PDF = CORPUS / "pdf" / "Seige_of_Vicksburg_Sample_OCR.pdf"  # 6×9 inch pages
DOCX = CORPUS / "office" / "hdr-header-footer.docx"
FAX = CORPUS / "fax-tiff" / "fax2d.tif"


def pdf_only_step() -> tuple[str, Callable[[], int]]:
    data = PDF.read_bytes()
    return "PDF only (documents.prepare_pdf)", lambda: int(prepare_pdf(PDF.name, data).pages)


def off_paper_step() -> Callable[[], int]:
    data = OFF_PAPER_PDF.read_bytes()
    return lambda: int(prepare_pdf(OFF_PAPER_PDF.name, data).pages)


def photo_step() -> Callable[[], int]:
    from PIL import Image, ImageDraw

    picture = Image.new("RGB", (4032, 3024), "white")
    ImageDraw.Draw(picture).rectangle((400, 300, 2000, 1500), fill=(40, 80, 160))
    exif = Image.Exif()
    exif[274] = 6  # held upright: stored sideways
    out = io.BytesIO()
    picture.save(out, format="JPEG", exif=exif, dpi=(72, 72), quality=90)
    data = out.getvalue()
    return lambda: image_to_pdf("IMG_0001.jpg", data).pages


def cover_step() -> Callable[[], int]:
    text = "Sehr geehrte Frau Müller,\n\nanbei das Angebot über 1.234 € für die Straße.\n" * 3
    info = CoverInfo(sender="Jürgen Groß <jg@example.de>", number="+49 30 123456",
                     subject="Angebot", date=datetime.now(UTC), text=text, document_pages=2)
    return lambda: render_cover(info, "de", ROOT / "templates").pages


def office_step(profiles: Path) -> Callable[[], int]:
    office.configure(office.OfficeLimits(profile_root=profiles, max_concurrent=1))
    data = DOCX.read_bytes()
    office.convert_office(DOCX.name, data)  # warm the profile
    return lambda: office.convert_office(DOCX.name, data).pages


def ocr_step() -> Callable[[], int]:
    fax = tiff_to_pdf(FAX.read_bytes()).pdf  # the PDF the inbound path mails

    def run() -> int:
        result = asyncio.run(add_text_layer(fax, pages=1, timeout_per_page=60))
        if not result.searchable:
            raise RuntimeError(result.note)
        return 1

    return run


def measure(step: Callable[[], int], repeat: int) -> tuple[float, float]:
    """Median seconds per page and per run (one document or one cover)."""
    per_page, per_run = [], []
    for _ in range(repeat):
        started = time.perf_counter()
        pages = step()
        elapsed = time.perf_counter() - started
        per_page.append(elapsed / pages)
        per_run.append(elapsed)
    return statistics.median(per_page), statistics.median(per_run)


def slow_rows(repeat: int) -> list[tuple[str, tuple[float, float], str]]:
    """LibreOffice and OCR: seconds per run."""
    rows: list[tuple[str, tuple[float, float], str]] = []
    if shutil.which("soffice"):
        with tempfile.TemporaryDirectory() as profiles:
            rows.append((f".docx via LibreOffice, warm ({DOCX.name})",
                         measure(office_step(Path(profiles)), repeat), "≤ 3 s/doc"))
    else:
        print("LibreOffice not installed: no office row")
    if ocr_available():
        rows.append((f"OCR deu+eng ({FAX.name}, 204×98 dpi)",
                     measure(ocr_step(), max(1, repeat // 2)), "≤ 5 s/page"))
    else:
        print("OCRmyPDF/Tesseract not installed: no OCR row")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--no-office-ocr", action="store_true",
                        help="only the PDF, image and cover rows (seconds, not minutes)")
    args = parser.parse_args()
    repeat = args.repeat
    reference_name, reference = pdf_only_step()
    rows: list[tuple[str, tuple[float, float], str]] = [
        (reference_name, measure(reference, repeat), ""),
        ("PDF off paper, scaled onto A4 (6×9 in, 3 pages)", measure(off_paper_step(), repeat),
         ""),
        ("phone photo 4032×3024 JPEG onto A4 (image_to_pdf)", measure(photo_step(), repeat), ""),
        ("cover page (ReportLab)", measure(cover_step(), repeat), "≤ 50 ms"),
    ]
    if not args.no_office_ocr:
        rows += slow_rows(repeat)
    base = rows[0][1][0]
    print(f"{'step':<52} {'s/page':>9} {'× PDF':>8} {'s/run':>9}  goal")
    for name, (page, run), goal in rows:
        print(f"{name:<52} {page:>9.4f} {page / base:>8.1f} {run:>9.4f}  {goal}")


if __name__ == "__main__":
    main()
