"""Retarus Faxolution for Applications (Fax4A) REST API v1 over HTTP.

Retarus runs each region as two clustered data centres: a job is sent through the region's
high-availability (HA) URL, lands in one of them, and can only be polled or deleted there.
So sends go to ``send_url`` and every report operation goes to each of ``data_centres``,
where "not found" is normal. Status comes by bulk polling (≤1000 ids a request) and, when
mailfax's web endpoint is configured, by Retarus' HTTP status push to
``{push_base_url}/job/{job_id}`` with HTTP Basic credentials of that job's own. The reports
API documentation does not describe the push (nor how Retarus would authenticate itself), so
a push is not taken as the job's outcome: it only makes the tracker poll the job now.

What a resend means, from the docs: the send answers 409 "CONFLICT: Duplicate job", with
"No Content", and nothing says what counts as a duplicate (not that ``customerDefinedId`` is
a key). So the adapter declares :attr:`ResendHandling.NOT_RECOGNISED`: a send whose answer
was lost (or unreadable, or a 504/520 that may come after the job was taken) is not resent
but goes ``unconfirmed``, looked for by its ``customerDefinedId`` (our job id) among the
reports (``GET /reports`` lists only completed jobs, so not finding it there says nothing)
and through the status push to ``/job/{job_id}``. A 409 is Retarus refusing the job as a
duplicate of one it has: reported as that (``duplicate_refused``), never taken as "sent".
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import hmac
import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import httpx
from aiohttp import web

from mailfax import reasons
from mailfax.providers import retarus_codes as codes
from mailfax.providers.account_settings import RetarusSettings
from mailfax.providers.base import (
    AccountCheck,
    BaseProvider,
    ProviderContext,
    ProviderError,
    ProviderRef,
    ResendHandling,
    SendReceipt,
    SendRequest,
    SendResult,
    StatusReport,
)
from mailfax.providers.http import http_detail, request_may_have_arrived
from mailfax.providers.upload import DocumentBody, Upload

log = logging.getLogger(__name__)

Settings = RetarusSettings  # the module's account settings (see mailfax.providers)

PUSH_USER = "mailfax"
# A job whose Retarus id could not be learnt yet: polled by reference until found.
BY_REFERENCE = "ref:"
# Send answers that may come after the job was taken: a timeout behind the front end, and
# 520 "UNKNOWN_ERROR ... most likely with the backend adaptor". 500 "Cannot accept job",
# 429, 502 and 503 say it was not taken.
MAYBE_TAKEN = frozenset({504, 520})
# The per-mail option ``resolution`` as ``renderingOptions.resolution`` (Swagger: HIGH | LOW).
RESOLUTIONS = {"fine": "HIGH", "standard": "LOW"}


def send_body(request: SendRequest, documents: Sequence[tuple[str, str]], settings: Settings,
              push: Mapping[str, str] | None) -> dict[str, Any]:
    """The ``FaxJobRequest`` for one job; ``documents`` are (name, base64 data)."""
    transport: dict[str, Any] = {"isExpress": settings.express,
                                 "isBlacklistEnabled": settings.blacklist_check}
    csid = request.station_id or settings.station_id
    if csid:
        transport["csid"] = csid[:20]
    rendering: dict[str, Any] = {"paperFormat": settings.paper_format,
                                 "resolution": RESOLUTIONS.get(request.resolution or "",
                                                               settings.resolution)}
    if request.header:
        rendering["header"] = request.header
    body: dict[str, Any] = {
        "reference": {"customerDefinedId": request.job_id},
        "recipients": [{"number": request.number}],
        "documents": [{"name": name, "data": data} for name, data in documents],
        "transportOptions": transport,
        "renderingOptions": rendering,
    }
    if push:
        body["statusReportOptions"] = {"httpStatusPush": dict(push)}
    if request.send_at is not None:
        body["meta"] = {"customerReference": request.job_id,
                        "jobValid": {"start": request.send_at.isoformat()}}
    return body


class RetarusProvider(BaseProvider):
    provider_name = "retarus"
    resend_handling = ResendHandling.NOT_RECOGNISED  # 409's meaning is not documented

    def __init__(self, context: ProviderContext, settings: Settings,
                 transport: httpx.AsyncBaseTransport | None = None):
        super().__init__(context)
        self.settings = settings
        limits = httpx.Limits(max_connections=settings.max_connections,
                              max_keepalive_connections=settings.max_connections)
        self.client = httpx.AsyncClient(
            auth=httpx.BasicAuth(settings.username, settings.password.get_secret_value()),
            timeout=httpx.Timeout(settings.timeout_seconds,
                                  connect=settings.connect_timeout_seconds),
            transport=transport or httpx.AsyncHTTPTransport(
                retries=settings.connect_retries, limits=limits),
            headers={"Accept": "application/json", "User-Agent": "mailfax"},
        )
        self._send_slots = asyncio.Semaphore(settings.send_concurrency)
        # Retarus job id -> the data centre that knows it, so later calls ask only that one.
        self._home: dict[str, str] = {}
        # our job id -> Retarus job id, for duplicates first known by reference only
        self._resolved: dict[str, str] = {}

    def unconfirmed_ref(self, job_id: str) -> str | None:
        """Looked for by customerDefinedId among the reports, and found by its push."""
        return BY_REFERENCE + job_id

    def __repr__(self) -> str:
        return f"<RetarusProvider {self.account} customer {self.settings.customer_number}>"

    # --- HTTP -----------------------------------------------------------------------------

    def _reports_url(self, data_centre: str) -> str:
        base = self.settings.data_centres[data_centre]
        return f"{base}/{self.settings.customer_number}/fax/reports"

    async def _call(self, method: str, url: str, operation: str, payload: Any = None,
                    content: DocumentBody | None = None) -> httpx.Response:
        """One request with ``payload`` as JSON, or ``content`` (JSON carrying documents)."""
        headers = {"Content-Type": "application/json", **content.headers} if content else None
        try:
            return await self.client.request(method, url, json=payload, content=content,
                                             headers=headers)
        except httpx.HTTPError as error:  # connect errors were already retried by the transport
            raise ProviderError(reasons.reason(
                "provider_unavailable", f"Retarus {operation}: {type(error).__name__}"),
                transient=True, maybe_sent=operation == "send" and request_may_have_arrived(
                    error)) from None

    @staticmethod
    def _json(response: httpx.Response, operation: str) -> Any:
        try:
            return response.json()
        except ValueError:
            raise ProviderError(reasons.reason(
                "provider_error", f"Retarus {operation}: unreadable answer"),
                transient=True, maybe_sent=operation == "send") from None

    @staticmethod
    def _error(response: httpx.Response, operation: str) -> ProviderError:
        return codes.http_error(response.status_code, response.text,
                                response.headers.get("Retry-After"), operation)

    # --- sending --------------------------------------------------------------------------

    async def send_many(self, requests: Sequence[SendRequest]) -> list[SendResult]:
        async def one(request: SendRequest) -> SendResult:
            async with self._send_slots:
                try:
                    return await self._send(request)
                except ProviderError as error:
                    return error

        return list(await asyncio.gather(*(one(request) for request in requests)))

    async def send(self, request: SendRequest) -> SendReceipt:
        return await self._send(request)

    async def _send(self, request: SendRequest) -> SendReceipt:
        """One ``FaxJobRequest``, its documents' base64 made as the body goes out (see
        providers.upload), not held in memory."""
        names = codes.document_names([document.filename for document in request.documents])
        upload = Upload()
        documents = [(name, upload.base64_text(document.data))
                     for name, document in zip(names, request.documents, strict=True)]
        body = send_body(request, documents, self.settings, self._push_options(request.job_id))
        url = f"{self.settings.send_url}/{self.settings.customer_number}/fax"
        response = await self._call("POST", url, "send",
                                    content=upload.body(json.dumps(body).encode("utf-8")))
        if response.status_code in (200, 201):
            answer = self._json(response, "send")
            job_id = answer.get("jobId") if isinstance(answer, dict) else None
            if not isinstance(job_id, str) or not job_id:
                raise ProviderError(reasons.reason(
                    "provider_error", "Retarus send: answer without a jobId"), transient=True,
                    maybe_sent=True)
            return SendReceipt(job_id=request.job_id, provider_job_id=job_id,
                               pages=request.pages)
        if response.status_code == 409:  # CONFLICT "Duplicate job"
            return self._conflict(request, response)
        error = self._error(response, "send")
        if response.status_code in MAYBE_TAKEN:
            raise ProviderError(error.reason, transient=error.transient,
                                retry_after=error.retry_after, maybe_sent=True)
        raise error

    def _push_options(self, job_id: str) -> dict[str, str] | None:
        base = self.context.push_base_url
        if not (self.settings.status_push and base):
            return None
        return {"targetUrl": f"{base}/job/{job_id}", "authMethod": "HTTP_BASIC",
                "principal": PUSH_USER, "credentials": self.push_token(job_id)}

    def _conflict(self, request: SendRequest, response: httpx.Response) -> SendReceipt:
        """409 "Duplicate job": Retarus refuses the job as a duplicate of one it has. Only
        after a lost answer of ours, and only when the answer names that job (not
        documented: the docs say "No Content"), is it ours."""
        try:
            answer = response.json()
        except ValueError:
            answer = None
        job_id = answer.get("jobId") if isinstance(answer, dict) else None
        if request.earlier_may_have_arrived and isinstance(job_id, str) and job_id:
            return SendReceipt(job_id=request.job_id, provider_job_id=job_id,
                               pages=request.pages, duplicate=True)
        log.warning("Retarus refused job %s as a duplicate (409)", request.job_id)
        raise ProviderError(reasons.reason("duplicate_refused", http_detail(
            "Retarus send", 409, "CONFLICT: Duplicate job")), transient=False)

    async def _find_by_reference(self, job_ids: Sequence[str]
                                 ) -> dict[str, tuple[str, dict[str, Any]]]:
        """Our job id -> (data centre, report) among each data centre's listed reports."""
        wanted = set(job_ids)
        lists = await asyncio.gather(*(self._list(dc) for dc in self.settings.data_centres),
                                     return_exceptions=True)
        found: dict[str, tuple[str, dict[str, Any]]] = {}
        for data_centre, listed in zip(self.settings.data_centres, lists, strict=True):
            if isinstance(listed, BaseException):
                log.warning("Retarus %s: listing reports failed: %s", data_centre, listed)
                continue
            for report in listed:
                reference = codes.customer_defined_id(report)
                if reference in wanted:
                    found[reference] = (data_centre, report)
        return found

    async def _list(self, data_centre: str) -> list[dict[str, Any]]:
        response = await self._call("GET", self._reports_url(data_centre), "list reports")
        if response.status_code == 404:
            return []
        if response.status_code != 200:
            raise self._error(response, f"list reports at {data_centre}")
        return codes.reports_in(self._json(response, "list reports"))

    # --- the account ----------------------------------------------------------------------

    async def check_account(self) -> AccountCheck:
        """``GET /{custNr}/fax/reports`` at each data centre: 401/403 refuse the credentials;
        200 lists the finished jobs' reports. A 404 from one data centre can be normal (the
        report poll takes it as "nothing here"); from all of them it means the customer
        number is unknown."""
        facts = [("send URL", f"{self.settings.send_url}/{self.settings.customer_number}/fax"),
                 ("customer", self.settings.customer_number),
                 ("user", self.settings.username)]
        not_found: ProviderError | None = None
        accepted = 0
        for data_centre in self.settings.data_centres:
            url = self._reports_url(data_centre)
            try:
                response = await self._call("GET", url, f"list reports at {data_centre}")
            except ProviderError as error:
                error.facts = facts
                raise
            if response.status_code == 404:
                not_found = self._error(response, f"list reports at {data_centre}")
                facts.append((f"reports {data_centre}", f"{url}: HTTP 404"))
                continue
            if response.status_code != 200:
                refused = self._error(response, f"list reports at {data_centre}")
                refused.facts = facts
                raise refused
            reports = codes.reports_in(self._json(response, "list reports"))
            accepted += 1
            facts.append((f"reports {data_centre}", f"{url}: login accepted, "
                                                   f"{len(reports)} finished job reports"))
        if not accepted and not_found is not None:
            not_found.facts = facts
            raise not_found
        return AccountCheck(facts=facts)

    # --- status ---------------------------------------------------------------------------

    async def status(self, refs: Sequence[ProviderRef]) -> dict[str, StatusReport]:
        ours: dict[str, str] = {}  # Retarus job id -> our job id
        by_reference: list[str] = []
        for ref in refs:
            provider_job_id = self._resolved.get(ref.job_id, ref.provider_job_id)
            if provider_job_id.startswith(BY_REFERENCE) or not provider_job_id:
                by_reference.append(ref.job_id)
            else:
                ours[provider_job_id] = ref.job_id
        found = await self._bulk("GET", list(ours))
        learnt: set[str] = set()  # our job ids first known by reference now
        if by_reference:
            for job_id, (data_centre, report) in (
                    await self._find_by_reference(by_reference)).items():
                self._resolved[job_id] = report["jobId"]
                ours[report["jobId"]] = job_id
                found.append((data_centre, report))
                learnt.add(job_id)
        best: dict[str, dict[str, Any]] = {}
        for data_centre, report in found:
            owner = ours.get(report["jobId"])
            if owner is None or not codes.has_status(report):
                continue
            reference = codes.customer_defined_id(report)
            if reference not in (None, owner):
                log.warning("Retarus job %s belongs to %s, not %s", report["jobId"], reference,
                            owner)
                continue
            self._home[report["jobId"]] = data_centre
            if owner not in best or not codes.is_final(best[owner]):
                best[owner] = report
        return {job_id: dataclasses.replace(codes.status_report(report),
                                            provider_job_id=report["jobId"])
                if job_id in learnt else codes.status_report(report)
                for job_id, report in best.items()}

    async def _bulk(self, action: Literal["GET", "DELETE"], provider_job_ids: Sequence[str]
                    ) -> list[tuple[str, dict[str, Any]]]:
        """Bulk GET or DELETE by Retarus job id, asking a job's home data centre when known
        and every data centre otherwise; (data centre, item) for each item answered."""
        plan: dict[str, list[str]] = {dc: [] for dc in self.settings.data_centres}
        for provider_job_id in provider_job_ids:
            home = self._home.get(provider_job_id)
            for data_centre in [home] if home in plan else plan:
                plan[data_centre].append(provider_job_id)
        calls = [(dc, chunk) for dc, ids in plan.items() for chunk in codes.chunked(ids)]
        answers = await asyncio.gather(*(self._bulk_call(action, dc, chunk)
                                         for dc, chunk in calls), return_exceptions=True)
        items: list[tuple[str, dict[str, Any]]] = []
        errors: list[ProviderError] = []
        for (data_centre, chunk), answer in zip(calls, answers, strict=True):
            if isinstance(answer, ProviderError):
                errors.append(answer)
                for provider_job_id in chunk:  # ask everywhere next time
                    self._home.pop(provider_job_id, None)
                continue
            if isinstance(answer, BaseException):
                raise answer
            items += [(data_centre, item) for item in answer]
        if errors and (action == "DELETE" or len(errors) == len(calls)):
            raise errors[0]  # a partial answer still tells the jobs it found
        for error in errors:
            log.warning("Retarus %s: %s", action, error)
        return items

    async def _bulk_call(self, action: str, data_centre: str, ids: Sequence[str]
                         ) -> list[dict[str, Any]]:
        operation = f"{action} reports at {data_centre}"
        response = await self._call("POST", self._reports_url(data_centre), operation,
                                    {"action": action, "jobIds": list(ids)})
        if response.status_code == 404:  # none of them is known here
            return []
        if response.status_code not in (200, 201):
            raise self._error(response, operation)
        return codes.reports_in(self._json(response, operation))

    async def acknowledge(self, refs: Sequence[ProviderRef]) -> None:
        ids = []
        for ref in refs:
            provider_job_id = self._resolved.pop(ref.job_id, ref.provider_job_id)
            if provider_job_id and not provider_job_id.startswith(BY_REFERENCE):
                ids.append(provider_job_id)
        if self.settings.delete_reports and ids:
            await self._bulk("DELETE", ids)
        for provider_job_id in ids:
            self._home.pop(provider_job_id, None)

    # --- status push ----------------------------------------------------------------------

    async def handle_push(self, request: web.Request, subpath: str) -> web.StreamResponse:
        """A status push for one job: with that job's credentials (bound to Retarus, this
        account and the job), for a job of this account, holding a report of that job.

        The pushed report is not trusted as the outcome (the credentials are mailfax's own,
        handed out with the job; nothing documented proves the caller is Retarus): the
        tracker polls the job at once and records what the data centres say.
        """
        kind, _, job_id = subpath.strip("/").partition("/")
        if kind != "job" or not job_id or "/" in job_id:
            raise web.HTTPNotFound()
        if request.method != "POST":
            raise web.HTTPMethodNotAllowed(request.method, ["POST"])
        password = _basic_password(request.headers.get("Authorization", ""))
        if password is None or await self.pushed_job(job_id, password) is None:
            log.info("Retarus status push for job %s refused: wrong credentials or not a job "
                     "of account %s", job_id, self.account)
            return web.Response(status=401, text="unauthorised\n",
                                headers={"WWW-Authenticate": 'Basic realm="mailfax"'})
        body = await request.read()
        try:
            items = codes.parse_push(body, request.content_type)
        except codes.PushFormatError as error:
            log.warning("Retarus push for job %s refused: %s", job_id, error)
            return web.Response(status=400, text="unreadable status push\n")
        mine = [item for item in items if codes.customer_defined_id(item) in (None, job_id)]
        if len(mine) != 1:
            return web.Response(status=400, text="not a report of this job\n")
        if self.context.wake_tracker is not None:
            await self.context.wake_tracker([job_id])
        return web.Response(text="OK\n")

    async def close(self) -> None:
        await self.client.aclose()



def _basic_password(header: str) -> str | None:
    """The password of HTTP Basic credentials for :data:`PUSH_USER`, else None."""
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, _, password = base64.b64decode(encoded, validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return password if hmac.compare_digest(user.encode(), PUSH_USER.encode()) else None


def create(context: ProviderContext, settings: Settings,
           transport: httpx.AsyncBaseTransport | None = None) -> RetarusProvider:
    return RetarusProvider(context, settings, transport)
