"""The ``mailfax`` command."""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import re
import signal
import sys
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mailfax import __version__, logs
from mailfax.model import FINAL_STATES, RETRYABLE_STATES, JobState
from mailfax.support.lazy import lazy_module

# The config (pydantic), the store, the providers and asyncio are imported by the commands
# that use them, not here: `mailfax --version` needs none of them (tests/test_cli_imports.py).
if TYPE_CHECKING:
    import asyncio

    from mailfax.config import Settings
    from mailfax.store.base import Handoff, InboundRecord, Job, Store, Transition
else:
    asyncio = lazy_module("asyncio")

log = logging.getLogger("mailfax")


EXIT_CODES = """\
exit codes:
  0    done
  1    the command could not do what was asked (no such job, already sent, no database, ...)
  2    bad usage or a config file that cannot be used
  130  interrupted (Ctrl-C)
  141  the output pipe was closed early (e.g. mailfax jobs | head)"""

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_CLOSED_PIPE = 0, 1, 2, 130, 141


def main(argv: Sequence[str] | None = None) -> int:
    if list(sys.argv[1:] if argv is None else argv) == ["--version"]:
        print(f"mailfax {__version__}")  # as argparse would, without building the parser
        return EXIT_OK
    _without_pydantic_plugins()
    parser = build_parser()
    args = parser.parse_args(argv)
    logs.configure(args.verbose, args.log_json or os.environ.get("MAILFAX_LOG") == "json")
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    from mailfax.support.config_file import ConfigError

    try:
        result: int = args.handler(args)
        sys.stdout.flush()  # a closed pipe shows here, not at exit as a traceback
        return result
    except ConfigError as error:
        print(f"mailfax: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return _closed_pipe()


def _without_pydantic_plugins() -> None:
    """No third-party pydantic plugins watch the config being validated (they would see its
    values, and finding them scans every installed package's metadata: 30-50 ms of each
    command's start). ``PYDANTIC_DISABLE_PLUGINS`` set in the environment is kept."""
    os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")


def _closed_pipe() -> int:
    """The reader went away (``mailfax jobs | head -3``): stop quietly, as Unix tools do.
    stdout is pointed at /dev/null so Python's final flush finds nothing to complain about."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_CLOSED_PIPE


def _global_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """-c, -v and --log-json, on the main parser and on every command, so they may come
    before or after the command (``mailfax -c x.toml jobs`` = ``mailfax jobs -c x.toml``).
    On the commands they default to "not given", so they never undo the main parser's."""
    default: dict[str, Any] = {} if top else {"default": argparse.SUPPRESS}
    parser.add_argument("-c", "--config", type=Path, **default,
                        help="config file (TOML); default: $MAILFAX_CONFIG, else built-in "
                             "defaults (data in ./mailfax-data)")
    parser.add_argument("-v", "--verbose", action="store_true", **default,
                        help="log debug messages")
    parser.add_argument("--log-json", action="store_true", **default,
                        help="log JSON lines (also: MAILFAX_LOG=json)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mailfax", description="E-mail to fax bridge.", epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"mailfax {__version__}")
    _global_options(parser, top=True)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")

    def command(name: str, summary: str, handler: Callable[[argparse.Namespace], int],
                description: str = "") -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=summary, description=description or summary,
                                  epilog=EXIT_CODES,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        _global_options(sub, top=False)
        sub.set_defaults(handler=handler)
        return sub

    serve = command("serve", "run the bridge: SMTP intake, faxing, status mails",
                    cmd_serve)
    serve.add_argument("--listen", action="append", metavar="HOST:PORT",
                       help="SMTP listener instead of smtp.listen (repeatable)")

    jobs = command("jobs", "list jobs: state, tries, reason; a summary line",
                   cmd_jobs)
    jobs.add_argument("--json", action="store_true", help="one JSON array of job objects")
    jobs.add_argument("--state", type=_states, metavar="STATE[,STATE]",
                      help=f"only these states ({', '.join(s.value for s in JobState)})")
    jobs.add_argument("--since", type=_since, metavar="WHEN",
                      help="only jobs created since WHEN: 30m, 2h, 1d, 1w or an ISO date/time")
    jobs.add_argument("--limit", type=int, default=1000, help="at most this many, newest first")

    show = command("show", "one job and its history", cmd_show)
    show.add_argument("job", metavar="JOB")
    show.add_argument("--json", action="store_true")

    cancel = command("cancel", "cancel jobs that have not been sent (like faxrm)", cmd_cancel)
    cancel.add_argument("jobs", nargs="+", metavar="JOB")

    send = command("send", "queue a fax without a mail", cmd_send)
    send.add_argument("--to", action="append", required=True, metavar="NUMBER")
    send.add_argument("--from", dest="sender", default="",
                      help="mail address for status mails (default: none)")
    send.add_argument("--subject", default="")
    send.add_argument("files", nargs="+", type=Path, metavar="FILE")

    inbox = command("inbox", "received faxes: pages, and whether they were mailed",
                    cmd_inbox)
    inbox.add_argument("--json", action="store_true")
    inbox.add_argument("--limit", type=int, default=100)
    from mailfax.inbound.commands import add_commands as add_inbound_commands

    add_inbound_commands(command, inbox)  # route, block, inbox show

    redeliver = command("redeliver", "mail a received fax again", cmd_redeliver)
    redeliver.add_argument("fax_id", metavar="FAXID")

    check = command("check-config", "validate a config file; names the bad field",
                    cmd_check_config)
    check.add_argument("file", nargs="?", type=Path)

    command("migrate", "create or upgrade the store's schema",
            cmd_migrate)

    passwd = command("passwd", "print a password hash for [users.NAME]", cmd_passwd)
    passwd.add_argument("user")

    command("check-account", "try an account's login with one harmless call",
            cmd_check_account).add_argument("name", help="the NAME of [accounts.NAME]")

    emulate = command("emulate", "run a provider emulator; receive: a fax arrives",
                      cmd_emulate, description=EMULATE_DESCRIPTION)
    emulate.add_argument("provider", metavar="PROVIDER",
                         help="fax.de, faxnummer.de, retarus, or receive")
    emulate.add_argument("file", nargs="?", type=Path, metavar="FILE",
                         help="receive: the fax (TIFF as it is; PDF or image rendered in fine "
                              "mode); none: a 2-page test fax")
    emulate.add_argument("--listen", default="127.0.0.1:0", metavar="HOST:PORT")
    emulate.add_argument("--option", action="append", default=[], metavar="KEY=VALUE")
    emulate.add_argument("--to", metavar="NUMBER", help="receive: the number called")
    emulate.add_argument("--from", dest="caller", default="", metavar="NUMBER",
                         help="receive: the caller's number")
    emulate.add_argument("--remote-id", default="", help="receive: the caller's station id")
    emulate.add_argument("--account", help="receive: the emulator account (default: the "
                                           "default account, if it is an emulator)")
    purge = command("purge", "delete data older than [retention] allows",
                    cmd_purge)
    purge.add_argument("--dry-run", action="store_true", help="only count what would go")
    purge.add_argument("--json", action="store_true")
    command("retry", "send failed, cancelled or unconfirmed jobs again",
            cmd_retry, description=RETRY_DESCRIPTION).add_argument(
        "jobs", nargs="+", metavar="JOB")
    command("health", "SMTP banner and a store write: exit 0 (healthy) or 1",
            cmd_health)
    return parser


RETRY_DESCRIPTION = """\
Queue a new attempt of each job: for jobs that failed, were cancelled, or are unconfirmed
(their provider may have them; this may send a second copy). The running service sends them.
"""

EMULATE_DESCRIPTION = """\
mailfax emulate fax.de|faxnummer.de|retarus --listen HOST:PORT [--option KEY=VALUE]...
  run that provider's emulator, a real HTTP server, until stopped.
mailfax emulate receive [FILE] --to NUMBER [--from NUMBER]
  a fax arrives at the bundled emulator account: FILE goes into its inbox folder
  (<data_dir>/emulator/inbox), where a running `mailfax serve` picks it up within a second
  and mails it (on the embedded defaults: to postmaster@localhost, in mailfax-data/outbox)."""


def _states(value: str) -> set[JobState]:
    try:
        return {JobState(part.strip()) for part in value.split(",") if part.strip()}
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r}: states are {', '.join(s.value for s in JobState)}") from None


SINCE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def _since(value: str) -> datetime:
    """``2h``, ``30m``, ``1d``, ``1w`` ago, or an ISO date or time (local time unless it
    names its zone)."""
    match = re.fullmatch(r"\s*(\d+)\s*([smhdw])\s*", value)
    if match:
        return datetime.now(UTC) - timedelta(
            seconds=int(match.group(1)) * SINCE_UNITS[match.group(2)])
    try:
        when = datetime.fromisoformat(value.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r}: give 30m, 2h, 1d, 1w or a date like 2026-11-30") from None
    return when.astimezone(UTC)  # a naive time is taken as local time


def _settings(args: argparse.Namespace) -> Settings:
    from mailfax.config import load_settings

    return load_settings(args.config)


# -- serve ------------------------------------------------------------------------------------

def cmd_serve(args: argparse.Namespace) -> int:
    from mailfax.app import serve

    settings = _serve_settings(args)
    if args.config is None and not _config_from_env():
        log.info("no config file: running on embedded defaults")

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve(settings, stop, load=lambda: _serve_settings(args))

    asyncio.run(run())
    return 0


def _serve_settings(args: argparse.Namespace) -> Settings:
    """The config as ``serve`` runs it (also on a reload): the file, and ``--listen``."""
    settings = _settings(args)
    if args.listen:
        settings = _with_listeners(settings, args.listen)
    return settings


def _with_listeners(settings: Settings, listen: list[str]) -> Settings:
    from pydantic import ValidationError

    from mailfax.config import ConfigError, SmtpSettings, describe_validation_error

    try:
        smtp = SmtpSettings.model_validate(settings.smtp.model_dump() | {"listen": listen})
    except ValidationError as error:
        raise ConfigError(f"--listen: {describe_validation_error(error)}") from None
    return settings.model_copy(update={"smtp": smtp})


def _config_from_env() -> bool:
    return bool(os.environ.get("MAILFAX_CONFIG"))


# -- store commands ---------------------------------------------------------------------------

StoreAction = Callable[["Store"], Awaitable[int]]


async def _with_store(settings: Settings, action: StoreAction) -> int:
    return await _with_store_at(settings.store_url, action)


async def _with_store_at(url: str, action: StoreAction) -> int:
    from mailfax.store import open_store

    store = open_store(url)
    try:
        await store.open()
    except RuntimeError as error:  # its schema is newer than this mailfax: say so, no traceback
        await store.close()
        print(f"mailfax: {error}", file=sys.stderr)
        return EXIT_FAILED
    try:
        return await action(store)
    finally:
        await store.close()


def _run_with_store(args: argparse.Namespace, action: StoreAction) -> int:
    url = _store_url(args)
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists():
        print(f"mailfax: no database at {url} (run mailfax serve first, "
              f"in the same folder or with the same config)", file=sys.stderr)
        return 1
    return asyncio.run(_with_store_at(url, action))


def _store_url(args: argparse.Namespace) -> str:
    """Where the store is, read from the config file alone when that is sure (the commands
    that only need the store start without pydantic: bench/cli.py), else from the validated
    config (which names a bad field)."""
    from mailfax.support.config_file import config_path, store_url_of

    url = store_url_of(config_path(args.config))
    return url if url is not None else _settings(args).store_url


def cmd_jobs(args: argparse.Namespace) -> int:
    async def action(store: Store) -> int:
        states: set[JobState] = args.state or set()
        jobs = await store.list_jobs(limit=args.limit,
                                     state=next(iter(states)) if len(states) == 1 else None)
        limited = len(jobs) >= args.limit
        jobs = [job for job in jobs if (not states or job.state in states)
                and (args.since is None or job.created >= args.since)]
        if args.json:
            json.dump([job.as_json() for job in jobs], sys.stdout, indent=1)
            print()
            return EXIT_OK
        print(f"{'JOB':<13} {'STATE':<10} {'NUMBER':<16} {'PAGES':>5} {'TRIES':>5} "
              f"{'UPDATED':<19} {'SENDER':<24} REASON")
        for job in jobs:
            print(job_line(job))
        print(jobs_summary(jobs, limited))
        return EXIT_OK

    return _run_with_store(args, action)


def job_line(job: Job) -> str:
    reason = job.reason.for_language("en") if job.reason else ""
    return (f"{job.id:<13} {job.state.value:<10} {job.number:<16} {job.pages:>5} "
            f"{job.attempts:>5} {job.updated.astimezone():%Y-%m-%d %H:%M:%S} "
            f"{job.sender or '-':<24} {reason}").rstrip()


def jobs_summary(jobs: Sequence[Job], limited: bool = False) -> str:
    """``-- 3 jobs: 1 queued, 2 delivered``, as ``postqueue -p`` ends its listing."""
    if not jobs:
        return "-- no jobs"
    counts = Counter(job.state for job in jobs)
    states = ", ".join(f"{counts[state]} {state.value}" for state in JobState if counts[state])
    shown = f"{len(jobs)} job{'s' if len(jobs) != 1 else ''}"
    more = " (the newest; --limit shows more)" if limited else ""
    return f"-- {shown}{more}: {states}"


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
            data["warnings"] = job.options.get("warnings", [])  # documents.readiness
            print(json.dumps(data, indent=1))
            return 0
        print(f"job {job.id}: {job.state.value}, fax to {job.number}, {job.pages} pages")
        print(f"  from <{job.sender}>, account {job.account}, "
              f"provider job {job.provider_job_id or '-'}, attempts {job.attempts}")
        if job.duration_seconds is not None:
            from mailfax.outbound.notify import format_duration  # jinja2: not for every command

            print(f"  duration {format_duration(job.duration_seconds)}")
        if job.reason:
            print(f"  reason: {job.reason.for_language('en')}")
        for warning in job.options.get("warnings", []):  # documents.readiness
            print(f"  warning: {warning['text']}")
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
    """Cancel each job named; exit 1 if any of them could not be cancelled. The whole config
    is read only when a provider is asked to cancel."""
    settings: Callable[[], Settings] = functools.cache(functools.partial(_settings, args))

    async def action(store: Store) -> int:
        results = [await _cancel_one(settings, store, job_id) for job_id in args.jobs]
        return EXIT_OK if all(result == EXIT_OK for result in results) else EXIT_FAILED

    return _run_with_store(args, action)


async def _cancel_one(settings: Callable[[], Settings], store: Store, job_id: str) -> int:
    job = await store.get_job(job_id)
    if job is None:
        print(f"mailfax: no job {job_id}", file=sys.stderr)
        return EXIT_FAILED
    if job.state in FINAL_STATES:
        print(f"mailfax: job {job.id} is already {job.state.value}", file=sys.stderr)
        return EXIT_FAILED
    if job.state == JobState.UNCONFIRMED:
        print(f"mailfax: job {job.id} is unconfirmed: it may have been sent, and there is "
              "no provider job to cancel", file=sys.stderr)
        return EXIT_FAILED
    from mailfax import reasons
    from mailfax.store.base import Transition

    cancelled = Transition(state=JobState.CANCELLED, reason=reasons.reason("cancelled"),
                           detail="cancelled with mailfax cancel")
    if job.provider_job_id is None:
        await store.request_cancel(job.id)  # in case the dispatcher holds it right now
        if await store.record(job.id, cancelled,
                              expected=(JobState.QUEUED, JobState.RETRYING)):
            print(f"job {job.id} cancelled")
            return EXIT_OK
        job = await store.get_job(job.id) or job
    if job.provider_job_id is None:
        print(f"job {job.id} is being sent right now; it will be cancelled at the provider")
        return EXIT_OK
    return await _cancel_tracked(settings, store, job, cancelled)


async def _cancel_tracked(settings: Callable[[], Settings], store: Store, job: Job,
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
    code = await _cancel_at_provider(settings(), store, job.id, job.account,
                                     job.provider_job_id, cancelled)
    for other in groups[0][1:] if code == 0 else []:
        await store.record(other.id, cancelled, expected=(
            JobState.SUBMITTED, JobState.SENDING, JobState.RETRYING, JobState.UNCONFIRMED))
        print(f"job {other.id} cancelled with it (the same provider job)")
    return code


# -- retry ------------------------------------------------------------------------------------

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
            if job.state in RETRYABLE_STATES and not await store.load_documents(job.mail_id):
                print(f"mailfax: job {job_id}: its documents were deleted ([retention] "
                      "documents_days); send the fax again by mail", file=sys.stderr)
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
    from mailfax.providers.base import ProviderContext, ProviderRef

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
    from mailfax.intake.service import Intake, page_setup
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
            documents.append(convert_file(path.name, "", data, page_setup(settings, None)))
        except DocumentError as error:
            print(f"mailfax: {error}", file=sys.stderr)
            return 1

    async def action(store: Store) -> int:
        from mailfax.outbound.notify import CLI_CLIENT  # its status mails name the file

        intake = Intake(settings, store)
        accepted = await intake.store_documents(args.sender, addresses, documents,
                                                args.subject or args.files[0].name, CLI_CLIENT)
        for job_id in accepted.job_ids:
            print(job_id)
        return 0

    settings.data_dir.mkdir(0o750, parents=True, exist_ok=True)
    return asyncio.run(_with_store(settings, action))


def cmd_inbox(args: argparse.Namespace) -> int:
    if args.action == "show" or args.pdf is not None or args.tiff is not None:
        from mailfax.inbound.commands import cmd_inbox_show

        return cmd_inbox_show(args)

    async def action(store: Store) -> int:
        faxes = await store.list_inbound(limit=args.limit)
        rows = [(fax, inbox_state(fax, await store.inbound_handoff(fax.account, fax.fax_id)))
                for fax in faxes]
        if args.json:
            json.dump([{"account": f.account, "fax_id": f.fax_id, "called": f.called_number,
                        "originator": f.originator, "remote_id": f.remote_id,
                        "pages": f.pages, "received": f.received_at.isoformat(),
                        "state": state,
                        "at_provider": "deleted" if f.state == "deleted" else "kept",
                        "deliveries": f.deliveries} for f, state in rows],
                      sys.stdout, indent=1)
            print()
            return EXIT_OK
        print(f"{'FAX':<16} {'ACCOUNT':<10} {'RECEIVED':<16} {'FROM':<18} {'TO':<16} "
              f"{'PAGES':>5} {'MAILS':>5} STATE")
        for fax, state in rows:
            print(f"{fax.fax_id:<16} {fax.account:<10} "
                  f"{fax.received_at.astimezone():%Y-%m-%d %H:%M} "
                  f"{(fax.originator or '-')[:18]:<18} {fax.called_number[:16]:<16} "
                  f"{fax.pages:>5} {fax.deliveries:>5} {state}")
        print(f"-- {len(rows)} received fax{'es' if len(rows) != 1 else ''}"
              + (": " + ", ".join(f"{n} {state}" for state, n in
                                  Counter(state for _, state in rows).items()) if rows else ""))
        return EXIT_OK

    return _run_with_store(args, action)


def inbox_state(fax: InboundRecord, handoff: Handoff) -> str:
    """Where a received fax's mail is: ``received`` (no mail yet), ``queued`` (in the outbox),
    ``mailed`` (the relay took it or the Maildir has it), ``refused`` (the relay refused it
    for good: fix the cause, then ``mailfax redeliver``), ``blocked`` (junk) or ``duplicate``
    (received before): deleted at the provider, never mailed."""
    if fax.state in ("blocked", "duplicate") and fax.deliveries == 0:
        return fax.state
    if fax.state == "received" and fax.deliveries == 0:
        return "received"
    return {"waiting": "queued", "handed_off": "mailed", "failed": "refused"}[handoff]


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
            if not await store.inbound_image(record.account, record.fax_id):
                print(f"mailfax: fax {record.fax_id} ({record.account}): its image was "
                      "deleted ([retention] received_faxes_days)", file=sys.stderr)
                return 1
            await queue_fax_mail(store, record, settings.inbound, mailer,
                                 settings.numbers.default_country,
                                 imap_delivery=settings.imap_delivery is not None)
            print(f"fax {record.fax_id} ({record.account}) queued for delivery again; "
                  f"a running mailfax serve sends it within 30 s (see mailfax inbox)")
        return 0

    return _run_with_store(args, action)


def cmd_purge(args: argparse.Namespace) -> int:
    """Per kind, what was (``--dry-run``: would be) deleted: items and bytes."""
    from mailfax.store.retention import purge, report_lines

    settings = _settings(args)

    async def action(store: Store) -> int:
        report = await purge(settings, store, dry_run=args.dry_run)
        if args.json:
            print(json.dumps(report.as_json(settings.retention), indent=1))
        else:
            print("\n".join(report_lines(report, settings.retention)))
        return EXIT_FAILED if report.store_busy else EXIT_OK

    return _run_with_store(args, action)


def cmd_migrate(args: argparse.Namespace) -> int:
    from mailfax.app import redact_url
    from mailfax.store import migrate

    settings = _settings(args)
    settings.data_dir.mkdir(0o750, parents=True, exist_ok=True)
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
    """Load the config and make every check ``serve`` makes before it starts (same messages:
    :func:`mailfax.app.preflight`), reading the secrets too."""
    from mailfax.app import preflight
    from mailfax.config import config_path, load_settings

    path = config_path(args.file or args.config)
    settings = load_settings(path)
    preflight(settings)
    where = str(path) if path else "built-in defaults"
    print(f"{where}: OK ({len(settings.accounts)} account(s), fax domains "
          f"{', '.join(settings.fax_domains)}, store {settings.store_url.split('://')[0]}, "
          f"data in {settings.data_dir})")
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    """The service as its clients see it: the first listener's banner, a store write (see
    :mod:`mailfax.health`). Reads the same config as serve (-c or $MAILFAX_CONFIG)."""
    from mailfax.health import check_health

    health = asyncio.run(check_health(_settings(args)))
    print(health.line)
    return EXIT_OK if health.ok else EXIT_FAILED


def cmd_check_account(args: argparse.Namespace) -> int:
    """Load the account's provider as serve would (FAX.de: its WSDL), make one harmless
    authenticated call, print what was learnt; 1 when the account does not work."""
    from mailfax.providers.check import check_account

    result = asyncio.run(check_account(_settings(args), args.name))
    print("\n".join(result.lines))
    return 0 if result.ok else 1


def cmd_emulate(args: argparse.Namespace) -> int:
    if args.provider == "receive":
        return cmd_emulate_receive(args)
    if args.file or args.to or args.caller or args.remote_id or args.account:
        print("mailfax: FILE, --to, --from, --remote-id and --account are for "
              "mailfax emulate receive", file=sys.stderr)
        return EXIT_USAGE
    from mailfax.config import ListenAddress
    from mailfax.emulators import emulator_module

    address = ListenAddress(args.listen)
    options = dict(option.split("=", 1) for option in args.option if "=" in option)
    try:
        module = emulator_module(args.provider)
    except ValueError as error:
        print(f"mailfax: {error}; or: mailfax emulate receive FILE --to NUMBER",
              file=sys.stderr)
        return EXIT_USAGE

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
    return EXIT_OK


def cmd_emulate_receive(args: argparse.Namespace) -> int:
    """A fax arrives at the bundled emulator: into its inbox folder, for ``serve`` to fetch."""
    from mailfax.emulators.fax_image import FaxImageError, fax_image_of, sample_fax
    from mailfax.numbers import InvalidNumber, parse_fax_local_part
    from mailfax.providers import emulator

    settings = _settings(args)
    name = args.account or settings.default_account
    account = settings.accounts.get(name)
    if account is None or account.provider != "emulator":
        print(f"mailfax: account {name} is not a bundled emulator account; name one with "
              f"--account", file=sys.stderr)
        return EXIT_USAGE
    options = account.provider_settings()
    assert isinstance(options, emulator.Settings)
    called = options.fax_number
    if args.to:
        try:
            called = parse_fax_local_part(args.to, settings.numbers.default_country).number
        except InvalidNumber as error:
            print(f"mailfax: --to {args.to}: {error.sentence}", file=sys.stderr)
            return EXIT_USAGE
    try:
        image = fax_image_of(args.file) if args.file else sample_fax(called)
    except FaxImageError as error:
        print(f"mailfax: {error}", file=sys.stderr)
        return EXIT_FAILED
    folder = emulator.inbox_folder(settings.data_dir, options)
    fax_id = emulator.drop_received(folder, image, called, args.caller, args.remote_id)
    print(f"fax {fax_id} to {called} is in {folder}; a running mailfax serve mails it "
          f"within seconds (see mailfax inbox)")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
