"""The ``[accounts.NAME]`` settings of each provider, apart from the adapters.

Loading a config validates every account's settings; keeping them here means the CLI
(``mailfax jobs``) does so without importing zeep, aiohttp, httpx or pikepdf, which the
adapters need (0.37 s of start-up). Each adapter module re-exports its class as ``Settings``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator

from mailfax.config import Secret

LIVE_WSDL = "https://ccs.fax.de/xmlws.exe?wsdl/IntfXMLWS"
DEFAULT_URL = "https://wr.ispsuite.portunity.de/webrequests/product-voip/index.php"
HA_DE = "https://faxws-ha.de.retarus.com/rest/v1"
DATA_CENTRES_DE = {"DE1": "https://faxws.de1.retarus.com/rest/v1",
                   "DE2": "https://faxws.de2.retarus.com/rest/v1"}


Outcome = Literal[
    "busy", "no_answer", "not_a_fax", "no_service", "invalid_number", "transmission_failed",
    "blacklisted", "provider_unavailable",
]


class FailRule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)
    prefix: str = Field(pattern=r"^\+[0-9]+$", description="E.164 prefix, e.g. +4930999")
    result: Outcome


class PartialRule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)
    prefix: str = Field(pattern=r"^\+[0-9]+$", description="E.164 prefix, e.g. +4930996")
    pages_sent: int = Field(ge=0, description="the call ends after this many pages")


class EmulatorSettings(BaseModel):
    """``[accounts.NAME]`` with ``provider = "emulator"``: the bundled emulator."""

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)
    delay_seconds: float = Field(default=2.0, ge=0, description="from submission to the result")
    seconds_per_page: float = Field(default=20.0, ge=0, description="reported transmission time")
    send_latency_seconds: float = Field(default=0.0, ge=0,
                                        description="how long each send call takes to answer")
    fail: list[FailRule] = Field(
        default_factory=lambda: [
            FailRule(prefix="+4930999", result="busy"),
            FailRule(prefix="+4930998", result="no_answer"),
        ],
        description="numbers that fail, by longest matching prefix",
    )
    partial: list[PartialRule] = Field(
        default_factory=list,
        description="numbers reported delivered with fewer pages sent, by longest prefix")
    inbound: bool = Field(default=True, description="hand out the faxes in inbox_folder")
    inbox_folder: str = Field(default="", description="received faxes (*.tif) to hand out; "
                                                      "empty: <data_dir>/emulator/inbox")
    fax_number: str = Field(default="+49301234567", pattern=r"^\+[0-9]+$",
                            description="the number a fax in the folder was sent to, when no "
                                        "JSON beside it names one")
    inbound_poll_seconds: float = Field(default=1.0, gt=0,
                                        description="how often mailfax looks into the folder")


class FaxDeSettings(BaseModel):
    """``[accounts.NAME]`` with ``provider = "fax.de"``."""

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)
    account: str = Field(description="FAX.de customer id")
    password: Secret
    wsdl_url: str = Field(default=LIVE_WSDL, description="where the WSDL is loaded from")
    endpoint_url: str | None = Field(default=None,
                                     description="SOAP endpoint; default: the WSDL's address")
    timeout_seconds: float = Field(default=60.0, gt=0)
    bulk: bool = Field(default=False, description="several recipients as one job with a "
                       "RecipientFile (needs FAX.de's activation)")
    station_id: str | None = Field(default=None, max_length=20)
    fax_header: str | None = Field(default=None, max_length=30)
    caller_id: str | None = Field(default=None, pattern=r"^\+?[0-9]{3,20}$")
    fax_retry: int | None = Field(default=None, ge=0, le=10)
    status_push: bool = Field(default=True, description="ask FAX.de to call STATURL when a "
                              "job finishes (needs [web])")
    inbound: bool = Field(default=True, description="fetch received faxes of this account")
    status_grace_seconds: float = Field(
        default=900.0, ge=0, description="JobStatus 5 (no log entry) this soon after SendJob "
        "means 'not logged yet', not a failure")


class FaxnummerSettings(BaseModel):
    """``[accounts.NAME]`` with ``provider = "faxnummer.de"``."""

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)
    url: str = Field(default=DEFAULT_URL, pattern=r"^https?://\S+$",
                     description="the product-voip webrequests endpoint")
    product_login: str = Field(
        min_length=1, pattern=r"^\S+$",
        validation_alias=AliasChoices("product_login", "sProductLogin"),
        description="sProductLogin: the fax or telephony account (accXXXXX or sipXXXXX), "
                    "not the customer-centre login")
    product_code: Secret = Field(
        validation_alias=AliasChoices("product_code", "sProductCode"),
        description="sProductCode: that account's password ('env:NAME' or 'file:/path' "
                    "keep it out of the config file)")
    status_email: str = Field(
        pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$",
        validation_alias=AliasChoices("status_email", "sEmail"),
        description="sEmail (required by the API): where Faxnummer.de mails its own status "
                    "updates, e.g. the fax administrator")
    source_number: str | None = Field(
        default=None, pattern=r"^(\+|00)[1-9][0-9]{3,}$",
        validation_alias=AliasChoices("source_number", "sSource"),
        description="sSource: a number of this account, +49... or 0049...; "
                    "unset: the provider picks one")
    sender_name: str = Field(
        default="", description="sSender when a job brings no header or station id; "
                                "transliterated to ASCII and cut to 20 characters")
    timeout_seconds: float = Field(default=60.0, gt=0, description="per request, upload included")
    connect_timeout_seconds: float = Field(default=10.0, gt=0)
    max_connections: int = Field(default=4, ge=1, le=100)
    connect_retries: int = Field(default=2, ge=0, le=10,
                                 description="retries of connections that failed to open")


class RetarusSettings(BaseModel):
    """``[accounts.NAME]`` with ``provider = "retarus"``."""

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)
    customer_number: str = Field(pattern=r"^[A-Za-z0-9]+$", description="e.g. 99999TE")
    username: str = Field(min_length=1)
    password: Secret  # "env:NAME" or "file:PATH" keep it out of the config file
    send_url: str = Field(default=HA_DE, description="the region's HA URL, for sending")
    data_centres: dict[str, str] = Field(
        default_factory=lambda: dict(DATA_CENTRES_DE), min_length=1,
        description="name -> data-centre URL, for polling and deleting reports")
    paper_format: Literal["A4", "LETTER"] = "A4"
    resolution: Literal["HIGH", "LOW"] = "HIGH"
    station_id: str | None = Field(default=None, max_length=20,
                                   description="CSID when the job names none")
    blacklist_check: bool = Field(default=False, description="honour Robinson/ECOFAX lists")
    express: bool = False
    status_push: bool = Field(default=True, description="ask for pushes (needs [web])")
    delete_reports: bool = Field(default=True, description="delete reports once handled")
    timeout_seconds: float = Field(default=60.0, gt=0)
    connect_timeout_seconds: float = Field(default=10.0, gt=0)
    connect_retries: int = Field(default=2, ge=0)
    max_connections: int = Field(default=10, ge=1)
    send_concurrency: int = Field(default=4, ge=1)

    @field_validator("data_centres", mode="before")
    @classmethod
    def _named(cls, value: Any) -> Any:
        if isinstance(value, list | tuple):  # a plain list of URLs: name them DC1, DC2, ...
            return {f"DC{number}": url for number, url in enumerate(value, 1)}
        return value

    @field_validator("send_url")
    @classmethod
    def _url(cls, value: str) -> str:
        return _http_url(value)

    @field_validator("data_centres")
    @classmethod
    def _urls(cls, value: dict[str, str]) -> dict[str, str]:
        return {name: _http_url(url) for name, url in value.items()}


def _http_url(value: str) -> str:
    if not value.startswith(("https://", "http://")):
        raise ValueError(f"not an http(s) URL: {value!r}")
    return value.rstrip("/")
