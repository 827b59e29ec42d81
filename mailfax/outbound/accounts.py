"""Accounts refused as a whole (login, credit, payment, contract): paused, probed, resumed.

When a provider refuses an account rather than a job (:attr:`ErrorKind.ACCOUNT`), sending the
other jobs of that account would only fail them too. The dispatcher holds them instead: the
account is paused (no job of it is claimed), the admin is alerted once per pause, and a
harmless authenticated call (``check_account``) is tried every ``account_probe_seconds``
until it passes; then the account resumes and its jobs go out. A restart starts unpaused, so
a fixed password in the config takes effect with the next start as well.

The pause lives in this process: with several instances each one finds out (and alerts) for
itself.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from mailfax.model import Reason
from mailfax.providers.base import ErrorKind, Provider, ProviderError

if TYPE_CHECKING:
    from mailfax.web.metrics import Metrics

log = logging.getLogger(__name__)


@dataclass
class Pause:
    account: str
    reason: Reason
    since: datetime
    next_probe: datetime
    probes: int = 0
    last_probe_error: str = ""

    def describe(self) -> str:
        text = self.reason.detail or self.reason.for_language("en")
        return (f"account {self.account} paused since {self.since:%Y-%m-%d %H:%M:%S} UTC: "
                f"{text}")


Alert = Callable[[Pause], Awaitable[None]]


class AccountHealth:
    """Which accounts are paused, and the probing that resumes them."""

    def __init__(self, probe_seconds: float, *, clock: Callable[[], datetime] | None = None,
                 on_paused: Alert | None = None,
                 on_resumed: Callable[[str], None] = lambda account: None,
                 metrics: Metrics | None = None):
        self.probe_seconds = probe_seconds
        self.clock = clock or (lambda: datetime.now(UTC))
        self.on_paused = on_paused
        self.on_resumed = on_resumed
        self.metrics = metrics
        self.pauses: dict[str, Pause] = {}

    def paused(self, account: str) -> bool:
        return account in self.pauses

    def any_paused(self) -> bool:
        return bool(self.pauses)

    def describe(self) -> list[str]:
        return [pause.describe() for pause in self.pauses.values()]

    async def hold(self, account: str, error: ProviderError) -> None:
        """Pause ``account`` for ``error`` (once: a paused account stays as it is)."""
        if account in self.pauses:
            return
        now = self.clock()
        pause = Pause(account, error.reason, now, now + timedelta(seconds=self.probe_seconds))
        self.pauses[account] = pause
        log.error("%s; its jobs are held, probing every %g s", pause.describe(),
                  self.probe_seconds)
        if self.metrics is not None:
            self.metrics.account_paused.labels(account).set(1)
            self.metrics.account_pauses.labels(account, error.reason.code).inc()
        if self.on_paused is not None:
            try:
                await self.on_paused(pause)
            except Exception:  # the pause holds even if the alert could not be queued
                log.exception("alert for the pause of account %s failed", account)

    def resume(self, account: str) -> bool:
        pause = self.pauses.pop(account, None)
        if pause is None:
            return False
        log.warning("account %s works again (after %d probes); its held jobs go out", account,
                    pause.probes)
        if self.metrics is not None:
            self.metrics.account_paused.labels(account).set(0)
        self.on_resumed(account)
        return True

    def count_expired(self, account: str, why: str) -> None:
        if self.metrics is not None:
            self.metrics.jobs_expired.labels(account, why).inc()

    async def probe_due(self, providers: Mapping[str, Provider]) -> list[str]:
        """Probe the paused accounts whose probe is due; the accounts that resumed."""
        resumed = []
        now = self.clock()
        for account, pause in list(self.pauses.items()):
            if pause.next_probe > now:
                continue
            pause.probes += 1
            pause.next_probe = now + timedelta(seconds=self.probe_seconds)
            provider = providers.get(account)
            if provider is None:
                continue
            try:
                await provider.check_account()
            except ProviderError as error:
                pause.last_probe_error = str(error)
                level = logging.INFO if error.kind == ErrorKind.ACCOUNT else logging.WARNING
                log.log(level, "account %s still paused: %s", account, error)
                continue
            except Exception as error:  # an unexpected answer: keep the pause, try again
                log.exception("probing account %s failed", account)
                pause.last_probe_error = type(error).__name__
                continue
            if self.resume(account):
                resumed.append(account)
        return resumed

    async def run(self, providers: Mapping[str, Provider]) -> None:
        """Probe paused accounts when due (checked every few seconds)."""
        while True:
            await self.probe_due(providers)
            await asyncio.sleep(min(self.probe_seconds, 5.0))
