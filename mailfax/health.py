"""``mailfax health``: is the running service answering? For container health checks and
monitoring that has no ``[web]`` listener to ask.

Two checks, each with a deadline: the first SMTP (else LMTP, else implicit-TLS) listener of
the config answers with a ``220`` banner, and the store opens and accepts a write
transaction. The result is one line; healthy only when both pass.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass

from mailfax.config import ListenAddress, Settings
from mailfax.store import open_store
from mailfax.support.failing import describe

HEALTH_TIMEOUT_SECONDS = 4.0

# What a wildcard listener is reached at from the same host (or container).
LOCAL_FOR_WILDCARD = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


@dataclass(frozen=True)
class Health:
    ok: bool
    line: str


@dataclass(frozen=True)
class Probe:
    """One listener to knock on: where, and whether it speaks TLS from the first byte."""

    host: str
    port: int
    tls: bool
    kind: str


def listener_to_probe(settings: Settings) -> Probe | None:
    smtp = settings.smtp
    for listens, tls, kind in ((smtp.listen, False, "smtp"), (smtp.lmtp_listen, False, "lmtp"),
                               (smtp.implicit_tls_listen, True, "smtps")):
        if listens:
            address = ListenAddress(listens[0])
            host = LOCAL_FOR_WILDCARD.get(address.host, address.host)
            return Probe(host, address.port, tls, kind)
    return None


async def check_health(settings: Settings, seconds: float = HEALTH_TIMEOUT_SECONDS) -> Health:
    """Both checks run at once; the line names every failure."""
    probe = listener_to_probe(settings)
    banner, store = await asyncio.gather(
        _banner_problem(probe, seconds) if probe else _no_listener(),
        _store_problem(settings.store_url, seconds))
    problems = [problem for problem in (banner, store) if problem]
    if problems:
        return Health(False, "unhealthy: " + "; ".join(problems))
    where = f"{probe.kind} {probe.host}:{probe.port}" if probe else "no listener"
    return Health(True, f"healthy: {where} answers 220, store writable")


async def _no_listener() -> str | None:
    return None  # a config without SMTP listeners (IMAP intake only) has no banner to check


async def _banner_problem(probe: Probe, seconds: float) -> str | None:
    where = f"{probe.kind} {probe.host}:{probe.port}"
    context = None
    if probe.tls:  # the own listener on loopback: its certificate's name is not the point
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    try:
        async with asyncio.timeout(seconds):
            reader, writer = await asyncio.open_connection(probe.host, probe.port, ssl=context)
            try:
                banner = await reader.readline()
                if banner.startswith(b"220"):
                    writer.write(b"QUIT\r\n")
                    await writer.drain()
            finally:
                writer.close()
                await writer.wait_closed()
    except TimeoutError:
        return f"{where}: no banner within {seconds:g} s"
    except (OSError, ssl.SSLError) as error:
        return f"{where}: {error.strerror or error}"
    if not banner.startswith(b"220"):
        return f"{where}: banner {banner.decode('ascii', 'replace').strip()!r}, not 220"
    return None


async def _store_problem(url: str, seconds: float) -> str | None:
    """Open the store (as every command does) and commit the small write ``/readyz`` commits
    (:meth:`Store.probe_write`): a read-only or full store still answers reads."""
    store = open_store(url)
    try:
        async with asyncio.timeout(seconds):
            await store.open()
            try:
                await store.probe_write()
            finally:
                await store.close()
    except TimeoutError:
        return f"store: no answer within {seconds:g} s"
    except Exception as error:  # whatever the driver raises, the check reports it in one line
        return f"store: {describe(error)}"
    return None
