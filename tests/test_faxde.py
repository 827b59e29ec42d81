"""FAX.de: the real zeep client against the SOAP emulator over HTTP, for all five operations,
every documented result code, both WSDL styles, the lost answer and the STATURL push."""

from __future__ import annotations

import asyncio
import email
import email.policy
import io
import logging
import os
import threading
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pikepdf
import pytest

from mailfax.app import Application
from mailfax.emulators import faxde as emulator
from mailfax.model import JobState
from mailfax.outbound.tracking import Tracker, cancel_groups
from mailfax.providers import faxde, faxde_soap
from mailfax.providers import faxde_codes as codes
from mailfax.providers.base import (
    FaxDocument,
    ProviderContext,
    ProviderError,
    ProviderRef,
    SendReceipt,
    SendRequest,
)
from mailfax.providers.faxde_soap import BUNDLED_WSDL, check_wsdl
from mailfax.store.base import Job, NewJob, NewMail, Transition
from mailfax.store.sqlite import SqliteStore
from tests.conftest import Service, fax_mail, make_settings
from tests.ports import free_port

LITERAL_WSDL = Path(__file__).parent / "data" / "faxde-document-literal.wsdl"
PASSWORD = "s3cr3t-pässwort"


@pytest.fixture
async def fake() -> AsyncIterator[emulator.Emulator]:
    server = await emulator.start("127.0.0.1", 0, {
        "password": PASSWORD, "delay": "0.4",
        "fail": "+4930999:Busy,+4930998:No Answer,+4930997:Voice,+4930996:No Service,"
                "+4930995:Send-Fail,+4930994:Call failed,+4930993:Black-List"})
    yield server
    await server.close()


def make_provider(server: emulator.Emulator, tmp_path: Path, **overrides: Any
                  ) -> faxde.FaxDeProvider:
    settings = faxde.Settings.model_validate({
        "account": "123456", "password": PASSWORD, "wsdl_url": server.wsdl_url, **overrides})
    context = ProviderContext(account="main", data_dir=tmp_path, secret_key=b"k" * 32)
    return faxde.create(context, settings)


@pytest.fixture
async def provider(fake: emulator.Emulator, tmp_path: Path) -> AsyncIterator[faxde.FaxDeProvider]:
    client = make_provider(fake, tmp_path)
    yield client
    await client.close()


def request(corpus: Path, job_id: str = "k8x40c88txje", number: str = "+4930123456",
            **extra: Any) -> SendRequest:
    pdf = (corpus / "pdf" / "two-different-pages.pdf").read_bytes()
    return SendRequest(job_id=job_id, number=number, pages=2,
                       documents=[FaxDocument("Angebot Müller.pdf", pdf, 2)], **extra)


async def until_final(provider: faxde.FaxDeProvider, refs: list[ProviderRef]
                      ) -> dict[str, Any]:
    for _ in range(40):
        reports = await provider.status(refs)
        if reports and all(report.state.is_final for report in reports.values()):
            return reports
        await asyncio.sleep(0.1)
    raise AssertionError("the job did not finish")


async def test_send_progress_and_delivery(provider: faxde.FaxDeProvider,
                                          fake: emulator.Emulator, corpus: Path) -> None:
    sent = request(corpus, station_id="Müller GmbH; Büro", header="Angebot")
    receipt = await provider.send(sent)
    assert receipt.pages == 2 and not receipt.duplicate
    job = fake.state.jobs[int(receipt.provider_job_id)]
    assert job.files == [("Angebot Mueller.pdf", sent.documents[0].data)]  # byte-identical
    assert [(r.number, r.reference) for r in job.recipients] == [("+4930123456", "k8x40c88txje")]
    assert job.options["STATIONID"] == "Mueller GmbH Buero"
    assert job.options["FAXHEADER"] == "Angebot"
    ref = ProviderRef(sent.job_id, receipt.provider_job_id, since=datetime.now(UTC))
    # Pessimistic emulator: no log entry right after SendJob (JobStatus 5), which within the
    # grace period is "no news", not a failure.
    assert await provider.status([ref]) == {}
    await asyncio.sleep(0.3)
    assert (await provider.status([ref]))[sent.job_id].state == JobState.SENDING
    report = (await until_final(provider, [ref]))[sent.job_id]
    assert report.state == JobState.DELIVERED
    assert (report.pages, report.remote_id) == (2, "EMULATED FAX")
    assert provider.soap.wsdl_source == fake.wsdl_url


@pytest.mark.parametrize(("number", "reason"), [
    ("+4930999123", "busy"), ("+4930998123", "no_answer"), ("+4930997123", "not_a_fax"),
    ("+4930996123", "no_service"), ("+4930995123", "transmission_failed"),
    ("+4930994123", "call_failed"), ("+4930993123", "blacklisted")])
async def test_every_send_result_becomes_a_failure_with_a_reason(
        provider: faxde.FaxDeProvider, corpus: Path, number: str, reason: str) -> None:
    receipt = await provider.send(request(corpus, number=number))
    ref = ProviderRef("k8x40c88txje", receipt.provider_job_id)
    report = (await until_final(provider, [ref]))["k8x40c88txje"]
    assert report.state == JobState.FAILED
    assert report.reason is not None and report.reason.code == reason
    assert report.reason.text["de"] and report.reason.text["en"]


@pytest.mark.parametrize("result", sorted(codes.SEND_JOB))
async def test_every_sendjob_result_code(provider: faxde.FaxDeProvider,
                                         fake: emulator.Emulator, corpus: Path,
                                         result: int) -> None:
    fake.state.force("SendJob", result)
    code = codes.SEND_JOB[result]
    if code.kind in ("ok", "duplicate"):  # -77 only after a lost answer; else a refusal
        receipt = await provider.send(request(corpus, earlier_may_have_arrived=True))
        assert receipt.duplicate == (code.kind == "duplicate")
        assert not receipt.confirmed  # a forced answer carries no JobId: unconfirmed
        return
    with pytest.raises(ProviderError) as raised:
        await provider.send(request(corpus))
    assert raised.value.transient == (code.kind == "transient")
    assert raised.value.reason.code == code.reason
    assert f"SendJob {result}" in (raised.value.reason.detail or "")


@pytest.mark.parametrize(("result", "reason", "transient"), [
    (-1, "provider_auth", False), (-4, "provider_error", True),
    (-5, "number_not_allowed", False), (-7, "document_rejected", False),
    (-65, "provider_error", True), (7, "provider_account", False),
    (9, "blacklisted", False), (46, "invalid_number", False),
    (12345, "provider_error", True)])  # undocumented: transient
async def test_sendjob_result_codes_written_out(provider: faxde.FaxDeProvider,
                                               fake: emulator.Emulator, corpus: Path,
                                               result: int, reason: str,
                                               transient: bool) -> None:
    """Expected pairs not taken from the table under test."""
    fake.state.force("SendJob", result)
    with pytest.raises(ProviderError) as raised:
        await provider.send(request(corpus))
    assert (raised.value.reason.code, raised.value.transient) == (reason, transient)


@pytest.mark.parametrize("result", [1, 2, 3, 4])
async def test_account_errors_of_the_other_operations(provider: faxde.FaxDeProvider,
                                                      fake: emulator.Emulator,
                                                      result: int) -> None:
    for operation, call in [("JobStatus", provider.status([ProviderRef("j", "7001")])),
                            ("RequestReceived", provider.fetch_inbound()),
                            ("DeleteReceived", provider.delete_inbound("90001"))]:
        fake.state.force(operation, result)
        with pytest.raises(ProviderError) as raised:
            await call
        assert not raised.value.transient, operation
        assert raised.value.reason.code in ("provider_auth", "provider_account")


async def test_unknown_job_is_a_failure_and_an_undocumented_code_is_transient(
        provider: faxde.FaxDeProvider, fake: emulator.Emulator) -> None:
    long_ago = datetime.now(UTC) - timedelta(seconds=901)
    reports = await provider.status([ProviderRef("j1", "999999", since=long_ago)])  # 5
    assert reports["j1"].state == JobState.FAILED
    fake.state.force("JobStatus", 42)
    with pytest.raises(ProviderError) as raised:
        await provider.status([ProviderRef("j1", "7001")])
    assert raised.value.transient


async def test_status_of_many_jobs_is_asked_concurrently_within_the_connection_limit(
        provider: faxde.FaxDeProvider, corpus: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    refs = []
    for index in range(25):
        job_id = f"j{index:011d}"
        receipt = await provider.send(request(corpus, job_id=job_id))
        refs.append(ProviderRef(job_id, receipt.provider_job_id))
    running = 0
    most = 0
    real_call = provider.soap.call

    async def call(operation: str, **parameters: Any) -> dict[str, Any]:
        nonlocal running, most
        running += 1
        most = max(most, running)
        try:
            await asyncio.sleep(0.02)
            return await real_call(operation, **parameters)
        finally:
            running -= 1

    monkeypatch.setattr(provider.soap, "call", call)
    await asyncio.sleep(0.3)  # until the emulator has logged them all
    reports = await provider.status(refs)
    assert set(reports) == {ref.job_id for ref in refs}
    assert 1 < most <= faxde_soap.MAX_CONNECTIONS
    assert most == faxde_soap.MAX_CONNECTIONS


async def test_cancel_before_and_after_sending(provider: faxde.FaxDeProvider,
                                               fake: emulator.Emulator, corpus: Path) -> None:
    receipt = await provider.send(request(corpus))
    assert await provider.cancel(ProviderRef("k8x40c88txje", receipt.provider_job_id))
    assert fake.state.jobs[int(receipt.provider_job_id)].cancelled
    late = await provider.send(request(corpus, job_id="m2m2m2m2m2m2"))
    await asyncio.sleep(0.5)
    assert not await provider.cancel(ProviderRef("m2m2m2m2m2m2", late.provider_job_id))
    assert not await provider.cancel(ProviderRef("x", "424242"))  # -2: unknown job
    fake.state.force("CancelJob", -1)
    with pytest.raises(ProviderError) as raised:
        await provider.cancel(ProviderRef("x", "7001"))
    assert raised.value.reason.code == "provider_auth"


async def test_bulk_job_with_recipient_file_and_status_file(
        fake: emulator.Emulator, tmp_path: Path, corpus: Path) -> None:
    provider = make_provider(fake, tmp_path, bulk=True)
    try:
        requests = [request(corpus, job_id=job_id, number=number) for job_id, number in
                    [("aaaaaaaaaaaa", "+4930111111"), ("bbbbbbbbbbbb", "+4930999222"),
                     ("cccccccccccc", "+4940333333")]]
        results = await provider.send_many(requests)
        assert all(isinstance(result, SendReceipt) for result in results)
        receipts = [result for result in results if isinstance(result, SendReceipt)]
        assert len({receipt.provider_job_id for receipt in receipts}) == 1
        assert len(fake.state.jobs) == 1
        (job,) = fake.state.jobs.values()
        assert [(r.number, r.reference) for r in job.recipients] == [
            ("+4930111111", "aaaaaaaaaaaa"), ("+4930999222", "bbbbbbbbbbbb"),
            ("+4940333333", "cccccccccccc")]
        refs = [ProviderRef(r.job_id, r.provider_job_id) for r in receipts]
        reports = await until_final(provider, refs)
        assert reports["aaaaaaaaaaaa"].state == JobState.DELIVERED
        assert reports["cccccccccccc"].state == JobState.DELIVERED
        failed = reports["bbbbbbbbbbbb"]
        assert failed.state == JobState.FAILED and failed.reason is not None
        assert failed.reason.code == "busy"
    finally:
        await provider.close()


def test_status_file_is_parsed_per_recipient() -> None:
    data = (b'"RECIPIENT","JOBTYPE","RESULT","REMOTEID","PAGES","SENDDATETIME","DURATION",'
            b'"REFID"\r\n"+4940123456789","FAX","OK","John Doe","2","2017-06-01 15:53:06",'
            b'"19",""\r\n"+4930999","FAX","No Answer","","0","2017-06-01 15:54:00","0","r2"\r\n')
    rows = codes.parse_status_file(data)
    assert [(row.recipient, row.result, row.pages, row.reference) for row in rows] == [
        ("+4940123456789", "OK", 2, ""), ("+4930999", "No Answer", 0, "r2")]
    assert rows[0].remote_id == "John Doe" and rows[0].duration_seconds == 19
    assert rows[0].sent_at is not None and rows[0].sent_at.year == 2017


async def test_more_than_three_documents_are_merged_into_three_files(
        provider: faxde.FaxDeProvider, fake: emulator.Emulator, corpus: Path) -> None:
    names = ["crazyones.pdf", "git.pdf", "two-different-pages.pdf", "VIA_Nytt_1402.pdf"]
    documents = [FaxDocument(name, (corpus / "pdf" / name).read_bytes(), pages)
                 for name, pages in zip(names, [1, 1, 2, 2], strict=True)]
    receipt = await provider.send(SendRequest(job_id="k8x40c88txje", number="+4930123456",
                                              documents=documents, pages=6))
    assert receipt.pages == 6
    job = fake.state.jobs[int(receipt.provider_job_id)]
    assert [name for name, _ in job.files] == names[:3]
    assert job.files[0][1] == documents[0].data


async def test_documents_are_merged_once_per_mail_and_off_the_event_loop(
        provider: faxde.FaxDeProvider, fake: emulator.Emulator, corpus: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    names = ["crazyones.pdf", "git.pdf", "two-different-pages.pdf", "VIA_Nytt_1402.pdf"]
    documents = [FaxDocument(name, (corpus / "pdf" / name).read_bytes(), pages)
                 for name, pages in zip(names, [1, 1, 2, 2], strict=True)]
    merging_threads: list[threading.Thread] = []
    real_merge = faxde.merge_pdfs

    def merge(documents: Any, filename: str) -> FaxDocument:
        merging_threads.append(threading.current_thread())
        return real_merge(documents, filename)

    monkeypatch.setattr(faxde, "merge_pdfs", merge)
    requests = [SendRequest(job_id=job_id, number=number, documents=documents, pages=6)
                for job_id, number in [("aaaaaaaaaaaa", "+4930111111"),
                                       ("bbbbbbbbbbbb", "+4930222222"),
                                       ("cccccccccccc", "+4930333333")]]
    results = await provider.send_many(requests)
    assert all(isinstance(result, SendReceipt) for result in results)
    assert len(fake.state.jobs) == 3
    assert len(merging_threads) == 1  # once for the three recipients
    assert merging_threads[0] is not threading.main_thread()
    files = [job.files for job in fake.state.jobs.values()]
    assert files[0] == files[1] == files[2]
    assert [name for name, _ in files[0]] == names[:3]


async def test_a_lost_answer_and_the_resend_refused_with_77_without_a_jobid(
        provider: faxde.FaxDeProvider, fake: emulator.Emulator, corpus: Path) -> None:
    """Pessimistic emulator: -77 tells no JobId, so the job is not confirmed; without a
    STATURL (no web endpoint here) nothing can find it."""
    fake.state.drop_after_commit = 1
    with pytest.raises(ProviderError) as raised:
        await provider.send(request(corpus))
    assert raised.value.transient and raised.value.maybe_sent
    assert len(fake.state.jobs) == 1  # FAX.de has it, we did not hear
    receipt = await provider.send(request(corpus, attempt=2, earlier_may_have_arrived=True))
    assert receipt.duplicate and not receipt.confirmed
    assert receipt.provider_job_id == ""  # no push configured: nothing to look for it under
    [job] = fake.state.jobs.values()
    assert job.refused_resends == 1  # one fax


async def test_a_lost_answer_and_the_resend_answered_with_the_jobid_optimistic(
        provider: faxde.FaxDeProvider, fake: emulator.Emulator, corpus: Path) -> None:
    fake.state.duplicate_job_id = True
    fake.state.drop_after_commit = 1
    with pytest.raises(ProviderError):
        await provider.send(request(corpus))
    receipt = await provider.send(request(corpus, attempt=2, earlier_may_have_arrived=True))
    assert receipt.duplicate and receipt.confirmed
    (job_id,) = fake.state.jobs
    assert receipt.provider_job_id == str(job_id)
    report = (await until_final(provider, [ProviderRef("k8x40c88txje",
                                                       receipt.provider_job_id)]))
    assert report["k8x40c88txje"].state == JobState.DELIVERED


async def test_77_on_a_first_attempt_is_a_duplicate_refusal(
        provider: faxde.FaxDeProvider, fake: emulator.Emulator, corpus: Path) -> None:
    first = await provider.send(request(corpus, job_id="aaaaaaaaaaaa"))
    # The same job id again without a lost answer (another instance, a bug, a copy of the
    # database): FAX.de refuses it, and that is not "sent".
    with pytest.raises(ProviderError) as refused:
        await provider.send(request(corpus, job_id="aaaaaaaaaaaa"))
    assert (refused.value.reason.code, refused.value.transient) == ("duplicate_refused", False)
    assert "-77" in refused.value.reason.detail and "duplicate" in refused.value.reason.detail
    assert refused.value.reason.text["de"].startswith("Der Faxdienst hat dieses Fax als Doppel")
    assert list(fake.state.jobs) == [int(first.provider_job_id)]


@pytest.mark.parametrize(("wording", "state", "code"), [
    ("Send failed", JobState.FAILED, "transmission_failed"),
    ("Send-Fail", JobState.FAILED, "transmission_failed"),
    ("Canceled", JobState.CANCELLED, "cancelled"), ("busy", JobState.FAILED, "busy"),
    ("No answer", JobState.FAILED, "no_answer"), ("Blacklist", JobState.FAILED, "blacklisted"),
    ("Black-List", JobState.FAILED, "blacklisted"), ("Call failed", JobState.FAILED,
                                                    "call_failed"),
    ("No Service", JobState.FAILED, "no_service"), ("Voice", JobState.FAILED, "not_a_fax"),
    ("SENDFAIL", JobState.FAILED, "transmission_failed"), ("NORING", JobState.FAILED,
                                                          "no_answer"),
    ("OK", JobState.DELIVERED, None)])
def test_every_wording_of_both_docs(wording: str, state: JobState, code: str | None) -> None:
    got, reason = codes.outcome_of_send_result(wording)
    assert got == state
    assert (reason.code if reason else None) == code


async def test_inbound_fax_is_fetched_until_deleted(provider: faxde.FaxDeProvider,
                                                    fake: emulator.Emulator,
                                                    corpus: Path) -> None:
    assert await provider.fetch_inbound() is None  # 5: empty inbox
    image = (corpus / "fax-tiff" / "fax2d.tif").read_bytes()
    fax_id = fake.state.add_inbound(image, called_number="+49301234567",
                                    originator="+4940555123", remote_id="MUSTER GMBH")
    fax = await provider.fetch_inbound()
    assert fax is not None
    assert (fax.fax_id, fax.called_number, fax.originator, fax.remote_id, fax.image) == (
        str(fax_id), "+49301234567", "+4940555123", "MUSTER GMBH", image)
    again = await provider.fetch_inbound()
    assert again is not None and again.fax_id == fax.fax_id  # not deleted yet: same fax
    await provider.delete_inbound(fax.fax_id)
    assert await provider.fetch_inbound() is None
    await provider.delete_inbound(fax.fax_id)  # 5: already deleted is fine
    assert fake.state.deleted == [fax_id]


async def test_a_received_fax_over_10_mb_arrives_byte_identical(
        provider: faxde.FaxDeProvider, fake: emulator.Emulator) -> None:
    """lxml without huge_tree cuts a text node at 10 MB: the base64 of this image is ~16 MB."""
    image = b"II*\x00" + os.urandom(12 * 1024 * 1024)
    fax_id = fake.state.add_inbound(image, called_number="+49301234567",
                                    originator="+4940555123", remote_id="BIG GMBH", pages=40)
    fax = await provider.fetch_inbound()
    assert fax is not None
    assert len(fax.image) == len(image)
    assert fax.image == image
    assert (fax.fax_id, fax.called_number, fax.originator, fax.remote_id, fax.pages) == (
        str(fax_id), "+49301234567", "+4940555123", "BIG GMBH", 40)


async def test_any_wsdl_works_document_literal_with_another_namespace(
        tmp_path: Path, corpus: Path) -> None:
    server = await emulator.start("127.0.0.1", 0, {"password": PASSWORD, "delay": "0.2",
                                                   "wsdl": str(LITERAL_WSDL)})
    provider = make_provider(server, tmp_path)
    try:
        receipt = await provider.send(request(corpus))
        report = await until_final(provider, [ProviderRef("k8x40c88txje",
                                                          receipt.provider_job_id)])
        assert report["k8x40c88txje"].state == JobState.DELIVERED
        server.state.add_inbound(b"II*\x00fax")
        fax = await provider.fetch_inbound()
        assert fax is not None and fax.image == b"II*\x00fax"
        await provider.delete_inbound(fax.fax_id)
        late = await provider.send(request(corpus, job_id="m2m2m2m2m2m2"))
        assert await provider.cancel(ProviderRef("m2m2m2m2m2m2", late.provider_job_id))
    finally:
        await provider.close()
        await server.close()


async def test_wsdl_falls_back_to_the_cached_copy_then_the_bundled_one(
        fake: emulator.Emulator, tmp_path: Path, corpus: Path) -> None:
    first = make_provider(fake, tmp_path)
    await first.send(request(corpus))
    await first.close()
    cached = tmp_path / "faxde" / "main.wsdl"
    assert cached.exists()
    unreachable = "http://127.0.0.1:9/xmlws.exe?wsdl/IntfXMLWS"
    second = make_provider(fake, tmp_path, wsdl_url=unreachable)
    await second.send(request(corpus, job_id="m2m2m2m2m2m2"))
    assert second.soap.wsdl_source.startswith("cached copy")
    await second.close()
    cached.unlink()
    third = make_provider(fake, tmp_path, wsdl_url=unreachable,
                          endpoint_url=fake.soap_url)
    await third.send(request(corpus, job_id="n3n3n3n3n3n3"))
    assert third.soap.wsdl_source == "bundled reconstruction"
    await third.close()


def test_a_wsdl_with_entities_or_without_the_operations_is_refused() -> None:
    hostile = (b'<?xml version="1.0"?><!DOCTYPE d [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
               b"<definitions>&x;</definitions>")
    with pytest.raises(ValueError, match=r"DOCTYPE|not XML"):
        check_wsdl(hostile)
    with pytest.raises(ValueError, match="lacks operations"):
        check_wsdl(b"<definitions xmlns='http://schemas.xmlsoap.org/wsdl/'/>")
    check_wsdl(BUNDLED_WSDL.read_bytes())
    check_wsdl(LITERAL_WSDL.read_bytes())


@pytest.mark.parametrize("password", [PASSWORD, "plainAsciiSecret42"])
async def test_the_password_never_reaches_logs_or_errors(
        fake: emulator.Emulator, tmp_path: Path, corpus: Path,
        caplog: pytest.LogCaptureFixture, password: str) -> None:
    """With an ASCII password the SOAP bytes would contain it verbatim (PASSWORD's "ä" is
    escaped there), so that variant fails if zeep logs the messages it sends."""
    caplog.set_level(logging.DEBUG)
    fake.state.password = "another"
    provider = make_provider(fake, tmp_path, password=password)
    with pytest.raises(ProviderError) as raised:
        await provider.send(request(corpus))
    await provider.close()
    assert raised.value.reason.code == "provider_auth" and not raised.value.transient
    assert "check the credentials" in caplog.text  # loud
    for text in (caplog.text, str(raised.value), repr(raised.value.reason),
                 repr(provider.settings), str(provider.settings.model_dump())):
        assert PASSWORD not in text
        assert password not in text


async def jobs_in_store(tmp_path: Path, jobs: list[tuple[str, str, str]]) -> SqliteStore:
    """An open store holding these (job id, account, FAX.de job id) jobs, submitted."""
    store = SqliteStore(tmp_path / "store.sqlite3")
    await store.open()
    for job_id, account, provider_job_id in jobs:
        mail = NewMail(mail_id=f"m-{job_id}", envelope_from="alice@example.org",
                       message_id=None, subject="", references=[], from_header="",
                       client_address="127.0.0.1")
        await store.add_mail_jobs(mail, [NewJob(job_id, "+4930123456", account)],
                                  [FaxDocument("a.pdf", b"%PDF-", 1)])
        await store.record(job_id, Transition(JobState.SENDING))
        await store.record(job_id, Transition(JobState.SUBMITTED,
                                              provider_job_id=provider_job_id))
    return store


async def test_statusurl_push_checks_the_token_and_the_job_and_wakes_the_tracker(
        fake: emulator.Emulator, tmp_path: Path) -> None:
    from aiohttp.test_utils import make_mocked_request

    woken: list[list[str]] = []

    async def wake(job_ids: Any) -> None:
        woken.append(list(job_ids))

    store = await jobs_in_store(tmp_path, [
        ("k8x40c88txje", "main", "1001"), ("k8x40c88txjf", "main", "1001"),  # one bulk job
        ("k8x40c88txjg", "main", "1002"), ("k8x40c88txjh", "second", "1001")])
    context = ProviderContext(account="main", data_dir=tmp_path, secret_key=b"k" * 32,
                              push_base_url="https://fax.example.org/push/main",
                              wake_tracker=wake, get_job=store.get_job)
    settings = faxde.Settings(account="123456", password=PASSWORD, wsdl_url=fake.wsdl_url)
    provider = faxde.create(context, settings)

    async def push(job_id: str, token: str, cid: str = "") -> int:
        query = f"?t={token}&cid={cid or job_id}&jid=1001"
        try:
            response = await provider.handle_push(
                make_mocked_request("GET", f"/push/main/{job_id}{query}"), job_id)
        except aiohttp.web.HTTPNotFound:
            return 404
        return response.status

    try:
        url = provider._status_url("k8x40c88txje")
        token = provider.push_token("k8x40c88txje")
        assert len(url) <= 128 and "$CID" in url and "$JID" in url
        # The token is in the query, which an access log can leave out; not in the path.
        assert url.split("?")[0] == "https://fax.example.org/push/main/k8x40c88txje"
        assert f"t={token}" in url.split("?")[1]
        assert await push("k8x40c88txje", token) == 200 and woken == [["k8x40c88txje"]]
        # Another recipient of the same FAX.de job is polled too; a job of another FAX.de
        # job or of another account is not.
        assert await push("k8x40c88txje", token, cid="k8x40c88txjf") == 200
        assert await push("k8x40c88txje", token, cid="k8x40c88txjg") == 200
        assert await push("k8x40c88txje", token, cid="k8x40c88txjh") == 200
        assert woken[1:] == [["k8x40c88txje", "k8x40c88txjf"], ["k8x40c88txje"],
                             ["k8x40c88txje"]]
        woken.clear()
        assert await push("k8x40c88txje", "forged") == 404
        assert await push("k8x40c88txjg", token) == 404  # job A's token for job B
        other_account = ProviderContext(account="second", data_dir=tmp_path,
                                        secret_key=b"k" * 32)
        # A token of the right job, but made for another account (or another provider).
        assert await push("k8x40c88txje", other_account.push_token("fax.de",
                                                                    "k8x40c88txje")) == 404
        assert await push("k8x40c88txje", context.push_token("retarus", "k8x40c88txje")) == 404
        # A job of another account, with a token made for it on this endpoint's account.
        assert await push("k8x40c88txjh", provider.push_token("k8x40c88txjh")) == 404
        assert await push("nosuchjob000", provider.push_token("nosuchjob000")) == 404
        assert await push("k8x40c88txje", "t\u00e9st") == 404  # non-ASCII: refused, no error
        path_token = make_mocked_request("GET", f"/push/main/k8x40c88txje/{token}")
        with pytest.raises(aiohttp.web.HTTPNotFound):  # the old form, token in the path
            await provider.handle_push(path_token, f"k8x40c88txje/{token}")
        assert woken == []
    finally:
        await provider.close()
        await store.close()


async def test_mail_to_fax_through_fax_de_end_to_end_with_the_push(
        tmp_path: Path, corpus: Path) -> None:
    server = await emulator.start("127.0.0.1", 0, {"password": PASSWORD, "delay": "1.5"})
    web_port = free_port()
    settings = make_settings(
        tmp_path, accounts={"main": {"provider": "fax.de", "account": "123456",
                                     "password": PASSWORD, "wsdl_url": server.wsdl_url}},
        default_account="main", web={"listen": f"127.0.0.1:{web_port}"},
        dispatch={"status_poll_seconds": 600})
    app = Application(settings)
    await app.start()
    service = Service(app)
    try:
        pdf = (corpus / "pdf" / "crazyones.pdf").read_bytes()
        mail = fax_mail([("letter.pdf", pdf, "application/pdf")], to="030123456@fax.local")
        _, reply = await service.send(mail, "alice@example.org", ["030123456@fax.local"])
        job_id = reply.split()[-1]
        status = await service.wait_for_mail(lambda m: m["X-Mailfax-State"] == "delivered",
                                             timeout=20)
        parsed = email.message_from_bytes(bytes(status), policy=email.policy.default)
        assert parsed["X-Mailfax-Job"] == job_id
        (job,) = server.state.jobs.values()
        assert job.files == [("letter.pdf", pdf)]
        assert job.recipients[0].reference == job_id
        assert server.state.pushes and job_id in server.state.pushes[0]
        assert server.state.push_statuses == [200]  # token accepted, JobStatus asked
    finally:
        await app.stop()
        await server.close()


async def run_one_fax(tmp_path: Path, corpus: Path, server: emulator.Emulator,
                      with_push: bool) -> tuple[Service, Application, str]:
    extra: dict[str, Any] = {"web": {"listen": f"127.0.0.1:{free_port()}"}} if with_push else {}
    settings = make_settings(
        tmp_path, accounts={"main": {"provider": "fax.de", "account": "123456",
                                     "password": PASSWORD, "wsdl_url": server.wsdl_url}},
        default_account="main", dispatch={"status_poll_seconds": 600,
                                          "retry_initial_seconds": 0.2},
        inbound={"ocr": "off", "postmaster": "fax-admin@example.org"}, **extra)
    app = Application(settings)
    await app.start()
    service = Service(app)
    pdf = (corpus / "pdf" / "crazyones.pdf").read_bytes()
    mail = fax_mail([("letter.pdf", pdf, "application/pdf")], to="030123456@fax.local")
    _, reply = await service.send(mail, "alice@example.org", ["030123456@fax.local"])
    return service, app, reply.split()[-1]


def body_of(message: Any) -> str:
    parsed = email.message_from_bytes(bytes(message), policy=email.policy.default)
    part = parsed.get_body(("plain",))
    assert part is not None
    return str(part.get_content())


async def test_77_without_a_jobid_after_a_lost_answer_is_found_through_the_push(
        tmp_path: Path, corpus: Path) -> None:
    """Pessimistic emulator: the SendJob answer is lost, the resend is refused with -77 and
    no JobId. The job waits unconfirmed until the STATURL push of the first request's job
    tells its JobId; then JobStatus (REFID checked) says delivered, and the sender is told."""
    server = await emulator.start("127.0.0.1", 0, {"password": PASSWORD, "delay": "1.5"})
    server.state.drop_after_commit = 1
    service, app, job_id = await run_one_fax(tmp_path, corpus, server, with_push=True)
    try:
        for _ in range(100):
            job = await app.store.get_job(job_id)
            if job is not None and job.state == JobState.UNCONFIRMED:
                break
            await asyncio.sleep(0.05)
        assert job is not None and job.state == JobState.UNCONFIRMED
        assert job.provider_job_id == f"dup:{job_id}"
        delivered = await service.wait_for_mail(
            lambda m: m["X-Mailfax-State"] == "delivered", timeout=20)
        [fax] = server.state.jobs.values()  # one fax
        assert fax.refused_resends == 1
        job = await app.store.get_job(job_id)
        assert job is not None and job.provider_job_id == str(fax.job_id)
        assert delivered["X-Mailfax-Job"] == job_id
        assert not [m for m in service.outbox_messages()
                    if m["X-Mailfax-State"] == "unconfirmed"]
    finally:
        await app.stop()
        await server.close()


async def test_77_without_a_jobid_and_no_push_is_unconfirmed_with_one_mail(
        tmp_path: Path, corpus: Path) -> None:
    server = await emulator.start("127.0.0.1", 0, {"password": PASSWORD, "delay": "0.5"})
    server.state.drop_after_commit = 1
    service, app, job_id = await run_one_fax(tmp_path, corpus, server, with_push=False)
    try:
        told = await service.wait_for_mail(lambda m: m["X-Mailfax-State"] == "unconfirmed")
        assert told["X-Mailfax-Job"] == job_id
        assert "MAY HAVE BEEN SENT" in body_of(told) and f"mailfax retry {job_id}" in body_of(told)
        [fax] = server.state.jobs.values()
        assert fax.refused_resends == 1  # resent once (FAX.de documents -77), faxed once
        job = await app.store.get_job(job_id)
        assert job is not None and job.state == JobState.UNCONFIRMED
    finally:
        await app.stop()
        await server.close()


async def test_77_on_the_first_attempt_fails_as_a_duplicate_refusal_with_a_mail(
        tmp_path: Path, corpus: Path) -> None:
    server = await emulator.start("127.0.0.1", 0, {"password": PASSWORD, "delay": "0.5"})
    server.state.force("SendJob", -77)
    service, app, job_id = await run_one_fax(tmp_path, corpus, server, with_push=False)
    try:
        failed = await service.wait_for_mail(lambda m: m["X-Mailfax-State"] == "failed")
        assert "refused this fax as a duplicate" in body_of(failed)
        job = await app.store.get_job(job_id)
        assert job is not None and job.state == JobState.FAILED and job.attempts == 1
        assert job.reason is not None and job.reason.code == "duplicate_refused"
        assert server.state.jobs == {}
    finally:
        await app.stop()
        await server.close()


async def test_received_faxes_go_from_fax_de_to_the_mailbox_and_are_then_deleted(
        tmp_path: Path, corpus: Path) -> None:
    server = await emulator.start("127.0.0.1", 0, {"password": PASSWORD})
    images = {name: (corpus / "fax-tiff" / name).read_bytes()
              for name in ("fax2d.tif", "g4-multi.tiff")}
    sales = server.state.add_inbound(images["fax2d.tif"], called_number="030 1234567",
                                     originator="+4940555123", remote_id="MUSTER GMBH")
    other = server.state.add_inbound(images["g4-multi.tiff"], called_number="+4989999",
                                     pages=3)
    settings = make_settings(
        tmp_path, accounts={"main": {"provider": "fax.de", "account": "123456",
                                     "password": PASSWORD, "wsdl_url": server.wsdl_url}},
        default_account="main",
        inbound={"poll_seconds": 0.2, "routes": {"+49301234567": ["sales@example.org"]},
                 "postmaster": "pm@example.org", "from_address": "fax@example.org"})
    app = Application(settings)
    await app.start()
    service = Service(app)
    try:
        first = await service.wait_for_mail(lambda m: "sales@example.org" in str(m["To"]))
        second = await service.wait_for_mail(lambda m: "pm@example.org" in str(m["To"]))
        for _ in range(50):
            records = await app.store.list_inbound()
            if server.state.deleted == [sales, other] and all(
                    record.state == "deleted" for record in records):
                break
            await asyncio.sleep(0.1)
        assert server.state.deleted == [sales, other]  # deleted only after the mail
        assert server.state.inbox == []
        for message, pages in ((first, 1), (second, 3)):
            parsed = email.message_from_bytes(bytes(message), policy=email.policy.default)
            pdfs = [part for part in parsed.iter_attachments()
                    if part.get_content_type() == "application/pdf"]
            assert len(pdfs) == 1
            data = pdfs[0].get_payload(decode=True)
            assert isinstance(data, bytes)
            with pikepdf.open(io.BytesIO(data)) as pdf:
                assert len(pdf.pages) == pages
        first_parsed = email.message_from_bytes(bytes(first), policy=email.policy.default)
        assert "+49 40 555123" in str(first_parsed["Subject"])
        records = await app.store.list_inbound()
        assert {record.state for record in records} == {"deleted"}
    finally:
        await app.stop()
        await server.close()


async def test_bulk_cancel_waits_until_every_recipient_of_the_jobid_is_cancelled(
        tmp_path: Path, corpus: Path) -> None:
    """With bulk = true one JobId carries several of our jobs, and CancelJob cancels them all:
    so one recipient's cancel waits for the others'."""
    server = await emulator.start("127.0.0.1", 0, {"password": PASSWORD, "delay": "30"})
    provider = make_provider(server, tmp_path, bulk=True)
    store = SqliteStore(tmp_path / "store.sqlite3")
    await store.open()
    try:
        pdf = (corpus / "pdf" / "two-different-pages.pdf").read_bytes()
        mail = NewMail(mail_id="m1", envelope_from="a@example.org", message_id=None,
                       subject="s", references=[], from_header="", client_address="::1")
        ids = ["aaaaaaaaaaaa", "bbbbbbbbbbbb"]
        await store.add_mail_jobs(mail, [NewJob(job_id, "+4930123456", "main") for job_id in ids],
                                  [FaxDocument("a.pdf", pdf, 2)])
        receipts = await provider.send_many([request(corpus, job_id=job_id) for job_id in ids])
        for receipt in receipts:
            assert isinstance(receipt, SendReceipt)
            await store.record(receipt.job_id, Transition(
                state=JobState.SUBMITTED, provider_job_id=receipt.provider_job_id))
        [fax] = server.state.jobs.values()
        tracker = Tracker(store, {"main": provider}, 60)

        await store.request_cancel(ids[0])
        await tracker.poll_account("main", provider)
        assert not fax.cancelled  # the other recipient is not being cancelled
        assert [c for c in server.state.calls if c[0] == "CancelJob"] == []

        await store.request_cancel(ids[1])
        await tracker.poll_account("main", provider)
        assert fax.cancelled
        assert len([c for c in server.state.calls if c[0] == "CancelJob"]) == 1
        assert {job.state for job in await store.get_jobs(ids)} == {JobState.CANCELLED}
    finally:
        await store.close()
        await provider.close()
        await server.close()


def test_cancel_groups_hold_a_recipient_whose_jobid_is_shared() -> None:
    def job(job_id: str, provider_job_id: str | None, cancel: bool) -> Job:
        now = datetime.now(UTC)
        return Job(id=job_id, mail_id="m", account="main", number="+4930123456",
                   state=JobState.SUBMITTED, pages=1, sender="", created=now, updated=now,
                   attempts=1, next_attempt_at=None, provider_job_id=provider_job_id,
                   reason=None, duration_seconds=None, remote_id=None, options={},
                   cancel_requested=cancel, acknowledged=False)

    a, b, c = job("a", "7001", True), job("b", "7001", False), job("c", "7002", True)
    groups, held = cancel_groups([a, c], [a, b, c])
    assert [[member.id for member in group] for group in groups] == [["c"]]
    assert held == {"a": ["b"]}
    b_too = job("b", "7001", True)
    groups, held = cancel_groups([a, b_too], [a, b_too, c])
    assert [[member.id for member in group] for group in groups] == [["a", "b"]] and not held


async def test_a_pushed_jobid_is_believed_only_when_its_refid_names_the_job(
        fake: emulator.Emulator, tmp_path: Path, corpus: Path) -> None:
    store = await jobs_in_store(tmp_path, [("bbbbbbbbbbbb", "main", "dup:bbbbbbbbbbbb")])
    context = ProviderContext(account="main", data_dir=tmp_path, secret_key=b"k" * 32,
                              push_base_url="http://127.0.0.1:1/push/main",
                              get_job=store.get_job)
    settings = faxde.Settings(account="123456", password=PASSWORD, wsdl_url=fake.wsdl_url)
    provider = faxde.create(context, settings)
    from aiohttp.test_utils import make_mocked_request

    try:
        other = await provider.send(request(corpus, job_id="aaaaaaaaaaaa"))
        assert provider.unconfirmed_ref("bbbbbbbbbbbb") == "dup:bbbbbbbbbbbb"
        token = provider.push_token("bbbbbbbbbbbb")
        push = make_mocked_request("GET", f"/push/main/bbbbbbbbbbbb?t={token}"
                                          f"&cid=bbbbbbbbbbbb&jid={other.provider_job_id}")
        assert (await provider.handle_push(push, "bbbbbbbbbbbb")).status == 200
        assert provider._pushed_ids == {"bbbbbbbbbbbb": other.provider_job_id}
        await asyncio.sleep(0.5)  # job aaaa… is done
        ref = ProviderRef("bbbbbbbbbbbb", "dup:bbbbbbbbbbbb")
        assert await provider.status([ref]) == {}  # its StatusFile names aaaa…, not bbbb…
        assert provider._pushed_ids == {}
    finally:
        await provider.close()
        await store.close()


async def test_a_large_document_in_its_file_is_sent_whole(
        provider: faxde.FaxDeProvider, fake: emulator.Emulator, tmp_path: Path,
        documents_read: list[type]) -> None:
    """A large mail's document, read from its file as the SOAP envelope goes out: zeep
    builds the envelope around a marker (the emulator refuses a chunked body)."""
    from bench.memory import random_pdf
    from mailfax.documents.mapped import DocumentMap, document_file

    pdf = random_pdf(3_000_000)
    scan = FaxDocument("scan.pdf", document_file(tmp_path, [pdf]), 4)
    receipt = await provider.send(SendRequest(job_id="big1", number="+4930123456", pages=4,
                                              documents=[scan]))
    job = fake.state.jobs[int(receipt.provider_job_id)]
    assert job.files == [("scan.pdf", pdf)] and receipt.pages == 4
    assert documents_read == [DocumentMap]  # read from its file into the envelope
