"""Searchable received faxes: an invisible text layer from OCRmyPDF and Tesseract.

Optional and never in the way: when OCR is not installed, fails or overruns its time, the fax
is mailed as it was, with a note saying so (Debian: ``ocrmypdf tesseract-ocr-deu
tesseract-ocr-eng``). OCRmyPDF runs as a subprocess in its own process group, so a timeout
kills it and every Tesseract it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

OCRMYPDF = "ocrmypdf"


@dataclass(frozen=True)
class OcrResult:
    pdf: bytes  # with the text layer, or the original when OCR did not work
    text: str  # the recognised text, pages separated by form feeds; "" without OCR
    note: str = ""  # for the mail when OCR did not work; "" when it did
    problem: str = ""  # the same as a code: "", "not_installed", "timeout", "failed"
    # Page 1's lines in visual order (top to bottom, left to right), from the word positions
    # in the text layer; empty when those could not be read (then ``text``'s order is used).
    page_one_lines: tuple[str, ...] = ()

    def first_lines(self, count: int = 5) -> list[str]:
        """What the mail quotes: the top of page 1 as it looks, not Tesseract's reading order
        (which on a columned or sparse page starts with fragments of a column)."""
        return list(self.page_one_lines[:count]) or first_lines(self.text, count)

    @property
    def searchable(self) -> bool:
        return not self.problem


def ocr_available(languages: str = "deu+eng") -> bool:
    """Whether OCRmyPDF and Tesseract with all ``languages`` are installed.

    Blocking (runs ``tesseract --list-langs`` once, then cached): call it at startup.
    """
    return _installed_languages() >= set(languages.split("+"))


@functools.cache
def _installed_languages() -> frozenset[str]:
    if shutil.which(OCRMYPDF) is None or shutil.which("tesseract") is None:
        return frozenset()
    try:
        listing = subprocess.run(["tesseract", "--list-langs"], capture_output=True, text=True,
                                 timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return frozenset()
    return frozenset(line.strip() for line in listing.splitlines()[1:] if line.strip())


async def add_text_layer(pdf: bytes, *, languages: str = "deu+eng",
                         timeout_per_page: float = 20, pages: int) -> OcrResult:
    """``pdf`` with an invisible text layer; the original and a note when that fails.

    The whole run may take ``timeout_per_page`` seconds per page; Tesseract gets the same
    per page. Never raises for OCR problems.
    """
    if shutil.which(OCRMYPDF) is None:
        return _unchanged(pdf, "not_installed")
    work = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="mailfax-ocr-"))
    try:
        source, target, sidecar = work / "fax.pdf", work / "searchable.pdf", work / "text.txt"
        await asyncio.to_thread(source.write_bytes, pdf)
        command = [OCRMYPDF, "--quiet", "--language", languages, "--output-type", "pdf",
                   "--optimize", "0", "--skip-text", "--tesseract-timeout",
                   str(timeout_per_page), "--sidecar", str(sidecar), str(source), str(target)]
        outcome = await _run(command, time_limit=timeout_per_page * max(pages, 1))
        if outcome:
            return _unchanged(pdf, outcome)
        return OcrResult(pdf=await asyncio.to_thread(target.read_bytes),
                         text=await asyncio.to_thread(sidecar.read_text, "utf-8", "replace"),
                         page_one_lines=tuple(await _page_one_lines(target)))
    finally:
        await asyncio.to_thread(shutil.rmtree, work, True)


async def _run(command: list[str], *, time_limit: float) -> str:
    """Run OCRmyPDF; "" on success, else the problem code. Kills its group on timeout."""
    process = await asyncio.create_subprocess_exec(
        *command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        start_new_session=True, env=_tesseract_environment())
    try:
        async with asyncio.timeout(time_limit):
            _, stderr = await process.communicate()
    except TimeoutError:
        log.warning("OCR gave up after %.1f s", time_limit)
        return "timeout"
    finally:
        with contextlib.suppress(ProcessLookupError):  # Tesseract children included
            os.killpg(process.pid, signal.SIGKILL)
        await process.wait()
    if process.returncode != 0:
        last_line = stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or [""]
        log.warning("OCR failed (exit %s): %s", process.returncode, last_line[0])
        return "failed"
    return ""


async def _page_one_lines(searchable: Path) -> list[str]:
    """Page 1's text layer in visual order, from ``pdftotext -bbox-layout`` (poppler-utils):
    the word boxes Tesseract reported, as OCRmyPDF placed them. [] when that is not there."""
    if shutil.which("pdftotext") is None:
        return []
    process = await asyncio.create_subprocess_exec(
        "pdftotext", "-bbox-layout", "-f", "1", "-l", "1", str(searchable), "-",
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        async with asyncio.timeout(30):
            output, _ = await process.communicate()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
        return []
    return visual_lines(output) if process.returncode == 0 else []


@dataclass(frozen=True)
class _Word:
    top: float
    bottom: float
    left: float
    text: str


def visual_lines(bbox_xhtml: bytes) -> list[str]:
    """Words with boxes (pdftotext's ``-bbox-layout`` XHTML) → lines as a reader sees them.

    Pure. A word belongs to the current line while its vertical middle lies within the
    line's extent; each line reads left to right. Columns side by side thus share lines, so
    the first lines are the page's top, whatever order Tesseract read the blocks in.
    """
    from lxml import etree

    try:
        root = etree.fromstring(bbox_xhtml, etree.XMLParser(resolve_entities=False,
                                                             no_network=True))
    except etree.XMLSyntaxError:
        return []
    words = sorted((_word(element) for element in root.iter("{*}word")
                    if (element.text or "").strip()), key=lambda word: (word.top, word.left))
    lines: list[list[_Word]] = []
    for word in words:
        middle = (word.top + word.bottom) / 2
        current = lines[-1] if lines else None
        if current and min(w.top for w in current) <= middle <= max(w.bottom for w in current):
            current.append(word)
        else:
            lines.append([word])
    return [" ".join(word.text for word in sorted(line, key=lambda word: word.left))
            for line in lines]


def _word(element: Any) -> _Word:
    return _Word(top=float(element.get("yMin", 0)), bottom=float(element.get("yMax", 0)),
                 left=float(element.get("xMin", 0)), text=str(element.text).strip())


def _tesseract_environment() -> dict[str, str]:
    """One OpenMP thread per Tesseract unless the operator says otherwise.

    Tesseract's OpenMP threads spin while they wait; on a busy 2-core machine one fax page
    then took 33 s of CPU and 86 s in all instead of 3.3 s and 9 s (measured with
    ``ocrmypdf`` on the corpus's fax2d.tif, load average 6). OCRmyPDF's own page workers
    still run pages in parallel.
    """
    return {**os.environ, "OMP_THREAD_LIMIT": os.environ.get("OMP_THREAD_LIMIT", "1")}


_NOTES = {
    "not_installed": "Text recognition is not installed on this server; the fax is attached "
                     "as an image only.",
    "timeout": "Text recognition took too long and was stopped; the fax is attached as an "
               "image only.",
    "failed": "Text recognition failed; the fax is attached as an image only.",
}


def _unchanged(pdf: bytes, problem: str) -> OcrResult:
    return OcrResult(pdf=pdf, text="", note=_NOTES[problem], problem=problem)


def first_lines(text: str, count: int = 5) -> list[str]:
    """The first non-blank lines of page 1, for the mail body ("what is this fax about")."""
    page_one = text.split("\f", 1)[0]
    return [line.strip() for line in page_one.splitlines() if line.strip()][:count]
