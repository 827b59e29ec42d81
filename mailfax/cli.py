"""The ``mailfax`` command."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from mailfax import __version__, logs
from mailfax.config import ConfigError, ListenAddress, Settings, load_settings
from mailfax.model import FINAL_STATES, RETRYABLE_STATES, JobState
from mailfax.outbound.notify import format_duration
from mailfax.providers.base import ProviderContext, ProviderRef
from mailfax.store import open_store
from mailfax.store.base import Job, Store, Transition

log = logging.getLogger("mailfax")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logs.configure(args.verbose, args.log_json or os.environ.get("MAILFAX_LOG") == "json")
    if args.command is None:
        parser.print_help()
        return 2
    try:
        result: int = args.handler(args)
        return result
    except ConfigError as error:
        print(f"mailfax: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mailfax", description="E-mail to fax bridge.")
    parser.add_argument("--version", action="version", version=f"mailfax {__version__}")
    parser.add_argument("-c", "--config", type=Path,
                        help="config file (TOML); default: $MAILFAX_CONFIG, else built-in "
                             "defaults")
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("--log-json", action="store_true",
                        help="log JSON lines (also: MAILFAX_LOG=json)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the bridge")
    serve.set_defaults(handler=cmd_serve)

    jobs = commands.add_parser("jobs", help="list jobs and their states")
    jobs.add_argument("--json", action="store_true", help="one JSON array of job objects")
    jobs.add_argument("--state", choices=[s.value for s in JobState])
    jobs.add_argument("--limit", type=int, default=1000)
    jobs.set_defaults(handler=cmd_jobs)

    show = commands.add_parser("show", help="the history of one job")
    show.add_argument("job")
    show.add_argument("--json", action="store_true")
    show.set_defaults(handler=cmd_show)

    cancel = commands.add_parser("cancel", help="cancel a job that has not been sent")
    cancel.add_argument("job")
    cancel.set_defaults(handler=cmd_cancel)

    send = commands.add_parser("send", help="queue a fax without a mail")
    send.add_argument("--to", action="append", required=True, metavar="NUMBER")
    send.add_argument("--from", dest="sender", default="",
                      help="mail address for status mails (default: none)")
    send.add_argument("--subject", default="")
    send.add_argument("files", nargs="+", type=Path, metavar="FILE")
    send.set_defaults(handler=cmd_send)

    inbox = commands.add_parser("inbox", help="received faxes and their delivery state")
    inbox.add_argument("--json", action="store_true")
    inbox.add_argument("--limit", type=int, default=100)
    inbox.set_defaults(handler=cmd_inbox)

    redeliver = commands.add_parser("redeliver", help="mail a received fax again")
    redeliver.add_argument("fax_id", metavar="FAXID")
    redeliver.set_defaults(handler=cmd_redeliver)

    check = commands.add_parser("check-config", help="validate a config file")
    check.add_argument("file", nargs="?", type=Path)
    check.set_defaults(handler=cmd_check_config)

    migrate = commands.add_parser("migrate", help="create or upgrade the store's schema")
    migrate.set_defaults(handler=cmd_migrate)

    passwd = commands.add_parser("passwd", help="make a password hash for [users.NAME]")
    passwd.add_argument("user")
    passwd.set_defaults(handler=cmd_passwd)

    check_account = commands.add_parser(
        "check-account", help="try an account's login with one harmless call")
    check_account.add_argument("name", help="the NAME of [accounts.NAME]")
    check_account.set_defaults(handler=cmd_check_account)

    emulate = commands.add_parser("emulate", help="run a provider emulator (for tests)")
    emulate.add_argument("provider", help="fax.de, faxnummer.de or retarus")
    emulate.add_argument("--listen", default="127.0.0.1:0")
    emulate.add_argument("--option", action="append", default=[], metavar="KEY=VALUE")
    emulate.set_defaults(handler=cmd_emulate)
    add_retry_command(commands)
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(args.config)


# -- serve ------------------------------------------------------------------------------------

def cmd_serve(args: argparse.Namespace) -> int:
    from mailfax.app import serve

    settings = _settings(args)
    if args.config is None and not _config_from_env():
        log.info("no config file: running on embedded defaults")

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve(settings, stop)

    asyncio.run(run())
    return 0


def _config_from_env() -> bool:
    return bool(os.environ.get("MAILFAX_CONFIG"))


# -- store commands ---------------------------------------------------------------------------

StoreAction = Callable[[Store], Awaitable[int]]


async def _with_store(settings: Settings, action: StoreAction) -> int:
    store = open_store(settings.store_url)
    await store.open()
    try:
        return await action(store)
    finally:
        await store.close()


def _run_with_store(args: argparse.Namespace, action: StoreAction) -> int:
    settings = _settings(args)
    if settings.store_url.startswith("sqlite:///") and not Path(
            settings.store_url.removeprefix("sqlite:///")).exists():
        print(f"mailfax: no database at {settings.store_url} (run mailfax serve first, "
              f"in the same folder or with the same config)", file=sys.stderr)
        return 1
    return asyncio.run(_with_store(settings, action))


def cmd_jobs(args: argparse.Namespace) -> int:
    async def action(store: Store) -> int:
        jobs = await store.list_jobs(limit=args.limit,
                                     state=JobState(args.state) if args.state else None)
        if args.json:
            json.dump([job.as_json() for job in jobs], sys.stdout, indent=1)
            print()
            return 0
        print(f"{'JOB':<13} {'STATE':<10} {'NUMBER':<17} {'PAGES':>5} {'UPDATED':<20} SENDER")
        for job in jobs:
            print(f"{job.id:<13} {job.state.value:<10} {job.number:<17} {job.pages:>5} "
                  f"{job.updated:%Y-%m-%d %H:%M:%S}  {job.sender or '-'}")
        return 0

    return _run_with_store(args, action)


def cmd_show(args: argparse.Namespace) -> int:
    async def action(store: Store) -> int:
        job = await store.get_job(args.job)
        if job is None:
            print(f"mailfax: no job {args.job}", file=sys.stderr)
            return 1
        events = await store.job_events(job.id)
        if args.json:
            data = job.as_json()
            data["events"] = [{"at": e.at.isoformat(), "state": e.state.value,
                               "reason": e.reason.for_language("en") if e.reason else None,
                               "detail": e.detail} for e in events]
            print(json.dumps(data, indent=1))
            return 0
        print(f"job {job.id}: {job.state.value}, fax to {job.number}, {job.pages} pages")
        print(f"  from <{job.sender}>, account {job.account}, "
              f"provider job {job.provider_job_id or '-'}, attempts {job.attempts}")
        if job.duration_seconds is not None:
            print(f"  duration {format_duration(job.duration_seconds)}")
        if job.reason:
            print(f"  reason: {job.reason.for_language('en')}")
        for event in events:
            line = f"  {event.at:%Y-%m-%d %H:%M:%S} {event.state.value:<10}"
            if event.reason:
                line += f" {event.reason.for_language('en')}"
            if event.detail:
                line += f" ({event.detail})"
            print(line)
        return 0

    return _run_with_store(args, action)


def cmd_cancel(args: argparse.Namespace) -> int:
    settings = _settings(args)

    async def action(store: Store) -> int:
        job = await store.get_job(args.job)
        if job is None:
            print(f"mailfax: no job {args.job}", file=sys.stderr)
            return 1
        if job.state in FINAL_STATES:
            print(f"mailfax: job {job.id} is already {job.state.value}", file=sys.stderr)
            return 1
        if job.state == JobState.UNCONFIRMED:
            print(f"mailfax: job {job.id} is unconfirmed: it may have been sent, and there is "
                  "no provider job to cancel", file=sys.stderr)
            return 1
        from mailfax import reasons

        cancelled = Transition(state=JobState.CANCELLED, reason=reasons.reason("cancelled"),
                               detail="cancelled with mailfax cancel")
        if job.provider_job_id is None:
            await store.request_cancel(job.id)  # in case the dispatcher holds it right now
            if await store.record(job.id, cancelled,
                                  expected=(JobState.QUEUED, JobState.RETRYING)):
                print(f"job {job.id} cancelled")
                return 0
            job = await store.get_job(job.id) or job
        if job.provider_job_id is None:
            print(f"job {job.id} is being sent right now; it will be cancelled at the provider")
            return 0
        return await _cancel_tracked(settings, store, job, cancelled)

    return _run_with_store(args, action)


async def _cancel_tracked(settings: Settings, store: Store, job: Job,
                          cancelled: Transition) -> int:
    """A job the provider has. Where several jobs share one provider job (FAX.de's bulk
    mode), cancelling it cancels them all: only when every one of them is being cancelled."""
    from mailfax.outbound.tracking import cancel_groups

    groups, held = cancel_groups([job], await store.tracked_jobs(job.account))
    if job.id in held:
        await store.request_cancel(job.id)
        others = " ".join(held[job.id])
        print(f"mailfax: job {job.id} is not cancelled yet: it was sent as one provider job "
              f"({job.provider_job_id}) together with {others}, and cancelling it would "
              f"cancel those too. It will be cancelled once they are: mailfax cancel "
              f"{held[job.id][0]} ...", file=sys.stderr)
        return 1
    assert job.provider_job_id is not None
    code = await _cancel_at_provider(settings, store, job.id, job.account,
                                     job.provider_job_id, cancelled)
    for other in groups[0][1:] if code == 0 else []:
        await store.record(other.id, cancelled, expected=(
            JobState.SUBMITTED, JobState.SENDING, JobState.RETRYING, JobState.UNCONFIRMED))
        print(f"job {other.id} cancelled with it (the same provider job)")
    return code


# -- retry ------------------------------------------------------------------------------------

def add_retry_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    retry = commands.add_parser(
        "retry", help="send failed, cancelled or unconfirmed jobs again (deliberately)",
        description="Queue a new attempt of each job: for jobs that failed, were cancelled, "
                    "or are unconfirmed (their provider may have them; this may send a "
                    "second copy). The running service sends them.")
    retry.add_argument("jobs", nargs="+", metavar="JOB")
    retry.set_defaults(handler=cmd_retry)


def cmd_retry(args: argparse.Namespace) -> int:
    """Exit 0 when every job was queued again, 1 when any was not (each one is said)."""

    async def action(store: Store) -> int:
        refused = 0
        for job_id in args.jobs:
            job = await store.get_job(job_id)
            if job is None:
                print(f"mailfax: no job {job_id}", file=sys.stderr)
                refused += 1
                continue
            if job.state in RETRYABLE_STATES:
                job = await store.reopen_job(job_id, "sent again with mailfax retry") or job
                if job.state == JobState.QUEUED:
                    print(f"job {job_id} queued again")
                    continue
            print(f"mailfax: job {job_id} is {job.state.value}: only failed, cancelled or "
                  "unconfirmed jobs can be retried", file=sys.stderr)
            refused += 1
        return 1 if refused else 0

    return _run_with_store(args, action)


async def _cancel_at_provider(settings: Settings, store: Store, job_id: str, account: str,
                              provider_job_id: str, cancelled: Transition) -> int:
    from mailfax.app import load_secret_key
    from mailfax.providers import provider_module

    account_settings = settings.accounts.get(account)
    if account_settings is None:
        print(f"mailfax: account {account} is no longer configured", file=sys.stderr)
        return 1
    context = ProviderContext(account=account, data_dir=settings.data_dir,
                              secret_key=load_secret_key(settings.data_dir),
                              emulator_network=store)
    provider = provider_module(account_settings.provider).create(
        context, account_settings.provider_settings())
    try:
        ok = await provider.cancel(ProviderRef(job_id, provider_job_id))
    finally:
        await provider.close()
    if not ok:
        print(f"mailfax: job {job_id} was already sent and cannot be cancelled",
              file=sys.stderr)
        return 1
    await store.record(job_id, cancelled, expected=(JobState.SUBMITTED, JobState.SENDING,
                                                    JobState.RETRYING))
    print(f"job {job_id} cancelled at {account}")
    return 0


def cmd_send(args: argparse.Namespace) -> int:
    from mailfax.documents.pdf import DocumentError
    from mailfax.intake.assemble import convert_file
    from mailfax.intake.service import Intake
    from mailfax.numbers import InvalidNumber, parse_fax_local_part

    settings = _settings(args)
    try:
        addresses = [parse_fax_local_part(number, settings.numbers.default_country)
                     for number in args.to]
    except InvalidNumber as error:
        print(f"mailfax: {error.sentence}", file=sys.stderr)
        return 1
    documents = []
    for path in args.files:
        try:
            data = path.read_bytes()
        except OSError as error:
            print(f"mailfax: {path}: {error.strerror}", file=sys.stderr)
            return 1
        try:
            documents.append(convert_file(path.name, "", data))
        except DocumentError as error:
            print(f"mailfax: {error}", file=sys.stderr)
            return 1

    async def action(store: Store) -> int:
        intake = Intake(settings, store)
        accepted = await intake.store_documents(args.sender, addresses, documents,
                                                args.subject or args.files[0].name, "cli")
        for job_id in accepted.job_ids:
            print(job_id)
        return 0

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    return asyncio.run(_with_store(settings, action))


def cmd_inbox(args: argparse.Namespace) -> int:
    async def action(store: Store) -> int:
        faxes = await store.list_inbound(limit=args.limit)
        if args.json:
            json.dump([{"account": f.account, "fax_id": f.fax_id, "called": f.called_number,
                        "originator": f.originator, "remote_id": f.remote_id,
                        "pages": f.pages, "received": f.received_at.isoformat(),
                        "state": f.state, "deliveries": f.deliveries} for f in faxes],
                      sys.stdout, indent=1)
            print()
            return 0
        print(f"{'FAX':<14} {'ACCOUNT':<10} {'RECEIVED':<17} {'FROM':<18} {'TO':<16} "
              f"{'PAGES':>5} STATE")
        for fax in faxes:
            print(f"{fax.fax_id:<14} {fax.account:<10} {fax.received_at:%Y-%m-%d %H:%M} "
                  f"{fax.originator[:18]:<18} {fax.called_number[:16]:<16} {fax.pages:>5} "
                  f"{fax.state}")
        return 0

    return _run_with_store(args, action)


def cmd_redeliver(args: argparse.Namespace) -> int:
    from mailfax.app import inbound_mailer
    from mailfax.inbound.poller import queue_fax_mail

    settings = _settings(args)

    async def action(store: Store) -> int:
        found = await store.find_inbound(args.fax_id)
        if not found:
            print(f"mailfax: no received fax {args.fax_id}", file=sys.stderr)
            return 1
        mailer = inbound_mailer(settings)
        for record in found:
            await queue_fax_mail(store, record, settings.inbound, mailer,
                                 settings.numbers.default_country)
            print(f"fax {record.fax_id} ({record.account}) queued for delivery again")
        return 0

    return _run_with_store(args, action)


def cmd_migrate(args: argparse.Namespace) -> int:
    from mailfax.app import redact_url
    from mailfax.store import migrate

    settings = _settings(args)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    where = redact_url(settings.store_url)  # no credentials in the output
    try:
        applied = asyncio.run(migrate(settings.store_url))
    except RuntimeError as error:
        print(f"mailfax: {error}", file=sys.stderr)
        return 1
    if applied:
        print(f"{where}: applied schema versions {', '.join(map(str, applied))}")
    else:
        print(f"{where}: schema is up to date")
    return 0


def cmd_passwd(args: argparse.Namespace) -> int:
    """Ask for a password (twice on a terminal, one line on stdin otherwise) and print the
    ``[users.NAME]`` lines to paste into the config. The password itself is never stored."""
    import getpass

    from mailfax.trust.auth import hash_password

    if sys.stdin.isatty():
        password = getpass.getpass(f"password for {args.user}: ")
        if getpass.getpass("again: ") != password:
            print("mailfax: the passwords differ", file=sys.stderr)
            return 1
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if len(password) < 10:
        print("mailfax: use at least 10 characters", file=sys.stderr)
        return 1
    print(f"[users.{args.user}]")
    print(f'password_hash = "{hash_password(password)}"')
    print(f'addresses = ["{args.user}@example.org"]  # the sender addresses this user may use')
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    path = args.file or args.config
    settings = load_settings(path)
    where = str(path) if path else "built-in defaults"
    print(f"{where}: OK ({len(settings.accounts)} account(s), fax domains "
          f"{', '.join(settings.fax_domains)}, store {settings.store_url.split('://')[0]})")
    return 0


def cmd_check_account(args: argparse.Namespace) -> int:
    """Load the account's provider as serve would (FAX.de: its WSDL), make one harmless
    authenticated call, print what was learnt; 1 when the account does not work."""
    from mailfax.providers.check import check_account

    result = asyncio.run(check_account(_settings(args), args.name))
    print("\n".join(result.lines))
    return 0 if result.ok else 1


def cmd_emulate(args: argparse.Namespace) -> int:
    from mailfax.emulators import emulator_module

    address = ListenAddress(args.listen)
    options = dict(option.split("=", 1) for option in args.option if "=" in option)
    module = emulator_module(args.provider)

    async def run() -> None:
        emulator = await module.start(address.host, address.port, options)
        print(f"{args.provider} emulator listening on {emulator.url}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            await emulator.close()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
