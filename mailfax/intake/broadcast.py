"""Broadcast lists: ``list-customers@fax.local`` becomes one fax job per number of a list.

The lists (``[lists.NAME]`` in the config, numbers from a CSV file or the config itself) are
read and checked when mailfax starts (``preflight``, also ``check-config``): a number that is
not a fax number refuses the start, naming the file and its line, so that no list is sent
with a number silently missing. Who may use a list is checked at RCPT; at DATA each number is
checked against the dial policy (and the user's prefixes) as a single fax would be: a number
refused there gets no job and is listed as refused in the summary mail
(mailfax/outbound/broadcast.py).

Pure logic and file reading; no sockets. What a job of a list carries, in ``Job.options``:
``broadcast`` (the list's name, see OPTIONS.md), ``broadcast_name`` (the recipient's name from
the list) and ``broadcast_index`` (its place in the list); the first job of the mail also
carries ``broadcast_refused``: the numbers refused by the dial policy, with the reasons.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mailfax.config import BroadcastEntry, BroadcastListSettings, ConfigError, Settings
from mailfax.intake.assemble import Refusal
from mailfax.numbers import FaxAddress, InvalidNumber, parse_fax_local_part
from mailfax.trust.policy import address_allowed, is_fax_domain, split_address

BROADCAST = "broadcast"  # the options key of OPTIONS.md: the list a job came from
NAME = "broadcast_name"
INDEX = "broadcast_index"
REFUSED = "broadcast_refused"
NUMBER_HEADERS = frozenset({"number", "fax", "fax number", "faxnumber", "nummer",
                            "faxnummer", "fax-nummer", "telefax"})
NAME_HEADERS = frozenset({"name", "recipient", "empfänger", "empfaenger", "firma", "company"})


@dataclass(frozen=True)
class ListEntry:
    number: str  # E.164
    name: str
    index: int  # its place in the list, from 0


@dataclass(frozen=True)
class BroadcastList:
    name: str
    entries: tuple[ListEntry, ...]
    settings: BroadcastListSettings


@dataclass(frozen=True)
class RefusedEntry:
    number: str
    name: str
    index: int
    reason: str

    def as_json(self) -> dict[str, Any]:
        return {"number": self.number, "name": self.name, "index": self.index,
                "reason": self.reason}


@dataclass(frozen=True)
class ListRecipient:
    """A list address accepted at RCPT; ``number`` is what the RCPT reply says of it."""

    name: str
    count: int  # numbers that may be dialled

    @property
    def number(self) -> str:
        return f"list {self.name} ({self.count} number{'' if self.count == 1 else 's'})"


@dataclass(frozen=True)
class Expansion:
    """A list mail's recipients: the fax addresses that become jobs, and those refused."""

    broadcast: BroadcastList
    addresses: list[FaxAddress]
    refused: list[RefusedEntry] = field(default_factory=list)

    def job_options(self) -> dict[str, dict[str, Any]]:
        """Options per E.164 number for the jobs of this list."""
        options: dict[str, dict[str, Any]] = {}
        by_number = {entry.number: entry for entry in self.broadcast.entries}
        for address in self.addresses:
            entry = by_number[address.number]
            options[address.number] = {BROADCAST: self.broadcast.name, NAME: entry.name,
                                       INDEX: entry.index}
            if self.broadcast.settings.job_mails == "failure":
                options[address.number]["notify"] = "failure"
        if self.addresses and self.refused:
            first = options[self.addresses[0].number]
            first[REFUSED] = [entry.as_json() for entry in self.refused]
        return options


# -- reading the lists --------------------------------------------------------------------


def load_lists(settings: Settings) -> dict[str, BroadcastList]:
    """Every ``[lists.NAME]``, read and its numbers checked; ConfigError naming the list, the
    file and the line of the first problem."""
    country = settings.numbers.default_country
    lists: dict[str, BroadcastList] = {}
    for name, list_settings in settings.lists.items():
        if list_settings.file is not None:
            rows = _csv_rows(name, list_settings.file)
        else:
            rows = [(f"lists.{name}.numbers[{index}]", *_inline(item))
                    for index, item in enumerate(list_settings.numbers)]
        lists[name] = BroadcastList(name, _entries(name, rows, country), list_settings)
    return lists


def lists_problem(settings: Settings) -> str | None:
    """Why the broadcast lists cannot be used, or None (for ``preflight``)."""
    try:
        load_lists(settings)
    except ConfigError as error:
        return str(error)
    return None


def _inline(item: str | BroadcastEntry) -> tuple[str, str]:
    return (item, "") if isinstance(item, str) else (item.number, item.name)


def _csv_rows(name: str, path: Path) -> list[tuple[str, str, str]]:
    """(where, number, name) of each row of a list's CSV file; ``where`` is "file line N"."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as error:
        raise ConfigError(f"lists.{name}.file: cannot read {path}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"lists.{name}.file: {path} is not UTF-8 text") from None
    lines = text.splitlines()
    first = next((line for line in lines if line.strip() and not line.startswith("#")), "")
    delimiter = max(",;\t", key=first.count) if any(c in first for c in ",;\t") else ","
    number_column, name_column = 0, 1
    rows: list[tuple[str, str, str]] = []
    header_seen = False
    for line_number, cells in enumerate(csv.reader(io.StringIO(text), delimiter=delimiter),
                                        start=1):
        cells = [cell.strip() for cell in cells]
        if not any(cells) or cells[0].startswith("#"):
            continue
        if not header_seen:
            header_seen = True
            names = [cell.lower() for cell in cells]
            if NUMBER_HEADERS & set(names):
                number_column = next(i for i, cell in enumerate(names) if cell in NUMBER_HEADERS)
                name_column = next((i for i, cell in enumerate(names) if cell in NAME_HEADERS),
                                   -1)
                continue
        where = f"{path} line {line_number}"
        if number_column >= len(cells) or not cells[number_column]:
            raise ConfigError(f"lists.{name}: {where}: no number in column "
                              f"{number_column + 1}")
        shown_name = cells[name_column] if 0 <= name_column < len(cells) else ""
        rows.append((where, cells[number_column], shown_name))
    return rows


def _entries(name: str, rows: Sequence[tuple[str, str, str]],
             country: str) -> tuple[ListEntry, ...]:
    """The rows as E.164 entries, the first of each number kept."""
    entries: dict[str, ListEntry] = {}
    for where, number, shown_name in rows:
        try:
            parsed = parse_fax_local_part(number, country)
        except InvalidNumber as error:  # its sentence is about an address: none here
            sentence = error.sentence.replace(" before the @.", ".")
            raise ConfigError(f"lists.{name}: {where}: {sentence}") from None
        if parsed.tag:
            raise ConfigError(f"lists.{name}: {where}: {number!r} is not a fax number")
        entries.setdefault(parsed.number, ListEntry(parsed.number, shown_name, len(entries)))
    if not entries:
        raise ConfigError(f"lists.{name}: the list has no numbers")
    return tuple(entries.values())


# -- at RCPT and DATA -----------------------------------------------------------------------


def list_name_of(address: str, settings: Settings) -> tuple[str, str] | None:
    """(list name, sub-address tag) if ``address`` is a list address in a fax domain (the
    list may not exist), else None."""
    local, domain = split_address(address)
    prefix = settings.list_prefix.lower()
    if not domain or not is_fax_domain(domain, settings.fax_domains) or \
            not local.lower().startswith(prefix):
        return None
    name, _, tag = local[len(prefix):].lower().partition("+")
    return name, tag


def find_list(address: str, lists: dict[str, BroadcastList],
              settings: Settings) -> tuple[BroadcastList, str]:
    """The list an address names, and its tag; Refusal 550 5.1.1 for an unknown list."""
    found = list_name_of(address, settings)
    assert found is not None
    name, tag = found
    if name not in lists:
        raise Refusal(550, "5.1.1", f"There is no broadcast list <{address}> here.")
    return lists[name], tag


def check_allowed(broadcast: BroadcastList, envelope_from: str) -> None:
    if not address_allowed(envelope_from, broadcast.settings.allowed):
        raise Refusal(550, "5.7.1", f"Not allowed: <{envelope_from}> may not send to the "
                      f"broadcast list {broadcast.name}.")


def expand(broadcast: BroadcastList, tag: str,
           check: Callable[[FaxAddress], None]) -> Expansion:
    """The list's numbers as fax addresses; those ``check`` refuses (its Refusal's sentence:
    the dial policy, the user's prefixes) apart. Refusal 550 5.7.1 if none is left."""
    addresses: list[FaxAddress] = []
    refused: list[RefusedEntry] = []
    for entry in broadcast.entries:
        address = FaxAddress(number=entry.number, tag=tag)
        try:
            check(address)
        except Refusal as refusal:
            refused.append(RefusedEntry(entry.number, entry.name, entry.index,
                                        refusal.sentence))
            continue
        addresses.append(address)
    if not addresses:
        raise Refusal(550, "5.7.1", f"None of the {len(refused)} numbers of the broadcast list "
                      f"{broadcast.name} may be dialled: {refused[0].reason}")
    return Expansion(broadcast, addresses, refused)


def broadcast_reply(list_name: str, job_count: int, refused: int, mail_id: str) -> str:
    """The 250 to a list mail: one line, however long the list (no job ids)."""
    also = f", {refused} number{'' if refused == 1 else 's'} refused by the dial policy" \
        if refused else ""
    return (f"250 2.0.0 queued as {job_count} fax{'' if job_count == 1 else 'es'} to the "
            f"broadcast list {list_name} (mail {mail_id}{also}); a summary follows by mail")
