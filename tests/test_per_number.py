"""One call at a time per destination number, the busy backoff per number, priorities and time
windows (issue 20): the store's claim on both backends, the dispatcher with a clock the test
controls, and mails over SMTP whose calls the emulator's network records."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from mailfax import reasons
from mailfax.config import DispatchSettings
from mailfax.model import JobState
from mailfax.outbound.dispatch import Dispatcher
from mailfax.outbound.windows import Schedule
from mailfax.providers import emulator
from mailfax.providers.base import (
    EmulatedTransmission,
    FaxDocument,
    ProviderContext,
    ProviderError,
    SendReceipt,
    SendRequest,
)
from mailfax.store.base import (
    DEFAULT_RULES,
    OTHER_ACCOUNTS,
    ClaimRules,
    Job,
    NewJob,
    Outcome,
    Store,
    Transition,
    Work,
    busy_step,
)
from mailfax.store.sqlite import SqliteStore
from tests import test_store
from tests.test_store import Backend, new_mail

# test_store's fixtures: both backends, a database of its own per test
postgres_server = test_store.postgres_server
backend = test_store.backend
store = test_store.store

DOCS = [FaxDocument("a.pdf", b"%PDF-a", 1)]
NUMBER = "+4930123456"
OTHER_NUMBER = "+4930654321"
BULK = 1  # the bulk priority's rank
BERLIN = "Europe/Berlin"
BULK_WINDOW = "Mon-Fri 18:00-07:00, Sat-Sun"


async def add(store: Store, mail_id: str, jobs: Sequence[tuple[str, str]],
              account: str = "acct", priority: str | None = None) -> None:
    """A mail's jobs: (job id, number) each, with the ``priority`` option if given."""
    options = {"priority": priority} if priority else {}
    await store.add_mail_jobs(new_mail(mail_id), [
        NewJob(job_id, number, account, dict(options)) for job_id, number in jobs], DOCS)


async def claim(store: Store, owner: str = "one", limit: int = 10,
                rules: ClaimRules = DEFAULT_RULES, finished: Sequence[Outcome] = ()
                ) -> list[str]:
    work = await store.claim_work(owner, limit, 60, {OTHER_ACCOUNTS: limit}, finished, rules)
    return [job.id for unit in work for job in unit.jobs]


def submitted(job_id: str) -> Outcome:
    return Outcome(job_id, Transition(JobState.SUBMITTED, provider_job_id=f"P-{job_id}",
                                      notify=False))


# -- the claim ----------------------------------------------------------------------------------


async def test_one_claim_takes_one_job_per_number(store: Store) -> None:
    await add(store, "m1", [("a1", NUMBER), ("a2", NUMBER), ("a3", NUMBER)])
    await add(store, "m2", [("b1", OTHER_NUMBER)])
    assert sorted(await claim(store)) == ["a1", "b1"]


async def test_a_number_being_dialled_is_not_called_again_by_any_instance(
        store: Store, backend: Backend) -> None:
    await add(store, "m1", [("a1", NUMBER)])
    await add(store, "m2", [("a2", NUMBER)])
    other = backend.make()  # a second instance on the same database
    await other.open()
    try:
        assert await claim(store, "one") == ["a1"]
        assert await claim(other, "two") == []  # a1 is leased by instance one
        # At the provider (submitted, then sending) the line is still in use.
        assert await claim(other, "two", finished=[submitted("a1")]) == []
        await store.record("a1", Transition(JobState.SENDING))
        assert await claim(other, "two") == []
        assert await store.next_due_time() is None  # waiting for the call's end, not polling
        await store.record("a1", Transition(JobState.DELIVERED))
        assert await claim(other, "two") == ["a2"]
    finally:
        await other.close()


async def test_jobs_of_two_accounts_to_one_number_share_its_line(store: Store) -> None:
    await add(store, "m1", [("a1", NUMBER)], account="one")
    await add(store, "m2", [("b1", NUMBER)], account="two")
    work = await store.claim_work("me", 10, 60, {"one": 5, "two": 5})
    assert len([job for unit in work for job in unit.jobs]) == 1


async def test_with_one_call_per_number_off_a_number_gets_several_calls(store: Store) -> None:
    await add(store, "m1", [("a1", NUMBER), ("a2", NUMBER)])
    assert sorted(await claim(store, rules=ClaimRules(one_call_per_number=False))) == [
        "a1", "a2"]


async def test_normal_jobs_are_claimed_before_older_bulk_ones(store: Store) -> None:
    await add(store, "m1", [(f"b{i}", f"+49301000{i}") for i in range(3)], priority="bulk")
    await add(store, "m2", [("n1", "+4930200001")], priority="normal")
    await add(store, "m3", [("n2", "+4930200002")])  # no option: normal
    assert await claim(store, limit=2) == ["n1", "n2"]
    assert await claim(store, limit=2) == ["b0", "b1"]


async def test_held_priorities_are_not_claimed_and_not_due(store: Store) -> None:
    await add(store, "m1", [("b1", NUMBER)], priority="bulk")
    held = ClaimRules(held_priorities=frozenset({BULK}))
    assert await claim(store, rules=held) == []
    assert await store.next_due_time(held) is None
    assert await store.next_due_time() is not None
    assert await claim(store) == ["b1"]


async def test_a_busy_number_waits_its_backoff_on_every_instance(
        store: Store, backend: Backend) -> None:
    await add(store, "m1", [("a1", NUMBER), ("b1", OTHER_NUMBER)])
    before = datetime.now(UTC)
    until = await store.number_busy(NUMBER, [30.0, 60.0])
    assert timedelta(seconds=29) < until - before < timedelta(seconds=31)
    other = backend.make()
    await other.open()
    try:
        assert await claim(other) == ["b1"]  # not a1: its number is in its backoff
        due = await other.next_due_time()
        assert due is not None and abs((due - until).total_seconds()) < 0.01
        again = await other.number_busy(NUMBER, [30.0, 60.0])  # busy twice in a row
        assert timedelta(seconds=59) < again - before < timedelta(seconds=62)
    finally:
        await other.close()


async def test_a_busy_backoff_that_ran_out_lets_the_number_be_called(store: Store) -> None:
    await add(store, "m1", [("a1", NUMBER)])
    await store.number_busy(NUMBER, [0.2])
    assert await claim(store) == []
    await asyncio.sleep(0.3)
    assert await claim(store) == ["a1"]


def test_busy_steps_grow_per_busy_result_in_a_row_and_start_over_after_a_quiet_time() -> None:
    steps = [180.0, 360.0, 720.0]
    first = busy_step(None, 1000.0, steps)
    assert first == (1, 1180.0)
    second = busy_step(first, 1200.0, steps)
    assert second == (2, 1560.0)
    third = busy_step(second, 1600.0, steps)
    assert third == (3, 2320.0)
    assert busy_step(third, 2400.0, steps) == (4, 3120.0)  # the last step from then on
    assert busy_step(third, 2320.0 + 721.0, steps) == (1, 3041.0 + 180.0)  # quiet: anew


# -- the dispatcher, with a clock the test controls ---------------------------------------------


def berlin(text: str) -> datetime:
    from zoneinfo import ZoneInfo

    return datetime.fromisoformat(text).replace(tzinfo=ZoneInfo(BERLIN)).astimezone(UTC)


class Clock:
    def __init__(self, now: datetime):
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def dispatcher(store: Store, tmp_path: Path, clock: Callable[[], datetime],
               windows: Mapping[str, str] | None = None,
               account_windows: Mapping[str, str] | None = None,
               concurrency: int = 4) -> Dispatcher:
    provider = emulator.create(
        ProviderContext(account="acct", data_dir=tmp_path, emulator_network=store),
        emulator.Settings(delay_seconds=3600, fail=[]))
    schedule = Schedule.from_specs(dict(windows or {}), dict(account_windows or {}), BERLIN)
    return Dispatcher(store, {"acct": provider}, DispatchSettings(concurrency=concurrency),
                      "one", clock=clock, schedule=schedule)


async def states(store: Store, *job_ids: str) -> dict[str, JobState]:
    return {job.id: job.state for job in await store.get_jobs(job_ids)}


async def calls_in_order(store: Store, account: str = "acct") -> list[str]:
    """Our job ids in the order the emulator's network took their calls."""
    jobs = await store.list_jobs()
    found = await store.emulator_transmissions(
        account, [job.provider_job_id for job in jobs if job.provider_job_id])
    return [item.reference for item in sorted(found.values(), key=lambda t: t.submitted_at)]


async def test_a_bulk_job_outside_its_window_waits_and_goes_when_it_opens(
        store: Store, tmp_path: Path) -> None:
    clock = Clock(berlin("2026-12-01T10:00"))  # a Tuesday morning
    sender = dispatcher(store, tmp_path, clock, {"bulk": BULK_WINDOW})
    await add(store, "m1", [("b1", NUMBER)], priority="bulk")
    await add(store, "m2", [("n1", OTHER_NUMBER)])
    await sender.run_once()
    assert await states(store, "b1", "n1") == {"b1": JobState.QUEUED,
                                               "n1": JobState.SUBMITTED}
    assert sender._held.reopens_at == berlin("2026-12-01T18:00")
    clock.now = berlin("2026-12-01T17:59")
    await sender.run_once()
    assert (await states(store, "b1"))["b1"] == JobState.QUEUED
    clock.now = berlin("2026-12-01T18:00")
    await sender.run_once()
    assert (await states(store, "b1"))["b1"] == JobState.SUBMITTED


async def test_an_account_outside_its_window_waits(store: Store, tmp_path: Path) -> None:
    clock = Clock(berlin("2026-12-05T10:00"))  # a Saturday
    sender = dispatcher(store, tmp_path, clock, account_windows={"acct": "Mon-Fri 08:00-17:00"})
    await add(store, "m1", [("a1", NUMBER)])
    await sender.run_once()
    assert (await states(store, "a1"))["a1"] == JobState.QUEUED
    clock.now = berlin("2026-12-07T08:00")
    await sender.run_once()
    assert (await states(store, "a1"))["a1"] == JobState.SUBMITTED


async def test_a_normal_job_overtakes_queued_bulk_jobs(store: Store, tmp_path: Path) -> None:
    sender = dispatcher(store, tmp_path, Clock(berlin("2026-12-05T10:00")),
                        {"bulk": BULK_WINDOW}, concurrency=1)
    await add(store, "m1", [(f"b{i}", f"+49301000{i}") for i in range(3)], priority="bulk")
    await add(store, "m2", [("n1", "+4930200001")])
    await sender.run_once()
    assert await calls_in_order(store) == ["n1", "b0", "b1", "b2"]


class BusyAtSend(emulator.EmulatorProvider):
    """A provider that dials at once and answers the send with "busy" for one number."""

    async def send(self, request: SendRequest) -> SendReceipt:
        if request.number == NUMBER:
            raise ProviderError(reasons.reason(reasons.BUSY, "line busy"), transient=True)
        return await super().send(request)


async def test_a_busy_answer_to_a_send_holds_the_numbers_other_jobs(
        store: Store, tmp_path: Path) -> None:
    provider = BusyAtSend(
        ProviderContext(account="acct", data_dir=tmp_path, emulator_network=store),
        emulator.Settings(delay_seconds=3600, fail=[]))
    settings = DispatchSettings(busy_backoff_seconds=[600.0], retry_initial_seconds=0.01,
                                retry_max_seconds=0.01)
    sender = Dispatcher(store, {"acct": provider}, settings, "one")
    await add(store, "m1", [("a1", NUMBER)])
    await sender.run_once()
    assert (await states(store, "a1"))["a1"] == JobState.RETRYING
    await add(store, "m2", [("a2", NUMBER), ("b1", OTHER_NUMBER)])
    await asyncio.sleep(0.05)  # a1's own retry is due again
    await sender.run_once()
    # Neither a1's retry nor the new a2 calls the busy number for 10 minutes; b1 goes.
    assert await states(store, "a1", "a2", "b1") == {
        "a1": JobState.RETRYING, "a2": JobState.QUEUED, "b1": JobState.SUBMITTED}
    due = await store.next_due_time()
    assert due is not None and due - datetime.now(UTC) > timedelta(seconds=590)


class CountingClaims(SqliteStore):
    calls = 0

    async def claim_work(self, owner: str, limit: int, lease_seconds: float,
                         account_limits: Mapping[str, int], finished: Sequence[Outcome] = (),
                         rules: ClaimRules = DEFAULT_RULES,
                         spool: Path | None = None) -> list[Work]:
        self.calls += 1
        return await super().claim_work(owner, limit, lease_seconds, account_limits, finished,
                                         rules, spool)


@pytest.mark.parametrize("held_by", ["window", "line in use"])
async def test_a_held_job_does_not_make_the_dispatcher_poll(tmp_path: Path,
                                                          held_by: str) -> None:
    """A job that waits for its window, or for its number's call to end, is not "due": the
    dispatcher sleeps its idle tick instead of asking the store every half second."""
    counting = CountingClaims(tmp_path / "store.sqlite3")
    await counting.open()
    try:
        sender = dispatcher(counting, tmp_path, Clock(berlin("2026-12-01T10:00")),
                            {"bulk": BULK_WINDOW})
        if held_by == "window":
            await add(counting, "m1", [("b1", NUMBER)], priority="bulk")
        else:
            await add(counting, "m1", [("a1", NUMBER)])
            await sender.run_once()  # a1 is at the provider (its call lasts an hour)
            await add(counting, "m2", [("a2", NUMBER)])
        counting.calls = 0
        task = asyncio.create_task(sender.run())
        await asyncio.sleep(2.0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert counting.calls <= 2  # the first look, and maybe one after the idle tick
        assert all(job.state != JobState.SUBMITTED or job.id != "a2"
                   for job in await counting.list_jobs())
    finally:
        await counting.close()


# -- over SMTP, with the emulator's records of each call ----------------------------------------


def spans(transmissions: Mapping[str, EmulatedTransmission], delay: float
          ) -> list[tuple[float, float]]:
    """Each call's start and end as the emulator's network had them, in order."""
    settings = emulator.Settings(delay_seconds=delay)
    return sorted(emulator.call_span(item, settings) for item in transmissions.values())


def overlaps(calls: Sequence[tuple[float, float]]) -> list[tuple[int, int]]:
    return [(index, index + 1) for index in range(len(calls) - 1)
            if calls[index + 1][0] < calls[index][1]]


async def smtp_calls(tmp_path: Path, pdf: bytes, count: int, number: str, delay: float = 0.4,
                     **dispatch: Any) -> tuple[list[Job], list[tuple[float, float]]]:
    """``count`` mails to ``number`` over SMTP, each on its own connection at once; the jobs
    once all are final, and the calls (``delay`` long) the emulator's network recorded."""
    from mailfax.app import Application
    from tests.conftest import Service, fax_mail, make_settings

    settings = make_settings(tmp_path, dispatch={**dispatch, "status_poll_seconds": 0.2},
                             accounts={"emulator": {"provider": "emulator",
                                                    "delay_seconds": delay}})
    app = Application(settings)
    await app.start()
    try:
        service = Service(app)
        to = f"{number}@fax.local"
        await asyncio.gather(*(service.send(
            fax_mail([("doc.pdf", pdf, "application/pdf")], subject=f"mail {index}", to=to),
            "alice@example.org", [to]) for index in range(count)))
        deadline = time.monotonic() + 60
        while True:
            jobs = await app.store.list_jobs()
            if len(jobs) == count and all(job.state.is_final for job in jobs):
                break
            assert time.monotonic() < deadline, [job.state for job in jobs]
            await asyncio.sleep(0.1)
        found = await app.store.emulator_transmissions(
            "emulator", [job.provider_job_id or "" for job in jobs])
    finally:
        await app.stop()
    return jobs, spans(found, delay)


async def test_five_mails_to_one_number_never_make_two_calls_at_once(
        tmp_path: Path, corpus: Path) -> None:
    pdf = (corpus / "pdf" / "crazyones.pdf").read_bytes()
    jobs, calls = await smtp_calls(tmp_path, pdf, 5, "004930123456")
    assert [job.state for job in jobs] == [JobState.DELIVERED] * 5
    assert len(calls) == 5
    assert overlaps(calls) == []


async def test_without_one_call_per_number_the_same_mails_overlap(
        tmp_path: Path, corpus: Path) -> None:
    """The control: the records above would show overlapping calls if there were any."""
    pdf = (corpus / "pdf" / "crazyones.pdf").read_bytes()
    _, calls = await smtp_calls(tmp_path, pdf, 5, "004930123456", delay=2.0,
                                one_call_per_number=False)
    assert len(calls) == 5
    assert overlaps(calls) != []


async def test_a_busy_result_pushes_the_next_call_to_that_number_back(
        tmp_path: Path, corpus: Path) -> None:
    """The emulator finds +4930999... busy: the second mail's call waits the backoff after
    the first call's busy result, though it was due at once."""
    pdf = (corpus / "pdf" / "crazyones.pdf").read_bytes()
    jobs, calls = await smtp_calls(tmp_path, pdf, 2, "030999123", busy_backoff_seconds=[2.0])
    assert [job.reason.code if job.reason else None for job in jobs] == ["busy", "busy"]
    (_, first_end), (second_start, _) = calls
    assert second_start - first_end >= 2.0


@pytest.mark.slow
async def test_two_instances_on_one_postgresql_never_call_one_number_twice_at_once(
        postgres_server: Any, tmp_path: Path, corpus: Path) -> None:
    """Two ``mailfax serve`` on one database, mails to one number sent to both at once."""
    from mailfax.store.postgres import PostgresStore
    from tests import test_multi_instance as multi
    from tests.conftest import fax_mail
    from tests.ports import free_port
    from tests.test_crash_recovery import wait_for_port

    database = postgres_server.create_database()
    maildir = tmp_path / "outbox"
    ports = [free_port() for _ in range(2)]
    configs = [multi.write_emulator_config(tmp_path / f"host{index}", port, database, maildir)
               for index, port in enumerate(ports)]
    pdf = (corpus / "pdf" / "crazyones.pdf").read_bytes()
    mails = [fax_mail([("doc.pdf", pdf, "application/pdf")], subject=f"mail {index}",
                      to="004930123456@fax.local") for index in range(6)]
    processes = [multi.start_instance(config) for config in configs]
    store = PostgresStore(database, listen=False)
    try:
        for port in ports:
            await wait_for_port(port, timeout=60)
        await store.open()
        await multi.submit(ports, mails)

        async def all_final() -> bool:
            jobs = await store.list_jobs()
            return len(jobs) == len(mails) and all(job.state.is_final for job in jobs)

        await multi.wait_until("every job final", all_final, 120)
        jobs = await store.list_jobs()
        found = await store.emulator_transmissions(
            "emulator", [job.provider_job_id or "" for job in jobs])
    finally:
        multi.stop_instances(processes)
        await store.close()
    assert [job.state for job in jobs] == [JobState.DELIVERED] * len(mails)
    calls = spans(found, 0.5)  # write_emulator_config: delay_seconds = 0.5
    assert len(calls) == len(mails)
    assert overlaps(calls) == []


# -- the migration ------------------------------------------------------------------------------


OLD_ROWS = """
INSERT INTO mails (id, received_at, envelope_from, subject, refs, from_header, client_address,
                   language) VALUES ('m', {t0}, 'a@b', 's', '[]', '', '::1', 'en');
INSERT INTO jobs (id, mail_id, account, number, state, pages, sender, created, updated,
                  next_attempt_at, options) VALUES
    ('bulk1', 'm', 'acct', '+4930111', 'queued', 1, 'a@b', {t0}, {t0}, {t0},
     '{{"priority": "bulk"}}'),
    ('normal1', 'm', 'acct', '+4930222', 'queued', 1, 'a@b', {t0}, {t0}, {t1}, '{{}}')
"""


def schema_before_issue_20(backend: Backend) -> None:
    """The database as the release before these migrations left it, with a queued bulk job
    (its priority only in its options) due before a normal one."""
    if backend.name == "sqlite":
        import sqlite3

        from mailfax.store import sqlite as sqlite_store

        with sqlite3.connect(backend.url.removeprefix("sqlite:///")) as conn:
            conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
            for version in range(1, 7):
                for statement in sqlite_store._statements(sqlite_store.MIGRATIONS[version]):
                    conn.execute(statement)
            conn.execute("INSERT INTO meta VALUES ('schema_version', '6')")
            conn.executescript(OLD_ROWS.format(t0="0", t1="1"))
        return
    import psycopg

    from mailfax.store import postgres as postgres_store

    with psycopg.connect(backend.url, autocommit=True) as conn:
        conn.execute("CREATE TABLE schema_migrations (version integer PRIMARY KEY,"
                     " applied_at timestamptz NOT NULL DEFAULT now())")
        for version in range(1, 9):
            conn.execute(postgres_store.MIGRATIONS[version])  # type: ignore[call-overload]
            conn.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (version,))
        conn.execute(OLD_ROWS.format(t0="to_timestamp(0)", t1="to_timestamp(1)"))  # type: ignore[call-overload]


async def test_the_migration_gives_queued_bulk_jobs_their_priority(backend: Backend) -> None:
    schema_before_issue_20(backend)
    migrated = backend.make()
    await migrated.open()
    try:
        # The bulk job was due first; the migrated priority puts the normal one before it.
        assert await claim(migrated, limit=1) == ["normal1"]
        assert await claim(migrated, limit=1) == ["bulk1"]
    finally:
        await migrated.close()


# -- configuration -------------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "where"), [
    ({"dispatch": {"windows": {"bulk": "Someday 18:00-07:00"}}}, "dispatch.windows.bulk"),
    ({"dispatch": {"windows": {"urgent": "Sat-Sun"}}}, "dispatch.windows.urgent"),
    ({"dispatch": {"timezone": "Mars/Olympus"}}, "dispatch.timezone"),
    ({"accounts": {"emulator": {"provider": "emulator", "windows": "Mon 25:00-26:00"}}},
     "accounts.emulator.windows"),
])
def test_a_window_that_cannot_be_read_is_refused_with_its_place(
        raw: dict[str, Any], where: str) -> None:
    from pydantic import ValidationError

    from mailfax.config import Settings

    with pytest.raises(ValidationError) as refused:
        Settings.model_validate(raw)
    places = [".".join(str(part) for part in error["loc"]) for error in refused.value.errors()]
    assert any(place.startswith(where) for place in places), places


def test_the_configured_windows_reach_the_dispatcher() -> None:
    from mailfax.config import Settings
    from mailfax.outbound.dispatch import dispatch_schedule

    settings = Settings.model_validate({
        "dispatch": {"windows": {"bulk": BULK_WINDOW}},
        "notify": {"timezone": BERLIN},
        "accounts": {"emulator": {"provider": "emulator", "windows": "Mon-Fri 08:00-17:00"}}})
    held = dispatch_schedule(settings).held(berlin("2026-12-05T10:00"))  # a Saturday
    assert held.priorities == set() and held.accounts == {"emulator"}
    assert held.reopens_at == berlin("2026-12-07T08:00")


async def test_over_smtp_a_bulk_mail_waits_for_its_window_while_a_normal_one_goes(
        tmp_path: Path, corpus: Path) -> None:
    """``X-Fax-Priority: bulk`` (the sender's header) meets ``[dispatch] windows``: with the
    bulk window closed now, the bulk fax stays queued, untried, while a normal fax sent after
    it is delivered."""
    from mailfax.app import Application
    from tests.conftest import Service, fax_mail, make_settings

    opens = datetime.now(ZoneInfo("Europe/Berlin")) + timedelta(hours=2)
    window = f"{opens:%H:%M}-{opens + timedelta(hours=1):%H:%M}"  # closed for the next 2 h
    settings = make_settings(
        tmp_path, dispatch={"status_poll_seconds": 0.2, "windows": {"bulk": window}},
        notify={"timezone": "Europe/Berlin"},
        accounts={"emulator": {"provider": "emulator", "delay_seconds": 0.2}})
    pdf = (corpus / "pdf" / "crazyones.pdf").read_bytes()
    app = Application(settings)
    await app.start()
    try:
        service = Service(app)
        bulk = fax_mail([("doc.pdf", pdf, "application/pdf")], to="030111222@fax.local")
        bulk["X-Fax-Priority"] = "bulk"
        _, reply = await service.send(bulk, "alice@example.org", ["030111222@fax.local"])
        bulk_id = reply.split()[-1]
        normal = fax_mail([("doc.pdf", pdf, "application/pdf")], to="030333444@fax.local")
        _, reply = await service.send(normal, "alice@example.org", ["030333444@fax.local"])
        normal_id = reply.split()[-1]
        deadline = time.monotonic() + 60
        while (await states(app.store, normal_id))[normal_id] != JobState.DELIVERED:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)  # several dispatcher turns more
        waiting = await app.store.get_job(bulk_id)
        assert waiting is not None and waiting.options["priority"] == "bulk"
        assert (waiting.state, waiting.attempts) == (JobState.QUEUED, 0)
    finally:
        await app.stop()
