"""The SOAP layer for FAX.de: load a WSDL, call an operation by name, read its out-parameters.

Nothing here knows the namespace, SOAPAction, style or binding name: they come from whatever
WSDL is loaded (the live one when it can be fetched, else the last good copy in the data dir,
else the reconstruction shipped in ``wsdl/IntfXMLWS.wsdl``). Operations are called by their
documented names with the documented parameters; results are read by the documented names of
the out-parameters, and the function result from the part ``return`` (or ``Result``).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
import zeep
from lxml import etree
from zeep.exceptions import Error as ZeepError
from zeep.exceptions import Fault
from zeep.helpers import serialize_object
from zeep.proxy import AsyncServiceProxy
from zeep.transports import AsyncTransport

from mailfax.providers.base import is_loopback_url
from mailfax.providers.http import request_may_have_arrived
from mailfax.providers.upload import Upload
from mailfax.support import xmlsafe

log = logging.getLogger(__name__)
# zeep's transport logs every SOAP message it sends and receives, whole, at DEBUG: the
# <Account> and <Password> of each call included. Hold that logger at INFO so the FAX.de
# password never reaches a log, whatever level the rest of the logging runs at.
logging.getLogger("zeep.transports").setLevel(logging.INFO)

BUNDLED_WSDL = Path(__file__).with_name("wsdl") / "IntfXMLWS.wsdl"
OPERATIONS = ("SendJob", "JobStatus", "CancelJob", "RequestReceived", "DeleteReceived")
RESULT_NAMES = ("return", "result", "Result", "Return")
MAX_CONNECTIONS = 10  # per account; callers bound their concurrent calls to it


RECONSTRUCTION = "bundled reconstruction"
# The two ways FAX.de's docs write the WSDL's URL: the English "?wsdl/IntfXMLWS" and the
# German "?/wsdl/IntfXMLWS".
WSDL_FORMS = ("?wsdl/", "?/wsdl/")


def wsdl_url_forms(url: str) -> list[str]:
    """``url`` first, then the same URL in the other documented form (if it is in one)."""
    for form, other in (WSDL_FORMS, WSDL_FORMS[::-1]):
        if form in url:
            return [url, url.replace(form, other, 1)]
    return [url]


def secure_address(address: str, allow_plain_http: bool) -> str:
    """The SOAP address to send credentials to: a WSDL's ``http://`` address of another
    machine becomes ``https://`` (FAX.de documents both), unless plain http is allowed."""
    if address.lower().startswith("http://") and not (allow_plain_http or
                                                       is_loopback_url(address)):
        upgraded = "https://" + address[len("http://"):]
        log.warning("FAX.de WSDL gives the plain-http address %s; sending to %s instead, so "
                    "the password does not travel in clear (allow_plain_http = true keeps "
                    "http)", address, upgraded)
        return upgraded
    return address


class SoapError(Exception):
    """The call did not produce a readable answer (transport, fault, or unknown shape).

    ``may_have_arrived``: the request may have reached FAX.de and been acted on (the
    connection broke or timed out after it was made, or the answer was unreadable); not for a
    failure to connect or a SOAP fault (the server refused the request)."""

    def __init__(self, message: str, may_have_arrived: bool = False):
        super().__init__(message)
        self.may_have_arrived = may_have_arrived


def zeep_settings() -> zeep.Settings:
    """No DTDs, no entities, no external references: a hostile WSDL or answer cannot read
    local files or expand entities. Huge trees are allowed: without them lxml silently cuts a
    text node at 10 MB, and a received fax's base64 <FaxImage> is often larger (it arrived
    damaged and the elements after it were lost). Out-parameters are read by name, in any
    order (a Delphi server need not keep the order of the WSDL's parts)."""
    return zeep.Settings(strict=False, xml_huge_tree=True, forbid_dtd=True,
                         forbid_entities=True, forbid_external=True, force_https=False,
                         xsd_ignore_sequence_order=True)


def parse_untrusted(data: bytes, *, huge: bool = False) -> Any:
    """An lxml tree of untrusted XML: no DTD or entity declaration, no network, and a
    bounded tree unless ``huge`` (a SOAP body carrying documents)."""
    xmlsafe.refuse_dtd(data)  # raises UnsafeXML, a ValueError
    parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False,
                             huge_tree=huge)
    try:
        return etree.fromstring(data, parser)
    except etree.XMLSyntaxError as error:
        raise ValueError(f"not XML: {error}") from None


def check_wsdl(data: bytes) -> None:
    """Raise ValueError unless ``data`` is a safe WSDL that has the five FAX.de operations."""
    root = parse_untrusted(data)
    names = {element.get("name") for element in root.iter("{*}operation")}
    missing = [name for name in OPERATIONS if name not in names]
    if missing:
        raise ValueError(f"lacks operations {', '.join(missing)}")


# The documents of the call being made in this task (SoapClient.call's ``upload``).
_CALL_UPLOAD: contextvars.ContextVar[Upload | None] = contextvars.ContextVar(
    "faxde_call_upload", default=None)


class DocumentTransport(AsyncTransport):
    """zeep's transport, sending a call's documents from where they are: zeep builds the
    envelope around their markers, and the body reads each document as it goes out (see
    providers.upload)."""

    async def post(self, address: str, message: bytes, headers: dict[str, str]) -> Any:
        upload = _CALL_UPLOAD.get()
        if upload is None:
            return await super().post(address, message, headers)
        body = upload.body(message)
        return await self.client.post(address, content=body, headers={**headers, **body.headers})


class SoapClient:
    """One account's zeep client, created on first use."""

    def __init__(self, wsdl_url: str, cache_path: Path, endpoint_url: str | None,
                 timeout: float, allow_plain_http: bool = False):
        self.allow_plain_http = allow_plain_http
        self.address = ""  # where the calls go, once loaded
        self.wsdl_tried: list[str] = []  # (url: error) of the WSDL URLs that failed
        self.wsdl_url = wsdl_url
        self.cache_path = cache_path
        self.endpoint_url = endpoint_url
        self.timeout = timeout
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=10.0),
                                      limits=httpx.Limits(max_connections=MAX_CONNECTIONS),
                                      transport=httpx.AsyncHTTPTransport(retries=2))
        self._service: Any = None
        self._lock = asyncio.Lock()
        self.wsdl_source = ""

    async def call(self, operation: str, upload: Upload | None = None,
                   **parameters: Any) -> dict[str, Any]:
        """``operation`` with ``parameters``; the markers of ``upload`` among them (see
        providers.upload) are sent as their documents."""
        service = await self._get_service()
        token = _CALL_UPLOAD.set(upload)
        try:
            answer = await getattr(service, operation)(**parameters)
        except httpx.HTTPError as error:
            raise SoapError(f"{operation}: {type(error).__name__}: {error}",
                            request_may_have_arrived(error)) from None
        except ZeepError as error:
            raise SoapError(f"{operation}: {type(error).__name__}: {error}",
                            not isinstance(error, Fault)) from None
        finally:
            _CALL_UPLOAD.reset(token)
        try:
            return outputs(answer)
        except SoapError as error:
            raise SoapError(f"{operation}: {error}", may_have_arrived=True) from None

    async def load(self) -> None:
        """Load the WSDL now (else the first call does): ``wsdl_source`` and ``address`` say
        which one and where calls go."""
        await self._get_service()

    @property
    def reconstruction(self) -> bool:
        """Whether calls run on mailfax's reconstructed WSDL (guessed namespace and
        SOAPAction: against the real service every call may fault)."""
        return self.wsdl_source == RECONSTRUCTION

    async def close(self) -> None:
        await self.http.aclose()

    async def _get_service(self) -> Any:
        async with self._lock:
            if self._service is None:
                path = await self._wsdl_path()
                self._service = await asyncio.to_thread(self._build_service, path)
            return self._service

    def _build_service(self, path: Path) -> Any:
        # zeep uses the synchronous wsdl_client only while it loads the WSDL (a local file
        # here); it never closes it, so close it once the client is built.
        with httpx.Client(timeout=self.timeout) as wsdl_http:
            transport = DocumentTransport(client=self.http, wsdl_client=wsdl_http)
            client = zeep.AsyncClient(str(path), transport=transport, settings=zeep_settings())
        service = next(iter(client.wsdl.services.values()))
        port = next(iter(service.ports.values()))
        address = self.endpoint_url or secure_address(port.binding_options["address"],
                                                      self.allow_plain_http)
        self.address = address
        return AsyncServiceProxy(client, port.binding, address=address)

    async def _wsdl_path(self) -> Path:
        """The live WSDL when it can be fetched (and cached) under either documented form of
        its URL, else the cache, else the bundled reconstruction."""
        self.wsdl_tried = []
        for url in wsdl_url_forms(self.wsdl_url):
            wsdl = await self._fetch_wsdl(url)
            if wsdl is not None:
                await asyncio.to_thread(self._cache, wsdl)
                self.wsdl_source = url
                return self.cache_path
        tried = "; ".join(self.wsdl_tried)
        if await asyncio.to_thread(self.cache_path.exists):
            log.warning("FAX.de WSDL unavailable (%s); using the cached copy %s", tried,
                        self.cache_path)
            self.wsdl_source = f"cached copy {self.cache_path}"
            return self.cache_path
        log.warning("FAX.de WSDL unavailable (%s); RUNNING ON MAILFAX'S RECONSTRUCTION of it "
                    "(namespace and SOAPAction guessed): against the real service every call "
                    "may fault. Check with `mailfax check-account`.", tried)
        self.wsdl_source = RECONSTRUCTION
        return BUNDLED_WSDL

    async def _fetch_wsdl(self, url: str) -> bytes | None:
        try:
            response = await self.http.get(url, timeout=min(self.timeout, 20.0))
            response.raise_for_status()
            check_wsdl(response.content)
        except httpx.HTTPStatusError as error:
            self.wsdl_tried.append(f"{url}: HTTP {error.response.status_code}")
            return None
        except (httpx.HTTPError, ValueError) as error:
            first_line = (str(error).splitlines() or [""])[0]
            self.wsdl_tried.append(f"{url}: {type(error).__name__}: {first_line}"[:300])
            return None
        return response.content

    def _cache(self, wsdl: bytes) -> None:
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.cache_path.with_suffix(".tmp")
        temporary.write_bytes(wsdl)
        os.replace(temporary, self.cache_path)


def outputs(answer: Any) -> dict[str, Any]:
    """zeep's answer (a scalar, or an object of out-parameters) → {name: value} with the
    function result under ``return``."""
    data = serialize_object(answer)
    if not isinstance(data, Mapping):
        return {"return": data}
    flat = dict(data)
    if len(flat) == 1:  # document/literal: a wrapper with the parameters inside
        (inner,) = flat.values()
        if isinstance(inner, Mapping):
            flat = dict(inner)
    for name in RESULT_NAMES:
        if name in flat:
            flat["return"] = flat[name]
            break
    else:
        result_keys = [key for key in flat if key.endswith("Result") and key != "SendResult"]
        if result_keys:
            flat["return"] = flat[result_keys[0]]
    if "return" not in flat:
        raise SoapError(f"answer without a result code (parts: {', '.join(flat)})")
    return flat
