"""The receiving side's commands: ``mailfax route`` (which rule a fax would take, and why, like
``postmap -q``), ``mailfax block`` (add to the junk-fax block file) and ``mailfax inbox show
FAXID [--pdf|--tiff]`` (one received fax, and its document, also in privacy mode)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

# `mailfax jobs` builds the parser, so add_commands is imported by every command: the config
# (pydantic), the routing rules and asyncio are imported by the commands that use them
# (tests/test_cli_imports.py).
if TYPE_CHECKING:
    import asyncio

    from mailfax.config import InboundRoute, Settings
    from mailfax.inbound.routing import RouteChoice
    from mailfax.store.base import Store
else:
    from mailfax.support.lazy import lazy_module

    asyncio = lazy_module("asyncio")

Command = Callable[..., argparse.ArgumentParser]


def add_commands(command: Command, inbox: argparse.ArgumentParser) -> None:
    """Register ``route`` and ``block`` with ``build_parser``'s ``command`` helper, and the
    ``show`` action of the existing ``inbox`` command."""
    route = command("route", "which inbound rule a received fax would take, and why",
                    cmd_route)
    route.add_argument("number", nargs="+", metavar="NUMBER",
                       help="the called number, any spelling (030 1234567 is one number)")
    route.add_argument("--caller", default="", metavar="NUMBER", help="the sender's number")
    route.add_argument("--tsi", default="", metavar="STATION_ID",
                       help="the sender's station id")
    route.add_argument("--account", help="the account it comes in at (default: "
                                         "default_account)")
    route.add_argument("--json", action="store_true")

    block = command("block", "delete faxes from this caller (or station id) unread",
                    cmd_block, description=BLOCK_DESCRIPTION)
    block.add_argument("caller", nargs="*", metavar="CALLER",
                       help="a caller number or number prefix, any spelling (0190 1 is one)")
    block.add_argument("--tsi", metavar="REGEX", help="a station id, as a regular expression")

    inbox.add_argument("action", nargs="?", choices=["show"],
                       help="show FAXID: one received fax")
    inbox.add_argument("fax_id", nargs="?", metavar="FAXID")
    inbox.add_argument("--pdf", nargs="?", const="-", metavar="FILE",
                       help="show: write the fax as PDF to FILE (default: standard output)")
    inbox.add_argument("--tiff", nargs="?", const="-", metavar="FILE",
                       help="show: write the fax as received (TIFF) to FILE")
    inbox.add_argument("--account", help="show: the account, when two have this FAXID")


BLOCK_DESCRIPTION = """\
Faxes from a blocked caller (a number prefix: +4940555 blocks every number that starts with
it) or station id (a regular expression, searched for in any case) are deleted at the provider
and counted (state "blocked" in mailfax inbox), never mailed. The entry goes into the block
file <data_dir>/inbound-blocklist, which a running mailfax serve reads at every fax; the
config's inbound.block_callers and inbound.block_tsi apply as well. Without arguments: the
block list as it is."""


# -- mailfax route ----------------------------------------------------------------------------

def cmd_route(args: argparse.Namespace) -> int:
    from mailfax.cli import _settings
    from mailfax.inbound.routing import FaxFacts, choose_route
    from mailfax.inbound.screening import block_file, blocked_by, read_block_list

    settings = _settings(args)
    facts = FaxFacts(called=" ".join(args.number), caller=args.caller, tsi=args.tsi,
                     account=args.account or settings.default_account)
    blocks = read_block_list(block_file(settings.data_dir), settings.inbound)
    blocked = blocked_by(facts, blocks, settings.numbers.default_country)
    choice = choose_route(facts, settings.inbound, settings.numbers.default_country)
    if args.json:
        rule = choice.rule
        json.dump({"blocked": blocked, "rule": choice.number, "name": rule.name,
                   "reasons": list(choice.reasons),
                   **rule.model_dump(include=set(ROUTE_FIELDS)),
                   "format": effective_format(rule, settings),
                   "language": rule.language or settings.inbound.language},
                  sys.stdout, indent=1)
        print()
        return 0
    print(describe_route(choice, blocked, settings))
    return 0


ROUTE_FIELDS = ("to", "cc", "bcc", "format", "language", "template", "subject", "folder",
                "notify_postmaster")


def effective_format(rule: InboundRoute, settings: Settings) -> str:
    from mailfax.inbound.routing import attachment_format

    return attachment_format(rule, settings.inbound.attach_tiff)


def describe_route(choice: RouteChoice, blocked: str | None, settings: Settings) -> str:
    """What ``mailfax route`` prints: the rule, why it matched, and what it sets."""
    rule: InboundRoute = choice.rule
    inbound = settings.inbound
    lines = []
    if blocked is not None:
        lines.append(f"blocked ({blocked}): deleted at the provider, never mailed; "
                     f"without the block:")
    lines.append(f"{choice.label}: {'; '.join(choice.reasons)}")
    form = effective_format(rule, settings)
    values: list[tuple[str, Any]] = [
        ("to", ", ".join(rule.to)), ("cc", ", ".join(rule.cc) or "-"),
        ("bcc", ", ".join(rule.bcc) or "-"),
        ("format", form + (" (privacy: no document in the mail)" if form == "none" else "")),
        ("language", rule.language or inbound.language), ("template", rule.template),
        ("subject", rule.subject or "(the template's)"),
        ("folder", rule.folder or ("-" if settings.imap_delivery is None else
                                   "(imap_delivery's)")),
        ("postmaster", inbound.postmaster + (" (gets it too)" if rule.notify_postmaster
                                             else " (only for unreadable faxes)")),
    ]
    lines += [f"  {name + ':':<11} {value}" for name, value in values]
    return "\n".join(lines)


# -- mailfax block ----------------------------------------------------------------------------

def cmd_block(args: argparse.Namespace) -> int:
    from mailfax.cli import _settings
    from mailfax.inbound.screening import (
        BlockFileError,
        add_block_entry,
        block_file,
        read_block_list,
    )

    settings = _settings(args)
    path = block_file(settings.data_dir)
    entries = [("caller", " ".join(args.caller))] if args.caller else []
    if args.tsi:
        entries.append(("tsi", args.tsi))
    if not entries:
        blocks = read_block_list(path, settings.inbound)
        for caller in blocks.callers:
            print(f"caller {caller}")
        for station in blocks.station_ids:
            print(f"tsi {station}")
        for problem in blocks.problems:
            print(f"mailfax: {path}, {problem}: skipped", file=sys.stderr)
        return 0
    for kind, value in entries:
        try:
            added = add_block_entry(path, kind, value)
        except BlockFileError as error:
            print(f"mailfax: {error}", file=sys.stderr)
            return 2
        print(f"{'blocked' if added else 'already blocked'}: {kind} {value.strip()} ({path}; "
              f"a running mailfax serve applies it to the next fax)")
    return 0


# -- mailfax inbox show -----------------------------------------------------------------------

def cmd_inbox_show(args: argparse.Namespace) -> int:
    from mailfax.cli import _run_with_store

    if args.action != "show" or not args.fax_id:
        print("mailfax: write mailfax inbox show FAXID [--pdf [FILE]] [--tiff [FILE]] (the "
              "FAXID from mailfax inbox)", file=sys.stderr)
        return 2

    async def action(store: Store) -> int:
        found = [record for record in await store.find_inbound(args.fax_id)
                 if args.account in (None, record.account)]
        if not found:
            print(f"mailfax: no received fax {args.fax_id}", file=sys.stderr)
            return 1
        if len(found) > 1:
            print(f"mailfax: fax {args.fax_id} is at several accounts "
                  f"({', '.join(r.account for r in found)}): give --account", file=sys.stderr)
            return 1
        record = found[0]
        if args.pdf is None and args.tiff is None:
            for name, value in (("fax", record.fax_id), ("account", record.account),
                                ("received", record.received_at.astimezone().isoformat()),
                                ("from", record.originator or "-"),
                                ("station id", record.remote_id or "-"),
                                ("to", record.called_number), ("pages", record.pages),
                                ("state", record.state), ("mails", record.deliveries)):
                print(f"{name + ':':<12} {value}")
            return 0
        image = await store.inbound_image(record.account, record.fax_id)
        if not image:
            print(f"mailfax: fax {record.fax_id} ({record.account}) has no image stored: the "
                  "provider delivered none, or retention deleted it", file=sys.stderr)
            return 1
        if args.tiff is not None:
            return await write_out(image, args.tiff)
        return await write_pdf(image, args.pdf)

    return _run_with_store(args, action)


async def write_pdf(image: bytes, target: str) -> int:
    from mailfax.inbound.convert import NotConvertible, tiff_to_pdf

    try:
        converted = await asyncio.to_thread(tiff_to_pdf, image)
    except NotConvertible as error:
        print(f"mailfax: {error} Write the file as received with --tiff.", file=sys.stderr)
        return 1
    return await write_out(converted.pdf, target)


async def write_out(data: bytes, target: str) -> int:
    if target == "-":
        if sys.stdout.isatty():
            print("mailfax: not writing a binary file to a terminal; give a FILE or "
                  "redirect the output", file=sys.stderr)
            return 2
        out: BinaryIO = sys.stdout.buffer
        out.write(data)
        out.flush()
        return 0
    await asyncio.to_thread(Path(target).write_bytes, data)
    print(f"{target}: {len(data)} bytes", file=sys.stderr)
    return 0
