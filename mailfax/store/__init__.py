"""Job store backends behind one interface (:mod:`mailfax.store.base`)."""

from __future__ import annotations

from pathlib import Path

from mailfax.store.base import Store


def open_store(url: str) -> Store:
    """The store for a ``store.url``: ``sqlite:///path`` (PostgreSQL has its own backend)."""
    if url.startswith("sqlite:///"):
        from mailfax.store.sqlite import SqliteStore

        return SqliteStore(Path(url.removeprefix("sqlite:///")))
    raise ValueError(f"unsupported store url scheme: {url.split(':', 1)[0]}")
