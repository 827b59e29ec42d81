"""Job store backends behind one interface (:mod:`mailfax.store.base`).

``store.url`` picks the backend: ``sqlite:///path/to/store.sqlite3`` (one instance, embedded)
or ``postgresql://user@host/db`` (also ``postgres://``; any number of instances share it).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from pathlib import Path

from mailfax.store.base import Store

POSTGRES_SCHEMES = ("postgresql://", "postgres://")
log = logging.getLogger(__name__)


def open_store(url: str) -> Store:
    """The store for a ``store.url`` (not yet opened: call ``await store.open()``)."""
    if url.startswith("sqlite:///"):
        from mailfax.store.sqlite import SqliteStore

        return SqliteStore(Path(url.removeprefix("sqlite:///")))
    if url.startswith(POSTGRES_SCHEMES):
        from mailfax.store.postgres import PostgresStore

        return PostgresStore(url)
    raise ValueError(f"unsupported store url scheme: {url.split(':', 1)[0]}")


async def migrate(url: str) -> list[int]:
    """Bring the store's schema up to date; the versions applied, in order ([] if current).

    Raises ``RuntimeError`` when the database's schema is newer than this mailfax.
    """
    if url.startswith("sqlite:///"):
        from mailfax.store.sqlite import SCHEMA_VERSION, enable_incremental_vacuum

        path = Path(url.removeprefix("sqlite:///"))
        before = await asyncio.to_thread(_sqlite_schema_version, path)
        store = open_store(url)
        await store.open()  # migrates (and refuses a newer schema)
        await store.close()
        if await asyncio.to_thread(enable_incremental_vacuum, path):
            log.info("%s: switched to incremental vacuum (a one-off VACUUM), so purges "
                     "shrink the file", path)
        return list(range(before + 1, SCHEMA_VERSION + 1))
    if url.startswith(POSTGRES_SCHEMES):
        from mailfax.store import postgres

        return await postgres.migrate(url)
    raise ValueError(f"unsupported store url scheme: {url.split(':', 1)[0]}")


def _sqlite_schema_version(path: Path) -> int:
    if not path.exists():
        return 0
    conn = sqlite3.connect(path)
    try:
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    except sqlite3.OperationalError:  # no meta table yet: an empty database
        return 0
    finally:
        conn.close()
    return int(row[0]) if row else 0
