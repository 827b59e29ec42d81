"""A Retarus Fax4A REST v1 emulator: one HTTP server playing an HA region of two data centres.

Paths (``{cust}`` is the customer number):

- ``POST /ha/rest/v1/{cust}/fax``: the HA send URL; jobs go to the data centres in turn.
- ``/dc/{DC}/rest/v1/{cust}/fax`` and ``…/fax/reports[/{jobId}]``: one data centre, which knows
  only its own jobs (send, list, bulk GET/DELETE, single GET/DELETE).

Everything is in memory. A job is ``PENDING`` for ``delay`` seconds, then ends with the status
of the longest matching number prefix in ``results`` (``OK`` otherwise), and is pushed to its
``httpStatusPush.targetUrl`` (XML by default, or JSON) with the Basic credentials it named.
Faults are injected through ``state.faults`` (or the ``faults`` option): an HTTP status with
Retry-After, a stall, a dropped connection before or after the job is stored, a malformed body.

Documented (developers.retarus.com and docs.retarus.com, see ``shared/provider-docs/`` and
``shared/research/providers.md``), and so emulated as written: the HA send URL and per data
centre report URLs, where a job is known only in its own data centre; Basic auth; 200/201
with ``{"jobId"}``; the report shape; ``GET /reports`` listing only *completed* jobs, the
oldest 1000; bulk GET/DELETE; the HTTP status push.

Assumed, because the docs are silent, and by default the pessimistic reading:

* Duplicates: 409 "CONFLICT: Duplicate job" is documented, what counts as a duplicate is
  not, so by default nothing is one: every send is a new fax, a resend with the same
  ``customerDefinedId`` too. Option ``duplicates=reference`` answers 409 for a
  ``customerDefinedId`` already seen (a guess, not a promise).
* A 409 has "No Content" (the docs' word for error bodies): ``conflict_body=empty``.
  ``conflict_body=job`` is the optimistic ``{"jobId": ...}`` of the job already there.
* The status codes of a finished job beyond the documented first rows, and the push's JSON
  shape (its XML follows the documented example).

Options (``mailfax emulate retarus --option key=value``): ``customer`` (99999TE), ``username``
(mailfax), ``password`` (secret), ``data_centres`` (DE1,DE2), ``delay`` (1.0 s), ``latency``
(0 s per request), ``results`` (``+4930999=BUSY,+4930998=RING_TO:5``: prefix=STATUS[:delay]),
``push`` (xml|json|off), ``accept_status`` (200 or 201), ``duplicates`` (none|reference),
``conflict_body`` (empty|job), ``faults``
(``send:503:7,send:409,bulk:drop,send:drop_after,list:malformed,bulk:timeout:5``, each used
once).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import itertools
import json
import re
import secrets
import string
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
from aiohttp import web

from mailfax.emulators.http import length_required
from mailfax.emulators.rules import longest_prefix
from mailfax.providers.retarus_codes import MAX_IDS_PER_REQUEST, NAME_PATTERN, push_xml
from mailfax.support.waiting import cancel_all_and_wait
from mailfax.web.server import runner_url, start_web

REASONS = {"OK": "OK", "BUSY": "Destination busy", "RING_TO": "Ring timeout",
           "NOFAX": "No fax device", "WRONG_NO": "Wrong number", "REM_DIS": "Remote hung up"}
DEFAULT_RESULTS = "+4930999=BUSY,+4930998=RING_TO,+4930997=NOFAX,+4930996=WRONG_NO"
PAGE = re.compile(rb"/Type\s*/Page(?![a-zA-Z])")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Fault:
    """One injected failure. ``where``: send, bulk, list, purge, report, delete, reports (any
    report call) or ``*``. ``kind``: http (``status``, ``retry_after``), timeout (handled, but
    answered only after ``seconds``), drop (closed before handling), drop_after (closed after
    handling: the job is stored, the answer lost), malformed (a 200 with a broken body)."""

    where: str
    kind: str = "http"
    status: int = 503
    retry_after: str | None = None
    seconds: float = 30.0
    data_centre: str | None = None  # None: any; "HA" is the send URL
    times: int = 1

    def matches(self, operation: str, data_centre: str) -> bool:
        where_ok = self.where in ("*", operation) or (
            self.where == "reports" and operation != "send")
        return where_ok and self.data_centre in (None, data_centre) and self.times > 0


@dataclass
class Rule:
    prefix: str
    status: str
    delay: float | None = None


@dataclass
class Job:
    job_id: str
    data_centre: str
    number: str
    customer_defined_id: str | None
    documents: list[tuple[str, bytes]]
    request: dict[str, Any]  # the JSON as received, document data left out
    created: float
    delay: float
    final_status: str
    pages: int
    forced: tuple[str, str] | None = None  # (status, reason) set by a test
    deleted: bool = False
    finished_at: datetime | None = None

    def status(self, now: float) -> tuple[str, str]:
        if self.forced is not None:
            return self.forced
        if now - self.created < self.delay:
            return "PENDING", "PENDING"
        return self.final_status, REASONS.get(self.final_status, "simulated")

    def report(self, now: float) -> dict[str, Any]:
        status, reason = self.status(now)
        final = status != "PENDING"
        if final and self.finished_at is None:
            self.finished_at = datetime.now(UTC)
        ok = status == "OK"
        return {
            "jobId": self.job_id,
            "recipientStatus": [{
                "number": self.number, "alternativeNumbers": None, "properties": None,
                "status": status, "reason": reason,
                "sentTs": self.finished_at.strftime("%Y-%m-%dT%H:%M:%SZ")
                if final and self.finished_at else None,
                "durationInSecs": 20 * self.pages + 1 if ok else 0,
                "sentToNumber": "00" + self.number.lstrip("+"),
                "remoteCsid": "+" + self.number.lstrip("+") if ok else "",
            }],
            "pages": self.pages if ok else 0,
            "reference": {"customerDefinedId": self.customer_defined_id, "billingCode": None,
                          "billingInfo": None},
        }


@dataclass
class Push:
    job_id: str
    format: str
    status: int  # 0: no answer


@dataclass
class State:
    """What the emulated region holds; tests read and change it directly."""

    data_centres: list[str]
    delay: float = 1.0
    latency: float = 0.0  # seconds added to every answer
    rules: list[Rule] = field(default_factory=list)
    push_format: str = "xml"
    accept_status: int = 200
    conflict_body: str = "empty"
    duplicates: str = "none"  # or "reference"
    jobs: dict[str, Job] = field(default_factory=dict)
    faults: list[Fault] = field(default_factory=list)
    requests: Counter[tuple[str, str]] = field(default_factory=Counter)  # (dc, operation)
    pushes: list[Push] = field(default_factory=list)
    _turn: itertools.cycle[str] | None = None

    def next_data_centre(self) -> str:
        if self._turn is None:
            self._turn = itertools.cycle(self.data_centres)
        return next(self._turn)

    def requests_to(self, data_centre: str, operation: str | None = None) -> int:
        return sum(count for (dc, op), count in self.requests.items()
                   if dc == data_centre and operation in (None, op))

    def jobs_in(self, data_centre: str) -> list[Job]:
        return [job for job in self.jobs.values() if job.data_centre == data_centre]

    def by_reference(self, customer_defined_id: str) -> Job | None:
        return next((job for job in self.jobs.values()
                     if job.customer_defined_id == customer_defined_id), None)

    def result_for(self, number: str) -> Rule:
        return longest_prefix(number, self.rules, lambda rule: rule.prefix) or Rule("", "OK")

    def add_job(self, number: str, customer_defined_id: str | None = None,
                data_centre: str | None = None, documents: list[tuple[str, bytes]] | None = None,
                request: dict[str, Any] | None = None) -> Job:
        rule = self.result_for(number)
        documents = documents or []
        job = Job(job_id=new_job_id(), data_centre=data_centre or self.next_data_centre(),
                  number=number, customer_defined_id=customer_defined_id,
                  documents=documents, request=request or {}, created=time.monotonic(),
                  delay=self.delay if rule.delay is None else rule.delay,
                  final_status=rule.status,
                  pages=sum(len(PAGE.findall(data)) for _, data in documents) or 1)
        self.jobs[job.job_id] = job
        return job

    def finish(self, job_id: str, status: str, reason: str = "") -> None:
        self.jobs[job_id].forced = (status, reason or REASONS.get(status, status))

    def take_fault(self, operation: str, data_centre: str) -> Fault | None:
        for fault in self.faults:
            if fault.matches(operation, data_centre):
                fault.times -= 1
                return fault
        return None


def new_job_id() -> str:
    alphabet = string.ascii_uppercase + string.digits
    return "FJ" + "".join(secrets.choice(alphabet) for _ in range(20))


def parse_rules(text: str) -> list[Rule]:
    rules = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        prefix, _, result = item.partition("=")
        status, _, delay = result.partition(":")
        rules.append(Rule(prefix.strip(), status.strip().upper(),
                          float(delay) if delay else None))
    return rules


def parse_faults(text: str) -> list[Fault]:
    faults = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        parts = item.split(":")
        where = parts[0]
        kind = parts[1] if len(parts) > 1 else "500"
        arg = parts[2] if len(parts) > 2 else ""
        if kind.isdigit():
            faults.append(Fault(where, "http", status=int(kind), retry_after=arg or None))
        elif kind == "timeout":
            faults.append(Fault(where, "timeout", seconds=float(arg or 30)))
        else:
            faults.append(Fault(where, kind))
    return faults


class RetarusEmulator:
    def __init__(self, state: State, customer: str, username: str, password: str):
        self.state = state
        self.customer = customer
        self.username = username
        self.password = password
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def send_url(self) -> str:
        return f"{self.url}/ha/rest/v1"

    @property
    def data_centre_urls(self) -> dict[str, str]:
        return {dc: f"{self.url}/dc/{dc}/rest/v1" for dc in self.state.data_centres}

    def provider_settings(self) -> dict[str, Any]:
        """Settings for :mod:`mailfax.providers.retarus` pointing at this emulator."""
        return {"customer_number": self.customer, "username": self.username,
                "password": self.password, "send_url": self.send_url,
                "data_centres": self.data_centre_urls}

    # --- serving --------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(middlewares=[length_required, self._middleware],
                              client_max_size=64 * 1024 * 1024)
        app.router.add_post("/ha/rest/v1/{cust}/fax", self._send)
        base = "/dc/{dc}/rest/v1/{cust}/fax"
        app.router.add_post(base, self._send)
        app.router.add_get(base + "/reports", self._list)
        app.router.add_post(base + "/reports", self._bulk)
        app.router.add_delete(base + "/reports", self._purge)
        app.router.add_get(base + "/reports/{job_id}", self._report)
        app.router.add_delete(base + "/reports/{job_id}", self._delete)
        return app

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        data_centre = request.match_info.get("dc", "HA")
        operation = _operation(request)
        self.state.requests[(data_centre, operation)] += 1
        if self.state.latency:
            await asyncio.sleep(self.state.latency)
        if data_centre != "HA" and data_centre not in self.state.data_centres:
            raise web.HTTPNotFound()
        if not self._authorised(request.headers.get("Authorization", "")):
            return web.Response(status=401, headers={"WWW-Authenticate": 'Basic realm="fax"'})
        if request.match_info.get("cust") != self.customer:
            raise web.HTTPNotFound()
        fault = self.state.take_fault(operation, data_centre)
        if fault is None:
            return await handler(request)
        if fault.kind == "http":
            headers = {"Retry-After": fault.retry_after} if fault.retry_after else {}
            return web.Response(status=fault.status, headers=headers)
        if fault.kind == "timeout":  # handled, but the answer comes too late
            response = await handler(request)
            await asyncio.sleep(fault.seconds)
            return response
        if fault.kind == "drop":
            return _drop(request)
        await handler(request)
        if fault.kind == "drop_after":
            return _drop(request)
        return web.Response(status=200, text='{"reports": [', content_type="application/json")

    def _authorised(self, header: str) -> bool:
        scheme, _, encoded = header.partition(" ")
        try:
            user, _, password = base64.b64decode(encoded).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        return scheme.lower() == "basic" and hmac.compare_digest(
            f"{user}:{password}".encode(), f"{self.username}:{self.password}".encode())

    async def _send(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            return _bad("unable to process JSON")
        if not isinstance(body, dict) or not body.get("recipients"):
            return _bad("recipients missing")
        documents: list[tuple[str, bytes]] = []
        for document in body.get("documents") or []:
            name = str(document.get("name", ""))
            if not NAME_PATTERN.match(name):
                return _bad(f"invalid document name {name!r}")
            try:
                documents.append((name, base64.b64decode(document.get("data", ""),
                                                          validate=True)))
            except (binascii.Error, TypeError):
                return _bad(f"invalid base64 in {name}")
        if not documents:
            return _bad("no document data and no cover page")
        problem = _option_problem(body)
        if problem is not None:
            return _bad(problem)
        hold = _hold_seconds(body)
        reference = (body.get("reference") or {}).get("customerDefinedId")
        existing = None
        if reference and self.state.duplicates == "reference":
            existing = self.state.by_reference(reference)
        if existing is not None:
            if self.state.conflict_body == "job":
                return web.json_response({"jobId": existing.job_id}, status=409)
            return web.Response(status=409)
        for document in body.get("documents") or []:
            document.pop("data", None)
        data_centre = request.match_info.get("dc") or self.state.next_data_centre()
        job = self.state.add_job(str(body["recipients"][0].get("number", "")), reference,
                                 data_centre, documents, body)
        job.delay += hold  # transmitted from meta.jobValid.start on
        push = (body.get("statusReportOptions") or {}).get("httpStatusPush")
        if push and push.get("targetUrl") and self.state.push_format != "off":
            task = asyncio.create_task(self._push_when_done(job.job_id))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return web.json_response({"jobId": job.job_id}, status=self.state.accept_status)

    def _known(self, request: web.Request, job_id: str) -> Job | None:
        job = self.state.jobs.get(job_id)
        if job is None or job.deleted or job.data_centre != request.match_info["dc"]:
            return None
        return job

    def _finished(self, request: web.Request) -> list[Job]:
        now = time.monotonic()
        jobs = [job for job in self.state.jobs_in(request.match_info["dc"])
                if not job.deleted and job.status(now)[0] != "PENDING"]
        return jobs[:MAX_IDS_PER_REQUEST]

    async def _list(self, request: web.Request) -> web.Response:
        now = time.monotonic()
        return web.json_response({"reports": [job.report(now)
                                              for job in self._finished(request)]})

    async def _purge(self, request: web.Request) -> web.Response:
        jobs = self._finished(request)
        for job in jobs:
            job.deleted = True
        return web.json_response({"reports": [{"jobId": job.job_id, "deleted": True}
                                              for job in jobs]})

    async def _bulk(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
            action = str(body["action"]).upper()
            job_ids = [str(job_id) for job_id in body["jobIds"]]
        except (ValueError, KeyError, TypeError):
            return _bad("unable to process JSON")
        if len(job_ids) > MAX_IDS_PER_REQUEST or action not in ("GET", "DELETE"):
            return _bad("at most 1000 jobIds; action GET or DELETE")
        now = time.monotonic()
        items: list[dict[str, Any]] = []
        for job_id in job_ids:
            job = self._known(request, job_id)
            if action == "GET":
                items.append(job.report(now) if job else {"jobId": job_id,
                                                          "reason": "NOT_FOUND"})
            elif job is None:
                items.append({"jobId": job_id, "deleted": False, "reason": "NOT_FOUND"})
            else:
                job.deleted = True
                items.append({"jobId": job_id, "deleted": True})
        return web.json_response({"reports": items})

    async def _report(self, request: web.Request) -> web.Response:
        job = self._known(request, request.match_info["job_id"])
        if job is None:
            raise web.HTTPNotFound()
        return web.json_response(job.report(time.monotonic()))

    async def _delete(self, request: web.Request) -> web.Response:
        job = self._known(request, request.match_info["job_id"])
        if job is None:
            return web.json_response({"jobId": request.match_info["job_id"],
                                      "deleted": False, "reason": "NOT_FOUND"}, status=400)
        job.deleted = True
        return web.json_response({"jobId": job.job_id, "deleted": True})

    # --- status push ----------------------------------------------------------------------

    async def _push_when_done(self, job_id: str) -> None:
        job = self.state.jobs[job_id]
        await asyncio.sleep(max(0.0, job.created + job.delay - time.monotonic()))
        if job.status(time.monotonic())[0] == "PENDING":
            return
        for attempt in range(3):  # Retarus' retry policy is not documented; try a few times
            status = await self.push(job_id)
            if 200 <= status < 300:
                return
            await asyncio.sleep(0.5 * (attempt + 1))

    async def push(self, job_id: str, format: str | None = None,
                   credentials: tuple[str, str] | None = None) -> int:
        """Push the job's report now; returns the HTTP status (0: no answer)."""
        job = self.state.jobs[job_id]
        push = job.request["statusReportOptions"]["httpStatusPush"]
        fmt = format or self.state.push_format
        report = job.report(time.monotonic())
        if fmt == "json":
            data, content_type = json.dumps(report).encode(), "application/json"
        else:
            data, content_type = push_xml(report, push["targetUrl"]), "text/xml; charset=UTF-8"
        user, password = credentials or (push.get("principal", ""), push.get("credentials", ""))
        headers = {"Content-Type": content_type}
        if push.get("authMethod") == "HTTP_BASIC" or credentials:
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            headers["Authorization"] = f"Basic {token}"
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        try:
            async with self._session.post(push["targetUrl"], data=data,
                                          headers=headers) as response:
                status = response.status
        except (aiohttp.ClientError, TimeoutError):
            status = 0
        self.state.pushes.append(Push(job_id, fmt, status))
        return status

    async def start(self, host: str, port: int) -> None:
        self._runner = await start_web(self.app(), host, port)
        self.url = runner_url(self._runner)

    async def close(self) -> None:
        await cancel_all_and_wait(self._tasks)
        if self._session is not None:
            await self._session.close()
        if self._runner is not None:
            await self._runner.cleanup()


def _option_problem(body: dict[str, Any]) -> str | None:
    """What the Swagger's ``FaxJobRequest`` refuses in the options: a resolution outside
    HIGH | LOW, ``meta`` without its required ``customerReference``, a ``jobValid.start``
    that is not a date-time with a zone ("start must carry a time zone", docs)."""
    resolution = (body.get("renderingOptions") or {}).get("resolution")
    if resolution is not None and resolution not in ("HIGH", "LOW"):
        return f"invalid renderingOptions.resolution {resolution!r}"
    meta = body.get("meta")
    if meta is None:
        return None
    if not isinstance(meta, dict) or not meta.get("customerReference"):
        return "meta.customerReference missing"
    start = (meta.get("jobValid") or {}).get("start")
    if start is None:
        return None
    try:
        parsed = datetime.fromisoformat(str(start))
    except ValueError:
        return f"invalid meta.jobValid.start {start!r}"
    return f"meta.jobValid.start {start!r} has no time zone" if parsed.tzinfo is None else None


def _hold_seconds(body: dict[str, Any]) -> float:
    """How long until ``meta.jobValid.start`` (0 when absent or past): the job is valid, and
    so sent, only from then on."""
    start = ((body.get("meta") or {}).get("jobValid") or {}).get("start")
    if not start:
        return 0.0
    return max(0.0, datetime.fromisoformat(str(start)).timestamp() - time.time())


def _operation(request: web.Request) -> str:
    if not request.path.endswith(("/reports",)) and "/reports/" not in request.path:
        return "send"
    if "job_id" in request.match_info:
        return "report" if request.method == "GET" else "delete"
    return {"GET": "list", "POST": "bulk", "DELETE": "purge"}.get(request.method, "bulk")


def _drop(request: web.Request) -> web.Response:
    """Close the connection without an answer."""
    if request.transport is not None:
        request.transport.abort()
    raise asyncio.CancelledError()


def _bad(message: str) -> web.Response:
    return web.json_response({"message": f"BAD_REQUEST: {message}"}, status=400)


async def start(host: str, port: int, options: dict[str, str]) -> RetarusEmulator:
    state = State(
        data_centres=[dc.strip() for dc in options.get("data_centres", "DE1,DE2").split(",")
                      if dc.strip()],
        delay=float(options.get("delay", "1.0")),
        rules=parse_rules(options.get("results", DEFAULT_RESULTS)),
        push_format=options.get("push", "xml"),
        accept_status=int(options.get("accept_status", "200")),
        conflict_body=options.get("conflict_body", "empty"),
        duplicates=options.get("duplicates", "none"),
        faults=parse_faults(options.get("faults", "")),
        latency=float(options.get("latency", "0")),
    )
    emulator = RetarusEmulator(state, options.get("customer", "99999TE"),
                               options.get("username", "mailfax"),
                               options.get("password", "secret"))
    await emulator.start(host, port)
    return emulator
