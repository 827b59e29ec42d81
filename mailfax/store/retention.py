"""Retention: old data deleted per kind, as ``[retention]`` says (HylaFAX's faxcron/faxqclean).

The store kinds (documents, received fax images, outbox mails, DSNs, history, and the
service-wide quotas' totals per 300 s once no quota window reaches them) are purged by
the store in short batches (:meth:`~mailfax.store.base.Store.purge`), by one instance at a
time (:meth:`~mailfax.store.base.Store.retention_lock`), then the freed space is given back
(SQLite: incremental vacuum). The outbox Maildir is on this instance's disk, so each instance
purges its own. ``serve`` runs :class:`RetentionLoop`; ``mailfax purge`` runs :func:`purge`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from mailfax.config import RetentionSettings, Settings
from mailfax.store.base import PURGE_KINDS, QUOTA_TOTALS_DAYS, Purged, PurgeKind, Store

log = logging.getLogger(__name__)

RETRY_SECONDS = 3600.0  # after a failed purge (not every few seconds, as a crashed loop)
MAILDIR_TMP_SECONDS = 36 * 3600  # a tmp/ file this old is a crashed write (the Maildir rule)
UNITS = {"documents": "documents", "received_faxes": "faxes", "outbox": "mails",
         "dsn": "mails", "history": "jobs and fax records", "maildir": "files",
         "quota_totals": "5-minute counts"}
# Kinds kept for a fixed time, not a setting: the quotas' totals as long as a window needs.
FIXED_DAYS = {"quota_totals": QUOTA_TOTALS_DAYS}


@dataclass(frozen=True)
class PurgeReport:
    dry_run: bool
    purged: list[Purged] = field(default_factory=list)
    reclaimed: int = 0  # bytes given back to the file system
    store_busy: bool = False  # another instance was purging the store: skipped here

    def as_json(self, settings: RetentionSettings) -> dict[str, Any]:
        return {"dry_run": self.dry_run, "store_busy": self.store_busy,
                "reclaimed_bytes": self.reclaimed,
                "kinds": {p.kind: {"items": p.items, "bytes": p.bytes,
                                   "days": days_of(settings, p.kind)} for p in self.purged}}


def days_of(settings: RetentionSettings, kind: str) -> float:
    """How long data of ``kind`` is kept: the setting ``<kind>_days`` (or FIXED_DAYS)."""
    days: float = FIXED_DAYS.get(kind) or getattr(settings, f"{kind}_days")
    return days


def cutoff(settings: RetentionSettings, kind: str, now: datetime) -> datetime | None:
    """Data of ``kind`` older than this goes; None: kept forever (0 days)."""
    days = days_of(settings, kind)
    return now - timedelta(days=days) if days else None


async def purge_store(store: Store, settings: RetentionSettings, now: datetime,
                      dry_run: bool) -> tuple[list[Purged], int, bool]:
    """(purged per store kind, bytes given back, whether another instance held the lock)."""
    purged: list[Purged] = []
    async with store.retention_lock() as ours:
        if not ours:
            return purged, 0, True
        for kind in PURGE_KINDS:
            before = cutoff(settings, kind, now)
            purged.append(Purged(kind) if before is None else await store.purge(
                kind, before, dry_run=dry_run, batch_size=settings.batch_size))
        reclaimed = 0 if dry_run else await store.reclaim_space()
    return purged, reclaimed, False


def purge_maildir(folder: Path, before: float, now: float, dry_run: bool) -> Purged:
    """The files mailfax wrote (``mailfax-*``) into ``folder``'s new/ and cur/ last changed
    before ``before``, and its tmp/ files left by a crash (blocking: run in a thread)."""
    found = Purged("maildir")
    for sub, older_than in (("new", before), ("cur", before),
                            ("tmp", now - MAILDIR_TMP_SECONDS)):
        with contextlib.suppress(FileNotFoundError), os.scandir(folder / sub) as entries:
            for entry in entries:
                if not entry.name.startswith("mailfax-") or not entry.is_file():
                    continue
                with contextlib.suppress(FileNotFoundError):  # a reader moved it meanwhile
                    stat = entry.stat()
                    if stat.st_mtime >= older_than:
                        continue
                    if not dry_run:
                        os.unlink(entry.path)
                    found += Purged("maildir", 1, stat.st_size)
    return found


async def purge(settings: Settings, store: Store, *, dry_run: bool = False,
                now: datetime | None = None) -> PurgeReport:
    """One purge of every kind, as ``[retention]`` says."""
    now = now or datetime.now(UTC)
    retention = settings.retention
    purged, reclaimed, busy = await purge_store(store, retention, now, dry_run)
    before = cutoff(retention, "maildir", now)
    maildir = Purged("maildir") if before is None else await asyncio.to_thread(
        purge_maildir, settings.maildir_path, before.timestamp(), now.timestamp(), dry_run)
    return PurgeReport(dry_run, [*purged, maildir], reclaimed, busy)


def report_lines(report: PurgeReport, settings: RetentionSettings) -> list[str]:
    """What ``mailfax purge`` prints: per kind, how much went (or would go)."""
    verb = "would delete" if report.dry_run else "deleted"
    lines = [f"{'KIND':<15} {'ITEMS':>7} {'SIZE':>10}  KEPT"]
    for purged in report.purged:
        days = days_of(settings, purged.kind)
        kept = f"{days:g} days" if days else "forever"
        skipped = report.store_busy and purged.kind != "maildir"
        lines.append(f"{purged.kind:<15} {'-' if skipped else purged.items:>7} "
                     f"{'-' if skipped else human_size(purged.bytes):>10}  {kept}"
                     f"  ({UNITS[purged.kind]})")
    total = sum(p.items for p in report.purged)
    lines.append(f"-- {verb} {total} items, {human_size(sum(p.bytes for p in report.purged))}"
                 + (f"; {human_size(report.reclaimed)} given back to the file system"
                    if report.reclaimed else ""))
    if report.store_busy:
        lines.append("-- the store was not purged: another instance is purging it now")
    return lines


def human_size(size: int) -> str:
    if size < 1000:
        return f"{size} B"
    scaled = float(size)
    for unit in ("kB", "MB", "GB"):
        scaled /= 1000
        if scaled < 1000 or unit == "GB":
            break
    return f"{scaled:.1f} {unit}"


class RetentionLoop:
    """``serve``'s purge: one at start, then every ``interval_hours`` (``clock``: for
    tests)."""

    def __init__(self, settings: Settings, store: Store,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)):
        self.settings = settings
        self.store = store
        self.clock = clock
        self.round_done = asyncio.Event()  # set after each round

    async def run(self) -> None:
        interval = self.settings.retention.interval_hours * 3600
        while True:
            started = time.monotonic()
            try:
                report = await purge(self.settings, self.store, now=self.clock())
            except Exception as error:  # the store is down, the disk full: try again later
                log.warning("retention: purge failed (%s); trying again in %.0f s", error,
                            min(interval, RETRY_SECONDS))
                await asyncio.sleep(min(interval, RETRY_SECONDS))
                continue
            self.round_done.set()
            self._log(report, time.monotonic() - started)
            await asyncio.sleep(interval)

    def _log(self, report: PurgeReport, seconds: float) -> None:
        done = [f"{p.items} {p.kind} ({human_size(p.bytes)})" for p in report.purged if p.items]
        if done:
            log.info("retention: deleted %s in %.1f s%s", ", ".join(done), seconds,
                     f"; {human_size(report.reclaimed)} given back" if report.reclaimed else "")
        if report.store_busy:
            log.info("retention: another instance is purging the store")


__all__ = ["PURGE_KINDS", "PurgeKind", "PurgeReport", "RetentionLoop", "purge"]
