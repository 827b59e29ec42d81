"""A received mail → the documents of a fax job, or a refusal an SMTP client understands.

Pure and CPU-bound (MIME parsing, PDF checks, image conversion): callers run it in a thread.
"""

from __future__ import annotations

from dataclasses import dataclass

from mailfax.documents import DocumentError, image_to_pdf, is_pdf, prepare_pdf
from mailfax.intake.mime import (
    Attachment,
    MailFormatError,
    ParsedMail,
    parse_mail,
    select_documents,
)
from mailfax.providers.base import FaxDocument

EXPECTED = "Attach the document to fax as a PDF file or an image (JPEG, PNG, GIF, TIFF)."


class Refusal(Exception):
    """Why a mail (or one recipient) is not accepted, as an SMTP reply."""

    def __init__(self, code: int, status: str, sentence: str):
        super().__init__(sentence)
        self.code = code
        self.status = status
        self.sentence = sentence

    def reply(self) -> str:
        text = " ".join(self.sentence.split())  # one line, no CR/LF from any input
        return f"{self.code} {self.status} {text}"


@dataclass(frozen=True)
class FaxContent:
    mail: ParsedMail
    documents: list[FaxDocument]

    @property
    def pages(self) -> int:
        return sum(document.pages for document in self.documents)


def assemble(raw: bytes) -> FaxContent:
    try:
        mail = parse_mail(raw)
    except MailFormatError as error:
        raise Refusal(554, "5.6.0", str(error)) from None
    documents = [_convert(attachment) for attachment in select_documents(mail)]
    if not documents:
        raise Refusal(554, "5.6.0", " ".join(["This mail has no document to fax.", EXPECTED,
                                                *mail.skipped]))
    return FaxContent(mail=mail, documents=documents)


def _convert(attachment: Attachment) -> FaxDocument:
    try:
        if is_pdf(attachment.filename, attachment.content_type):
            return prepare_pdf(attachment.filename, attachment.data)
        return image_to_pdf(attachment.filename, attachment.data)
    except DocumentError as error:
        sentence = str(error)
        if attachment.in_forwarded:
            sentence = f"{sentence.rstrip('.')} (inside the forwarded message)."
        raise Refusal(554, error.status, sentence) from None
