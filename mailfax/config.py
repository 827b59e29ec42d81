"""Settings: one TOML file, validated with pydantic; secrets may come from the environment.

Every field has a default that makes ``mailfax serve`` work with no config file at all:
SMTP on 127.0.0.1:2525, fax domain ``fax.local``, data in ``./mailfax-data``, the bundled
provider emulator, and outgoing mail written to a Maildir.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from mailfax.dialing import DialPolicySettings
from mailfax.providers import provider_module

CONFIG_ENV = "MAILFAX_CONFIG"


def _resolve_secret(value: Any) -> Any:
    """``"env:NAME"`` reads the environment variable NAME, ``"file:/path"`` a file's first line."""
    if isinstance(value, str):
        if value.startswith("env:"):
            name = value[4:]
            if name not in os.environ:
                raise ValueError(f"environment variable {name} is not set")
            return os.environ[name]
        if value.startswith("file:"):
            return Path(value[5:]).read_text(encoding="utf-8").splitlines()[0]
    return value


Secret = Annotated[SecretStr, BeforeValidator(_resolve_secret)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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


class SmtpSettings(Strict):
    listen: list[Listen] = Field(default_factory=lambda: ["127.0.0.1:2525"])
    lmtp_listen: list[Listen] = Field(default_factory=list)
    hostname: str = "mailfax.localhost"
    max_message_size: int = Field(default=32 * 1024 * 1024, ge=1024)
    max_recipients: int = Field(default=50, ge=1)
    data_timeout: float = Field(default=300.0, gt=0)


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


class DispatchSettings(Strict):
    max_attempts: int = Field(default=6, ge=1)
    retry_initial_seconds: float = Field(default=30.0, gt=0)
    retry_max_seconds: float = Field(default=3600.0, gt=0)
    concurrency: int = Field(default=8, ge=1)
    status_poll_seconds: float = Field(default=20.0, gt=0)


NotifyEvent = Literal["accepted", "retrying", "delivered", "failed", "cancelled"]


class NotifySettings(Strict):
    events: list[NotifyEvent] = Field(
        default_factory=lambda: list[NotifyEvent](["delivered", "failed", "cancelled"]))
    from_address: str = "mailfax@localhost"
    from_name: str = "mailfax"
    language: Literal["en", "de"] = "en"


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

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo

        ZoneInfo(value)
        return value


class AccountSettings(BaseModel):
    """``[accounts.NAME]``: ``provider`` picks the adapter, the other keys are its settings."""

    model_config = ConfigDict(extra="allow", frozen=True)
    provider: str

    @model_validator(mode="after")
    def _provider_settings(self) -> AccountSettings:
        self.provider_settings()  # validates, raises with the bad field named
        return self

    def provider_settings(self) -> BaseModel:
        module = provider_module(self.provider)
        settings: BaseModel = module.Settings.model_validate(self.model_extra or {})
        return settings


class Settings(Strict):
    data_dir: Path = Path("mailfax-data")
    fax_domains: list[str] = Field(default_factory=lambda: ["fax.local"], min_length=1)
    default_account: str = "emulator"
    smtp: SmtpSettings = SmtpSettings()
    store: StoreSettings = StoreSettings()
    senders: SenderPolicySettings = SenderPolicySettings()
    numbers: NumberSettings = NumberSettings()
    dial: DialPolicySettings = DialPolicySettings()
    dispatch: DispatchSettings = DispatchSettings()
    notify: NotifySettings = NotifySettings()
    relay: RelaySettings | None = None
    outbox: OutboxSettings = OutboxSettings()
    web: WebSettings = WebSettings()
    inbound: InboundSettings = InboundSettings()
    templates_dir: Path | None = None  # empty: the templates/ folder shipped with mailfax
    accounts: dict[str, AccountSettings] = Field(
        default_factory=lambda: {"emulator": AccountSettings(provider="emulator")}
    )

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
        return self

    @property
    def store_url(self) -> str:
        return self.store.url or f"sqlite:///{self.data_dir / 'mailfax.sqlite3'}"

    @property
    def maildir_path(self) -> Path:
        return Path(self.outbox.maildir) if self.outbox.maildir else self.data_dir / "outbox"


class ConfigError(Exception):
    """A config file that cannot be used; the message names the file and the bad field."""


def load_settings(path: Path | None = None) -> Settings:
    """Read the config named by ``path`` or $MAILFAX_CONFIG; no file at all gives the defaults."""
    if path is None and os.environ.get(CONFIG_ENV):
        path = Path(os.environ[CONFIG_ENV])
    if path is None:
        return Settings()
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ConfigError(f"{path}: cannot read: {error.strerror}") from error
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML: {error}") from error
    try:
        settings = Settings.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(f"{path}: {describe_validation_error(error)}") from None
    if not settings.data_dir.is_absolute():
        settings = settings.model_copy(update={"data_dir": path.parent / settings.data_dir})
    return settings


def describe_validation_error(error: ValidationError) -> str:
    lines = []
    for problem in error.errors(include_url=False, include_input=False):
        where = ".".join(str(part) for part in problem["loc"]) or "(top level)"
        lines.append(f"{where}: {problem['msg']}")
    return "; ".join(lines)
