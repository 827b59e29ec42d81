"""Office documents to PDF: the corpus converts with the right page counts, content must match
the name, a missing LibreOffice is a clear refusal, a hanging one is killed, limits hold."""

from __future__ import annotations

import io
import json
import os
import shutil
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pypdf
import pytest

from mailfax.documents import office
from mailfax.documents.office import NOT_ENABLED, OfficeLimits, convert_office, is_office
from mailfax.documents.pdf import DocumentError
from tests.fixtures.office import assert_office_pages

needs_libreoffice = pytest.mark.skipif(shutil.which("soffice") is None,
                                       reason="needs LibreOffice (libreoffice-writer-nogui)")


@pytest.fixture(autouse=True)
def own_profiles(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Each test module run gets its own profile folder; limits are restored afterwards."""
    profiles = tmp_path_factory.getbasetemp() / "office-profiles"
    office.configure(OfficeLimits(profile_root=profiles))
    yield
    office.configure(OfficeLimits(profile_root=profiles))


def fake_soffice(tmp_path: Path, body: str) -> str:
    """A stand-in ``soffice``: a shell script; $source is the document, $out its PDF's path."""
    script = tmp_path / "soffice"
    script.write_text("#!/bin/sh\nfor argument; do source=$argument; done\n"
                      'out="${source%.*}.pdf"\n' + body)
    script.chmod(0o755)
    return str(script)


def docx(body: bytes = b"<w:document/>") -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("[Content_Types].xml", "<Types/>")
        archive.writestr("word/document.xml", body)
    return buffer.getvalue()


@pytest.mark.parametrize(("filename", "content_type", "office_file"), [
    ("Angebot.docx", "application/octet-stream", True),
    ("ALT.DOC", "application/octet-stream", True),
    ("tabelle.ods", "", True),
    ("notiz.txt", "text/plain", True),
    ("", "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet", True),
    ("brief", "application/msword", True),
    ("", "text/plain", False),  # the mail's own text
    ("scan.pdf", "application/pdf", False),
    ("makro.docm", "application/octet-stream", False),
])
def test_office_files_are_recognised_by_name_or_type(filename: str, content_type: str,
                                                     office_file: bool) -> None:
    assert is_office(filename, content_type) is office_file


@pytest.mark.parametrize(("filename", "data"), [
    ("Vertrag.docx", b"%PDF-1.7\n..."),
    ("Vertrag.docx", b"PK\x03\x04 not really a zip"),
    ("Alt.doc", docx()),
    ("Liste.xlsx", docx()),  # a Word file named as a workbook
    ("Liste.xls", b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + "WordDocument".encode("utf-16-le")),
    ("Text.odt", docx()),
    ("notiz.txt", b"\x89PNG\r\n\x1a\n\x00\x00"),
])
def test_content_that_does_not_match_the_name_is_refused_as_such(filename: str,
                                                                  data: bytes) -> None:
    with pytest.raises(DocumentError) as refusal:
        convert_office(filename, data)
    assert refusal.value.sentence.startswith(f"{filename} is not ")
    assert refusal.value.status.startswith("5.")


def test_without_libreoffice_office_files_are_not_enabled(tmp_path: Path) -> None:
    office.configure(OfficeLimits(soffice=str(tmp_path / "no-such-soffice")))
    with pytest.raises(DocumentError) as refusal:
        convert_office("Brief.docx", docx())
    assert NOT_ENABLED in refusal.value.sentence
    assert "Brief.docx" in refusal.value.sentence


def test_a_hanging_conversion_is_killed_with_its_children(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    script = fake_soffice(tmp_path, f"sleep 60 &\necho $! >> {pids}\necho $$ >> {pids}\nwait\n")
    office.configure(OfficeLimits(soffice=script, timeout=0.5))
    started = time.monotonic()
    with pytest.raises(DocumentError) as refusal:
        convert_office("Brief.docx", docx())
    assert time.monotonic() - started < 5
    assert "took too long" in refusal.value.sentence
    for pid in pids.read_text().split():
        assert _ends_soon(pid), f"process {pid} survived"


def _ends_soon(pid: str, within: float = 3.0) -> bool:
    """Gone or a zombie within ``within`` s: a SIGKILL takes effect when the process next
    runs, which on a loaded machine is not at once."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not Path(f"/proc/{pid}").exists() or _is_zombie(pid):
            return True
        time.sleep(0.05)
    return False


def _is_zombie(pid: str) -> bool:
    try:
        return " Z " in Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True  # gone meanwhile


def test_a_converter_that_writes_nothing_is_a_clear_refusal(tmp_path: Path) -> None:
    office.configure(OfficeLimits(soffice=fake_soffice(tmp_path, "exit 0\n")))
    with pytest.raises(DocumentError) as refusal:
        convert_office("Brief.docx", docx())
    assert "could not be converted" in refusal.value.sentence


def test_no_more_conversions_run_at_once_than_the_limit(tmp_path: Path, corpus: Path) -> None:
    log = tmp_path / "log"
    body = (f'echo start >> {log}\nsleep 0.3\necho end >> {log}\n'
            f'cp {corpus / "pdf" / "crazyones.pdf"} "$out"\n')
    office.configure(OfficeLimits(soffice=fake_soffice(tmp_path, body), max_concurrent=2))
    results: list[Any] = []
    threads = [threading.Thread(target=lambda: results.append(convert_office("a.txt", b"x")))
               for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [document.pages for document in results] == [1, 1, 1, 1]
    running = peak = 0
    for event in log.read_text().split():
        running += 1 if event == "start" else -1
        peak = max(peak, running)
    assert peak == 2


def test_the_sender_file_name_never_reaches_the_command_line(tmp_path: Path,
                                                             corpus: Path) -> None:
    arguments = tmp_path / "arguments"
    body = f'echo "$@" > {arguments}\ncp {corpus / "pdf" / "crazyones.pdf"} "$out"\n'
    office.configure(OfficeLimits(soffice=fake_soffice(tmp_path, body)))
    document = convert_office("--help; rm -rf ~.txt", "Grüße".encode())
    assert document.filename == "--help; rm -rf ~.pdf"
    assert "rm -rf" not in arguments.read_text()
    assert "--infilter=Text (encoded):UTF8" in arguments.read_text()


@needs_libreoffice
@pytest.mark.every_corpus
@pytest.mark.parametrize("name", ["VIA_Nytt_1402.doc", "par-rendered-page-breaks.docx",
                                  "hdr-header-footer.docx"])
def test_corpus_office_files_convert_with_the_expected_pages(name: str, corpus: Path,
                                                             expected: dict[str, Any]) -> None:
    document = convert_office(name, (corpus / "office" / name).read_bytes())
    want = expected["office"][name]
    assert document.filename == Path(name).with_suffix(".pdf").name
    assert document.data.startswith(b"%PDF")
    assert_office_pages(name, corpus, want, document.pages)
    text = pypdf.PdfReader(io.BytesIO(document.data)).pages[0].extract_text()
    for words in want.get("text", []):  # the stand-in knows its header and footer lines
        assert words in text


@needs_libreoffice
def test_an_odt_that_libreoffice_wrote_converts_with_its_pages(generated_corpus: Path) -> None:
    """Not in the real corpus: an OpenDocument text of three pages."""
    want = json.loads((generated_corpus / "expected.json").read_text())["office"]
    document = convert_office("three-pages.odt",
                              (generated_corpus / "office" / "three-pages.odt").read_bytes())
    assert document.filename == "three-pages.pdf"
    assert document.pages == want["three-pages.odt"]["pages"] == 3


@needs_libreoffice
def test_profiles_keep_macros_switched_off(tmp_path: Path) -> None:
    office.configure(OfficeLimits(profile_root=tmp_path, max_concurrent=1))
    document = convert_office("notiz.txt", "Grüße aus Köln, 5 €".encode("cp1252"))
    assert document.pages == 1
    settings = (tmp_path / "slot-0" / "user" / "registrymodifications.xcu").read_text()
    assert 'oor:name="DisableMacrosExecution" oor:op="fuse"><value>true' in settings
    assert 'oor:name="MacroSecurityLevel" oor:op="fuse"><value>3' in settings
    assert os.stat(tmp_path / "slot-0").st_mode & 0o077 == 0


def test_the_converted_pdf_is_counted_and_an_unreadable_result_refused(corpus: Path) -> None:
    pdf = (corpus / "pdf" / "two-different-pages.pdf").read_bytes()
    assert office._page_count(pdf, "letter.docx") == 2
    with pytest.raises(DocumentError, match=r"letter\.docx was converted, but the result has no"):
        office._page_count(b"%PDF-1.4 nothing here", "letter.docx")
