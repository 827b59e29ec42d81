"""Where the checked intake's time goes: py-spy samples of mailfax's intake during a blast.

One `mailfax serve` (its intake alone: the dispatcher and the tracker idle, as in
bench/intake.py; ``documents.readiness = "off"`` unless ``--readiness warn``), warmed up,
then sampled by py-spy while 20 clients send it PDF mails. Two recordings one after the
other: with ``--gil`` (only the thread holding the GIL: the Python work that the event loop
and the worker threads take turns at) and without (every thread that is not idle: the
pikepdf and SQLite work done without the GIL too). Each sample goes to the first step of the
mail path its stack is in, and the shares are printed, with the rate and the server's CPU
per mail of each blast, and how much of the blast's wall time the GIL was held.

    python bench/profile_intake.py [--mails 3000] [--readiness off|warn] [--py-spy PATH]

py-spy is not a dependency of mailfax: ``pip install py-spy`` (it needs ptrace, as root or
with ``kernel.yama.ptrace_scope = 0``).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.intake import (  # noqa: E402
    INTAKE_ONLY_SERVER,
    PDF,
    blast,
    cpu_seconds,
    free_port,
    mailfax_config,
    message,
    wait_for,
)

RATE = 250  # samples a second
# The steps of the mail path, in the order a sample is given to them: the first whose
# marks are in its stack (file paths as py-spy prints them).
STEPS = [
    ("PDF check (pikepdf, its worker thread)", ("documents/pdf.py", "pikepdf", "batches.py")),
    ("store commit (SQLite writer thread)", ("store/sqlite.py",)),
    ("MIME scan and documents", ("intake/fastmime.py", "intake/mime.py", "intake/assemble.py",
                                 "intake/spool.py")),
    ("intake rules: numbers, policy, options, quotas", ("intake/service.py", "trust/",
                                                        "numbers.py", "intake/options.py",
                                                        "intake/limits.py", "phonenumbers")),
    ("aiosmtpd protocol", ("aiosmtpd/",)),
    ("mailfax SMTP handler", ("intake/smtp.py",)),
    ("logging", ("logging/", "mailfax/logs.py")),
    ("asyncio loop and transports", ("asyncio/",)),
]


# The leaf of a thread that waits without py-spy seeing it idle: an asyncio default executor
# thread in its loop's queue.get (its work would be a frame below _worker), whatever the line.
IDLE_LEAF = "_worker (concurrent/futures/thread.py:"


def step_of(stack: str) -> str:
    for name, marks in STEPS:
        if any(mark in stack for mark in marks):
            return name
    return "other"


def shares(raw: Path) -> tuple[int, collections.Counter[str]]:
    """The samples of a py-spy ``--format raw`` file, and how many went to each step."""
    counted: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit() or stack.rpartition(";")[2].startswith(IDLE_LEAF):
            continue
        total += int(count)
        counted[step_of(stack)] += int(count)
    return total, counted


async def recorded(py_spy: str, mails: list[bytes], readiness: str, gil: bool
                   ) -> tuple[float, float, float, int, collections.Counter[str]]:
    """(mails/s, server CPU ms per mail, blast seconds, samples, samples per step)."""
    with tempfile.TemporaryDirectory() as folder:
        port = free_port()
        config = mailfax_config(Path(folder), "profiled", port, 20, readiness=readiness)
        server = subprocess.Popen([sys.executable, "-c", INTAKE_ONLY_SERVER, str(config)],
                                  cwd=folder, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        raw = Path(folder) / "samples.txt"
        try:
            await wait_for(port)
            await blast(port, mails[:200], 20)  # warm up
            await asyncio.sleep(2.0)
            spy = subprocess.Popen(
                [py_spy, "record", "--pid", str(server.pid), "--rate", str(RATE), "--threads",
                 "--format", "raw", "--output", str(raw), *(["--gil"] if gil else [])],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            await asyncio.sleep(1.5)  # py-spy attached
            before, started = cpu_seconds(server.pid), time.perf_counter()
            rate = await blast(port, mails, 20)
            seconds = time.perf_counter() - started
            cpu = (cpu_seconds(server.pid) - before) * 1000 / len(mails)
            spy.send_signal(2)  # SIGINT: py-spy writes what it has
            spy.wait()
        finally:
            server.terminate()
            server.wait()
        total, counted = shares(raw)
        return rate, cpu, seconds, total, counted


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mails", type=int, default=3000)
    parser.add_argument("--readiness", choices=["off", "warn"], default="off")
    parser.add_argument("--py-spy", default=shutil.which("py-spy") or "py-spy")
    args = parser.parse_args()
    pdf = PDF.read_bytes()
    mails = [message(pdf, index).as_bytes() for index in range(args.mails)]
    print(f"{args.mails} mails with a {len(pdf)} byte PDF, 20 clients, readiness "
          f"{args.readiness}; py-spy at {RATE} samples/s (idle threads not sampled)")
    for gil, what in ((True, "the thread holding the GIL"), (False, "every busy thread")):
        rate, cpu, seconds, total, counted = await recorded(args.py_spy, mails,
                                                            args.readiness, gil)
        held = f"; the GIL held {total / (RATE * seconds):.0%} of the blast" if gil else ""
        print(f"\n{what}: {rate:.0f} mails/s, server {cpu:.2f} CPU ms/mail, {total} samples"
              f"{held} (sampled from 1.5 s before the blast to its end)")
        for name, count in counted.most_common():
            # without --gil the samples are CPU time (a thread not idle), so their share of
            # the server's CPU per mail is about that step's cost
            cost = "" if gil else f"  about {cpu * count / total:4.2f} CPU ms/mail"
            print(f"  {name:<50} {count / total:6.1%}{cost}")


if __name__ == "__main__":
    asyncio.run(main())
