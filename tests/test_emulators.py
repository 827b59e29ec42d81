"""The provider emulators themselves, spoken to on the wire without a provider client."""

from __future__ import annotations

import base64
import io
from collections.abc import AsyncIterator

import aiohttp
import pikepdf
import pytest
from lxml import etree

from mailfax.emulators import faxde
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
    async with aiohttp.ClientSession() as session, session.post(
            server.soap_url, data=send_job_envelope(reference),
            headers={"Content-Type": "text/xml; charset=utf-8"}) as response:
        body = await response.read()
    root = etree.fromstring(body)
    (result,) = [element for element in root.iter()
                 if isinstance(element.tag, str) and etree.QName(element).localname == "return"]
    return int(result.text or "")


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
