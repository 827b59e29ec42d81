"""The fast MIME scan (mailfax/intake/fastmime.py) against the email package: the same message
tree, the same documents, names and refusals for every corpus mail, every hostile mail, and
random mails the email package writes (and those cut off or damaged at random places)."""

from __future__ import annotations

import email.policy
import mmap
from email.message import EmailMessage, Message
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailfax.intake.assemble import Refusal, convert_documents, document_kind, needs_worker
from mailfax.intake.fastmime import scan
from mailfax.intake.mime import (
    MailFormatError,
    package_message,
    parse_mail,
    read_message,
    select_documents,
)
from tests.test_hostile import GENERATORS, HOSTILE

PDF = b"%PDF-1.4\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj\n" \
      b"2 0 obj<</Type/Pages/Kids[3 0 R]/Count 1>>endobj\n" \
      b"3 0 obj<</Type/Page/Parent 2 0 R/MediaBox[0 0 595 842]>>endobj\n" \
      b"trailer<</Root 1 0 R>>\n%%EOF\n"


def tree(message: Message) -> Any:
    """Everything of a message tree that a reader can see: unix-from, raw headers, the
    children or the decoded payload."""
    children = message.get_payload() if message.is_multipart() else None
    if isinstance(children, list):
        body: Any = [tree(child) for child in children]
    else:
        body = message.get_payload(decode=True)
    return message.get_unixfrom(), list(message.raw_items()), body


def outcome(read: Any) -> Any:
    """What intake makes of a mail: the parsed mail and its documents, or the refusal."""
    try:
        mail = read()
    except MailFormatError as error:
        return "refused to parse", str(error)
    try:
        documents = convert_documents(mail).documents
    except Refusal as error:
        return mail, error.reply()
    # The bytes of a converted office document hold the time of conversion; the parsed
    # mail (compared whole) holds every attachment's bytes.
    return mail, [(document.filename, document.pages) for document in documents]


def selection(read: Any) -> Any:
    """The parsed mail, the documents chosen from it (name, how converted) and the sentences
    about what is left out, or the refusal: :func:`outcome` without running the converters
    (LibreOffice takes seconds a file; the converters get the same bytes either way)."""
    try:
        mail = read()
    except MailFormatError as error:
        return "refused to parse", str(error)
    chosen = [(attachment.filename, document_kind(attachment))
              for attachment in select_documents(mail)]
    return mail, chosen, needs_worker(mail)


def assert_same(raw: bytes, convert: bool = True) -> bool:
    """Both paths agree on ``raw``; whether the fast scan read it (True) or left it (False)."""
    scanned = scan(raw)
    if scanned is None:
        return False
    assert tree(scanned) == tree(package_message(raw))
    compare = outcome if convert else selection
    assert compare(lambda: read_message(scan(raw))) == \
        compare(lambda: read_message(package_message(raw)))
    return True


def corpus_mails(corpus: Path) -> list[Path]:
    return sorted((corpus / "mime").glob("*.eml"))


# Shapes mail clients send every day: the scan must read these itself (SMTP data ends in CRLF).
COMMON = ["mutt-pdf-umlaut-name.eml", "mutt-two-pdfs-two-recipients.eml", "s-nail-pdf.eml",
          "swaks-octet-stream-pdf.eml", "attachment_pdf.eml", "attachment_message_rfc822.eml",
          "attachment_with_quoted_filename.eml", "email_with_similar_boundaries.eml",
          "swaks-outlook-winmail-dat-jpeg.eml"]


@pytest.mark.every_corpus
def test_corpus_mails_read_alike(corpus: Path) -> None:
    mails = corpus_mails(corpus)
    assert len(mails) >= 10
    fast = set()
    for path in mails:
        raw = path.read_bytes()
        if not raw.endswith(b"\r\n") and raw.count(b"\r\n"):
            raw = raw.rstrip(b"\r") + b"\r\n"  # as DATA ends on the wire
        if assert_same(raw):
            fast.add(path.name)
        assert outcome(lambda raw=raw: parse_mail(raw)) == \
            outcome(lambda raw=raw: read_message(package_message(raw)))
    assert fast >= {name for name in COMMON if (corpus / "mime" / name).exists()}


def hostile_mails() -> list[tuple[str, bytes]]:
    files = [(path.name, path.read_bytes()) for path in sorted(HOSTILE.glob("*.eml"))]
    built = [(name, make()) for name, make in GENERATORS.items() if name != "oversized"]
    return files + built


@pytest.mark.parametrize(("name", "raw"), hostile_mails(), ids=lambda value: str(value)[:40])
def test_hostile_mails_read_alike(name: str, raw: bytes) -> None:
    assert outcome(lambda: parse_mail(raw)) == outcome(lambda: read_message(package_message(raw)))
    assert_same(raw)


def test_hostile_shapes_the_scan_leaves_to_the_email_package() -> None:
    for name in ("multipart_no_boundary.eml", "headers_only.eml", "nesting_100.eml",
                 "rfc822_loop_40.eml"):
        assert scan((HOSTILE / name).read_bytes()) is None, name
    assert scan(GENERATORS["mime_parts_10000"]()) is None
    assert scan(GENERATORS["nesting_5000"]()) is None


def test_a_memoryview_is_read_without_a_copy_of_the_mail() -> None:
    mail = EmailMessage()
    mail["Subject"] = "view"
    mail.set_content("text")
    mail.add_attachment(PDF, maintype="application", subtype="pdf", filename="a.pdf")
    raw = mail.as_bytes(policy=email.policy.SMTP)
    scanned = scan(memoryview(raw))
    assert scanned is not None
    assert tree(scanned) == tree(package_message(raw))
    assert parse_mail(memoryview(raw)) == parse_mail(raw)
    assert parse_mail(memoryview(raw)).attachments[0].data == PDF


@pytest.mark.every_corpus
def test_a_mapped_spool_file_reads_as_its_bytes(corpus: Path, tmp_path: Path) -> None:
    """A large mail reaches the parser as an mmap of its spool file, read in place: every
    corpus and hostile mail gives the same tree and the same parsed mail from a mapping."""
    mails = [path.read_bytes() for path in corpus_mails(corpus)]
    mails += [raw for _, raw in hostile_mails()]
    for number, raw in enumerate(mails):
        if not raw:
            continue
        path = tmp_path / f"{number}.eml"
        path.write_bytes(raw)
        with path.open("rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) \
                as mapped:
            scanned, from_bytes = scan(mapped), scan(raw)
            assert (scanned is None) == (from_bytes is None), number
            if scanned is not None and from_bytes is not None:
                assert tree(scanned) == tree(from_bytes), number
            assert outcome(lambda mapped=mapped: parse_mail(mapped)) == \
                outcome(lambda raw=raw: parse_mail(raw)), number
            del scanned  # its parts point into the mapping, which closes now


def test_an_encoded_word_with_a_charset_name_that_is_not_ascii_is_kept_as_it_came() -> None:
    # Found by the damaged random mails: the email package raises CharsetError for it.
    raw = "From: a@example.org\r\nSubject: =?utf-8\u00e4?q?abc?=\r\n\r\nhello\r\n".encode()
    assert parse_mail(raw).subject == "=?utf-8\u00e4?q?abc?="
    assert_same(raw)


def test_a_boundary_with_an_8bit_byte_is_left_to_the_email_package() -> None:
    # Found by the damaged random mails: the parser reads the byte as U+FFFD.
    raw = (b"Content-Type: multipart/mixed; boundary=\"=_\xff0\"\r\n\r\n--=_\xff0\r\n"
           b"Content-Type: text/plain\r\n\r\nhello\r\n--=_\xff0--\r\n")
    assert scan(raw) is None
    assert parse_mail(raw) == read_message(package_message(raw))


def test_a_charset_name_with_a_nul_reads_the_text_as_utf8() -> None:
    # Found by the damaged random mails: bytes.decode raises ValueError for it.
    raw = b"Content-Type: text/plain; charset=\"ut\x00f-8\"\r\nSubject: s\r\n\r\nh\xc3\xa9\r\n"
    assert parse_mail(raw).text == "h\u00e9"
    assert_same(raw)


# --- random mails, written by the email package --------------------------------------------

NAMES = st.one_of(st.sampled_from(["letter.pdf", "Brief an Müller.pdf", "scan 1.PDF", "a;b.pdf",
                                   'quote".pdf', "x" * 90 + ".pdf", "", "photo.jpg",
                                   "Überweisung €.png", "winmail.dat", "notes.txt"]),
                  st.text(st.characters(exclude_categories=("Cc", "Cs")), min_size=1,
                          max_size=30))
TEXTS = st.text(max_size=200)
CHARSETS = st.sampled_from(["utf-8", "iso-8859-1", "us-ascii"])
TYPES = st.sampled_from([("application", "pdf"), ("application", "octet-stream"),
                         ("image", "png"), ("image", "jpeg"), ("text", "plain"),
                         ("application", "zip")])
ENCODINGS = st.sampled_from([None, "base64", "quoted-printable", "7bit", "8bit"])


@st.composite
def leaf(draw: st.DrawFn) -> EmailMessage:
    part = EmailMessage()
    kind = draw(st.sampled_from(["text", "html", "file"]))
    if kind == "text":
        charset = draw(CHARSETS)
        text = draw(TEXTS)
        try:
            text.encode(charset)
        except UnicodeEncodeError:
            charset = "utf-8"
        part.set_content(text, charset=charset, cte=draw(st.sampled_from(
            [None, "quoted-printable", "base64", "8bit"])))
    elif kind == "html":
        part.set_content(f'<p>{draw(TEXTS)}</p><img src="cid:logo{draw(st.integers(0, 3))}">',
                         subtype="html")
    else:
        maintype, subtype = draw(TYPES)
        data = draw(st.one_of(st.just(PDF), st.binary(max_size=300)))
        name = draw(NAMES)
        cte = draw(st.sampled_from(["base64", "quoted-printable"]))
        part.set_content(data, maintype=maintype, subtype=subtype, cte=cte,
                         disposition=draw(st.sampled_from(["attachment", "inline"])),
                         filename=name or None)
        if draw(st.booleans()):
            part["Content-ID"] = f"<logo{draw(st.integers(0, 3))}>"
    return part


def mails(depth: int = 0) -> st.SearchStrategy[EmailMessage]:
    if depth >= 3:
        return leaf()
    return st.one_of(leaf(), multipart(depth), forward(depth))


@st.composite
def multipart(draw: st.DrawFn, depth: int) -> EmailMessage:
    message = EmailMessage()
    subtype = draw(st.sampled_from(["mixed", "alternative", "related"]))
    message["Content-Type"] = f"multipart/{subtype}"
    # Drawn, not the email package's random boundary: a failure must replay.
    message.set_boundary(f"=_{draw(st.integers(0, 10**9))}_{depth}")
    for child in draw(st.lists(mails(depth + 1), min_size=1, max_size=4)):
        message.attach(child)
    if draw(st.booleans()):
        message.preamble = draw(st.sampled_from(["This is a multi-part message.", "", "--"]))
    if draw(st.booleans()):
        message.epilogue = draw(st.sampled_from(["", "epilogue", "\n"]))
    return message


@st.composite
def forward(draw: st.DrawFn, depth: int) -> EmailMessage:
    inner = draw(mails(depth + 1))
    inner["Subject"] = draw(TEXTS.map(lambda text: " ".join(text.split()) or "fwd"))
    inner["From"] = "Bob <bob@example.org>"
    message = EmailMessage()
    message.set_content(inner)
    return message


@st.composite
def whole_mails(draw: st.DrawFn) -> bytes:
    message = draw(mails())
    message["From"] = draw(st.sampled_from(["alice@example.org", "Jörg <j@example.org>",
                                            '"Doe, Jane" <jane@example.org>']))
    message["Subject"] = " ".join(draw(TEXTS).split()) or "s"
    message["Message-ID"] = "<m1@example.org>"
    message["Date"] = "Tue, 01 Dec 2026 12:00:00 +0100"
    policy = draw(st.sampled_from([email.policy.SMTP, email.policy.default,
                                   email.policy.SMTPUTF8]))
    return message.as_bytes(policy=policy)


RANDOM = settings(max_examples=200, deadline=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@RANDOM
@given(whole_mails())
def test_random_mails_read_alike(raw: bytes) -> None:
    assert assert_same(raw, convert=False), \
        "the scan left a mail of a common shape to the email package"


@RANDOM
@given(whole_mails(), st.data())
def test_damaged_random_mails_read_alike(raw: bytes, data: st.DataObject) -> None:
    """Cut off, or with a line dropped or doubled, or a stray byte: the scan either reads the
    mail as the email package does or leaves it to it."""
    lines = raw.splitlines(keepends=True)
    where = data.draw(st.integers(0, max(0, len(lines) - 1)))
    damage = data.draw(st.sampled_from(["cut", "drop", "double", "byte", "cut line",
                                        "cr ending", "cr before"]))
    if damage == "cut":
        raw = b"".join(lines[:where])
    elif damage == "drop":
        raw = b"".join(lines[:where] + lines[where + 1:])
    elif damage == "double":
        raw = b"".join(lines[:where + 1] + lines[where:])
    elif damage == "cr ending":  # a line ended by a bare CR (a line of its own for the parser)
        lines[where] = lines[where].rstrip(b"\r\n") + b"\r"
        raw = b"".join(lines)
    elif damage == "cr before":
        lines[where] = b"\r" + lines[where]
        raw = b"".join(lines)
    elif damage == "cut line":
        raw = b"".join(lines[:where]) + lines[where][:data.draw(st.integers(0, 80))]
    else:
        position = data.draw(st.integers(0, len(raw)))
        raw = raw[:position] + data.draw(st.sampled_from(
            [b"\r", b"\n", b" ", b"-", b"=", b"\x00", b"\xff", b"\t"])) + raw[position:]
    assert_same(raw, convert=False)
    assert selection(lambda: parse_mail(raw)) == \
        selection(lambda: read_message(package_message(raw)))
