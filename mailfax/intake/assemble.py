"""A received mail → the documents of a fax job, or a refusal an SMTP client understands.

Pure and CPU-bound (MIME parsing, PDF checks, image conversion): callers run it in a thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mailfax.documents.mapped import DocumentBytes
from mailfax.documents.office import convert_office, is_office
from mailfax.documents.pdf import (
    DEFAULT_SETUP,
    DocumentError,
    PageSetup,
    fit_to_paper,
    image_to_pdf,
    is_pdf,
    prepare_pdf,
)
from mailfax.intake.mime import (
    Attachment,
    MailFormatError,
    ParsedMail,
    is_document_part,
    is_html_picture,
    is_office_part,
    is_pdf_part,
    parse_mail,
    select_documents,
)
from mailfax.intake.spool import MailBytes
from mailfax.providers.base import FaxDocument

EXPECTED = ("Attach the document to fax as a PDF file, an image (JPEG, PNG, GIF, TIFF) or an "
            "office document (Word, OpenDocument, RTF, Excel, text).")


class Refusal(Exception):
    """Why a mail (or one recipient) is not accepted, as an SMTP reply."""

    def __init__(self, code: int, status: str, sentence: str):
        super().__init__(sentence)
        self.code = code
        self.status = status
        self.sentence = sentence

    @property
    def temporary(self) -> bool:
        """4xx: the sender's MTA keeps the mail and tries again; 5xx: it bounces at once."""
        return 400 <= self.code < 500

    def reply(self) -> str:
        # One line of printable text, whatever the input held (CR, LF, NUL, ...).
        printable = "".join(char if char.isprintable() else " " for char in self.sentence)
        return f"{self.code} {self.status} {' '.join(printable.split())}"


@dataclass(frozen=True)
class FaxContent:
    mail: ParsedMail
    documents: list[FaxDocument]

    @property
    def pages(self) -> int:
        return sum(document.pages for document in self.documents)


def assemble(raw: MailBytes, *, allow_empty: bool = False,
             setup: PageSetup = DEFAULT_SETUP, spool: Path | None = None) -> FaxContent:
    """The mail's documents as fax-ready PDFs, in mail order.

    Blocking; office documents take seconds (LibreOffice). ``allow_empty``: a mail without
    documents is returned as such (its text may still become a cover page); otherwise it is
    refused. ``setup``: the paper the pages are put on. ``spool``: the folder a large part is
    decoded into (see :func:`~mailfax.intake.mime.parse_mail`).
    """
    content = convert_documents(read_mail(raw, spool), setup)
    if not content.documents and not allow_empty:
        raise nothing_to_fax(content)
    return content


def read_mail(raw: MailBytes, spool: Path | None = None) -> ParsedMail:
    try:
        return parse_mail(raw, spool)
    except MailFormatError as error:
        raise Refusal(554, "5.6.0", str(error)) from None


def convert_documents(mail: ParsedMail, setup: PageSetup = DEFAULT_SETUP) -> FaxContent:
    """The parsed mail's documents as PDFs (possibly none). Blocking, seconds for office
    documents: see :func:`needs_worker`."""
    return FaxContent(mail=mail, documents=[_convert(attachment, setup)
                                            for attachment in select_documents(mail)])


def needs_worker(mail: ParsedMail) -> bool:
    """Whether converting this mail's documents may take long enough that it must run in a
    worker thread rather than on the event loop: any image (decoding a small file can take
    seconds: a 44 KB ten-page G4 TIFF, a 49 KB 5000×7000 PNG) or office document (LibreOffice).
    Only PDFs stay inline (a check takes about a millisecond). Pure: asks what
    :func:`select_documents` would choose without changing ``mail.skipped``."""
    return any(is_document_part(attachment) and not is_html_picture(mail, attachment)
               and document_kind(attachment) != "pdf" for attachment in mail.attachments)


def nothing_to_fax(content: FaxContent, cover_address: str = "") -> Refusal:
    """The refusal of a mail without documents; ``cover_address`` (e.g.
    ``030123456+cover@fax.local``) is where its text would have been faxed as a cover page."""
    hint = []
    if cover_address:
        hint = [f"To fax the mail's text itself, send it to <{cover_address}>."]
    return Refusal(554, "5.6.0", " ".join(["This mail has no document to fax.", EXPECTED,
                                            *hint, *content.mail.skipped]))


def convert_file(filename: str, content_type: str, data: DocumentBytes,
                 setup: PageSetup = DEFAULT_SETUP) -> FaxDocument:
    """One PDF, image or office document as fax pages; DocumentError names the file."""
    kind = "pdf" if is_pdf(filename, content_type) else \
        "office" if is_office(filename, content_type) else "image"
    return _to_pages(kind, filename, data, setup)


def _to_pages(kind: str, filename: str, data: DocumentBytes, setup: PageSetup
              ) -> FaxDocument:
    """A document of ``kind`` (see :func:`document_kind`) as fax pages on ``setup``'s paper."""
    refuse_empty(filename, data)
    if kind == "pdf":
        return prepare_pdf(filename, data, setup)
    data = bytes(data)  # LibreOffice and Pillow read a copy (only a PDF is read from its file)
    if kind == "office":
        return fit_to_paper(convert_office(filename, data), setup)
    return image_to_pdf(filename, data, setup.paper)


def refuse_empty(filename: str, data: DocumentBytes) -> None:
    """A 0-byte file is called empty, not "not a PDF": the mail program attached nothing."""
    if not data:
        raise DocumentError(f"{filename} is empty (0 bytes); attach the file again, or check "
                            f"that it has content.")


def document_kind(attachment: Attachment) -> str:
    """How a selected attachment is converted: "pdf", "office" or "image", by the same tests
    that :func:`select_documents` chose it with (not :func:`convert_file`'s name rule, under
    which ``scan.pdf`` sent as ``image/jpeg`` would be refused as "not a PDF")."""
    if is_pdf_part(attachment):
        return "pdf"
    if is_office_part(attachment):
        return "office"
    return "image"


def _convert(attachment: Attachment, setup: PageSetup) -> FaxDocument:
    try:
        return _to_pages(document_kind(attachment), attachment.filename, attachment.data,
                         setup)
    except DocumentError as error:
        sentence = str(error)
        if attachment.in_forwarded:
            sentence = f"{sentence.rstrip('.')} (inside the forwarded message)."
        # A converter that timed out or is busy is temporary (451: the MTA tries again);
        # anything else about the file stays the same however often it is sent (554).
        code = 451 if error.status.startswith("4") else 554
        raise Refusal(code, error.status, sentence) from None
