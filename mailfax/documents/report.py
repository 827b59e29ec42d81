"""The transmission report (*Sendebericht*): one PDF page that proves a fax was sent.

What a fax machine prints after a send: who sent what to which number, the remote station's
id, when, how long, how many pages of how many, the attempts, the provider's job id and the
result, with a reduced image of page 1 **as the recipient receives it**: rendered at fax
resolution in black and white (:mod:`mailfax.documents.faxrender`), not in the original's
colours. The image is embedded as it is, a 1-bit image with the fax's own pixel grid
(1728 dots a line; 98 or 196 lines an inch), scaled on the page to the paper's proportions:
the PDF keeps exactly the pixels the fax carried.

Pure and CPU-bound (a few tens of ms): the notifier calls :func:`build_report` in a worker
thread. ReportLab, pikepdf and Pillow are imported on the first report, not at start-up.
"""

from __future__ import annotations

import io
import zlib
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING
from xml.sax.saxutils import escape

from mailfax.documents.faxrender import FaxResolution, render_as_faxed
from mailfax.documents.mapped import DocumentBytes

if TYPE_CHECKING:
    from PIL import Image

REPORT_FILENAME = {"en": "transmission-report.pdf", "de": "sendebericht.pdf"}
PAGE_IMAGE_NAME = "/FaxPage1"

LABELS: dict[str, dict[str, str]] = {
    "en": {
        "title": "Transmission report", "sender": "Sender", "subject": "Subject",
        "recipient": "Recipient number", "remote_id": "Remote station", "start": "Start",
        "duration": "Duration", "pages": "Pages sent", "pages_of": "{sent} of {submitted}",
        "attempts": "Attempts", "provider": "Fax service", "provider_job": "Provider job id",
        "job": "mailfax job", "result": "Result", "none": "-",
        "caption": "Page 1 as the recipient receives it: {dpi} dpi, black and white",
    },
    "de": {
        "title": "Sendebericht", "sender": "Absender", "subject": "Betreff",
        "recipient": "Empfängernummer", "remote_id": "Gegenstelle (Kennung)",
        "start": "Beginn", "duration": "Dauer", "pages": "Gesendete Seiten",
        "pages_of": "{sent} von {submitted}", "attempts": "Versuche",
        "provider": "Faxdienst", "provider_job": "Auftragsnummer des Faxdienstes",
        "job": "mailfax-Auftrag", "result": "Ergebnis", "none": "–",
        "caption": "Seite 1, wie der Empfänger sie erhält: {dpi} dpi, schwarz-weiß",
    },
}


@dataclass(frozen=True)
class ReportFacts:
    """What the report states; times already in the sender's zone."""

    sender: str
    subject: str
    number: str  # display form, e.g. "+49 30 123456"
    remote_id: str
    started_at: datetime | None
    duration: str  # "m:ss", empty when unknown
    pages_sent: int
    pages_submitted: int
    attempts: int
    provider: str
    provider_job_id: str
    job_id: str
    result: str  # a sentence in the report's language


@dataclass(frozen=True)
class PageOne:
    """Page 1 as faxed, ready to embed: the same for every recipient of a mail, so it is
    rendered once per mail (:func:`render_page_one`) and reused for each job's report."""

    width: int  # dots
    height: int  # lines
    resolution: FaxResolution
    flate_bits: bytes  # the 1-bit rows (0 = black), zlib-compressed for a FlateDecode stream
    preview_png: bytes  # square pixels, half size, for the HTML part of the mail


@dataclass(frozen=True)
class TransmissionReport:
    pdf: bytes
    preview_png: bytes  # page 1 as faxed, half size, for the HTML part of the mail
    filename: str


def render_page_one(first_page_pdf: DocumentBytes, resolution: FaxResolution) -> PageOne:
    """Page 1 of ``first_page_pdf`` as the recipient's machine receives it."""
    faxed = render_as_faxed(first_page_pdf, 0, resolution)
    return PageOne(width=faxed.width, height=faxed.height, resolution=resolution,
                   flate_bits=zlib.compress(faxed.tobytes()),
                   preview_png=preview_png(faxed, resolution))


def build_report(facts: ReportFacts, page: PageOne, language: str) -> TransmissionReport:
    """The report PDF for ``facts`` with ``page`` in it."""
    language = language if language in LABELS else "en"
    pdf = _with_page_image(_report_page(facts, page, language), page)
    return TransmissionReport(pdf=pdf, preview_png=page.preview_png,
                              filename=REPORT_FILENAME[language])


def preview_png(faxed: Image.Image, resolution: FaxResolution) -> bytes:
    """The faxed page with square pixels at half size (864 dots across): the fax's black
    and white, with grey only where the reduction averages neighbouring dots."""
    from PIL import Image

    lines = round(faxed.height * resolution.horizontal_dpi / resolution.vertical_dpi)
    half = faxed.convert("L").resize((max(1, (faxed.width + 1) // 2), max(1, (lines + 1) // 2)),
                                     Image.Resampling.BOX)
    out = io.BytesIO()
    half.save(out, format="PNG", compress_level=6)  # optimize=True takes 4 times as long
    return out.getvalue()


# -- layout -----------------------------------------------------------------------------------

_MARGIN_MM = 18.0
_IMAGE_BOX_MM = (174.0, 150.0)  # the most page 1 may take (width, height)


@dataclass(frozen=True)
class _Placement:
    x: float
    y: float
    width: float
    height: float  # points


def _image_placement(page: PageOne, page_width: float, bottom: float,
                     top: float) -> _Placement:
    """Where page 1 goes: its paper proportions (dots / dpi each way), as large as fits the
    box between ``bottom`` and ``top``, centred."""
    from reportlab.lib.units import mm

    paper_width = page.width / page.resolution.horizontal_dpi
    paper_height = page.height / page.resolution.vertical_dpi
    box_width = min(_IMAGE_BOX_MM[0] * mm, page_width - 2 * _MARGIN_MM * mm)
    box_height = min(_IMAGE_BOX_MM[1] * mm, top - bottom)
    scale = min(box_width / paper_width, box_height / paper_height)
    width, height = paper_width * scale, paper_height * scale
    return _Placement(x=(page_width - width) / 2, y=top - height, width=width, height=height)


def _rows(facts: ReportFacts, labels: dict[str, str]) -> list[tuple[str, str]]:
    none = labels["none"]
    started = facts.started_at.strftime("%Y-%m-%d %H:%M:%S %Z") if facts.started_at else none
    return [
        (labels["sender"], facts.sender or none),
        (labels["subject"], facts.subject or none),
        (labels["recipient"], facts.number),
        (labels["remote_id"], facts.remote_id or none),
        (labels["start"], started),
        (labels["duration"], facts.duration or none),
        (labels["pages"], labels["pages_of"].format(sent=facts.pages_sent,
                                                    submitted=facts.pages_submitted)),
        (labels["attempts"], str(facts.attempts)),
        (labels["provider"], facts.provider or none),
        (labels["provider_job"], facts.provider_job_id or none),
        (labels["job"], facts.job_id),
        (labels["result"], facts.result),
    ]


# The labels, title and caption (en and de) are all in Windows-1252, which PDF's standard
# Helvetica covers without embedding a font; values (names, subjects) that are not get
# DejaVu Sans, the cover page's font, embedded as a subset (20 KB and 10 ms a report more).
LABEL_FONT = "Helvetica-Bold"
PLAIN_FONT = "Helvetica"


def _value_font(values: list[str]) -> str:
    from mailfax.documents.cover import REGULAR_FONT
    from mailfax.documents.cover_pdf import _register_fonts

    try:
        for value in values:
            value.encode("cp1252")
    except UnicodeEncodeError:
        _register_fonts()
        return REGULAR_FONT
    return PLAIN_FONT


def _report_page(facts: ReportFacts, page: PageOne, language: str) -> tuple[bytes, _Placement]:
    """The page without the image (ReportLab), and where the image goes on it."""
    from reportlab.lib.pagesizes import A4
    from reportlab.lib.styles import ParagraphStyle
    from reportlab.lib.units import mm
    from reportlab.pdfgen.canvas import Canvas
    from reportlab.platypus import Paragraph, Table

    from mailfax.documents.cover_pdf import _xml_safe

    labels = LABELS[language]
    rows = _rows(facts, labels)
    label_style = ParagraphStyle("label", fontName=LABEL_FONT, fontSize=10, leading=12.5)
    value_style = ParagraphStyle("value", fontName=_value_font([value for _, value in rows]),
                                 fontSize=10, leading=12.5)
    page_width, page_height = A4
    buffer = io.BytesIO()
    canvas = Canvas(buffer, pagesize=A4, invariant=True)
    canvas.setTitle(f"{labels['title']} {facts.job_id}")
    canvas.setAuthor("mailfax")
    left, top = _MARGIN_MM * mm, page_height - _MARGIN_MM * mm
    canvas.setFont(LABEL_FONT, 18)
    canvas.drawString(left, top - 18, labels["title"])
    table = Table([[Paragraph(escape(_xml_safe(label)), label_style),
                    Paragraph(escape(_xml_safe(value)), value_style)]
                   for label, value in rows],
                  colWidths=[55 * mm, page_width - 2 * left - 55 * mm])
    table.setStyle([("VALIGN", (0, 0), (-1, -1), "TOP"), ("LEFTPADDING", (0, 0), (-1, -1), 0),
                    ("BOTTOMPADDING", (0, 0), (-1, -1), 2), ("TOPPADDING", (0, 0), (-1, -1), 1),
                    ("LINEBELOW", (0, 0), (-1, -1), 0.4, "#000000")])
    _, table_height = table.wrapOn(canvas, page_width - 2 * left, page_height)
    table_top = top - 30
    table.drawOn(canvas, left, table_top - table_height)
    caption_y = table_top - table_height - 16
    dpi = f"{page.resolution.horizontal_dpi} × {page.resolution.vertical_dpi}"
    canvas.setFont(PLAIN_FONT, 9)
    canvas.drawString(left, caption_y, labels["caption"].format(dpi=dpi))
    placement = _image_placement(page, page_width, _MARGIN_MM * mm, caption_y - 8)
    canvas.setLineWidth(0.8)
    canvas.rect(placement.x - 1, placement.y - 1, placement.width + 2, placement.height + 2)
    canvas.showPage()
    canvas.save()
    return buffer.getvalue(), placement


def _with_page_image(report_page: tuple[bytes, _Placement], page: PageOne) -> bytes:
    """The report page with ``page`` drawn into its frame as a 1-bit image XObject.

    Written with pikepdf rather than ReportLab's ``drawImage``, which turns a 1-bit image
    into 8-bit grey: the report keeps the fax's own bits (Flate-compressed rows, 0 = black
    as in Pillow's mode "1" and PDF's DeviceGray).
    """
    import pikepdf

    pdf_bytes, placement = report_page
    with pikepdf.open(io.BytesIO(pdf_bytes)) as document:
        # rows packed 8 dots a byte, each padded to a whole byte, as Pillow's mode "1" has them
        image = pikepdf.Stream(document, page.flate_bits)
        image.Type = pikepdf.Name.XObject
        image.Subtype = pikepdf.Name.Image
        image.Width = page.width
        image.Height = page.height
        image.ColorSpace = pikepdf.Name.DeviceGray
        image.BitsPerComponent = 1
        image.Filter = pikepdf.Name.FlateDecode
        page_object = document.pages[0]
        name = page_object.add_resource(image, pikepdf.Name.XObject,
                                         pikepdf.Name(PAGE_IMAGE_NAME))
        drawing = (f"q {placement.width:.3f} 0 0 {placement.height:.3f} {placement.x:.3f} "
                   f"{placement.y:.3f} cm {name} Do Q\n").encode()
        page_object.contents_add(pikepdf.Stream(document, drawing), prepend=False)
        out = io.BytesIO()
        document.save(out, deterministic_id=True)
    return out.getvalue()
