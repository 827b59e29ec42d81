"""Retention as a user meets it: the installed ``mailfax`` in an empty folder (umask 022),
a fax sent over SMTP, then ``mailfax purge --dry-run`` and ``mailfax purge`` once the job is
made old (its rows backdated in mailfax-data/mailfax.sqlite3, as the months would), and what
``mailfax jobs`` and ``mailfax show`` say afterwards. The files mailfax wrote are private."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.acceptance.documents import mail, pdf
from tests.acceptance.user import MAILFAX, Mailfax, final_job, status_mail

DAY = 86400


@pytest.fixture
def mailfax(tmp_path: Path) -> Iterator[Mailfax]:
    if not MAILFAX.exists():
        pytest.skip(f"no installed mailfax console script at {MAILFAX} (pip install -e .)")
    server = Mailfax(tmp_path)
    previous = os.umask(0o022)  # the usual umask outside systemd: files 0644 unless chosen
    try:
        server.start()
        yield server
    finally:
        server.stop()
        os.umask(previous)


def purge(mailfax: Mailfax, *options: str) -> dict[str, Any]:
    report: dict[str, Any] = json.loads(mailfax.run("purge", "--json", *options).stdout)
    return report


def backdate(mailfax: Mailfax, days: int) -> None:
    """Make every mail and job ``days`` older, as if that much time had passed."""
    path = mailfax.folder / "mailfax-data" / "mailfax.sqlite3"
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute("UPDATE mails SET received_at = received_at - ?", (days * DAY,))
        db.execute("UPDATE jobs SET created = created - ?, updated = updated - ?",
                   (days * DAY, days * DAY))


async def test_purge_deletes_the_documents_of_an_old_fax_and_keeps_its_history(
        mailfax: Mailfax) -> None:
    job_id = await mailfax.queued(mail("030123456@fax.local", "Letter", attachments=(
        ("letter.pdf", "application/pdf", pdf()),)))
    assert final_job(mailfax, job_id)["state"] == "delivered"
    status_mail(mailfax, job_id)

    recent = purge(mailfax, "--dry-run")
    assert recent["dry_run"] and recent["kinds"]["documents"]["items"] == 0

    backdate(mailfax, 40)
    planned = purge(mailfax, "--dry-run")
    assert planned["kinds"]["documents"]["items"] == 1
    assert planned["kinds"]["documents"]["bytes"] > 500
    assert planned["kinds"]["history"]["items"] == 0  # a year, not 40 days

    done = purge(mailfax)
    assert done["kinds"]["documents"] == planned["kinds"]["documents"]
    assert purge(mailfax, "--dry-run")["kinds"]["documents"]["items"] == 0
    assert mailfax.job(job_id)["state"] == "delivered", "the job's history stays"
    assert job_id in mailfax.run("show", job_id).stdout

    shown = mailfax.run("purge").stdout
    assert "documents" in shown and "30 days" in shown and "-- deleted 0 items" in shown

    data = mailfax.folder / "mailfax-data"
    for name in ("mailfax.sqlite3", "mailfax.sqlite3-wal", "mailfax.sqlite3-shm"):
        if (data / name).exists():
            assert stat.S_IMODE((data / name).stat().st_mode) == 0o600, name
    mails = list((data / "outbox" / "new").iterdir())
    assert mails and all(stat.S_IMODE(path.stat().st_mode) == 0o640 for path in mails)
