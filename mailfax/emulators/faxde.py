"""A FAX.de emulator: SOAP over HTTP on loopback, with state, as the real client sees it.

It serves its WSDL where FAX.de serves theirs (``/xmlws.exe?wsdl/IntfXMLWS``, and the path form
``/xmlws.exe/wsdl/IntfXMLWS``) with the address rewritten to itself, answers in the style that
WSDL declares (rpc or document), checks account and password, returns the documented result
codes, progresses jobs NEW → sending → done after ``delay`` seconds, fails numbers by prefix,
builds StatusFile CSVs, calls STATURL when a job finishes, and keeps an inbox of received faxes.

Documented (``shared/provider-docs/fax-de-soap-api.{en.md,de.txt}``), and so emulated as
written: the five operations with their parameters and every result code; the WSDL at
``xmlws.exe?wsdl/IntfXMLWS`` (the English doc) and the path form; the reference in ``[]``
after the recipient coming back as REFID in the StatusFile CSV and as ``$CID`` in STATURL;
STATURL "called, when the job is finished" with ``$JID``, ``$STAT``, ...; -77 "Identical job
already established (duplicate?)"; CancelJob taking a JobId (so a bulk job is cancelled with
all its recipients).

Assumed, because the docs are silent, and by default the pessimistic reading:

* What "identical" is for -77: the same recipients with the same references, files and
  text. Every recipient needs a reference, or nothing is a duplicate.
* -77 answers without a JobId (the docs name JobId only as "the id of the new job").
  Option ``duplicate_job_id=1`` is the optimistic opposite: -77 with the existing JobId.
* JobStatus of a job just placed: result 5 ("no log entry for this JobId") for
  ``unlogged`` seconds (0.3) after SendJob, before 6 ("still in progress").
* The SOAP style and namespace: those of the WSDL it serves (the real one is not public).

Options (``mailfax emulate fax.de --option key=value``): ``account``, ``password``, ``delay``,
``fail`` (``+4930999:Busy,+4930998:No Answer``), ``wsdl`` (path of another WSDL to serve),
``inbound`` (comma-separated TIFF paths to put in the inbox), ``unlogged``,
``duplicate_job_id``, ``partial`` (``+4930996:1``: result OK but PAGES, ``$MSGGS``, only
that many: the doc's PAGES is "Number of pages", and it does not say that OK means all of
them).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import csv
import hashlib
import io
import itertools
import re
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from lxml import etree

from mailfax.emulators import pdf_pages
from mailfax.emulators.fax_image import tiff_pages
from mailfax.emulators.http import length_required
from mailfax.emulators.rules import pages_sent, prefix_value
from mailfax.providers.faxde_soap import BUNDLED_WSDL, parse_untrusted
from mailfax.support.waiting import cancel_all_and_wait
from mailfax.web.server import runner_url, start_web

SOAP_ENV = "http://schemas.xmlsoap.org/soap/envelope/"
XSI = "http://www.w3.org/2001/XMLSchema-instance"
PREMIUM_PREFIXES = ("+49900", "+49137", "+49180")
ALLOWED_SUFFIXES = (".tif", ".tiff", ".bmp", ".html", ".htm", ".doc", ".xls", ".pdf")
OUT_PARAMETERS = {
    "SendJob": ("return", "JobId", "RecipientsCount", "PageCount"),
    "JobStatus": ("return", "SendResult", "SendDateTime", "RemoteId", "StatusFile"),
    "CancelJob": ("return",),
    "RequestReceived": ("return", "FaxId", "CalledNumber", "ReceiveDate", "Originator",
                        "RemoteId", "Pages", "FaxImage"),
    "DeleteReceived": ("return",),
}


@dataclass
class Recipient:
    number: str
    reference: str
    result: str = ""


@dataclass
class EmulatedJob:
    job_id: int
    recipients: list[Recipient]
    files: list[tuple[str, bytes]]
    options: dict[str, str]
    pages: int
    created: float
    fingerprint: str
    cancelled: bool = False
    # SendDateTime as received ("Scheduled date and time (UTC)"); None: missing or past,
    # "immediately sending". The fax is sent (and finishes ``delay`` later) from ``starts``.
    send_at: datetime | None = None
    starts: float = 0.0
    refused_resends: int = 0  # -77 answers for this job


@dataclass
class InboxFax:
    fax_id: int
    called_number: str
    originator: str
    remote_id: str
    pages: int
    image: bytes
    received: datetime = field(default_factory=lambda: datetime.now(UTC))


@dataclass
class EmulatorState:
    account: str = "123456"
    password: str = "secret"
    delay: float = 2.0
    unlogged: float = 0.3  # JobStatus answers 5 this long after SendJob
    duplicate_job_id: bool = False  # -77 with the existing JobId (optimistic)
    fail: dict[str, str] = field(default_factory=dict)  # number prefix -> SendResult
    partial: dict[str, int] = field(default_factory=dict)  # number prefix -> pages sent
    jobs: dict[int, EmulatedJob] = field(default_factory=dict)
    inbox: list[InboxFax] = field(default_factory=list)
    deleted: list[int] = field(default_factory=list)
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    forced: dict[str, list[int]] = field(default_factory=dict)  # operation -> result codes
    drop_after_commit: int = 0  # drop the connection after this many committed SendJobs
    pushes: list[str] = field(default_factory=list)
    push_statuses: list[int] = field(default_factory=list)  # HTTP status of each push
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(7001))
    _fax_ids: itertools.count[int] = field(default_factory=lambda: itertools.count(90001))

    def force(self, operation: str, *results: int) -> None:
        """Answer the next calls of ``operation`` with these result codes, without running
        the operation (tests)."""
        self.forced.setdefault(operation, []).extend(results)

    def add_inbound(self, image: bytes, called_number: str = "+49301234567",
                    originator: str = "+4940555123", remote_id: str = "MUSTER GMBH",
                    pages: int | None = None) -> int:
        """Put a fax into the inbox; ``pages`` defaults to the TIFF's own page count, as
        FAX.de reports the pages it received."""
        if pages is None:
            pages = tiff_pages(image)
        fax_id = next(self._fax_ids)
        self.inbox.append(InboxFax(fax_id, called_number, originator, remote_id, pages, image))
        return fax_id


class Emulator:
    def __init__(self, state: EmulatorState, wsdl_text: str):
        self.state = state
        self.wsdl_text = wsdl_text
        self.style, self.namespace = wsdl_style(wsdl_text.encode())
        self.out_order = output_order(wsdl_text.encode())
        self.runner: web.AppRunner | None = None
        self.url = ""
        self._session: aiohttp.ClientSession | None = None
        self._timers: list[asyncio.TimerHandle] = []
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def wsdl_url(self) -> str:
        return f"{self.url}/xmlws.exe?wsdl/IntfXMLWS"

    @property
    def soap_url(self) -> str:
        return f"{self.url}/xmlws.exe/soap/IntfXMLWS"

    async def start(self, host: str, port: int) -> None:
        app = web.Application(middlewares=[length_required], client_max_size=64 * 1024 * 1024)
        app.router.add_get("/xmlws.exe", self.wsdl)
        app.router.add_get("/xmlws.exe/wsdl/IntfXMLWS", self.wsdl)
        app.router.add_post("/xmlws.exe/soap/IntfXMLWS", self.soap)
        self.runner = await start_web(app, host, port)
        self.url = runner_url(self.runner)

    async def close(self) -> None:
        for timer in self._timers:
            timer.cancel()
        await cancel_all_and_wait(self._tasks)
        if self._session is not None:
            await self._session.close()
        if self.runner is not None:
            await self.runner.cleanup()

    async def wsdl(self, request: web.Request) -> web.Response:
        if request.path == "/xmlws.exe" and "wsdl" not in request.query_string:
            raise web.HTTPNotFound()
        text = re.sub(r'location="[^"]*"', f'location="{self.soap_url}"', self.wsdl_text)
        return web.Response(text=text, content_type="text/xml")

    async def soap(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        try:
            operation, parameters = parse_request(body)
        except ValueError as error:
            return fault(str(error))
        self.state.calls.append((operation, parameters))
        handler = getattr(self, f"op_{operation}", None)
        if handler is None:
            return fault(f"unknown operation {operation}")
        forced = self.state.forced.get(operation)
        if forced:  # answered without running the operation: nothing is stored or changed
            values: dict[str, Any] = {"return": forced.pop(0)}
        else:
            values = handler(parameters)
            if (operation == "SendJob" and values.get("return") == 0
                    and self.state.drop_after_commit):
                self.state.drop_after_commit -= 1
                if request.transport is not None:
                    request.transport.abort()  # the job is stored; the answer is lost
                return web.Response(status=500)  # goes nowhere: the connection is gone
        return web.Response(body=self.answer(operation, values),
                            content_type="text/xml", charset="utf-8")

    # -- operations --------------------------------------------------------------------------

    def _authorised(self, parameters: dict[str, Any], unknown: int, wrong: int) -> int | None:
        if parameters.get("Account") != self.state.account:
            return unknown
        if parameters.get("Password") != self.state.password:
            return wrong
        return None

    def op_SendJob(self, parameters: dict[str, Any]) -> dict[str, Any]:
        refused = self._authorised(parameters, unknown=-2, wrong=-1)
        if refused is not None:
            return {"return": refused}
        if str(parameters.get("JobType", "0")) != "0":
            return {"return": 4}
        recipients = parse_recipients(str(parameters.get("Recipient") or ""),
                                      _decode(parameters.get("RecipientFile")))
        if not recipients:
            return {"return": 8}
        for recipient in recipients:
            if recipient.number.startswith(PREMIUM_PREFIXES):
                return {"return": 45}
            if not re.fullmatch(r"\+?[0-9]{6,17}", recipient.number):
                return {"return": 46}
        files = []
        for index in (1, 2, 3):
            data = _decode(parameters.get(f"SendFile{index}"))
            name = str(parameters.get(f"SendFilename{index}") or "")
            if data:
                files.append((name, data))
        text = str(parameters.get("SendText") or "")
        if not files and not text:
            return {"return": 75}
        pages = 1 if text else 0
        for name, data in files:
            if not name.lower().endswith(ALLOWED_SUFFIXES):
                return {"return": -6}
            counted = pdf_pages(data) if name.lower().endswith(".pdf") else 1
            if counted is None:
                return {"return": -7}
            pages += counted
        fingerprint = hashlib.sha256(repr(([(r.number, r.reference) for r in recipients],
                                           [data for _, data in files], text)).encode())
        duplicate = self._find_duplicate(fingerprint.hexdigest(), recipients)
        if duplicate is not None:
            duplicate.refused_resends += 1
            if not self.state.duplicate_job_id:
                return {"return": -77}
            return {"return": -77, "JobId": duplicate.job_id,
                    "RecipientsCount": len(duplicate.recipients), "PageCount": duplicate.pages}
        now = time.time()
        send_at = scheduled_time(str(parameters.get("SendDateTime") or ""), now)
        job = EmulatedJob(job_id=next(self.state._ids), recipients=recipients,
                          files=files, options=parse_options(
                              str(parameters.get("Options") or "")),
                          pages=pages, created=now, fingerprint=fingerprint.hexdigest(),
                          send_at=send_at, starts=send_at.timestamp() if send_at else now)
        self.state.jobs[job.job_id] = job
        self._schedule_finish(job)
        return {"return": 0, "JobId": job.job_id, "RecipientsCount": len(recipients),
                "PageCount": pages}

    def _find_duplicate(self, fingerprint: str,
                        recipients: list[Recipient]) -> EmulatedJob | None:
        if not all(recipient.reference for recipient in recipients):
            return None  # without references FAX.de cannot tell a resend from a new fax
        for job in self.state.jobs.values():
            if job.fingerprint == fingerprint:
                return job
        return None

    def op_JobStatus(self, parameters: dict[str, Any]) -> dict[str, Any]:
        refused = self._authorised(parameters, unknown=1, wrong=2)
        if refused is not None:
            return {"return": refused}
        job = self.state.jobs.get(_int(parameters.get("JobId")))
        if job is None or time.time() - job.created < self.state.unlogged:
            return {"return": 5}
        if not self.finished(job):
            return {"return": 6}
        results = [self.result_of(job, recipient) for recipient in job.recipients]
        single = len(job.recipients) == 1
        return {"return": 0, "SendResult": results[0] if single else "multi",
                "SendDateTime": datetime.fromtimestamp(job.starts + self.state.delay, UTC),
                "RemoteId": "EMULATED FAX" if single and results[0] == "OK" else "",
                "StatusFile": self.status_file(job)}

    def op_CancelJob(self, parameters: dict[str, Any]) -> dict[str, Any]:
        if self._authorised(parameters, unknown=-1, wrong=-1) is not None:
            return {"return": -1}
        job = self.state.jobs.get(_int(parameters.get("JobId")))
        if job is None:
            return {"return": -2}
        if self.finished(job):
            return {"return": 1}
        job.cancelled = True
        return {"return": 0}

    def op_RequestReceived(self, parameters: dict[str, Any]) -> dict[str, Any]:
        refused = self._authorised(parameters, unknown=1, wrong=2)
        if refused is not None:
            return {"return": refused}
        if not self.state.inbox:
            return {"return": 5}
        fax = self.state.inbox[0]  # the same fax again until it is deleted
        return {"return": 0, "FaxId": fax.fax_id, "CalledNumber": fax.called_number,
                "ReceiveDate": fax.received, "Originator": fax.originator,
                "RemoteId": fax.remote_id, "Pages": fax.pages, "FaxImage": fax.image}

    def op_DeleteReceived(self, parameters: dict[str, Any]) -> dict[str, Any]:
        refused = self._authorised(parameters, unknown=1, wrong=2)
        if refused is not None:
            return {"return": refused}
        fax_id = _int(parameters.get("FaxId"))
        for fax in self.state.inbox:
            if fax.fax_id == fax_id:
                self.state.inbox.remove(fax)
                self.state.deleted.append(fax_id)
                return {"return": 0}
        return {"return": 5}

    # -- job progress ------------------------------------------------------------------------

    def finished(self, job: EmulatedJob) -> bool:
        return job.cancelled or time.time() - job.starts >= self.state.delay

    def result_of(self, job: EmulatedJob, recipient: Recipient) -> str:
        if job.cancelled:
            return "Send-Fail"
        result = prefix_value(recipient.number, self.state.fail)
        return "OK" if result is None else result

    def pages_sent(self, job: EmulatedJob, recipient: Recipient) -> int:
        """All the job's pages, or fewer for a number with a ``partial`` rule."""
        return pages_sent(recipient.number, self.state.partial, job.pages)

    def status_file(self, job: EmulatedJob) -> bytes:
        out = io.StringIO()
        writer = csv.writer(out, quoting=csv.QUOTE_ALL, lineterminator="\r\n")
        writer.writerow(["RECIPIENT", "JOBTYPE", "RESULT", "REMOTEID", "PAGES", "SENDDATETIME",
                         "DURATION", "REFID"])
        sent = datetime.fromtimestamp(job.starts + self.state.delay, UTC)
        for recipient in job.recipients:
            result = self.result_of(job, recipient)
            pages = self.pages_sent(job, recipient) if result == "OK" else 0
            writer.writerow([recipient.number, "FAX", result,
                             "EMULATED FAX" if result == "OK" else "", pages,
                             sent.strftime("%Y-%m-%d %H:%M:%S"),
                             pages * 19 + 3 if pages else 0, recipient.reference])
        return out.getvalue().encode()

    def _schedule_finish(self, job: EmulatedJob) -> None:
        url = job.options.get("STATURL")
        if not url:
            return
        loop = asyncio.get_running_loop()
        wait = job.starts - time.time() + self.state.delay + 0.05
        self._timers.append(loop.call_later(max(wait, 0.05), self._start_push, job))

    def _start_push(self, job: EmulatedJob) -> None:
        task = asyncio.get_running_loop().create_task(self._push(job))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _push(self, job: EmulatedJob) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        for recipient in job.recipients:
            result = self.result_of(job, recipient)
            url = status_url(job.options["STATURL"], job, recipient, result,
                             self.pages_sent(job, recipient) if result == "OK" else 0)
            self.state.pushes.append(url)
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with self._session.get(url) as response:
                    await response.read()
                    self.state.push_statuses.append(response.status)

    # -- SOAP answers ------------------------------------------------------------------------

    def answer(self, operation: str, values: dict[str, Any]) -> bytes:
        envelope = etree.Element(f"{{{SOAP_ENV}}}Envelope", nsmap={
            "SOAP-ENV": SOAP_ENV, "xsi": XSI, "xsd": "http://www.w3.org/2001/XMLSchema",
            "NS1": self.namespace})
        body = etree.SubElement(envelope, f"{{{SOAP_ENV}}}Body")
        wrapper = etree.SubElement(body, f"{{{self.namespace}}}{operation}Response")
        child_namespace = "" if self.style == "rpc" else f"{{{self.namespace}}}"
        for name in self.out_order.get(operation) or OUT_PARAMETERS[operation]:
            if name not in values:
                if name == "return":
                    continue
                values[name] = _empty(name)
            element = etree.SubElement(wrapper, f"{child_namespace}{name}")
            element.text = _text(values[name])
        return bytes(etree.tostring(envelope, xml_declaration=True, encoding="utf-8"))


def wsdl_style(data: bytes) -> tuple[str, str]:
    """(``rpc`` or ``document``, the namespace answers use) as the WSDL declares them."""
    root = parse_untrusted(data)
    binding = root.find(".//{http://schemas.xmlsoap.org/wsdl/soap/}binding")
    style = binding.get("style", "document") if binding is not None else "document"
    if style == "rpc":
        body = root.find(".//{http://schemas.xmlsoap.org/wsdl/soap/}body")
        namespace = body.get("namespace", "") if body is not None else ""
    else:
        schema = root.find(".//{http://www.w3.org/2001/XMLSchema}schema")
        namespace = schema.get("targetNamespace", "") if schema is not None else ""
    return style, namespace or str(root.get("targetNamespace", ""))


def output_order(data: bytes) -> dict[str, list[str]]:
    """Each operation's out-parameters in the order the WSDL lists them (message parts for
    rpc, the response element's sequence for document style)."""
    wsdl = "{http://schemas.xmlsoap.org/wsdl/}"
    root = parse_untrusted(data)
    messages = {message.get("name"): message for message in root.iter(f"{wsdl}message")}
    elements = {element.get("name"): element
                for element in root.iter("{http://www.w3.org/2001/XMLSchema}element")
                if element.get("name")}
    order: dict[str, list[str]] = {}
    port_type = root.find(f"{wsdl}portType")
    for operation in port_type if port_type is not None else []:
        output = operation.find(f"{wsdl}output")
        if output is None:
            continue
        message = messages.get(output.get("message", "").split(":")[-1])
        if message is None:
            continue
        names = [str(part.get("name")) for part in message.iter(f"{wsdl}part")]
        parts = list(message.iter(f"{wsdl}part"))
        if len(parts) == 1 and parts[0].get("element"):
            wrapper = elements.get(parts[0].get("element", "").split(":")[-1])
            if wrapper is not None:
                names = [str(child.get("name")) for child in
                         wrapper.iter("{http://www.w3.org/2001/XMLSchema}element")
                         if child is not wrapper and child.get("name")]
        order[str(operation.get("name"))] = names
    return order


def parse_request(body: bytes) -> tuple[str, dict[str, Any]]:
    """A SOAP request in any style → (operation, {parameter: text})."""
    root = parse_untrusted(body, huge=True)
    found = root.find(f"{{{SOAP_ENV}}}Body")
    if found is None or len(found) == 0:
        raise ValueError("no SOAP body")
    call = found[0]
    operation = etree.QName(call).localname
    parameters = {etree.QName(child).localname: (child.text or "") for child in call}
    return operation, parameters


def parse_recipients(recipient: str, recipient_file: bytes) -> list[Recipient]:
    entries: list[tuple[str, str]] = []
    for part in recipient.split(","):
        match = re.fullmatch(r"\s*([^\[\]]+?)\s*(?:\[([^\]]*)\])?\s*", part)
        if part.strip() and match:
            entries.append((match.group(1), match.group(2) or ""))
    for row in csv.reader(io.StringIO(recipient_file.decode("utf-8", errors="replace"))):
        if row and row[0].strip():
            entries.append((row[0].strip(), row[1].strip() if len(row) > 1 else ""))
    return [Recipient(number=_international(number), reference=reference)
            for number, reference in entries]


def scheduled_time(text: str, now: float) -> datetime | None:
    """SendDateTime: "Scheduled date and time (UTC) to send the job. A missing value or a
    time in the past will cause immediately sending." A dateTime without a zone is UTC, as
    the docs say; one that cannot be read is taken as missing."""
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when if when.timestamp() > now else None


def parse_options(text: str) -> dict[str, str]:
    options = {}
    for item in text.split(";"):
        key, _, value = item.partition("=")
        if key.strip():
            options[key.strip().upper()] = value.strip()
    return options


def status_url(template: str, job: EmulatedJob, recipient: Recipient, result: str,
               pages: int) -> str:
    """``template`` with its tokens filled in; ``pages``: the pages sent ($MSGGS)."""
    ok = result == "OK"
    sent = datetime.fromtimestamp(job.created, UTC)
    values = {"$JID": str(job.job_id), "$RCV": recipient.number,
              "$STAT": result.upper().replace(" ", "").replace("-", ""),
              "$MSGGS": str(pages), "$COST": "0.09" if ok else "0.00",
              "$RID": "EMULATED FAX" if ok else "", "$CID": recipient.reference,
              "$DATE": sent.strftime("%d.%m.%y"), "$TIME": sent.strftime("%H:%M:%S"),
              "$SEC": str(pages * 19 + 3 if pages else 0), "$RET": "0", "$COD": "MMR",
              "$SPD": "14400"}
    url = template
    for token in sorted(values, key=len, reverse=True):
        url = url.replace(token, values[token])
    return url if "://" in url else f"http://{url}"


def fault(message: str) -> web.Response:
    envelope = (f'<?xml version="1.0"?><SOAP-ENV:Envelope xmlns:SOAP-ENV="{SOAP_ENV}">'
                f"<SOAP-ENV:Body><SOAP-ENV:Fault><faultcode>SOAP-ENV:Client</faultcode>"
                f"<faultstring>{_escape(message)}</faultstring></SOAP-ENV:Fault>"
                f"</SOAP-ENV:Body></SOAP-ENV:Envelope>")
    return web.Response(status=500, text=envelope, content_type="text/xml")


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _international(number: str) -> str:
    digits = re.sub(r"[\s\-/().]", "", number)
    return "+" + digits[2:] if digits.startswith("00") else digits


def _decode(value: Any) -> bytes:
    if not value:
        return b""
    try:
        return base64.b64decode(str(value), validate=False)
    except ValueError:
        return b""


def _int(value: Any) -> int:
    try:
        return int(str(value))
    except ValueError:
        return -1


def _empty(name: str) -> Any:
    if name in ("SendDateTime", "ReceiveDate"):
        return datetime(1899, 12, 30, tzinfo=UTC)  # Delphi's zero date
    if name in ("StatusFile", "FaxImage"):
        return b""
    if name in ("JobId", "RecipientsCount", "PageCount", "FaxId", "Pages"):
        return 0
    return ""


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return str(value)


def _prefix_rules(text: str) -> dict[str, str]:
    """``+4930999:Busy,+4930998:No Answer`` -> {"+4930999": "Busy", ...}; items without
    ``:`` are skipped."""
    return dict(item.split(":", 1) for item in text.split(",") if ":" in item)


async def start(host: str, port: int, options: dict[str, str]) -> Emulator:
    state = EmulatorState(
        account=options.get("account", "123456"), password=options.get("password", "secret"),
        delay=float(options.get("delay", "2")),
        unlogged=float(options.get("unlogged", "0.3")),
        duplicate_job_id=options.get("duplicate_job_id", "0").lower() in ("1", "true", "yes"),
        fail=_prefix_rules(options.get("fail", "")),
        partial={prefix: int(pages)
                 for prefix, pages in _prefix_rules(options.get("partial", "")).items()},
    )
    for path in filter(None, options.get("inbound", "").split(",")):
        state.add_inbound(await asyncio.to_thread(Path(path).read_bytes))
    wsdl_path = Path(options["wsdl"]) if options.get("wsdl") else BUNDLED_WSDL
    emulator = Emulator(state, await asyncio.to_thread(wsdl_path.read_text, "utf-8"))
    await emulator.start(host, port)
    return emulator
