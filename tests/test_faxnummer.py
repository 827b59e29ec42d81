"""Faxnummer.de: the real adapter over HTTP against the bundled emulator on loopback."""

from __future__ import annotations

import asyncio
import email
import email.policy
import io
import logging
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

import httpx
import pikepdf
import pytest
from pydantic import ValidationError

from mailfax.app import Application
from mailfax.documents.pdf import prepare_pdf
from mailfax.emulators import faxnummer as emulator
from mailfax.emulators.faxnummer import FaxnummerEmulator
from mailfax.model import JobState
from mailfax.providers import account_settings, faxnummer, q850
from mailfax.providers.base import (
    FaxDocument,
    ProviderContext,
    ProviderError,
    ProviderRef,
    ResendHandling,
    SendReceipt,
    SendRequest,
    StatusReport,
)
from mailfax.providers.faxnummer import FaxnummerProvider, ResponseFormatError, parse_response
from mailfax.providers.http import parse_retry_after
from tests.conftest import Service, make_settings

LOGIN = "acc12345"
CODE = "s3cr3t-Kennwort"
StartEmulator = Callable[..., Awaitable[FaxnummerEmulator]]


class OpenProvider(Protocol):
    def __call__(self, url: str, **overrides: Any) -> FaxnummerProvider: ...


def account(url: str, **overrides: Any) -> dict[str, Any]:
    return {"url": url, "product_login": LOGIN, "product_code": CODE,
            "status_email": "fax-admin@example.org", "source_number": "+4930555000",
            "timeout_seconds": 2, "connect_retries": 0, **overrides}


@pytest.fixture
async def start_emulator() -> AsyncIterator[StartEmulator]:
    started: list[FaxnummerEmulator] = []

    async def start(**options: str) -> FaxnummerEmulator:
        running = await emulator.start(
            "127.0.0.1", 0, {"login": LOGIN, "code": CODE, "delay": "0.4", **options})
        started.append(running)
        return running

    yield start
    for running in started:
        await running.close()


@pytest.fixture
async def fax_emulator(start_emulator: StartEmulator) -> FaxnummerEmulator:
    return await start_emulator(fail="+4930999:17")


@pytest.fixture
async def open_provider(tmp_path: Path) -> AsyncIterator[OpenProvider]:
    opened: list[FaxnummerProvider] = []

    def open_provider(url: str, **overrides: Any) -> FaxnummerProvider:
        settings = faxnummer.Settings.model_validate(account(url, **overrides))
        provider = faxnummer.create(ProviderContext(account="main", data_dir=tmp_path), settings)
        opened.append(provider)
        return provider

    yield open_provider
    for provider in opened:
        await provider.close()


@pytest.fixture
def letter(corpus: Path) -> FaxDocument:
    return prepare_pdf("letter.pdf", (corpus / "pdf" / "two-different-pages.pdf").read_bytes())


def fax_request(*documents: FaxDocument, number: str = "+4930123456", job_id: str = "job1",
                **extra: Any) -> SendRequest:
    return SendRequest(job_id=job_id, number=number, documents=documents,
                       pages=sum(document.pages for document in documents), **extra)


async def wait_for(provider: FaxnummerProvider, receipt: SendReceipt, state: JobState,
                   timeout: float = 5.0) -> tuple[StatusReport, list[JobState]]:
    """Polls until ``state``; returns the last report and every state seen on the way."""
    ref = ProviderRef(receipt.job_id, receipt.provider_job_id)
    seen: list[JobState] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        report = (await provider.status([ref]))[ref.job_id]
        if not seen or seen[-1] != report.state:
            seen.append(report.state)
        if report.state == state:
            return report, seen
        await asyncio.sleep(0.03)
    raise AssertionError(f"never reached {state}, saw {seen}")


# -- sending --------------------------------------------------------------------------------

async def test_send_posts_the_documented_fields_and_the_pdf_as_a_file_part(
        fax_emulator: FaxnummerEmulator, open_provider: OpenProvider,
        letter: FaxDocument) -> None:
    provider = open_provider(fax_emulator.url, sender_name="Kanzlei Weiß")
    receipt = await provider.send(fax_request(letter, job_id="k3x9"))

    assert receipt.provider_job_id.startswith(f"faxsend-{LOGIN}-")
    assert (receipt.pages, receipt.duplicate) == (2, False)
    [fax] = fax_emulator.state.faxes
    assert fax.fields == {
        "sProductLogin": LOGIN, "sCommand": "SendFax", "sDestination": "004930123456",
        "sEmail": "fax-admin@example.org", "mimeType": "application/pdf",
        "sFaxFileName": "letter.pdf [k3x9]", "sSender": "Kanzlei Weiss",
        "sSource": "004930555000"}
    assert (fax.content_type, fax.pdf, fax.pages) == ("application/pdf", letter.data, 2)


async def test_header_of_the_job_becomes_the_sender_in_ascii(
        fax_emulator: FaxnummerEmulator, open_provider: OpenProvider,
        letter: FaxDocument) -> None:
    provider = open_provider(fax_emulator.url, sender_name="ignored")
    await provider.send(fax_request(letter, header="Müller & Söhne Großhandel GmbH"))
    assert fax_emulator.state.faxes[0].fields["sSender"] == "Mueller & Soehne Gro"


@pytest.mark.parametrize(("text", "sent"), [
    ("Ärztehaus Überlingen", "Aerztehaus Ueberling"),
    ("Straße 5", "Strasse 5"),
    ("Café Crème – Déjà vu", "Cafe Creme - Deja vu"),
    ("Łódź  Øresund\tÅ", "Lodz Oeresund Aa"),
    ("日本 Fax", "Fax"),
    ("+49 30 1234567", "+49 30 1234567"),
    ("", ""),
])
def test_sender_is_at_most_20_printable_ascii_characters(text: str, sent: str) -> None:
    assert faxnummer.fax_sender(text) == sent


async def test_two_documents_go_as_one_merged_pdf_named_after_the_subject(
        fax_emulator: FaxnummerEmulator, open_provider: OpenProvider, corpus: Path) -> None:
    first = prepare_pdf("a.pdf", (corpus / "pdf" / "two-different-pages.pdf").read_bytes())
    second = prepare_pdf("b.pdf", (corpus / "pdf" / "Seige_of_Vicksburg_Sample_OCR.pdf")
                         .read_bytes())
    provider = open_provider(fax_emulator.url)
    receipt = await provider.send(fax_request(first, second, subject="Offer 7", job_id="m1"))

    [fax] = fax_emulator.state.faxes
    assert receipt.pages == fax.pages == first.pages + second.pages == 8
    with pikepdf.open(io.BytesIO(fax.pdf)) as pdf:
        assert len(pdf.pages) == 8
    assert fax.fields["sFaxFileName"] == "Offer 7 [m1]"


async def test_one_mail_to_several_numbers_sends_each_once(
        fax_emulator: FaxnummerEmulator, open_provider: OpenProvider,
        letter: FaxDocument) -> None:
    provider = open_provider(fax_emulator.url)
    documents = (letter,)
    results = await provider.send_many([
        fax_request(*documents, number="+4930111111", job_id="a"),
        fax_request(*documents, number="+4930222222", job_id="b")])
    assert all(isinstance(result, SendReceipt) for result in results)
    assert sorted(fax.fields["sDestination"] for fax in fax_emulator.state.faxes) == [
        "004930111111", "004930222222"]


# -- status ---------------------------------------------------------------------------------

async def test_status_goes_from_new_through_running_to_delivered(
        fax_emulator: FaxnummerEmulator, open_provider: OpenProvider,
        letter: FaxDocument) -> None:
    provider = open_provider(fax_emulator.url)
    receipt = await provider.send(fax_request(letter))
    report, seen = await wait_for(provider, receipt, JobState.DELIVERED)
    assert seen == [JobState.SUBMITTED, JobState.SENDING, JobState.DELIVERED]
    assert (report.pages, report.duration_seconds, report.remote_id) == (2, 41, "EMULATOR")
    assert report.reason is None
    assert report.finished_at is not None and report.finished_at.tzinfo is not None
    assert abs(report.finished_at.timestamp() - time.time()) < 60


@pytest.mark.parametrize(("cause", "code"), [
    (1, "invalid_number"), (3, "invalid_number"), (16, "transmission_failed"), (17, "busy"),
    (18, "no_answer"), (19, "no_answer"), (21, "call_failed"), (27, "no_service"),
    (28, "invalid_number"), (31, "call_failed"), (34, "call_failed"), (38, "call_failed"),
    (41, "call_failed"), (44, "call_failed"), (88, "not_a_fax"), (127, "call_failed"),
    (99, "unknown"),
])
async def test_done_error_fails_with_the_reason_of_its_q850_cause(
        start_emulator: StartEmulator, open_provider: OpenProvider, letter: FaxDocument,
        cause: int, code: str) -> None:
    running = await start_emulator(fail=f"+4930999:{cause}", delay="0.1")
    provider = open_provider(running.url)
    receipt = await provider.send(fax_request(letter, number="+4930999123"))
    report, _ = await wait_for(provider, receipt, JobState.FAILED)
    assert report.reason is not None
    assert report.reason.code == code
    assert f"Q.850 cause {cause}" in report.reason.detail
    assert report.reason.for_language("en") and report.reason.for_language("de")
    assert report.pages == 0


async def test_busy_line_reads_as_busy_in_both_languages(
        fax_emulator: FaxnummerEmulator, open_provider: OpenProvider,
        letter: FaxDocument) -> None:
    provider = open_provider(fax_emulator.url)
    receipt = await provider.send(fax_request(letter, number="+4930999555"))
    report, _ = await wait_for(provider, receipt, JobState.FAILED)
    assert report.reason is not None
    assert report.reason.for_language("en") == "The line was busy."
    assert report.reason.for_language("de") == "Die Gegenstelle war besetzt."


async def test_retry_is_reported_as_retrying_with_its_cause_before_delivery(
        start_emulator: StartEmulator, open_provider: OpenProvider,
        letter: FaxDocument) -> None:
    running = await start_emulator(retry="+4930997:17", delay="0.8")
    provider = open_provider(running.url)
    receipt = await provider.send(fax_request(letter, number="+4930997000"))
    retrying, _ = await wait_for(provider, receipt, JobState.RETRYING)
    assert retrying.reason is not None and retrying.reason.code == "busy"
    assert "4 tries remaining" in retrying.reason.detail
    _, seen = await wait_for(provider, receipt, JobState.DELIVERED)
    assert seen[-2:] == [JobState.SENDING, JobState.DELIVERED]


async def test_status_of_an_unknown_job_does_not_hide_the_others(
        fax_emulator: FaxnummerEmulator, open_provider: OpenProvider,
        letter: FaxDocument) -> None:
    provider = open_provider(fax_emulator.url)
    receipt = await provider.send(fax_request(letter))
    reports = await provider.status([ProviderRef("gone", "faxsend-unknown"),
                                     ProviderRef(receipt.job_id, receipt.provider_job_id)])
    assert list(reports) == [receipt.job_id]
    with pytest.raises(ProviderError) as unknown:
        await provider.status([ProviderRef("gone", "faxsend-unknown")])
    assert unknown.value.transient


def test_status_entry_is_the_one_of_our_job_among_several() -> None:
    fields = parse_response("WR_Status=ok\nWR_DataList_ObjectCount=2\n"
                            "WR_DataList_1_JobUUID=other\nWR_DataList_1_Status=DONE-OK\n"
                            "WR_DataList_2_JobUUID=ours\nWR_DataList_2_Status=RUNNING\n")
    entry = faxnummer.status_entry(fields, "ours")
    assert entry is not None
    report = faxnummer.report_for(entry)
    assert report is not None and report.state == JobState.SENDING
    assert faxnummer.report_for({"status": "PAUSED"}) is None


# -- answer formats -------------------------------------------------------------------------

@pytest.mark.parametrize("ok", ["ok", "OK"])
@pytest.mark.parametrize("format", emulator.FORMATS)
async def test_every_answer_format_works_from_send_to_delivery(
        start_emulator: StartEmulator, open_provider: OpenProvider, letter: FaxDocument,
        format: str, ok: str) -> None:
    running = await start_emulator(format=format, ok=ok, delay="0.2")
    provider = open_provider(running.url)
    receipt = await provider.send(fax_request(letter))
    report, _ = await wait_for(provider, receipt, JobState.DELIVERED)
    assert report.pages == 2
    assert report.detail["faxfilename"] == "letter.pdf [job1]"


@pytest.mark.parametrize("format", emulator.FORMATS)
def test_parser_reads_back_what_the_emulator_renders(format: str) -> None:
    answer = {"WR_Status": "failed", "WR_Comment": "Fax wrong format",
              "WR_DataList_1_CreateDateTime": "2019-05-12 12:34:56",
              "WR_DataList_1_FaxFileName": "Referenz #1234XY & a/b?c=d [j1]"}
    body, _ = emulator.render(answer, format)
    assert parse_response(body.decode()) == {key.lower(): value for key, value in answer.items()}


@pytest.mark.parametrize(("body", "expected"), [
    ("\ufeffWR_STATUS: OK\r\nWR_Request_UUID: faxsend-x\r\n\r\n",
     {"wr_status": "OK", "wr_request_uuid": "faxsend-x"}),
    ("WR_Status=ok", {"wr_status": "ok"}),
    ('{"WR_Status": "ok", "WR_DataList": [{"Status": "NEW", "PagesSent": 0}]}',
     {"wr_status": "ok", "wr_datalist_1_status": "NEW", "wr_datalist_1_pagessent": "0"}),
    ("<r><WR_Status>ok</WR_Status><WR_Comment/></r>", {"wr_status": "ok", "wr_comment": ""}),
])
def test_parser_copes_with_awkward_but_readable_answers(body: str,
                                                       expected: dict[str, str]) -> None:
    assert parse_response(body) == expected


@pytest.mark.parametrize("body", [
    "", "<html><body><b>Fatal error</b>: ", "[1, 2]", "{not json",
    "Internal Server Error\nsomething broke",
    '<!DOCTYPE r [<!ENTITY x "y">]><r><WR_Status>&x;</WR_Status></r>',
])
def test_parser_refuses_what_it_cannot_read(body: str) -> None:
    with pytest.raises(ResponseFormatError):
        parse_response(body)


async def test_a_recorded_answer_through_a_mock_transport(tmp_path: Path,
                                                         letter: FaxDocument) -> None:
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, text="WR_STATUS: OK\nWR_REQUEST_UUID: faxsend-acc1-abc\n",
                              headers={"Content-Type": "text/html; charset=ISO-8859-1"})

    settings = faxnummer.Settings.model_validate(account("https://fax.invalid/index.php"))
    client = httpx.AsyncClient(transport=httpx.MockTransport(answer))
    provider = FaxnummerProvider(ProviderContext(account="main", data_dir=tmp_path), settings,
                                 client)
    receipt = await provider.send(fax_request(letter))
    await provider.close()
    assert receipt.provider_job_id == "faxsend-acc1-abc"
    body = seen[0].content
    assert seen[0].headers["Content-Type"].startswith("multipart/form-data; boundary=")
    assert b'name="sFax"; filename="letter.pdf"\r\nContent-Type: application/pdf' in body


# -- refusals -------------------------------------------------------------------------------

async def test_wrong_password_is_permanent_and_logged_at_error_without_it(
        fax_emulator: FaxnummerEmulator, open_provider: OpenProvider, letter: FaxDocument,
        caplog: pytest.LogCaptureFixture) -> None:
    provider = open_provider(fax_emulator.url, product_code="wrong-Passwort-42")
    with caplog.at_level(logging.DEBUG), pytest.raises(ProviderError) as refused:
        await provider.send(fax_request(letter))
    assert refused.value.reason.code == "provider_auth"
    assert not refused.value.transient
    assert "Productcode invalid" in refused.value.reason.detail
    errors = [record for record in caplog.records if record.levelno == logging.ERROR]
    assert errors and LOGIN in errors[0].getMessage()
    assert "wrong-Passwort-42" not in caplog.text
    assert fax_emulator.state.faxes == []


async def test_status_with_a_wrong_password_is_a_permanent_error(
        fax_emulator: FaxnummerEmulator, open_provider: OpenProvider) -> None:
    provider = open_provider(fax_emulator.url, product_code="wrong")
    with pytest.raises(ProviderError) as refused:
        await provider.status([ProviderRef("job1", "faxsend-x")])
    assert (refused.value.reason.code, refused.value.transient) == ("provider_auth", False)


@pytest.mark.parametrize(("comment", "code", "transient"), [
    ("Failed to send Fax", "provider_error", True),
    ("Fax wrong format", "document_rejected", False),
    ("Destination wrong format", "invalid_number", False),
    ("Email wrong format", "provider_account", False),
    ("Productcode invalid", "provider_auth", False),
    ("Webrequest is not available for this account", "provider_auth", False),
    ("Insufficient credit", "provider_error", True),  # not documented: try again
])
async def test_every_documented_refusal_has_its_reason(
        start_emulator: StartEmulator, open_provider: OpenProvider, letter: FaxDocument,
        comment: str, code: str, transient: bool) -> None:
    running = await start_emulator(send_comment=comment)
    provider = open_provider(running.url)
    with pytest.raises(ProviderError) as refused:
        await provider.send(fax_request(letter))
    assert (refused.value.reason.code, refused.value.transient) == (code, transient)
    assert comment in refused.value.reason.detail
    assert refused.value.reason.for_language("de")


async def test_unknown_login_is_refused_permanently(
        fax_emulator: FaxnummerEmulator, open_provider: OpenProvider,
        letter: FaxDocument) -> None:
    provider = open_provider(fax_emulator.url, product_login="acc99999")
    with pytest.raises(ProviderError) as refused:
        await provider.send(fax_request(letter))
    assert (refused.value.reason.code, refused.value.transient) == ("provider_auth", False)


async def test_what_the_emulator_checks_itself(
        fax_emulator: FaxnummerEmulator, open_provider: OpenProvider,
        letter: FaxDocument) -> None:
    provider = open_provider(fax_emulator.url)
    not_pdf = FaxDocument(filename="x.pdf", data=b"GIF89a not a pdf", pages=1)
    with pytest.raises(ProviderError) as rejected:
        await provider.send(fax_request(not_pdf))
    assert rejected.value.reason.code == "document_rejected"
    with pytest.raises(ProviderError) as short:
        await provider.send(fax_request(letter, number="+491"))
    assert short.value.reason.code == "invalid_number"
    assert fax_emulator.state.faxes == []


# -- trouble on the way ---------------------------------------------------------------------

async def test_503_with_retry_after_is_transient_and_the_next_attempt_passes(
        start_emulator: StartEmulator, open_provider: OpenProvider,
        letter: FaxDocument) -> None:
    running = await start_emulator(http_error="503", retry_after="7")
    provider = open_provider(running.url)
    with pytest.raises(ProviderError) as unavailable:
        await provider.send(fax_request(letter))
    assert (unavailable.value.reason.code, unavailable.value.transient) == (
        "provider_unavailable", True)
    assert unavailable.value.retry_after == 7
    assert not unavailable.value.maybe_sent  # 503: not acted on, a resend is safe
    receipt = await provider.send(fax_request(letter, attempt=2))
    assert not receipt.duplicate
    assert len(running.state.faxes) == 1


async def test_500_without_retry_after_is_transient(
        start_emulator: StartEmulator, open_provider: OpenProvider,
        letter: FaxDocument) -> None:
    running = await start_emulator(http_error="500")
    with pytest.raises(ProviderError) as failed:
        await open_provider(running.url).send(fax_request(letter))
    assert failed.value.transient and failed.value.retry_after is None
    assert failed.value.maybe_sent  # a 500 may come after the job was created


@pytest.mark.parametrize(("status", "code", "transient"), [
    (400, "provider_error", False), (401, "provider_auth", False),
    (403, "provider_auth", False), (404, "provider_error", False),
    (429, "provider_unavailable", True), (500, "provider_error", True),
    (502, "provider_unavailable", True), (503, "provider_unavailable", True)])
def test_http_status_becomes_a_typed_error(status: int, code: str, transient: bool) -> None:
    assert faxnummer.http_error(200, None, "SendFax") is None
    error = faxnummer.http_error(status, "7", "SendFax")
    assert error is not None
    assert (error.reason.code, error.transient) == (code, transient)
    assert error.reason.detail == f"SendFax: HTTP {status}"
    assert error.retry_after == (7 if transient else None)


def test_retry_after_as_an_http_date() -> None:
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:30 GMT",
                                       now=1445412480.0) == 30.0
    assert parse_retry_after("soon") is None


@pytest.mark.parametrize("fault", [{"drop": "1"}, {"slow": "1.2"}, {"malformed": "1"}],
                         ids=["dropped", "timeout", "malformed"])
@pytest.mark.parametrize("duplicates", ["none", "reference"])
async def test_a_lost_answer_may_have_sent_the_fax_and_only_the_optimistic_mode_knows_a_resend(
        start_emulator: StartEmulator, open_provider: OpenProvider, letter: FaxDocument,
        fault: dict[str, str], duplicates: str) -> None:
    running = await start_emulator(duplicates=duplicates, **fault)
    provider = open_provider(running.url, timeout_seconds=0.5)
    with pytest.raises(ProviderError) as lost:
        await provider.send(fax_request(letter, job_id="once"))
    assert lost.value.transient and lost.value.maybe_sent
    assert len(running.state.faxes) == 1  # it did arrive
    # The dispatcher never resends this by itself (see test_dispatch); a deliberate resend:
    receipt = await provider.send(fax_request(letter, job_id="once", attempt=2))
    if duplicates == "reference":  # the emulator's invention, not the vendor's
        [fax] = running.state.faxes
        assert receipt.duplicate and (fax.uuid, fax.send_calls) == (receipt.provider_job_id, 2)
    else:  # what the docs allow: a second fax
        assert not receipt.duplicate and len(running.state.faxes) == 2


def test_the_adapter_declares_that_a_resend_is_not_recognised(
        open_provider: OpenProvider) -> None:
    provider = open_provider("http://127.0.0.1:9/index.php")
    assert provider.resend_handling == ResendHandling.NOT_RECOGNISED
    assert provider.unconfirmed_ref("job1") is None  # GetSentFaxStatus needs the lost UUID


@pytest.mark.parametrize(("status", "body", "maybe"), [
    (503, "", False), (502, "", False), (429, "", False), (500, "", True), (504, "", True),
    (200, "<html>Fatal error", True), (200, "WR_Status=ok\n", True),
    (200, "WR_Status=later\n", True), (200, "WR_Status=failed\nWR_Comment=Whatever\n", False)])
def test_which_sendfax_failures_may_have_created_a_job(status: int, body: str,
                                                        maybe: bool) -> None:
    assert faxnummer.may_have_created_a_job(status, body) is maybe


async def test_unreachable_provider_is_transient(open_provider: OpenProvider,
                                                 letter: FaxDocument) -> None:
    running = await emulator.start("127.0.0.1", 0, {})
    url = running.url
    await running.close()
    with pytest.raises(ProviderError) as unreachable:
        await open_provider(url, connect_retries=1).send(fax_request(letter))
    assert (unreachable.value.reason.code, unreachable.value.transient) == (
        "provider_unavailable", True)


# -- settings and tables --------------------------------------------------------------------

def test_password_never_shows_and_the_docs_names_are_accepted() -> None:
    settings = faxnummer.Settings.model_validate({
        "sProductLogin": LOGIN, "sProductCode": CODE, "sEmail": "a@example.org"})
    assert settings.url == account_settings.DEFAULT_URL
    assert CODE not in repr(settings) and CODE not in str(settings.model_dump())
    with pytest.raises(ValidationError):
        faxnummer.Settings.model_validate({**account("x"), "password": CODE})


def test_q850_table_has_every_cause_in_both_languages() -> None:
    for value in (1, 3, 16, 17, 18, 19, 21, 27, 28, 31, 34, 38, 41, 44, 127):
        cause = q850.cause(value)
        assert cause is not None and cause.english and cause.german
    assert q850.reason_for(None).code == "unknown"


def test_emulator_refuses_unknown_options() -> None:
    with pytest.raises(ValueError, match="unknown option"):
        emulator.parse_options({"colour": "blue"})
    with pytest.raises(ValueError, match="format"):
        emulator.parse_options({"format": "yaml"})


# -- the whole service ----------------------------------------------------------------------

async def test_mail_in_fax_out_through_faxnummer_and_delivered_mail_back(
        tmp_path: Path, start_emulator: StartEmulator, corpus: Path) -> None:
    running = await start_emulator(delay="0.3", format="json")
    settings = make_settings(tmp_path, accounts={"main": {"provider": "faxnummer.de",
                                                          **account(running.url)}},
                             default_account="main")
    app = Application(settings)
    await app.start()
    try:
        service = Service(app)
        pdf = (corpus / "pdf" / "two-different-pages.pdf").read_bytes()
        await service.fax_pdf(pdf)
        status = await service.wait_for_mail(lambda m: m["X-Mailfax-State"] == "delivered")
    finally:
        await app.stop()
    parsed = email.message_from_bytes(bytes(status), policy=email.policy.default)
    assert parsed["To"] == "alice@example.org"
    [fax] = running.state.faxes
    assert fax.pdf == pdf
    assert fax.fields["sDestination"] == "004930123456"
    assert fax.fields["sFaxFileName"] == f"offer.pdf [{parsed['X-Mailfax-Job']}]"


async def mailfax_cli(settings_dir: Path, *args: str) -> tuple[int, str]:
    """``mailfax ARGS`` in a process of its own, on the store of a service's data dir."""
    config = settings_dir / "cli.toml"
    config.write_text(f'data_dir = "{settings_dir / "data"}"\n')
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mailfax", "-c", str(config), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    output, _ = await process.communicate()
    return process.returncode or 0, output.decode()


async def test_a_lost_answer_leaves_one_fax_an_unconfirmed_job_a_mail_and_retry_sends_again(
        tmp_path: Path, start_emulator: StartEmulator, corpus: Path) -> None:
    """Pessimistic emulator (no duplicate detection): the answer to SendFax is lost after
    the fax was accepted. mailfax must not send it again by itself."""
    running = await start_emulator(delay="0.3", drop="1")
    settings = make_settings(
        tmp_path, accounts={"main": {"provider": "faxnummer.de", **account(running.url)}},
        default_account="main", inbound={"ocr": "off", "postmaster": "fax-admin@example.org"})
    app = Application(settings)
    await app.start()
    try:
        service = Service(app)
        pdf = (corpus / "pdf" / "two-different-pages.pdf").read_bytes()
        await service.fax_pdf(pdf)
        told = await service.wait_for_mail(lambda m: m["X-Mailfax-State"] == "unconfirmed")
        job_id = told["X-Mailfax-Job"]
        await asyncio.sleep(1.5)  # several retry intervals: nothing is resent
        assert len(running.state.faxes) == 1
        [job] = await app.store.list_jobs()
        assert (job.state, job.attempts) == (JobState.UNCONFIRMED, 1)
        parsed = email.message_from_bytes(bytes(told), policy=email.policy.default)
        assert parsed["To"] == "alice@example.org" and parsed["Cc"] == "fax-admin@example.org"
        assert "may have been sent" in parsed["Subject"]
        body = parsed.get_body(("plain",))
        assert body is not None
        text = body.get_content()
        assert "MAY HAVE BEEN SENT" in text and f"mailfax retry {job_id}" in text
        mails = [m for m in service.outbox_messages() if m["X-Mailfax-Job"] == job_id]
        assert len(mails) == 1  # one clear mail, not one per poll

        code, output = await mailfax_cli(tmp_path, "retry", job_id, "nosuchjob")
        assert code == 1
        assert f"job {job_id} queued again" in output and "no job nosuchjob" in output
        await service.wait_for_mail(lambda m: m["X-Mailfax-State"] == "delivered")
        assert len(running.state.faxes) == 2  # the deliberate resend, once
        code, output = await mailfax_cli(tmp_path, "retry", job_id)
        assert code == 1 and "is delivered: only failed, cancelled or unconfirmed" in output
    finally:
        await app.stop()


async def test_a_large_document_in_its_file_is_merged_and_sent_whole_to_each_number(
        fax_emulator: FaxnummerEmulator, open_provider: OpenProvider,
        letter: FaxDocument, tmp_path: Path) -> None:
    """A large mail's document in its file: merged with the letter (qpdf reads the file),
    then each form part read as the body goes out (the emulator refuses a chunked body)."""
    from bench.memory import random_pdf
    from mailfax.documents.mapped import document_file

    scan = FaxDocument("scan.pdf", document_file(tmp_path, [random_pdf(3_000_000)]), 4)
    provider = open_provider(fax_emulator.url)
    results = await provider.send_many([fax_request(scan, letter, job_id="a"),
                                        fax_request(scan, letter, job_id="b",
                                                    number="+4930654321")])
    assert [type(result) for result in results] == [SendReceipt, SendReceipt]
    first, second = fax_emulator.state.faxes
    assert first.pdf == second.pdf and (first.pages, second.pages) == (6, 6)
    with pikepdf.open(io.BytesIO(first.pdf)) as merged, \
            pikepdf.open(io.BytesIO(scan.data[:])) as original:
        assert merged.pages[0].Contents.read_bytes() == original.pages[0].Contents.read_bytes()
