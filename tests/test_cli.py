"""The ``mailfax`` command as an admin uses it: options anywhere, quiet on a closed pipe, job
listings with tries, reason, filters and a summary, several ids to cancel, the inbox's mail
state, and ``emulate receive`` for the bundled emulator. The commands run as a subprocess in a
folder with no config (so ./mailfax-data), without ``mailfax serve``."""

from __future__ import annotations

import argparse
import contextlib
import json
import sqlite3
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from mailfax.cli import _since, build_parser, inbox_state, jobs_summary
from mailfax.emulators import faxde
from mailfax.emulators.fax_image import sample_fax, tiff_pages
from mailfax.model import JobState
from mailfax.providers import emulator
from mailfax.providers.base import ProviderContext
from mailfax.store.base import InboundRecord, Job
from tests.acceptance import documents

ENV_WITHOUT_CONFIG = {"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", "COLUMNS": "80"}


def mailfax(folder: Path, *args: str, stdin: str | None = None
            ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mailfax", *args], cwd=folder,
                          env=ENV_WITHOUT_CONFIG, capture_output=True, text=True, timeout=120,
                          input=stdin)


@pytest.fixture
def queued_jobs(tmp_path: Path) -> list[str]:
    """Three jobs queued with ``mailfax send`` (no serve runs, so they stay queued)."""
    (tmp_path / "letter.pdf").write_bytes(documents.pdf(2))
    result = mailfax(tmp_path, "send", "--to", "030123456", "--to", "089123456",
                     "--to", "040123456", "--from", "alice@example.org", "letter.pdf")
    assert result.returncode == 0, result.stderr
    ids = result.stdout.split()
    assert len(ids) == 3
    return ids


# -- the parser ---------------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [
    ["-c", "x.toml", "--log-json", "jobs"],
    ["jobs", "-c", "x.toml", "--log-json"],
    ["--log-json", "jobs", "--config", "x.toml"],
])
def test_global_options_go_before_or_after_the_command(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    assert (args.command, args.config, args.log_json) == ("jobs", Path("x.toml"), True)


def test_without_global_options_the_defaults_stay() -> None:
    args = build_parser().parse_args(["jobs"])
    assert (args.config, args.log_json, args.verbose) == (None, False, False)


def test_help_lists_every_command_with_one_line_and_the_exit_codes(tmp_path: Path) -> None:
    result = mailfax(tmp_path, "--help")
    assert result.returncode == 0
    parser = build_parser()
    subparsers = next(action for action in parser._actions
                      if isinstance(action, argparse._SubParsersAction))
    listed = [line.split(None, 1) for line in
              result.stdout.split("commands:")[1].split("exit codes:")[0].splitlines()
              if line.strip() and line.strip() != "COMMAND"]
    assert [words[0] for words in listed] == list(subparsers.choices)  # one line each
    assert all(len(words) == 2 for words in listed)  # each with its summary
    for code in ("0", "1", "2", "130", "141"):
        assert any(line.split()[:1] == [code] for line in
                   result.stdout.split("exit codes:")[1].splitlines()), code


def test_since_takes_durations_and_iso_dates() -> None:
    now = datetime.now(UTC)
    assert abs(_since("2h") - (now - timedelta(hours=2))) < timedelta(seconds=5)
    assert abs(_since("1d") - (now - timedelta(days=1))) < timedelta(seconds=5)
    assert _since("2026-11-30T08:00:00+00:00") == datetime(2026, 11, 30, 8, tzinfo=UTC)
    assert _since("2026-11-30") == datetime(2026, 11, 30).astimezone(UTC)  # local midnight
    with pytest.raises(argparse.ArgumentTypeError, match="30m, 2h, 1d"):
        _since("yesterday")


def test_a_bad_since_is_a_usage_error(tmp_path: Path) -> None:
    result = mailfax(tmp_path, "jobs", "--since", "soon")
    assert result.returncode == 2
    assert "give 30m, 2h, 1d, 1w or a date" in result.stderr


def job(state: JobState) -> Job:
    now = datetime.now(UTC)
    return Job(id="j", mail_id="m", account="a", number="+4930123456", state=state, pages=1,
               sender="", created=now, updated=now, attempts=1, next_attempt_at=None,
               provider_job_id=None, reason=None, duration_seconds=None, remote_id=None,
               options={}, cancel_requested=False, acknowledged=False)


def test_the_summary_counts_states_like_postqueue() -> None:
    jobs = [job(JobState.DELIVERED), job(JobState.QUEUED), job(JobState.DELIVERED)]
    assert jobs_summary(jobs) == "-- 3 jobs: 1 queued, 2 delivered"
    assert jobs_summary(jobs[:1]) == "-- 1 job: 1 delivered"
    assert jobs_summary([]) == "-- no jobs"
    assert "--limit" in jobs_summary(jobs, limited=True)


def record(state: str, deliveries: int) -> InboundRecord:
    now = datetime.now(UTC)
    return InboundRecord(account="a", fax_id="1", fetched_at=now, called_number="+4930123456",
                         received_at=now, originator="", remote_id="", pages=2, state=state,
                         deliveries=deliveries)


def test_the_inbox_state_says_where_the_mail_is() -> None:
    assert inbox_state(record("received", 0), "waiting") == "received"
    assert inbox_state(record("queued", 1), "waiting") == "queued"
    assert inbox_state(record("deleted", 1), "handed_off") == "mailed"
    assert inbox_state(record("deleted", 2), "waiting") == "queued"  # redelivered
    assert inbox_state(record("queued", 1), "failed") == "refused"


# -- the commands -------------------------------------------------------------------------------

def test_jobs_shows_tries_and_a_summary_and_filters(tmp_path: Path,
                                                    queued_jobs: list[str]) -> None:
    result = mailfax(tmp_path, "jobs")
    assert result.returncode == 0, result.stderr
    header, *rows, summary = result.stdout.splitlines()
    assert header.split()[:6] == ["JOB", "STATE", "NUMBER", "PAGES", "TRIES", "UPDATED"]
    assert header.split()[-1] == "REASON"
    assert sorted(row.split()[0] for row in rows) == sorted(queued_jobs)
    assert all(row.split()[1:5] == ["queued", row.split()[2], "2", "0"] for row in rows)
    assert summary == "-- 3 jobs: 3 queued"
    assert mailfax(tmp_path, "jobs", "--since", "1h").stdout.splitlines()[-1] == summary
    tomorrow = (datetime.now() + timedelta(days=1)).date().isoformat()
    assert mailfax(tmp_path, "jobs", "--since", tomorrow).stdout.splitlines()[-1] == (
        "-- no jobs")
    assert json.loads(mailfax(tmp_path, "jobs", "--json", "--state", "delivered,failed"
                              ).stdout) == []


def test_cancel_takes_several_ids_and_says_which_failed(tmp_path: Path,
                                                        queued_jobs: list[str]) -> None:
    first, second, third = queued_jobs
    result = mailfax(tmp_path, "cancel", first, "nosuchjob123", second)
    assert result.returncode == 1
    assert f"job {first} cancelled" in result.stdout
    assert f"job {second} cancelled" in result.stdout
    assert "no job nosuchjob123" in result.stderr
    states = {job["id"]: job["state"] for job in json.loads(
        mailfax(tmp_path, "jobs", "--json").stdout)}
    assert states == {first: "cancelled", second: "cancelled", third: "queued"}
    again = mailfax(tmp_path, "cancel", first)
    assert again.returncode == 1 and "already cancelled" in again.stderr
    listing = mailfax(tmp_path, "jobs", "--state", "cancelled").stdout
    assert listing.splitlines()[-1] == "-- 2 jobs: 2 cancelled"
    rows = listing.splitlines()[1:-1]
    assert len(rows) == 2
    assert all(row.endswith("alice@example.org        The fax was cancelled.") for row in rows)


@pytest.mark.parametrize("args", [["jobs"], ["jobs", "--json"]])
def test_a_closed_pipe_ends_quietly(tmp_path: Path, args: list[str]) -> None:
    """``mailfax jobs | head -3`` with more output than a pipe buffers: no traceback."""
    (tmp_path / "letter.pdf").write_bytes(documents.pdf(1))
    numbers = [arg for n in range(800) for arg in ("--to", f"0301234{n:03d}")]
    assert mailfax(tmp_path, "send", *numbers, "letter.pdf").returncode == 0
    command = " ".join([sys.executable, "-m", "mailfax", *args])
    result = subprocess.run(f"{command} | head -3", shell=True, cwd=tmp_path,
                            env=ENV_WITHOUT_CONFIG, capture_output=True, text=True,
                            timeout=120)
    assert len(result.stdout.splitlines()) == 3
    assert result.stderr == ""
    status = subprocess.run(f"set -o pipefail; {command} | head -1", shell=True,
                            executable="/bin/bash", cwd=tmp_path, env=ENV_WITHOUT_CONFIG,
                            capture_output=True, timeout=120)
    assert status.returncode == 141 and status.stderr == b""


def test_commands_before_serve_say_what_to_do(tmp_path: Path) -> None:
    result = mailfax(tmp_path, "jobs")
    assert result.returncode == 1
    assert "run mailfax serve first" in result.stderr


# -- the bundled emulator receives faxes --------------------------------------------------------

def test_emulate_receive_puts_a_test_fax_into_the_emulator_inbox(tmp_path: Path) -> None:
    result = mailfax(tmp_path, "emulate", "receive", "--to", "030 123456", "--from",
                     "040555123")
    assert result.returncode == 0, result.stderr
    inbox = tmp_path / "mailfax-data" / "emulator" / "inbox"
    [tif] = list(inbox.glob("*.tif"))
    assert tiff_pages(tif.read_bytes()) == 2
    assert json.loads(tif.with_suffix(".json").read_text()) == {
        "to": "+4930123456", "from": "040555123", "remote_id": ""}
    assert f"fax {tif.stem} to +4930123456" in result.stdout


def test_emulate_receive_renders_a_pdf_as_a_fax(tmp_path: Path) -> None:
    if subprocess.run(["which", "pdftoppm"], capture_output=True).returncode:
        pytest.skip("pdftoppm (poppler-utils) is not installed")
    (tmp_path / "letter.pdf").write_bytes(documents.pdf(3))
    assert mailfax(tmp_path, "emulate", "receive", "letter.pdf").returncode == 0
    [tif] = list((tmp_path / "mailfax-data" / "emulator" / "inbox").glob("*.tif"))
    assert tiff_pages(tif.read_bytes()) == 3


def test_emulate_receive_refuses_a_bad_number_and_a_missing_file(tmp_path: Path) -> None:
    bad = mailfax(tmp_path, "emulate", "receive", "--to", "12ab")
    assert bad.returncode == 2 and "--to 12ab" in bad.stderr
    missing = mailfax(tmp_path, "emulate", "receive", "nosuch.tif")
    assert missing.returncode == 1 and "nosuch.tif" in missing.stderr


def test_receive_options_are_refused_for_the_wire_emulators(tmp_path: Path) -> None:
    result = mailfax(tmp_path, "emulate", "fax.de", "scan.tif")
    assert result.returncode == 2 and "mailfax emulate receive" in result.stderr


async def test_the_emulator_hands_out_dropped_faxes_and_deletes_them(tmp_path: Path) -> None:
    provider = emulator.create(ProviderContext(account="emulator", data_dir=tmp_path),
                               emulator.Settings())
    try:
        assert provider.supports_inbound
        folder = tmp_path / "emulator" / "inbox"
        assert folder.is_dir()  # made at start, for a person to drop faxes into
        assert await provider.fetch_inbound() is None  # nothing in it yet
        (folder / "scan.tif").write_bytes(sample_fax("+4930123456", pages=3))
        assert await provider.fetch_inbound() is None  # still being copied, maybe
        emulator_settle(folder)
        fax = await provider.fetch_inbound()
        assert fax is not None and fax.fax_id != "scan"  # given an id, as a provider does
        assert fax.fax_id.isdigit() and (folder / f"{fax.fax_id}.tif").exists()
        assert (fax.pages, fax.called_number, fax.originator) == (3, "+49301234567", "")
        again = await provider.fetch_inbound()
        assert again is not None and again.fax_id == fax.fax_id  # until deleted
        await provider.delete_inbound(fax.fax_id)
        assert list(folder.iterdir()) == []
        assert await provider.fetch_inbound() is None
    finally:
        await provider.close()


def emulator_settle(folder: Path) -> None:
    """Age the folder's files past the emulator's settle time."""
    import os
    import time

    old = time.time() - 10
    for path in folder.iterdir():
        os.utime(path, (old, old))


def test_the_faxde_emulator_reports_the_pages_of_the_tiff() -> None:
    """Why ``inbox`` showed PAGES 1 for a 2-page fax: the FAX.de emulator said 1 for any
    TIFF (``--option inbound=…``); it reports the TIFF's pages now, as FAX.de would."""
    state = faxde.EmulatorState(account="1", password="p", delay=0, fail={})
    state.add_inbound(sample_fax("+4930123456", pages=2))
    assert state.inbox[0].pages == 2


@pytest.mark.parametrize("args", [["jobs"], ["show", "j1"]])
def test_a_store_newer_than_this_mailfax_is_refused_in_a_sentence(tmp_path: Path,
                                                                  args: list[str]) -> None:
    assert mailfax(tmp_path, "migrate").returncode == 0
    database = tmp_path / "mailfax-data" / "mailfax.sqlite3"
    with contextlib.closing(sqlite3.connect(database)) as conn, conn:
        conn.execute("UPDATE meta SET value = '999' WHERE key = 'schema_version'")
    result = mailfax(tmp_path, *args)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr.startswith("mailfax: database schema version 999 is newer than this "
                                    "mailfax"), result.stderr
    assert "upgrade mailfax" in result.stderr and "Traceback" not in result.stderr
