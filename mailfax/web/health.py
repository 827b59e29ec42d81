"""What ``/readyz`` checks. Each check returns why mailfax cannot do its work now, or None.

Ready means: mail can be taken *and* kept (the store and the data dir take a write, not only a
read: a full disk or a read-only store still answer reads), the SMTP listeners accept, and no
account is paused (its faxes would only be held).
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from mailfax.store.base import Store
from mailfax.support.failing import describe

CHECK_TIMEOUT = 5.0


async def store_problem(store: Store) -> str | None:
    try:
        async with asyncio.timeout(CHECK_TIMEOUT):
            await store.probe_write()
    except Exception as error:  # any failure means: not ready
        return f"store cannot write: {describe(error)}"
    return None


async def folder_problem(name: str, folder: Path) -> str | None:
    try:
        async with asyncio.timeout(CHECK_TIMEOUT):
            await asyncio.to_thread(write_probe, folder)
    except (OSError, TimeoutError) as error:
        return f"{name} {folder} cannot be written: {describe(error)}"
    return None


def write_probe(folder: Path) -> None:
    """Write, sync and remove a small file in ``folder`` (raises OSError where it cannot):
    the outbox Maildir, converted faxes and the office profiles live there."""
    fd, name = tempfile.mkstemp(prefix=".ready-probe-", dir=folder)
    try:
        os.write(fd, b"ready?\n")
        os.fsync(fd)
    finally:
        os.close(fd)
        os.unlink(name)


def listener_problem(servers: Sequence[asyncio.Server]) -> str | None:
    if not servers:
        return "SMTP listeners are not up"
    down = [server for server in servers if not server.is_serving()]
    if down:
        return f"{len(down)} of {len(servers)} SMTP listeners are not serving"
    return None


def not_ready_text(problems: Sequence[str]) -> str:
    return "not ready\n" + "".join(f"problem: {line}\n" for line in problems)
