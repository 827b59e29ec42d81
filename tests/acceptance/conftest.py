"""The acceptance suite's server: one ``mailfax serve`` per test module, in an empty folder
with no config file (see user.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.acceptance.user import MAILFAX, Mailfax


@pytest.fixture(scope="module")
def mailfax(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mailfax]:
    if not MAILFAX.exists():
        pytest.skip(f"no installed mailfax console script at {MAILFAX} (pip install -e .)")
    server = Mailfax(tmp_path_factory.mktemp("user-folder"))
    assert not any(server.folder.iterdir())
    server.start()
    try:
        yield server
    finally:
        server.stop()
