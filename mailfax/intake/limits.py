"""Connection-level SMTP limits, like Postfix's ``anvil`` and smtpd's error counters.

Pure counters and decisions; the SMTP edge (:mod:`mailfax.intake.smtp`) asks them and does
the I/O (the ``421 4.7.0`` reply, closing, yielding to the event loop):

- :class:`Connections`: open connections in total and per client address; beyond either
  limit a new connection is refused before any session is set up.
- :class:`Progress`: what counts as progress for the idle timeout. aiosmtpd restarts the
  timer at each complete command line; bytes restart it only when they come at
  ``min_data_rate`` or faster on average, so a slow upload keeps going while a trickle of a
  byte now and then is cut off at the timeout.
- :class:`SessionCounters`: per session, junk commands (NOOP, RSET, VRFY, …), error replies,
  and replies sent since the session last let other sessions run.
"""

from __future__ import annotations

from dataclasses import dataclass

# Commands that do not move a mail forward; a session may send only so many of them.
JUNK_COMMANDS = frozenset({"NOOP", "RSET", "VRFY", "EXPN", "HELP", "HELO", "EHLO", "LHLO"})


@dataclass(frozen=True)
class SessionLimits:
    """The ``[smtp]`` limits a session runs under (see :class:`~mailfax.config.SmtpSettings`)."""

    junk_command_limit: int = 100
    hard_error_limit: int = 20
    commands_per_turn: int = 10
    min_data_rate: float = 500.0


class Slot:
    """One admitted connection; :meth:`release` (idempotent) gives its place back."""

    def __init__(self, connections: Connections, client: str):
        self._connections: Connections | None = connections
        self.client = client

    def release(self) -> None:
        connections, self._connections = self._connections, None
        if connections is not None:
            connections._closed(self.client)


class Connections:
    """Open connections, in total and per client address (anvil's connection count)."""

    def __init__(self, total: int, per_client: int):
        self.total = total
        self.per_client = per_client
        self._open = 0
        self._by_client: dict[str, int] = {}

    @property
    def open(self) -> int:
        return self._open

    def admit(self, client: str) -> Slot | str:
        """A slot for a new connection from ``client``, or why it is refused."""
        if self._open >= self.total:
            return "Too many connections to this server; try again later"
        if self._by_client.get(client, 0) >= self.per_client:
            return "Too many connections from your address; try again later"
        self._open += 1
        self._by_client[client] = self._by_client.get(client, 0) + 1
        return Slot(self, client)

    def _closed(self, client: str) -> None:
        self._open -= 1
        left = self._by_client[client] - 1
        if left:
            self._by_client[client] = left
        else:
            del self._by_client[client]


@dataclass
class RefusalLog:
    """When to log refused connections: the first at once, then one line per ``interval``
    seconds at most, with the count since the last line (a flood of connections must not
    become a flood of log lines)."""

    interval: float = 10.0
    last: float | None = None
    unlogged: int = 0

    def refused(self, now: float) -> int | None:
        """Count a refusal at ``now``; how many to log now (None: not yet)."""
        self.unlogged += 1
        if self.last is not None and now - self.last < self.interval:
            return None
        self.last, count, self.unlogged = now, self.unlogged, 0
        return count


@dataclass
class Progress:
    """Whether received bytes are progress that restarts the idle timer: since the timer was
    last restarted, the client must have sent at least ``min_rate`` bytes a second."""

    min_rate: float
    since: float = 0.0
    received: int = 0

    def restart(self, now: float) -> None:
        self.since = now
        self.received = 0

    def data(self, size: int, now: float) -> bool:
        """Count ``size`` bytes received at ``now``; True if they are progress (the caller
        restarts the timer, and with it this count)."""
        self.received += size
        return self.received >= self.min_rate * (now - self.since)


@dataclass
class SessionCounters:
    """What one session has used of its :class:`SessionLimits`."""

    limits: SessionLimits
    junk: int = 0
    errors: int = 0
    replies_this_turn: int = 0

    def command(self, name: str) -> str | None:
        """Count a command; the reason to end the session if it is one junk command too
        many."""
        if name not in JUNK_COMMANDS:
            return None
        self.junk += 1
        if self.junk > self.limits.junk_command_limit:
            return "Too many commands that do not send mail; goodbye"
        return None

    def reply(self, status: str) -> str | None:
        """Count a reply to the client; the reason to end the session if it is one error
        (a 5xx: the command cannot succeed as sent) too many."""
        if not status.startswith("5"):
            return None
        self.errors += 1
        if self.errors > self.limits.hard_error_limit:
            return "Too many errors; goodbye"
        return None

    def turn_over(self) -> bool:
        """Count a reply; True every ``commands_per_turn`` replies, when the session should
        let the event loop run the other sessions (a client may pipeline thousands of
        commands in one write, and aiosmtpd answers buffered commands without yielding)."""
        self.replies_this_turn += 1
        if self.replies_this_turn < self.limits.commands_per_turn:
            return False
        self.replies_this_turn = 0
        return True
