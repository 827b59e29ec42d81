"""What runs on the event loop: a small mail is parsed there, but its documents (PDF checks,
images, office documents) and password checks are done in worker threads so no SMTP session
stalls, and pikepdf's work (mostly without the GIL) overlaps the loop's."""

from __future__ import annotations

import io
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

import mailfax.intake.assemble as assemble_module
from mailfax.intake.service import INLINE_ASSEMBLY_BYTES
from mailfax.providers.base import FaxDocument
from tests.conftest import Service, fax_mail


def _small_png() -> bytes:
    out = io.BytesIO()
    Image.new("L", (400, 560), 255).save(out, format="PNG")
    return out.getvalue()


def _threads_calling(monkeypatch: pytest.MonkeyPatch, name: str) -> list[threading.Thread]:
    """The threads that call assemble's ``name`` (image_to_pdf, prepare_pdf) from now on."""
    threads: list[threading.Thread] = []
    real: Callable[..., FaxDocument] = getattr(assemble_module, name)

    def spy(filename: str, data: bytes, *setup: object) -> FaxDocument:
        threads.append(threading.current_thread())
        return real(filename, data, *setup)

    monkeypatch.setattr(assemble_module, name, spy)
    return threads


async def test_a_small_mail_with_an_image_is_converted_off_the_loop(
        service: Service, monkeypatch: pytest.MonkeyPatch) -> None:
    loop_thread = threading.current_thread()
    threads = _threads_calling(monkeypatch, "image_to_pdf")
    png = _small_png()
    mail = fax_mail([("scan.png", png, "image/png")])
    assert len(mail.as_bytes()) < INLINE_ASSEMBLY_BYTES  # the inline path, not the big one
    _, reply = await service.send(mail, "alice@example.org", ["030123456@fax.local"])
    assert "queued as" in reply
    assert len(threads) == 1
    assert threads[0] is not loop_thread


async def test_a_small_pdf_is_checked_off_the_loop(service: Service, corpus: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    loop_thread = threading.current_thread()
    threads = _threads_calling(monkeypatch, "prepare_pdf")
    pdf = (corpus / "pdf" / "crazyones.pdf").read_bytes()
    mail = fax_mail([("letter.pdf", pdf, "application/pdf")])
    assert len(mail.as_bytes()) < INLINE_ASSEMBLY_BYTES
    _, reply = await service.send(mail, "alice@example.org", ["030123456@fax.local"])
    assert "queued as" in reply
    assert len(threads) == 1
    assert threads[0] is not loop_thread


def test_needs_worker_does_not_touch_what_the_mail_skipped() -> None:
    mail = assemble_module.read_mail(fax_mail([
        ("scan.png", _small_png(), "image/png"),
        ("data.bin", b"\x00\x01", "application/x-unknown")]).as_bytes())
    assert assemble_module.needs_worker(mail)
    assert mail.skipped == []
    assert len(assemble_module.convert_documents(mail).documents) == 1
    assert len(mail.skipped) == 1
