"""Prometheus metrics: what mailfax counts, and one registry per application.

Counters and histograms are updated where things happen; gauges that the store knows (jobs by
state, outbox depth, received faxes waiting) are read from it when ``/metrics`` is scraped, so
several instances report the same truth.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from mailfax.inbound.screening import SCREENED_STATES
from mailfax.model import JobState
from mailfax.providers.base import (
    AccountCheck,
    InboundFax,
    Provider,
    ProviderRef,
    SendRequest,
    SendResult,
    StatusReport,
)
from mailfax.store.base import Store

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    """The registry and its metrics are made when the first of them is used, all at once
    (:meth:`build`): importing prometheus_client and its platform collector took ~20 ms of
    ``serve``'s start before the SMTP port accepted. ``serve`` builds them in a worker thread
    once the port accepts."""

    registry: CollectorRegistry
    mails_accepted: Counter
    mails_refused: Counter
    provider_seconds: Histogram
    jobs: Gauge
    outbox_depth: Gauge
    account_paused: Gauge
    account_pauses: Counter
    jobs_expired: Counter
    inbound_pending: Gauge
    inbound_screened: Gauge

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._built = False

    def __getattr__(self, name: str) -> Any:
        """Only for a metric not made yet: make them all."""
        if name.startswith("_"):
            raise AttributeError(name)
        self.build()
        try:
            return self.__dict__[name]
        except KeyError:
            raise AttributeError(name) from None

    def build(self) -> None:
        """Make the registry and every metric, once (a second thread waits for the first)."""
        with self._lock:
            if not self._built:
                self._build()
                self._built = True

    def _build(self) -> None:
        from prometheus_client import (
            CollectorRegistry,
            Counter,
            Gauge,
            GCCollector,
            Histogram,
            PlatformCollector,
            ProcessCollector,
        )

        self.registry = CollectorRegistry()
        # process_* (resident memory, CPU seconds, open and max fds, start time; read from
        # /proc/self), python_gc_* and python_info, as every Python exporter has them.
        ProcessCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.mails_accepted = Counter(
            "mailfax_mails_accepted", "Mails accepted as fax jobs", registry=self.registry)
        self.mails_refused = Counter(
            "mailfax_mails_refused", "Mails or recipients refused, by SMTP status",
            ["status"], registry=self.registry)
        self.provider_seconds = Histogram(
            "mailfax_provider_call_seconds", "Provider calls, by provider and operation",
            ["provider", "operation", "outcome"], buckets=LATENCY_BUCKETS,
            registry=self.registry)
        self.jobs = Gauge("mailfax_jobs", "Jobs by state", ["state"], registry=self.registry)
        self.outbox_depth = Gauge("mailfax_outbox_depth", "Mails waiting in the outbox",
                                  registry=self.registry)
        self.account_paused = Gauge(
            "mailfax_account_paused", "1 while an account is paused (refused as a whole)",
            ["account"], registry=self.registry)
        self.account_pauses = Counter(
            "mailfax_account_pauses", "Accounts paused, by account and reason code",
            ["account", "reason"], registry=self.registry)
        self.jobs_expired = Counter(
            "mailfax_jobs_expired",
            "Jobs failed for lack of time: retry lifetime over (lifetime) or no final status "
            "in time (tracking_deadline)", ["account", "why"], registry=self.registry)
        self.inbound_pending = Gauge(
            "mailfax_inbound_pending", "Received faxes not yet deleted at the provider",
            registry=self.registry)
        self.inbound_screened = Gauge(
            "mailfax_inbound_screened", "Received faxes deleted unmailed: blocked (junk) or "
            "duplicate, as the store holds them", ["reason"], registry=self.registry)

    @asynccontextmanager
    async def provider_call(self, provider: str, operation: str) -> AsyncIterator[None]:
        started = time.perf_counter()
        outcome = "error"
        try:
            yield
            outcome = "ok"
        finally:
            self.provider_seconds.labels(provider, operation, outcome).observe(
                time.perf_counter() - started)

    async def render(self, store: Store) -> bytes:
        counts = await store.counts()
        # Every state, also those no job is in any more: a gauge left at its last value
        # (``{state="sending"} 1`` after the last send ended) would fire a "stuck" alert forever.
        for state in JobState:
            self.jobs.labels(state.value).set(counts["jobs"].get(state.value, 0))
        self.outbox_depth.set(await store.outbox_depth())
        self.inbound_pending.set(sum(number for state, number in counts["inbound"].items()
                                     if state not in ("deleted", *SCREENED_STATES)))
        for screened in SCREENED_STATES:
            self.inbound_screened.labels(screened).set(counts["inbound"].get(screened, 0))
        from prometheus_client import generate_latest

        # The process collector reads /proc/self (stat, status, every fd, limits): a thread.
        return bytes(await asyncio.to_thread(generate_latest, self.registry))


class InstrumentedProvider:
    """A provider whose calls are timed into ``mailfax_provider_call_seconds``."""

    def __init__(self, inner: Provider, metrics: Metrics):
        self.inner = inner
        self.metrics = metrics
        self.account = inner.account
        self.provider_name = inner.provider_name
        self.supports_inbound = inner.supports_inbound

    def __getattr__(self, name: str) -> Any:  # handle_push and other extras
        return getattr(self.inner, name)

    async def send_many(self, requests: Sequence[SendRequest]) -> list[SendResult]:
        async with self.metrics.provider_call(self.provider_name, "send"):
            return await self.inner.send_many(requests)

    async def status(self, refs: Sequence[ProviderRef]) -> dict[str, StatusReport]:
        async with self.metrics.provider_call(self.provider_name, "status"):
            return await self.inner.status(refs)

    async def cancel(self, ref: ProviderRef) -> bool:
        async with self.metrics.provider_call(self.provider_name, "cancel"):
            return await self.inner.cancel(ref)

    async def acknowledge(self, refs: Sequence[ProviderRef]) -> None:
        async with self.metrics.provider_call(self.provider_name, "acknowledge"):
            await self.inner.acknowledge(refs)

    async def fetch_inbound(self) -> InboundFax | None:
        async with self.metrics.provider_call(self.provider_name, "fetch_inbound"):
            return await self.inner.fetch_inbound()

    async def delete_inbound(self, fax_id: str) -> None:
        async with self.metrics.provider_call(self.provider_name, "delete_inbound"):
            await self.inner.delete_inbound(fax_id)

    async def check_account(self) -> AccountCheck:
        async with self.metrics.provider_call(self.provider_name, "check_account"):
            return await self.inner.check_account()

    def warnings(self) -> list[str]:
        return self.inner.warnings()

    async def close(self) -> None:
        await self.inner.close()
