"""Which per-mail options each provider does itself, which mailfax does, which cannot be done.

From the provider docs (``shared/provider-docs``, and for Retarus' send request the Swagger in
``shared/provider-specs``), never from what an emulator happens to accept:

* FAX.de ``SendJob``: ``SendDateTime`` "Scheduled date and time (UTC) to send the job";
  Options ``FAXHEADER=`` (max. 30 chars) and ``STATIONID=`` (max. 20 chars); no resolution.
* Faxnummer.de ``SendFax``: no send time (a job "is started within a short time"); one field
  ``sSender`` (max. 20 printable ASCII characters) that is the header line and, on some
  machines, the TSI: header and station id cannot differ; no resolution.
* Retarus ``FaxJobRequest``: ``meta.jobValid.start`` (date-time, with a zone),
  ``renderingOptions.header`` (its ``%`` starts a placeholder such as ``%C``),
  ``transportOptions.csid`` (≤ 20), ``renderingOptions.resolution`` ``HIGH`` | ``LOW``.
* The bundled emulator: takes number and pages only; a schedule is held by mailfax, the
  fax header, station id and resolution cannot be set.

Cover page, priority, status mails and the returned document are mailfax's own work for
every provider. A schedule the provider cannot take is held in mailfax's queue (the job's
first attempt is at ``send_at``). Pure: a table and three small functions.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from mailfax.support.text import to_ascii


class Handling(enum.StrEnum):
    PROVIDER = "provider"  # handed to the provider, which does it
    MAILFAX = "mailfax"  # mailfax does it itself
    IMPOSSIBLE = "impossible"  # refused at DATA


@dataclass(frozen=True)
class Capabilities:
    name: str  # as a sentence names the provider
    schedule: bool  # takes a send time
    header: bool  # has a fax header field
    header_max: int | None  # its length; None: no limit documented
    station_id_max: int | None  # length of its station id field; None: there is none
    resolution: bool
    ascii_only: bool = False  # its text fields take ASCII (umlauts are spelled out first)
    one_sender_field: bool = False  # header and station id are the same field
    # Characters its header and station id fields read as their own syntax, and what they
    # mean there (a sentence's end: "which <name> <meaning>").
    forbidden: str = ""
    forbidden_meaning: str = ""


CAPABILITIES: dict[str, Capabilities] = {
    "fax.de": Capabilities("FAX.de", schedule=True, header=True, header_max=30,
                           station_id_max=20, resolution=False, ascii_only=True,
                           forbidden=";=", forbidden_meaning="uses to separate its Options"),
    "faxnummer.de": Capabilities("Faxnummer.de", schedule=False, header=True, header_max=20,
                                 station_id_max=20, resolution=False, ascii_only=True,
                                 one_sender_field=True),
    "retarus": Capabilities("Retarus", schedule=True, header=True, header_max=None,
                            station_id_max=20, resolution=True, forbidden="%",
                            forbidden_meaning="reads as the start of a placeholder"),
    "emulator": Capabilities("the bundled emulator", schedule=False, header=False,
                             header_max=None, station_id_max=None, resolution=False),
}
MAILFAX_OPTIONS = frozenset({"cover", "priority", "notify", "return_document", "broadcast",
                             "warnings"})


def handling(provider: str, key: str) -> Handling:
    """What becomes of option ``key`` with ``provider`` (a ``PROVIDER_MODULES`` name)."""
    caps = CAPABILITIES.get(provider)
    if key in MAILFAX_OPTIONS or caps is None:
        return Handling.MAILFAX
    if key == "send_at":
        return Handling.PROVIDER if caps.schedule else Handling.MAILFAX
    if key == "header":
        return Handling.PROVIDER if caps.header else Handling.IMPOSSIBLE
    if key == "station_id":
        return Handling.PROVIDER if caps.station_id_max is not None else Handling.IMPOSSIBLE
    if key == "resolution":
        return Handling.PROVIDER if caps.resolution else Handling.IMPOSSIBLE
    return Handling.MAILFAX


def refusal(provider: str, options: Mapping[str, Any]) -> str | None:
    """Why ``provider`` cannot send a fax with these options (a sentence), or None."""
    caps = CAPABILITIES.get(provider)
    if caps is None:
        return None
    for key in ("header", "station_id", "resolution"):
        if key in options and handling(provider, key) == Handling.IMPOSSIBLE:
            return (f"The option {_OPTION_NAMES[key]} cannot be used: {caps.name} does not let "
                    f"the sender set {_WHAT[key]}.")
    for key, limit in (("header", caps.header_max), ("station_id", caps.station_id_max)):
        text = options.get(key)
        if isinstance(text, str) and limit is not None:
            length = len(to_ascii(text) if caps.ascii_only else text)
            if length > limit:
                return (f"The option {_OPTION_NAMES[key]} is {length} characters long; "
                        f"{caps.name} takes at most {limit}.")
    for key in ("header", "station_id"):
        text = options.get(key)
        found = [char for char in caps.forbidden if isinstance(text, str) and char in text]
        if found:
            return (f"The option {_OPTION_NAMES[key]} contains {found[0]!r}, which "
                    f"{caps.name} {caps.forbidden_meaning}; leave it out.")
    if caps.one_sender_field and "header" in options and "station_id" in options \
            and options["header"] != options["station_id"]:
        return (f"The options X-Fax-Header and X-Fax-Station-Id differ, but {caps.name} has one "
                f"field for both (sSender); give one of them.")
    return None


# A provider that keeps a schedule gets the job this long before its time, not at once: a job
# at the provider counts as a call to its number until it ends (one call per number), so a
# fax for next week handed over today would hold back every other fax to that number.
PROVIDER_SCHEDULE_LEAD = timedelta(minutes=10)


def held_until(provider: str, options: Mapping[str, Any]) -> datetime | None:
    """When mailfax itself first sends a scheduled job: its ``send_at`` if ``provider``
    cannot take a send time; else :data:`PROVIDER_SCHEDULE_LEAD` before it (the provider
    then starts it on time, with the time passed along); None for a job without one."""
    when = send_time(options)
    if when is None or handling(provider, "send_at") == Handling.MAILFAX:
        return when
    return when - PROVIDER_SCHEDULE_LEAD


def send_time(options: Mapping[str, Any]) -> datetime | None:
    """The job's ``send_at`` as an aware UTC datetime, or None."""
    value = options.get("send_at")
    if not isinstance(value, str) or not value:
        return None
    return datetime.fromisoformat(value).astimezone(UTC)


def future_send_time(options: Mapping[str, Any], now: datetime) -> datetime | None:
    """``send_at`` if it is still ahead of ``now``: what a provider with a schedule is given
    (a retry after the time has passed is sent at once)."""
    when = send_time(options)
    return when if when is not None and when > now else None


_OPTION_NAMES = {"header": "X-Fax-Header", "station_id": "X-Fax-Station-Id",
                 "resolution": "X-Fax-Resolution"}
_WHAT = {"header": "the fax header line", "station_id": "the station id",
         "resolution": "the resolution"}
