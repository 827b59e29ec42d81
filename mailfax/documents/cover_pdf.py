"""Cover pages rendered with ReportLab from the Jinja2 template ``cover.xml``: the heavy half
of :mod:`mailfax.documents.cover`, imported on the first cover (in a worker thread)."""

from __future__ import annotations

import functools
import io
import re
import threading
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import jinja2
from reportlab.lib import colors
from reportlab.lib.pagesizes import A4
from reportlab.lib.styles import ParagraphStyle
from reportlab.lib.units import mm
from reportlab.pdfbase import pdfmetrics
from reportlab.pdfbase.ttfonts import TTFont
from reportlab.pdfgen.canvas import Canvas
from reportlab.platypus import Flowable, HRFlowable, Paragraph, SimpleDocTemplate, Spacer, Table

from mailfax.documents.cover import (
    BOLD_FONT,
    COVER_FILENAME,
    FONT_DIRS,
    REGULAR_FONT,
    CoverInfo,
    CoverUnavailable,
)
from mailfax.providers.base import FaxDocument

# Characters XML 1.0 cannot carry; a mail may contain them, the template parser must not see them.
_NOT_XML = re.compile("[^\t\n\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
_MAX_LAYOUT_PASSES = 3


def render(info: CoverInfo, language: str, templates_dir: Path) -> FaxDocument:
    """:func:`mailfax.documents.cover.render_cover`'s work."""
    _register_fonts()
    template = _template(templates_dir, language)
    cover_pages = 1
    for _ in range(_MAX_LAYOUT_PASSES):
        pdf, rendered_pages = _render(template, info, cover_pages)
        if rendered_pages == cover_pages:
            break
        cover_pages = rendered_pages  # the page total printed on the cover was wrong: again
    return FaxDocument(filename=COVER_FILENAME, data=pdf, pages=rendered_pages)


def _render(template: jinja2.Template, info: CoverInfo, cover_pages: int) -> tuple[bytes, int]:
    total = cover_pages + info.document_pages
    markup = template.render(
        sender=_xml_safe(info.sender), number=_xml_safe(info.number),
        subject=_xml_safe(info.subject), date=info.date, total_pages=total,
        document_pages=info.document_pages, cover_pages=cover_pages,
    )
    layout = ElementTree.fromstring(markup)
    footer = layout.findtext("footer", default="").strip()
    story = _story(layout, _xml_safe(info.text))
    buffer = io.BytesIO()
    document = SimpleDocTemplate(
        buffer, pagesize=A4, leftMargin=20 * mm, rightMargin=20 * mm, topMargin=18 * mm,
        bottomMargin=24 * mm, title="Fax", author="mailfax", invariant=True,
    )
    draw_footer = _footer_painter(footer, total)
    document.build(story, onFirstPage=draw_footer, onLaterPages=draw_footer)
    return buffer.getvalue(), int(document.page)


def _story(layout: ElementTree.Element, text: str) -> list[Flowable]:
    """The flowables for the template's elements, in template order."""
    story: list[Flowable] = []
    fields: list[tuple[str, str]] = []
    for element in layout:
        if element.tag == "field":
            fields.append((element.get("label", ""), element.text or ""))
            continue
        if fields:
            story += _field_table(fields)
            fields = []
        if element.tag == "title":
            story += [Paragraph(escape(element.text or ""), _STYLES["title"]),
                      HRFlowable(width="100%", thickness=2.5, color=colors.black,
                                 spaceBefore=2, spaceAfter=10)]
        elif element.tag == "note":
            story.append(Paragraph(escape(element.text or ""), _STYLES["body"]))
        elif element.tag == "text" and text:
            story += [HRFlowable(width="100%", thickness=2, color=colors.black,
                                 spaceBefore=8, spaceAfter=12), *_text_paragraphs(text)]
    if fields:
        story += _field_table(fields)
    return story


def _field_table(fields: Sequence[tuple[str, str]]) -> list[Flowable]:
    rows = [[Paragraph(escape(label), _STYLES["label"]), Paragraph(escape(value), _STYLES["value"])]
            for label, value in fields]
    table = Table(rows, colWidths=[32 * mm, None], hAlign="LEFT")
    table.setStyle([("VALIGN", (0, 0), (-1, -1), "TOP"),
                    ("LEFTPADDING", (0, 0), (-1, -1), 0),
                    ("BOTTOMPADDING", (0, 0), (-1, -1), 4)])
    return [table, Spacer(1, 4)]


def _text_paragraphs(text: str) -> list[Flowable]:
    """One paragraph per blank-line-separated block; single line breaks are kept."""
    paragraphs: list[Flowable] = []
    for block in text.split("\n\n"):
        lines = [escape(line.expandtabs(4)) for line in block.split("\n")]
        paragraphs.append(Paragraph("<br/>".join(lines), _STYLES["body"]))
    return paragraphs


def _footer_painter(footer: str, total: int) -> Callable[[Canvas, Any], None]:
    def draw(canvas: Canvas, document: Any) -> None:
        label = footer.replace("{page}", str(canvas.getPageNumber())).replace("{total}", str(total))
        canvas.saveState()
        canvas.setFont(REGULAR_FONT, 11)
        canvas.setFillColor(colors.black)
        canvas.drawRightString(A4[0] - 20 * mm, 12 * mm, label)
        canvas.restoreState()

    return draw


def _xml_safe(value: str) -> str:
    return _NOT_XML.sub("", value)


@functools.cache
def _template(templates_dir: Path, language: str) -> jinja2.Template:
    environment = _environment(templates_dir)
    return environment.get_template(f"{language}/cover.xml" if
                                    (templates_dir / language / "cover.xml").is_file()
                                    else "en/cover.xml")


@functools.cache
def _environment(templates_dir: Path) -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.FileSystemLoader(templates_dir), autoescape=True,
                              undefined=jinja2.StrictUndefined, trim_blocks=True)


_font_lock = threading.Lock()


def _register_fonts() -> None:
    """Register DejaVu Sans with ReportLab once per process (its registry is global)."""
    with _font_lock:
        if REGULAR_FONT in pdfmetrics.getRegisteredFontNames():
            return
        for folder in FONT_DIRS:
            regular, bold = folder / "DejaVuSans.ttf", folder / "DejaVuSans-Bold.ttf"
            if regular.is_file() and bold.is_file():
                pdfmetrics.registerFont(TTFont(REGULAR_FONT, str(regular)))
                pdfmetrics.registerFont(TTFont(BOLD_FONT, str(bold)))
                return
    searched = ", ".join(str(folder) for folder in FONT_DIRS)
    raise CoverUnavailable(
        f"cover pages need the DejaVu Sans font (Debian: fonts-dejavu-core); looked in {searched}")


_STYLES = {
    "title": ParagraphStyle("title", fontName=BOLD_FONT, fontSize=30, leading=36),
    "label": ParagraphStyle("label", fontName=BOLD_FONT, fontSize=12, leading=15),
    "value": ParagraphStyle("value", fontName=REGULAR_FONT, fontSize=12, leading=15),
    "body": ParagraphStyle("body", fontName=REGULAR_FONT, fontSize=12, leading=16,
                           spaceAfter=8),
}
