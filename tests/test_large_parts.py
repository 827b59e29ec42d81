"""A large mail's parts decoded into files, not into memory (documents/mapped.py,
intake/spool.decode_base64_to_file): the same bytes, page counts and refusals as the
in-memory path, and nothing left in the spool folder afterwards."""

from __future__ import annotations

import base64
import contextlib
import errno
import io
import mmap
from collections.abc import Iterator
from pathlib import Path

import aiosmtplib
import pikepdf
import pybase64
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.memory import pdf_mail, random_pdf
from mailfax.documents.mapped import DocumentMap, pieces, sha256_of
from mailfax.intake import spool as spool_module
from mailfax.intake.assemble import Refusal, assemble
from mailfax.intake.mime import parse_mail
from mailfax.intake.spool import DECODE_TO_FILE_ABOVE, decode_base64_to_file
from tests.conftest import Service, fax_mail

MB = 1_000_000


@contextlib.contextmanager
def mapped(raw: bytes, folder: Path) -> Iterator[mmap.mmap]:
    """``raw`` as a large mail reaches the parser: a read-only map of a spool file."""
    file = (folder / "mail").open("w+b")
    file.write(raw)
    file.flush()
    (folder / "mail").unlink()
    with file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as view:
        yield view


@pytest.fixture
def spool(tmp_path: Path) -> Path:
    folder = tmp_path / "spool"
    folder.mkdir()
    return folder


@settings(max_examples=60, deadline=None)
@given(data=st.binary(min_size=1, max_size=6000), line=st.integers(4, 200).map(lambda n: n * 4),
       piece=st.integers(1, 700), crlf=st.booleans())
def test_decoding_in_pieces_gives_the_bytes_decoding_at_once_gives(
        data: bytes, line: int, piece: int, crlf: bool) -> None:
    import tempfile

    encoded = base64.b64encode(data)
    end = b"\r\n" if crlf else b"\n"
    text = b"header\r\n\r\n" + end.join(encoded[i:i + line]
                                        for i in range(0, len(encoded), line)) + end
    start = len(b"header\r\n\r\n")
    with tempfile.TemporaryDirectory() as folder, pytest.MonkeyPatch.context() as patch:
        patch.setattr(spool_module, "DECODE_PIECE_BYTES", piece)  # pieces split lines, quanta
        document = decode_base64_to_file(text, start, len(text), Path(folder))
        try:
            assert document[:] == data == pybase64.b64decode(text[start:])
            assert list(Path(folder).iterdir()) == []  # unlinked from the start
        finally:
            document.close()


def test_a_large_pdf_part_is_read_from_its_file_with_the_same_result(spool: Path) -> None:
    raw = pdf_mail(4 * MB)
    in_memory = assemble(raw)
    with mapped(raw, spool) as view:
        [attachment] = parse_mail(view, spool).attachments
        assert isinstance(attachment.data, DocumentMap)
        assert len(attachment.data) > DECODE_TO_FILE_ABOVE
        content = assemble(view, spool=spool)
        [document] = content.documents
        [expected] = in_memory.documents
        assert isinstance(document.data, DocumentMap)
        assert (document.filename, document.pages) == (expected.filename, expected.pages) \
            == ("scan.pdf", 4)
        assert document.data[:] == expected.data  # a PDF on paper passes byte for byte
        assert sha256_of(document.data) == sha256_of(expected.data)
        assert b"".join(bytes(piece) for piece in pieces(document.data, 65536)) == expected.data
        assert list(spool.iterdir()) == []  # the decoded file has no name


def test_without_a_folder_or_below_the_threshold_a_part_is_decoded_in_memory(
        spool: Path) -> None:
    small = fax_mail([("small.pdf", random_pdf(200_000, pages=1), "application/pdf")])
    with mapped(small.as_bytes(), spool) as view:
        assert isinstance(parse_mail(view, spool).attachments[0].data, bytes)
    with mapped(pdf_mail(4 * MB), spool) as view:
        assert isinstance(parse_mail(view).attachments[0].data, bytes)


def test_a_cut_off_large_pdf_is_refused_with_the_same_sentence(spool: Path) -> None:
    pdf = random_pdf(3 * MB, pages=3)
    raw = fax_mail([("scan.pdf", pdf[: len(pdf) * 2 // 3], "application/pdf")]).as_bytes()
    with pytest.raises(Refusal) as in_memory:
        assemble(raw)
    with mapped(raw, spool) as view, pytest.raises(Refusal) as from_file:
        assemble(view, spool=spool)
    assert (from_file.value.code, from_file.value.sentence) == \
        (in_memory.value.code, in_memory.value.sentence)
    assert "scan.pdf is incomplete" in from_file.value.sentence
    assert list(spool.iterdir()) == []


def test_a_large_pdf_with_an_owner_password_is_rewritten_from_its_file(spool: Path) -> None:
    out = io.BytesIO()
    with pikepdf.open(io.BytesIO(random_pdf(2 * MB, pages=2))) as pdf:
        pdf.save(out, encryption=pikepdf.Encryption(owner="secret", user=""))
    raw = fax_mail([("locked.pdf", out.getvalue(), "application/pdf")]).as_bytes()
    with mapped(raw, spool) as view:
        [document] = assemble(view, spool=spool).documents
        assert isinstance(document.data, bytes)  # saved again, without the encryption
        with pikepdf.open(io.BytesIO(document.data)) as saved:
            assert not saved.is_encrypted and len(saved.pages) == 2


async def test_no_room_for_a_decoded_part_is_temporary_and_the_service_goes_on(
        service: Service, monkeypatch: pytest.MonkeyPatch) -> None:
    from mailfax.intake import mime

    pdf = random_pdf(2 * MB, pages=2)
    mail = fax_mail([("scan.pdf", pdf, "application/pdf")], subject="Large scan")

    def no_room(*args: object) -> DocumentMap:
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(mime, "decode_base64_to_file", no_room)
        with pytest.raises(aiosmtplib.SMTPDataError) as refused:
            await service.send(mail, "alice@example.org", ["030123456@fax.local"])
    assert (refused.value.code, refused.value.message) == (
        452, "4.3.1 Temporary failure: the server's disk is full; please try again later")
    errors, reply = await service.send(mail, "alice@example.org", ["030123456@fax.local"])
    assert errors == {} and reply.startswith("2.0.0 queued as ")
    job = await service.app.store.get_job(reply.split()[-1])
    assert job is not None and job.pages == 2
    [document] = await service.app.store.load_documents(job.mail_id)
    assert document.data == pdf
    await service.wait_for_mail(lambda m: m["X-Mailfax-State"] == "delivered")
    # the decoded files had no name; the page check's hand-over file is gone once checked
    assert list((service.app.settings.data_dir / "spool").iterdir()) == []


@settings(max_examples=80, deadline=None)
@given(hay=st.lists(st.sampled_from([b"x", b"\r\n", b"--b", b"--bb", b"-"]), max_size=400)
       .map(b"".join), window=st.integers(1, 64), bounds=st.tuples(st.integers(0, 600),
                                                                   st.integers(0, 600)))
def test_a_boundary_is_found_in_a_mapped_mail_window_by_window_as_in_one_search(
        hay: bytes, window: int, bounds: tuple[int, int]) -> None:
    import tempfile

    from mailfax.intake import fastmime

    start, end = min(bounds), max(bounds)
    with tempfile.TemporaryFile() as file, pytest.MonkeyPatch.context() as patch:
        file.write(hay + b"\0")  # never empty: an empty file cannot be mapped
        file.flush()
        patch.setattr(fastmime, "CHECK_BYTES", window)
        with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as view:
            end = min(end, len(hay))
            assert fastmime._find(view, b"--b", start, end) == hay.find(b"--b", start, end)
