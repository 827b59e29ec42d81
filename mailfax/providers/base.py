"""The one small interface every fax provider adapter implements.

An adapter turns mailfax's requests into the provider's wire protocol and the provider's
answers into the normalised :class:`~mailfax.model.JobState` and :class:`~mailfax.model.Reason`.
All of a provider's quirks (field names, result codes, limits) stay inside its module.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import hmac
import ipaddress
import secrets
import urllib.parse
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from mailfax.documents.mapped import DocumentBytes
from mailfax.model import JobState, Reason

if TYPE_CHECKING:
    from aiohttp import web

    from mailfax.store.base import Job


@dataclass(frozen=True)
class FaxDocument:
    """A fax-ready document: a PDF (already validated, page-counted)."""

    filename: str
    data: DocumentBytes  # from a large mail's intake, in its file (documents.mapped)
    pages: int
    content_type: str = "application/pdf"


@dataclass(frozen=True)
class SendRequest:
    job_id: str  # our id; sent to the provider as the reference for duplicate protection
    number: str  # E.164, e.g. "+4930123456"
    documents: Sequence[FaxDocument]
    pages: int
    subject: str = ""
    sender: str = ""  # the envelope sender, for providers that want a status address
    station_id: str | None = None
    header: str | None = None
    cover_text: str | None = None
    send_at: datetime | None = None  # UTC; None = now
    resolution: str | None = None  # "standard" or "fine"; None: the account's default
    attempt: int = 1  # > 1: this job was tried before
    # An earlier attempt may have reached the provider (its answer was lost): only then does a
    # provider's duplicate refusal (FAX.de -77) mean "you already sent this".
    earlier_may_have_arrived: bool = False


@dataclass(frozen=True)
class SendReceipt:
    """The provider accepted the job."""

    job_id: str
    provider_job_id: str
    pages: int | None = None
    duplicate: bool = False  # the provider already had this job (an earlier lost answer)
    # False: the provider has the job but we do not know it under ``provider_job_id`` yet (a
    # placeholder to look for it under, or "" when it cannot be looked for): unconfirmed.
    confirmed: bool = True


class ErrorKind(enum.StrEnum):
    """What an error says about what to do next.

    ``TRANSIENT``: this call may pass later (an outage, an overload): retry the job.
    ``PERMANENT``: this job cannot pass (a bad number, a document refused): fail it.
    ``ACCOUNT``: no job of this account can pass until someone fixes the account (login
    refused, no credit, contract or configuration): hold the account's jobs, tell the admin.
    """

    TRANSIENT = "transient"
    PERMANENT = "permanent"
    ACCOUNT = "account"


# Reasons that are about the account rather than the job, unless an adapter says otherwise.
ACCOUNT_REASONS = frozenset({"provider_auth", "provider_account"})


class ProviderError(Exception):
    """A provider refused or failed a call. ``transient`` decides retry or fail; ``kind``
    (default: from ``transient`` and the reason) also tells account-wide refusals apart."""

    def __init__(self, reason: Reason, *, transient: bool, retry_after: float | None = None,
                 kind: ErrorKind | None = None, maybe_sent: bool = False):
        super().__init__(reason.code)
        self.reason = reason
        self.transient = transient
        self.retry_after = retry_after
        self.kind = kind or default_kind(reason, transient)
        # What a check_account learnt before it met this error, to print it all the same.
        self.facts: list[tuple[str, str]] = []
        # The request may have reached the provider and been acted on (a lost or unreadable
        # answer, a timeout after the upload began): whether a resend is safe is then the
        # provider's :attr:`BaseProvider.resend_handling`, not ours to guess.
        self.maybe_sent = maybe_sent

    def __str__(self) -> str:
        kind = "transient" if self.transient else "permanent"
        if self.kind == ErrorKind.ACCOUNT:
            kind = "account"
        return f"{kind} provider error {self.reason.code}: {self.reason.for_language('en')}"


def default_kind(reason: Reason, transient: bool) -> ErrorKind:
    if reason.code in ACCOUNT_REASONS:
        return ErrorKind.ACCOUNT
    return ErrorKind.TRANSIENT if transient else ErrorKind.PERMANENT


def is_loopback_url(url: str) -> bool:
    """Whether ``url``'s host is this machine (127.0.0.0/8, ::1, localhost)."""
    host = (urllib.parse.urlsplit(url).hostname or "").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def plain_http_problem(url: str, allowed: bool) -> str | None:
    """Why credentials must not go to ``url``, or None: ``http://`` to another machine
    carries passwords in clear, unless the account says ``allow_plain_http = true``."""
    if not url.lower().startswith("http://") or allowed or is_loopback_url(url):
        return None
    return (f"{url} is plain http: the password would travel in clear (use https://, or "
            "set allow_plain_http = true on the account)")


@dataclass(frozen=True)
class AccountCheck:
    """What a harmless authenticated call (``check_account``) learnt about an account."""

    facts: list[tuple[str, str]]  # (label, value), in the order to print them
    warnings: list[str] = field(default_factory=list)


SendResult = SendReceipt | ProviderError


@dataclass(frozen=True)
class ProviderRef:
    """A job as a provider knows it."""

    job_id: str
    provider_job_id: str
    since: datetime | None = None  # when the job entered its current state (UTC)


@dataclass(frozen=True)
class StatusReport:
    """What the provider says of one job, normalised."""

    state: JobState
    pages: int | None = None
    duration_seconds: float | None = None
    remote_id: str | None = None
    reason: Reason | None = None
    finished_at: datetime | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    # The provider's id of the job, when this report is how we learn it (a job whose send
    # answer was lost, found by reference or through a push).
    provider_job_id: str | None = None


@dataclass(frozen=True)
class InboundFax:
    fax_id: str
    called_number: str
    received_at: datetime  # UTC
    originator: str
    remote_id: str
    pages: int
    image: bytes  # TIFF as the provider delivered it


@dataclass(frozen=True)
class EmulatedTransmission:
    """One fax the bundled emulator's network has taken (see :class:`EmulatorNetwork`)."""

    provider_job_id: str
    reference: str  # our job id
    number: str
    pages: int
    submitted_at: float  # Unix time of the first send
    send_calls: int  # how often it was sent: more than 1 is a recognised resend
    cancelled: bool = False


def new_emulator_job_id() -> str:
    """The id the emulator's network gives a fax, like a provider's job number."""
    return "EMU-" + secrets.token_hex(8)


class EmulatorNetwork(Protocol):
    """Where the bundled emulator keeps what it "transmitted", so that every mailfax instance
    that shares it sees one fax network: the store (a table in SQLite or PostgreSQL)."""

    async def emulator_submit(self, account: str, reference: str, number: str,
                              pages: int) -> tuple[str, bool]:
        """Record a fax; (provider job id, whether this reference was sent before)."""
        ...

    async def emulator_transmissions(self, account: str, provider_job_ids: Sequence[str]
                                     ) -> dict[str, EmulatedTransmission]: ...

    async def emulator_cancel(self, account: str, provider_job_id: str) -> None: ...


@dataclass
class ProviderContext:
    """What the application lends an adapter."""

    account: str
    data_dir: Path
    # Base URL (no trailing slash) under which mailfax's web endpoint receives pushes for this
    # account, e.g. "http://127.0.0.1:8025/push/main"; None when no web endpoint is configured.
    push_base_url: str | None = None
    # Secret for push tokens: hmac(secret_key, provider|account|job id), see push_token().
    secret_key: bytes = b""
    # Ask the status tracker to poll these jobs (our job ids) now, e.g. after a push.
    wake_tracker: Callable[[Sequence[str]], Awaitable[None]] | None = None
    # Store reports at once (our job id -> report); returns after they are durable. Only for
    # pushes the provider itself authenticates (none of the current adapters' are: their
    # pushes only wake the tracker).
    report_status: Callable[[dict[str, StatusReport]], Awaitable[None]] | None = None
    # The bundled emulator's network: the store. None: a ledger file in data_dir (one network
    # per folder, for a provider made without a store, as in benchmarks).
    emulator_network: EmulatorNetwork | None = None
    # A job from the store (None if there is none), for a push handler to check whose it is.
    get_job: Callable[[str], Awaitable[Job | None]] | None = None
    # ``allow_plain_http = true`` on the account: credentials may go to http:// URLs.
    allow_plain_http: bool = False

    def push_token(self, provider: str, job_id: str) -> str:
        """An unguessable token for pushes about one job of this provider and account: a
        token handed to one provider (or leaked from its logs) is worth nothing for another
        provider's endpoint, another account or another job."""
        message = "|".join((provider, self.account, job_id)).encode("utf-8", "surrogateescape")
        return hmac.new(self.secret_key, message, hashlib.sha256).hexdigest()[:32]

    def push_token_valid(self, provider: str, job_id: str, token: str) -> bool:
        """Whether ``token`` is :meth:`push_token` of this job (compared in constant time;
        any text, also non-ASCII, is just not it)."""
        if not self.secret_key:  # no secret: no token is valid
            return False
        wanted = self.push_token(provider, job_id).encode("ascii")
        return hmac.compare_digest(token.encode("utf-8", "surrogateescape"), wanted)


class ResendHandling(enum.StrEnum):
    """What a provider documents about a second send of the same job.

    The dispatcher decides from this whether a send whose answer was lost may be repeated.
    Each adapter declares what its provider's docs say, never what an emulator does.
    """

    # A resend is answered with the job already there: resending is safe.
    RECOGNISED = "recognised"
    # A resend is refused as a duplicate (documented), perhaps without saying the job's id:
    # resending is safe, but the refusal may leave the job to be found another way.
    REFUSED = "refused"
    # Nothing documented: a resend may be faxed again. Never resent automatically.
    NOT_RECOGNISED = "not_recognised"


def resend_handling(provider: object) -> ResendHandling:
    """The provider's declaration; the pessimistic one for providers that make none."""
    declared = getattr(provider, "resend_handling", ResendHandling.NOT_RECOGNISED)
    return ResendHandling(declared)


def unconfirmed_ref(provider: object, job_id: str) -> str | None:
    """A provider job id under which the provider's ``status`` can look for a job whose send
    answer was lost, or None when the provider offers no way to find it."""
    find = getattr(provider, "unconfirmed_ref", None)
    found = find(job_id) if callable(find) else None
    return found if isinstance(found, str) else None


class Provider(Protocol):
    """The async interface the dispatcher, tracker and inbound poller use."""

    account: str
    provider_name: str
    supports_inbound: bool

    async def send_many(self, requests: Sequence[SendRequest]) -> list[SendResult]:
        """Send jobs that share documents (one mail, several recipients).

        Returns one result per request, in order. Adapters without a bulk call send each.
        """
        ...

    async def status(self, refs: Sequence[ProviderRef]) -> dict[str, StatusReport]:
        """Status of in-flight jobs, keyed by our job id; jobs with no news may be left out."""
        ...

    async def cancel(self, ref: ProviderRef) -> bool:
        """Cancel a job. True if cancelled, False if it was too late."""
        ...

    async def acknowledge(self, refs: Sequence[ProviderRef]) -> None:
        """The final status of these jobs was handed off; the provider may forget them."""
        ...

    async def fetch_inbound(self) -> InboundFax | None:
        """The next received fax, or None when the inbox is empty."""
        ...

    async def delete_inbound(self, fax_id: str) -> None:
        """Delete a received fax at the provider (only after it was handed off)."""
        ...

    async def check_account(self) -> AccountCheck:
        """One harmless authenticated call (see :meth:`BaseProvider.check_account`)."""
        ...

    def warnings(self) -> list[str]: ...

    async def close(self) -> None: ...


class BaseProvider:
    """Defaults for the optional parts of :class:`Provider`."""

    account: str
    provider_name: str = "base"
    supports_inbound: bool = False
    # Pessimistic unless the adapter's provider documents better (see ResendHandling).
    resend_handling: ResendHandling = ResendHandling.NOT_RECOGNISED

    def __init__(self, context: ProviderContext):
        self.context = context
        self.account = context.account

    def unconfirmed_ref(self, job_id: str) -> str | None:
        """The placeholder provider job id under which :meth:`status` looks for a job whose
        send answer was lost (by reference, reports, pushes); None: it cannot be found."""
        return None

    def push_token(self, job_id: str) -> str:
        """The token this provider gets for pushes about ``job_id`` (see ProviderContext)."""
        return self.context.push_token(self.provider_name, job_id)

    async def pushed_job(self, job_id: str, token: str) -> Job | None:
        """The job a push names, if ``token`` is this provider's, account's and job's token
        and the store has the job under this account; else None (refuse the push)."""
        if not self.context.push_token_valid(self.provider_name, job_id, token):
            return None
        if self.context.get_job is None:  # cannot check whose the job is: refuse
            return None
        job = await self.context.get_job(job_id)
        if job is None or job.account != self.account:
            return None
        return job

    async def send(self, request: SendRequest) -> SendReceipt:
        raise NotImplementedError

    async def send_many(self, requests: Sequence[SendRequest]) -> list[SendResult]:
        results: list[SendResult] = []
        for request in requests:
            try:
                results.append(await self.send(request))
            except ProviderError as error:
                results.append(error)
        return results

    async def status(self, refs: Sequence[ProviderRef]) -> dict[str, StatusReport]:
        raise NotImplementedError

    async def cancel(self, ref: ProviderRef) -> bool:
        return False

    async def acknowledge(self, refs: Sequence[ProviderRef]) -> None:
        return None

    async def fetch_inbound(self) -> InboundFax | None:
        return None

    async def delete_inbound(self, fax_id: str) -> None:
        return None

    async def check_account(self) -> AccountCheck:
        """One harmless authenticated call: raises the ProviderError it met (kind ACCOUNT when
        the account is refused), else what it learnt. Used by ``mailfax check-account`` and
        to probe a paused account."""
        return AccountCheck(facts=[("check", "this provider has no harmless call to try")])

    def warnings(self) -> list[str]:
        """Problems an operator should know of now (shown by ``/readyz``)."""
        return []

    async def handle_push(self, request: web.Request, subpath: str) -> web.StreamResponse:
        """A provider's status push to ``{push_base_url}/{subpath}``; 404 unless overridden."""
        from aiohttp import web  # only serve's web server calls this: the CLI starts without it

        raise web.HTTPNotFound()

    async def close(self) -> None:
        return None


Prepared = TypeVar("Prepared")


async def prepare_documents(requests: Sequence[SendRequest],
                            prepare: Callable[[Sequence[FaxDocument]], Prepared]
                            ) -> list[Prepared]:
    """``prepare(request.documents)`` for each request, in order, computed once per documents
    list (the recipients of one mail share it) and in a worker thread: merging PDFs with
    pikepdf is CPU work that would otherwise block the event loop."""
    prepared: dict[int, Prepared] = {}
    for request in requests:
        if id(request.documents) not in prepared:
            prepared[id(request.documents)] = await asyncio.to_thread(prepare,
                                                                      request.documents)
    return [prepared[id(request.documents)] for request in requests]
