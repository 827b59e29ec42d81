"""The bundled provider emulator: a fake fax network behind the provider interface.

No account needed. It "transmits" each job after a configurable delay, reports pages and a
duration, and fails numbers by configurable prefix rules (busy, no answer, ...), so every path
of mailfax can be tried without a fax provider.

Its network is the store (table ``emulator_transmissions``), durable like a real provider: a
job it accepted survives a crash of mailfax, and a resend with the same reference is answered
as a duplicate instead of being faxed twice. Every instance that shares a store (several
``mailfax serve`` on one PostgreSQL, each with its own data dir) shares that one network, as
they would share a real provider account, so whichever instance runs the status tracker sees
every job. A provider made without a store (benchmarks) keeps a ledger file in its data dir.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from mailfax import reasons
from mailfax.emulators.rules import longest_prefix
from mailfax.model import JobState
from mailfax.providers.base import (
    BaseProvider,
    EmulatedTransmission,
    EmulatorNetwork,
    ProviderContext,
    ProviderError,
    ProviderRef,
    ResendHandling,
    SendReceipt,
    SendRequest,
    StatusReport,
    new_emulator_job_id,
)

Outcome = Literal[
    "busy", "no_answer", "not_a_fax", "no_service", "invalid_number", "transmission_failed",
    "blacklisted", "provider_unavailable",
]


class FailRule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    prefix: str = Field(pattern=r"^\+[0-9]+$", description="E.164 prefix, e.g. +4930999")
    result: Outcome


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
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


Transmission = EmulatedTransmission


def outcome_for(number: str, rules: Sequence[FailRule]) -> Outcome | None:
    rule = longest_prefix(number, rules, lambda rule: rule.prefix)
    return None if rule is None else rule.result


def report_for(transmission: Transmission, settings: Settings, now: float) -> StatusReport:
    """The state of a transmission at ``now``: pure, so a restart sees the same history."""
    elapsed = now - transmission.submitted_at
    if transmission.cancelled:
        return StatusReport(state=JobState.CANCELLED, reason=reasons.reason("cancelled"))
    if elapsed < settings.delay_seconds / 2:
        return StatusReport(state=JobState.SUBMITTED)
    if elapsed < settings.delay_seconds:
        return StatusReport(state=JobState.SENDING)
    finished = datetime.fromtimestamp(transmission.submitted_at + settings.delay_seconds, UTC)
    outcome = outcome_for(transmission.number, settings.fail)
    if outcome is None:
        return StatusReport(
            state=JobState.DELIVERED,
            pages=transmission.pages,
            duration_seconds=transmission.pages * settings.seconds_per_page + 1,
            remote_id="EMULATOR",
            finished_at=finished,
        )
    return StatusReport(
        state=JobState.FAILED,
        pages=0,
        duration_seconds=0.0,
        reason=reasons.reason(outcome, detail=f"emulator rule: {outcome}"),
        finished_at=finished,
    )


class FileNetwork(EmulatorNetwork):
    """The network as a SQLite file of its own, for an emulator made without a store.

    The blocking calls run through ``asyncio.to_thread``; one file is one account's network.
    """

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()  # one connection, used from the default executor's threads
        self._conn = self._open()
        with self._connect() as conn:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS transmissions (provider_job_id TEXT PRIMARY KEY,"
                " reference TEXT UNIQUE NOT NULL, number TEXT NOT NULL, pages INTEGER NOT NULL,"
                " submitted_at REAL NOT NULL, send_calls INTEGER NOT NULL DEFAULT 1,"
                " cancelled INTEGER NOT NULL DEFAULT 0)"
            )

    def _open(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=30, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.row_factory = sqlite3.Row
        return conn

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """The ledger's connection inside one transaction (committed, or rolled back)."""
        with self._lock, self._conn:
            yield self._conn

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    async def emulator_submit(self, account: str, reference: str, number: str,
                              pages: int) -> tuple[str, bool]:
        return await asyncio.to_thread(self._submit, reference, number, pages)

    async def emulator_transmissions(self, account: str, provider_job_ids: Sequence[str]
                                     ) -> dict[str, Transmission]:
        return await asyncio.to_thread(self._get, provider_job_ids)

    async def emulator_cancel(self, account: str, provider_job_id: str) -> None:
        await asyncio.to_thread(self._cancel, provider_job_id)

    def _submit(self, reference: str, number: str, pages: int) -> tuple[str, bool]:
        with self._connect() as conn:
            row = conn.execute(
                "SELECT provider_job_id FROM transmissions WHERE reference = ?", (reference,)
            ).fetchone()
            if row is not None:
                conn.execute(
                    "UPDATE transmissions SET send_calls = send_calls + 1 WHERE reference = ?",
                    (reference,))
                return str(row[0]), True
            provider_job_id = new_emulator_job_id()
            conn.execute(
                "INSERT INTO transmissions (provider_job_id, reference, number, pages,"
                " submitted_at) VALUES (?,?,?,?,?)",
                (provider_job_id, reference, number, pages, time.time()))
            return provider_job_id, False

    def _get(self, provider_job_ids: Sequence[str]) -> dict[str, Transmission]:
        with self._connect() as conn:
            rows = conn.execute(
                f"SELECT * FROM transmissions WHERE provider_job_id IN"
                f" ({','.join('?' * len(provider_job_ids))})", list(provider_job_ids)
            ).fetchall()
        return {row["provider_job_id"]: _transmission(row) for row in rows}

    def _cancel(self, provider_job_id: str) -> None:
        with self._connect() as conn:
            conn.execute("UPDATE transmissions SET cancelled = 1 WHERE provider_job_id = ?",
                         (provider_job_id,))


def _transmission(row: sqlite3.Row) -> Transmission:
    return Transmission(
        provider_job_id=row["provider_job_id"], reference=row["reference"],
        number=row["number"], pages=row["pages"], submitted_at=row["submitted_at"],
        send_calls=row["send_calls"], cancelled=bool(row["cancelled"]),
    )


def ledger_path(data_dir: Path, account: str) -> Path:
    return data_dir / "emulator" / f"{account}.sqlite3"


class EmulatorProvider(BaseProvider):
    provider_name = "emulator"
    # Its ledger answers a resend with the same reference with the job already there.
    resend_handling = ResendHandling.RECOGNISED

    def __init__(self, context: ProviderContext, settings: Settings):
        super().__init__(context)
        self.settings = settings
        self._own_file: FileNetwork | None = None
        network = context.emulator_network
        if network is None:
            network = self._own_file = FileNetwork(ledger_path(context.data_dir, context.account))
        self.network: EmulatorNetwork = network

    async def send(self, request: SendRequest) -> SendReceipt:
        if outcome_for(request.number, self.settings.fail) == "provider_unavailable":
            raise ProviderError(reasons.reason("provider_unavailable", "emulator rule"),
                                transient=True)
        if self.settings.send_latency_seconds:
            await asyncio.sleep(self.settings.send_latency_seconds)
        provider_job_id, duplicate = await self.network.emulator_submit(
            self.account, request.job_id, request.number, request.pages)
        return SendReceipt(job_id=request.job_id, provider_job_id=provider_job_id,
                           pages=request.pages, duplicate=duplicate)

    async def status(self, refs: Sequence[ProviderRef]) -> dict[str, StatusReport]:
        if not refs:
            return {}
        found = await self.network.emulator_transmissions(
            self.account, [ref.provider_job_id for ref in refs])
        now = time.time()
        return {
            ref.job_id: report_for(found[ref.provider_job_id], self.settings, now)
            for ref in refs if ref.provider_job_id in found
        }

    async def cancel(self, ref: ProviderRef) -> bool:
        found = await self.network.emulator_transmissions(self.account, [ref.provider_job_id])
        transmission = found.get(ref.provider_job_id)
        if transmission is None:
            return False
        if report_for(transmission, self.settings, time.time()).state.is_final:
            return False
        await self.network.emulator_cancel(self.account, ref.provider_job_id)
        return True

    async def close(self) -> None:
        if self._own_file is not None:
            await asyncio.to_thread(self._own_file.close)


def create(context: ProviderContext, settings: Settings) -> EmulatorProvider:
    return EmulatorProvider(context, settings)
