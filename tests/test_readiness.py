"""The fax-readiness check: a page that turns (almost) blank or black in the fax's black and
white is flagged by page and cause, in the 250 reply and the acceptance mail; "refuse" refuses
it, "off" does not look. Pages are made with ReportLab as a user's application would."""

from __future__ import annotations

import asyncio
import email
import email.policy
import io
import mailbox
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from PIL import Image
from reportlab.lib.pagesizes import A4
from reportlab.lib.utils import ImageReader
from reportlab.pdfgen import canvas

from mailfax import cli
from mailfax.app import Application
from mailfax.documents.readiness import (
    ReadinessLimits,
    check_documents,
    refusal_text,
    short_text,
)
from mailfax.providers.base import FaxDocument
from tests.conftest import Service, fax_mail, make_settings
from tests.ports import free_port
from tests.test_policy_service import lmtp_send

Page = Callable[[canvas.Canvas], None]


def text(grey: float = 0.0, rgb: tuple[float, float, float] | None = None,
         lines: int = 40) -> Page:
    """A letter's worth of 11 pt text in ``grey`` (0 black, 1 white) or in colour ``rgb``."""
    def draw(page: canvas.Canvas) -> None:
        if rgb is not None:
            page.setFillColorRGB(*rgb)
        else:
            page.setFillGray(grey)
        page.setFont("Helvetica", 11)
        for line in range(lines):
            page.drawString(60, 780 - 16 * line,
                            f"Line {line + 1}: the quick brown fox jumps over the lazy dog.")
    return draw


def photo(brightness: int) -> Page:
    """A grey photo-like picture (noise around ``brightness`` of 255) over most of the page."""
    noise = Image.effect_noise((400, 560), 40)
    picture = noise.point(lambda value: max(0, min(255, value - 128 + brightness)))

    def draw(page: canvas.Canvas) -> None:
        page.drawImage(ImageReader(picture.convert("RGB")), 30, 40, 535, 760)
    return draw


def black_background(page: canvas.Canvas) -> None:
    page.setFillGray(0.0)
    page.rect(0, 0, A4[0], A4[1], stroke=0, fill=1)
    page.setFillGray(1.0)
    page.setFont("Helvetica", 30)
    page.drawString(100, 400, "Grand opening")


def page_number_only(page: canvas.Canvas) -> None:
    page.setFont("Helvetica", 10)
    page.drawString(280, 30, "- 2 -")


def blank(page: canvas.Canvas) -> None:
    """Nothing on it (a blank back side)."""


def pdf(*pages: Page) -> bytes:
    buffer = io.BytesIO()
    drawing = canvas.Canvas(buffer, pagesize=A4)
    for draw in pages:
        draw(drawing)
        drawing.showPage()
    drawing.save()
    return buffer.getvalue()


DEFAULTS = ReadinessLimits()


def findings_of(*pages: Page, limits: ReadinessLimits = DEFAULTS) -> list[Any]:
    return list(check_documents([FaxDocument("letter.pdf", pdf(*pages), len(pages))], limits))


# -- the pure check --

def test_light_grey_text_is_flagged_as_blank_and_black_text_is_not() -> None:
    findings = findings_of(text(0.0), text(0.85), text(0.0))
    assert findings == [{
        "page": 2, "problem": "empty", "cause": "grey-text", "document": "letter.pdf",
        "document_page": 2,
        "text": "Page 2 may arrive blank at the fax (light grey text)."}]


def test_light_colours_are_named_as_such() -> None:
    findings = findings_of(text(rgb=(1.0, 0.85, 0.2)), text(rgb=(0.55, 0.75, 1.0)))
    assert [(item["page"], item["problem"], item["cause"]) for item in findings] == [
        (1, "empty", "light-colours"), (2, "empty", "light-colours")]
    assert "light colours" in findings[0]["text"]


def test_a_dark_photo_and_a_black_background_are_flagged_as_black() -> None:
    findings = findings_of(photo(60), black_background, photo(150))
    assert [(item["page"], item["problem"], item["cause"]) for item in findings] == [
        (1, "black", "dark-photo"), (2, "black", "black-background")]
    assert findings[0]["text"] == "Page 1 may arrive black at the fax (a dark photo or picture)."


def test_a_page_blank_in_the_original_or_with_a_page_number_only_is_not_flagged() -> None:
    """Blank in the original is how the sender made it; the check is about what black and
    white changes."""
    assert findings_of(blank, page_number_only, text(0.4)) == []


def test_pages_are_counted_over_the_whole_fax_and_name_their_document() -> None:
    documents = [FaxDocument("cover.pdf", pdf(text(0.0)), 1),
                 FaxDocument("offer.pdf", pdf(text(0.0), text(0.9)), 2)]
    [finding] = check_documents(documents, ReadinessLimits())
    assert (finding["page"], finding["document"], finding["document_page"]) == (3, "offer.pdf", 2)
    assert finding["text"] == ("Page 3 (offer.pdf, page 2) may arrive blank at the fax "
                               "(light grey text).")


def test_the_thresholds_and_the_page_cap_are_the_configured_ones() -> None:
    assert findings_of(text(0.0), limits=ReadinessLimits(black_above=0.01))[0]["problem"] == \
        "black"  # a text page is some 7 % black
    assert findings_of(photo(60), limits=ReadinessLimits(black_above=0.95)) == []
    assert findings_of(text(0.0), text(0.9), limits=ReadinessLimits(max_pages=1)) == []
    assert findings_of(text(0.9), limits=ReadinessLimits(max_seconds=0.0)) == []


def test_the_reply_text_and_the_refusal_name_page_and_cause() -> None:
    findings = findings_of(text(0.9), photo(50), *[text(0.9)] * 3)
    assert short_text(findings) == ("page 1 may arrive blank (light grey text); "
                                    "page 2 may arrive black (a dark photo or picture); "
                                    "page 3 may arrive blank (light grey text); "
                                    "2 more page(s) too")
    assert refusal_text(findings[:1]) == (
        "Not faxed: page 1 may arrive blank (light grey text), as a fax is black and white. "
        "Use black text on white and lighter pictures, then send it again.")


LETTER = pdf(text(0.0), text(0.85), photo(60))  # sent over SMTP below


def test_poppler_sees_the_flagged_pages_as_the_check_does(tmp_path: Path) -> None:
    """Independent of pdfium: poppler's greyscale render of the letter the SMTP tests send
    has page 2 in ink lighter than half (gone at the fax's threshold) but not blank, and page
    3 mostly darker than half."""
    if shutil.which("pdftoppm") is None:
        pytest.skip("poppler-utils (pdftoppm) not installed")
    (tmp_path / "letter.pdf").write_bytes(LETTER)
    subprocess.run(["pdftoppm", "-gray", "-r", "100", str(tmp_path / "letter.pdf"),
                    str(tmp_path / "page")], check=True, timeout=60)
    levels = [Image.open(tmp_path / f"page-{number}.pgm").histogram() for number in (1, 2, 3)]
    dark = [sum(histogram[:128]) / sum(histogram) for histogram in levels]
    inked = [sum(histogram[:245]) / sum(histogram) for histogram in levels]
    assert dark[0] > 0.01 and dark[1] == 0.0 and inked[1] > 0.01 and dark[2] > 0.6


# -- over SMTP, as a user sends --

@pytest.fixture
async def start(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """Starts mailfax with these settings overrides (make_settings); stopped afterwards."""
    apps: list[Application] = []

    async def started(**overrides: Any) -> Service:
        app = Application(make_settings(tmp_path / str(len(apps)), **overrides))
        apps.append(app)
        await app.start()
        return Service(app)
    yield started
    for app in apps:
        await app.stop()


def _parsed(message: mailbox.MaildirMessage) -> email.message.EmailMessage:
    parsed = email.message_from_bytes(bytes(message), policy=email.policy.default)
    assert isinstance(parsed, email.message.EmailMessage)
    return parsed


def _is_accepted(message: mailbox.MaildirMessage) -> bool:
    return "accepted" in str(message["Subject"]) or "angenommen" in str(message["Subject"])


def _bodies(message: email.message.EmailMessage) -> tuple[str, str]:
    plain, html = message.get_body(("plain",)), message.get_body(("html",))
    assert isinstance(plain, email.message.EmailMessage)
    assert isinstance(html, email.message.EmailMessage)
    return plain.get_content(), html.get_content()


async def test_a_light_grey_page_is_named_in_the_250_and_in_the_acceptance_mail(
        start: Callable[..., Any], capsys: pytest.CaptureFixture[str]) -> None:
    service: Service = await start()  # the default: readiness = "warn", accepted not mailed
    reply = await service.fax_pdf(LETTER)
    assert reply.startswith("2.0.0 queued as ")
    assert reply.endswith("; warning: page 2 may arrive blank (light grey text); "
                          "page 3 may arrive black (a dark photo or picture)"), reply
    assert "page 1" not in reply
    job_id = reply.split("queued as ")[1].split(";")[0]
    job = await service.app.store.get_job(job_id)
    assert job is not None
    assert [(item["page"], item["problem"]) for item in job.options["warnings"]] == [
        (2, "empty"), (3, "black")]

    status = _parsed(await service.wait_for_mail(_is_accepted))
    assert status["X-Mailfax-Job"] == job_id
    assert "warning: page 2 may arrive blank" in status["Subject"]
    plain, html = _bodies(status)
    assert "- Page 2 may arrive blank at the fax (light grey text)." in plain
    assert "- Page 3 may arrive black at the fax (a dark photo or picture)." in plain
    assert "Page 1 " not in plain
    assert "<li>Page 2 may arrive blank at the fax (light grey text).</li>" in html
    # ... and it is still faxed: the warning does not hold it.
    delivered = await service.wait_for_mail(lambda m: m["X-Mailfax-State"] == "delivered")
    assert delivered["X-Mailfax-Job"] == job_id
    assert sum(_is_accepted(message) for message in service.outbox_messages()) == 1
    # ... and the administrator sees it with ``mailfax show``.
    config = service.app.settings.data_dir.parent / "mailfax.toml"
    config.write_text(f'data_dir = "{service.app.settings.data_dir}"\n')
    assert await asyncio.to_thread(cli.main, ["-c", str(config), "show", job_id]) == 0
    assert "  warning: Page 2 may arrive blank at the fax (light grey text).\n" in \
        capsys.readouterr().out


async def test_the_acceptance_mail_warns_in_german(start: Callable[..., Any]) -> None:
    service: Service = await start(notify={"from_address": "fax@mailfax.test",
                                           "language": "de"})
    await service.fax_pdf(pdf(text(0.0), text(0.0), text(rgb=(1.0, 0.9, 0.3))))
    status = _parsed(await service.wait_for_mail(_is_accepted))
    assert "Warnung: Seite 3 kommt womöglich leer an" in status["Subject"]
    plain, html = _bodies(status)
    assert "- Seite 3 kommt womöglich leer an (helle Farben)." in plain
    assert "<li>Seite 3 kommt womöglich leer an (helle Farben).</li>" in html


async def test_a_normal_letter_gets_no_warning_and_no_acceptance_mail(
        start: Callable[..., Any]) -> None:
    service: Service = await start()
    reply = await service.fax_pdf(pdf(text(0.0), photo(150)))
    assert "warning" not in reply
    await service.wait_for_mail(lambda m: m["X-Mailfax-State"] == "delivered")
    assert not any(_is_accepted(message) for message in service.outbox_messages())


async def test_refuse_gives_a_554_naming_the_page_and_queues_nothing(
        start: Callable[..., Any]) -> None:
    service: Service = await start(documents={"readiness": "refuse"})
    with pytest.raises(aiosmtplib.SMTPDataError) as refused:
        await service.fax_pdf(LETTER)
    assert refused.value.code == 554
    assert refused.value.message.startswith("5.6.0 Not faxed: page 2 may arrive blank (light "
                                            "grey text); page 3 may arrive black"), \
        refused.value.message
    assert await service.app.store.list_jobs() == []
    assert "warning" not in await service.fax_pdf(pdf(text(0.0)))  # a good one still goes


async def test_off_does_not_look(start: Callable[..., Any]) -> None:
    service: Service = await start(documents={"readiness": "off"},
                                   notify={"from_address": "fax@mailfax.test",
                                           "events": ["accepted", "delivered"]})
    reply = await service.fax_pdf(LETTER)
    assert "warning" not in reply
    status = _parsed(await service.wait_for_mail(_is_accepted))
    plain, _ = _bodies(status)
    assert "WARNING" not in plain and "Page 2" not in plain
    job = await service.app.store.get_job(reply.split("queued as ")[1])
    assert job is not None and "warnings" not in job.options


async def test_a_spooled_mail_gets_its_warning_by_mail(start: Callable[..., Any]) -> None:
    """smtp.accept = "spool" answers before the documents are looked at: the acceptance mail
    is where the sender hears of the page."""
    service: Service = await start(smtp={"accept": "spool"})
    reply = await service.fax_pdf(LETTER)
    assert "spooled as" in reply and "warning" not in reply
    status = _parsed(await service.wait_for_mail(_is_accepted))
    plain, _ = _bodies(status)
    assert "- Page 2 may arrive blank at the fax (light grey text)." in plain


async def test_over_lmtp_each_recipient_hears_the_warning(start: Callable[..., Any]) -> None:
    service: Service = await start(smtp={"lmtp_listen": [f"127.0.0.1:{free_port()}"]})
    recipients = ["030123456@fax.local", "+4922198765@fax.local"]
    mail = fax_mail([("letter.pdf", LETTER, "application/pdf")], to=", ".join(recipients))
    answers = await lmtp_send(service.app, mail.as_bytes(), "alice@example.org", recipients)
    for address in recipients:
        code, text = answers[address]
        assert code == 250 and f"<{address}> queued as " in text, text
        assert text.endswith("; warning: page 2 may arrive blank (light grey text); "
                             "page 3 may arrive black (a dark photo or picture)"), text


async def test_a_spooled_mail_refused_comes_back_as_a_bounce_naming_the_page(
        start: Callable[..., Any]) -> None:
    service: Service = await start(smtp={"accept": "spool"}, documents={"readiness": "refuse"})
    assert "spooled as" in await service.fax_pdf(LETTER)
    bounce = _parsed(await service.wait_for_mail(lambda m: "multipart/report" in
                                                  str(m["Content-Type"])))
    plain = bounce.get_body(("plain",))
    assert plain is not None
    assert "Not faxed: page 2 may arrive blank (light grey text)" in plain.get_content()
    assert await service.app.store.list_jobs() == []
