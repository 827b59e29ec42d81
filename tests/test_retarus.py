"""Retarus Fax4A: the adapter against the emulator over real HTTP on loopback, and the pure
parts (codes, names, push parsing) on their own."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from mailfax.app import Application, load_secret_key
from mailfax.emulators import retarus as emulator_module
from mailfax.emulators.retarus import Fault, RetarusEmulator
from mailfax.model import JobState
from mailfax.providers import retarus
from mailfax.providers import retarus_codes as codes
from mailfax.providers.base import (
    FaxDocument,
    ProviderContext,
    ProviderError,
    ProviderRef,
    ResendHandling,
    SendRequest,
    StatusReport,
)
from mailfax.store.base import Job, NewJob, NewMail
from mailfax.store.sqlite import SqliteStore
from mailfax.web.server import build_web_app, runner_url, start_web
from tests.conftest import Service, fax_mail, make_settings
from tests.ports import free_port

PDF = b"%PDF-1.4\n1 0 obj << /Type /Page >> endobj\n%%EOF\n"
TWO_PAGES = b"%PDF-1.4\n<< /Type /Page >> << /Type /Page >> << /Type /Pages >>\n%%EOF\n"


@pytest.fixture
async def emulator() -> AsyncIterator[RetarusEmulator]:
    emu = await emulator_module.start("127.0.0.1", 0, {"delay": "0.2"})
    try:
        yield emu
    finally:
        await emu.close()


Reported = list[dict[str, StatusReport]]


def make_provider(emu: RetarusEmulator, tmp_path: Path, *, push_base_url: str | None = None,
                  reported: Reported | None = None, woken: list[list[str]] | None = None,
                  get_job: Callable[[str], Awaitable[Job | None]] | None = None,
                  **overrides: Any) -> retarus.RetarusProvider:
    async def report_status(reports: dict[str, StatusReport]) -> None:
        if reported is not None:
            reported.append(reports)

    async def wake_tracker(job_ids: Sequence[str]) -> None:
        if woken is not None:
            woken.append(list(job_ids))

    context = ProviderContext(account="main", data_dir=tmp_path, push_base_url=push_base_url,
                              secret_key=b"k" * 32, report_status=report_status,
                              wake_tracker=wake_tracker, get_job=get_job)
    settings = retarus.Settings.model_validate({**emu.provider_settings(), **overrides})
    return retarus.create(context, settings)


@pytest.fixture
async def provider(emulator: RetarusEmulator, tmp_path: Path
                   ) -> AsyncIterator[retarus.RetarusProvider]:
    adapter = make_provider(emulator, tmp_path)
    try:
        yield adapter
    finally:
        await adapter.close()


def fax(job_id: str, number: str = "+4930123456", *, attempt: int = 1,
        documents: list[FaxDocument] | None = None, **extra: Any) -> SendRequest:
    documents = documents or [FaxDocument("letter.pdf", PDF, 1)]
    return SendRequest(job_id=job_id, number=number, documents=documents, pages=1,
                       attempt=attempt, **extra)


async def until(condition: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def final_report(adapter: retarus.RetarusProvider, ref: ProviderRef) -> StatusReport:
    found: dict[str, StatusReport] = {}

    async def done() -> bool:
        found.update(await adapter.status([ref]))
        return ref.job_id in found and found[ref.job_id].state.is_final

    await until(done)
    return found[ref.job_id]


# --- sending ---------------------------------------------------------------------------------

async def test_send_posts_one_job_with_reference_csid_rendering_and_documents(
        emulator: RetarusEmulator, tmp_path: Path) -> None:
    adapter = make_provider(emulator, tmp_path, station_id="+49 30 1234", paper_format="LETTER",
                            resolution="LOW")
    try:
        receipt = await adapter.send(fax("job1", documents=[
            FaxDocument("Brief an Müller.pdf", PDF, 1), FaxDocument("anlage.pdf", TWO_PAGES, 2)]))
    finally:
        await adapter.close()
    job = emulator.state.jobs[receipt.provider_job_id]
    assert receipt.duplicate is False
    assert job.customer_defined_id == "job1"
    assert job.number == "+4930123456"
    assert job.documents == [("Brief_an_Mueller.pdf", PDF), ("anlage.pdf", TWO_PAGES)]
    assert job.pages == 3
    assert job.request["transportOptions"]["csid"] == "+49 30 1234"
    assert job.request["renderingOptions"] == {"paperFormat": "LETTER", "resolution": "LOW"}
    assert "statusReportOptions" not in job.request  # no web endpoint: no push asked for
    assert emulator.state.requests_to("HA", "send") == 1


async def test_send_asks_for_a_push_with_credentials_of_its_own(
        emulator: RetarusEmulator, tmp_path: Path) -> None:
    adapter = make_provider(emulator, tmp_path, push_base_url="https://fax.example/push/main")
    try:
        receipt = await adapter.send(fax("job1"))
    finally:
        await adapter.close()
    push = emulator.state.jobs[receipt.provider_job_id].request["statusReportOptions"][
        "httpStatusPush"]
    assert push == {"targetUrl": "https://fax.example/push/main/job/job1",
                    "authMethod": "HTTP_BASIC", "principal": "mailfax",
                    "credentials": adapter.context.push_token("retarus", "job1")}
    assert emulator.password not in json.dumps(push)


async def test_201_created_is_accepted_like_200(tmp_path: Path) -> None:
    emu = await emulator_module.start("127.0.0.1", 0, {"accept_status": "201"})
    adapter = make_provider(emu, tmp_path)
    try:
        receipt = await adapter.send(fax("job1"))
        assert receipt.provider_job_id in emu.state.jobs
    finally:
        await adapter.close()
        await emu.close()


def test_document_names_fit_retarus_rules_and_stay_unique() -> None:
    names = codes.document_names([
        "Brief für Jörg Weiß.pdf", "Rechnung (Kopie) 2024-03.PDF", "résumé.pdf",
        "a-very-long-document-name-that-goes-on-and-on.pdf", "a-very-long-document-name-that"
        "-goes-on-and-on.pdf", "写真.pdf", "C:\\Scans\\.pdf", "scan", "scan.pdf"])
    assert names == ["Brief_fuer_Joerg_Weiss.pdf", "Rechnung__Kopie__2024-03.pdf", "resume.pdf",
                     "a-very-long-document-name-th.pdf", "a-very-long-document-name-2.pdf",
                     "document.pdf", "document-2.pdf", "scan.pdf", "scan-2.pdf"]
    assert all(codes.NAME_PATTERN.match(name) and len(name) <= 32 for name in names)
    # as mailfax.support.text.to_ascii: no ASCII form → dropped; then what Retarus refuses → "_"
    assert codes.document_names(["Angebot 写真 Müller €.pdf"]) == ["Angebot__Mueller_EUR.pdf"]


async def test_sanitised_names_are_accepted_by_the_emulator(
        emulator: RetarusEmulator, provider: retarus.RetarusProvider) -> None:
    receipt = await provider.send(fax("job1", documents=[
        FaxDocument("Übersicht: Q1 & Q2 — endgültig!.pdf", PDF, 1),
        FaxDocument("Übersicht: Q1 & Q2 — endgültig?.pdf", PDF, 1)]))
    names = [name for name, _ in emulator.state.jobs[receipt.provider_job_id].documents]
    assert names == ["Uebersicht__Q1___Q2_-_endgue.pdf", "Uebersicht__Q1___Q2_-_endg-2.pdf"]


# --- status ----------------------------------------------------------------------------------

async def test_status_is_pending_then_delivered(
        emulator: RetarusEmulator, provider: retarus.RetarusProvider) -> None:
    receipt = await provider.send(fax("job1", documents=[FaxDocument("a.pdf", TWO_PAGES, 2)]))
    ref = ProviderRef("job1", receipt.provider_job_id)
    assert (await provider.status([ref]))["job1"].state == JobState.SUBMITTED
    report = await final_report(provider, ref)
    assert report.state == JobState.DELIVERED
    assert report.pages == 2
    assert report.duration_seconds == 41
    assert report.remote_id == "+4930123456"
    assert report.finished_at is not None and report.reason is None


FAILURES = [*codes.STATUS_CODES, "SOMETHING_NEW"]


async def test_every_retarus_failure_maps_to_failed_with_a_reason_in_both_languages(
        emulator: RetarusEmulator, provider: retarus.RetarusProvider) -> None:
    jobs = {status: emulator.state.add_job("+4930123456", f"job-{status}")
            for status in FAILURES}
    for status, job in jobs.items():
        emulator.state.finish(job.job_id, status, f"raw {status.lower()}")
    reports = await provider.status([ProviderRef(f"job-{status}", job.job_id)
                                     for status, job in jobs.items()])
    expected = {status: code.reason for status, code in codes.STATUS_CODES.items()}
    expected["SOMETHING_NEW"] = "unknown"
    for status in FAILURES:
        report = reports[f"job-{status}"]
        assert report.state == JobState.FAILED, status
        assert report.reason is not None
        assert report.reason.code == expected[status]
        assert report.reason.text["en"] and report.reason.text["de"]
        assert report.reason.text["en"] != report.reason.text["de"]
        assert report.reason.detail == f"Retarus {status}: raw {status.lower()}"
    assert reports["job-BUSY"].reason is not None
    assert reports["job-BUSY"].reason.code == "busy"
    assert reports["job-RING_TO"].reason.code == "no_answer"  # type: ignore[union-attr]
    # a few pairs written out, not read from the table under test
    for status, reason in [("NOFAX", "not_a_fax"), ("WRONG_NO", "invalid_number"),
                           ("CHANGED_NO", "no_service"), ("PBLACKLIST", "blacklisted"),
                           ("EOD_FAILED", "transmission_unconfirmed"),
                           ("REM_DIS", "transmission_failed"), ("COMERROR", "call_failed"),
                           ("RENDERING_ERROR", "document_rejected"),
                           ("SOMETHING_NEW", "unknown")]:
        stated = reports[f"job-{status}"].reason
        assert stated is not None and stated.code == reason, status


async def test_numbers_fail_by_the_emulators_prefix_rules(
        emulator: RetarusEmulator, provider: retarus.RetarusProvider) -> None:
    receipt = await provider.send(fax("job1", "+4930999123"))
    report = await final_report(provider, ProviderRef("job1", receipt.provider_job_id))
    assert report.state == JobState.FAILED
    assert report.reason is not None and report.reason.code == "busy"


async def test_bulk_poll_asks_each_data_centre_once_per_thousand_jobs(
        emulator: RetarusEmulator, provider: retarus.RetarusProvider) -> None:
    jobs = [emulator.state.add_job("+4930123456", f"job{n}") for n in range(2500)]
    refs = [ProviderRef(job.customer_defined_id or "", job.job_id) for job in jobs]
    reports = await provider.status(refs)
    assert len(reports) == 2500  # each job answered by the one data centre that has it
    assert len(emulator.state.jobs_in("DE1")) == len(emulator.state.jobs_in("DE2")) == 1250
    assert emulator.state.requests_to("DE1", "bulk") == 3  # 2500 unknown ids: 1000+1000+500
    assert emulator.state.requests_to("DE2", "bulk") == 3
    await provider.status(refs)  # now each job's data centre is known: 1250 ids each
    assert emulator.state.requests_to("DE1", "bulk") == 3 + 2
    assert emulator.state.requests_to("DE2", "bulk") == 3 + 2
    assert emulator.state.requests_to("HA") == 0  # never poll through the HA URL


async def test_a_data_centre_down_hides_only_its_own_jobs(
        emulator: RetarusEmulator, provider: retarus.RetarusProvider) -> None:
    first = emulator.state.add_job("+4930123456", "a", "DE1")
    second = emulator.state.add_job("+4930123456", "b", "DE2")
    refs = [ProviderRef("a", first.job_id), ProviderRef("b", second.job_id)]
    emulator.state.faults.append(Fault("bulk", status=503, data_centre="DE1"))
    assert set(await provider.status(refs)) == {"b"}
    emulator.state.faults += [Fault("bulk", status=503, data_centre="DE1"),
                              Fault("bulk", kind="drop", data_centre="DE2")]
    with pytest.raises(ProviderError) as error:
        await provider.status(refs)
    assert error.value.transient


async def test_acknowledge_deletes_reports_in_bulk_per_data_centre(
        emulator: RetarusEmulator, provider: retarus.RetarusProvider) -> None:
    jobs = [emulator.state.add_job("+4930123456", f"job{n}") for n in range(6)]
    refs = [ProviderRef(f"job{n}", job.job_id) for n, job in enumerate(jobs)]
    await provider.acknowledge(refs)
    assert all(job.deleted for job in jobs)
    assert emulator.state.requests_to("DE1", "bulk") == 1
    assert emulator.state.requests_to("DE2", "bulk") == 1
    assert await provider.status(refs) == {}


async def test_awkward_but_valid_answers_are_understood(tmp_path: Path) -> None:
    """The portal's mock wraps bulk answers in "value"; 409 comes without a body, and is a
    refusal, not "already sent"."""
    seen: list[httpx.Request] = []
    report = {"jobId": "FJ1", "pages": 1, "reference": {"customerDefinedId": "job1"},
              "recipientStatus": [{"number": "+4930123", "status": "OK", "reason": "OK",
                                   "durationInSecs": 19, "remoteCsid": "+49 30 123"}]}

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path.endswith("/fax"):
            return httpx.Response(409)
        if request.method == "GET":
            return httpx.Response(200, json={"reports": [report]})
        return httpx.Response(200, json={"value": {"reports": [report]}})

    settings = retarus.Settings(customer_number="99999TE", username="u", password="p")  # type: ignore[arg-type]
    adapter = retarus.create(ProviderContext("main", tmp_path), settings,
                             httpx.MockTransport(answer))
    try:
        with pytest.raises(ProviderError) as refused:
            await adapter.send(fax("job1"))
        assert (refused.value.reason.code, refused.value.transient) == (
            "duplicate_refused", False)
        assert len(seen) == 1  # no report list consulted to guess what 409 meant
        reports = await adapter.status([ProviderRef("job1", "FJ1")])
    finally:
        await adapter.close()
    assert reports["job1"].state == JobState.DELIVERED
    assert str(seen[0].url) == "https://faxws-ha.de.retarus.com/rest/v1/99999TE/fax"
    assert {str(request.url) for request in seen[1:]} >= {
        "https://faxws.de1.retarus.com/rest/v1/99999TE/fax/reports",
        "https://faxws.de2.retarus.com/rest/v1/99999TE/fax/reports"}
    assert seen[0].headers["Authorization"] == "Basic " + base64.b64encode(b"u:p").decode()


# --- lost answers ----------------------------------------------------------------------------

async def test_a_lost_answer_is_unconfirmed_and_found_by_reference_when_it_completes(
        tmp_path: Path) -> None:
    """Pessimistic emulator: the send is stored, its answer lost. The adapter says it may
    have been sent; the job is then looked for by customerDefinedId, which GET /reports
    shows only once the job is complete (not finding it before says nothing)."""
    emu = await emulator_module.start("127.0.0.1", 0, {"delay": "0.3"})
    adapter = make_provider(emu, tmp_path)
    try:
        emu.state.faults.append(Fault("send", kind="drop_after"))
        with pytest.raises(ProviderError) as lost:
            await adapter.send(fax("job1"))
        assert lost.value.transient and lost.value.maybe_sent
        assert adapter.resend_handling == ResendHandling.NOT_RECOGNISED
        ref = ProviderRef("job1", adapter.unconfirmed_ref("job1") or "")
        assert ref.provider_job_id == "ref:job1"
        assert await adapter.status([ref]) == {}  # running: not listed yet
        report = await final_report(adapter, ref)
        [job] = emu.state.jobs.values()
        assert report.state == JobState.DELIVERED and report.provider_job_id == job.job_id
        assert emu.state.requests_to("HA", "send") == 1
        await adapter.acknowledge([ref])
        assert job.deleted
    finally:
        await adapter.close()
        await emu.close()


async def test_409_without_a_body_is_a_duplicate_refusal_and_no_second_fax(
        tmp_path: Path) -> None:
    """The optimistic guess (duplicates=reference) that a resend with the same reference is
    refused: even then, a 409 is not taken as "sent" and nothing is sent again."""
    emu = await emulator_module.start("127.0.0.1", 0, {"delay": "0",
                                                       "duplicates": "reference"})
    adapter = make_provider(emu, tmp_path)
    try:
        await adapter.send(fax("job1"))
        with pytest.raises(ProviderError) as refused:
            await adapter.send(fax("job1", attempt=2, earlier_may_have_arrived=True))
        assert (refused.value.reason.code, refused.value.transient) == (
            "duplicate_refused", False)
        assert "409" in refused.value.reason.detail
        assert len(emu.state.jobs) == 1 and emu.state.requests_to("HA", "send") == 2
    finally:
        await adapter.close()
        await emu.close()


async def test_409_naming_the_job_after_a_lost_answer_is_that_job_optimistic(
        tmp_path: Path) -> None:
    emu = await emulator_module.start("127.0.0.1", 0, {
        "delay": "0", "duplicates": "reference", "conflict_body": "job"})
    adapter = make_provider(emu, tmp_path)
    try:
        emu.state.faults.append(Fault("send", kind="drop_after"))
        with pytest.raises(ProviderError):
            await adapter.send(fax("job1"))
        receipt = await adapter.send(fax("job1", attempt=2, earlier_may_have_arrived=True))
        assert receipt.duplicate and receipt.provider_job_id in emu.state.jobs
        with pytest.raises(ProviderError):  # the same 409 on a first attempt: a refusal
            await adapter.send(fax("job1"))
        assert len(emu.state.jobs) == 1
    finally:
        await adapter.close()
        await emu.close()


async def test_the_pessimistic_emulator_faxes_a_resend_again(
        emulator: RetarusEmulator, provider: retarus.RetarusProvider) -> None:
    """Why the dispatcher never resends a Retarus job whose answer was lost."""
    await provider.send(fax("job1"))
    again = await provider.send(fax("job1", attempt=2))
    assert not again.duplicate and len(emulator.state.jobs) == 2


# --- errors ----------------------------------------------------------------------------------

async def test_503_with_retry_after_is_retried_later(
        emulator: RetarusEmulator, provider: retarus.RetarusProvider) -> None:
    emulator.state.faults.append(Fault("send", status=503, retry_after="7"))
    with pytest.raises(ProviderError) as error:
        await provider.send(fax("job1"))
    assert error.value.transient
    assert error.value.retry_after == 7
    assert error.value.reason.code == "provider_unavailable"
    assert not emulator.state.jobs
    assert (await provider.send(fax("job1", attempt=2))).duplicate is False


@pytest.mark.parametrize(("status", "code", "transient"), [
    (400, "provider_error", False), (404, "provider_account", False),
    (429, "provider_unavailable", True), (500, "provider_error", True),
    (520, "provider_error", True)])
async def test_http_errors_are_typed(emulator: RetarusEmulator,
                                     provider: retarus.RetarusProvider, status: int, code: str,
                                     transient: bool) -> None:
    emulator.state.faults.append(Fault("send", status=status))
    with pytest.raises(ProviderError) as error:
        await provider.send(fax("job1"))
    assert (error.value.reason.code, error.value.transient) == (code, transient)
    # 500 is documented as "Cannot accept job"; 520 "UNKNOWN_ERROR ... backend" may come late
    assert error.value.maybe_sent == (status == 520)


async def test_wrong_credentials_are_a_permanent_provider_auth_error(
        emulator: RetarusEmulator, tmp_path: Path) -> None:
    adapter = make_provider(emulator, tmp_path, password="not-the-password")
    try:
        with pytest.raises(ProviderError) as error:
            await adapter.send(fax("job1"))
    finally:
        await adapter.close()
    assert error.value.reason.code == "provider_auth"
    assert not error.value.transient
    assert "not-the-password" not in str(error.value) + repr(adapter.settings) + repr(adapter)


async def test_a_stalled_or_garbled_answer_is_transient(
        emulator: RetarusEmulator, tmp_path: Path) -> None:
    adapter = make_provider(emulator, tmp_path, timeout_seconds=0.3)
    try:
        emulator.state.faults.append(Fault("send", kind="timeout", seconds=2))
        with pytest.raises(ProviderError) as error:
            await adapter.send(fax("job1"))
        assert error.value.transient and error.value.maybe_sent
        emulator.state.faults.append(Fault("send", kind="malformed"))
        with pytest.raises(ProviderError) as error:
            await adapter.send(fax("job2"))
        assert error.value.transient and error.value.reason.code == "provider_error"
        assert error.value.maybe_sent  # both arrived: never resent by the dispatcher
        assert len(emulator.state.jobs) == 2
    finally:
        await adapter.close()


async def test_connection_refused_is_transient(tmp_path: Path) -> None:
    emu = await emulator_module.start("127.0.0.1", 0, {})
    settings = emu.provider_settings()
    await emu.close()
    adapter = make_provider(emu, tmp_path, connect_retries=1, **{
        key: settings[key] for key in ("send_url", "data_centres")})
    try:
        with pytest.raises(ProviderError) as error:
            await adapter.send(fax("job1"))
    finally:
        await adapter.close()
    assert error.value.transient and error.value.reason.code == "provider_unavailable"


# --- status push -----------------------------------------------------------------------------

@dataclass
class Pushed:
    emu: RetarusEmulator
    adapter: retarus.RetarusProvider
    reported: Reported
    woken: list[list[str]]


@pytest.fixture
async def pushed(tmp_path: Path) -> AsyncIterator[Pushed]:
    """The emulator, an adapter behind mailfax's web endpoint with a store holding job1 and
    job2 of its account and job3 of another, and what the adapter reported and woke."""
    emu = await emulator_module.start("127.0.0.1", 0, {"delay": "0.1"})
    store = SqliteStore(tmp_path / "store.sqlite3")
    await store.open()
    for job_id, account in (("job1", "main"), ("job2", "main"), ("job3", "second")):
        mail = NewMail(mail_id=f"m-{job_id}", envelope_from="alice@example.org",
                       message_id=None, subject="", references=[], from_header="",
                       client_address="127.0.0.1")
        await store.add_mail_jobs(mail, [NewJob(job_id, "+4930123456", account)],
                                  [FaxDocument("a.pdf", b"%PDF-", 1)])
    providers: dict[str, Any] = {}
    runner = await start_web(build_web_app(providers), "127.0.0.1", 0)
    reported: Reported = []
    woken: list[list[str]] = []
    adapter = make_provider(emu, tmp_path, push_base_url=f"{runner_url(runner)}/push/main",
                            reported=reported, woken=woken, get_job=store.get_job)
    found = Pushed(emu, adapter, reported, woken)
    providers["main"] = found.adapter
    try:
        yield found
    finally:
        await found.adapter.close()
        await emu.close()
        await runner.cleanup()
        await store.close()


@pytest.mark.parametrize("push_format", ["xml", "json"])
async def test_status_push_wakes_the_tracker_and_sets_no_state_itself(
        pushed: Pushed, push_format: str) -> None:
    # Nothing documented authenticates Retarus' push (the credentials are mailfax's own):
    # the tracker polls the job at once, the pushed report itself is not recorded.
    pushed.emu.state.push_format = push_format
    await pushed.adapter.send(fax("job1", "+4930998000"))  # RING_TO

    async def answered() -> bool:
        return bool(pushed.emu.state.pushes)

    await until(answered)
    assert [(push.format, push.status) for push in pushed.emu.state.pushes] == [
        (push_format, 200)]
    assert pushed.woken == [["job1"]] and pushed.reported == []


async def test_status_push_with_wrong_credentials_is_refused(pushed: Pushed) -> None:
    emu, adapter = pushed.emu, pushed.adapter
    emu.state.push_format = "off"
    receipt = await adapter.send(fax("job1"))
    emu.state.finish(receipt.provider_job_id, "OK")
    context = adapter.context
    second = ProviderContext(account="second", data_dir=context.data_dir, secret_key=b"k" * 32)
    for credentials in [
        ("mailfax", "guess"),
        ("mailfax", adapter.push_token("job2")),  # a real token, but of another job
        ("mailfax", context.push_token("fax.de", "job1")),  # FAX.de's token of this job
        ("mailfax", second.push_token("retarus", "job1")),  # of another account
        ("someone", adapter.push_token("job1")),
    ]:
        assert await emu.push(receipt.provider_job_id, credentials=credentials) == 401
    assert pushed.woken == []
    assert await emu.push(receipt.provider_job_id, "json") == 200
    assert pushed.woken == [["job1"]] and pushed.reported == []


async def test_status_push_for_a_job_of_another_account_is_refused(pushed: Pushed) -> None:
    emu, adapter = pushed.emu, pushed.adapter
    emu.state.push_format = "off"
    receipt = await adapter.send(fax("job3"))  # in the store under account "second"
    emu.state.finish(receipt.provider_job_id, "FAILED")
    assert await emu.push(receipt.provider_job_id, "json") == 401
    assert pushed.woken == [] and pushed.reported == []


async def test_status_push_that_is_not_a_report_is_a_bad_request(pushed: Pushed) -> None:
    adapter = pushed.adapter
    url = f"{adapter.context.push_base_url}/job/job1"
    auth = ("mailfax", adapter.push_token("job1"))
    async with httpx.AsyncClient() as client:
        bomb = (b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY a "aaaa">]>'
                b"<faxJobReport><jobId>&a;</jobId></faxJobReport>")
        answer = await client.post(url, content=bomb, auth=auth,
                                   headers={"Content-Type": "text/xml"})
        assert answer.status_code == 400
        answer = await client.post(url, json={"something": "else"}, auth=auth)
        assert answer.status_code == 400
        answer = await client.post(url, json={"jobId": "FJ1", "reference": {
            "customerDefinedId": "job2"}, "recipientStatus": [{"status": "OK"}]}, auth=auth)
        assert answer.status_code == 400  # a report of another job
        answer = await client.get(url, auth=auth)
        assert answer.status_code == 405
    assert pushed.reported == [] and pushed.woken == []


def test_default_xml_push_from_the_docs_is_read() -> None:
    body = b"""<faxJobReport xmlns="http://retarus.com/fax4ba/faxws/3/0">
      <jobId>FJIJPNJYN906EDIJNFGI5S</jobId>
      <reportMail><successAddress></successAddress><failureAddress></failureAddress>
        <attachedFaxImageMode>NEVER</attachedFaxImageMode>
        <attachedFaxImageFormat>TIFF</attachedFaxImageFormat></reportMail>
      <httpStatusPush><url>https://statuslistener.example.com:9564/Faxolution-v3.0</url>
        <authMethod>HTTP_BASIC</authMethod></httpStatusPush>
      <faxRecipient><number>+498912504001710</number><numId>FNIJPNJYNA06EDIJNFUO1Q</numId>
        <status>OK</status><reason>OK</reason><sentTS>2018-11-08T15:38:08Z</sentTS>
        <durationInSecs>26</durationInSecs><sentToNumber>00498912504001710</sentToNumber>
        <remoteCsid>+49/89/1250400-1710</remoteCsid></faxRecipient>
      <document><name>document.pdf</name><isText>false</isText></document>
    </faxJobReport>"""
    [report] = codes.parse_push(body, "text/xml")
    status = codes.status_report(report)
    assert status.state == JobState.DELIVERED
    assert status.duration_seconds == 26
    assert status.remote_id == "+49/89/1250400-1710"
    assert status.finished_at is not None and status.finished_at.year == 2018


def test_xml_with_entities_is_refused_in_any_encoding() -> None:
    laughs = ('<?xml version="1.0" encoding="UTF-16"?><!DOCTYPE r [<!ENTITY a "a">'
              '<!ENTITY b "&a;&a;&a;">]><faxJobReport><jobId>&b;</jobId></faxJobReport>')
    for body in (laughs.encode("utf-16"), laughs.replace("UTF-16", "UTF-8").encode()):
        with pytest.raises(codes.PushFormatError):
            codes.parse_push(body, "application/xml")
    external = (b'<?xml version="1.0"?><!DOCTYPE r SYSTEM "file:///etc/passwd">'
                b"<faxJobReport/>")
    with pytest.raises(codes.PushFormatError):
        codes.parse_push(external, "")


# --- the whole service -----------------------------------------------------------------------

async def test_mail_is_faxed_through_retarus_and_a_delivered_mail_comes_back(
        tmp_path: Path, corpus: Path) -> None:
    emu = await emulator_module.start("127.0.0.1", 0, {"delay": "0.3"})
    settings = make_settings(tmp_path, accounts={"main": {
        "provider": "retarus", **emu.provider_settings()}}, default_account="main")
    app = Application(settings)
    await app.start()
    try:
        service = Service(app)
        pdf = (corpus / "pdf" / "two-different-pages.pdf").read_bytes()
        mail = fax_mail([("Angebot März.pdf", pdf, "application/pdf")],
                        to="004930123456@fax.local", subject="Our offer")
        errors, reply = await service.send(mail, "alice@example.org",
                                           ["004930123456@fax.local"])
        assert errors == {}
        job_id = reply.split()[-1]
        status = await service.wait_for_mail(lambda m: m["X-Mailfax-State"] == "delivered")
        assert status["X-Mailfax-Job"] == job_id
        [job] = emu.state.jobs.values()
        assert job.customer_defined_id == job_id
        assert job.number == "+4930123456"
        assert [data for _, data in job.documents] == [pdf]
        assert job.documents[0][0].endswith(".pdf")
        stored = await app.store.get_job(job_id)
        assert stored is not None and stored.state == JobState.DELIVERED

        async def acknowledged() -> bool:
            return job.deleted

        await until(acknowledged, timeout=10)  # the report is deleted once handled
    finally:
        await app.stop()
        await emu.close()


@pytest.mark.parametrize("trouble", ["409", "lost"])
async def test_through_the_service_no_second_fax_after_a_409_or_a_lost_answer(
        tmp_path: Path, corpus: Path, trouble: str) -> None:
    """Pessimistic emulator. A 409 without a body on the first attempt: failed as a
    duplicate refusal, not resent. A lost answer: unconfirmed, not resent, found by
    reference once complete, and delivered."""
    emu = await emulator_module.start("127.0.0.1", 0, {"delay": "0.3"})
    emu.state.faults.append(Fault("send", status=409) if trouble == "409"
                            else Fault("send", kind="drop_after"))
    settings = make_settings(tmp_path, accounts={"main": {
        "provider": "retarus", **emu.provider_settings()}}, default_account="main")
    app = Application(settings)
    await app.start()
    try:
        service = Service(app)
        pdf = (corpus / "pdf" / "two-different-pages.pdf").read_bytes()
        reply = await service.fax_pdf(pdf)
        job_id = reply.split()[-1]
        state = "failed" if trouble == "409" else "delivered"
        told = await service.wait_for_mail(lambda m: m["X-Mailfax-State"] == state)
        assert told["X-Mailfax-Job"] == job_id
        stored = await app.store.get_job(job_id)
        assert stored is not None and stored.attempts == 1
        await asyncio.sleep(1.0)  # retry intervals pass: still one send
        assert emu.state.requests_to("HA", "send") == 1
        assert len(emu.state.jobs) == (0 if trouble == "409" else 1)
        if trouble == "409":
            assert stored.reason is not None and stored.reason.code == "duplicate_refused"
        else:
            events = [event.state for event in await app.store.job_events(job_id)]
            assert JobState.UNCONFIRMED in events
            assert stored.provider_job_id == next(iter(emu.state.jobs))
    finally:
        await app.stop()
        await emu.close()


async def test_a_pushed_failure_does_not_fail_a_fax_that_retarus_delivers(
        tmp_path: Path, corpus: Path) -> None:
    """The attack of issue 15: a push with valid credentials (leaked, or FAX.de's token of
    the job) saying "failed" for a fax Retarus delivers. The FAX.de token is refused; the
    Retarus one only makes the tracker poll, and the fax ends delivered."""
    emu = await emulator_module.start("127.0.0.1", 0, {"delay": "1.5", "push": "off"})
    web_port = free_port()
    settings = make_settings(tmp_path, accounts={"main": {
        "provider": "retarus", **emu.provider_settings()}}, default_account="main",
        web={"listen": f"127.0.0.1:{web_port}"})
    app = Application(settings)
    await app.start()
    try:
        pdf = (corpus / "pdf" / "two-different-pages.pdf").read_bytes()
        _, reply = await Service(app).send(fax_mail([("a.pdf", pdf, "application/pdf")]),
                                           "alice@example.org", ["030123456@fax.local"])
        job_id = reply.split()[-1]

        async def submitted() -> bool:
            job = await app.store.get_job(job_id)
            return job is not None and job.provider_job_id is not None

        await until(submitted, timeout=10)
        context = ProviderContext(account="main", data_dir=settings.data_dir,
                                  secret_key=load_secret_key(settings.data_dir))
        url = f"http://127.0.0.1:{web_port}/push/main/job/{job_id}"
        forged = {"jobId": "FJX", "reference": {"customerDefinedId": job_id},
                  "recipientStatus": [{"number": "+4930123456", "status": "BUSY"}]}
        async with httpx.AsyncClient() as client:
            faxde_token = ("mailfax", context.push_token("fax.de", job_id))
            answer = await client.post(url, json=forged, auth=faxde_token)
            assert answer.status_code == 401
            retarus_token = ("mailfax", context.push_token("retarus", job_id))
            answer = await client.post(url, json=forged, auth=retarus_token)
            assert answer.status_code == 200
        await asyncio.sleep(0.3)
        job = await app.store.get_job(job_id)
        assert job is not None and job.state == JobState.SUBMITTED  # not failed

        async def delivered() -> bool:
            job = await app.store.get_job(job_id)
            return job is not None and job.state.is_final

        await until(delivered, timeout=15)
        job = await app.store.get_job(job_id)
        assert job is not None and job.state == JobState.DELIVERED
        assert [event.state for event in await app.store.job_events(job_id)].count(
            JobState.FAILED) == 0
    finally:
        await app.stop()
        await emu.close()


def test_settings_accept_a_plain_list_of_data_centres_and_hide_the_password() -> None:
    settings = retarus.Settings.model_validate({
        "customer_number": "99999TE", "username": "u", "password": "hunter2",
        "data_centres": ["https://faxws.us1.retarus.com/rest/v1/",
                         "https://faxws.us2.retarus.com/rest/v1"]})
    assert settings.data_centres == {"DC1": "https://faxws.us1.retarus.com/rest/v1",
                                     "DC2": "https://faxws.us2.retarus.com/rest/v1"}
    assert "hunter2" not in repr(settings) + str(settings) + settings.model_dump_json()
    with pytest.raises(ValueError):
        retarus.Settings.model_validate({"customer_number": "9/../x", "username": "u",
                                         "password": "p"})


def test_request_count_goal_of_the_benchmark_holds_for_any_size() -> None:
    assert [len(list(codes.chunked(list(range(n))))) for n in (0, 1, 1000, 1001, 5000)] == [
        0, 1, 1, 2, 5]



async def test_a_large_document_in_its_file_is_sent_whole_to_each_recipient(
        emulator: RetarusEmulator, tmp_path: Path, documents_read: list[type]) -> None:
    """A large mail's document, read from its file as the JSON body goes out (the emulator
    refuses a chunked body, so the body also had its length)."""
    from bench.memory import random_pdf
    from mailfax.documents.mapped import DocumentMap, document_file

    pdf = random_pdf(3_000_000)
    document = FaxDocument("scan.pdf", document_file(tmp_path, [pdf]), 4)
    assert isinstance(document.data, DocumentMap)
    adapter = make_provider(emulator, tmp_path)
    try:
        receipts = await adapter.send_many([fax("job1", documents=[document]),
                                            fax("job2", "+4930654321", documents=[document])])
    finally:
        await adapter.close()
    jobs = [emulator.state.jobs[receipt.provider_job_id] for receipt in receipts
            if not isinstance(receipt, Exception)]
    assert [(job.customer_defined_id, job.documents) for job in jobs] == [
        ("job1", [("scan.pdf", pdf)]), ("job2", [("scan.pdf", pdf)])]
    assert documents_read == [DocumentMap, DocumentMap]  # each request read the file


async def test_a_large_scan_is_sent_from_its_file_and_delivered(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 4 MB mail: its document decoded into a file at intake, claimed into a file by the
    dispatcher, and sent through the adapter from there; the emulator has it byte for byte,
    and the spool is empty again."""
    from bench.memory import random_pdf
    from mailfax.documents.mapped import DocumentMap

    emu = await emulator_module.start("127.0.0.1", 0, {"delay": "0.3"})
    settings = make_settings(tmp_path, accounts={"main": {
        "provider": "retarus", **emu.provider_settings()}}, default_account="main")
    app = Application(settings)
    claimed: list[type] = []
    claim_work = SqliteStore.claim_work

    async def recorded(self: SqliteStore, *args: Any, **kwargs: Any) -> Any:
        work = await claim_work(self, *args, **kwargs)
        claimed.extend(type(document.data) for item in work for document in item.documents)
        return work

    monkeypatch.setattr(SqliteStore, "claim_work", recorded)
    await app.start()
    try:
        service = Service(app)
        scan = random_pdf(3_000_000, pages=3)
        reply = await service.fax_pdf(scan)
        job_id = reply.split()[-1]
        await service.wait_for_mail(lambda m: m["X-Mailfax-State"] == "delivered")
        [job] = emu.state.jobs.values()
        assert job.customer_defined_id == job_id and [data for _, data in job.documents] == [scan]
        assert claimed == [DocumentMap]
        spool = settings.data_dir / "spool"

        async def spool_empty() -> bool:
            return not any(spool.iterdir())

        await until(spool_empty)
    finally:
        await app.stop()
        await emu.close()
