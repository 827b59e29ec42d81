"""The bundled provider emulator: a fake fax network behind the provider interface.

No account needed. It "transmits" each job after a configurable delay, reports pages and a
duration, and fails numbers by configurable prefix rules (busy, no answer, ...), or reports
them delivered with fewer pages sent (``partial``), so every path of mailfax can be tried
without a fax provider.

Its network is the store (table ``emulator_transmissions``), durable like a real provider: a
job it accepted survives a crash of mailfax, and a resend with the same reference is answered
as a duplicate instead of being faxed twice. Every instance that shares a store (several
``mailfax serve`` on one PostgreSQL, each with its own data dir) shares that one network, as
they would share a real provider account, so whichever instance runs the status tracker sees
every job. A provider made without a store (benchmarks) keeps a ledger file in its data dir.

It also receives faxes: every TIFF put into its inbox folder (``<data_dir>/emulator/inbox`` by
default) is handed to mailfax as a received fax, then deleted once its mail went out. A JSON
file of the same name beside it may say who sent it to which number (``{"to": …, "from": …,
"remote_id": …}``); ``mailfax emulate receive`` writes both.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

from mailfax import reasons
from mailfax.emulators.fax_image import TIFF_SUFFIXES, tiff_pages
from mailfax.emulators.rules import longest_prefix
from mailfax.model import JobState
from mailfax.providers.account_settings import EmulatorSettings, FailRule, Outcome
from mailfax.providers.base import (
    BaseProvider,
    EmulatedTransmission,
    EmulatorNetwork,
    InboundFax,
    ProviderContext,
    ProviderError,
    ProviderRef,
    ResendHandling,
    SendReceipt,
    SendRequest,
    StatusReport,
    new_emulator_job_id,
)

Settings = EmulatorSettings  # the module's account settings (see mailfax.providers)

Transmission = EmulatedTransmission


def outcome_for(number: str, rules: Sequence[FailRule]) -> Outcome | None:
    rule = longest_prefix(number, rules, lambda rule: rule.prefix)
    return None if rule is None else rule.result


def call_span(transmission: Transmission, settings: Settings) -> tuple[float, float]:
    """When the emulated network dials this fax: (start, end) in Unix time. It takes the
    line from its submission until its result (``delay_seconds``), as :func:`report_for`
    reports it; so two spans of one number that overlap are two calls at once."""
    return transmission.submitted_at, transmission.submitted_at + settings.delay_seconds


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
        cut = longest_prefix(transmission.number, settings.partial, lambda rule: rule.prefix)
        pages = transmission.pages if cut is None else min(cut.pages_sent, transmission.pages)
        return StatusReport(
            state=JobState.DELIVERED,
            pages=pages,
            duration_seconds=pages * settings.seconds_per_page + 1,
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


# -- received faxes: a folder of TIFFs ------------------------------------------------------------

SETTLE_SECONDS = 0.5  # a file younger than this may still be being copied in
OWN_ID = re.compile(r"[0-9]{16,}")  # the ids this emulator gives: microseconds since 1970


def inbox_folder(data_dir: Path, settings: Settings) -> Path:
    return Path(settings.inbox_folder) if settings.inbox_folder else (
        data_dir / "emulator" / "inbox")


def next_received(folder: Path, settings: Settings, now: float) -> InboundFax | None:
    """The oldest settled TIFF in ``folder`` as a received fax (blocking: run in a thread)."""
    try:
        candidates = [path for path in folder.iterdir()
                      if path.suffix.lower() in TIFF_SUFFIXES and not path.name.startswith(".")]
    except FileNotFoundError:
        return None
    dated = []
    for path in candidates:
        with contextlib.suppress(FileNotFoundError):
            modified = path.stat().st_mtime
            if now - modified >= SETTLE_SECONDS:
                dated.append((modified, path.name, path))
    if not dated:
        return None
    modified, _, path = min(dated)
    if not OWN_ID.fullmatch(path.stem):  # a file a person put there: give it an id, as a
        path = _claim(path)  # provider does (so two faxes named scan.tif are two faxes)
    image = path.read_bytes()
    about = _sidecar(path.with_suffix(".json"))
    return InboundFax(
        fax_id=path.stem, called_number=str(about.get("to") or settings.fax_number),
        received_at=datetime.fromtimestamp(modified, UTC),
        originator=str(about.get("from") or ""), remote_id=str(about.get("remote_id") or ""),
        pages=tiff_pages(image), image=image)


def _claim(path: Path) -> Path:
    fax_id = _new_fax_id()
    sidecar = path.with_suffix(".json")
    if sidecar.exists():
        os.replace(sidecar, path.with_name(f"{fax_id}.json"))
    claimed = path.with_name(f"{fax_id}.tif")
    os.replace(path, claimed)
    return claimed


def _new_fax_id() -> str:
    return str(time.time_ns() // 1000)


def _sidecar(path: Path) -> dict[str, object]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def delete_received(folder: Path, fax_id: str) -> None:
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        if path.stem == fax_id and path.suffix.lower() in (*TIFF_SUFFIXES, ".json"):
            path.unlink(missing_ok=True)


def drop_received(folder: Path, image: bytes, to: str, sender: str = "",
                  remote_id: str = "") -> str:
    """Put a fax into the inbox folder as a running emulator picks it up; returns its id.

    The JSON goes first and the TIFF appears by rename, so a poller never sees half a fax."""
    folder.mkdir(parents=True, exist_ok=True)
    fax_id = _new_fax_id()
    (folder / f"{fax_id}.json").write_text(json.dumps(
        {"to": to, "from": sender, "remote_id": remote_id}), encoding="utf-8")
    partial = folder / f".{fax_id}.tif.part"
    partial.write_bytes(image)
    os.replace(partial, folder / f"{fax_id}.tif")
    return fax_id


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
        self.supports_inbound = settings.inbound
        self.inbox_folder = inbox_folder(context.data_dir, settings)
        if self.supports_inbound:  # there from the start, for a person to drop faxes into
            self.inbox_folder.mkdir(parents=True, exist_ok=True)
        self.inbound_poll_seconds = settings.inbound_poll_seconds

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

    async def fetch_inbound(self) -> InboundFax | None:
        return await asyncio.to_thread(next_received, self.inbox_folder, self.settings,
                                       time.time())

    async def delete_inbound(self, fax_id: str) -> None:
        await asyncio.to_thread(delete_received, self.inbox_folder, fax_id)

    async def close(self) -> None:
        if self._own_file is not None:
            await asyncio.to_thread(self._own_file.close)


def create(context: ProviderContext, settings: Settings) -> EmulatorProvider:
    return EmulatorProvider(context, settings)
