"""Settings: one TOML file, validated with pydantic; secrets may come from the environment.

Every field has a default that makes ``mailfax serve`` work with no config file at all:
SMTP on 127.0.0.1:2525, fax domain ``fax.local``, data in ``./mailfax-data``, the bundled
provider emulator, and outgoing mail written to a Maildir.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from mailfax.providers import settings_class
from mailfax.support.config_file import CONFIG_ENV as CONFIG_ENV
from mailfax.support.config_file import (
    DEFAULT_DATA_DIR,
    absolute_store_url,
    read_config_file,
    sqlite_url,
)
from mailfax.support.config_file import ConfigError as ConfigError
from mailfax.support.config_file import absolute_path as _absolute
from mailfax.support.config_file import config_path as config_path
from mailfax.trust.dialing import DialPolicySettings, e164_prefixes

log = logging.getLogger(__name__)


class SecretReference(SecretStr):
    """A secret given as ``"env:NAME"`` or ``"file:/path"``, read when it is first used.

    Loading a config reads no secret, so commands that only read the store (``mailfax jobs``)
    work without the providers' passwords; ``serve`` and ``check-config`` read them all at
    once first (:func:`check_secrets`). ``field`` (set at load) names the setting in errors.
    """

    def __init__(self, reference: str, field: str = "", base: Path | None = None):
        super().__init__("")
        self.reference = reference
        self.field = field
        self.base = base
        self._value: str | None = None

    def get_secret_value(self) -> str:
        if self._value is None:
            self._value = read_secret(self.reference, self.field or "a secret", self.base)
        return self._value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SecretReference) and other.reference == self.reference

    def __hash__(self) -> int:
        return hash(self.reference)

    def __len__(self) -> int:
        return len(self.reference)

    def _display(self) -> str:
        return "**********"

    def __repr__(self) -> str:
        return f"SecretReference({self.reference!r})"  # where it is read from; not secret


def read_secret(reference: str, field: str, base: Path | None = None) -> str:
    """The value behind ``"env:NAME"`` (the variable) or ``"file:PATH"`` (the file's first
    line; a relative PATH is relative to ``base``); ConfigError naming ``field`` if missing or
    empty."""
    kind, _, name = reference.partition(":")
    if kind == "env":
        value = os.environ.get(name)
        if value is None:
            raise ConfigError(f"{field}: environment variable {name} is not set")
    else:
        path = Path(name)
        if base is not None and not path.is_absolute():
            path = base / path
        try:
            value = next(iter(path.read_text(encoding="utf-8").splitlines()), "")
        except OSError as error:
            raise ConfigError(f"{field}: cannot read {path}: {error.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{field}: {path} is not UTF-8 text") from None
        name = str(path)
    if not value.strip():
        raise ConfigError(f"{field}: {'environment variable ' if kind == 'env' else ''}"
                          f"{name} is empty")
    return value


def _resolve_secret(value: Any) -> Any:
    """``"env:NAME"`` and ``"file:/path"`` become a :class:`SecretReference`, read later."""
    if isinstance(value, str) and value.startswith(("env:", "file:")):
        return SecretReference(value)
    return value


Secret = Annotated[SecretStr, BeforeValidator(_resolve_secret)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)


def _host_port(value: str, default_port: int) -> tuple[str, int]:
    value = value.strip()
    if value.startswith("["):  # [::1]:2525
        host, _, port = value[1:].partition("]")
        port = port.lstrip(":")
    elif value.count(":") == 1:
        host, port = value.split(":")
    else:
        host, port = value, ""
    return host, int(port) if port else default_port


class ListenAddress(str):
    """``host:port`` or ``[v6]:port``."""

    @property
    def host(self) -> str:
        return _host_port(self, 25)[0]

    @property
    def port(self) -> int:
        return _host_port(self, 25)[1]


def _listen(value: Any) -> Any:
    if isinstance(value, str):
        host, port = _host_port(value, 25)
        if not host or not 0 <= port < 65536:
            raise ValueError(f"not a host:port address: {value!r}")
        if ":" in host:
            ipaddress.IPv6Address(host)
        return ListenAddress(value)
    return value


Listen = Annotated[str, BeforeValidator(_listen)]


RECEIVING_MAILS = 4  # smtp.receiving_budget's default: this many mails of the largest size


class SmtpSettings(Strict):
    listen: list[Listen] = Field(default_factory=lambda: ["127.0.0.1:2525"])
    lmtp_listen: list[Listen] = Field(default_factory=list)
    # Listeners that speak TLS from the first byte (port 465 style); need tls_cert/tls_key.
    implicit_tls_listen: list[Listen] = Field(default_factory=list)
    hostname: str = "mailfax.localhost"
    max_message_size: int = Field(default=32 * 1024 * 1024, ge=1024)
    max_recipients: int = Field(default=50, ge=1)
    data_timeout: float = Field(default=300.0, gt=0)
    # "checked": the 250 comes once the documents are checked and the jobs stored (a bad
    # document gets a 5xx). "spool": the raw mail is stored and answered 250 at once, then
    # checked; a refusal becomes a bounce (DSN) to the envelope sender (intake/accept_spool.py).
    accept: Literal["checked", "spool"] = "checked"
    # Certificate chain and key (PEM). With them, SMTP listeners offer STARTTLS; AUTH is only
    # offered over TLS.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # Failed logins per client address, and per user name, before it is refused for
    # login_failure_window seconds.
    max_login_failures: int = Field(default=5, ge=1)
    login_failure_window: float = Field(default=300.0, gt=0)
    # Connection limits (like Postfix's anvil and smtpd): beyond them a new connection, or a
    # session, gets "421 4.7.0" and is closed. See mailfax/intake/limits.py.
    max_connections: int = Field(default=200, ge=1)
    max_connections_per_client: int = Field(default=20, ge=1)
    junk_command_limit: int = Field(default=100, ge=1)  # NOOP, RSET, VRFY, HELO, ...
    hard_error_limit: int = Field(default=20, ge=1)  # 5xx replies in one session
    # Bytes a second a client must keep up, on average, for its data to count as progress
    # that restarts data_timeout (a complete command line always does); 0: any data does.
    min_data_rate: float = Field(default=500.0, ge=0)
    # Pipelined commands answered before a session lets the other sessions run.
    commands_per_turn: int = Field(default=10, ge=1)

    # Memory (bytes) the mails being received at once may take; each is charged
    # intake.spool.MEMORY_PER_BYTE times its size. Beyond it a new DATA gets 452 4.3.1.
    # Unset: room for RECEIVING_MAILS mails of max_message_size.
    receiving_budget: int | None = Field(default=None, ge=1024)

    @property
    def receiving_budget_bytes(self) -> int:
        from mailfax.intake.spool import memory_cost

        if self.receiving_budget is not None:
            return self.receiving_budget
        return RECEIVING_MAILS * memory_cost(self.max_message_size)

    @model_validator(mode="after")
    def _budget_takes_a_mail(self) -> SmtpSettings:
        from mailfax.intake.spool import memory_cost

        if self.receiving_budget is not None and \
                self.receiving_budget < memory_cost(self.max_message_size):
            raise ValueError(f"receiving_budget must hold at least one mail of "
                             f"max_message_size ({memory_cost(self.max_message_size)} bytes)")
        return self

    @model_validator(mode="after")
    def _tls_pair(self) -> SmtpSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if self.implicit_tls_listen and self.tls_cert is None:
            raise ValueError("implicit_tls_listen needs tls_cert and tls_key")
        return self


class UserSettings(Strict):
    """``[users.NAME]``: someone who may send faxes after SMTP AUTH (over TLS)."""

    # "scrypt$…" as printed by `mailfax passwd NAME`; never the password itself. Without it
    # the user cannot log in to mailfax itself, only be named by Postfix's policy requests.
    password_hash: str | None = None
    # Sender addresses this user may use (MAIL FROM and From:); "@example.org" allows a domain.
    addresses: list[str] = Field(min_length=1)
    account: str | None = None  # provider account for this user's faxes; default_account if unset
    # If set, only numbers starting with one of these E.164 prefixes, e.g. ["+49"].
    allowed_prefixes: list[str] = Field(default_factory=list)
    faxes_per_hour: int | None = Field(default=None, ge=0)
    pages_per_day: int | None = Field(default=None, ge=0)

    @field_validator("password_hash")
    @classmethod
    def _hash(cls, value: str | None) -> str | None:
        from mailfax.trust.auth import is_password_hash

        if value is not None and not is_password_hash(value):
            raise ValueError("is not a password hash; create one with `mailfax passwd NAME`")
        return value

    @field_validator("addresses")
    @classmethod
    def _lower(cls, values: list[str]) -> list[str]:
        return [value.strip().lower() for value in values]

    @field_validator("allowed_prefixes")
    @classmethod
    def _prefixes(cls, values: list[str]) -> list[str]:
        return e164_prefixes(values)


class PolicyServiceSettings(Strict):
    """``[policy_service]``: Postfix in front asks mailfax at RCPT (check_policy_service), so
    it refuses what mailfax would refuse and tells mailfax, in a signed header, which user
    logged in (deploy/EXPOSURE.md)."""

    listen: Listen | None = None  # e.g. "127.0.0.1:10040"; None: no policy service
    # How old a signed X-Mailfax-Authorized header may be when the mail reaches mailfax (the
    # time the mail waited in Postfix's queue). Older: refused, so Postfix bounces it to the
    # user who sent it.
    authorization_max_age: float = Field(default=86400.0, gt=0)
    # Envelope senders of an MTA's recipient verification probes (Postfix:
    # address_verify_sender): "" is the null sender, an entry without "@" is a local part in
    # any domain. From a trusted network they get an answer at RCPT; mail from them is never
    # faxed.
    probe_senders: list[str] = Field(default_factory=lambda: ["", "double-bounce"])

    @field_validator("listen")
    @classmethod
    def _loopback(cls, value: str | None) -> str | None:
        if value is not None and not ipaddress.ip_address(
                ListenAddress(value).host.strip("[]")).is_loopback:
            raise ValueError("the policy service answers anyone who asks: listen on loopback")
        return value


Paper = Literal["A4", "Letter"]  # the sizes faxes are sent on (mailfax.documents.pdf.PAPERS)


class DocumentSettings(Strict):
    """What a mail's parts become."""

    # The mail's text as a cover page: "never", "when-text" (when the mail has text), "always".
    # Per mail: write to 030123456+cover@… or 030123456+nocover@….
    cover: Literal["never", "when-text", "always"] = "never"
    # Office documents (.doc(x), .odt, .rtf, .xls(x), .ods, .txt) through headless LibreOffice;
    # without LibreOffice installed they are refused with a sentence saying so.
    office: bool = True
    office_timeout_seconds: float = Field(default=60.0, gt=0)
    office_max_concurrent: int = Field(default=2, ge=1)
    # The paper faxes are sent on, unless an account names its own (``paper`` there): images
    # are put on it; PDF and office pages of other sizes are scaled onto it.
    paper: Paper = "A4"
    # true: also A4/Letter pages that are not the account's paper are scaled onto it.
    fit_to_paper: bool = False
    # The fax-readiness check (README "Pages that may arrive blank or black"): a page that may
    # arrive almost blank (under readiness_empty_percent black, while the original is not
    # blank) or almost black (over readiness_black_percent) in the fax's black and white.
    # "warn": accepted at once (the 250 carries no warning); the check runs after the 250,
    # the job waits for it (up to readiness_hold_seconds, then it is sent unchecked) and the
    # acceptance mail says which page and why. "refuse": checked before the 250 and refused
    # (554 5.6.0) with that sentence; each mail waits for its render, which costs intake
    # speed. "off": not looked at. The pages are rendered in readiness_workers processes of
    # their own at nice 10 (intake gets the CPU first): only the first readiness_max_pages
    # (a text page about 22 ms of CPU, a photo 0.5-1 s), none once readiness_max_seconds were
    # spent on a mail; a check still running 5 s after that has its worker killed (the mail
    # is "not checked").
    readiness: Literal["warn", "refuse", "off"] = "warn"
    readiness_empty_percent: float = Field(default=0.05, ge=0, le=100)
    readiness_black_percent: float = Field(default=60.0, ge=0, le=100)
    readiness_max_pages: int = Field(default=20, ge=0)
    readiness_max_seconds: float = Field(default=5.0, gt=0)
    readiness_workers: int = Field(default=1, ge=1)
    readiness_hold_seconds: float = Field(default=120.0, ge=0)


class QuotaSettings(Strict):
    """Limits for everyone together (per user: in [users.NAME])."""

    faxes_per_hour: int | None = Field(default=None, ge=0)
    pages_per_day: int | None = Field(default=None, ge=0)
    # Status mails to one sender address per hour; more are not sent (the jobs still run).
    status_mails_per_hour: int = Field(default=60, ge=1)


class StoreSettings(Strict):
    url: str = ""  # empty: sqlite:///<data_dir>/mailfax.sqlite3

    @field_validator("url")
    @classmethod
    def _scheme(cls, url: str) -> str:
        if url and not url.startswith(("sqlite:///", "postgresql://", "postgres://")):
            raise ValueError("must start with sqlite:/// or postgresql://")
        return url


class SenderPolicySettings(Strict):
    """Who may send faxes. Empty address and domain lists mean: anyone on a trusted network."""

    trusted_networks: list[str] = Field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])
    allowed_addresses: list[str] = Field(default_factory=list)
    allowed_domains: list[str] = Field(default_factory=list)

    @field_validator("trusted_networks")
    @classmethod
    def _networks(cls, values: list[str]) -> list[str]:
        for value in values:
            ipaddress.ip_network(value, strict=False)
        return values


class NumberSettings(Strict):
    default_country: str = Field(default="DE", pattern=r"^[A-Z]{2}$")

    @field_validator("default_country")
    @classmethod
    def _known_region(cls, value: str) -> str:
        import phonenumbers

        if value not in phonenumbers.SUPPORTED_REGIONS:
            raise ValueError(f"{value!r} is not a country that has phone numbers (an ISO "
                             "3166 code such as DE, AT, CH, FR, US)")
        return value


def _window_spec(value: str) -> str:
    """A time window spec (mailfax.outbound.windows) that can be read."""
    from mailfax.outbound.windows import parse_window

    parse_window(value)
    return value


WindowSpec = Annotated[str, AfterValidator(_window_spec)]


class DispatchSettings(Strict):
    # Transient errors (an outage) are retried for max_age_hours after the mail came in (as
    # Postfix's maximal_queue_lifetime, 5 days); max_attempts, if set, also ends it earlier.
    max_attempts: int | None = Field(default=None, ge=1)
    max_age_hours: float = Field(default=120.0, gt=0)
    # One "delayed" mail to the sender when a fax is still not sent after this long (as
    # Postfix's delay_warning_time); 0: none.
    delay_warning_hours: float = Field(default=4.0, ge=0)
    retry_initial_seconds: float = Field(default=30.0, gt=0)
    retry_max_seconds: float = Field(default=3600.0, gt=0)
    concurrency: int = Field(default=8, ge=1)
    status_poll_seconds: float = Field(default=20.0, gt=0)
    # How long an unconfirmed job (a send whose answer was lost) is looked for at its
    # provider before the sender and the admin are told "may have been sent".
    unconfirmed_hours: float = Field(default=6.0, gt=0)
    # A job handed to a provider with no final status after this long (since its last change)
    # is failed with a reason saying so; per account: [accounts.NAME] max_tracking_hours.
    max_tracking_hours: float = Field(default=24.0, gt=0)
    # An account refused as a whole (login, credit) is paused and probed this often.
    account_probe_seconds: float = Field(default=300.0, gt=0)
    # One call at a time per destination number, over all instances (HylaFAX's
    # MaxConcurrentCalls = 1): jobs to a number being dialled wait for that call's end.
    one_call_per_number: bool = True
    # A busy result holds every job to that number back: 3, 6, then 12 min (the n-th busy
    # result in a row waits the n-th step; the last one from then on).
    busy_backoff_seconds: list[Annotated[float, Field(ge=0)]] = Field(
        default_factory=lambda: [180.0, 360.0, 720.0], min_length=1)
    # When jobs of a priority ("normal", "bulk") may be sent, e.g.
    # bulk = "Mon-Fri 18:00-07:00, Sat-Sun"; a priority not named: any time. Per account:
    # [accounts.NAME] windows. Read in ``timezone`` (None: notify.timezone).
    windows: dict[Literal["normal", "bulk"], WindowSpec] = Field(default_factory=dict)
    timezone: str | None = None

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str | None) -> str | None:
        return None if value is None else _known_zone_name(value)

    @property
    def max_age(self) -> timedelta:
        return timedelta(hours=self.max_age_hours)

    @property
    def delay_warning(self) -> timedelta | None:
        return timedelta(hours=self.delay_warning_hours) if self.delay_warning_hours else None


NotifyEvent = Literal["accepted", "retrying", "delayed", "delivered", "failed", "cancelled"]


def _known_zone_name(value: str) -> str:
    """An IANA time zone name that this machine's zone data (or tzdata) knows."""
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError) as error:  # (a KeyError: pydantic lets it by)
        raise ValueError(f"unknown time zone {value!r}") from error
    return value


TimeZoneName = Annotated[str, AfterValidator(_known_zone_name)]


class NotifySettings(Strict):
    # "delayed": one mail when a fax is still not sent after dispatch.delay_warning_hours.
    events: list[NotifyEvent] = Field(
        default_factory=lambda: list[NotifyEvent](["delayed", "delivered", "failed",
                                                   "cancelled"]))
    # Alerts about accounts (login refused, no credit); None: inbound.postmaster.
    admin_address: str | None = None
    from_address: str = "mailfax@localhost"
    from_name: str = "mailfax"
    language: Literal["en", "de"] = "en"
    # A failed fax as the status mail ("mail"), as an RFC 3464 bounce that mail clients show
    # as undeliverable ("dsn"), or both.
    failure_format: Literal["mail", "dsn", "both"] = "mail"
    # Times in status mails and on the cover page (the fax and the mail are read locally).
    timezone: TimeZoneName = "Europe/Berlin"
    # The delivered mail carries the whole document as faxed besides the transmission
    # report; ``[accounts.NAME] return_document`` and a mail's own option override it.
    return_document: bool = False


class OptionSettings(Strict):
    """``[options]``: per-mail options (README "Per-mail options")."""

    # InterFAX-style codes in the subject (``/d 2026-12-24 08:00``), taken out of it; off by
    # default, as a subject may hold such text by chance.
    subject_codes: bool = False
    # A scheduled send (X-Fax-Send-At, X-Fax-Delay) at most this far ahead.
    max_days_ahead: float = Field(default=30.0, gt=0)


class RelaySettings(Strict):
    host: str
    port: int = 25
    tls: Literal["none", "starttls", "implicit"] = "none"
    username: str | None = None
    password: Secret | None = None
    timeout: float = 30.0


class OutboxSettings(Strict):
    maildir: str = ""  # empty: <data_dir>/outbox, used when no relay is configured
    retry_initial_seconds: float = Field(default=10.0, gt=0)
    retry_max_seconds: float = Field(default=1800.0, gt=0)


class WebSettings(Strict):
    """The HTTP endpoint for provider status pushes (and health)."""

    listen: Listen | None = None  # e.g. "127.0.0.1:8025"; None: no HTTP endpoint
    public_url: str | None = None  # how providers reach it, e.g. "https://fax.example.com"
    # /healthz, /readyz and /metrics on a listener of their own (e.g. "127.0.0.1:8026"), and
    # no longer on `listen`; None: they are served on `listen` with the pushes.
    health_listen: Listen | None = None

    @field_validator("listen", "health_listen")
    @classmethod
    def _needs_port(cls, value: str | None) -> str | None:
        if value is not None and not re.search(r"(^[^:]+|\])(:[0-9]+)$", value.strip()):
            raise ValueError(f"{value!r} has no port; write host:port, e.g. "
                             "\"127.0.0.1:8025\"")
        return value


class RetentionSettings(Strict):
    """``[retention]``: how long each kind of data is kept, in days; 0 keeps it forever.

    Purged daily by ``serve`` (every ``interval_hours``) and on demand by ``mailfax purge``,
    in batches of ``batch_size`` rows, each its own short transaction. The why of each
    default is in deploy/OPERATIONS.md ("Retention").
    """

    # The faxed documents (PDFs) of a mail whose jobs all ended (delivered, failed,
    # cancelled, unconfirmed), counted from the last job's last change. `mailfax retry`
    # needs them: after this a job can no longer be sent again.
    documents_days: float = Field(default=30.0, ge=0)
    # Job rows, their events, their mail's headers and their status mails; and received
    # faxes' records (caller, called number, time). Counted from the last change.
    history_days: float = Field(default=365.0, ge=0)
    # The images of received faxes whose mail was handed off and that are deleted at the
    # provider, with the copies of their mails in the outbox. Counted from when fetched.
    received_faxes_days: float = Field(default=30.0, ge=0)
    # Sent (or given-up) mails in the outbox table other than bounces and received faxes:
    # status mails, alerts, postmaster forwards, replies to refused IMAP mails.
    outbox_days: float = Field(default=7.0, ge=0)
    # Sent (or given-up) RFC 3464 bounces (notify.failure_format "dsn"/"both").
    dsn_days: float = Field(default=30.0, ge=0)
    # Files mailfax wrote into the outbox Maildir (no relay), by modification time.
    maildir_days: float = Field(default=30.0, ge=0)
    interval_hours: float = Field(default=24.0, gt=0)
    # Rows per transaction (SQLite: also at most about 4 MB of content per transaction).
    batch_size: int = Field(default=200, ge=1, le=1000)


InboundFormat = Literal["pdf", "tiff", "pdf+tiff", "none"]


def _regex(value: str | None) -> str | None:
    if value is not None:
        try:
            re.compile(value)
        except re.error as error:
            raise ValueError(f"{value!r} is not a regular expression: {error}") from None
    return value


class InboundRoute(Strict):
    """``[[inbound.rules]]``: one routing rule for received faxes (mailfax.inbound.routing).

    Rules are tried in order, the first that matches wins. Every match field a rule sets must
    match (a list matches when one entry does); a rule that sets none matches every fax, so it
    belongs at the end, as the default route.
    """

    name: str = ""  # shown by `mailfax route` and in the log
    # -- what it matches --
    called: list[str] = Field(default_factory=list)  # numbers, any spelling, exactly
    called_prefix: list[str] = Field(default_factory=list)  # E.164 prefixes, e.g. "+4930123"
    caller: list[str] = Field(default_factory=list)  # the sender's caller id, exactly
    caller_prefix: list[str] = Field(default_factory=list)
    # The remote station id (TSI), a regular expression searched for, in any case.
    tsi: Annotated[str | None, AfterValidator(_regex)] = None
    account: list[str] = Field(default_factory=list)  # [accounts.NAME] the fax came in at
    # -- what it sets --
    to: list[str] = Field(min_length=1)
    cc: list[str] = Field(default_factory=list)
    bcc: list[str] = Field(default_factory=list)  # in the envelope only, never in a header
    # What is attached; "none" is privacy mode: the mail only says that a fax arrived, the
    # document stays in the store (`mailfax inbox show FAXID --pdf`) or the IMAP folder.
    # None: "pdf", or "pdf+tiff" with inbound.attach_tiff.
    format: InboundFormat | None = None
    # Privacy mode: the first text lines of page 1 (OCR) in the mail all the same.
    privacy_first_lines: bool = False
    language: Literal["en", "de"] | None = None  # None: inbound.language
    # Templates <language>/<template>.subject|.txt|.html in the templates folder.
    template: str = Field(default="inbound", pattern=r"^[A-Za-z0-9_-]+$")
    subject: str | None = None  # a Jinja template for the subject, instead of the template's
    folder: str | None = None  # [imap_delivery] folder for these faxes
    notify_postmaster: bool = False  # the postmaster gets the mail too (in the envelope)

    @field_validator("called_prefix", "caller_prefix")
    @classmethod
    def _prefixes(cls, values: list[str]) -> list[str]:
        return e164_prefixes([value.replace(" ", "") for value in values])

    @field_validator("subject")
    @classmethod
    def _subject_template(cls, value: str | None) -> str | None:
        if value is not None:
            import jinja2

            try:
                jinja2.Environment().parse(value)
            except jinja2.TemplateSyntaxError as error:
                raise ValueError(f"{value!r} is not a Jinja template: {error}") from None
        return value

    @property
    def matches_everything(self) -> bool:
        return not (self.called or self.called_prefix or self.caller or self.caller_prefix
                    or self.tsi is not None or self.account)


class InboundSettings(Strict):
    """Received faxes: where they go and how they are mailed."""

    poll_seconds: float = Field(default=60.0, gt=0)
    # Called number (any spelling; normalised to E.164) -> mail addresses.
    routes: dict[str, list[str]] = Field(default_factory=dict)
    # Addresses for faxes to numbers without a route; empty: the postmaster gets them.
    default_route: list[str] = Field(default_factory=list)
    # Gets faxes that no route and no default route claims: never nowhere.
    postmaster: str = "postmaster@localhost"
    from_address: str = "fax@localhost"
    from_name: str = "Fax"
    language: Literal["en", "de"] = "en"
    timezone: str = "Europe/Berlin"  # time shown in the mail
    attach_tiff: bool = False  # also attach the original TIFF
    # Seconds to wait for the relay to take a fax's mail before the poller moves on.
    handoff_timeout: float = Field(default=30.0, gt=0)
    # An invisible text layer (OCRmyPDF + Tesseract) so the PDF is searchable: "auto" when
    # installed with these languages, "on", or "off". A fax whose OCR fails is mailed anyway.
    ocr: Literal["auto", "on", "off"] = "auto"
    ocr_languages: str = Field(default="deu+eng", pattern=r"^[a-z_]+(\+[a-z_]+)*$")
    ocr_seconds_per_page: float = Field(default=20.0, gt=0)
    # Routing rules, first match wins (InboundRoute); instead of routes/default_route.
    rules: list[InboundRoute] = Field(default_factory=list)
    # The same fax again (the same pages, by content, to the same number) within this many
    # minutes is not mailed a second time, only logged and deleted; 0: every fax is mailed.
    duplicate_window_minutes: float = Field(default=60.0, ge=0)
    # Junk faxes: deleted at the provider and counted (state "blocked"), never mailed. Caller
    # numbers by prefix (any spelling) and station ids by regex; `mailfax block` adds to the
    # block file <data_dir>/inbound-blocklist instead.
    block_callers: list[str] = Field(default_factory=list)
    block_tsi: list[Annotated[str, AfterValidator(_regex)]] = Field(default_factory=list)

    @model_validator(mode="after")
    def _one_routing_form(self) -> InboundSettings:
        if self.rules and (self.routes or self.default_route):
            raise ValueError("[[inbound.rules]] replace inbound.routes and "
                             "inbound.default_route: move each route into a rule (called = "
                             "[NUMBER], to = [...]) and the default route into a last rule "
                             "without match fields")
        for index, rule in enumerate(self.rules[:-1], start=1):
            if rule.matches_everything:
                raise ValueError(f"rules: rule {index} {rule.name!r} matches every fax, so "
                                 f"the rules after it can never match; put it last")
        return self

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo

        ZoneInfo(value)
        return value


class ImapServerSettings(Strict):
    """An IMAP account mailfax logs in to (mailfax/imap)."""

    host: str
    port: int = Field(default=143, gt=0, lt=65536)
    tls: Literal["none", "implicit"] = "none"  # implicit: IMAPS, usually port 993
    username: str
    password: Secret
    timeout: float = Field(default=30.0, gt=0)


NumberSource = Literal["subject", "to"]


class ImapIntakeSettings(ImapServerSettings):
    """``[imap_intake]``: fax mails read from a watched mailbox instead of SMTP/LMTP."""

    mailbox: str = "INBOX"
    processed_folder: str = "Processed"  # "": leave the mail, flag it $MailfaxQueued
    rejected_folder: str = "Rejected"  # "": leave the mail, flag it $MailfaxRejected
    # Where the fax number is taken from: "subject" (subject_patterns) and "to" (To/Cc
    # addresses: <number>@<fax domain>, or a plus-address like fax+4930123456@example.org).
    number_from: list[NumberSource] = Field(
        default_factory=lambda: list[NumberSource](["to", "subject"]), min_length=1)
    # Regular expressions for the subject; group 1 holds one number or several (, or ;).
    subject_patterns: list[str] = Field(default_factory=lambda: [
        r"(?i)\bfax\b\s*(?:to|an|nach)?\s*:?\s*(\+?[0-9][0-9 ()/.,;-]*[0-9])",
        r"^\s*(\+?[0-9][0-9 ()/.-]{3,}[0-9])\s*$",
    ])
    plus_separator: str = Field(default="+", min_length=1, max_length=1)
    # The mailbox's own addresses for plus-addressing; empty: any address with a number detail.
    plus_addresses: list[str] = Field(default_factory=list)
    idle: bool = True  # IMAP IDLE when the server has it; else poll every poll_seconds
    idle_seconds: float = Field(default=600.0, gt=0, le=1740)  # re-issue IDLE (RFC: < 29 min)
    poll_seconds: float = Field(default=60.0, gt=0)
    reconnect_initial_seconds: float = Field(default=1.0, gt=0)
    reconnect_max_seconds: float = Field(default=300.0, gt=0)
    # The mailbox is not a trust boundary: senders.allowed_addresses/allowed_domains apply.
    # With both empty, intake refuses to start unless this is set.
    allow_any_sender: bool = False
    # A sender that may not send faxes gets no reply by default (no backscatter to forgeries).
    reply_to_refused_senders: bool = False

    @field_validator("subject_patterns")
    @classmethod
    def _patterns(cls, values: list[str]) -> list[str]:
        import re

        for value in values:
            if re.compile(value).groups < 1:
                raise ValueError(f"{value!r} has no group for the number")
        return values


class ImapDeliverySettings(ImapServerSettings):
    """``[imap_delivery]``: received faxes APPENDed into a mailbox folder instead of mailed."""

    folder: str = "INBOX"  # e.g. a shared "Public/Faxes"
    # Called number (any spelling) -> folder; numbers without an entry go to ``folder``.
    folders: dict[str, str] = Field(default_factory=dict)
    create_folders: bool = True


class BroadcastEntry(Strict):
    """One number of a broadcast list given in the config (``numbers = [{number = …}]``)."""

    number: str
    name: str = ""


class BroadcastListSettings(Strict):
    """``[lists.NAME]``: a broadcast list. A mail to ``<list_prefix>NAME@<fax domain>`` becomes
    one fax job per number of the list, and one summary status mail when all have ended
    (mailfax/intake/broadcast.py, mailfax/outbound/broadcast.py)."""

    # A CSV file with a number column and an optional name column (a header row naming
    # "number" and "name" is optional; "," ";" or tab between the columns); a relative path
    # is relative to the config file's folder. Or the numbers right here: ``numbers``.
    file: Path | None = None
    numbers: list[str | BroadcastEntry] = Field(default_factory=list)
    # Who may send to the list: envelope senders, "@example.org" for a whole domain.
    allowed: list[str] = Field(min_length=1)
    account: str | None = None  # the provider account of its faxes; None: the sender's
    # Status mails per fax of the list besides the one summary: "none", or "failure" (one
    # mail per failed fax, as for a single fax).
    job_mails: Literal["none", "failure"] = "none"

    @field_validator("allowed")
    @classmethod
    def _senders(cls, values: list[str]) -> list[str]:
        values = [value.strip().lower() for value in values]
        for value in values:
            if "@" not in value or value.endswith("@"):
                raise ValueError(f"{value!r} is not a sender address (alice@example.org) or "
                                 f"a domain (@example.org)")
        return values

    @model_validator(mode="after")
    def _one_source(self) -> BroadcastListSettings:
        if (self.file is None) == (not self.numbers):
            raise ValueError("give the list's numbers either as file = \"….csv\" or as "
                             "numbers = [...], not both and not neither")
        return self


LIST_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


class AccountSettings(BaseModel):
    """``[accounts.NAME]``: ``provider`` picks the adapter, the other keys are its settings."""

    model_config = ConfigDict(extra="allow", frozen=True)
    provider: str
    # Overrides dispatch.max_tracking_hours for this account's jobs.
    max_tracking_hours: float | None = Field(default=None, gt=0)
    # Credentials may go to http:// URLs of other machines (loopback is always allowed).
    allow_plain_http: bool = False
    paper: Paper | None = None  # this account's faxes on "A4" or "Letter"; None: [documents]
    # When this account's jobs may be sent (a time window spec, see [dispatch] windows).
    windows: WindowSpec | None = None

    return_document: bool | None = None  # overrides notify.return_document for this account

    @model_validator(mode="after")
    def _provider_settings(self) -> AccountSettings:
        validated = self.provider_settings()  # validates, raises with the bad field named
        refuse_plain_http(validated, self.allow_plain_http)
        extra = self.__pydantic_extra__ or {}
        for key in list(extra):
            value = getattr(validated, key, None)
            if isinstance(value, SecretStr):
                extra[key] = value  # kept as a secret, so no repr or dump shows it
        return self

    def provider_settings(self) -> BaseModel:
        return settings_class(self.provider).model_validate(self.model_extra or {})


def refuse_plain_http(settings: BaseModel, allowed: bool) -> None:
    """Raise ValueError when a provider URL setting is plain http to another machine."""
    from mailfax.providers.base import plain_http_problem

    for name, value in settings:
        urls = list(value.values()) if isinstance(value, dict) else [value]
        for url in urls:
            if isinstance(url, str) and name.endswith(("url", "centres")):
                problem = plain_http_problem(url, allowed)
                if problem:
                    raise ValueError(f"{name}: {problem}")


def _section(model: type[Strict] | type[DialPolicySettings]) -> Any:
    """A section's default when the file does not have it: made with ``model_construct``, so
    no validator is built for it (building them all cost ``mailfax jobs`` 100-150 ms); what a
    file gives is validated by Settings' own validator. tests/test_config.py checks that the
    constructed defaults equal the validated ones."""
    return Field(default_factory=model.model_construct)


class Settings(Strict):
    data_dir: Path = DEFAULT_DATA_DIR
    fax_domains: list[str] = Field(default_factory=lambda: ["fax.local"], min_length=1)
    default_account: str = "emulator"
    smtp: SmtpSettings = _section(SmtpSettings)
    store: StoreSettings = _section(StoreSettings)
    senders: SenderPolicySettings = _section(SenderPolicySettings)
    numbers: NumberSettings = _section(NumberSettings)
    dial: DialPolicySettings = _section(DialPolicySettings)
    dispatch: DispatchSettings = _section(DispatchSettings)
    notify: NotifySettings = _section(NotifySettings)
    relay: RelaySettings | None = None
    outbox: OutboxSettings = _section(OutboxSettings)
    web: WebSettings = _section(WebSettings)
    inbound: InboundSettings = _section(InboundSettings)
    templates_dir: Path | None = None  # empty: the templates/ folder shipped with mailfax
    accounts: dict[str, AccountSettings] = Field(
        default_factory=lambda: {"emulator": AccountSettings(provider="emulator")}
    )
    imap_intake: ImapIntakeSettings | None = None  # watch a mailbox for fax mails
    imap_delivery: ImapDeliverySettings | None = None  # APPEND received faxes via IMAP
    users: dict[str, UserSettings] = Field(default_factory=dict)
    quotas: QuotaSettings = _section(QuotaSettings)
    documents: DocumentSettings = _section(DocumentSettings)
    policy_service: PolicyServiceSettings = _section(PolicyServiceSettings)
    retention: RetentionSettings = _section(RetentionSettings)
    options: OptionSettings = _section(OptionSettings)

    # Broadcast lists (BroadcastListSettings), mailed at <list_prefix>NAME@<fax domain>.
    lists: dict[str, BroadcastListSettings] = Field(default_factory=dict)
    list_prefix: str = Field(default="list-", pattern=r"^[A-Za-z][A-Za-z0-9._-]*$")

    @field_validator("fax_domains")
    @classmethod
    def _lower_domains(cls, values: list[str]) -> list[str]:
        return [value.strip().lower().rstrip(".") for value in values]

    @model_validator(mode="after")
    def _default_account_exists(self) -> Settings:
        if self.default_account not in self.accounts:
            raise ValueError(
                f"default_account {self.default_account!r} is not one of the accounts "
                f"({', '.join(sorted(self.accounts)) or 'none'})"
            )
        for name, user in self.users.items():
            self._check_account(f"users.{name}.account", user.account)
        return self

    def _check_account(self, where: str, account: str | None) -> None:
        """ValueError when ``where`` names an account that is not configured."""
        if account is not None and account not in self.accounts:
            raise ValueError(f"{where} {account!r} is not one of the accounts "
                             f"({', '.join(sorted(self.accounts))})")

    @model_validator(mode="after")
    def _lists_valid(self) -> Settings:
        for name, settings in self.lists.items():
            if not LIST_NAME.match(name):
                raise ValueError(f"lists.{name}: a list name is lower-case letters, digits, "
                                 f"'.', '_' and '-' (it is part of the mail address)")
            self._check_account(f"lists.{name}.account", settings.account)
        return self

    def paper_for(self, account: str | None) -> Paper:
        """The paper an account's faxes are put on."""
        settings = self.accounts.get(account or self.default_account)
        return settings.paper if settings and settings.paper else self.documents.paper

    @model_validator(mode="after")
    def _name_secrets(self) -> Settings:
        """Each ``env:``/``file:`` secret learns its field's name, for its error messages."""
        for field, secret in secrets_of(self):
            secret.field = secret.field or field
        return self

    @property
    def store_url(self) -> str:
        return self.store.url or sqlite_url(self.data_dir)

    @property
    def maildir_path(self) -> Path:
        return Path(self.outbox.maildir) if self.outbox.maildir else self.data_dir / "outbox"


def load_settings(path: Path | None = None) -> Settings:
    """Read the config named by ``path`` or $MAILFAX_CONFIG; no file at all gives the defaults.

    Relative paths in the settings (``data_dir``, ``outbox.maildir``, ``templates_dir``, TLS
    files, a relative ``sqlite:///`` store, ``file:`` secrets) are made absolute here, once:
    relative to the config file's folder, or to the current directory when there is no file.
    Secrets are not read here (see :class:`SecretReference`).
    """
    path = config_path(path)
    if path is None:
        return with_absolute_paths(default_settings(), Path.cwd())
    raw = read_config_file(path)
    try:
        settings = Settings.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(f"{path}: {describe_validation_error(error)}") from None
    return with_absolute_paths(settings, path.parent)


def default_settings() -> Settings:
    """The settings without a config file, made with ``model_construct``: ``serve`` on the
    embedded defaults does not build the whole config's validator (20 ms) before its port
    opens. tests/test_config.py checks that they equal the validated ``Settings()``."""
    return Settings.model_construct()


def with_absolute_paths(settings: Settings, base: Path) -> Settings:
    """``settings`` with every relative path made absolute against ``base``, and every
    :class:`SecretReference` told its field's name (for errors) and ``base`` (for ``file:``).
    """
    base = Path(os.path.abspath(base))
    absolute = _absolute_fields(settings, base)
    assert isinstance(absolute, Settings)
    updates: dict[str, Any] = {}
    if absolute.outbox.maildir:
        maildir = str(_absolute(Path(absolute.outbox.maildir), base))
        updates["outbox"] = absolute.outbox.model_copy(update={"maildir": maildir})
    url = absolute_store_url(absolute.store.url, base)
    if url != absolute.store.url:
        updates["store"] = absolute.store.model_copy(update={"url": url})
    if updates:
        absolute = absolute.model_copy(update=updates)
    for field, secret in secrets_of(absolute):
        secret.field, secret.base = field, base
    return absolute


def _absolute_fields(model: BaseModel, base: Path) -> BaseModel:
    """A copy of ``model`` (and the models in it) with relative Path values made absolute."""
    updates: dict[str, Any] = {}
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, Path) and not value.is_absolute():
            updates[name] = _absolute(value, base)
        elif isinstance(value, BaseModel):
            updates[name] = _absolute_fields(value, base)
        elif isinstance(value, dict) and any(isinstance(v, BaseModel) for v in value.values()):
            updates[name] = {key: _absolute_fields(v, base) if isinstance(v, BaseModel) else v
                             for key, v in value.items()}
    return model.model_copy(update=updates) if updates else model


def secrets_of(model: BaseModel, where: str = "") -> list[tuple[str, SecretReference]]:
    """Every ``env:``/``file:`` secret in ``model``, with its field's dotted name."""
    found: list[tuple[str, SecretReference]] = []
    values = {name: getattr(model, name) for name in type(model).model_fields}
    values.update(model.__pydantic_extra__ or {})
    for name, value in values.items():
        field = f"{where}.{name}" if where else name
        if isinstance(value, SecretReference):
            found.append((field, value))
        elif isinstance(value, BaseModel):
            found += secrets_of(value, field)
        elif isinstance(value, dict):
            for key, item in value.items():
                if isinstance(item, BaseModel):
                    found += secrets_of(item, f"{field}.{key}")
    return found


def check_secrets(settings: Settings) -> None:
    """Read every ``env:``/``file:`` secret now; ConfigError naming each one that is missing
    or empty (``serve`` and ``check-config`` call this before anything else)."""
    problems = []
    for _, secret in secrets_of(settings):
        try:
            secret.get_secret_value()
        except ConfigError as error:
            problems.append(str(error))
    if problems:
        raise ConfigError("; ".join(problems))


def describe_validation_error(error: ValidationError) -> str:
    lines = []
    for problem in error.errors(include_url=False, include_input=False):
        where = ".".join(str(part) for part in problem["loc"]) or "(top level)"
        lines.append(f"{where}: {problem['msg']}")
    return "; ".join(lines)
