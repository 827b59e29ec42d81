"""Which received faxes are not mailed: junk from blocked callers or station ids, and the same
fax received a second time.

Such a fax is still stored first (the poller's order: store, decide, delete at the provider),
marked ``blocked`` or ``duplicate`` instead of being mailed, and counted (``mailfax inbox``,
the metric ``mailfax_inbound_screened``).

The block list is the config's ``inbound.block_callers``/``block_tsi`` plus the block file
``<data_dir>/inbound-blocklist`` that ``mailfax block`` appends to (one entry a line:
``caller +4940555123`` for a number prefix, ``tsi REGEX`` for a station id; ``#`` comments).
The file is read at every fax, so a new entry applies without a restart.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mailfax.config import InboundSettings
from mailfax.inbound.routing import MAX_TSI, FaxFacts, normalise_number

BLOCK_FILE = "inbound-blocklist"
SCREENED_STATES = ("blocked", "duplicate")  # stored, deleted at the provider, never mailed


class BlockFileError(ValueError):
    """A line of the block file that is not ``caller NUMBER`` or ``tsi REGEX``."""


@dataclass(frozen=True)
class BlockList:
    callers: tuple[str, ...] = ()  # number prefixes, as written (normalised when compared)
    station_ids: tuple[str, ...] = ()  # regular expressions
    problems: tuple[str, ...] = field(default=())  # lines of the file that were skipped


def block_file(data_dir: Path) -> Path:
    return data_dir / BLOCK_FILE


def parse_block_file(text: str) -> BlockList:
    """The entries of a block file; a bad line is skipped and named in ``problems``."""
    callers: list[str] = []
    station_ids: list[str] = []
    problems: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            kind, value = parse_entry(line)
        except BlockFileError as error:
            problems.append(f"line {number}: {error}")
            continue
        (callers if kind == "caller" else station_ids).append(value)
    return BlockList(tuple(callers), tuple(station_ids), tuple(problems))


def parse_entry(line: str) -> tuple[str, str]:
    kind, _, value = line.partition(" ")
    value = value.strip()
    if kind not in ("caller", "tsi") or not value:
        raise BlockFileError(f"{line!r} is not 'caller NUMBER' or 'tsi REGEX'")
    if kind == "tsi":
        try:
            re.compile(value)
        except re.error as error:
            raise BlockFileError(f"{value!r} is not a regular expression: {error}") from None
    elif not any(ch.isdigit() for ch in value):
        raise BlockFileError(f"{value!r} is not a number")
    return kind, value


def read_block_list(path: Path | None, settings: InboundSettings) -> BlockList:
    """The config's entries and the block file's (blocking: run in a thread)."""
    try:
        text = path.read_text(encoding="utf-8") if path is not None else ""
    except FileNotFoundError:
        text = ""
    from_file = parse_block_file(text)
    return BlockList((*settings.block_callers, *from_file.callers),
                     (*settings.block_tsi, *from_file.station_ids), from_file.problems)


def add_block_entry(path: Path, kind: str, value: str) -> bool:
    """Append ``kind value`` to the block file; False if it is there already."""
    line = " ".join(parse_entry(f"{kind} {value.strip()}"))
    try:
        existing = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        existing = []
    if line in (entry.strip() for entry in existing):
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        if not existing:
            handle.write("# Received faxes from these callers / station ids are deleted, "
                         "never mailed (mailfax block).\n")
        handle.write(line + "\n")
    return True


def blocked_by(facts: FaxFacts, blocks: BlockList, default_country: str) -> str | None:
    """The entry that blocks this fax, as a sentence; None if nothing does."""
    caller = normalise_number(facts.caller, default_country) if facts.caller.strip() else ""
    for entry in blocks.callers:
        prefix = normalise_number(entry, default_country)
        if caller and prefix and caller.startswith(prefix):
            return f"caller {caller} starts with the blocked {prefix}"
    for pattern in blocks.station_ids:
        if facts.tsi and re.search(pattern, facts.tsi[:MAX_TSI], re.IGNORECASE):
            return f"station id {facts.tsi!r} matches the blocked /{pattern}/"
    return None


def page_hashes(image: bytes) -> tuple[str, ...]:
    """One SHA-256 per page of the decoded picture (so the same pages encoded another way are
    the same fax); the file's own hash when it cannot be decoded. CPU-bound: run in a thread."""
    from PIL import Image  # only here: the CLI (`mailfax block`, `route`) never decodes

    from mailfax.inbound.convert import MAX_PAGE_PIXELS

    try:
        with Image.open(io.BytesIO(image)) as picture:
            hashes = []
            for index in range(getattr(picture, "n_frames", 1)):
                picture.seek(index)
                if picture.width * picture.height > MAX_PAGE_PIXELS:
                    raise ValueError("page too large")
                page = picture.convert("1")
                digest = hashlib.sha256(f"{page.width}x{page.height}:".encode())
                digest.update(page.tobytes())
                hashes.append(digest.hexdigest())
            return tuple(hashes)
    except Exception:  # an undecodable fax is compared by its bytes
        return (hashlib.sha256(image).hexdigest(),)


def same_fax(first: Sequence[str], second: Sequence[str]) -> bool:
    return bool(first) and tuple(first) == tuple(second)
