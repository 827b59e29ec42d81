"""A raw mail → its parts, as mail clients really write them.

Pure: no I/O. Handles RFC 2231 file names, PDFs sent as ``application/octet-stream``, forwarded
mails (``message/rfc822``), Outlook's ``winmail.dat`` (TNEF) and signatures. Hostile structure is
capped (part count, nesting depth) so one mail cannot eat the process.
"""

from __future__ import annotations

import binascii
import contextlib
import email
import email.parser
import html
import mmap
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from email.errors import MessageError
from email.header import decode_header, make_header
from email.message import Message
from email.utils import getaddresses, parsedate_to_datetime
from pathlib import Path

from mailfax.documents.mapped import DocumentBytes, DocumentMap, drop_read_pages
from mailfax.documents.pdf import PDF_TYPES
from mailfax.intake.fastmime import ScannedPart, scan
from mailfax.intake.spool import (
    DECODE_TO_FILE_ABOVE,
    FEED_BYTES,
    MailBytes,
    buffer_chunks,
    decode_base64_to_file,
)

MAX_PARTS = 500
MAX_DEPTH = 12
MAX_TNEF_BYTES = 50 * 1024 * 1024

IMAGE_TYPES = {"image/jpeg", "image/pjpeg", "image/png", "image/gif", "image/tiff",
               "image/bmp", "image/webp"}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".tif", ".tiff", ".bmp", ".webp")
GENERIC_TYPES = {"application/octet-stream", "application/octetstream", "application/binary",
                 "application/x-download", "application/force-download"}
TNEF_TYPES = {"application/ms-tnef", "application/vnd.ms-tnef"}
NOT_DOCUMENTS = {"application/pkcs7-signature", "application/x-pkcs7-signature",
                 "application/pgp-signature", "application/pgp-keys", "text/vcard",
                 "text/x-vcard", "text/calendar"}


class MailFormatError(ValueError):
    """The mail cannot be read at all; the message is a sentence for the SMTP reply."""


@dataclass(frozen=True)
class Attachment:
    filename: str
    content_type: str
    data: DocumentBytes  # a large decoded part: in its file (see parse_mail)
    inline: bool = False
    content_id: str = ""
    in_forwarded: bool = False  # inside a forwarded message/rfc822


@dataclass
class ParsedMail:
    attachments: list[Attachment] = field(default_factory=list)
    subject: str = ""
    message_id: str | None = None
    references: list[str] = field(default_factory=list)
    from_address: str = ""
    from_header: str = ""
    date: datetime | None = None
    auto_submitted: str = ""
    precedence: str = ""
    text: str = ""  # the body a person wrote (text/plain, or the HTML part as text)
    skipped: list[str] = field(default_factory=list)  # sentences: parts that are not faxed
    html_cids: set[str] = field(default_factory=set)  # cid: references in HTML bodies


def parse_mail(raw: MailBytes, spool: Path | None = None) -> ParsedMail:
    """The mail read by the fast scan (:mod:`mailfax.intake.fastmime`) when its shape is a
    common one, else by the email package; both give the same message tree. With ``spool``
    (a folder), a large base64 part the scan found is decoded into a file there, and its
    attachment's data is a :class:`~mailfax.documents.mapped.DocumentMap` of it."""
    message = scan(raw)  # a mapped mail's pages are dropped as the scan goes
    try:
        return read_message(message if message is not None else package_message(raw), spool)
    finally:
        if isinstance(raw, mmap.mmap):
            drop_read_pages(raw, len(raw))  # read: what is kept of it is decoded by now


def package_message(raw: MailBytes) -> Message:
    """The mail as the email package parses it (every shape, slower)."""
    # The compat32 parser: several times faster than the ``default`` policy, whose header
    # objects intake does not need; headers are decoded here where they are used.
    try:
        return _message(raw)
    except Exception as error:  # the parser is lenient; this is a real failure
        raise MailFormatError(f"The mail cannot be parsed ({type(error).__name__}).") from None


def read_message(message: Message, spool: Path | None = None) -> ParsedMail:
    """A parsed message tree → what intake uses of it."""
    repair_8bit_headers(message)
    mail = ParsedMail(
        subject=_header(message, "Subject"),
        message_id=_message_id(_header(message, "Message-ID")),
        references=_references(message),
        from_header=_header(message, "From"),
        date=_date(_header(message, "Date")),
        auto_submitted=_header(message, "Auto-Submitted").lower(),
        precedence=_header(message, "Precedence").lower(),
    )
    raw_from = str(message.get("From", "") or "")  # before decoding: a name may hold a comma
    addresses = getaddresses([raw_from]) if raw_from else []
    mail.from_address = addresses[0][1] if addresses else ""
    walker = _Walker(mail, spool)
    walker.walk(message, depth=0, forwarded=False)
    mail.text = walker.body_text()
    return mail


def _message(raw: MailBytes) -> Message:
    """The parsed mail. A large one is fed to the parser in pieces: given all at once, the
    parser holds the whole mail as text and every line of it as a string at the same time
    (about 7.7 times the mail in memory)."""
    if isinstance(raw, bytes) and len(raw) <= FEED_BYTES:
        return email.message_from_bytes(raw)
    parser = email.parser.BytesFeedParser()
    for chunk in buffer_chunks(raw):
        parser.feed(chunk)
    return parser.close()


def select_documents(mail: ParsedMail) -> list[Attachment]:
    """The parts to fax, in mail order; note in ``mail.skipped`` what was left out and why."""
    chosen = []
    for attachment in mail.attachments:
        if is_document_part(attachment):
            if not is_html_picture(mail, attachment):
                chosen.append(attachment)
        elif attachment.content_type not in NOT_DOCUMENTS and attachment.filename:
            mail.skipped.append(f"{attachment.filename} ({attachment.content_type}) is not a "
                                f"document mailfax can fax and was left out.")
    return chosen


def is_document_part(attachment: Attachment) -> bool:
    """A PDF, image or office document: one that :func:`select_documents` would fax (unless
    it is a picture of the HTML body)."""
    return is_pdf_part(attachment) or is_image_part(attachment) or is_office_part(attachment)


def is_html_picture(mail: ParsedMail, attachment: Attachment) -> bool:
    """A logo or picture shown in the HTML body (inline, referenced by cid:), not a document."""
    return (attachment.inline and bool(attachment.content_id)
            and attachment.content_id in mail.html_cids and is_image_part(attachment))


def is_office_part(attachment: Attachment) -> bool:
    """An office document by name or type; never the mail's own text (inline, no name)."""
    from mailfax.documents.office import is_office

    return bool(attachment.filename) and is_office(attachment.filename, attachment.content_type)


def is_pdf_part(attachment: Attachment) -> bool:
    if attachment.content_type in PDF_TYPES:
        return True
    return attachment.filename.lower().endswith(".pdf") and (
        attachment.content_type in GENERIC_TYPES or attachment.data[:5] == b"%PDF-")


def is_image_part(attachment: Attachment) -> bool:
    if attachment.content_type in IMAGE_TYPES:
        return True
    return attachment.filename.lower().endswith(IMAGE_SUFFIXES) and (
        attachment.content_type in GENERIC_TYPES or attachment.content_type.startswith("image/"))


class _Walker:
    def __init__(self, mail: ParsedMail, spool: Path | None = None):
        self.mail = mail
        self.spool = spool  # where a large part is decoded to (documents.mapped)
        self.parts = 0
        self.plain: list[str] = []
        self.html: list[str] = []

    def walk(self, part: Message, depth: int, forwarded: bool) -> None:
        self.parts += 1
        if depth:
            repair_8bit_headers(part)
        if self.parts > MAX_PARTS:
            raise MailFormatError(f"The mail has more than {MAX_PARTS} MIME parts; "
                                  f"send fewer attachments per mail.")
        if depth > MAX_DEPTH:
            raise MailFormatError(f"The mail's MIME parts are nested more than {MAX_DEPTH} "
                                  f"levels deep.")
        content_type = part.get_content_type()
        if content_type == "message/rfc822" or (part.is_multipart()
                                                and content_type.startswith("message/")):
            for inner in _payload_list(part):
                self.walk(inner, depth + 1, forwarded=True)
            return
        if part.is_multipart():
            for inner in _payload_list(part):
                self.walk(inner, depth + 1, forwarded)
            return
        self.leaf(part, forwarded)

    def leaf(self, part: Message, forwarded: bool) -> None:
        content_type = part.get_content_type()
        filename = _filename(part)
        disposition = (part.get_content_disposition() or "").lower()
        if content_type in ("text/plain", "text/html") and disposition != "attachment" \
                and not filename:
            self.body(part, content_type, forwarded)
            return
        data = _decoded_to_file(part, self.spool) or _decoded(part)
        part.set_payload("")  # the encoded text is not needed again: free it now
        if content_type in TNEF_TYPES or filename.lower() == "winmail.dat":
            self.tnef(filename or "winmail.dat", data, forwarded)
            return
        self.mail.attachments.append(Attachment(
            filename=filename or _fallback_name(content_type, len(self.mail.attachments) + 1),
            content_type=content_type, data=data, inline=disposition != "attachment",
            content_id=str(part.get("Content-ID", "") or "").strip().strip("<>")[:250],
            in_forwarded=forwarded,
        ))

    def body(self, part: Message, content_type: str, forwarded: bool) -> None:
        text = _text_of(part)
        if content_type == "text/html":
            self.mail.html_cids.update(re.findall(r"cid:([^\"'\s>)]+)", text, re.IGNORECASE))
            if not forwarded:
                self.html.append(text)
        elif not forwarded:
            self.plain.append(text)

    def tnef(self, filename: str, data: DocumentBytes, forwarded: bool) -> None:
        from tnefparse import TNEF  # imported here: only Outlook mails need it

        if len(data) > MAX_TNEF_BYTES:
            self.mail.skipped.append(f"{filename} is too large to unpack.")
            return
        try:
            tnef = TNEF(bytes(data))
        except Exception:  # tnefparse raises plain exceptions on damaged data
            self.mail.skipped.append(f"{filename} (Outlook rich text) could not be unpacked.")
            return
        for inner in tnef.attachments[:MAX_PARTS]:
            name = inner.long_filename() or inner.name or "attachment"
            self.mail.attachments.append(Attachment(
                filename=str(name), content_type=_type_from_name(str(name)),
                data=bytes(inner.data), in_forwarded=forwarded))

    def body_text(self) -> str:
        if self.plain:
            return "\n\n".join(self.plain).strip()
        return "\n\n".join(html_to_text(body) for body in self.html).strip()


def html_to_text(markup: str) -> str:
    """Just enough HTML → text for a cover page: blocks become lines, tags and scripts go."""
    text = re.sub(r"(?is)<(script|style|head)\b.*?</\1\s*>", "", markup)
    text = re.sub(r"(?i)<br\s*/?>", "\n", text)
    text = re.sub(r"(?i)</(p|div|li|tr|h[1-6]|blockquote)\s*>", "\n", text)
    text = re.sub(r"(?s)<[^>]*>", "", text)
    text = html.unescape(text)
    lines = [" ".join(line.split()) for line in text.splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _payload_list(part: Message) -> Iterator[Message]:
    payload = part.get_payload()
    if isinstance(payload, list):
        yield from (item for item in payload if isinstance(item, Message))
    elif isinstance(payload, Message):
        yield payload


def _decoded_to_file(part: Message, spool: Path | None) -> DocumentMap | None:
    """A large base64 part the fast scan found, decoded into a file in ``spool``; None for
    any other (decoded in memory, as the email package would)."""
    if spool is None or not isinstance(part, ScannedPart):
        return None
    region = part.clean_base64()
    if region is None or region[1] - region[0] <= DECODE_TO_FILE_ABOVE:
        return None
    try:
        return decode_base64_to_file(part.buffer, *region, spool)
    except ValueError:  # nothing in it
        return None


def _decoded(part: Message) -> bytes:
    if not isinstance(part, ScannedPart):  # a scanned part decodes from the mail's bytes
        with contextlib.suppress(LookupError, ValueError):  # a charset name with a NUL
            encoded = part.get_payload()
            if isinstance(encoded, str) and encoded.isascii() and \
                    str(part.get("Content-Transfer-Encoding", "")).lower() == "base64":
                # What the email package does in the end (a lenient a2b_base64), without
                # copying the text to bytes, splitting it into lines and joining them again.
                with contextlib.suppress(binascii.Error):
                    return binascii.a2b_base64(encoded)
    payload = part.get_payload(decode=True)
    if isinstance(payload, bytes):
        return payload
    return b""


def _text_of(part: Message) -> str:
    data = _decoded(part)
    charset = part.get_content_charset() or "utf-8"
    try:
        return data.decode(charset, errors="replace")
    except (LookupError, ValueError):  # an unknown charset name, or one with a NUL in it
        return data.decode("utf-8", errors="replace")


def _filename(part: Message) -> str:
    try:
        name = _decode_words(part.get_filename() or "")  # RFC 2231, or encoded words
    except Exception:  # malformed RFC 2231 parameters
        return ""
    name = str(name).replace("\\", "/").rsplit("/", 1)[-1]
    return "".join(char for char in name if char.isprintable()).strip()[:200]


def _fallback_name(content_type: str, index: int) -> str:
    suffix = {"application/pdf": ".pdf", "image/jpeg": ".jpg", "image/png": ".png",
              "image/gif": ".gif", "image/tiff": ".tif"}.get(content_type, "")
    return f"attachment-{index}{suffix}"


def _type_from_name(name: str) -> str:
    lowered = name.lower()
    if lowered.endswith(".pdf"):
        return "application/pdf"
    for suffix, kind in ((".jpg", "jpeg"), (".jpeg", "jpeg"), (".png", "png"), (".gif", "gif"),
                         (".tif", "tiff"), (".tiff", "tiff"), (".bmp", "bmp")):
        if lowered.endswith(suffix):
            return f"image/{kind}"
    if lowered.endswith((".htm", ".html")):
        return "text/html"
    return "application/octet-stream"


_RAW_8BIT = re.compile("[\udc80-\udcff]")


def repair_8bit_headers(part: Message) -> None:
    """Raw 8-bit header values (RFC 6532 UTF-8, as swaks, Postfix and many clients send them)
    decoded as UTF-8, or as Windows-1252 where they are not valid UTF-8.

    The parser keeps such bytes as surrogate escapes, and compat32 would turn every one into
    U+FFFD when the header is read ("Müller" → "M��ller"). Replacing the values with real text
    before anything reads them fixes Subject, From names and file names alike.
    """
    raw = list(part.raw_items())
    if not any(_RAW_8BIT.search(value) for _, value in raw if isinstance(value, str)):
        return
    repaired = [(name, decode_8bit(value) if isinstance(value, str) else value)
                for name, value in raw]
    for name in {name for name, _ in repaired}:
        del part[name]
    for name, value in repaired:
        part.set_raw(name, value)


def decode_8bit(value: str) -> str:
    """A header value whose non-ASCII bytes are surrogate escapes → text."""
    if not _RAW_8BIT.search(value):
        return value
    data = value.encode("ascii", "surrogateescape")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        # Windows-1252 leaves five bytes undefined; Latin-1 reads those (never fails).
        return "".join(_cp1252_byte(byte) for byte in data)


def _cp1252_byte(byte: int) -> str:
    try:
        return bytes([byte]).decode("cp1252")
    except UnicodeDecodeError:
        return chr(byte)


def _header(message: Message, name: str) -> str:
    value = message.get(name)
    if value is None:
        return ""
    decoded = _decode_words(str(value))
    # Control characters (NUL, ESC, …) never travel on into our own mails' headers.
    return " ".join("".join(char if char.isprintable() else " " for char in decoded).split())


def _decode_words(value: str) -> str:
    """RFC 2047 encoded words → text; undecodable input is kept as it came."""
    if "=?" not in value:
        return value
    try:
        return str(make_header(decode_header(value)))
    except (LookupError, ValueError, UnicodeError, MessageError):  # MessageError: a charset
        return value  # name that is not ASCII (CharsetError)


def _message_id(value: str) -> str | None:
    value = value.strip()
    if not value:
        return None
    found = re.search(r"<([^<>\s]+)>", value)
    inner = found.group(1) if found else value.split()[0].strip("<>")
    return f"<{inner[:250]}>" if inner else None


def _references(message: Message) -> list[str]:
    references = re.findall(r"<([^<>\s]+)>", _header(message, "References"))
    return [f"<{reference[:250]}>" for reference in references[-20:]]


def _date(value: str) -> datetime | None:
    if not value:
        return None
    try:
        return parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
