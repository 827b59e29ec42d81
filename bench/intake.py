"""Accepted mails per second: `mailfax serve` next to a bare aiosmtpd that does nothing.

Same client, same mail (a one-page PDF), same machine, same run. Three servers: the bare
aiosmtpd; mailfax's intake alone (its dispatcher and tracker loops idle, so only receiving,
parsing, checking and storing is measured); and the whole `mailfax serve` (the dispatcher
submits every job while the mails arrive). The rounds alternate the order the servers are
measured in (forwards, then backwards), so neither warm-up nor noise favours one; the ratios
are printed side by side, of the medians and per round. mailfax commits every job to SQLite
(synchronous=FULL) before its 250. A fourth server is the intake alone with
``smtp.accept = "spool"``: the raw mail is committed before the 250, and the worker that
checks it and makes its job runs in the same process meanwhile (it may lag behind: the
backlog at the last 250 is printed, and its CPU is counted until every mail is a job).
A fifth is the intake alone with ``documents.readiness = "off"``. The others run the default
fax-readiness check ("warn"): each page rendered at fax resolution after the 250, in a niced
worker process (the jobs are held until then); like the spool's worker it may lag behind, so
the mails still waiting for their check at the last 250 are printed, and the CPU of every
server counts its worker processes too, until every mail was checked.

With ``--stages`` three more servers show where the intake's time goes: readiness off, and
the PDF check (its page count taken as 1), the store commit (nothing stored), or both left out.
They are not modes of mailfax, only measurements of what each of the two costs.

For a CPU ceiling, each blast (first connection to last 250) also measures the server's CPU
during the blast alone (without the work left after the last 250), the client's (this
process: the clients run here), and the machine's busy cores from /proc/stat (every process,
other sessions' too). Each mailfax server's "CPU ceiling" is (client + bare server CPU per
mail) / (client + its CPU per mail), medians: the ratio to bare it could reach if the cores
were the only limit, an upper bound only if bare's run kept the cores busy.

    python bench/intake.py [--mails 1500] [--clients 20] [--rounds 4] [--stages]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiosmtplib

HERE = Path(__file__).resolve().parent
PDF = HERE.parent.parent / "shared" / "corpus" / "pdf" / "crazyones.pdf"

BARE_SERVER = """
import asyncio, sys
from aiosmtpd.smtp import SMTP

class Nothing:
    async def handle_DATA(self, server, session, envelope):
        return "250 2.0.0 OK"

async def main():
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SMTP(Nothing(), loop=loop, decode_data=False,
                                                   data_size_limit=int(sys.argv[2])),
                                      "127.0.0.1", int(sys.argv[1]))
    await server.serve_forever()

asyncio.run(main())
"""

# `mailfax serve` with the dispatcher's and the tracker's loops idle: intake alone.
INTAKE_ONLY_SERVER = """
import asyncio, sys
from pathlib import Path
from typing import Any
from mailfax.config import load_settings
from mailfax.app import serve
from mailfax.outbound.dispatch import Dispatcher
from mailfax.outbound.tracking import Tracker

async def idle(self):
    await asyncio.Event().wait()

Dispatcher.run = idle
Tracker.run = idle
SKIP = sys.argv[2] if len(sys.argv) > 2 else ""
if "check" in SKIP:  # --stages: what the PDF check costs (the page count taken as 1)
    from mailfax.intake import assemble
    from mailfax.providers.base import FaxDocument

    assemble.prepare_pdf = lambda filename, data, setup=None: FaxDocument(filename, data, 1)
if "store" in SKIP:  # --stages: what the commit before the 250 costs (nothing stored)
    from mailfax.store.sqlite import SqliteStore

    async def not_stored(self, *args, **kwargs):
        return None

    SqliteStore.add_mail_jobs = not_stored
asyncio.run(serve(load_settings(Path(sys.argv[1]))))
"""
# --floor: what the checked mode cannot leave out before its 250, and nothing else, each step
# written as plainly as it can be: the PDF part found in the bytes and decoded, opened with
# qpdf for its pages (in a worker thread, as mailfax does), and a row with the document
# committed to SQLite (WAL, synchronous=FULL) by one writer thread that takes every waiting
# row into one transaction (group commit), before the 250. No policy, no number rules, no
# job, no logging. Not a mode of mailfax: the rate any checked intake in one Python process
# could at best reach here.
FLOOR_SERVER = """
import asyncio, binascii, io, queue, re, sqlite3, sys, threading
import pikepdf
from aiosmtpd.smtp import SMTP

BOUNDARY = re.compile(rb'boundary="?([^";\\r\\n]+)"?')

def pdf_part(raw):
    boundary = b"--" + BOUNDARY.search(raw).group(1)
    for part in raw.split(boundary):
        head, _, body = part.partition(b"\\n\\n")
        if b"application/pdf" in head:
            return binascii.a2b_base64(body)
    raise ValueError("no PDF")

def pages(data):
    with pikepdf.open(io.BytesIO(data)) as pdf:
        return len(pdf.pages), pdf.is_encrypted

class Writer(threading.Thread):
    def __init__(self, path, loop):
        super().__init__(daemon=True)
        self.waiting, self.loop, self.path = queue.Queue(), loop, path

    def run(self):
        db = sqlite3.connect(self.path, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("CREATE TABLE IF NOT EXISTS mails (sender, recipient, document, pages)")
        while True:
            batch = [self.waiting.get()]
            while not self.waiting.empty():
                batch.append(self.waiting.get_nowait())
            db.execute("BEGIN")
            db.executemany("INSERT INTO mails VALUES (?, ?, ?, ?)", [row for row, _ in batch])
            db.execute("COMMIT")
            for _, done in batch:
                self.loop.call_soon_threadsafe(done.set_result, None)

class Floor:
    def __init__(self, writer):
        self.writer = writer

    async def handle_DATA(self, server, session, envelope):
        data = pdf_part(envelope.content.replace(b"\\r\\n", b"\\n"))
        count, _ = await asyncio.to_thread(pages, data)
        done = asyncio.get_running_loop().create_future()
        self.writer.waiting.put(((envelope.mail_from, envelope.rcpt_tos[0], data, count), done))
        await done
        return "250 2.0.0 OK"

async def main():
    loop = asyncio.get_running_loop()
    writer = Writer(sys.argv[3], loop)
    writer.start()
    server = await loop.create_server(lambda: SMTP(Floor(writer), loop=loop, decode_data=False,
                                                   data_size_limit=int(sys.argv[2])),
                                      "127.0.0.1", int(sys.argv[1]))
    await server.serve_forever()

asyncio.run(main())
"""
BARE = "bare aiosmtpd"
FLOOR = "floor: PDF, qpdf, commit"
INTAKE = "mailfax intake alone"
WHOLE = "mailfax with dispatch"
SPOOLED = "mailfax spool, intake"
UNCHECKED = "intake, readiness off"  # documents.readiness = "off": what the page check costs
# --stages: readiness off, and one or both of the two things each mail needs before its 250
# left out (not modes of mailfax: what each costs, side by side).
NO_CHECK = "  without PDF check"
NO_STORE = "  without store commit"
NEITHER = "  without either"
STAGES = {NO_CHECK: "check", NO_STORE: "store", NEITHER: "check,store"}
CHECKED_AFTER = (INTAKE, WHOLE)  # "warn", the default: the page check after the 250


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def message(pdf: bytes, index: int) -> EmailMessage:
    mail = EmailMessage()
    mail["From"] = "bench@example.org"
    mail["To"] = "030123456@fax.local"
    mail["Subject"] = f"bench {index}"
    mail.set_content("Please fax the attachment.")
    mail.add_attachment(pdf, maintype="application", subtype="pdf", filename="letter.pdf")
    return mail


async def wait_for(port: int) -> None:
    for _ in range(200):
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise RuntimeError(f"no server on {port}")


async def blast(port: int, mails: list[bytes], clients: int) -> float:
    """Send all mails over ``clients`` connections; returns mails per second."""
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for mail in mails:
        queue.put_nowait(mail)

    async def client() -> None:
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=60) as smtp:
            while not queue.empty():
                raw = queue.get_nowait()
                await smtp.sendmail("bench@example.org", ["030123456@fax.local"], raw)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return len(mails) / (time.perf_counter() - started)


def mailfax_config(folder: Path, name: str, port: int, clients: int,
                   accept: str = "checked", readiness: str = "warn") -> Path:
    config = folder / f"{name}.toml"
    # A long emulator delay keeps the tracker's status polling out of the measurement; the
    # dispatcher itself still submits every job while the intake runs.
    # All the clients come from one address: the per-client limit must let them in, and the
    # connections of the round before while they close.
    config.write_text(f'data_dir = "{name}-data"\n[smtp]\nlisten = ["127.0.0.1:{port}"]\n'
                      f'max_connections_per_client = {max(20, 2 * clients)}\n'
                      f'max_connections = {max(200, 2 * clients)}\n'
                      f'accept = "{accept}"\n'
                      f'[documents]\nreadiness = "{readiness}"\n'
                      f'[accounts.emulator]\nprovider = "emulator"\ndelay_seconds = 3600\n')
    return config


def start_servers(folder: Path, clients: int, stages: bool = False, floor: bool = False
                  ) -> tuple[dict[str, int], list[subprocess.Popen[bytes]]]:
    ports = {BARE: free_port(), INTAKE: free_port(), WHOLE: free_port(), SPOOLED: free_port(),
             UNCHECKED: free_port()}
    quiet: dict[str, Any] = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL,
                             "cwd": folder}
    intake, whole = (mailfax_config(folder, name, ports[key], clients)
                     for name, key in (("intake", INTAKE), ("whole", WHOLE)))
    spooled = mailfax_config(folder, "spooled", ports[SPOOLED], clients, accept="spool")
    unchecked = mailfax_config(folder, "unchecked", ports[UNCHECKED], clients, readiness="off")
    servers = [
        subprocess.Popen([sys.executable, "-c", BARE_SERVER, str(ports[BARE]), "33554432"]),
        subprocess.Popen([sys.executable, "-c", INTAKE_ONLY_SERVER, str(intake)], **quiet),
        subprocess.Popen([sys.executable, "-m", "mailfax", "-c", str(whole), "serve"], **quiet),
        subprocess.Popen([sys.executable, "-c", INTAKE_ONLY_SERVER, str(spooled)], **quiet),
        subprocess.Popen([sys.executable, "-c", INTAKE_ONLY_SERVER, str(unchecked)], **quiet),
    ]
    if floor:
        ports[FLOOR] = free_port()
        servers.append(subprocess.Popen([sys.executable, "-c", FLOOR_SERVER, str(ports[FLOOR]),
                                         "33554432", str(folder / "floor.sqlite3")]))
    for name, skip in STAGES.items() if stages else ():
        ports[name] = free_port()
        config = mailfax_config(folder, skip.replace(",", "-"), ports[name], clients,
                                readiness="off")
        servers.append(subprocess.Popen(
            [sys.executable, "-c", INTAKE_ONLY_SERVER, str(config), skip], **quiet))
    return ports, servers


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process and its live descendants so far (Linux; the
    fax-readiness workers are grandchildren: forkserver's): a figure the other sessions on a
    shared machine disturb far less than mails per second."""
    stats: dict[int, list[str]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stats[int(entry.name)] = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # ended meanwhile
                continue
    tree, grown = {pid}, True
    while grown:
        before = len(tree)
        tree |= {child for child, fields in stats.items() if int(fields[1]) in tree}
        grown = len(tree) > before
    return sum(int(stats[member][11]) + int(stats[member][12]) for member in tree
               if member in stats) / os.sysconf("SC_CLK_TCK")


def machine_jiffies() -> tuple[int, int]:
    """Busy and idle clock ticks of all the machine's cores so far, from /proc/stat (Linux):
    busy is user, nice, system, irq, softirq and steal, idle is idle and iowait. Every process
    counts, the other sessions' on a shared machine too."""
    fields = [int(field) for field in Path("/proc/stat").read_text().split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = fields
    return user + nice + system + irq + softirq + steal, idle + iowait


def online_cores() -> int:
    return sum(line.startswith("cpu") and line[3:4].isdigit()
               for line in Path("/proc/stat").read_text().splitlines())


def cores_busy(before: tuple[int, int], cores: int) -> float:
    """How many of the ``cores`` were busy on average since ``before`` (machine_jiffies)."""
    busy, idle = (now - then for now, then in zip(machine_jiffies(), before, strict=True))
    return cores * busy / max(1, busy + idle)


SPOOLED_LEFT = "SELECT count(*) FROM accept_spool"
UNCHECKED_LEFT = ("SELECT count(*) FROM jobs WHERE state = 'queued'"
                  " AND json_extract(options, '$.readiness') = 'pending'")


async def drain(database: Path, count: str) -> tuple[int, float]:
    """The backlog a worker has left (``count``: the spooled mails not yet made jobs, the jobs
    still waiting for their fax-readiness check), and how long until it is gone."""
    def left() -> int:
        with sqlite3.connect(database) as conn:
            return int(conn.execute(count).fetchone()[0])

    started = time.perf_counter()
    backlog = waiting = left()
    while waiting:
        await asyncio.sleep(0.1)
        waiting = left()
    return backlog, time.perf_counter() - started


def median_line(name: str, values: list[float], what: str) -> str:
    return (f"  {name:<22} median {statistics.median(values):8.2f} {what} "
            f"(rounds: {', '.join(f'{v:.2f}' for v in values)})")


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mails", type=int, default=1500)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--stages", action="store_true",
                        help="also intake (readiness off) without the PDF check, without the "
                             "store commit, and without either: what each costs")
    parser.add_argument("--floor", action="store_true",
                        help="also a server that does only what a checked intake must before "
                             "its 250 (find and decode the PDF, open it with qpdf, commit it)")
    args = parser.parse_args()
    pdf = PDF.read_bytes()
    mails = [message(pdf, i).as_bytes() for i in range(args.mails)]

    rates: dict[str, list[float]] = {name: [] for name in (BARE, INTAKE, WHOLE, SPOOLED,
                                                           UNCHECKED)}
    if args.floor:
        rates[FLOOR] = []
    if args.stages:
        rates.update({name: [] for name in STAGES})
    cpu: dict[str, list[float]] = {name: [] for name in rates}  # server ms per mail
    # During the blast only (from its first connection to its last 250): the server's CPU ms
    # per mail (without the work left after the last 250), the client's (this process), and
    # how many of the machine's cores were busy.
    blast_cpu: dict[str, list[float]] = {name: [] for name in rates}
    client_cpu: dict[str, list[float]] = {name: [] for name in rates}
    busy: dict[str, list[float]] = {name: [] for name in rates}
    cores = online_cores()
    backlogs: list[tuple[int, float]] = []  # spooled mails left after a round, seconds to jobs
    unchecked: dict[str, list[tuple[int, float]]] = {name: [] for name in CHECKED_AFTER}
    with tempfile.TemporaryDirectory() as folder:
        ports, servers = start_servers(Path(folder), args.clients, args.stages, args.floor)
        spool_database = Path(folder) / "spooled-data" / "mailfax.sqlite3"
        try:
            for port in ports.values():
                await wait_for(port)
                await blast(port, mails[:50], args.clients)  # warm up
            for round_number in range(args.rounds):
                order = list(ports) if round_number % 2 == 0 else list(reversed(ports))
                for name in order:
                    pid = servers[list(ports).index(name)].pid
                    before = cpu_seconds(pid)
                    machine = machine_jiffies()
                    client = time.process_time()
                    rates[name].append(await blast(ports[name], mails, args.clients))
                    client_cpu[name].append((time.process_time() - client) * 1000 / len(mails))
                    busy[name].append(cores_busy(machine, cores))
                    blast_cpu[name].append((cpu_seconds(pid) - before) * 1000 / len(mails))
                    if name == SPOOLED:  # its worker's time belongs to the mails too
                        backlogs.append(await drain(spool_database, SPOOLED_LEFT))
                    if name in CHECKED_AFTER:  # so does the readiness workers'
                        data = "intake-data" if name == INTAKE else "whole-data"
                        unchecked[name].append(await drain(
                            Path(folder) / data / "mailfax.sqlite3", UNCHECKED_LEFT))
                    cpu[name].append((cpu_seconds(pid) - before) * 1000 / len(mails))
        finally:
            for server in servers:
                server.terminate()
                server.wait()

    print(f"{args.mails} mails with a {len(pdf)} byte PDF, {args.clients} concurrent clients, "
          f"{args.rounds} rounds in alternating order")
    bare = statistics.median(rates[BARE])
    for name, values in rates.items():
        print(f"  {name:<22} median {statistics.median(values):8.1f} mails/s  "
              f"(rounds: {', '.join(f'{v:.1f}' for v in values)})")
    for name, values in cpu.items():
        print(median_line(name, values, "CPU ms/mail in the server"))
    for name, values in blast_cpu.items():
        print(median_line(name, values, "CPU ms/mail in the server during the blast only"))
    for name, values in client_cpu.items():
        print(median_line(name, values, "CPU ms/mail in the client (this process)"))
    for name, values in busy.items():
        # CPU ms per mail times mails per second: how many cores each side kept busy.
        client_cores, server_cores = (statistics.median(
            ms * rate / 1000 for ms, rate in zip(side[name], rates[name], strict=True))
            for side in (client_cpu, blast_cpu))
        print(median_line(name, values, f"of {cores} cores busy during the blast, "
                                        f"machine-wide; client {client_cores:.2f}, "
                                        f"server {server_cores:.2f} cores"))
    print(f"  {SPOOLED}: mails still spooled at the last 250, and seconds until all were "
          f"jobs (its CPU above counts them): "
          f"{', '.join(f'{left} in {seconds:.1f} s' for left, seconds in backlogs)}")
    for name, waiting in unchecked.items():
        print(f"  {name}: jobs still waiting for their fax-readiness check at the last 250, "
              f"and seconds until all were checked (its CPU above counts them): "
              f"{', '.join(f'{left} in {seconds:.1f} s' for left, seconds in waiting)}")
    for name in (INTAKE, WHOLE, SPOOLED, UNCHECKED, *([FLOOR] if args.floor else []),
                 *(STAGES if args.stages else ())):
        per_round = [value / rate for value, rate in zip(rates[name], rates[BARE], strict=True)]
        print(f"ratio {name} / {BARE}: {statistics.median(rates[name]) / bare:.2f} of the "
              f"medians, per round {', '.join(f'{r:.2f}' for r in per_round)} (goal >= 0.80); "
              f"CPU per mail {statistics.median(cpu[BARE]) / statistics.median(cpu[name]):.2f}"
              f" of bare's speed")
        client_ms, server_ms = (statistics.median(side[name])
                                for side in (client_cpu, blast_cpu))
        bare_client, bare_server = (statistics.median(side[BARE])
                                    for side in (client_cpu, blast_cpu))
        print(f"  CPU ceiling {(bare_client + bare_server) / (client_ms + server_ms):.2f} of "
              f"bare's rate if the cores were the only limit (client {client_ms:.2f} + server "
              f"{server_ms:.2f} ms/mail vs client {bare_client:.2f} + bare {bare_server:.2f}, "
              f"medians of the CPU during the blast only); a bound only if bare's run was "
              f"CPU-bound: {statistics.median(busy[BARE]):.2f} of {cores} cores busy"
              f"{'; counts its niced page-check workers' if name in CHECKED_AFTER else ''}")


if __name__ == "__main__":
    asyncio.run(main())
