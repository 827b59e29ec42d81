"""Command latency: ``mailfax --version``, ``mailfax jobs``, ``mailfax jobs --json``,
``mailfax show JOB``, and ``mailfax serve`` until its SMTP port accepts a connection (and
until a client gets its 220 greeting), each measured in alternation with
``python -c pass`` (the interpreter's own start-up) in the same run, so a busy machine slows
both alike. Prints each command's median wall time and its ratio to ``python -c pass``.

The store has a few hundred jobs (made with the store's own calls, not through SMTP), so
``jobs`` reads and prints a real listing.

    python bench/cli.py [--runs 9] [--jobs 300] [--before /path/to/older/checkout]

``--before`` measures the same commands with another checkout's ``mailfax`` package first on
``PYTHONPATH`` (e.g. ``git archive c929184 | tar -x -C /tmp/before``), in the same rounds,
and prints after/before ratios.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.ports import free_port  # noqa: E402

GOALS = {"mailfax --version": 0.25, "mailfax jobs": 0.25, "mailfax jobs --json": 0.25,
         "mailfax show JOB": 0.25, "mailfax serve (port accepts)": 0.5}


def write_config(folder: Path, port: int, name: str, accounts: str) -> Path:
    config = folder / name
    config.write_text(f'data_dir = "{folder / "data"}"\n'
                      f'[smtp]\nlisten = ["127.0.0.1:{port}"]\n' + accounts)
    return config


# The commands' config: the emulator plus one account of each real provider, as production
# configs have them (loading it validates their settings: that imported their adapters).
# `serve` runs on the emulator alone: a real account's adapter would reach for the network.
ACCOUNTS = """
[accounts.emulator]
provider = "emulator"

[accounts.faxde]
provider = "fax.de"
account = "123456"
password = "env:BENCH_SECRET"
inbound = false
status_push = false

[accounts.portunity]
provider = "faxnummer.de"
product_login = "acc12345"
product_code = "env:BENCH_SECRET"
status_email = "fax-admin@example.org"

[accounts.retarus]
provider = "retarus"
customer_number = "99999TE"
username = "mailfax"
password = "env:BENCH_SECRET"
status_push = false
"""


# Fills a store through the store's own calls, in a process of its own, so that --before
# fills its store with the older checkout's code (and schema).
FILL_STORE = """
import asyncio, sys
from mailfax.providers.base import FaxDocument
from mailfax.store import open_store
from mailfax.store.base import NewJob, NewMail

async def fill(url, count):
    store = open_store(url)
    await store.open()
    try:
        for index in range(count):
            mail = NewMail(mail_id=f"m{index}", envelope_from="bench@example.org",
                           message_id=None, subject="bench", references=[], from_header="",
                           client_address="::1")
            await store.add_mail_jobs(mail, [NewJob(f"j{index:05d}", "+4930123456",
                                                    "emulator")],
                                      [FaxDocument("a.pdf", b"%PDF-1.4 bench", 1)])
    finally:
        await store.close()

asyncio.run(fill(sys.argv[1], int(sys.argv[2])))
"""


def prepare(folder: Path, port: int, jobs: int, env: dict[str, str],
            mailfax: Sequence[str]) -> tuple[dict[str, str], dict[str, str]]:
    """Configs and a migrated store with ``jobs`` jobs in ``folder``: the commands' env and
    serve's."""
    folder.mkdir(parents=True, exist_ok=True)
    serve_env = {**env, "MAILFAX_CONFIG": str(write_config(folder, port, "serve.toml", ""))}
    env = {**env, "MAILFAX_CONFIG": str(write_config(folder, port, "mailfax.toml", ACCOUNTS))}
    (folder / "data").mkdir()
    run_command([*mailfax, "migrate"], env)
    subprocess.run([sys.executable, "-c", FILL_STORE,
                    f"sqlite:///{folder / 'data' / 'mailfax.sqlite3'}", str(jobs)],
                   env=env, check=True)
    return env, serve_env


def run_command(argv: Sequence[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def serve_until_accepting(argv: Sequence[str], env: dict[str, str], port: int,
                          greeting: bool = False) -> float:
    """Seconds from starting ``mailfax serve`` until a TCP connect to its SMTP port succeeds
    (``greeting``: until the client has read the server's 220 line)."""
    started = time.perf_counter()
    process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"mailfax serve exited with {process.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
                    if greeting and not client.makefile("rb").readline().startswith(b"220"):
                        raise RuntimeError("mailfax serve did not greet with 220")
                    return time.perf_counter() - started
            except OSError:
                time.sleep(0.002)
    finally:
        process.terminate()
        process.wait(timeout=30)


def measure(runs: int, cases: dict[str, Callable[[], float]]) -> dict[str, list[float]]:
    """Every case once per round, rounds in turn, so load changes hit every case alike."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(runs):
        for name, case in cases.items():
            times[name].append(case())
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--before", type=Path, help="an older checkout to compare with")
    args = parser.parse_args()
    python = sys.executable
    with tempfile.TemporaryDirectory(prefix="mailfax-bench-cli-") as name:
        folder = Path(name)
        port = free_port()
        base_env = {**os.environ, "BENCH_SECRET": "not-used",
                    # compiled modules cached as an installed package has them (pip compiles
                    # on install), not compiled again on every start
                    "PYTHONPYCACHEPREFIX": str(folder / "pycache")}
        base_env.pop("PYTHONDONTWRITEBYTECODE", None)
        script = Path(python).with_name("mailfax")  # the console script a user runs
        mailfax = [str(script)] if script.exists() else [python, "-m", "mailfax"]
        env, serve_env = prepare(folder / "now", port, args.jobs, base_env, mailfax)
        cases: dict[str, Callable[[], float]] = {
            "python -c pass": lambda: run_command([python, "-c", "pass"], env),
            "mailfax --version": lambda: run_command([*mailfax, "--version"], env),
            "mailfax jobs": lambda: run_command([*mailfax, "jobs"], env),
            "mailfax jobs --json": lambda: run_command([*mailfax, "jobs", "--json"], env),
            "mailfax show JOB": lambda: run_command([*mailfax, "show", "j00001"], env),
            "mailfax serve (port accepts)": lambda: serve_until_accepting(
                [*mailfax, "serve"], serve_env, port),
            "mailfax serve (220 greeting)": lambda: serve_until_accepting(
                [*mailfax, "serve"], serve_env, port, greeting=True),
        }
        for case in cases.values():  # the first start compiles the modules: not counted
            case()
        if args.before:
            old, old_serve = prepare(folder / "before", port, args.jobs,
                                     {**base_env, "PYTHONPATH": str(args.before.resolve())},
                                     mailfax)
            cases |= {
                "before: mailfax --version": lambda: run_command([*mailfax, "--version"], old),
                "before: mailfax jobs": lambda: run_command([*mailfax, "jobs"], old),
                "before: mailfax jobs --json": lambda: run_command(
                    [*mailfax, "jobs", "--json"], old),
                "before: mailfax show JOB": lambda: run_command(
                    [*mailfax, "show", "j00001"], old),
                "before: mailfax serve (port accepts)": lambda: serve_until_accepting(
                    [*mailfax, "serve"], old_serve, port),
                "before: mailfax serve (220 greeting)": lambda: serve_until_accepting(
                    [*mailfax, "serve"], old_serve, port, greeting=True),
            }
        times = measure(args.runs, cases)
    base = statistics.median(times["python -c pass"])
    print(f"{args.runs} runs each, alternating; {args.jobs} jobs in the store; medians")
    print(f"{'command':<38} {'median':>9} {'vs python -c pass':>18} {'goal':>7}")
    for name, values in times.items():
        median = statistics.median(values)
        if name.startswith("before: "):
            now = statistics.median(times[name.removeprefix("before: ")])
            print(f"{name:<38} {median * 1000:7.0f} ms {median / base:17.1f}x "
                  f"(now {now / median:.2f} of before)")
            continue
        goal = GOALS.get(name)
        verdict = "" if goal is None else (
            f"{goal * 1000:5.0f} ms {'ok' if median <= goal else 'MISSED'}")
        print(f"{name:<38} {median * 1000:7.0f} ms {median / base:17.1f}x {verdict}")


if __name__ == "__main__":
    main()
