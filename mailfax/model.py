"""The domain model: job states, the one table of allowed transitions, reasons.

Everything here is pure data; the store persists it and the loops move it along.
"""

from __future__ import annotations

import enum
import secrets
from dataclasses import dataclass, field
from typing import Any


class JobState(enum.StrEnum):
    QUEUED = "queued"  # stored, waiting for the dispatcher
    SUBMITTED = "submitted"  # the provider accepted it
    SENDING = "sending"  # the provider says it is dialling / transmitting
    RETRYING = "retrying"  # a transient error; the dispatcher or provider tries again
    DELIVERED = "delivered"
    FAILED = "failed"
    CANCELLED = "cancelled"
    # The send may have reached a provider that cannot recognise a resend (a lost or
    # unreadable answer): not resent automatically; the provider is asked where it can be,
    # and the sender is told. ``mailfax retry`` is the deliberate resend.
    UNCONFIRMED = "unconfirmed"

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATES


FINAL_STATES = frozenset({JobState.DELIVERED, JobState.FAILED, JobState.CANCELLED})

_S = JobState
# The whole state machine. A change not listed here is a bug and is refused by the store.
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    _S.QUEUED: frozenset({_S.SUBMITTED, _S.SENDING, _S.RETRYING, _S.DELIVERED, _S.FAILED,
                          _S.CANCELLED, _S.UNCONFIRMED}),
    _S.RETRYING: frozenset({_S.QUEUED, _S.SUBMITTED, _S.SENDING, _S.RETRYING, _S.DELIVERED,
                            _S.FAILED, _S.CANCELLED, _S.UNCONFIRMED}),
    # Found at the provider after all (status call, report, push), or given up on.
    _S.UNCONFIRMED: frozenset({_S.SUBMITTED, _S.SENDING, _S.DELIVERED, _S.FAILED,
                               _S.CANCELLED}),
    _S.SUBMITTED: frozenset({_S.SENDING, _S.RETRYING, _S.DELIVERED, _S.FAILED, _S.CANCELLED}),
    _S.SENDING: frozenset({_S.SUBMITTED, _S.RETRYING, _S.DELIVERED, _S.FAILED, _S.CANCELLED}),
    _S.DELIVERED: frozenset(),
    _S.FAILED: frozenset(),
    _S.CANCELLED: frozenset(),
}

# States in which the job has been handed to the provider and is tracked by polling (an
# unconfirmed job only while it has a provider job id to look for it under).
TRACKED_STATES = frozenset({JobState.SUBMITTED, JobState.SENDING, JobState.UNCONFIRMED})

# ``mailfax retry``, the deliberate resend, starts a new attempt of a job in one of these
# states: it goes back to queued with its provider job id and attempt count cleared. Outside
# the table above on purpose: nothing but a person's command does this.
RETRYABLE_STATES = frozenset({JobState.FAILED, JobState.CANCELLED, JobState.UNCONFIRMED})


def can_transition(old: JobState, new: JobState) -> bool:
    return new in TRANSITIONS[old]


@dataclass(frozen=True)
class Reason:
    """Why a job is where it is, for people (``text`` by language) and machines (``code``).

    ``detail`` is the provider's raw wording, kept for the log and the job history; it is
    never the only thing a person reads.
    """

    code: str
    text: dict[str, str] = field(default_factory=dict)
    detail: str = ""

    def for_language(self, language: str) -> str:
        return self.text.get(language) or self.text.get("en") or self.code

    def to_json(self) -> dict[str, Any]:
        return {"code": self.code, "text": dict(self.text), "detail": self.detail}

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> Reason | None:
        if not data:
            return None
        return cls(code=str(data["code"]), text=dict(data.get("text") or {}),
                   detail=str(data.get("detail") or ""))


CROCKFORD = "0123456789abcdefghjkmnpqrstvwxyz"  # Crockford base32, lower case


def new_job_id() -> str:
    """A short, unguessable, URL- and filename-safe job id (also our provider reference)."""
    # 60 random bits from one call: each call to the system's random source is a syscall,
    # and on some virtual machines a slow one.
    bits = int.from_bytes(secrets.token_bytes(8), "big") >> 4
    return "".join(CROCKFORD[(bits >> shift) & 31] for shift in range(55, -1, -5))
