"""``mailfax check-account NAME`` against each emulator (good and bad credentials, FAX.de on
the reconstructed WSDL), both documented FAX.de WSDL URL forms, plain http refused."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from pydantic import ValidationError

from mailfax.app import Application
from mailfax.config import AccountSettings
from mailfax.emulators import faxde as faxde_emulator
from mailfax.emulators import faxnummer as faxnummer_emulator
from mailfax.emulators import retarus as retarus_emulator
from mailfax.providers import faxde
from mailfax.providers.base import ProviderContext
from mailfax.providers.faxde_soap import secure_address, wsdl_url_forms
from mailfax.web.server import runner_url, start_web
from tests.conftest import make_settings


@dataclass
class Fakes:
    faxde: faxde_emulator.Emulator
    faxnummer: faxnummer_emulator.FaxnummerEmulator
    retarus: retarus_emulator.RetarusEmulator


@pytest.fixture
async def fakes() -> AsyncIterator[Fakes]:
    servers = Fakes(await faxde_emulator.start("127.0.0.1", 0, {}),
                    await faxnummer_emulator.start("127.0.0.1", 0, {}),
                    await retarus_emulator.start("127.0.0.1", 0, {}))
    yield servers
    for server in (servers.faxde, servers.faxnummer, servers.retarus):
        await server.close()


def config(fakes: Fakes, tmp_path: Path) -> Path:
    fd, rt = fakes.faxde, fakes.retarus
    centres = ", ".join(f'{name} = "{url}"' for name, url in rt.data_centre_urls.items())
    faxnummer_account = f'''provider = "faxnummer.de"
url = "{fakes.faxnummer.url}"
product_login = "acc12345"
status_email = "fax-admin@example.org"'''
    retarus_account = f'''provider = "retarus"
customer_number = "99999TE"
username = "mailfax"
send_url = "{rt.send_url}"
data_centres = {{ {centres} }}'''
    text = f'''data_dir = "data"
default_account = "faxde"

[accounts.faxde]
provider = "fax.de"
account = "123456"
password = "secret"
wsdl_url = "{fd.wsdl_url}"

[accounts.faxde-wrong-password]
provider = "fax.de"
account = "123456"
password = "wrong"
wsdl_url = "{fd.wsdl_url}"

[accounts.faxde-no-wsdl]
provider = "fax.de"
account = "123456"
password = "secret"
wsdl_url = "{fd.url}/nowsdl.exe?wsdl/IntfXMLWS"
endpoint_url = "{fd.soap_url}"

[accounts.faxnummer]
{faxnummer_account}
product_code = "secret"

[accounts.faxnummer-wrong-code]
{faxnummer_account}
product_code = "wrong"

[accounts.retarus]
{retarus_account}
password = "secret"

[accounts.retarus-wrong-password]
{retarus_account}
password = "wrong"
'''
    path = tmp_path / "mailfax.toml"
    path.write_text(text)
    path.chmod(0o600)
    return path


async def check_account(path: Path, name: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mailfax.cli", "-c", str(path), "check-account", name,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    out, _ = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, out.decode()


async def test_check_account_against_each_emulator(fakes: Fakes, tmp_path: Path) -> None:
    path = config(fakes, tmp_path)
    fd, fn, rt = fakes.faxde, fakes.faxnummer, fakes.retarus
    dc1, dc2 = (f"{url}/99999TE/fax/reports" for url in rt.data_centre_urls.values())
    expected = {
        "faxde": (0, f"""account faxde (fax.de)
  WSDL:           {fd.wsdl_url}
  endpoint:       {fd.soap_url}
  reconstruction: no
  login:          accepted (JobStatus of job 0 answered 5: Job id not found)
OK
"""),
        "faxde-wrong-password": (1, f"""account faxde-wrong-password (fax.de)
  WSDL:           {fd.wsdl_url}
  endpoint:       {fd.soap_url}
  reconstruction: no
FAILED: the account is refused: The fax service refused our account credentials; the \
administrator has to fix the configuration.
  provider's answer: FAX.de JobStatus 2: Invalid/wrong password
"""),
        "faxde-no-wsdl": (0, f"""account faxde-no-wsdl (fax.de)
  WSDL:                 bundled reconstruction
  endpoint:             {fd.soap_url}
  reconstruction:       yes: namespace and SOAPAction are guessed
  WSDL not loaded from: {fd.url}/nowsdl.exe?wsdl/IntfXMLWS: HTTP 404
  WSDL not loaded from: {fd.url}/nowsdl.exe?/wsdl/IntfXMLWS: HTTP 404
  login:                accepted (JobStatus of job 0 answered 5: Job id not found)
WARNING: account faxde-no-wsdl: FAX.de WSDL could not be loaded; running on mailfax's \
reconstruction (namespace and SOAPAction guessed)
OK, with warnings
"""),
        "faxnummer": (0, f"""account faxnummer (faxnummer.de)
  URL:         {fn.url}
  login:       acc12345
  credentials: accepted (an unknown job answered WR_Status='failed' WR_Comment='Job not \
found')
OK
"""),
        "faxnummer-wrong-code": (1, f"""account faxnummer-wrong-code (faxnummer.de)
  URL:   {fn.url}
  login: acc12345
FAILED: the account is refused: The fax service refused our account credentials; the \
administrator has to fix the configuration.
  provider's answer: WR_Status='failed' WR_Comment='Productcode invalid'
"""),
        "retarus": (0, f"""account retarus (retarus)
  send URL:    {rt.send_url}/99999TE/fax
  customer:    99999TE
  user:        mailfax
  reports DE1: {dc1}: login accepted, 0 finished job reports
  reports DE2: {dc2}: login accepted, 0 finished job reports
OK
"""),
        "retarus-wrong-password": (1, f"""account retarus-wrong-password (retarus)
  send URL: {rt.send_url}/99999TE/fax
  customer: 99999TE
  user:     mailfax
FAILED: the account is refused: The fax service refused our account credentials; the \
administrator has to fix the configuration.
  provider's answer: Retarus list reports at DE1: HTTP 401
"""),
    }
    for name, (code, output) in expected.items():
        assert await check_account(path, name) == (code, output), name
    code, output = await check_account(path, "nosuch")
    assert code == 1 and output.startswith("no account 'nosuch' (accounts: faxde, ")


async def test_the_german_docs_wsdl_url_form_is_tried_too(tmp_path: Path) -> None:
    """A server that serves the WSDL only as ``xmlws.exe?/wsdl/IntfXMLWS`` (the German
    doc's form): configured with the English form, the client still loads it."""
    fake = await faxde_emulator.start("127.0.0.1", 0, {})
    async with aiohttp.ClientSession() as http, http.get(fake.wsdl_url) as response:
        wsdl = await response.text()
    asked: list[str] = []

    async def german_only(request: web.Request) -> web.Response:
        asked.append(request.query_string)
        if request.query_string != "/wsdl/IntfXMLWS":
            raise web.HTTPNotFound()
        return web.Response(text=wsdl, content_type="text/xml")

    app = web.Application()
    app.router.add_get("/xmlws.exe", german_only)
    runner = await start_web(app, "127.0.0.1", 0)
    english = f"{runner_url(runner)}/xmlws.exe?wsdl/IntfXMLWS"
    provider = faxde.create(ProviderContext(account="fd", data_dir=tmp_path),
                            faxde.Settings.model_validate({"account": "123456",
                                                           "password": "secret",
                                                           "wsdl_url": english}))
    try:
        check = await provider.check_account()
        facts = dict(check.facts)
        assert facts["WSDL"] == english.replace("?wsdl/", "?/wsdl/")
        assert facts["reconstruction"] == "no" and not check.warnings
        assert asked == ["wsdl/IntfXMLWS", "/wsdl/IntfXMLWS"]
    finally:
        await provider.close()
        await runner.cleanup()
        await fake.close()


def test_wsdl_url_forms() -> None:
    english = "https://ccs.fax.de/xmlws.exe?wsdl/IntfXMLWS"
    german = "https://ccs.fax.de/xmlws.exe?/wsdl/IntfXMLWS"
    assert wsdl_url_forms(english) == [english, german]
    assert wsdl_url_forms(german) == [german, english]
    assert wsdl_url_forms("https://example.org/my.wsdl") == ["https://example.org/my.wsdl"]


def test_plain_http_is_refused_for_credentials_unless_allowed() -> None:
    remote = {"provider": "faxnummer.de", "url": "http://wr.example.net/index.php",
              "product_login": "acc1", "product_code": "x", "status_email": "a@b.example"}
    with pytest.raises(ValidationError, match=r"plain http.*allow_plain_http"):
        AccountSettings.model_validate(remote)
    AccountSettings.model_validate({**remote, "allow_plain_http": True})
    AccountSettings.model_validate({**remote, "url": "http://127.0.0.1:8080/index.php"})
    with pytest.raises(ValidationError, match="data_centres"):
        AccountSettings.model_validate({
            "provider": "retarus", "customer_number": "1", "username": "u", "password": "p",
            "data_centres": {"DE1": "http://faxws.de1.retarus.com/rest/v1"}})
    # A WSDL that gives an http:// address: the calls go to https:// on the same host.
    assert secure_address("http://ccs.fax.de/xmlws.exe/soap/IntfXMLWS", False) == (
        "https://ccs.fax.de/xmlws.exe/soap/IntfXMLWS")
    assert secure_address("http://ccs.fax.de/x", True) == "http://ccs.fax.de/x"
    assert secure_address("http://[::1]:8080/x", False) == "http://[::1]:8080/x"


async def test_serve_on_the_reconstruction_warns_and_readyz_says_so(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    fake = await faxde_emulator.start("127.0.0.1", 0, {})
    settings = make_settings(
        tmp_path, default_account="fd", web={"listen": "127.0.0.1:0"},
        accounts={"fd": {"provider": "fax.de", "account": "123456", "password": "secret",
                         "wsdl_url": f"{fake.url}/nowsdl.exe?wsdl/IntfXMLWS",
                         "endpoint_url": fake.soap_url, "inbound": False}})
    app = Application(settings)
    await app.start()
    try:
        assert app.web_runner is not None
        url = f"{runner_url(app.web_runner)}/readyz"
        deadline = time.monotonic() + 20
        async with aiohttp.ClientSession() as http:
            while True:
                async with http.get(url) as response:
                    text = await response.text()
                if "reconstruction" in text or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.1)
        assert response.status == 200
        assert text == ("ready, with warnings\nwarning: account fd: FAX.de WSDL could not be "
                        "loaded; running on mailfax's reconstruction (namespace and SOAPAction "
                        "guessed)\n")
        warned = [record for record in caplog.records if record.levelname == "WARNING"
                  and "RECONSTRUCTION" in record.getMessage()]
        assert warned, "serve did not log a WARNING about the reconstruction"
    finally:
        await app.stop()
        await fake.close()


async def test_retarus_an_unknown_customer_number_is_refused(fakes: Fakes,
                                                             tmp_path: Path) -> None:
    """Every data centre answers 404 for a customer number it does not know: the account is
    refused (one 404 among 200s would be a data centre without reports)."""
    from mailfax.providers import retarus
    from mailfax.providers.base import ErrorKind, ProviderError

    settings = retarus.Settings.model_validate(
        {**fakes.retarus.provider_settings(), "customer_number": "00000XX"})
    provider = retarus.create(ProviderContext(account="rt", data_dir=tmp_path), settings)
    try:
        with pytest.raises(ProviderError) as refused:
            await provider.check_account()
        assert refused.value.kind == ErrorKind.ACCOUNT
        assert [value.rsplit(": ", 1)[-1] for label, value in refused.value.facts
                if label.startswith("reports")] == ["HTTP 404", "HTTP 404"]
    finally:
        await provider.close()
