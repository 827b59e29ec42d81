"""The transmission report (Sendebericht) on the delivered mail, and partial sends.

Mail in over SMTP, fax out through an emulator, status mail read back from the Maildir as
the sender reads it: the report PDF's page image checked with ``pdfimages -list`` (poppler)
and pikepdf, its fields read with pypdf.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import io
import mailbox
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pikepdf
import pypdf
import pytest
from PIL import Image, ImageChops

from mailfax import reasons
from mailfax.app import Application
from mailfax.config import Settings
from mailfax.documents.faxrender import FINE, STANDARD, black_fraction, render_as_faxed
from mailfax.documents.report import ReportFacts, build_report, render_page_one
from mailfax.emulators import faxde as faxde_emulator
from mailfax.emulators import faxnummer as faxnummer_emulator
from mailfax.model import JobState
from mailfax.outbound.report_mail import wants_document
from mailfax.outbound.tracking import transition_for
from mailfax.providers.base import StatusReport
from mailfax.store.base import Job
from tests.conftest import Service, fax_mail, make_settings


def _parsed(message: mailbox.MaildirMessage) -> email.message.EmailMessage:
    parsed = email.message_from_bytes(bytes(message), policy=email.policy.default)
    assert isinstance(parsed, email.message.EmailMessage)
    return parsed


def _attachments(message: email.message.EmailMessage) -> dict[str, bytes]:
    found: dict[str, bytes] = {}
    for part in message.iter_attachments():
        name = part.get_filename()
        assert name is not None
        payload = part.get_payload(decode=True)
        assert isinstance(payload, bytes)
        found[name] = payload
    return found


def _pdfimages(pdf: bytes, tmp_path: Path) -> list[dict[str, str]]:
    """``pdfimages -list`` of ``pdf``, one dict per image (its column headings as keys)."""
    path = tmp_path / "report.pdf"
    path.write_bytes(pdf)
    output = subprocess.run(["pdfimages", "-list", str(path)], check=True,
                            capture_output=True, text=True).stdout.splitlines()
    headings = output[0].split()
    return [dict(zip(headings, line.split(), strict=False)) for line in output[2:]]


def _report_text(pdf: bytes) -> str:
    reader = pypdf.PdfReader(io.BytesIO(pdf))
    assert len(reader.pages) == 1
    return " ".join(reader.pages[0].extract_text().split())


@asynccontextmanager
async def _running(settings: Settings) -> AsyncIterator[Service]:
    app = Application(settings)
    await app.start()
    try:
        yield Service(app)
    finally:
        await app.stop()


@pytest.fixture
async def berlin_service(tmp_path: Path) -> AsyncIterator[Service]:
    async with _running(make_settings(tmp_path, notify={
            "from_address": "fax@mailfax.test", "timezone": "Europe/Berlin"})) as service:
        yield service


async def test_delivered_mail_carries_a_report_with_page_one_as_faxed_in_one_bit(
        berlin_service: Service, corpus: Path, tmp_path: Path) -> None:
    service = berlin_service
    letter = (corpus / "pdf" / "crazyones.pdf").read_bytes()  # 1 page of text, US Letter
    annex = (corpus / "pdf" / "two-different-pages.pdf").read_bytes()  # 2 pages, A4
    mail = fax_mail([("letter.pdf", letter, "application/pdf"),
                     ("annex.pdf", annex, "application/pdf")], to="004930123456@fax.local",
                    subject="Angebot für Größe № 5 €")
    _, reply = await service.send(mail, "alice@example.org", ["004930123456@fax.local"])
    job_id = reply.split()[-1]
    status = _parsed(await service.wait_for_mail(lambda m: m["X-Mailfax-State"] == "delivered"))
    job = await service.app.store.get_job(job_id)
    assert job is not None and job.state == JobState.DELIVERED
    [document, *_] = await service.app.store.load_documents(job.mail_id)

    attachments = _attachments(status)
    assert list(attachments) == ["transmission-report.pdf"]  # no document unless asked
    report = attachments["transmission-report.pdf"]

    # page 1 as a 1-bit grey image, with the fax's pixel grid: 204 dots an inch across,
    # 98 lines an inch down (standard), drawn in the paper's proportions
    [image] = _pdfimages(report, tmp_path)
    assert (image["color"], image["bpc"], image["comp"]) == ("gray", "1", "1")
    faxed = render_as_faxed(document.data, 0, STANDARD)
    assert (int(image["width"]), int(image["height"])) == faxed.size
    page_width_inches = float(pypdf.PdfReader(io.BytesIO(document.data)).pages[0]
                              .mediabox.width) / 72
    assert int(image["width"]) == pytest.approx(page_width_inches * 204, abs=2)
    assert int(image["x-ppi"]) / int(image["y-ppi"]) == pytest.approx(204 / 98, rel=0.02)
    with pikepdf.open(io.BytesIO(report)) as opened:
        [embedded] = opened.pages[0].Resources.XObject.values()
        assert isinstance(embedded, pikepdf.Stream) and embedded.BitsPerComponent == 1
        picture = pikepdf.PdfImage(embedded).as_pil_image()
    # the very pixels the recipient's machine gets, not the original's colours
    assert ImageChops.difference(picture.convert("L"), faxed.convert("L")).getbbox() is None
    assert 0.005 < black_fraction(picture) < 0.2  # the letter's text, not a blank page

    text = _report_text(report)
    assert "Transmission report" in text
    assert "Sender alice@example.org" in text
    assert "Subject Angebot für Größe № 5 €" in text
    assert "Recipient number +49 30 123456" in text
    assert "Remote station EMULATOR" in text
    assert "Duration 1:01" in text  # the emulator's 20 s a page and 1 s
    assert "Pages sent 3 of 3" in text
    assert f"Attempts {job.attempts}" in text and job.attempts >= 1
    assert "Fax service emulator (emulator)" in text
    assert f"Provider job id {job.provider_job_id}" in text and job.provider_job_id
    assert f"mailfax job {job_id}" in text
    assert "Result Sent: the fax service confirmed that all pages were transmitted." in text
    # the start in the sender's zone: the recorded end less the duration, in Berlin time
    [delivered] = [event for event in await service.app.store.job_events(job_id)
                   if event.state == JobState.DELIVERED]
    start = delivered.at.timestamp() - 61
    local = datetime.fromtimestamp(start, UTC).astimezone(service.app.notifier.zone)
    assert f"Start {local:%Y-%m-%d %H:%M:%S %Z}" in text
    assert local.tzname() in ("CET", "CEST")

    # page 1 inline in the HTML part, referenced by its Content-ID
    html = status.get_body(("html",))
    assert html is not None
    [related] = [part for part in status.walk() if part.get_content_type() == "multipart/related"]
    [png] = [part for part in related.iter_parts() if part.get_content_type() == "image/png"]
    cid = str(png["Content-ID"]).strip("<>")
    assert f'src="cid:{cid}"' in html.get_content()
    text_part = status.get_body(("plain",))
    assert text_part is not None and "transmission report is attached" in text_part.get_content()


async def test_a_large_scan_s_report_shows_its_page_one_read_from_its_file(
        berlin_service: Service, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A document over 1 MB is read from the store into a file for the report (as for the
    page check and the send), and pdfium renders page 1 from that file: the same pixels as
    from the bytes, not a blank page."""
    from bench.memory import random_pdf
    from mailfax.documents.mapped import DocumentMap, document_file

    scan = random_pdf(3_000_000, pages=2)
    assert render_page_one(document_file(tmp_path, [scan]), STANDARD) == \
        render_page_one(scan, STANDARD)
    store = berlin_service.app.store
    loaded: list[list[type]] = []
    load_documents = store.load_documents

    async def recorded(mail_id: str, spool: Path | None = None) -> list[Any]:
        documents = await load_documents(mail_id, spool)
        loaded.append([type(document.data) for document in documents])
        return documents

    monkeypatch.setattr(store, "load_documents", recorded)
    mail = fax_mail([("scan.pdf", scan, "application/pdf")], to="004930123456@fax.local")
    await berlin_service.send(mail, "alice@example.org", ["004930123456@fax.local"])
    status = _parsed(await berlin_service.wait_for_mail(
        lambda m: m["X-Mailfax-State"] == "delivered"))
    assert len(loaded) >= 2 and all(types == [DocumentMap] for types in loaded)  # check, report
    report = _attachments(status)["transmission-report.pdf"]
    with pikepdf.open(io.BytesIO(report)) as opened:
        [embedded] = opened.pages[0].Resources.XObject.values()
        picture = pikepdf.PdfImage(embedded).as_pil_image()
    faxed = render_as_faxed(scan, 0, STANDARD)
    assert ImageChops.difference(picture.convert("L"), faxed.convert("L")).getbbox() is None
    assert black_fraction(picture) > 0.005  # the scan's noise, not a blank page


async def test_report_in_german_and_the_whole_document_when_the_account_asks(
        tmp_path: Path, corpus: Path) -> None:
    settings = make_settings(
        tmp_path, notify={"from_address": "fax@mailfax.test", "language": "de"},
        accounts={"emulator": {"provider": "emulator", "delay_seconds": 0.3,
                               "seconds_per_page": 20, "return_document": True}})
    async with _running(settings) as service:
        pdf = (corpus / "pdf" / "two-different-pages.pdf").read_bytes()
        await service.fax_pdf(pdf)
        status = _parsed(await service.wait_for_mail(
            lambda m: m["X-Mailfax-State"] == "delivered"))
        job_id = status["X-Mailfax-Job"]
        job = await service.app.store.get_job(job_id)
        assert job is not None
        documents = await service.app.store.load_documents(job.mail_id)
    attachments = _attachments(status)
    assert set(attachments) == {"sendebericht.pdf", f"fax-wie-gesendet-{job_id}.pdf"}
    text = _report_text(attachments["sendebericht.pdf"])
    assert "Sendebericht" in text
    assert "Gesendete Seiten 2 von 2" in text
    assert "Empfängernummer +49 30 123456" in text
    whole = pypdf.PdfReader(io.BytesIO(attachments[f"fax-wie-gesendet-{job_id}.pdf"]))
    assert len(whole.pages) == sum(document.pages for document in documents) == 2


def _job(**overrides: Any) -> Job:
    now = datetime.now(UTC)
    values: dict[str, Any] = dict(
        id="j1", mail_id="m1", account="main", number="+4930123456", state=JobState.SENDING,
        pages=3, sender="alice@example.org", created=now, updated=now, attempts=1,
        next_attempt_at=None, provider_job_id="p1", reason=None, duration_seconds=None,
        remote_id=None, options={}, cancel_requested=False, acknowledged=False)
    values.update(overrides)
    return Job(**values)


def test_a_delivered_report_with_fewer_pages_is_a_partial_failure() -> None:
    job = _job(pages=3)
    for sent in (0, 2):
        transition = transition_for(job, StatusReport(state=JobState.DELIVERED, pages=sent,
                                                      remote_id="REMOTE"))
        assert transition is not None
        assert transition.state == JobState.FAILED
        assert transition.reason is not None and transition.reason.code == reasons.PARTIAL
        assert reasons.partial_pages(transition.reason) == (sent, 3)
        assert f"{sent} of 3 pages" in transition.reason.for_language("en")
        assert f"{sent} von 3 Seiten" in transition.reason.for_language("de")
        assert transition.pages is None  # the job keeps its submitted count
    for pages in (3, 4, None):
        transition = transition_for(job, StatusReport(state=JobState.DELIVERED, pages=pages))
        assert transition is not None and transition.state == JobState.DELIVERED


def test_the_mail_s_own_return_document_option_beats_account_and_notify() -> None:
    assert wants_document(_job(options={"return_document": False}), True, True) is False
    assert wants_document(_job(options={"return_document": True}), None, False) is True
    assert wants_document(_job(), False, True) is False
    assert wants_document(_job(), None, True) is True
    assert wants_document(_job(), None, False) is False


async def _partial_send(tmp_path: Path, corpus: Path, account: dict[str, Any]
                        ) -> tuple[email.message.EmailMessage, Job]:
    """A two-page PDF mailed to a number the emulator cuts short (+4930996…), through
    ``account``; the failure mail and the job."""
    settings = make_settings(tmp_path, accounts={"main": account}, default_account="main")
    pdf = (corpus / "pdf" / "two-different-pages.pdf").read_bytes()
    async with _running(settings) as service:
        _, reply = await service.send(
            fax_mail([("letter.pdf", pdf, "application/pdf")], to="030996123@fax.local"),
            "alice@example.org", ["030996123@fax.local"])
        status = _parsed(await service.wait_for_mail(
            lambda m: m["X-Mailfax-State"] == "failed", timeout=30))
        job = await service.app.store.get_job(reply.split()[-1])
    assert job is not None
    return status, job


def _assert_partial(status: email.message.EmailMessage, job: Job, tmp_path: Path,
                    provider: str) -> None:
    assert job.state == JobState.FAILED
    assert job.reason is not None and job.reason.code == "partial"
    assert job.pages == 2  # what was submitted; the reason says what got through
    assert "partially sent, 1 of 2 pages" in status["Subject"]
    body = status.get_body(("plain",))
    assert body is not None
    assert "only partially sent: 1 of 2 pages" in body.get_content()
    assert "transmission report is attached" in body.get_content()
    html = status.get_body(("html",))
    assert html is not None and 'src="cid:page1.' in html.get_content()
    report = _attachments(status)["transmission-report.pdf"]
    text = _report_text(report)
    assert "Pages sent 1 of 2" in text
    assert f"Fax service main ({provider})" in text
    assert "Only 1 of 2 pages were sent" in text
    [image] = _pdfimages(report, tmp_path)
    assert image["bpc"] == "1"


async def test_faxnummer_done_ok_with_fewer_pages_sent_is_reported_partial(
        tmp_path: Path, corpus: Path) -> None:
    running = await faxnummer_emulator.start(
        "127.0.0.1", 0, {"login": "acc12345", "code": "s3cr3t", "delay": "0.3",
                         "partial": "+4930996:1"})
    try:
        status, job = await _partial_send(tmp_path, corpus, {
            "provider": "faxnummer.de", "url": running.url, "product_login": "acc12345",
            "product_code": "s3cr3t", "status_email": "fax-admin@example.org",
            "source_number": "+4930555000", "timeout_seconds": 2, "connect_retries": 0})
    finally:
        await running.close()
    [fax] = running.state.faxes
    assert fax.pages == 2
    _assert_partial(status, job, tmp_path, "faxnummer.de")


async def test_fax_de_ok_with_fewer_pages_is_reported_partial(
        tmp_path: Path, corpus: Path) -> None:
    server = await faxde_emulator.start("127.0.0.1", 0, {"password": "pw-1", "delay": "0.5",
                                                         "partial": "+4930996:1"})
    try:
        status, job = await _partial_send(tmp_path, corpus, {
            "provider": "fax.de", "account": "123456", "password": "pw-1",
            "wsdl_url": server.wsdl_url})
    finally:
        await server.close()
    [emulated] = server.state.jobs.values()
    assert emulated.pages == 2
    _assert_partial(status, job, tmp_path, "fax.de")


def _grey_and_black_page() -> bytes:
    """An A4 page: a black square at the top left, a light grey one at the bottom right."""
    from reportlab.lib.pagesizes import A4
    from reportlab.pdfgen.canvas import Canvas

    out = io.BytesIO()
    canvas = Canvas(out, pagesize=A4)
    canvas.setFillGray(0.0)
    canvas.rect(72, A4[1] - 216, 144, 144, stroke=0, fill=1)
    canvas.setFillGray(0.8)
    canvas.rect(A4[0] - 216, 72, 144, 144, stroke=0, fill=1)
    canvas.save()
    return out.getvalue()


def test_report_page_is_black_and_white_at_fine_resolution_and_grey_is_gone(
        tmp_path: Path) -> None:
    facts = ReportFacts(
        sender="Jörg <j@example.org>", subject="Grau", number="+49 30 123456", remote_id="",
        started_at=None, duration="", pages_sent=1, pages_submitted=1, attempts=1,
        provider="main (fax.de)", provider_job_id="7001", job_id="j1", result="ok")
    report = build_report(facts, render_page_one(_grey_and_black_page(), FINE), "de")
    [image] = _pdfimages(report.pdf, tmp_path)
    assert (image["color"], image["bpc"]) == ("gray", "1")
    # A4 (595 × 842 pt) at 204 × 196 dpi
    assert int(image["width"]) == pytest.approx(595 / 72 * 204, abs=2)
    assert int(image["height"]) == pytest.approx(842 / 72 * 196, abs=2)
    with pikepdf.open(io.BytesIO(report.pdf)) as opened:
        [embedded] = opened.pages[0].Resources.XObject.values()
        assert isinstance(embedded, pikepdf.Stream)
        picture = pikepdf.PdfImage(embedded).as_pil_image().convert("L")
    width, height = picture.size
    black = picture.crop((int(width * 0.15), int(height * 0.12),
                          int(width * 0.3), int(height * 0.22)))
    grey = picture.crop((int(width * 0.7), int(height * 0.78),
                         int(width * 0.85), int(height * 0.88)))
    assert black.getextrema() == (0, 0)  # the black square stays black
    assert grey.getextrema() == (255, 255)  # light grey is lost on the fax: white
    text = _report_text(report.pdf)
    assert "Sendebericht" in text and "Jörg <j@example.org>" in text
    assert "Beginn –" in text and "Dauer –" in text
    assert "204 × 196 dpi" in text
    assert report.filename == "sendebericht.pdf"
    with Image.open(io.BytesIO(report.preview_png)) as preview:
        assert preview.format == "PNG"
        # square pixels (the 196 lines stretched to 204 an inch), at half size
        square_height = round(height * 204 / 196)
        assert preview.size == ((width + 1) // 2, (square_height + 1) // 2)


async def test_bundled_emulator_partial_rule_makes_a_partial_failure(
        tmp_path: Path, corpus: Path) -> None:
    status, job = await _partial_send(tmp_path, corpus, {
        "provider": "emulator", "delay_seconds": 0.3,
        "partial": [{"prefix": "+4930996", "pages_sent": 1}]})
    _assert_partial(status, job, tmp_path, "emulator")


async def test_each_recipient_of_one_mail_gets_its_own_report_with_the_same_page(
        service: Service, corpus: Path) -> None:
    pdf = (corpus / "pdf" / "crazyones.pdf").read_bytes()
    numbers = ["030123456@fax.local", "040654321@fax.local"]
    mail = fax_mail([("letter.pdf", pdf, "application/pdf")], to=", ".join(numbers))
    await service.send(mail, "alice@example.org", numbers)
    for _ in range(200):
        delivered = [_parsed(message) for message in service.outbox_messages()
                     if message["X-Mailfax-State"] == "delivered"]
        if len(delivered) == 2:
            break
        await asyncio.sleep(0.1)
    assert len(delivered) == 2
    reports = {status["X-Mailfax-Job"]: _attachments(status)["transmission-report.pdf"]
               for status in delivered}
    texts = {job_id: _report_text(report) for job_id, report in reports.items()}
    numbers_seen: set[str] = set()
    for job_id, text in texts.items():
        assert f"mailfax job {job_id}" in text
        numbers_seen.update(number for number in ("+49 30 123456", "+49 40 654321")
                            if f"Recipient number {number}" in text)
    assert numbers_seen == {"+49 30 123456", "+49 40 654321"}
    images: set[bytes] = set()
    for report in reports.values():
        with pikepdf.open(io.BytesIO(report)) as opened:
            [embedded] = opened.pages[0].Resources.XObject.values()
            assert isinstance(embedded, pikepdf.Stream)
            images.add(embedded.read_raw_bytes())
    assert len(images) == 1  # one page 1, as faxed, for both
