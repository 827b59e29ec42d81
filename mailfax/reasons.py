"""Reasons a person can read, in English and German, for outcomes every provider shares.

Providers map their own codes onto these where one fits and build their own
:class:`~mailfax.model.Reason` (with both languages) where none does.
"""

from __future__ import annotations

import re

from mailfax.model import Reason

# The code of a job whose last send answer was lost (dispatch sets it, tracking settles it).
ANSWER_LOST = "answer_lost"
# The code of a busy line, whatever the provider called it (a number's busy backoff).
BUSY = "busy"

# The code of a fax the provider called delivered with fewer pages sent than were submitted.
PARTIAL = "partial"

_CATALOGUE: dict[str, tuple[str, str]] = {
    "delivered": ("The fax was delivered.", "Das Fax wurde zugestellt."),
    "busy": ("The line was busy every time we called.",
             "Die Gegenstelle war bei jedem Anruf besetzt."),
    "no_answer": ("The fax number rang but nobody answered.",
                  "Die Faxnummer hat geklingelt, aber niemand hat abgenommen."),
    "not_a_fax": ("A person, answering machine or modem answered instead of a fax machine.",
                  "Statt eines Faxgeräts hat ein Mensch, ein Anrufbeantworter oder ein Modem "
                  "abgenommen."),
    "no_service": ("The number is not in service.", "Die Rufnummer ist nicht in Betrieb."),
    "invalid_number": ("The fax number is wrong or incomplete.",
                       "Die Faxnummer ist falsch oder unvollständig."),
    "transmission_failed": ("The connection was made but the pages could not be transmitted "
                            "(paper jam, bad line).",
                            "Die Verbindung kam zustande, aber die Seiten konnten nicht "
                            "übertragen werden (Papierstau, schlechte Leitung)."),
    "call_failed": ("The call could not be connected.",
                    "Der Anruf konnte nicht aufgebaut werden."),
    "blacklisted": ("The number is on a do-not-fax list and was not called.",
                    "Die Nummer steht auf einer Sperrliste und wurde nicht angerufen."),
    "number_not_allowed": ("This destination may not be dialled from this account.",
                           "Dieses Ziel darf von diesem Konto nicht angewählt werden."),
    "document_rejected": ("The provider could not process the document.",
                          "Der Anbieter konnte das Dokument nicht verarbeiten."),
    "provider_auth": ("The fax service refused our account credentials; the administrator "
                      "has to fix the configuration.",
                      "Der Faxdienst hat die Zugangsdaten abgelehnt; die Konfiguration muss "
                      "vom Administrator korrigiert werden."),
    "provider_account": ("The fax account cannot send right now (credit, contract or lock); "
                         "the administrator has to look at it.",
                         "Das Faxkonto kann gerade nicht senden (Guthaben, Vertrag oder "
                         "Sperre); der Administrator muss es prüfen."),
    "provider_unavailable": ("The fax service could not be reached; we will try again.",
                             "Der Faxdienst war nicht erreichbar; wir versuchen es erneut."),
    "provider_error": ("The fax service reported an internal error.",
                       "Der Faxdienst hat einen internen Fehler gemeldet."),
    "too_many_attempts": ("We gave up after too many failed attempts.",
                          "Wir haben nach zu vielen Fehlversuchen aufgegeben."),
    "cancelled": ("The fax was cancelled.", "Das Fax wurde storniert."),
    "answer_lost": ("The fax service's answer to our send was lost; we are finding out "
                    "whether it has the fax.",
                    "Die Antwort des Faxdienstes auf unseren Auftrag ging verloren; wir klären, "
                    "ob er das Fax hat."),
    "unconfirmed": ("The fax may have been sent: the fax service's answer to our send was "
                    "lost, and it offers no way to find out. It was not sent again, to avoid "
                    "a second copy.",
                    "Das Fax wurde möglicherweise gesendet: Die Antwort des Faxdienstes auf "
                    "unseren Auftrag ging verloren, und er bietet keinen Weg, das zu klären. "
                    "Es wurde nicht noch einmal gesendet, um kein zweites Exemplar zu "
                    "verschicken."),
    "duplicate_refused": ("The fax service refused this fax as a duplicate of a job it "
                          "already has, and did not send it.",
                          "Der Faxdienst hat dieses Fax als Doppel eines Auftrags abgelehnt, "
                          "den er schon hat, und es nicht gesendet."),
    "unknown": ("The fax service reported a failure it did not explain.",
                "Der Faxdienst hat einen Fehler ohne Begründung gemeldet."),
}


def reason(code: str, detail: str = "") -> Reason:
    """The catalogue reason for ``code``, with the provider's raw wording as ``detail``."""
    english, german = _CATALOGUE.get(code, _CATALOGUE["unknown"])
    return Reason(code=code, text={"en": english, "de": german}, detail=detail)


def is_busy(reason: Reason | None) -> bool:
    """Whether a provider's result says the line was busy (every provider maps its busy
    codes onto :data:`BUSY`)."""
    return reason is not None and reason.code == BUSY


def custom(code: str, english: str, german: str, detail: str = "") -> Reason:
    return Reason(code=code, text={"en": english, "de": german}, detail=detail)


_PARTIAL_DETAIL = re.compile(r"^(\d+) of (\d+) pages sent")


def partial(sent: int, submitted: int, detail: str = "") -> Reason:
    """A fax sent only in part: ``sent`` of ``submitted`` pages (the detail starts with the
    two numbers, which :func:`partial_pages` reads back for the status mail)."""
    return custom(
        PARTIAL,
        f"Only {sent} of {submitted} pages were sent: the fax service reported the fax as "
        "sent, but the transmission ended before the last page. Please send the fax (or "
        "the missing pages) again.",
        f"Nur {sent} von {submitted} Seiten wurden gesendet: Der Faxdienst hat das Fax als "
        "gesendet gemeldet, aber die Übertragung endete vor der letzten Seite. Bitte senden "
        "Sie das Fax (oder die fehlenden Seiten) erneut.",
        detail=f"{sent} of {submitted} pages sent" + (f"; {detail}" if detail else ""))


def partial_pages(reason: Reason | None) -> tuple[int, int] | None:
    """(pages sent, pages submitted) of a :func:`partial` reason; None for any other."""
    if reason is None or reason.code != PARTIAL:
        return None
    match = _PARTIAL_DETAIL.match(reason.detail)
    return (int(match.group(1)), int(match.group(2))) if match else None
