"""A loop that keeps failing, logged so it is seen without flooding the log.

A dispatcher on a full disk fails every half second; a traceback each time is 48 lines a
second that hide everything else and fill the disk further. :class:`RepeatedFailure` logs the
first failure with its traceback, then at most one line per :data:`REPORT_EVERY_SECONDS`
saying how often it failed meanwhile and with what, and one line when it works again.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable

REPORT_EVERY_SECONDS = 60.0


class RepeatedFailure:
    """The failures of one piece of work (``what``, e.g. "dispatcher: claiming work").

    Call :meth:`failed` in the ``except`` block, :meth:`succeeded` when it worked."""

    def __init__(self, logger: logging.Logger, what: str, *, interval: float | None = None,
                 level: int = logging.ERROR, traceback: bool = True,
                 clock: Callable[[], float] = time.monotonic):
        self.logger = logger
        self.what = what
        self.interval = REPORT_EVERY_SECONDS if interval is None else interval
        self.level = level
        self.traceback = traceback
        self.clock = clock
        self.failures = 0  # since it last worked
        self._since_report = 0
        self._first_at = self._reported_at = 0.0

    def failed(self, detail: str = "") -> None:
        """Count the failure being handled; log it if it is the first, or if the last line
        is :attr:`interval` old. ``detail`` is added to the first line (e.g. "restarting in
        2 s")."""
        now = self.clock()
        error = sys.exc_info()[1]
        self.failures += 1
        if self.failures == 1:
            self._first_at = self._reported_at = now
            suffix = f"; {detail}" if detail else ""
            if self.traceback:
                self.logger.log(self.level, "%s failed%s", self.what, suffix, exc_info=True)
            else:
                self.logger.log(self.level, "%s failed%s: %s", self.what, suffix,
                                describe(error))
            return
        self._since_report += 1
        if now - self._reported_at >= self.interval:
            self.logger.log(self.level, "%s still failing, %d times in the last %.0f s: %s",
                            self.what, self._since_report, now - self._reported_at,
                            describe(error))
            self._since_report = 0
            self._reported_at = now

    def succeeded(self) -> None:
        """It worked: log the recovery if it had failed."""
        if not self.failures:
            return
        self.logger.warning("%s works again, after %d failures in %.0f s", self.what,
                            self.failures, self.clock() - self._first_at)
        self.failures = self._since_report = 0


def describe(error: BaseException | None) -> str:
    if error is None:
        return "no exception"
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200]}" if text else type(error).__name__
