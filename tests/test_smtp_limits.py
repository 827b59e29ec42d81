"""Connection-level SMTP limits (intake/limits.py): connection counts, an idle timeout that
only progress restarts, junk and error limits, and pipelined commands that cannot stall
the other sessions. Real SMTP on loopback; the load tests run `mailfax serve` in a
subprocess with a lowered open-files limit."""

from __future__ import annotations

import asyncio
import contextlib
import resource
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiosmtplib
import hypothesis

from mailfax.app import Application
from mailfax.intake.limits import (
    Connections,
    Progress,
    RefusalLog,
    SessionCounters,
    SessionLimits,
)
from tests.conftest import Service, fax_mail, make_settings
from tests.ports import free_port
from tests.test_hostile import RawSmtp
from tests.test_security import self_signed_certificate

# -- the pure counters -------------------------------------------------------------------------


def test_connections_count_in_total_and_per_client_and_give_slots_back() -> None:
    connections = Connections(total=3, per_client=2)
    first, second = connections.admit("192.0.2.1"), connections.admit("192.0.2.1")
    assert not isinstance(first, str) and not isinstance(second, str)
    assert "from your address" in str(connections.admit("192.0.2.1"))
    third = connections.admit("192.0.2.2")
    assert not isinstance(third, str)
    assert "to this server" in str(connections.admit("192.0.2.3"))
    first.release()
    first.release()  # idempotent: a second release does not free a second place
    assert connections.open == 2
    assert not isinstance(connections.admit("192.0.2.3"), str)
    assert isinstance(connections.admit("192.0.2.4"), str)


def test_refusals_are_logged_at_a_capped_rate() -> None:
    refusals = RefusalLog(interval=10)
    logged = [refusals.refused(now / 10) for now in range(300)]  # 30 s, 10 a second
    assert [count for count in logged if count is not None] == [1, 100, 100]


def test_progress_needs_the_minimum_rate_on_average() -> None:
    progress = Progress(min_rate=100)
    progress.restart(0.0)
    assert not any(progress.data(1, 2.0 * second) for second in range(1, 100))  # 0.5 B/s
    progress.restart(0.0)
    assert progress.data(1000, 5.0)  # 200 B/s
    progress.restart(10.0)
    assert not progress.data(50, 11.0)
    assert progress.data(60, 11.05)  # 110 bytes in 1.05 s


def test_session_counters() -> None:
    counters = SessionCounters(SessionLimits(junk_command_limit=2, hard_error_limit=1,
                                             commands_per_turn=3))
    assert counters.command("MAIL") is None and counters.command("RCPT") is None
    assert counters.command("NOOP") is None and counters.command("RSET") is None
    assert counters.command("NOOP") is not None
    assert counters.reply("250 OK") is None and counters.reply("452 4.5.3 later") is None
    assert counters.reply("501 Syntax") is None
    assert counters.reply("503 Error") is not None
    assert [counters.turn_over() for _ in range(6)] == [False, False, True] * 2


# -- on a running service ----------------------------------------------------------------------


@contextlib.asynccontextmanager
async def running(tmp_path: Path, **smtp: object) -> AsyncIterator[Service]:
    app = Application(make_settings(tmp_path, smtp={"listen": ["127.0.0.1:0"], **smtp}))
    await app.start()
    try:
        yield Service(app)
    finally:
        await app.stop()


async def connect(host: str, port: int) -> RawSmtp:
    return RawSmtp(*await asyncio.open_connection(host, port))


async def banner(client: RawSmtp, timeout: float = 5) -> str:
    return str(await client.reply(timeout))


async def assert_cut_off_at_the_idle_timeout(client: RawSmtp, trickle: bytes) -> None:
    """``trickle`` sent a byte every 0.2 s (5 bytes a second): the server closes the
    connection at its idle timeout (1 s), not later."""
    started = time.monotonic()

    async def send() -> None:
        for byte in trickle:
            client.writer.write(bytes([byte]))
            await asyncio.sleep(0.2)

    sender = asyncio.create_task(send())
    try:
        assert await client.closed(4), "the trickle kept the connection open"
    finally:
        sender.cancel()
    assert 0.8 <= time.monotonic() - started <= 2.5


async def test_connections_beyond_the_total_limit_get_421(tmp_path: Path) -> None:
    async with running(tmp_path, max_connections=3, max_connections_per_client=100) as service:
        clients = [await connect("127.0.0.1", service.port) for _ in range(3)]
        assert [(await banner(client))[:4] for client in clients] == ["220 "] * 3
        refused = await connect("127.0.0.1", service.port)
        assert (await banner(refused)).startswith("421 4.7.0 ")
        assert await refused.closed(2)
        clients.pop().writer.close()
        await asyncio.sleep(0.2)
        again = await connect("127.0.0.1", service.port)
        assert (await banner(again)).startswith("220 ")  # the closed one's place is free
        for client in [*clients, again]:
            client.writer.close()


async def test_every_way_a_session_ends_gives_its_place_back(tmp_path: Path) -> None:
    cert, key = self_signed_certificate(tmp_path)
    async with running(tmp_path, implicit_tls_listen=["127.0.0.1:0"], tls_cert=str(cert),
                       tls_key=str(key), max_connections=2, data_timeout=0.5,
                       junk_command_limit=3) as service:
        plain, implicit = (server.sockets[0].getsockname()[1]
                           for server in service.app.smtp_servers)
        for _ in range(3):
            async with aiosmtplib.SMTP(hostname="127.0.0.1", port=plain, start_tls=True,
                                       validate_certs=False) as client:  # STARTTLS, QUIT
                assert client.get_transport_info("sslcontext") is not None
            async with aiosmtplib.SMTP(hostname="127.0.0.1", port=implicit, use_tls=True,
                                       validate_certs=False) as client:  # implicit TLS
                await client.noop()
            abrupt = await connect("127.0.0.1", plain)  # closed by the client
            await abrupt.reply()
            abrupt.writer.close()
            junk = await connect("127.0.0.1", plain)  # closed by the junk limit
            await junk.reply()
            assert [(await junk.command("NOOP")).code for _ in range(4)] == [250, 250, 250, 421]
            idle = await connect("127.0.0.1", plain)  # closed by the idle timeout
            await idle.reply()
            assert await idle.closed(3)
        await asyncio.sleep(0.2)
        clients = [await connect("127.0.0.1", plain) for _ in range(3)]
        assert [(await client.reply()).code for client in clients] == [220, 220, 421]
        for client in clients:
            client.writer.close()


async def test_connections_beyond_the_per_client_limit_get_421_others_do_not(
        tmp_path: Path) -> None:
    async with running(tmp_path, listen=["127.0.0.1:0", "[::1]:0"], max_connections=100,
                       max_connections_per_client=2) as service:
        v4, v6 = (server.sockets[0].getsockname()[1] for server in service.app.smtp_servers)
        clients = [await connect("127.0.0.1", v4) for _ in range(2)]
        assert [(await banner(client))[:4] for client in clients] == ["220 "] * 2
        refused = await connect("127.0.0.1", v4)
        reply = await banner(refused)
        assert reply.startswith("421 4.7.0 ") and "your address" in reply
        other = await connect("::1", v6)
        assert (await banner(other)).startswith("220 ")
        assert (await other.command("EHLO other.example")).code == 250
        for client in [*clients, refused, other]:
            client.writer.close()


async def test_a_trickle_of_command_bytes_is_cut_off_at_the_idle_timeout(tmp_path: Path) -> None:
    async with running(tmp_path, data_timeout=1.0, min_data_rate=100) as service:
        client = await connect("127.0.0.1", service.port)
        assert (await client.reply()).code == 220
        await assert_cut_off_at_the_idle_timeout(client, b"X" * 1000)  # a line that never ends


async def in_data(service: Service, helo: str) -> RawSmtp:
    """A client past DATA's 354, sending a mail from alice to 030123456."""
    client = await connect("127.0.0.1", service.port)
    await client.reply()
    for command in (f"EHLO {helo}", "MAIL FROM:<alice@example.org>",
                    "RCPT TO:<030123456@fax.local>"):
        assert (await client.command(command)).code == 250, command
    assert (await client.command("DATA")).code == 354
    return client


async def test_a_trickle_of_data_bytes_is_cut_off_at_the_idle_timeout(tmp_path: Path) -> None:
    async with running(tmp_path, data_timeout=1.0, min_data_rate=100) as service:
        client = await in_data(service, "trickle.example")
        await assert_cut_off_at_the_idle_timeout(client, b"Subject: slow\r\n\r\n" + b"x" * 1000)
        assert await service.app.store.list_jobs() == []


async def test_a_steady_upload_longer_than_the_idle_timeout_is_taken_and_a_stop_cut_off(
        tmp_path: Path) -> None:
    """Progress moves the idle timeout's end on (its timer is set again when it fires before
    the end): a mail sent steadily for 2.5 times the timeout is taken; a client that then
    goes quiet is cut off one timeout after its last progress."""
    async with running(tmp_path, data_timeout=1.0, min_data_rate=100) as service:
        client = await in_data(service, "steady.example")
        mail = fax_mail([("letter.pdf", TINY_PDF.read_bytes(), "application/pdf")])
        lines = mail.as_bytes().replace(b"\n", b"\r\n").split(b"\r\n")
        started = time.monotonic()
        for line in lines:  # about 2.5 s, 1000 bytes a second or more
            await client.send(line + b"\r\n")
            await asyncio.sleep(2.5 / len(lines))
        assert time.monotonic() - started >= 2.0
        assert (await client.command(".")).code == 250  # answered, not cut off
        quiet = time.monotonic()
        assert await client.closed(4)
        assert 0.8 <= time.monotonic() - quiet <= 2.5


async def test_junk_commands_beyond_the_limit_get_421(tmp_path: Path) -> None:
    async with running(tmp_path, junk_command_limit=5) as service:
        client = await connect("127.0.0.1", service.port)
        await client.reply()
        assert (await client.command("EHLO junk.example")).code == 250  # junk 1
        replies = [await client.command(command) for command in ("NOOP", "RSET", "NOOP",
                                                            "VRFY <alice@example.org>")]
        assert [reply.code for reply in replies] == [250, 250, 250, 252]
        reply = str(await client.command("NOOP"))
        assert reply.startswith("421 4.7.0 ") and "goodbye" in reply
        assert await client.closed(2)


async def test_errors_beyond_the_hard_error_limit_get_421(tmp_path: Path) -> None:
    async with running(tmp_path, hard_error_limit=3) as service:
        client = await connect("127.0.0.1", service.port)
        await client.reply()
        replies = [await client.command("RCPT TO:<030123456@fax.local>") for _ in range(3)]
        assert [reply.code // 100 for reply in replies] == [5] * 3
        client.writer.write(b"RCPT TO:<030123456@fax.local>\r\n")
        assert (await client.reply()).code // 100 == 5
        assert str(await client.reply()).startswith("421 4.7.0 ")
        assert await client.closed(2)


async def test_pipelined_junk_gets_exactly_the_limit_of_answers(tmp_path: Path) -> None:
    async with running(tmp_path, junk_command_limit=50) as service:
        reader, writer = await asyncio.open_connection("127.0.0.1", service.port)
        writer.write(b"NOOP\r\n" * 10_000)
        received = b""
        async with asyncio.timeout(10):
            while chunk := await reader.read(65536):
                received += chunk
        lines = received.decode().splitlines()
        assert lines[0].startswith("220 ")
        assert lines[1:-1] == ["250 OK"] * 50
        assert lines[-1].startswith("421 4.7.0 ")
        writer.close()


# -- `mailfax serve` under load ----------------------------------------------------------------

SERVER_OPEN_FILES = 256
TINY_PDF = Path(__file__).parent / "hostile" / "tiny.pdf"


def write_config(folder: Path, v4: int, v6: int, **smtp: int) -> Path:
    config = folder / "mailfax.toml"
    limits = "\n".join(f"{key} = {value}" for key, value in smtp.items())
    config.write_text(f"""
data_dir = "data"
[smtp]
listen = ["127.0.0.1:{v4}", "[::1]:{v6}"]
{limits}
[accounts.emulator]
provider = "emulator"
delay_seconds = 0.3
""")
    return config


def _few_open_files() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (SERVER_OPEN_FILES, SERVER_OPEN_FILES))


@contextlib.contextmanager
def serving(folder: Path, v4: int, v6: int, **smtp: int) -> Iterator[Path]:
    """`mailfax serve` with at most SERVER_OPEN_FILES open files; yields its log."""
    log = folder / "serve.log"
    server = subprocess.Popen(
        [sys.executable, "-m", "mailfax", "-c", str(write_config(folder, v4, v6, **smtp)),
         "serve"], stdout=log.open("ab"), stderr=subprocess.STDOUT, preexec_fn=_few_open_files)
    try:
        yield log
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


async def wait_for_banner(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, TimeoutError):
            client = await connect("127.0.0.1", port)
            greeting = await client.reply()
            client.writer.close()
            if greeting.code == 220:
                return
        await asyncio.sleep(0.2)
    raise AssertionError(f"no SMTP banner on port {port}")


async def test_a_mail_is_answered_within_a_second_while_1000_idle_connections_are_held(
        tmp_path: Path) -> None:
    v4, v6 = free_port(), free_port()
    with serving(tmp_path, v4, v6, max_connections=100, max_connections_per_client=20) as log:
        await wait_for_banner(v4)
        idle: list[RawSmtp] = []
        banners: list[str] = []
        for _ in range(10):
            batch = await asyncio.gather(*(connect("::1", v6) for _ in range(100)))
            banners += await asyncio.gather(*(banner(client, 30) for client in batch))
            idle += batch
        assert sum(banner.startswith("220 ") for banner in banners) == 20
        assert sum(banner.startswith("421 4.7.0 ") for banner in banners) == 980
        try:
            started = time.monotonic()
            errors, reply = await aiosmtplib.send(
                fax_mail([("letter.pdf", TINY_PDF.read_bytes(), "application/pdf")]),
                sender="alice@example.org", recipients=["030123456@fax.local"],
                hostname="127.0.0.1", port=v4, timeout=10)
            answered = time.monotonic() - started
        finally:
            for client in idle:  # held until the mail is answered
                client.writer.close()
        assert errors == {} and "queued as" in reply
        assert answered < 1.0, f"the mail waited {answered:.2f} s"
    text = log.read_text()
    assert "Too many open files" not in text and "out of system resource" not in text
    assert text.count("refused") < 10, "a log line for each refused connection"


async def noop_round_trips(port: int, seconds: float) -> list[float]:
    """Round-trip times of NOOPs on a session of its own, for ``seconds``."""
    client = await connect("127.0.0.1", port)
    await client.reply()
    await client.command("EHLO other.example")
    times: list[float] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        started = time.monotonic()
        assert (await client.command("NOOP")).code == 250
        times.append(time.monotonic() - started)
        await asyncio.sleep(0.01)
    client.writer.close()
    return times


async def test_a_million_pipelined_noops_do_not_delay_another_session(tmp_path: Path) -> None:
    v4, v6 = free_port(), free_port()
    # The junk limit is out of the way: this is about yielding, not about cutting off.
    with serving(tmp_path, v4, v6, junk_command_limit=10_000_000):
        await wait_for_banner(v4)
        reader, writer = await asyncio.open_connection("127.0.0.1", v4)
        writer.write(b"EHLO pipe.example\r\n" + b"NOOP\r\n" * 1_000_000)
        answered = 0
        working = asyncio.Event()  # the server is working through the pipeline

        async def read_replies() -> None:
            nonlocal answered
            while chunk := await reader.read(1 << 16):
                answered += chunk.count(b"250 OK")
                if answered >= 1000:
                    working.set()

        pipeline = asyncio.create_task(read_replies())
        try:
            await asyncio.wait_for(working.wait(), 30)
            before = answered
            round_trips = await noop_round_trips(v4, seconds=3)
            during = answered - before
        finally:
            pipeline.cancel()
            writer.close()
        assert during > 10_000, "the pipeline was not being answered meanwhile"
        assert answered < 1_000_000, "the pipeline was done before the other session measured"
        assert max(round_trips) < 0.2, (
            f"another session waited up to {max(round_trips) * 1000:.0f} ms "
            f"(median {sorted(round_trips)[len(round_trips) // 2] * 1000:.1f} ms)")


PATH_PIECES = ["<", ">", "@", ".", "a", "Z", "0", "-", "+", "_", "'", " ", "\t", "(", ")",
               '"', "\\", "[", "]", ":", ",", "=", "é", "SIZE=12", "BODY=8BITMIME",
               "example.org", "x" * 70]


@hypothesis.settings(max_examples=3000, deadline=None)
@hypothesis.given(hypothesis.strategies.lists(
    hypothesis.strategies.sampled_from(PATH_PIECES), max_size=14).map("".join))
def test_the_plain_path_reading_agrees_with_aiosmtpds(arg: str) -> None:
    """The fast reading of ``<local@domain> PARAMS`` gives what aiosmtpd's parser gives, and
    answers only for the shape it knows (anything else goes to the parser)."""
    import types

    from aiosmtpd.smtp import SMTP

    from mailfax.intake.smtp import plain_path

    for text in (arg, f"<{arg}>", f"<a@{arg}>", f"<{arg}@example.org> SIZE=1",
                 f"<a{arg}@example.org>", f"<a@example.org>{arg}"):
        fast = plain_path(text, 64)
        if fast is not None:
            assert fast == SMTP._getaddr(types.SimpleNamespace(local_part_limit=64), text)


def test_the_plain_path_reading_takes_the_usual_paths() -> None:
    from mailfax.intake.smtp import plain_path

    assert plain_path("<alice@example.org>", 64) == ("alice@example.org", "")
    assert plain_path("<a.b+fax@mail.example.org> SIZE=1234 BODY=8BITMIME", 64) == (
        "a.b+fax@mail.example.org", "SIZE=1234 BODY=8BITMIME")
    assert plain_path("<030123456@fax.local>", 64) == ("030123456@fax.local", "")
    assert plain_path(f"<{'x' * 65}@example.org>", 64) == (None, None)  # over the limit
    assert plain_path("<>", 64) is None and plain_path('<"a b"@example.org>', 64) is None
