"""Trust: TLS, SMTP AUTH only over TLS, sender binding, per-user destinations, quotas, login
throttling, and refusing to listen beyond loopback without sender rules."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import ssl
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mailfax.app import Application
from mailfax.config import ConfigError, SenderPolicySettings, load_settings
from mailfax.trust import ratelimit
from mailfax.trust.auth import LoginThrottle, hash_password, is_password_hash, verify_password
from mailfax.trust.policy import exposure_problem
from tests.conftest import fax_mail, make_settings

PASSWORD = "correct horse battery staple"


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return self_signed_certificate(tmp_path_factory.mktemp("tls"))


def self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate (and its key) for mailfax.test, made here."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mailfax.test")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("mailfax.test")]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture(scope="module")
def password_hash() -> str:
    return hash_password(PASSWORD)


class Secured:
    def __init__(self, app: Application):
        self.app = app

    def port(self, index: int = 0) -> int:
        port: int = self.app.smtp_servers[index].sockets[0].getsockname()[1]
        return port

    def client(self, index: int = 0, **options: Any) -> aiosmtplib.SMTP:
        return aiosmtplib.SMTP(hostname="127.0.0.1", port=self.port(index), timeout=20,
                               validate_certs=False, start_tls=False, **options)

    async def logged_in(self, user: str = "alice", password: str = PASSWORD
                        ) -> aiosmtplib.SMTP:
        client = self.client()
        await client.connect()
        await client.starttls()
        await client.login(user, password)
        return client


@pytest.fixture
async def secured(tmp_path: Path, certificate: tuple[Path, Path],
                  password_hash: str) -> AsyncIterator[Secured]:
    cert, key = certificate
    settings = make_settings(
        tmp_path,
        smtp={"listen": ["127.0.0.1:0"], "implicit_tls_listen": ["127.0.0.1:0"],
              "tls_cert": str(cert), "tls_key": str(key), "max_login_failures": 3},
        senders={"trusted_networks": []},  # loopback too must log in
        users={"alice": {"password_hash": password_hash,
                         "addresses": ["alice@example.org", "@alice.example"],
                         "allowed_prefixes": ["+49"], "faxes_per_hour": 3,
                         "pages_per_day": 4},
               "bob": {"password_hash": password_hash, "addresses": ["bob@example.org"]}})
    app = Application(settings)
    await app.start()
    yield Secured(app)
    await app.stop()


def pdf_mail(corpus: Path, sender: str = "alice@example.org", name: str = "crazyones.pdf"
             ) -> bytes:
    pdf = (corpus / "pdf" / name).read_bytes()
    return fax_mail([("letter.pdf", pdf, "application/pdf")], sender=sender).as_bytes()


async def test_auth_over_starttls_is_accepted_and_the_fax_queued(secured: Secured,
                                                                  corpus: Path) -> None:
    client = await secured.logged_in()
    async with client:
        errors, reply = await client.sendmail("alice@example.org", ["030123456@fax.local"],
                                              pdf_mail(corpus))
    assert errors == {} and "queued as" in reply
    jobs = await secured.app.store.list_jobs()
    assert [job.sender for job in jobs] == ["alice@example.org"]


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
async def test_passwords_are_checked_off_the_event_loop(secured: Secured, mechanism: str,
                                                        monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    # scrypt takes ~44 ms; on the loop thread it would stall every other SMTP session.
    import mailfax.intake.smtp as smtp_module

    loop_thread = threading.current_thread()
    threads: list[threading.Thread] = []

    def spy(password: str, encoded: str) -> bool:
        threads.append(threading.current_thread())
        return verify_password(password, encoded)

    monkeypatch.setattr(smtp_module, "verify_password", spy)
    method = f"auth_{mechanism.lower()}"
    for password, want in ((PASSWORD, 235), ("wrong", 535)):
        client = secured.client()
        async with client:
            await client.starttls()
            await client.ehlo()
            try:
                code = (await getattr(client, method)("alice", password)).code
            except aiosmtplib.SMTPAuthenticationError as refused:
                code = refused.code
        assert code == want
    assert threads and all(thread is not loop_thread for thread in threads)


async def test_implicit_tls_listener_speaks_tls_from_the_first_byte(secured: Secured,
                                                                     corpus: Path) -> None:
    client = secured.client(index=1, use_tls=True)
    async with client:
        await client.login("alice", PASSWORD)
        errors, _ = await client.sendmail("alice@example.org", ["030123456@fax.local"],
                                          pdf_mail(corpus))
    assert errors == {}
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    reader, writer = await asyncio.open_connection("127.0.0.1", secured.port(1), ssl=context)
    ssl_object = writer.get_extra_info("ssl_object")
    assert ssl_object is not None and ssl_object.version() in ("TLSv1.2", "TLSv1.3")
    assert (await reader.readline()).startswith(b"220 ")
    writer.close()


async def test_auth_without_tls_is_refused(secured: Secured) -> None:
    client = secured.client()
    async with client:
        await client.ehlo()
        code, message = await client.execute_command(b"AUTH", b"PLAIN",
                                                     b"AGFsaWNlAGNvcnJlY3Q=")
    assert code == 538 and "Encryption required" in message


async def test_without_login_nobody_may_send(secured: Secured) -> None:
    client = secured.client()
    async with client:
        await client.starttls()
        with pytest.raises(aiosmtplib.SMTPSenderRefused) as raised:
            await client.sendmail("alice@example.org", ["030123456@fax.local"], b"x")
    assert raised.value.code == 550 and "Log in" in raised.value.message


async def test_a_user_may_not_send_as_someone_else(secured: Secured, corpus: Path) -> None:
    client = await secured.logged_in()
    async with client:
        with pytest.raises(aiosmtplib.SMTPSenderRefused) as raised:
            await client.sendmail("bob@example.org", ["030123456@fax.local"], b"x")
        assert raised.value.code == 550 and "may not send as" in raised.value.message
        errors, _ = await client.sendmail("bob@alice.example", ["030123456@fax.local"],
                                          pdf_mail(corpus, sender="bob@alice.example"))
        assert errors == {}  # a domain of hers
        with pytest.raises(aiosmtplib.SMTPDataError) as data_refused:
            await client.sendmail("alice@example.org", ["030123456@fax.local"],
                                  pdf_mail(corpus, sender="ceo@example.org"))
    assert data_refused.value.code == 550 and "From:" in data_refused.value.message


@pytest.mark.parametrize(("number", "words"), [
    ("0033142345678", "may not send faxes to +33142345678"),
    ("09001234567", "premium-rate"),
    ("+19005551234", "premium-rate"),
])
async def test_forbidden_destinations_are_refused_at_rcpt(secured: Secured, number: str,
                                                          words: str) -> None:
    client = await secured.logged_in()
    async with client:
        await client.mail("alice@example.org")
        with pytest.raises(aiosmtplib.SMTPRecipientRefused) as raised:
            await client.rcpt(f"{number}@fax.local")
    assert raised.value.code == 550 and words in raised.value.message


async def test_quotas_per_hour_at_rcpt_and_pages_per_day_at_data(secured: Secured,
                                                                 corpus: Path) -> None:
    client = await secured.logged_in()
    async with client:
        errors, _ = await client.sendmail(  # 2 faxes of 2 pages: 4 pages, the day's quota
            "alice@example.org", ["030123456@fax.local", "030123457@fax.local"],
            pdf_mail(corpus, name="two-different-pages.pdf"))
        assert errors == {}
        with pytest.raises(aiosmtplib.SMTPDataError) as pages:
            await client.sendmail("alice@example.org", ["030123458@fax.local"],
                                  pdf_mail(corpus))
        assert pages.value.code == 452 and "pages per day" in pages.value.message
        assert "4 already used" in pages.value.message
        await client.rset()
        await client.mail("alice@example.org")
        await client.rcpt("030123459@fax.local")  # the 3rd fax this hour: allowed
        with pytest.raises(aiosmtplib.SMTPRecipientRefused) as hourly:
            await client.rcpt("030123460@fax.local")
    assert hourly.value.code == 452 and "3 faxes per hour" in hourly.value.message


async def test_the_hourly_quota_is_read_once_per_mail_not_per_recipient(
        secured: Secured, monkeypatch: pytest.MonkeyPatch) -> None:
    store = secured.app.store
    calls: list[Any] = []
    real = store.usage_since

    async def spy(*args: Any) -> tuple[int, int]:
        calls.append(args)
        return await real(*args)

    monkeypatch.setattr(store, "usage_since", spy)
    client = await secured.logged_in()
    async with client:
        await client.mail("alice@example.org")
        for number in ("030123456", "030123457", "030123458"):  # 3 faxes per hour: all fit
            await client.rcpt(f"{number}@fax.local")
        with pytest.raises(aiosmtplib.SMTPRecipientRefused) as hourly:
            await client.rcpt("030123459@fax.local")
        assert len(calls) == 1
        await client.rset()  # a new mail reads the counts again
        await client.mail("alice@example.org")
        await client.rcpt("030123456@fax.local")
        assert len(calls) == 2
    assert hourly.value.code == 452 and "3 faxes per hour" in hourly.value.message


async def test_failed_logins_are_throttled_per_client(secured: Secured) -> None:
    codes = []
    for _ in range(3):  # max_login_failures = 3 (aiosmtplib may try PLAIN, then LOGIN)
        client = secured.client()
        async with client:
            await client.starttls()
            with pytest.raises(aiosmtplib.SMTPAuthenticationError) as wrong:
                await client.login("alice", "wrong password")
            codes.append(wrong.value.code)
    assert codes[0] == 535 and codes[-1] == 454
    client = secured.client()
    async with client:
        await client.starttls()
        with pytest.raises(aiosmtplib.SMTPAuthenticationError) as blocked:
            await client.login("alice", PASSWORD)  # right, but too late
    assert blocked.value.code == 454


async def auth_plain(secured: Secured, user: str, password: str) -> int:
    """The reply code of one AUTH PLAIN in a session of its own (over STARTTLS)."""
    client = secured.client()
    async with client:
        await client.starttls()
        await client.ehlo()
        try:
            return (await client.auth_plain(user, password)).code
        except aiosmtplib.SMTPAuthenticationError as refused:
            return refused.code


async def test_logging_in_to_one_account_does_not_reset_failures_for_another(
        secured: Secured) -> None:
    # An attacker with an account of its own (alice) guesses bob's password, logging in as
    # alice in between: the address's failures for bob still count (max_login_failures = 3).
    codes = []
    for _ in range(3):
        codes.append(await auth_plain(secured, "bob", "guess"))
        codes.append(await auth_plain(secured, "alice", PASSWORD))
    assert codes == [535, 235, 535, 235, 535, 454]
    assert await auth_plain(secured, "bob", PASSWORD) == 454  # right, but blocked


async def test_parallel_correct_logins_from_one_address_all_succeed(secured: Secured) -> None:
    codes = await asyncio.gather(*(auth_plain(secured, "alice", PASSWORD) for _ in range(6)))
    assert codes == [235] * 6  # more than max_login_failures (3): checks are not failures


async def test_parallel_guesses_get_no_more_than_the_limit(secured: Secured) -> None:
    codes = await asyncio.gather(*(auth_plain(secured, "bob", f"guess {index}")
                                   for index in range(10)))
    assert sorted(codes) == [454] * 7 + [535] * 3  # 3 passwords checked, then refused


def test_login_throttle_counts_per_address_and_per_user() -> None:
    throttle = LoginThrottle(max_failures=2, window=10)
    throttle.failed("1.1.1.1", "bob", now=0)
    throttle.failed("2.2.2.2", "bob", now=1)  # bob from elsewhere: 2 failures for bob
    assert throttle.blocked("3.3.3.3", "bob", now=2)  # the user, from any address
    assert not throttle.blocked("3.3.3.3", "alice", now=2)
    assert not throttle.blocked("1.1.1.1", "alice", now=2)  # the address failed once
    throttle.failed("1.1.1.1", "carol", now=3)
    assert throttle.blocked("1.1.1.1", "alice", now=3)  # the address, for anyone
    throttle.succeeded("1.1.1.1", "carol")  # forgets carol's failure, not bob's
    assert not throttle.blocked("1.1.1.1", "alice", now=4)
    assert throttle.blocked("4.4.4.4", "bob", now=4)
    throttle.succeeded("2.2.2.2", "bob")  # bob logged in: his count starts again
    assert not throttle.blocked("4.4.4.4", "bob", now=4)
    assert not throttle.blocked("1.1.1.1", "bob", now=4)


def test_password_hashes() -> None:
    encoded = hash_password("s3cret-enough")
    assert is_password_hash(encoded) and "s3cret" not in encoded
    assert verify_password("s3cret-enough", encoded)
    assert not verify_password("s3cret-enougH", encoded)
    assert not verify_password("x", "not a hash")
    assert hash_password("same") != hash_password("same")  # salted


def test_login_throttle_forgets_after_the_window() -> None:
    throttle = LoginThrottle(max_failures=2, window=10)
    throttle.failed("1.2.3.4", now=0)
    throttle.failed("1.2.3.4", now=1)
    assert throttle.blocked("1.2.3.4", now=5)
    assert not throttle.blocked("5.6.7.8", now=5)
    assert not throttle.blocked("1.2.3.4", now=12)


def test_the_throttle_forgets_clients_that_never_came_back(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ratelimit, "MAX_KEYS", 3)
    throttle = LoginThrottle(max_failures=2, window=10)
    assert not throttle.blocked("9.9.9.9", now=0) and len(throttle) == 0  # asking adds nothing
    for client in ("1.1.1.1", "2.2.2.2"):
        throttle.failed(client, now=0)  # once, and never again
    throttle.failed("3.3.3.3", now=5)
    throttle.failed("3.3.3.3", now=6)
    assert len(throttle) == 3
    throttle.failed("4.4.4.4", now=12)  # at the cap: the stale ones go, recent ones stay
    assert len(throttle) == 2
    assert throttle.blocked("3.3.3.3", now=12)
    assert not throttle.blocked("1.1.1.1", now=12)
    for index in range(2):  # all recent: kept, and no clean-up on every new key
        throttle.failed(f"5.5.5.{index}", now=13)
    assert len(throttle) == 4 and throttle.blocked("3.3.3.3", now=13)


@pytest.mark.parametrize(("hosts", "senders", "users", "tls", "problem"), [
    (["127.0.0.1"], {}, False, False, None),
    (["::1", "localhost"], {"trusted_networks": ["0.0.0.0/0"]}, False, False, None),
    (["0.0.0.0"], {}, False, False, "only loopback may send"),
    (["192.0.2.10"], {"trusted_networks": ["0.0.0.0/0"]}, True, True, "lets anyone send"),
    (["0.0.0.0"], {}, True, False, "without TLS"),
    (["0.0.0.0"], {}, True, True, None),
    (["0.0.0.0"], {"trusted_networks": ["10.0.0.0/24"]}, False, False, None),
])
def test_exposure_rules(hosts: list[str], senders: dict[str, Any], users: bool, tls: bool,
                        problem: str | None) -> None:
    found = exposure_problem(hosts, SenderPolicySettings(**senders), users, tls)
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found


async def test_listening_beyond_loopback_without_sender_rules_refuses_to_start(
        tmp_path: Path) -> None:
    app = Application(make_settings(tmp_path, smtp={"listen": ["0.0.0.0:0"]}))
    with pytest.raises(ConfigError, match="refusing to start"):
        await app.start()


def test_a_config_with_passwords_readable_by_others_gets_a_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = tmp_path / "mailfax.toml"
    config.write_text('[accounts.emulator]\nprovider = "emulator"\n'
                      '[accounts.x]\nprovider = "fax.de"\naccount = "1"\npassword = "hunter2"\n')
    os.chmod(config, 0o644)
    with caplog.at_level(logging.WARNING):
        load_settings(config)
    assert "readable by others" in caplog.text and "hunter2" not in caplog.text
    caplog.clear()
    os.chmod(config, 0o600)
    with caplog.at_level(logging.WARNING):
        settings = load_settings(config)
    assert "readable by others" not in caplog.text
    assert "hunter2" not in repr(settings) and "hunter2" not in str(settings.model_dump())
