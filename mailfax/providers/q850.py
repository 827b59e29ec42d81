"""ITU-T Q.850 cause values: why a call ended, in words a person can read.

Providers that report the cause of the last fax call (Faxnummer.de's ``StatusQ850Cause``) use
this table to turn the number into a mailfax reason: the reason code is the shared one from
:mod:`mailfax.reasons` (so status mails, statistics and retry rules treat it like any other
provider's "busy"), the text names what the network said about this call.
"""

from __future__ import annotations

from dataclasses import dataclass

from mailfax import reasons
from mailfax.model import Reason


@dataclass(frozen=True)
class Cause:
    value: int
    name: str  # the Q.850 name, for logs and details
    code: str  # the mailfax reason code it corresponds to
    english: str
    german: str


_CAUSES = (
    Cause(1, "unallocated number", "invalid_number",
          "The fax number does not exist.",
          "Die Faxnummer ist nicht vergeben."),
    Cause(3, "no route to destination", "invalid_number",
          "The telephone network has no route to this number.",
          "Das Telefonnetz kennt keinen Weg zu dieser Rufnummer."),
    Cause(16, "normal call clearing", "transmission_failed",
          "The call was connected and hung up normally, but the fax was not transmitted "
          "completely.",
          "Die Verbindung kam zustande und wurde normal beendet, aber das Fax wurde nicht "
          "vollständig übertragen."),
    Cause(17, "user busy", "busy",
          "The line was busy.",
          "Die Gegenstelle war besetzt."),
    Cause(18, "no user responding", "no_answer",
          "The called line did not respond.",
          "Der angerufene Anschluss hat nicht reagiert."),
    Cause(19, "no answer from user (user alerted)", "no_answer",
          "The fax number rang but nobody answered.",
          "Die Faxnummer hat geklingelt, aber niemand hat abgenommen."),
    Cause(20, "subscriber absent", "no_answer",
          "The called subscriber is not reachable.",
          "Der angerufene Teilnehmer ist nicht erreichbar."),
    Cause(21, "call rejected", "call_failed",
          "The called line rejected the call.",
          "Der angerufene Anschluss hat den Anruf abgewiesen."),
    Cause(22, "number changed", "invalid_number",
          "The fax number has changed.",
          "Die Faxnummer hat sich geändert."),
    Cause(27, "destination out of order", "no_service",
          "The called line is out of order.",
          "Der angerufene Anschluss ist gestört."),
    Cause(28, "invalid number format", "invalid_number",
          "The fax number is incomplete or has a wrong format.",
          "Die Faxnummer ist unvollständig oder falsch formatiert."),
    Cause(31, "normal, unspecified", "call_failed",
          "The call ended without a fax being transmitted; the network gave no reason.",
          "Der Anruf endete, ohne dass ein Fax übertragen wurde; das Netz nannte keinen Grund."),
    Cause(34, "no circuit/channel available", "call_failed",
          "The line could not be reached: no channel was free in the network.",
          "Der Anschluss war nicht erreichbar: im Netz war keine Leitung frei."),
    Cause(38, "network out of order", "call_failed",
          "The telephone network was out of order.",
          "Das Telefonnetz war gestört."),
    Cause(41, "temporary failure", "call_failed",
          "The telephone network had a temporary failure.",
          "Im Telefonnetz trat eine vorübergehende Störung auf."),
    Cause(42, "switching equipment congestion", "call_failed",
          "The telephone network was overloaded.",
          "Das Telefonnetz war überlastet."),
    Cause(44, "requested circuit/channel not available", "call_failed",
          "The telephone network could not provide a line for the call.",
          "Das Telefonnetz konnte keine Leitung für den Anruf bereitstellen."),
    Cause(88, "incompatible destination", "not_a_fax",
          "The called number is not a fax machine.",
          "Unter der angerufenen Nummer antwortet kein Faxgerät."),
    Cause(102, "recovery on timer expiry", "call_failed",
          "The call timed out in the telephone network.",
          "Der Anruf wurde im Telefonnetz wegen Zeitüberschreitung abgebrochen."),
    Cause(127, "interworking, unspecified", "call_failed",
          "The call failed between two telephone networks; no reason was given.",
          "Der Anruf scheiterte zwischen zwei Telefonnetzen; ein Grund wurde nicht genannt."),
)

CAUSES: dict[int, Cause] = {cause.value: cause for cause in _CAUSES}


def cause(value: int) -> Cause | None:
    return CAUSES.get(value)


def reason_for(value: int | None, detail: str = "") -> Reason:
    """The reason for a failed call that ended with Q.850 cause ``value`` (None: not given)."""
    if value is None:
        return reasons.reason("unknown", detail or "no Q.850 cause given")
    found = CAUSES.get(value)
    label = f"Q.850 cause {value}" + (f" ({found.name})" if found else "")
    full_detail = f"{label}; {detail}" if detail else label
    if found is None:
        return reasons.reason("unknown", full_detail)
    return reasons.custom(found.code, found.english, found.german, full_detail)
