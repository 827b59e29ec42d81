"""Office documents (.doc, .docx, .odt, .rtf, .xls, .xlsx, .ods, .txt) to fax-ready PDF.

LibreOffice does the work, headless, one process per document (Debian:
``libreoffice-writer-nogui libreoffice-calc-nogui``). Each concurrent conversion has its own
user profile (LibreOffice refuses to share one between processes, and a kept profile makes the
next start faster), macros are switched off in that profile, the process group is killed when
it overruns the time limit, and at most :attr:`OfficeLimits.max_concurrent` run at once.

Before LibreOffice sees a file its content must match its name: a ``.docx`` that is really
something else is refused as such, not handed to a converter that would guess.

Everything here is blocking: the intake calls :func:`convert_office` in a worker thread.
"""

from __future__ import annotations

import contextlib
import io
import os
import queue
import shutil
import signal
import subprocess
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePath

from mailfax.documents.pdf import DocumentError, page_count
from mailfax.providers.base import FaxDocument

NOT_ENABLED = "office files are not enabled on this server"
AS_PDF = "save or export it as a PDF and send that instead"
# Enhanced status codes: a temporary condition (the sender's MTA tries again) and a
# deterministic failure (retrying the same file cannot help).
TEMPORARY, PERMANENT = "4.3.0", "5.6.0"


@dataclass(frozen=True)
class OfficeLimits:
    soffice: str = "soffice"  # a name looked up on PATH, or a path
    timeout: float = 60.0  # seconds per conversion, then the process group is killed
    max_concurrent: int = 2
    # Holds one LibreOffice profile per concurrent slot; empty: a folder in the temp dir.
    profile_root: Path | None = None


_limits = OfficeLimits()
_free_slots: queue.LifoQueue[int] = queue.LifoQueue()


def configure(limits: OfficeLimits) -> None:
    """Set the limits for later conversions (call at startup, before any conversion)."""
    global _limits, _free_slots
    _limits = limits
    _free_slots = queue.LifoQueue()
    for slot in reversed(range(limits.max_concurrent)):
        _free_slots.put(slot)  # LIFO: the warmest profile is reused first


configure(_limits)


@dataclass(frozen=True)
class _Format:
    description: str  # for the refusal: "X.docx is not <description>"
    matches: Callable[[bytes], bool]
    export_filter: str
    import_filter: str | None = None  # None: LibreOffice detects it (the sniffing agreed)


def _is_ole2(data: bytes, stream: str) -> bool:
    """An OLE2 compound file (Word 97, Excel 97) whose directory names ``stream``."""
    return data.startswith(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1") and (
        stream.encode("utf-16-le") in data)


def _zip_names(data: bytes) -> list[str]:
    if not data.startswith(b"PK\x03\x04"):
        return []
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            return archive.namelist()
    except (zipfile.BadZipFile, ValueError):
        return []


def _is_ooxml(data: bytes, folder: str) -> bool:
    names = _zip_names(data)
    return "[Content_Types].xml" in names and any(name.startswith(folder) for name in names)


def _odf_mimetype(data: bytes) -> str:
    """The ``mimetype`` member every ODF package starts with."""
    if "mimetype" not in _zip_names(data):
        return ""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        if archive.getinfo("mimetype").file_size > 200:
            return ""
        return archive.read("mimetype").decode("ascii", "replace").strip()


def _is_rtf(data: bytes) -> bool:
    return data.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"{\\rtf")


def _is_text(data: bytes) -> bool:
    return _decode_text(data) is not None


def _decode_text(data: bytes) -> str | None:
    """Plain text as mail programs attach it: UTF-8, UTF-16 with BOM, or Windows-1252."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError:
            return None
    if b"\x00" in data or data.startswith((b"%PDF", b"PK\x03\x04", b"\xd0\xcf\x11\xe0")):
        return None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("cp1252", errors="replace")


_WRITER, _CALC = "writer_pdf_Export", "calc_pdf_Export"
_WORD_97 = _Format("a Word document", lambda d: _is_ole2(d, "WordDocument") or _is_rtf(d), _WRITER)
_FORMATS: dict[str, _Format] = {
    ".doc": _WORD_97,
    ".docx": _Format("a Word document", lambda d: _is_ooxml(d, "word/"), _WRITER),
    ".odt": _Format("an OpenDocument text",
                    lambda d: _odf_mimetype(d) == "application/vnd.oasis.opendocument.text",
                    _WRITER),
    ".rtf": _Format("a rich-text document", _is_rtf, _WRITER),
    ".xls": _Format("an Excel workbook",
                    lambda d: _is_ole2(d, "Workbook") or _is_ole2(d, "Book"), _CALC),
    ".xlsx": _Format("an Excel workbook", lambda d: _is_ooxml(d, "xl/"), _CALC),
    ".ods": _Format("an OpenDocument spreadsheet",
                    lambda d: _odf_mimetype(d)
                    == "application/vnd.oasis.opendocument.spreadsheet", _CALC),
    ".txt": _Format("a text file", _is_text, _WRITER, import_filter="Text (encoded):UTF8,LF,,,"),
}
_MIME_EXTENSIONS: dict[str, str] = {
    "application/msword": ".doc",
    "application/vnd.openxmlformats-officedocument.wordprocessingml.document": ".docx",
    "application/vnd.oasis.opendocument.text": ".odt",
    "application/rtf": ".rtf",
    "text/rtf": ".rtf",
    "application/vnd.ms-excel": ".xls",
    "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet": ".xlsx",
    "application/vnd.oasis.opendocument.spreadsheet": ".ods",
}


def is_office(filename: str, content_type: str) -> bool:
    """Whether an attachment is an office document, by its name or its declared type.

    ``text/plain`` counts only with a ``.txt`` name: the mail's own text is not a document.
    """
    return _extension(filename) in _FORMATS or content_type.lower() in _MIME_EXTENSIONS


def convert_office(filename: str, data: bytes) -> FaxDocument:
    """Convert one office document to PDF with LibreOffice; blocking (seconds).

    Raises :class:`~mailfax.documents.pdf.DocumentError` with a sentence naming the file and
    saying what to do when the content does not match the name, LibreOffice is not installed,
    the conversion fails (status 5.x.x: sending the same file again cannot help) or overruns
    the time limit or finds every converter busy (4.x.x: temporary).
    """
    extension, office_format = _format_of(filename, data)
    binary = shutil.which(_limits.soffice)
    if binary is None:
        raise DocumentError(f"{filename}: {NOT_ENABLED}; {AS_PDF}.", "5.6.1")
    if extension == ".txt":
        data = (_decode_text(data) or "").encode("utf-8")
    slots = _free_slots  # configure() may swap the queue meanwhile; the slot goes back here
    slot = _take_slot(slots, filename)
    try:
        pdf = _convert(binary, _profile(slot), extension, office_format, data, filename)
    finally:
        slots.put(slot)
    pages = _page_count(pdf, filename)
    return FaxDocument(filename=f"{PurePath(filename).stem or 'document'}.pdf", data=pdf,
                       pages=pages)


def _extension(filename: str) -> str:
    return PurePath(filename.strip()).suffix.lower()


def _format_of(filename: str, data: bytes) -> tuple[str, _Format]:
    """The format the name claims, checked against the content; by content when unnamed."""
    extension = _extension(filename)
    claimed = _FORMATS.get(extension)
    if claimed is not None:
        if not claimed.matches(data):
            raise DocumentError(f"{filename} is not {claimed.description}, although its name "
                                f"says so; {AS_PDF}.", PERMANENT)
        return extension, claimed
    for candidate, office_format in _FORMATS.items():
        if candidate != ".txt" and office_format.matches(data):
            return candidate, office_format
    raise DocumentError(f"{filename} is not an office document that can be faxed; {AS_PDF}.",
                        PERMANENT)


def _take_slot(slots: queue.LifoQueue[int], filename: str) -> int:
    try:
        return slots.get(timeout=_limits.timeout)
    except queue.Empty:
        raise DocumentError(f"{filename}: the server is busy converting other documents; "
                            "this is temporary, please send it again later", "4.3.2") from None


def _profile(slot: int) -> Path:
    """This slot's LibreOffice profile, created with macros off on first use."""
    root = _limits.profile_root or Path(tempfile.gettempdir()) / f"mailfax-office-{os.getuid()}"
    # Absolute whatever the configuration said: LibreOffice takes the profile as a file URI.
    profile = Path(os.path.abspath(root / f"slot-{slot}"))
    settings = profile / "user" / "registrymodifications.xcu"
    if not settings.is_file():
        for folder in (root, profile, settings.parent):  # private: documents pass through
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        settings.write_text(_LOCKED_DOWN_SETTINGS, encoding="utf-8")
    return profile


def _convert(binary: str, profile: Path, extension: str, office_format: _Format, data: bytes,
             filename: str) -> bytes:
    with tempfile.TemporaryDirectory(prefix="mailfax-office-") as work:
        source = Path(work) / f"document{extension}"  # never the sender's file name
        source.write_bytes(data)
        command = [binary, f"-env:UserInstallation={profile.as_uri()}", "--headless",
                   "--invisible", "--norestore", "--nolockcheck", "--nodefault", "--nologo"]
        if office_format.import_filter:
            command.append(f"--infilter={office_format.import_filter}")
        command += ["--convert-to", f"pdf:{office_format.export_filter}", "--outdir", work,
                    str(source)]
        if not _run_killing_on_timeout(command, cwd=work, timeout=_limits.timeout):
            raise DocumentError(f"{filename} took too long to convert (more than "
                                f"{_limits.timeout:.0f} s) and was given up; this may be "
                                "temporary, the mail is tried again later. If it keeps "
                                f"happening, {AS_PDF}.", TEMPORARY)
        result = source.with_suffix(".pdf")
        if not result.is_file() or result.stat().st_size == 0:
            raise DocumentError(f"{filename} could not be converted to fax pages (damaged or "
                                f"password-protected?); {AS_PDF}.", PERMANENT)
        return result.read_bytes()


def _run_killing_on_timeout(command: list[str], *, cwd: str, timeout: float) -> bool:
    """Run ``command`` in its own process group; False if it had to be killed.

    The group is killed in any case at the end, so no LibreOffice helper outlives the call.
    """
    with subprocess.Popen(command, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, start_new_session=True) as process:
        try:
            process.wait(timeout=timeout)
            finished = True
        except subprocess.TimeoutExpired:
            finished = False
        _kill_group(process.pid)
        process.wait()
    return finished


def _kill_group(group: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # the whole group had already ended
        os.killpg(group, signal.SIGKILL)


def _page_count(pdf: bytes, filename: str) -> int:
    pages = page_count(pdf)
    if pages == 0:
        raise DocumentError(f"{filename} was converted, but the result has no pages; {AS_PDF}.",
                            PERMANENT)
    return pages


# Macros never run (level 3 = "very high", and execution disabled outright); links to other
# files and the network are never updated while loading.
_LOCKED_DOWN_SETTINGS = """<?xml version="1.0" encoding="UTF-8"?>
<oor:items xmlns:oor="http://openoffice.org/2001/registry"
 xmlns:xs="http://www.w3.org/2001/XMLSchema" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
<item oor:path="/org.openoffice.Office.Common/Security/Scripting"><prop oor:name="MacroSecurityLevel" oor:op="fuse"><value>3</value></prop></item>
<item oor:path="/org.openoffice.Office.Common/Security/Scripting"><prop oor:name="DisableMacrosExecution" oor:op="fuse"><value>true</value></prop></item>
<item oor:path="/org.openoffice.Office.Common/Security/Scripting"><prop oor:name="BlockUntrustedRefererLinks" oor:op="fuse"><value>true</value></prop></item>
<item oor:path="/org.openoffice.Office.Writer/Content/Update"><prop oor:name="Link" oor:op="fuse"><value>2</value></prop></item>
<item oor:path="/org.openoffice.Office.Calc/Content/Update"><prop oor:name="Link" oor:op="fuse"><value>2</value></prop></item>
</oor:items>
"""  # noqa: E501
