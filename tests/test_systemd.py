"""`mailfax serve` under systemd (issue 18), as a subprocess: READY=1 over $NOTIFY_SOCKET
once the SMTP port accepts, STOPPING=1 on SIGTERM, and SIGHUP re-reading users and policy
without dropping an open SMTP session (a bad config on reload keeps the running one)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiosmtplib
import pytest

from mailfax.trust.auth import hash_password
from tests.conftest import Service, fax_mail, make_settings
from tests.ports import free_port
from tests.test_security import self_signed_certificate

PASSWORD = "reload me gently"


def config_text(tmp_path: Path, port: int, password_hash: str, prefixes: list[str]) -> str:
    cert, key = self_signed_certificate(tmp_path)
    listed = ", ".join(f'"{prefix}"' for prefix in prefixes)
    return f"""\
data_dir = "{tmp_path / 'data'}"

[smtp]
listen = ["127.0.0.1:{port}"]
tls_cert = "{cert}"
tls_key = "{key}"

[senders]
trusted_networks = []

[users.alice]
password_hash = "{password_hash}"
addresses = ["alice@example.org"]
allowed_prefixes = [{listed}]

[notify]
from_address = "fax@mailfax.test"

[inbound]
ocr = "off"
"""


class Served:
    """`mailfax serve` in a subprocess, with a NOTIFY_SOCKET this test listens on."""

    def __init__(self, tmp_path: Path, config: Path, port: int):
        self.port = port
        self.stderr_path = tmp_path / "stderr"
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(tmp_path / "notify.sock"))
        self.notify.settimeout(60)
        environment = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify.sock")}
        environment.pop("MAILFAX_CONFIG", None)
        with self.stderr_path.open("wb") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "mailfax", "-c", str(config), "serve"],
                stderr=stderr, stdout=subprocess.DEVNULL, env=environment)

    def message(self) -> dict[str, str]:
        """The next datagram, as its KEY=value lines."""
        try:
            data = self.notify.recv(4096).decode()
        except TimeoutError:
            raise AssertionError(f"no notification; stderr:\n{self.log()}") from None
        return dict(line.split("=", 1) for line in data.splitlines())

    def log(self) -> str:
        return self.stderr_path.read_text()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)
        self.notify.close()


@pytest.fixture
def served_config(tmp_path: Path) -> Iterator[tuple[Served, Path]]:
    port = free_port()
    password_hash = hash_password(PASSWORD)
    config = tmp_path / "mailfax.toml"
    config.write_text(config_text(tmp_path, port, password_hash, ["+4940"]))
    served = Served(tmp_path, config, port)
    try:
        yield served, config
    finally:
        served.stop()


def accepts(port: int) -> bytes:
    """The first line the port answers a new connection with (raises if it refuses)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        return sock.recv(100)


def test_ready_comes_after_the_port_accepts_and_stopping_on_sigterm(
        served_config: tuple[Served, Path]) -> None:
    served, _ = served_config
    ready = served.message()
    # The first thing systemd hears is READY, and by then the port answers at once.
    assert ready["READY"] == "1", ready
    assert accepts(served.port).startswith(b"220 ")
    assert f"127.0.0.1:{served.port}" in ready["STATUS"]
    served.process.send_signal(signal.SIGTERM)
    assert served.message() == {"STOPPING": "1"}
    assert served.process.wait(timeout=30) == 0


def test_no_ready_when_the_smtp_port_cannot_be_bound(tmp_path: Path) -> None:
    """The READY of a start whose SMTP port is taken never comes: mailfax exits instead."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "mailfax.toml"
        config.write_text(config_text(tmp_path, port, hash_password(PASSWORD), ["+49"]))
        served = Served(tmp_path, config, port)
        try:
            assert served.process.wait(timeout=60) != 0
            served.notify.settimeout(0.5)
            with pytest.raises(TimeoutError):
                served.notify.recv(4096)
        finally:
            served.stop()


async def logged_in(port: int, user: str = "alice") -> aiosmtplib.SMTP:
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=30,
                             validate_certs=False, start_tls=False)
    await client.connect()
    await client.starttls()
    await client.login(user, PASSWORD)
    return client


def letter(corpus: Path) -> bytes:
    pdf = (corpus / "pdf" / "two-different-pages.pdf").read_bytes()
    return fax_mail([("a.pdf", pdf, "application/pdf")]).as_bytes()


async def reloaded(served: Served) -> dict[str, str]:
    """SIGHUP, then the RELOADING=1 and READY=1 that end the reload; the READY's fields."""
    served.process.send_signal(signal.SIGHUP)
    reloading = await asyncio.to_thread(served.message)
    assert reloading["RELOADING"] == "1" and int(reloading["MONOTONIC_USEC"]) > 0
    ready = await asyncio.to_thread(served.message)
    assert ready["READY"] == "1"
    return ready


async def test_sighup_reloads_a_users_numbers_and_keeps_open_sessions(
        served_config: tuple[Served, Path], tmp_path: Path, corpus: Path) -> None:
    served, config = served_config
    assert (await asyncio.to_thread(served.message))["READY"] == "1"
    berlin = ["030123456@fax.local"]  # +4930: alice may fax +4940 only
    before = await logged_in(served.port)
    with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as refused:
        await before.sendmail("alice@example.org", berlin, letter(corpus))
    assert refused.value.recipients[0].code == 550
    await before.rset()
    open_session = await logged_in(served.port)  # stays open across the reload
    with pytest.raises(aiosmtplib.SMTPAuthenticationError):
        await logged_in(served.port, "bob")  # not a user yet

    text = config.read_text()
    bob = text[text.index("[users.alice]"):text.index("[notify]")].replace(
        "[users.alice]", "[users.bob]").replace("alice@", "bob@")
    config.write_text(text.replace('allowed_prefixes = ["+4940"]',
                                   'allowed_prefixes = ["+4930", "+4940"]') + bob)
    assert (await reloaded(served))["STATUS"] == "config reloaded"
    assert "config reloaded: accounts, users, senders, dial, quotas (2 users)" in served.log()
    await (await logged_in(served.port, "bob")).quit()  # a new user logs in
    assert "next restart" not in served.log()  # nothing else changed

    errors, reply = await open_session.sendmail("alice@example.org", berlin, letter(corpus))
    assert errors == {} and "queued as" in reply  # the open session, with the new rule
    errors, _ = await before.sendmail("alice@example.org", berlin, letter(corpus))
    assert errors == {}

    # A broken config on reload: logged, and the running one kept.
    good = config.read_text()
    config.write_text(good.replace("[users.alice]", "[users.alice\n"))
    assert "reload refused" in (await reloaded(served))["STATUS"]
    assert "reload refused, the running config is kept:" in served.log()
    assert "not valid TOML" in served.log()
    errors, _ = await open_session.sendmail("alice@example.org", berlin, letter(corpus))
    assert errors == {}
    assert served.process.poll() is None  # still serving
    for client in (open_session, before):
        await client.quit()
    served.process.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(served.process.wait, 30) == 0


def test_a_reload_takes_users_and_policy_and_names_what_waits_for_a_restart(
        tmp_path: Path) -> None:
    from mailfax.app import reloaded_settings
    from mailfax.config import ConfigError
    from tests.conftest import make_settings

    current = make_settings(tmp_path)
    fresh = make_settings(tmp_path, dial={"allow_prefixes": ["+4930"]},
                          dispatch={"status_poll_seconds": 9})
    merged, waiting = reloaded_settings(current, fresh)
    assert merged.dial.allow_prefixes == ["+4930"]
    assert merged.dispatch == current.dispatch and waiting == ["dispatch"]

    # A user of an account the running service does not have: refused as a whole.
    grown = make_settings(tmp_path, accounts={
        "emulator": {"provider": "emulator"}, "second": {"provider": "emulator"}},
        users={"bob": {"addresses": ["bob@example.org"], "account": "second"}})
    with pytest.raises(ConfigError, match=r"accounts added \(second\).*needs a restart"):
        reloaded_settings(current, grown)
    moved = make_settings(tmp_path, accounts={"emulator": {
        "provider": "fax.de", "account": "1", "password": "x"}})
    with pytest.raises(ConfigError, match=r"provider changed from 'emulator' to 'fax\.de'"):
        reloaded_settings(current, moved)
    # One that would make an open relay: refused with the reason serve would give.
    public = make_settings(tmp_path, smtp={"listen": ["0.0.0.0:0"]},
                           senders={"trusted_networks": []})
    open_relay = make_settings(tmp_path, senders={"trusted_networks": ["0.0.0.0/0"]})
    with pytest.raises(ConfigError, match="lets anyone send faxes"):
        reloaded_settings(public, open_relay)


async def test_a_reload_puts_an_accounts_new_settings_in_use(
        service: Service, tmp_path: Path, corpus: Path) -> None:
    """[accounts] are reloaded too: here the emulator account gets a rule that makes a
    number busy, and a fax to it sent after the reload meets it; the old adapter is retired."""
    from mailfax.app import reload

    running = service.app.providers["emulator"]
    fresh = make_settings(tmp_path, accounts={"emulator": {
        "provider": "emulator", "delay_seconds": 0.3,
        "fail": [{"prefix": "+4930777", "result": "busy"}]}})
    assert await reload(service.app, lambda: fresh)
    assert service.app.providers["emulator"] is not running
    assert service.app.settings.accounts == fresh.accounts

    _, reply = await service.send(letter(corpus), "alice@example.org", ["030777123@fax.local"])
    job_id = reply.split("queued as ")[1].split()[0]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        job = await service.app.store.get_job(job_id)
        if job is not None and job.reason is not None:
            break
        await asyncio.sleep(0.1)
    assert job is not None and job.reason is not None and job.reason.code == "busy", job
