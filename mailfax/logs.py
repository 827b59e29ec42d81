"""Log output: plain lines for a terminal, or JSON lines for a log collector."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from datetime import UTC, datetime
from typing import TextIO

_JOB = re.compile(r"\bjob ([0-9a-z]{12})\b")
_FAX = re.compile(r"\bfax ([0-9][0-9A-Za-z-]{0,39})\b")
QUIET_LOGGERS = ("pikepdf", "zeep", "httpx", "httpcore", "aiohttp.access", "aiosmtpd",
                 "mail.log")


class JsonLines(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the job or fax id when the
    message names one (mailfax's messages say "job <id>" / "fax <id>")."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": message,
        }
        if job := _JOB.search(message):
            entry["job"] = job.group(1)
        if fax := _FAX.search(message):
            entry["fax"] = fax.group(1)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class JournalLines(logging.Formatter):
    """Lines for journald (stderr of a systemd service): a ``<N>`` syslog priority on every
    line, so ``journalctl -p err`` finds errors, and no time stamp (journald adds its own)."""

    PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4),
                  (logging.INFO, 6))

    def __init__(self) -> None:
        super().__init__("%(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        priority = next((number for level, number in self.PRIORITIES if record.levelno >= level),
                        7)
        # A traceback is several lines, and journald makes each line an entry of its own.
        return "\n".join(f"<{priority}>{line}" for line in super().format(record).splitlines())


def under_journald(stream: TextIO) -> bool:
    """Whether ``stream`` is connected to the journal: systemd sets ``JOURNAL_STREAM`` to the
    device and inode of that stream (sd_journal_stream_fd(3) says to compare them)."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    try:
        status = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return expected == f"{status.st_dev}:{status.st_ino}"


def configure(verbose: bool, json_lines: bool) -> None:
    handler = logging.StreamHandler()
    if json_lines:
        handler.setFormatter(JsonLines())
    elif under_journald(sys.stderr):
        handler.setFormatter(JournalLines())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
