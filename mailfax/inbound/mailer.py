"""A received fax → the mail its owners get: subject and body from templates, the PDF attached,
a small preview of page 1 inline in the HTML part.

Everything that came from the fax network (originator, remote station id) is untrusted: it is
cleaned of control characters and length-limited here, goes into headers only through the
email package's encoder, and into templates only as values (HTML autoescaped).
"""

from __future__ import annotations

import io
import logging
import re
from dataclasses import dataclass
from datetime import datetime
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING
from zoneinfo import ZoneInfo

from mailfax.config import InboundFormat, InboundRoute
from mailfax.inbound.convert import MAX_PAGE_PIXELS, NotConvertible, display_resolution, tiff_to_pdf
from mailfax.inbound.routing import attachment_format, normalise_number
from mailfax.numbers import format_international
from mailfax.store.base import InboundRecord
from mailfax.support.lazy import lazy_module

if TYPE_CHECKING:
    import jinja2
    from PIL import Image
else:  # the first received fax loads them, not serve's start-up
    jinja2 = lazy_module("jinja2")
    Image = lazy_module("PIL.Image")

CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2066-\u2069]")
PREVIEW_WIDTH = 480
log = logging.getLogger(__name__)


def clean(value: str, limit: int = 64) -> str:
    """Untrusted text from the fax network, made safe to show: no control or bidi characters."""
    cleaned: str = " ".join(CONTROL.sub(" ", value).split())
    return cleaned[:limit]


def display_number(number: str, default_country: str) -> str:
    cleaned = clean(number, 32)
    e164 = normalise_number(cleaned, default_country)
    if e164.startswith("+") and len(e164) > 4:
        try:
            return format_international(e164)
        except ValueError:
            return e164
    return cleaned


@dataclass(frozen=True)
class FaxFiles:
    """What gets attached: the PDF, or the raw TIFF when it cannot be converted."""

    pdf: bytes | None
    pages: int
    note: str  # why there is no PDF, empty when there is one
    preview_png: bytes | None
    text_lines: tuple[str, ...] = ()  # the first lines of page 1, when OCR read them
    ocr_note: str = ""  # why the PDF has no text layer, when OCR was tried and failed


def prepare_files(image: bytes) -> FaxFiles:
    """Convert the TIFF (CPU-bound: run in a thread)."""
    if not image:
        return FaxFiles(pdf=None, pages=0, preview_png=None, note=(
            "The provider delivered this fax without any image (0 bytes), so it has no "
            "pages; the call may have ended before the first page."))
    try:
        converted = tiff_to_pdf(image)
    except NotConvertible as error:
        return FaxFiles(pdf=None, pages=0, note=str(error), preview_png=None)
    return FaxFiles(pdf=converted.pdf, pages=converted.pages, note="",
                    preview_png=_preview(image))


def _preview(image: bytes) -> bytes | None:
    try:
        with Image.open(io.BytesIO(image)) as picture:
            if picture.width * picture.height > MAX_PAGE_PIXELS:
                return None
            xdpi, ydpi = display_resolution(picture)  # as the PDF page has it, turned
            height = round(picture.height * xdpi / ydpi)  # square pixels for the eye
            page = picture.convert("L").resize((picture.width, max(1, height)))
            page.thumbnail((PREVIEW_WIDTH, PREVIEW_WIDTH * 2))
            out = io.BytesIO()
            page.save(out, format="PNG", optimize=True)
            return out.getvalue()
    except Exception:  # a preview is a nicety; the fax itself is attached regardless
        return None


class InboundMailer:
    def __init__(self, templates_dir: Path, from_address: str, from_name: str,
                 language: str, timezone: str, default_country: str, attach_tiff: bool):
        self.templates_dir = templates_dir
        self.from_address = from_address
        self.from_name = from_name
        self.language = language
        self.zone = ZoneInfo(timezone)
        self.default_country = default_country
        self.attach_tiff = attach_tiff

    @cached_property
    def text_env(self) -> jinja2.Environment:
        return jinja2.Environment(loader=jinja2.FileSystemLoader(str(self.templates_dir)),
                                  autoescape=False, undefined=jinja2.StrictUndefined)

    @cached_property
    def html_env(self) -> jinja2.Environment:
        return jinja2.Environment(loader=jinja2.FileSystemLoader(str(self.templates_dir)),
                                  autoescape=True, undefined=jinja2.StrictUndefined)

    def compose(self, record: InboundRecord, files: FaxFiles, image: bytes,
                recipients: list[str], route: InboundRoute | None = None,
                document_folder: str = "") -> EmailMessage:
        """The fax mail; ``recipients`` are its To header unless a ``route`` says To and Cc
        (Bcc stays in the envelope). The route's format, language and template apply.
        ``document_folder``: the IMAP folder a privacy-mode fax's document went to."""
        route = route or InboundRoute(to=recipients)
        form = self.format_of(route)
        privacy = form == "none"
        language = route.language or self.language
        local_time = record.received_at.astimezone(self.zone)
        originator = display_number(record.originator, self.default_country) if (
            record.originator.strip()) else ""
        raw_attached = bool(image) and not privacy and (
            files.pdf is None or form in ("tiff", "pdf+tiff"))
        pdf_attached = files.pdf is not None and form in ("pdf", "pdf+tiff")
        context = {
            "originator": originator,
            "remote_id": clean(record.remote_id, 20),
            "called": display_number(record.called_number, self.default_country),
            "pages": files.pages or record.pages,
            "received": local_time,
            "received_text": local_time.strftime("%Y-%m-%d %H:%M %Z"),
            "fax_id": clean(record.fax_id, 64),
            "note": files.note,
            "text_lines": [] if privacy and not route.privacy_first_lines else [
                clean(line, 120) for line in files.text_lines],
            "ocr_note": "" if privacy else files.ocr_note,
            "has_preview": files.preview_png is not None and not privacy,
            "preview_cid": "page1",
            "privacy": privacy,
            "show_command": f"mailfax inbox show {clean(record.fax_id, 64)} --pdf",
            "document_folder": document_folder,
            "format": form,
            "pdf_attached": pdf_attached,
            "raw_attached": raw_attached,
        }
        template = self.template_base(language, route.template)
        subject = (self.text_env.from_string(route.subject) if route.subject is not None
                   else self.text_env.get_template(f"{template}.subject")).render(context)
        message = EmailMessage()
        message["From"] = Address(self.from_name, addr_spec=self.from_address)
        message["To"] = ", ".join(route.to)
        if route.cc:
            message["Cc"] = ", ".join(route.cc)
        message["Subject"] = " ".join(subject.split())
        message["Date"] = format_datetime(record.received_at)
        message["Message-ID"] = make_msgid(idstring="fax", domain=self.from_address.rpartition(
            "@")[2] or "mailfax")
        message["Auto-Submitted"] = "auto-generated"
        message["X-Mailfax-Fax-Id"] = context["fax_id"]
        message.set_content(self.text_env.get_template(f"{template}.txt").render(context))
        message.add_alternative(self.html_env.get_template(f"{template}.html").render(context),
                                subtype="html")
        if context["has_preview"]:
            assert files.preview_png is not None
            html_part = message.get_body(("html",))
            assert isinstance(html_part, EmailMessage)
            html_part.add_related(files.preview_png, maintype="image", subtype="png",
                                  cid="<page1>", filename="page1.png")
        name = self.file_stem(record, local_time)
        if pdf_attached:
            assert files.pdf is not None
            message.add_attachment(files.pdf, maintype="application", subtype="pdf",
                                   filename=f"{name}.pdf")
        if raw_attached:
            message.add_attachment(image, maintype="image", subtype="tiff",
                                   filename=f"{name}.tif")
        return message

    def template_base(self, language: str, name: str) -> str:
        """``language/name``; the standard ``inbound`` templates when a rule's are missing,
        so a typo in the config costs the wording, never the fax."""
        base = f"{language}/{name}"
        try:
            for suffix in (".txt", ".html") + (() if name == "inbound" else (".subject",)):
                self.text_env.get_template(base + suffix)
        except jinja2.TemplateNotFound as missing:
            log.error("template %s is missing: the fax is mailed with %s/inbound instead",
                      missing.name, language)
            return f"{language}/inbound"
        return base

    def format_of(self, route: InboundRoute) -> InboundFormat:
        """The route's attachment format; unset: PDF, and the TIFF too with attach_tiff."""
        return attachment_format(route, self.attach_tiff)

    def file_stem(self, record: InboundRecord, local_time: datetime) -> str:
        digits = "".join(ch for ch in record.originator if ch.isdigit())[:20]
        stem = f"fax-{local_time:%Y-%m-%d-%H%M}"
        return f"{stem}-from-{digits}" if digits else stem
