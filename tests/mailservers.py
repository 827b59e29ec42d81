"""Real Postfix and Dovecot for the integration tests, each with its own config and spool in a
temp folder, on loopback and free unprivileged ports. Nothing outside the temp folder changes,
so runs do not trip over each other or over a system Postfix/Dovecot.

Postfix's main.cf/master.cf/transport are built from the files in deploy/postfix/ (the same
files the docs show), with only ports and paths substituted.

The helpers are synchronous (subprocess): they run in fixtures, not on the event loop. Reading
a mailbox uses the standard library's imaplib — independent of mailfax's own IMAP client —
wrapped in asyncio.to_thread where a test awaits it.
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import imaplib
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest

from tests.ports import free_port

ROOT = Path(__file__).resolve().parents[1]
DEPLOY_POSTFIX = ROOT / "deploy" / "postfix"
DEPLOY_DOVECOT = ROOT / "deploy" / "dovecot"
SBIN = ["/usr/sbin", "/usr/local/sbin", "/sbin"]
FAX_DOMAIN = "fax.example.org"  # the domain the deploy files name
MAIL_DOMAIN = "example.org"
PASSWORD = "secret"
START_TIMEOUT = 30.0


def which(program: str) -> str | None:
    path = os.pathsep.join([os.environ.get("PATH", ""), *SBIN])
    return shutil.which(program, path=path)


def require(*programs: str) -> dict[str, str]:
    """The programs' paths; skips the test with the reason if one is missing."""
    found: dict[str, str] = {}
    for program in programs:
        path = which(program)
        if path is None:
            package = {"postfix": "postfix", "postconf": "postfix", "postmap": "postfix",
                       "postqueue": "postfix",
                       "dovecot": "dovecot-imapd dovecot-lmtpd"}.get(program, program)
            pytest.skip(f"{program} not installed (Debian package {package}; .ci/run installs it)")
        found[program] = path
    return found


def wait_for_port(port: int, timeout: float = START_TIMEOUT, what: str = "server") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.1)
    raise RuntimeError(f"{what} does not listen on 127.0.0.1:{port} after {timeout:.0f} s")


def make_root(prefix: str) -> Path:
    """A temp folder the servers' unprivileged users can traverse."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    root.chmod(0o755)
    return root


def run_daemon(argv: list[str], root: Path) -> tuple[int, str]:
    """Run a command that may leave a daemon behind; its output goes to a file, not a pipe
    (a pipe would stay open as long as the daemon runs)."""
    output = root / "command.out"
    with open(output, "wb") as handle:
        returncode = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=handle,
                                    stderr=subprocess.STDOUT, timeout=START_TIMEOUT,
                                    check=False).returncode
    return returncode, output.read_text(errors="replace")


# -- Dovecot -----------------------------------------------------------------------------------


class Dovecot:
    """Dovecot with IMAP and LMTP on loopback, users in a passwd-file, Maildirs under root."""

    def __init__(self, root: Path, users: list[str], extra_config: str = "",
                 user_fields: dict[str, str] | None = None):
        self.root = root
        self.users = users
        self.extra_config = extra_config  # appended to dovecot.conf ({root}: this root)
        self.user_fields = user_fields or {}  # user -> passwd-file extra fields
        self.imap_port = free_port()
        self.lmtp_port = free_port()
        self.auth_port = free_port()  # SASL for Postfix (smtpd_sasl_type = dovecot)
        self.config = root / "dovecot.conf"
        self.log = root / "dovecot.log"
        self.binary = require("dovecot")["dovecot"]

    def write_config(self) -> None:
        root = self.root
        mail = root / "mail"
        public = root / "public"
        for folder in (mail, public):
            folder.mkdir()
            shutil.chown(folder, "dovecot", "dovecot")
        (root / "users").write_text("".join(
            f"{user}:{{PLAIN}}{PASSWORD}::::::{self.user_fields.get(user, '')}\n"
            for user in self.users))
        # The shared Faxes folder: deploy/dovecot/faxes-namespace.conf, paths substituted.
        namespace = (DEPLOY_DOVECOT / "faxes-namespace.conf").read_text().replace(
            "/var/mail/public", str(public))
        self.config.write_text(f"""
base_dir = {root}/run
state_dir = {root}/state
log_path = {self.log}
protocols = imap lmtp
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
mail_uid = dovecot
mail_gid = dovecot
first_valid_uid = 1
mail_location = maildir:{mail}/%d/%n/Maildir
namespace inbox {{
  inbox = yes
  separator = /
}}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {root}/users
}}
userdb {{
  driver = static
  args = home={mail}/%d/%n
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {self.imap_port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service lmtp {{
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {self.lmtp_port}
  }}
  unix_listener lmtp {{
    mode = 0600
  }}
}}
service anvil {{
  chroot =
}}
service auth {{
  inet_listener {{
    address = 127.0.0.1
    port = {self.auth_port}
  }}
}}
protocol lmtp {{
  postmaster_address = postmaster@{MAIL_DOMAIN}
}}
{namespace}
{self.extra_config.replace("{root}", str(root))}
""")

    def start(self) -> None:
        self.write_config()
        returncode, output = run_daemon([self.binary, "-c", str(self.config)], self.root)
        if returncode != 0:
            raise RuntimeError(f"dovecot did not start: {output}{self.log_text()}")
        wait_for_port(self.imap_port, what="dovecot imap")
        wait_for_port(self.lmtp_port, what="dovecot lmtp")
        wait_for_port(self.auth_port, what="dovecot auth")

    def stop(self) -> None:
        pid_file = self.root / "run" / "master.pid"
        with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
            pid = int(pid_file.read_text().split()[0])
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                os.kill(pid, 0)
                time.sleep(0.05)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    # -- reading and writing mailboxes (stdlib imaplib: independent of mailfax's client) --

    def _login(self, user: str) -> imaplib.IMAP4:
        connection = imaplib.IMAP4("127.0.0.1", self.imap_port, timeout=30)
        connection.login(user, PASSWORD)
        return connection

    def append(self, user: str, folder: str, message: bytes) -> None:
        connection = self._login(user)
        try:
            connection.create(_quote(folder))  # "already exists" is fine
            status, data = connection.append(_quote(folder), None, None,
                                             message.replace(b"\r\n", b"\n").replace(
                                                 b"\n", b"\r\n"))
            assert status == "OK", data
        finally:
            connection.logout()

    def messages(self, user: str, folder: str) -> list[EmailMessage]:
        """Every message in a folder (none if the folder does not exist)."""
        connection = self._login(user)
        try:
            status, _ = connection.select(_quote(folder), readonly=True)
            if status != "OK":
                return []
            status, data = connection.uid("SEARCH", "ALL")
            uids = data[0].split() if data and data[0] else []
            found = []
            for uid in uids:
                status, parts = connection.uid("FETCH", uid, "(BODY.PEEK[])")
                for part in parts:
                    if isinstance(part, tuple):
                        parsed = email.message_from_bytes(part[1], policy=email.policy.default)
                        assert isinstance(parsed, EmailMessage)
                        found.append(parsed)
            return found
        finally:
            connection.logout()

    async def wait_for(self, user: str, folder: str,
                       predicate: Callable[[EmailMessage], bool] = lambda message: True,
                       count: int = 1, timeout: float = 30.0) -> list[EmailMessage]:
        """Wait until ``count`` messages in the folder match; returns them."""
        deadline = time.monotonic() + timeout
        matching: list[EmailMessage] = []
        while time.monotonic() < deadline:
            matching = [message for message in await asyncio.to_thread(
                self.messages, user, folder) if predicate(message)]
            if len(matching) >= count:
                return matching
            await asyncio.sleep(0.2)
        raise AssertionError(f"{len(matching)} of {count} expected messages in {user}/{folder} "
                             f"after {timeout:.0f} s")


def _quote(folder: str) -> str:
    return '"' + folder.replace("\\", "\\\\").replace('"', '\\"') + '"'


@contextlib.contextmanager
def running_dovecot(users: list[str], extra_config: str = "",
                    user_fields: dict[str, str] | None = None) -> Iterator[Dovecot]:
    require("dovecot")
    try:
        pwd.getpwnam("dovecot")
    except KeyError:
        pytest.skip("no dovecot system user (Debian package dovecot-core)")
    root = make_root("mailfax-dovecot-")
    dovecot = Dovecot(root, users, extra_config, user_fields)
    try:
        dovecot.start()
        yield dovecot
    finally:
        dovecot.stop()
        shutil.rmtree(root, ignore_errors=True)


# -- Postfix -----------------------------------------------------------------------------------

MASTER_CF_BASE = """\
127.0.0.1:{smtp_port} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class Postfix:
    """A private Postfix instance: SMTP on ``smtp_port``, mailfax's relay port ``relay_port``
    (deploy/postfix/master.cf), the fax domain to mailfax by the transport file given, and
    example.org delivered into Dovecot by LMTP."""

    def __init__(self, root: Path, dovecot: Dovecot, transport: str, mailfax_port: int,
                 policy_port: int):
        self.root = root
        self.dovecot = dovecot
        self.transport = transport  # "transport" (LMTP) or "transport.smtp"
        self.mailfax_port = mailfax_port
        self.policy_port = policy_port  # mailfax's [policy_service] listen
        self.smtp_port = free_port()
        self.relay_port = free_port()
        self.config_dir = root / "etc"
        self.log = root / "postfix.log"
        self.programs = require("postfix", "postmap", "postqueue")

    def write_config(self) -> None:
        root, etc = self.root, self.config_dir
        for folder in (etc, root / "spool", root / "data"):
            folder.mkdir()
        shutil.chown(root / "data", "postfix")
        deploy_main = (DEPLOY_POSTFIX / "main.cf").read_text().replace(
            "/etc/postfix/", f"{etc}/").replace("inet:127.0.0.1:10040",
                                                f"inet:127.0.0.1:{self.policy_port}")
        (etc / "main.cf").write_text(f"""\
# test instance: everything under {root}
compatibility_level = 3.6
config_directory = {etc}
queue_directory = {root}/spool
data_directory = {root}/data
mail_owner = postfix
setgid_group = postdrop
maillog_file = {self.log}
maillog_file_prefixes = {root}
myhostname = mx.{MAIL_DOMAIN}
mydomain = {MAIL_DOMAIN}
myorigin = $mydomain
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
# Only 127.0.0.1 is "inside": the tests' outside clients connect from 127.0.0.2.
mynetworks = 127.0.0.1/32
relayhost =
alias_maps =
alias_database =
smtputf8_enable = no
biff = no
smtpd_relay_restrictions = permit_mynetworks, permit_sasl_authenticated,
    reject_unauth_destination
# users log in with their Dovecot passwords (SASL), as on a submission port
smtpd_sasl_auth_enable = yes
smtpd_sasl_type = dovecot
smtpd_sasl_path = inet:127.0.0.1:{self.dovecot.auth_port}
# example.org mailboxes live in Dovecot (LMTP)
virtual_mailbox_domains = {MAIL_DOMAIN}
virtual_mailbox_maps = static:OK
virtual_transport = lmtp:inet:127.0.0.1:{self.dovecot.lmtp_port}
# no mail leaves the test
default_transport = error:5.7.1 no outside mail in the test
# retry soon while mailfax starts
queue_run_delay = 1s
minimal_backoff_time = 1s
maximal_backoff_time = 2s
delay_warning_time = 0

# ---- deploy/postfix/main.cf ----
{deploy_main}""")
        deploy_master = (DEPLOY_POSTFIX / "master.cf").read_text().replace(
            "127.0.0.1:10025", f"127.0.0.1:{self.relay_port}")
        (etc / "master.cf").write_text(MASTER_CF_BASE.format(smtp_port=self.smtp_port)
                                       + "\n# ---- deploy/postfix/master.cf ----\n"
                                       + deploy_master)
        transport = (DEPLOY_POSTFIX / self.transport).read_text()
        transport = transport.replace("127.0.0.1:2424", f"127.0.0.1:{self.mailfax_port}")
        transport = transport.replace("[127.0.0.1]:2525", f"[127.0.0.1]:{self.mailfax_port}")
        (etc / "transport").write_text(transport)
        for name in ("mailfax_domains", "sender_login"):  # used as they are
            shutil.copyfile(DEPLOY_POSTFIX / name, etc / name)
        for name in ("transport", "mailfax_domains", "sender_login"):
            # no type: postmap uses default_database_type, as the main.cf's maps do
            self._run(self.programs["postmap"], "-c", str(etc), f"{etc}/{name}")

    def _run(self, *argv: str) -> None:
        returncode, output = run_daemon(list(argv), self.root)
        if returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({returncode}): {output}\n"
                               f"{self.log_text()}")

    def start(self) -> None:
        self.write_config()
        self._run(self.programs["postfix"], "-c", str(self.config_dir), "start")
        wait_for_port(self.smtp_port, what="postfix smtpd")
        wait_for_port(self.relay_port, what="postfix relay smtpd")

    def stop(self) -> None:
        pid_file = self.root / "spool" / "pid" / "master.pid"
        with contextlib.suppress(Exception):
            run_daemon([self.programs["postfix"], "-c", str(self.config_dir), "stop"],
                       self.root)
        with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
            pid = int(pid_file.read_text().split()[0])
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                os.kill(pid, 0)
                time.sleep(0.05)
            os.kill(pid, signal.SIGKILL)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def queue(self) -> list[dict[str, object]]:
        """What waits in Postfix's queue (postqueue -j): deferred mail, bounces to send."""
        output = subprocess.run([self.programs["postqueue"], "-c", str(self.config_dir), "-j"],
                                capture_output=True, text=True, timeout=30, check=True).stdout
        return [json.loads(line) for line in output.splitlines() if line.strip()]

    def deliveries(self) -> dict[str, str]:
        """Recipient → last delivery status (sent, bounced, deferred) from Postfix's log."""
        found: dict[str, str] = {}
        for match in re.finditer(r"to=<([^>]*)>.*? status=(\w+)", self.log_text()):
            found[match.group(1)] = match.group(2)
        return found

    async def wait_for_deliveries(self, recipients: dict[str, str],
                                  timeout: float = 30.0) -> dict[str, str]:
        """Wait until each recipient has the given status in the log; returns the lines."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            seen = self.deliveries()
            if all(seen.get(address) == status for address, status in recipients.items()):
                return {address: line for address in recipients for line in
                        self.log_text().splitlines() if f"to=<{address}>" in line
                        and "status=" in line}
            await asyncio.sleep(0.2)
        raise AssertionError(f"Postfix deliveries {self.deliveries()} (wanted {recipients}); "
                             f"log:\n{self.log_text()[-4000:]}")


@contextlib.contextmanager
def running_postfix(dovecot: Dovecot, transport: str, mailfax_port: int,
                    policy_port: int) -> Iterator[Postfix]:
    require("postfix", "postmap", "postqueue")
    if os.geteuid() != 0:
        pytest.skip("a private Postfix instance needs root to start (CI runs as root)")
    try:
        pwd.getpwnam("postfix")
    except KeyError:
        pytest.skip("no postfix system user (Debian package postfix)")
    root = make_root("mailfax-postfix-")
    postfix = Postfix(root, dovecot, transport, mailfax_port, policy_port)
    try:
        postfix.start()
        yield postfix
    finally:
        postfix.stop()
        shutil.rmtree(root, ignore_errors=True)
