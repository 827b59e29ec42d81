"""Sending as a user sees it, on embedded defaults (the installed ``mailfax serve`` in an empty
folder, no config): per-mail options in ``X-Fax-*`` headers, the transmission report on the
delivered mail, and the fax-readiness warning, read from the SMTP reply, ``mailfax jobs
--json``, the emulator's ledger and the Maildir (the acceptance mail; with poppler's
``pdfimages`` and ``pdftoppm`` for the report)."""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import time
from datetime import datetime
from email.message import EmailMessage
from pathlib import Path

import pypdf
import pytest
from PIL import Image, ImageOps
from reportlab.lib.pagesizes import A4
from reportlab.pdfgen.canvas import Canvas

from tests.acceptance import documents
from tests.acceptance.user import Mailfax, eventually, final_job

FAX = "030123456@fax.local"

needs_poppler = pytest.mark.skipif(shutil.which("pdfimages") is None,
                                   reason="poppler-utils (pdfimages, pdftoppm) is not installed")


def letter(subject: str, data: bytes, **headers: str) -> EmailMessage:
    message = documents.mail(FAX, subject, attachments=(("letter.pdf", "application/pdf", data),))
    for name, value in headers.items():
        message[name.replace("_", "-")] = value
    return message


def mail_of(mailfax: Mailfax, job_id: str, state: str) -> EmailMessage:
    """The status mail of ``job_id`` whose ``X-Mailfax-State`` is ``state``."""
    return eventually(lambda: next(
        (mail for mail in mailfax.mails() if mail["X-Mailfax-Job"] == job_id
         and mail["X-Mailfax-State"] == state), None), 60, f"the {state} mail of {job_id}")


def attachments(message: EmailMessage) -> dict[str, bytes]:
    found = {}
    for part in message.iter_attachments():
        payload = part.get_payload(decode=True)
        assert isinstance(payload, bytes)
        found[str(part.get_filename())] = payload
    return found


def pdfimages(pdf: Path) -> list[dict[str, str]]:
    lines = subprocess.run(["pdfimages", "-list", str(pdf)], check=True, capture_output=True,
                           text=True, timeout=60).stdout.splitlines()
    headings = lines[0].split()
    return [dict(zip(headings, line.split(), strict=False)) for line in lines[2:]]


def grey_second_page() -> bytes:
    """Page 1 in black, page 2 in light grey (grey 0.85): the grey vanishes in a fax."""
    out = io.BytesIO()
    canvas = Canvas(out, pagesize=A4)
    for grey in (0.0, 0.85):
        canvas.setFillGray(grey)
        canvas.setFont("Helvetica", 14)
        for line in range(30):
            canvas.drawString(72, 760 - line * 20, "Offer: 3 boxes of screws, delivery Monday.")
        canvas.showPage()
    canvas.save()
    return out.getvalue()


@needs_poppler
async def test_the_delivered_mail_carries_the_transmission_report(mailfax: Mailfax,
                                                                  tmp_path: Path) -> None:
    job_id = await mailfax.queued(letter("Offer", documents.pdf(2)))
    job = final_job(mailfax, job_id)
    assert (job["state"], job["pages"]) == ("delivered", 2)
    delivered = mail_of(mailfax, job_id, "delivered")
    report = attachments(delivered)["transmission-report.pdf"]
    (tmp_path / "report.pdf").write_bytes(report)

    [image] = pdfimages(tmp_path / "report.pdf")  # page 1 as the recipient received it
    assert (image["color"], image["bpc"]) == ("gray", "1")
    assert int(image["x-ppi"]) / int(image["y-ppi"]) == pytest.approx(204 / 98, rel=0.02)
    text = " ".join(pypdf.PdfReader(io.BytesIO(report)).pages[0].extract_text().split())
    for fact in ("Transmission report", "Sender Alice <alice@example.org>",
                 "Recipient number +49 30 123456", "Pages sent 2 of 2",
                 f"mailfax job {job_id}", f"Provider job id {job['provider_job_id']}"):
        assert fact in text, (fact, text)

    subprocess.run(["pdftoppm", "-r", "50", "-png", "-singlefile", str(tmp_path / "report.pdf"),
                    str(tmp_path / "report")], check=True, timeout=60)
    with Image.open(tmp_path / "report.png") as page:  # what the sender sees when opening it
        ink = ImageOps.invert(page.convert("L")).getbbox()
        assert ink is not None and ink[3] - ink[1] > page.height / 2  # facts and page image


def acceptance_mail(mailfax: Mailfax, job_id: str) -> EmailMessage:
    return eventually(lambda: next(
        (mail for mail in mailfax.mails() if mail["X-Mailfax-Job"] == job_id
         and "accepted" in str(mail["Subject"])), None), 60, f"the acceptance mail of {job_id}")


async def test_a_light_grey_page_is_named_in_the_acceptance_mail(mailfax: Mailfax) -> None:
    """Checked after the 250 (in mailfax's worker process): the reply is the plain one, the
    acceptance mail names the page, and the fax goes out after its check."""
    code, reply = await mailfax.send(letter("Grey offer", grey_second_page()))
    assert code == 250, reply
    found = re.fullmatch(r"2\.0\.0 queued as ([0-9a-z]{12})", reply)
    assert found, reply
    job_id = found.group(1)
    accepted = acceptance_mail(mailfax, job_id)  # mailed although "accepted" is not asked for
    assert "warning: page 2 may arrive blank" in str(accepted["Subject"])
    plain = accepted.get_body(("plain",))
    assert plain is not None
    text = plain.get_content()
    assert "Page 2 may arrive blank at the fax (light grey text)." in text
    assert "Page 1 " not in text
    job = final_job(mailfax, job_id)
    assert job["state"] == "delivered"  # a warning, not a refusal
    assert job["options"]["readiness"] == "checked"
    assert [warning["page"] for warning in job["options"]["warnings"]] == [2]
    assert sum(mail["X-Mailfax-Job"] == job_id and "accepted" in str(mail["Subject"])
               for mail in mailfax.mails()) == 1


async def test_a_delay_holds_the_fax_in_mailfax_s_queue_until_its_time(mailfax: Mailfax) -> None:
    before = time.time()
    job_id = await mailfax.queued(letter("Later", documents.pdf(1), X_Fax_Delay="20s"))
    job = eventually(lambda: next((job for job in [mailfax.job(job_id)]  # its check is done
                                   if job["options"].get("readiness") != "pending"), None),
                     60, f"the fax-readiness check of {job_id}")
    assert (job["state"], job["attempts"]) == ("queued", 0)
    due = datetime.fromisoformat(job["next_attempt_at"]).timestamp()
    assert before + 19 <= due <= time.time() + 21
    assert mailfax.emulator_ledger(job_id) is None  # the emulator has not seen it
    assert final_job(mailfax, job_id, timeout=90)["state"] == "delivered"
    assert time.time() >= due


@pytest.mark.parametrize(("headers", "code", "sentence"), [
    ({"X_Fax_Header": "Kanzlei Müller"}, 554, "5.3.3"),
    ({"X_Fax_Priority": "urgent"}, 554, "5.6.0 X-Fax-Priority: 'urgent'"),
    ({"X_Fax_Send_At": "2020-01-01 08:00"}, 554, "5.6.0"),
])
async def test_an_option_that_cannot_be_done_is_refused_with_a_sentence(
        mailfax: Mailfax, headers: dict[str, str], code: int, sentence: str) -> None:
    jobs = len(mailfax.jobs())
    got, reply = await mailfax.send(letter("Refused", documents.pdf(1), **headers))
    assert (got, reply[:len(sentence)]) == (code, sentence), reply
    if "5.3.3" in sentence:
        assert "emulator" in reply.lower() and "header" in reply.lower()
    assert len(mailfax.jobs()) == jobs  # nothing queued


async def test_x_fax_return_document_attaches_the_fax_as_sent(mailfax: Mailfax) -> None:
    job_id = await mailfax.queued(letter("With copy", documents.pdf(2),
                                         X_Fax_Return_Document="yes"))
    assert final_job(mailfax, job_id)["state"] == "delivered"
    attached = attachments(mail_of(mailfax, job_id, "delivered"))
    assert set(attached) == {"transmission-report.pdf", f"fax-as-sent-{job_id}.pdf"}
    assert len(pypdf.PdfReader(io.BytesIO(attached[f"fax-as-sent-{job_id}.pdf"])).pages) == 2
