"""Log output: plain lines for a terminal, or JSON lines for a log collector."""

from __future__ import annotations

import json
import logging
import re
from datetime import UTC, datetime

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


def configure(verbose: bool, json_lines: bool) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonLines() if json_lines else logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
