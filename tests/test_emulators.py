"""The provider emulators themselves, spoken to on the wire without a provider client."""

from __future__ import annotations

import base64
import io
from collections.abc import AsyncIterator

import aiohttp
import pikepdf
import pytest
from lxml import etree

from mailfax.emulators import faxde, faxnummer, retarus
from mailfax.emulators.rules import longest_prefix, prefix_value

SOAP_ENV = "http://schemas.xmlsoap.org/soap/envelope/"


@pytest.fixture
async def fake() -> AsyncIterator[faxde.Emulator]:
    server = await faxde.start("127.0.0.1", 0, {"delay": "0.2"})
    yield server
    await server.close()


def one_page_pdf() -> bytes:
    out = io.BytesIO()
    with pikepdf.new() as pdf:
        pdf.add_blank_page()
        pdf.save(out)
    return out.getvalue()


def send_job_envelope(reference: str) -> bytes:
    parameters = {
        "Account": "123456", "Password": "secret", "JobType": "0",
        "Recipient": f"+4930123456[{reference}]",
        "SendFile1": base64.b64encode(one_page_pdf()).decode(), "SendFilename1": "fax.pdf",
        "Options": "STATURL=http://127.0.0.1:9/status?job=$JID",
    }
    items = "".join(f"<{name}>{value}</{name}>" for name, value in parameters.items())
    return (f'<?xml version="1.0"?><SOAP-ENV:Envelope xmlns:SOAP-ENV="{SOAP_ENV}">'
            f'<SOAP-ENV:Body><NS1:SendJob xmlns:NS1="urn:emulator-test">{items}</NS1:SendJob>'
            f"</SOAP-ENV:Body></SOAP-ENV:Envelope>").encode()


async def send_job(server: faxde.Emulator, reference: str) -> int:
    return int((await send_job_answer(server, reference))["return"])


async def send_job_answer(server: faxde.Emulator, reference: str) -> dict[str, str]:
    async with aiohttp.ClientSession() as session, session.post(
            server.soap_url, data=send_job_envelope(reference),
            headers={"Content-Type": "text/xml; charset=utf-8"}) as response:
        body = await response.read()
    root = etree.fromstring(body)
    response_element = root[0][0]
    return {etree.QName(element).localname: element.text or "" for element in response_element}


@pytest.mark.parametrize("code", [-1, -2, 8, 45, 75])
async def test_faxde_forced_sendjob_refusal_stores_nothing(fake: faxde.Emulator,
                                                          code: int) -> None:
    fake.state.force("SendJob", code)
    assert await send_job(fake, "aaaaaaaaaaaa") == code
    assert fake.state.jobs == {}  # refused: no job, so no status and no push later
    assert fake._timers == [] and fake._tasks == set()
    assert fake.state.forced["SendJob"] == []  # used up
    assert await send_job(fake, "aaaaaaaaaaaa") == 0  # the next call is handled for real
    assert len(fake.state.jobs) == 1


async def test_faxde_forced_result_does_not_run_the_operation(fake: faxde.Emulator) -> None:
    fax_id = fake.state.add_inbound(b"II*\x00fax")
    fake.state.force("DeleteReceived", 1)
    envelope = (f'<SOAP-ENV:Envelope xmlns:SOAP-ENV="{SOAP_ENV}"><SOAP-ENV:Body>'
                f"<DeleteReceived><Account>123456</Account><Password>secret</Password>"
                f"<FaxId>{fax_id}</FaxId></DeleteReceived></SOAP-ENV:Body>"
                f"</SOAP-ENV:Envelope>").encode()
    async with aiohttp.ClientSession() as session, session.post(
            fake.soap_url, data=envelope) as response:
        assert response.status == 200
    assert [fax.fax_id for fax in fake.state.inbox] == [fax_id]
    assert fake.state.deleted == []


def test_the_longest_matching_prefix_wins() -> None:
    rules = {"+49": "a", "+4930999": "b", "+4930": "c"}
    assert prefix_value("+4930999123", rules) == "b"
    assert prefix_value("+4930123", rules) == "c"
    assert prefix_value("+4340123", rules) is None
    pairs = [("+4930", 1), ("", 2), ("+4930", 3)]
    assert longest_prefix("+4930123", pairs, lambda pair: pair[0]) == ("+4930", 1)  # first
    assert longest_prefix("+4340123", pairs, lambda pair: pair[0]) == ("", 2)


@pytest.mark.parametrize("optimistic", [False, True])
async def test_faxde_77_carries_no_jobid_unless_told(optimistic: bool) -> None:
    """The docs name -77 "Identical job already established (duplicate?)" and say nothing of
    a JobId with it: by default there is none."""
    options = {"delay": "0.2", **({"duplicate_job_id": "1"} if optimistic else {})}
    server = await faxde.start("127.0.0.1", 0, options)
    try:
        first = await send_job_answer(server, "aaaaaaaaaaaa")
        again = await send_job_answer(server, "aaaaaaaaaaaa")
        assert first["return"] == "0" and again["return"] == "-77"
        assert again.get("JobId", "0") == (first["JobId"] if optimistic else "0")
        assert len(server.state.jobs) == 1
        other = await send_job_answer(server, "bbbbbbbbbbbb")  # another reference: a new job
        assert other["return"] == "0" and len(server.state.jobs) == 2
    finally:
        await server.close()


async def test_faxde_a_job_just_placed_has_no_log_entry_yet() -> None:
    server = await faxde.start("127.0.0.1", 0, {"delay": "5"})
    try:
        await send_job(server, "aaaaaaaaaaaa")
        [job] = server.state.jobs.values()
        asked = {"Account": "123456", "Password": "secret", "JobId": str(job.job_id)}
        assert server.op_JobStatus(asked)["return"] == 5  # "Kein Protokoll-Eintrag" (yet)
        job.created -= server.state.unlogged
        assert server.op_JobStatus(asked)["return"] == 6  # in progress
    finally:
        await server.close()


async def test_the_defaults_are_the_pessimistic_readings() -> None:
    options, _ = faxnummer.parse_options({})
    assert options.duplicates == "none"
    state = faxnummer.EmulatorState(options=options)
    form = {"sProductLogin": options.login, "sProductCode": options.code,
            "sCommand": "SendFax", "sDestination": "004930123456", "sEmail": "a@example.org",
            "sFaxFileName": "x.pdf [job1]"}
    upload = faxnummer.Upload("x.pdf", "application/pdf", one_page_pdf())
    answers = [faxnummer.handle_call(state, form, upload) for _ in range(2)]
    assert answers[0]["WR_Request_UUID"] != answers[1]["WR_Request_UUID"]  # two faxes
    assert len(state.faxes) == 2 and "WR_Duplicate" not in answers[1]
    server = await retarus.start("127.0.0.1", 0, {})
    try:
        assert (server.state.duplicates, server.state.conflict_body) == ("none", "empty")
    finally:
        await server.close()
    for module in (faxde, faxnummer, retarus):
        doc = module.__doc__ or ""
        assert "Documented" in doc and "Assumed" in doc and "pessimistic" in doc, module
