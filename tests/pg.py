"""A throwaway PostgreSQL server for tests, from Debian's packages (``postgresql``).

:func:`start_postgres` runs ``initdb`` in a temporary folder and starts the server with
``pg_ctl`` on a free port on 127.0.0.1 only (no Unix socket, trust authentication, fsync off:
the data is thrown away). Run as root, the server runs as the ``postgres`` system user (via
``runuser``, else ``su``) in a folder owned by it. :meth:`PostgresServer.stop` stops it and
removes the folder. Without the binaries it raises :class:`PostgresUnavailable`, which tests
turn into a skip, or into a failure when ``MAILFAX_REQUIRE_POSTGRES=1`` (for CI).
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from tests.ports import free_port

SUPERUSER = "mailfax"
BIN_GLOB = "/usr/lib/postgresql/*/bin"
TOOLS = ("initdb", "pg_ctl", "postgres")

_names = itertools.count(1)


class PostgresUnavailable(Exception):
    """No PostgreSQL server can be started here (the reason says why)."""


def required() -> bool:
    """Whether a missing PostgreSQL is an error rather than a reason to skip."""
    return os.environ.get("MAILFAX_REQUIRE_POSTGRES", "") not in ("", "0")


@contextlib.contextmanager
def server_for_tests() -> Iterator[PostgresServer]:
    """A server for a fixture: the test skips without PostgreSQL, and fails instead when
    MAILFAX_REQUIRE_POSTGRES is set (CI)."""
    try:
        server = start_postgres()
    except PostgresUnavailable as error:
        if required():
            pytest.fail(f"MAILFAX_REQUIRE_POSTGRES is set but: {error}")
        pytest.skip(str(error))
    try:
        yield server
    finally:
        server.stop()


def find_bin_dir() -> Path | None:
    """The newest Debian PostgreSQL bin folder with initdb, pg_ctl and postgres (or PATH's)."""
    def version(folder: str) -> tuple[int, ...]:
        name = Path(folder).parent.name
        return tuple(int(part) for part in name.split(".") if part.isdigit())

    candidates = [Path(folder) for folder in sorted(glob.glob(BIN_GLOB), key=version,
                                                    reverse=True)]
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(Path(on_path).parent)
    for folder in candidates:
        if all((folder / tool).is_file() for tool in TOOLS):
            return folder
    return None


class PostgresServer:
    def __init__(self, bin_dir: Path, base: Path, run_as: str | None):
        self.bin_dir = bin_dir
        self.base = base
        self.data = base / "data"
        self.log = base / "postgres.log"
        self.run_as = run_as
        self.port = 0

    # -- running the tools -------------------------------------------------------------------

    def _command(self, tool: str, *args: str) -> list[str]:
        command = [str(self.bin_dir / tool), *args]
        if self.run_as is None:
            return command
        if shutil.which("runuser"):
            return ["runuser", "-u", self.run_as, "--", *command]
        return ["su", "-s", "/bin/sh", self.run_as, "-c", shlex.join(command)]

    def _run(self, tool: str, *args: str, timeout: float = 120) -> None:
        result = subprocess.run(self._command(tool, *args), cwd=self.base, capture_output=True,
                                text=True, timeout=timeout, check=False)
        if result.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{tool} {' '.join(args)} failed ({result.returncode}):\n"
                               f"{result.stdout}{result.stderr}{log}")

    # -- lifecycle ---------------------------------------------------------------------------

    def init(self) -> None:
        self._run("initdb", "--pgdata", str(self.data), "--username", SUPERUSER,
                  "--auth", "trust", "--encoding", "UTF8", "--locale", "C", "--no-sync")

    def start(self, attempts: int = 3) -> None:
        for attempt in range(attempts):
            self.port = free_port()
            # Later lines win in postgresql.conf: each attempt appends its own port.
            with (self.data / "postgresql.conf").open("a") as conf:
                conf.write(
                    "\n# mailfax tests\n"
                    "listen_addresses = '127.0.0.1'\n"
                    f"port = {self.port}\n"
                    "unix_socket_directories = ''\n"
                    "fsync = off\n"
                    "full_page_writes = off\n"
                    "max_connections = 200\n"
                )
            try:
                self._run("pg_ctl", "--pgdata", str(self.data), "--log", str(self.log),
                          "--wait", "--timeout", "60", "start")
                return
            except RuntimeError:  # most likely the port was taken meanwhile
                if attempt == attempts - 1:
                    raise

    def stop(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self._run("pg_ctl", "--pgdata", str(self.data), "--mode", "fast", "--wait",
                          "stop")
        finally:
            shutil.rmtree(self.base, ignore_errors=True)

    # -- databases ---------------------------------------------------------------------------

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A new empty database; its URL."""
        name = f"mailfax_test_{os.getpid()}_{next(_names)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url(name)

    def drop_database(self, url: str) -> None:
        name = url.rsplit("/", 1)[1]
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
                         .format(sql.Identifier(name)))


def start_postgres() -> PostgresServer:
    """Initialise and start a server; raises :class:`PostgresUnavailable` if it can't be."""
    bin_dir = find_bin_dir()
    if bin_dir is None:
        raise PostgresUnavailable(
            f"PostgreSQL server binaries ({', '.join(TOOLS)}) not found in {BIN_GLOB} or PATH;"
            " install Debian's 'postgresql' package")
    run_as = None
    if os.geteuid() == 0:  # initdb and postgres refuse to run as root
        try:
            account = pwd.getpwnam("postgres")
        except KeyError:
            raise PostgresUnavailable(
                "running as root and there is no 'postgres' user to run the server as") from None
        run_as = account.pw_name
    base = Path(tempfile.mkdtemp(prefix="mailfax-pg-"))
    if run_as is not None:
        os.chown(base, account.pw_uid, account.pw_gid)
    server = PostgresServer(bin_dir, base, run_as)
    try:
        server.init()
        server.start()
    except BaseException:
        with contextlib.suppress(Exception):
            server.stop()
        raise
    return server
