"""The fax-readiness check: a page that turns (almost) blank or black in the fax's black and
white is flagged by page and cause in the acceptance mail ("warn": checked after the 250, in a
worker process, the job held until then); "refuse" refuses it before the 250, "off" does not
look. Pages are made with ReportLab as a user's application would."""

from __future__ import annotations

import asyncio
import email
import email.policy
import errno
import io
import mailbox
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
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
from mailfax.documents import readiness_pool
from mailfax.documents.faxrender import STANDARD
from mailfax.documents.readiness import (
    ReadinessLimits,
    check_documents,
    refusal_text,
    short_text,
)
from mailfax.model import JobState
from mailfax.providers.base import FaxDocument
from mailfax.store.base import NewJob, ReadinessVerdict, Store, Transition
from tests import test_store
from tests.conftest import Service, fax_mail, make_settings
from tests.ports import free_port
from tests.test_broadcast import LIST, jobs_json, list_settings
from tests.test_policy_service import lmtp_send
from tests.test_store import DOCS, new_mail

# test_store's fixtures: both backends, a database of its own per test
postgres_server = test_store.postgres_server
backend = test_store.backend
store = test_store.store

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


async def test_a_light_grey_page_is_named_in_the_acceptance_mail_not_in_the_250(
        start: Callable[..., Any], capsys: pytest.CaptureFixture[str]) -> None:
    """The default: readiness = "warn", checked after the 250 in the worker process (the
    real one), "accepted" not in notify.events yet mailed for the warning."""
    service: Service = await start()
    reply = await service.fax_pdf(LETTER)
    assert re.fullmatch(r"2\.0\.0 queued as [0-9a-z]{12}", reply), reply  # no warning in it
    job_id = reply.split("queued as ")[1]

    status = _parsed(await service.wait_for_mail(_is_accepted))
    job = await service.app.store.get_job(job_id)
    assert job is not None and job.options["readiness"] == "checked"
    assert [(item["page"], item["problem"]) for item in job.options["warnings"]] == [
        (2, "empty"), (3, "black")]
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
    shown = capsys.readouterr().out
    assert "  warning: Page 2 may arrive blank at the fax (light grey text).\n" in shown
    assert "queued     (fax-readiness checked: page 2 may arrive blank (light grey text); " \
        "page 3 may arrive black (a dark photo or picture))" in shown


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


async def test_over_lmtp_each_recipient_gets_its_acceptance_mail_with_the_warning(
        start: Callable[..., Any]) -> None:
    service: Service = await start(smtp={"lmtp_listen": [f"127.0.0.1:{free_port()}"]})
    recipients = ["030123456@fax.local", "+4922198765@fax.local"]
    mail = fax_mail([("letter.pdf", LETTER, "application/pdf")], to=", ".join(recipients))
    answers = await lmtp_send(service.app, mail.as_bytes(), "alice@example.org", recipients)
    job_ids = set()
    for address in recipients:
        code, text = answers[address]
        assert code == 250 and f"<{address}> queued as " in text and "warning" not in text, text
        job_ids.add(text.split("queued as ")[1])
    await service.wait_for_mail(lambda m: _is_accepted(m) and m["X-Mailfax-Job"] in job_ids
                                and len({n["X-Mailfax-Job"] for n in service.outbox_messages()
                                         if _is_accepted(n)}) == 2)
    for message in service.outbox_messages():
        if _is_accepted(message):
            plain, _ = _bodies(_parsed(message))
            assert "- Page 2 may arrive blank at the fax (light grey text)." in plain


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


# -- "warn": the check after the 250, the hold, the store's record -----------------------------

Check = Callable[[Any, ReadinessLimits, Any], list[Any]]


def in_threads(monkeypatch: pytest.MonkeyPatch, check: Check) -> None:
    """The test seam: the checks in a thread of this process (not a worker process), so that
    ``check`` can stand in for the real one."""
    monkeypatch.setattr(readiness_pool, "_process_pool",
                        lambda workers: ThreadPoolExecutor(workers, "readiness-test"))
    monkeypatch.setattr(readiness_pool, "_check", check)


def gated(calls: list[int], gate: threading.Event | None = None,
          fail: bool = False) -> Check:
    """The real check, counted (documents per call), after ``gate`` opens; or a failure."""
    def check(documents: Any, limits: ReadinessLimits, resolution: Any) -> list[Any]:
        calls.append(len(documents))
        if gate is not None:
            gate.wait(60)
        if fail:
            raise RuntimeError("pdfium fell over")
        return check_documents(documents, limits, resolution)
    return check


def job_id_of(reply: str) -> str:
    return reply.split("queued as ")[1]


async def test_the_job_is_not_sent_before_its_check_and_jobs_json_shows_it_pending(
        start: Callable[..., Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[int] = []
    gate = threading.Event()
    in_threads(monkeypatch, gated(calls, gate))
    service: Service = await start()
    try:
        job_id = job_id_of(await service.fax_pdf(LETTER))
        await asyncio.sleep(1.5)  # the emulator takes a fax in 0.3 s: it would be sent by now
        job = await service.app.store.get_job(job_id)
        assert job is not None
        assert (job.state.value, job.attempts, job.provider_job_id) == ("queued", 0, None)
        assert job.next_attempt_at is not None and job.next_attempt_at > job.created + \
            timedelta(seconds=110)  # held: readiness_hold_seconds, 120 s
        [listed] = [item for item in jobs_json(tmp_path, service.app.settings.data_dir)
                    if item["id"] == job_id]
        assert listed["options"]["readiness"] == "pending" and listed["state"] == "queued"
        assert calls == [1]
    finally:
        gate.set()
    await service.wait_for_mail(lambda m: m["X-Mailfax-State"] == "delivered")
    events = [(event.state.value, event.detail)
              for event in await service.app.store.job_events(job_id)]
    checked = next(index for index, (_, detail) in enumerate(events)
                   if detail.startswith("fax-readiness checked: page 2 may arrive blank"))
    submitted = next(index for index, (state, _) in enumerate(events) if state == "submitted")
    assert events[0] == ("queued", "accepted") and checked < submitted, events
    assert sum(_is_accepted(message) for message in service.outbox_messages()) == 1


async def test_a_broadcast_mail_is_checked_once_for_all_its_jobs(
        start: Callable[..., Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[int] = []
    in_threads(monkeypatch, gated(calls))
    service: Service = await start(lists=list_settings(tmp_path))
    mail = fax_mail([("letter.pdf", LETTER, "application/pdf")], to=LIST)
    _, reply = await service.send(mail, "alice@example.org", [LIST])
    assert "50 faxes" in reply and "warning" not in reply, reply

    async def checked() -> list[Any]:
        while True:
            jobs = await service.app.store.list_jobs()
            if jobs and all(job.options.get("readiness") == "checked" for job in jobs):
                return jobs
            await asyncio.sleep(0.1)
    jobs = await asyncio.wait_for(checked(), 30)
    assert len(jobs) == 50 and calls == [1]
    assert all([item["page"] for item in job.options["warnings"]] == [2, 3] for job in jobs)


async def test_a_check_that_fails_leaves_the_job_unchecked_but_sent(
        start: Callable[..., Any], monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    in_threads(monkeypatch, gated(calls, fail=True))
    service: Service = await start(notify={"from_address": "fax@mailfax.test",
                                           "events": ["accepted", "delivered"]})
    job_id = job_id_of(await service.fax_pdf(LETTER))
    await service.wait_for_mail(lambda m: m["X-Mailfax-State"] == "delivered")
    job = await service.app.store.get_job(job_id)
    assert job is not None and job.options["readiness"] == "not checked"
    assert "warnings" not in job.options
    details = [event.detail for event in await service.app.store.job_events(job_id)]
    assert "fax-readiness not checked: its worker failed (pdfium fell over)" in details
    # "accepted" is asked for: one acceptance mail, from the check's event, without warning.
    accepted = [_parsed(message) for message in service.outbox_messages()
                if _is_accepted(message)]
    assert len(accepted) == 1 and "warning" not in str(accepted[0]["Subject"])


async def test_a_job_whose_hold_ran_out_is_sent_and_its_warning_still_comes(
        start: Callable[..., Any], monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    gate = threading.Event()
    in_threads(monkeypatch, gated(calls, gate))
    service: Service = await start(documents={"readiness_hold_seconds": 0.5})
    try:
        job_id = job_id_of(await service.fax_pdf(LETTER))
        await service.wait_for_mail(lambda m: m["X-Mailfax-State"] == "delivered")
        assert not any(_is_accepted(message) for message in service.outbox_messages())
    finally:
        gate.set()
    status = _parsed(await service.wait_for_mail(_is_accepted))
    assert status["X-Mailfax-Job"] == job_id
    plain, _ = _bodies(status)
    assert "- Page 2 may arrive blank at the fax (light grey text)." in plain
    job = await service.app.store.get_job(job_id)
    assert job is not None and job.state.value == "delivered"  # not put back in the queue


async def test_a_check_cut_short_by_a_stop_is_made_at_the_next_start(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The first run stops while the check waits; the next one (with the real worker
    process) finds the pending job with one query at start-up, checks and sends it."""
    settings = make_settings(tmp_path)
    gate = threading.Event()
    with monkeypatch.context() as patched:
        in_threads(patched, gated([], gate))
        first = Application(settings)
        await first.start()
        try:
            job_id = job_id_of(await Service(first).fax_pdf(LETTER))
        finally:
            await first.stop()
            gate.set()
    second = Application(settings)
    await second.start()
    try:
        service = Service(second)
        status = _parsed(await service.wait_for_mail(_is_accepted))
        assert status["X-Mailfax-Job"] == job_id
        await service.wait_for_mail(lambda m: m["X-Mailfax-State"] == "delivered")
        job = await second.store.get_job(job_id)
        assert job is not None and job.options["readiness"] == "checked"
        assert [item["page"] for item in job.options["warnings"]] == [2, 3]
        assert sum(_is_accepted(message) for message in service.outbox_messages()) == 1
    finally:
        await second.stop()


# -- the worker processes --

async def test_a_hung_check_has_its_worker_killed_and_the_next_check_gets_a_new_one() -> None:
    pool = readiness_pool.ReadinessPool(1)
    documents = [FaxDocument("photo.pdf", pdf(photo(60)), 1)]
    try:
        await pool.start()
        [first] = readiness_pool.worker_pids(pool)
        hung = await pool.check(documents, DEFAULTS, STANDARD, seconds=0.001)  # "a hung page"
        assert (hung.checked, hung.findings) == (False, [])
        assert "took over" in hung.why
        await wait_until_dead(first)
        done = await pool.check(documents, DEFAULTS, STANDARD, seconds=60)
        assert done.checked and [item["problem"] for item in done.findings] == ["black"]
        assert readiness_pool.worker_pids(pool) not in ([], [first])
    finally:
        pool.close()


async def test_a_stop_that_comes_as_a_check_ends_is_not_lost(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The cancellation (a stop) and the worker's answer in the same turn of the loop: the
    check still ends cancelled. Python 3.11's ``asyncio.wait_for`` returned the answer
    here, the checker's loop went on waiting for the next mail, and ``stop()`` hung."""
    pool = readiness_pool.ReadinessPool(1)
    loop = asyncio.get_running_loop()
    answer: asyncio.Future[list[Any]] = loop.create_future()
    monkeypatch.setattr(loop, "run_in_executor", lambda *args: answer)
    started: asyncio.Future[None] = loop.create_future()
    started.set_result(None)
    pool._started, pool._executor = started, ThreadPoolExecutor(1)  # as if started
    checking = asyncio.ensure_future(pool.check(
        [FaxDocument("letter.pdf", b"%PDF", 1)], DEFAULTS, STANDARD, seconds=60))
    for _ in range(10):
        await asyncio.sleep(0)
    assert not checking.done()
    answer.set_result([])
    checking.cancel()
    with pytest.raises(asyncio.CancelledError):
        await checking
    pool.close()


async def test_a_crashed_worker_is_replaced() -> None:
    pool = readiness_pool.ReadinessPool(1)
    documents = [FaxDocument("letter.pdf", pdf(*[photo(60)] * 6), 6)]
    try:
        await pool.start()
        [worker] = readiness_pool.worker_pids(pool)
        checking = asyncio.ensure_future(pool.check(documents, DEFAULTS, STANDARD, seconds=60))
        await asyncio.sleep(0.2)
        os.kill(worker, signal.SIGKILL)  # as if pdfium crashed mid-page
        crashed = await checking
        assert not crashed.checked and "worker failed" in crashed.why
        again = await pool.check([FaxDocument("grey.pdf", pdf(text(0.9)), 1)], DEFAULTS,
                                 STANDARD, seconds=60)
        assert again.checked and [item["page"] for item in again.findings] == [1]
    finally:
        pool.close()


async def test_the_workers_run_niced_in_processes_of_their_own() -> None:
    pool = readiness_pool.ReadinessPool(1)
    try:
        await pool.start()
        [worker] = readiness_pool.worker_pids(pool)
        assert worker != os.getpid()
        assert os.getpriority(os.PRIO_PROCESS, worker) == min(
            19, os.getpriority(os.PRIO_PROCESS, 0) + readiness_pool.NICE)
    finally:
        pool.close()


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except FileNotFoundError:
        return False
    return state != "Z"  # killed, not yet reaped: dead


async def wait_until_dead(pid: int) -> None:
    for _ in range(100):
        if not alive(pid):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"worker {pid} still runs")


# -- the store's record, both backends --

async def test_the_check_is_recorded_and_the_hold_released_in_one_call(store: Store) -> None:
    now = datetime.now(UTC)
    later = now + timedelta(minutes=2)
    pending = {"readiness": "pending", "resolution": "standard"}
    await store.add_mail_jobs(new_mail("m1"), [
        NewJob("j1", "+4930111", "emulator", pending, hold_until=later),
        NewJob("j2", "+4930222", "emulator", pending, hold_until=later),
        NewJob("j3", "+4930333", "emulator", {}, hold_until=None),
        NewJob("j4", "+4930444", "emulator", pending, hold_until=later)], DOCS)
    assert {job.id for job in await store.pending_readiness(10)} == {"j1", "j2", "j4"}
    await store.record(  # j2 was taken meanwhile (its hold ran out)
        "j2", Transition(JobState.SUBMITTED, provider_job_id="p2"))
    await store.record("j4", Transition(JobState.CANCELLED))  # by its sender
    finding = {"page": 2, "problem": "empty", "cause": "grey-text", "document": "a.pdf",
               "document_page": 2, "text": "Page 2 may arrive blank at the fax (light grey text)."}
    verdict = ReadinessVerdict(job_ids=["j1", "j2", "j3", "j4"], findings=[finding],
                               outcome="checked", detail="fax-readiness checked: page 2",
                               notify=True)
    calls = counted(store)
    assert sorted(await store.record_readiness(verdict)) == ["j1", "j2", "j4"]  # j3: not pending
    assert calls == ["record_readiness"]
    jobs = {job.id: job for job in await store.get_jobs(["j1", "j2", "j3"])}
    for job_id in ("j1", "j2"):
        assert jobs[job_id].options == {**pending, "readiness": "checked",
                                        "warnings": [finding]}
    j1_due = jobs["j1"].next_attempt_at
    assert j1_due is not None and j1_due <= datetime.now(UTC)  # released: due now
    assert jobs["j2"].state == JobState.SUBMITTED  # its hold had run out: left as it is
    assert jobs["j3"].options == {}
    events = [(event.state, event.detail) for event in await store.job_events("j1")]
    assert events == [(JobState.QUEUED, "accepted"),
                      (JobState.QUEUED, "fax-readiness checked: page 2")]
    assert [event.state for event in await store.job_events("j4")] == [  # no acceptance mail
        JobState.QUEUED, JobState.CANCELLED]
    # A second check (a restart's) records nothing, so no second acceptance mail.
    assert await store.record_readiness(verdict) == []
    assert len(await store.job_events("j1")) == 2
    assert await store.pending_readiness(10) == []


async def test_a_released_scheduled_job_is_due_at_its_time(store: Store) -> None:
    send_at = datetime.now(UTC) + timedelta(minutes=30)
    hold = send_at + timedelta(minutes=2)
    await store.add_mail_jobs(new_mail("m1"), [
        NewJob("j1", "+4930111", "emulator", {"readiness": "pending"}, hold_until=hold)], DOCS)
    await store.record_readiness(ReadinessVerdict(
        job_ids=["j1"], findings=[], outcome="checked", detail="fax-readiness checked",
        notify=False, release_at=send_at))
    job = await store.get_job("j1")
    assert job is not None and job.next_attempt_at is not None
    assert abs((job.next_attempt_at - send_at).total_seconds()) < 0.01
    assert "warnings" not in job.options
    pending = [event for event in await store.pending_notifications(10) if event.job_id == "j1"]
    assert [event.detail for event in pending] == ["accepted"]  # not mailed: notify=False


def counted(store: Store) -> list[str]:
    """The names of the store's calls from now on (record_readiness, and any other)."""
    calls: list[str] = []
    for name in ("record_readiness", "record", "record_all", "get_jobs", "get_job",
                 "add_mail_jobs", "load_documents"):
        method = getattr(store, name)

        def wrapper(*args: Any, __method: Any = method, __name: str = name,
                    **kwargs: Any) -> Any:
            calls.append(__name)
            return __method(*args, **kwargs)
        setattr(store, name, wrapper)
    return calls


async def test_a_large_document_goes_to_the_worker_as_a_file_removed_after_the_check(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool = tmp_path / "spool"
    handed: list[list[readiness_pool.Pages]] = []
    in_files = readiness_pool._in_files

    def spy(documents: list[FaxDocument], folder: Path) -> list[readiness_pool.Pages]:
        handed.append(in_files(documents, folder))
        assert [os.stat(page.path).st_mode & 0o777 for page in handed[-1]] == [0o600]
        return handed[-1]

    monkeypatch.setattr(readiness_pool, "FILE_ABOVE", 1000)  # the grey page is over it
    monkeypatch.setattr(readiness_pool, "_in_files", spy)
    pool = readiness_pool.ReadinessPool(1, spool=spool)
    grey = FaxDocument("grey.pdf", pdf(text(0.9)), 1)
    assert len(grey.data) > 1000
    try:
        checked = await pool.check([grey], DEFAULTS, STANDARD, seconds=60)
    finally:
        pool.close()
    assert checked.checked and [item["page"] for item in checked.findings] == [1]
    [[page]] = handed
    assert page.data == b"" and Path(page.path).parent == spool  # named, not carried
    assert list(spool.iterdir()) == []  # removed once checked


@pytest.mark.parametrize("disk", ["room", "full"])
async def test_a_document_in_its_file_is_checked_from_a_hand_over_file_or_from_memory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, disk: str) -> None:
    from mailfax.documents.mapped import document_file

    spool = tmp_path / "spool"
    monkeypatch.setattr(readiness_pool, "FILE_ABOVE", 1000)
    if disk == "full":
        def no_room(*args: Any) -> list[readiness_pool.Pages]:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(readiness_pool, "_in_files", no_room)
    grey = document_file(tmp_path / "mapped", [pdf(text(0.9))])  # as the store reads it
    pool = readiness_pool.ReadinessPool(1, spool=spool)
    try:
        checked = await pool.check([FaxDocument("grey.pdf", grey, 1)], DEFAULTS, STANDARD,
                                   seconds=60)
    finally:
        pool.close()
        grey.close()
    assert checked.checked and [item["page"] for item in checked.findings] == [1]
    assert not spool.exists() or list(spool.iterdir()) == []


async def test_hand_over_files_a_killed_process_left_are_removed_at_start(
        tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    old, fresh = spool / "readiness-old.pdf", spool / "readiness-fresh.pdf"
    for path in (old, fresh):
        path.write_bytes(b"%PDF-")
    long_ago = datetime.now(UTC).timestamp() - readiness_pool.STALE_SECONDS - 60
    os.utime(old, (long_ago, long_ago))
    pool = readiness_pool.ReadinessPool(1, spool=spool)
    try:
        await pool.start()
    finally:
        pool.close()
    assert sorted(path.name for path in spool.iterdir()) == ["readiness-fresh.pdf"]


SERVING = """
import asyncio, os, sys
from mailfax.documents import readiness_pool

async def main() -> None:
    pool = readiness_pool.ReadinessPool(1)
    await pool.start()
    [worker] = readiness_pool.worker_pids(pool)
    print(worker, flush=True)
    await asyncio.sleep(600)

asyncio.run(main())
"""


def server_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


async def test_the_workers_and_their_fork_server_end_with_a_killed_serving_process() -> None:
    serving = subprocess.Popen([sys.executable, "-c", SERVING], stdout=subprocess.PIPE,
                               text=True)
    try:
        assert serving.stdout is not None
        worker = int(await asyncio.to_thread(serving.stdout.readline))
        fork_server = server_of(worker)
        assert fork_server not in (serving.pid, os.getpid())
    finally:
        serving.kill()  # kill -9: no clean-up of its own runs
        serving.wait()
    await wait_until_dead(worker)
    await wait_until_dead(fork_server)
