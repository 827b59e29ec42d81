"""An emulator of Faxnummer.de's product-voip webrequests API: real HTTP on loopback.

Documented (``shared/provider-docs/faxnummer-de-api.de.md``), and so emulated as written:
the POST parameters of ``SendFax`` and ``GetSentFaxStatus``, ``WR_Status`` ok/failed with the
six ``WR_Comment`` texts of the table, ``WR_Request_UUID`` ("Im Falle von WR_Status = OK wird
zusätzlich eine WR_Request_UUID ... zurückgegeben"), the ``WR_DataList_X_`` entries and the
statuses NEW, RUNNING, RETRY, DONE-OK, DONE-ERROR with ``StatusQ850Cause``. Jobs go NEW →
RUNNING → DONE-OK (or DONE-ERROR with a Q.850 cause for numbers matching a ``fail`` prefix)
within ``delay`` seconds.

Assumed, because the docs are silent, and by default the pessimistic reading:

* Duplicates: none are detected. ``sFaxFileName`` "hat keine besondere Funktion", so every
  ``SendFax`` is a new fax, a resend too. Option ``duplicates=reference`` invents the
  optimistic opposite: a ``sFaxFileName`` ending in ``[reference]`` already seen is answered
  with the first job's UUID and ``WR_Duplicate=1`` (the real service is not known to do so).
* The body format: not public, so the adapter must parse it tolerantly; ``format`` picks one
  of several (``kv`` by default), and ``ok`` the spelling of ok (the table writes "ok", the
  prose "OK").
* The wording of a ``GetSentFaxStatus`` for an unknown UUID ("Job not found") and of an
  unknown command: ours.
* HTTP errors, slow answers, lost answers: only as faults (below), never by default.

Options (``--option key=value``; all optional):

=================  ==================================================================
login, code        the account's sProductLogin / sProductCode (acc12345 / secret)
format             kv | colon | urlencoded | json | xml (kv)
ok                 the spelling of WR_Status ok (ok); the docs also write "OK"
delay              seconds from NEW to DONE (1.0); RUNNING from half of it
seconds_per_page   ConnectionDuration per page (20)
fail               numbers that fail by prefix and Q.850 cause: +4930999:17,+4930998:19
retry              numbers that pass through RETRY with that cause first: +4930997:17
partial            numbers whose call ends early: DONE-OK (cause 16) with only that many
                   PagesSent: +4930996:1 (the doc's PagesSent "Anzahl Seiten, die gesendet
                   wurden" may be fewer than the PDF's; it does not say DONE-OK excludes that)
duplicates         none | reference (none): see above
http_error         answer the next ``http_error_count`` (1) requests with this status,
retry_after        ... and this Retry-After header, without processing them
slow               seconds to wait before the next ``slow_count`` (1) answers
drop               drop the connection after processing the next N requests
malformed          answer the next N processed requests with a body nobody can parse
send_comment       refuse the next SendFax with WR_Status failed and this WR_Comment
=================  ==================================================================
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, fields
from datetime import datetime, timedelta
from xml.sax.saxutils import escape
from zoneinfo import ZoneInfo

from aiohttp import web

from mailfax.emulators import pdf_pages
from mailfax.emulators.http import length_required
from mailfax.emulators.rules import pages_sent, prefix_value
from mailfax.web.server import runner_url, start_web

PATH = "/webrequests/product-voip/index.php"
FORMATS = ("kv", "colon", "urlencoded", "json", "xml")
PROVIDER_TIMEZONE = ZoneInfo("Europe/Berlin")
MAX_UPLOAD = 64 * 1024 * 1024

_DESTINATION = re.compile(r"^0[0-9]{5,}$")
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+$")
_REFERENCE = re.compile(r"\[([^\[\]]+)\]\s*$")


@dataclass(frozen=True)
class Options:
    login: str = "acc12345"
    code: str = "secret"
    format: str = "kv"
    ok: str = "ok"
    delay: float = 1.0
    seconds_per_page: float = 20.0
    fail: Mapping[str, int] = field(default_factory=dict)  # dial prefix (00...) -> Q.850 cause
    retry: Mapping[str, int] = field(default_factory=dict)
    partial: Mapping[str, int] = field(default_factory=dict)  # dial prefix -> pages sent
    duplicates: str = "none"  # or "reference": invented resend detection


@dataclass
class Faults:
    """Trouble to inject; each counter is used up one request at a time."""

    http_error: int = 503
    http_error_count: int = 0
    retry_after: str = ""
    slow: float = 0.0
    slow_count: int = 0
    drop: int = 0
    malformed: int = 0
    send_comment: str = ""


@dataclass
class ReceivedFax:
    uuid: str
    fields: dict[str, str]  # the form's text fields, sProductCode left out
    pdf: bytes
    filename: str
    content_type: str
    pages: int
    reference: str | None
    received_at: float  # on the state's clock
    created: datetime  # provider local time
    send_calls: int = 1


@dataclass
class EmulatorState:
    options: Options
    faults: Faults = field(default_factory=Faults)
    faxes: list[ReceivedFax] = field(default_factory=list)
    clock: Callable[[], float] = time.monotonic

    def fax(self, uuid: str) -> ReceivedFax | None:
        return next((fax for fax in self.faxes if fax.uuid == uuid), None)


@dataclass(frozen=True)
class Upload:
    filename: str
    content_type: str
    data: bytes


# -- options (pure) ---------------------------------------------------------------------------

def parse_options(options: Mapping[str, str]) -> tuple[Options, Faults]:
    option_names = {f.name for f in fields(Options)}
    fault_names = {f.name for f in fields(Faults)}
    unknown = set(options) - option_names - fault_names
    if unknown:
        known = ", ".join(sorted(option_names | fault_names))
        raise ValueError(f"unknown option(s) {', '.join(sorted(unknown))} (known: {known})")
    if options.get("format", "kv") not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}")
    if options.get("duplicates", "none") not in ("none", "reference"):
        raise ValueError("duplicates must be none or reference")
    parsed = Options(
        login=options.get("login", Options.login), code=options.get("code", Options.code),
        format=options.get("format", "kv"), ok=options.get("ok", "ok"),
        delay=float(options.get("delay", Options.delay)),
        seconds_per_page=float(options.get("seconds_per_page", Options.seconds_per_page)),
        fail=_prefix_causes(options.get("fail", "")),
        retry=_prefix_causes(options.get("retry", "")),
        partial=_prefix_causes(options.get("partial", "")),
        duplicates=options.get("duplicates", "none"))
    faults = Faults(
        http_error=int(options.get("http_error", 503)),
        http_error_count=int(options.get("http_error_count", 1 if "http_error" in options else 0)),
        retry_after=options.get("retry_after", ""),
        slow=float(options.get("slow", 0)),
        slow_count=int(options.get("slow_count", 1 if "slow" in options else 0)),
        drop=int(options.get("drop", 0)), malformed=int(options.get("malformed", 0)),
        send_comment=options.get("send_comment", ""))
    return parsed, faults


def _prefix_causes(text: str) -> dict[str, int]:
    """``+4930999:17,+4930998:19`` → {"004930999": 17, "004930998": 19}."""
    rules: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        prefix, _, cause = item.partition(":")
        prefix = "00" + prefix[1:] if prefix.startswith("+") else prefix
        if not prefix.isdigit() or not cause.isdigit():
            raise ValueError(f"bad rule {item!r}: want +PREFIX:CAUSE")
        rules[prefix] = int(cause)
    return rules


# -- the protocol (pure but for the state it keeps) -------------------------------------------

def handle_call(state: EmulatorState, form: Mapping[str, str], upload: Upload | None
                ) -> dict[str, str]:
    """The answer fields for one POST."""
    options = state.options
    if form.get("sProductLogin") != options.login:
        return _failed("Webrequest is not available for this account")
    if form.get("sProductCode") != options.code:
        return _failed("Productcode invalid")
    command = form.get("sCommand", "")
    if command == "SendFax":
        return _send_fax(state, form, upload)
    if command == "GetSentFaxStatus":
        fax = state.fax(form.get("sJobUUID", ""))
        if fax is None:
            return _failed("Job not found")  # our wording: the docs name no such failure
        return {"WR_Status": options.ok, **status_fields(fax, options, state.clock())}
    return _failed(f"Unknown command {command}")


def _failed(comment: str) -> dict[str, str]:
    return {"WR_Status": "failed", "WR_Comment": comment}


def _send_fax(state: EmulatorState, form: Mapping[str, str], upload: Upload | None
              ) -> dict[str, str]:
    if state.faults.send_comment:
        comment, state.faults.send_comment = state.faults.send_comment, ""
        return _failed(comment)
    destination = form.get("sDestination", "")
    if not _DESTINATION.match(destination):
        return _failed("Destination wrong format")
    if not _EMAIL.match(form.get("sEmail", "")):
        return _failed("Email wrong format")
    pages = _pages(upload) if form.get("mimeType", "application/pdf") == "application/pdf" else 0
    if upload is None or not pages:
        return _failed("Fax wrong format")
    reference = _reference(form.get("sFaxFileName", ""))
    earlier = None
    if state.options.duplicates == "reference" and reference:
        earlier = next((fax for fax in state.faxes if fax.reference == reference), None)
    if earlier is not None:
        earlier.send_calls += 1
        return {"WR_Status": state.options.ok, "WR_Request_UUID": earlier.uuid,
                "WR_Duplicate": "1"}
    uuid = f"faxsend-{state.options.login}-{secrets.token_hex(10)}"
    state.faxes.append(ReceivedFax(
        uuid=uuid, fields={k: v for k, v in form.items() if k != "sProductCode"},
        pdf=upload.data, filename=upload.filename, content_type=upload.content_type,
        pages=pages, reference=reference, received_at=state.clock(),
        created=datetime.now(PROVIDER_TIMEZONE).replace(microsecond=0)))
    return {"WR_Status": state.options.ok, "WR_Request_UUID": uuid}


def _pages(upload: Upload | None) -> int:
    if upload is None or not upload.data.startswith(b"%PDF-"):
        return 0
    return pdf_pages(upload.data) or 0


def _reference(filename: str) -> str | None:
    match = _REFERENCE.search(filename)
    return match.group(1) if match else None


def timeline(fax: ReceivedFax, options: Options) -> list[tuple[float, str]]:
    """(seconds after submission, Status) of each step the job goes through."""
    delay = options.delay
    done = "DONE-ERROR" if prefix_value(fax.fields["sDestination"], options.fail) else "DONE-OK"
    steps = [(0.0, "NEW"), (delay / 2, "RUNNING"), (delay, done)]
    if prefix_value(fax.fields["sDestination"], options.retry) is not None:
        steps.insert(1, (delay / 4, "RETRY"))
    return steps


def status_fields(fax: ReceivedFax, options: Options, now: float) -> dict[str, str]:
    """The ``WR_DataList`` answer for ``fax`` at ``now`` (one recipient per job)."""
    elapsed = now - fax.received_at
    since, status = [step for step in timeline(fax, options) if step[0] <= elapsed][-1]
    destination = fax.fields["sDestination"]
    entry = {
        "JobUUID": fax.uuid,
        "CreateDateTime": _timestamp(fax.created),
        "LastChangeDateTime": _timestamp(fax.created + timedelta(seconds=since)),
        "DestinationNumber": destination,
        "FromNumber": fax.fields.get("sSource") or "004930000000",
        "FaxFileName": fax.fields.get("sFaxFileName", ""),
        "Status": status,
        "RemoteTSI": "EMULATOR" if status == "DONE-OK" else "",
    }
    if status == "RETRY":
        entry["SendTriesRemaining"] = "4"
        entry["StatusQ850Cause"] = str(prefix_value(destination, options.retry))
    if status.startswith("DONE"):
        ok = status == "DONE-OK"
        entry["StatusQ850Cause"] = "16" if ok else str(prefix_value(destination, options.fail))
        pages = pages_sent(destination, options.partial, fax.pages) if ok else 0
        entry["ConnectionDuration"] = str(round(pages * options.seconds_per_page + 1)
                                          if ok else 0)
        entry["PagesSent"] = str(pages)
    return {"WR_DataList_ObjectCount": "1",
            **{f"WR_DataList_1_{key}": value for key, value in entry.items()}}


def _timestamp(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def render(answer: Mapping[str, str], format: str) -> tuple[bytes, str]:
    """The body and content type of an answer in one of :data:`FORMATS`."""
    if format == "json":
        return json.dumps(dict(answer)).encode(), "application/json"
    if format == "xml":
        items = "".join(f"<{key}>{escape(value)}</{key}>" for key, value in answer.items())
        xml = f'<?xml version="1.0" encoding="UTF-8"?>\n<Response>{items}</Response>\n'
        return xml.encode(), "application/xml"
    if format == "urlencoded":
        return urllib.parse.urlencode(answer).encode(), "application/x-www-form-urlencoded"
    separator = ": " if format == "colon" else "="
    text = "".join(f"{key}{separator}{value}\n" for key, value in answer.items())
    return text.encode(), "text/plain"


# -- the HTTP server --------------------------------------------------------------------------

class FaxnummerEmulator:
    def __init__(self, runner: web.AppRunner, url: str, state: EmulatorState):
        self.runner = runner
        self.url = url
        self.state = state

    async def close(self) -> None:
        await self.runner.cleanup()


async def _read_form(request: web.Request) -> tuple[dict[str, str], Upload | None]:
    form = await request.post()
    text = {key: value for key, value in form.items() if isinstance(value, str)}
    upload = form.get("sFax")
    if isinstance(upload, web.FileField):
        return text, Upload(upload.filename, upload.content_type, upload.file.read())
    return text, None


def _handler(state: EmulatorState
             ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handle(request: web.Request) -> web.StreamResponse:
        form, upload = await _read_form(request)
        faults = state.faults
        if faults.http_error_count > 0:
            faults.http_error_count -= 1
            headers = {"Retry-After": faults.retry_after} if faults.retry_after else {}
            return web.Response(status=faults.http_error, headers=headers, text="unavailable")
        answer = handle_call(state, form, upload)
        if faults.slow_count > 0:
            faults.slow_count -= 1
            await asyncio.sleep(faults.slow)
        if faults.drop > 0:
            faults.drop -= 1
            if request.transport is not None:
                request.transport.abort()
            raise asyncio.CancelledError  # nothing is written to the dropped connection
        if faults.malformed > 0:
            faults.malformed -= 1
            return web.Response(text="<html><body><b>Fatal error</b>: ", content_type="text/html")
        body, content_type = render(answer, state.options.format)
        return web.Response(body=body, content_type=content_type, charset="utf-8")

    return handle


async def start(host: str, port: int, options: dict[str, str]) -> FaxnummerEmulator:
    parsed, faults = parse_options(options)
    state = EmulatorState(options=parsed, faults=faults)
    app = web.Application(middlewares=[length_required], client_max_size=MAX_UPLOAD)
    handle = _handler(state)
    app.router.add_post(PATH, handle)
    app.router.add_post(PATH.removesuffix("index.php"), handle)
    runner = await start_web(app, host, port)
    return FaxnummerEmulator(runner, f"{runner_url(runner)}{PATH}", state)
