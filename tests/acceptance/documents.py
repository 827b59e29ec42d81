"""The documents a user mails, made here (Pillow, ReportLab, LibreOffice, Python's email
package), so the acceptance suite needs no corpus. Each has a known page count."""

from __future__ import annotations

import io
import shutil
import struct
import subprocess
import zipfile
from email.message import EmailMessage
from pathlib import Path

from PIL import Image, ImageDraw
from reportlab.lib.pagesizes import A4
from reportlab.pdfgen.canvas import Canvas


def pdf(pages: int = 2, title: str = "Letter") -> bytes:
    out = io.BytesIO()
    canvas = Canvas(out, pagesize=A4)
    for number in range(1, pages + 1):
        canvas.setFont("Helvetica", 28)
        canvas.drawString(72, 760, f"{title}, page {number} of {pages}")
        canvas.rect(72, 300, 400, 300)
        canvas.showPage()
    canvas.save()
    return out.getvalue()


def picture(format: str, size: tuple[int, int] = (1200, 900)) -> bytes:
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle((100, 100, size[0] - 100, size[1] - 100), outline="black", width=12)
    draw.line((100, 100, size[0] - 100, size[1] - 100), fill="black", width=12)
    out = io.BytesIO()
    image.save(out, format=format, dpi=(150, 150))
    return out.getvalue()


def tiff(pages: int = 2) -> bytes:
    """A fax-like multi-page TIFF: bilevel G4, 204 × 196 dpi."""
    frames = []
    for number in range(pages):
        page = Image.new("1", (1728, 2292), 1)
        draw = ImageDraw.Draw(page)
        draw.rectangle((200, 200 + number * 100, 1500, 1200), outline=0, width=8)
        frames.append(page)
    out = io.BytesIO()
    frames[0].save(out, format="TIFF", save_all=True, append_images=frames[1:],
                   compression="group4", dpi=(204, 196))
    return out.getvalue()


ODT_MANIFEST = """<?xml version="1.0" encoding="UTF-8"?>
<manifest:manifest xmlns:manifest="urn:oasis:names:tc:opendocument:xmlns:manifest:1.0"
 manifest:version="1.2">
 <manifest:file-entry manifest:full-path="/"
  manifest:media-type="application/vnd.oasis.opendocument.text"/>
 <manifest:file-entry manifest:full-path="content.xml" manifest:media-type="text/xml"/>
</manifest:manifest>"""

ODT_CONTENT = """<?xml version="1.0" encoding="UTF-8"?>
<office:document-content xmlns:office="urn:oasis:names:tc:opendocument:xmlns:office:1.0"
 xmlns:style="urn:oasis:names:tc:opendocument:xmlns:style:1.0"
 xmlns:text="urn:oasis:names:tc:opendocument:xmlns:text:1.0"
 xmlns:fo="urn:oasis:names:tc:opendocument:xmlns:xsl-fo-compatible:1.0" office:version="1.2">
 <office:automatic-styles>
  <style:style style:name="Break" style:family="paragraph">
   <style:paragraph-properties fo:break-before="page"/>
  </style:style>
 </office:automatic-styles>
 <office:body><office:text>
  <text:p>An office letter, page one.</text:p>
  <text:p text:style-name="Break">Page two.</text:p>
 </office:text></office:body>
</office:document-content>"""


def odt() -> bytes:
    """A two-page OpenDocument text (a paragraph with a page break before it)."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        archive.writestr(zipfile.ZipInfo("mimetype"), "application/vnd.oasis.opendocument.text")
        archive.writestr("META-INF/manifest.xml", ODT_MANIFEST, zipfile.ZIP_DEFLATED)
        archive.writestr("content.xml", ODT_CONTENT, zipfile.ZIP_DEFLATED)
    return out.getvalue()


def office_conversions(folder: Path, kinds: tuple[str, ...] = ("docx", "doc")
                       ) -> dict[str, bytes]:
    """The two-page .odt and its conversions by LibreOffice (a profile of its own)."""
    soffice = shutil.which("soffice")
    assert soffice is not None
    source = folder / "letter.odt"
    source.write_bytes(odt())
    made = {"odt": source.read_bytes()}
    profile = (folder / "profile").as_uri()
    for kind in kinds:
        filters = {"doc": "doc:MS Word 97", "docx": "docx:MS Word 2007 XML"}
        subprocess.run([soffice, f"-env:UserInstallation={profile}", "--headless",
                        "--convert-to", filters[kind], "--outdir", str(folder), str(source)],
                       check=True, capture_output=True, timeout=180)
        made[kind] = (folder / f"letter.{kind}").read_bytes()
    return made


# -- Outlook's winmail.dat (TNEF), as MS-OXTNEF lays it out ------------------------------------

TNEF_SIGNATURE = 0x223E9F78
LEVEL_MESSAGE, LEVEL_ATTACHMENT = 1, 2
ATT_TNEF_VERSION = 0x00089006
ATT_OEM_CODEPAGE = 0x00069007
ATT_MESSAGE_CLASS = 0x00078008
ATT_ATTACH_REND_DATA = 0x00069002
ATT_ATTACH_TITLE = 0x00018010
ATT_ATTACH_DATA = 0x0006800F


def _tnef_attribute(level: int, attribute: int, data: bytes) -> bytes:
    checksum = sum(data) & 0xFFFF
    return (struct.pack("<BII", level, attribute, len(data)) + data
            + struct.pack("<H", checksum))


def winmail_dat(attachments: dict[str, bytes]) -> bytes:
    """A TNEF stream holding these files, as Outlook sends them in winmail.dat."""
    out = struct.pack("<IH", TNEF_SIGNATURE, 0x0001)
    out += _tnef_attribute(LEVEL_MESSAGE, ATT_TNEF_VERSION, struct.pack("<I", 0x00010000))
    out += _tnef_attribute(LEVEL_MESSAGE, ATT_OEM_CODEPAGE, struct.pack("<II", 1252, 0))
    out += _tnef_attribute(LEVEL_MESSAGE, ATT_MESSAGE_CLASS, b"IPM.Microsoft Mail.Note\x00")
    for name, data in attachments.items():
        render = struct.pack("<HIIHHI", 1, 0xFFFFFFFF, 0, 0, 0, 0)  # attachment by value
        out += _tnef_attribute(LEVEL_ATTACHMENT, ATT_ATTACH_REND_DATA, render)
        out += _tnef_attribute(LEVEL_ATTACHMENT, ATT_ATTACH_TITLE, name.encode() + b"\x00")
        out += _tnef_attribute(LEVEL_ATTACHMENT, ATT_ATTACH_DATA, data)
    return out


# -- mails --------------------------------------------------------------------------------------

def mail(to: str, subject: str, text: str = "Please fax this.",
         attachments: tuple[tuple[str, str, bytes], ...] = ()) -> EmailMessage:
    """A mail as a mail client writes it; attachments are (filename, MIME type, data)."""
    message = EmailMessage()
    message["From"] = "Alice <alice@example.org>"
    message["To"] = to
    message["Subject"] = subject
    message.set_content(text)
    for filename, content_type, data in attachments:
        maintype, subtype = content_type.split("/")
        message.add_attachment(data, maintype=maintype, subtype=subtype, filename=filename)
    return message


def forwarded(to: str, inner: EmailMessage) -> EmailMessage:
    """A mail that forwards ``inner`` as an attachment (message/rfc822)."""
    message = mail(to, "Fwd: " + str(inner["Subject"]), "See the forwarded mail.")
    message.add_attachment(inner)
    return message
