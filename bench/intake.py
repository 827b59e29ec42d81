"""Accepted mails per second: `mailfax serve` next to a bare aiosmtpd that does nothing.

Same client, same mail (a one-page PDF), same machine, same run, alternating rounds so noise
hits both alike. mailfax commits every job to SQLite (synchronous=FULL) before its 250.

    python bench/intake.py [--mails 2000] [--clients 20] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from email.message import EmailMessage
from pathlib import Path

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


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mails", type=int, default=1500)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    pdf = PDF.read_bytes()
    mails = [message(pdf, i).as_bytes() for i in range(args.mails)]

    with tempfile.TemporaryDirectory() as folder:
        mailfax_port, bare_port = free_port(), free_port()
        config = Path(folder) / "mailfax.toml"
        # A long emulator delay keeps the dispatcher's status polling out of the measurement;
        # the dispatcher itself still submits every job while the intake runs.
        # All the clients come from one address: the per-client limit must let them in.
        config.write_text(f'data_dir = "data"\n[smtp]\nlisten = ["127.0.0.1:{mailfax_port}"]\n'
                          f'max_connections_per_client = {max(20, args.clients)}\n'
                          f'max_connections = {max(200, args.clients)}\n'
                          f'[accounts.emulator]\nprovider = "emulator"\ndelay_seconds = 3600\n')
        servers = [
            subprocess.Popen([sys.executable, "-m", "mailfax", "-c", str(config), "serve"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=folder),
            subprocess.Popen([sys.executable, "-c", BARE_SERVER, str(bare_port), "33554432"]),
        ]
        try:
            await wait_for(mailfax_port)
            await wait_for(bare_port)
            await blast(mailfax_port, mails[:50], args.clients)  # warm up both
            await blast(bare_port, mails[:50], args.clients)
            rates: dict[str, list[float]] = {"mailfax": [], "bare aiosmtpd": []}
            for _ in range(args.rounds):
                rates["bare aiosmtpd"].append(await blast(bare_port, mails, args.clients))
                rates["mailfax"].append(await blast(mailfax_port, mails, args.clients))
        finally:
            for server in servers:
                server.terminate()
                server.wait()

    print(f"{args.mails} mails with a {len(pdf)} byte PDF, {args.clients} concurrent clients, "
          f"{args.rounds} rounds")
    for name, values in rates.items():
        print(f"  {name:<14} median {statistics.median(values):8.1f} mails/s  "
              f"(rounds: {', '.join(f'{v:.1f}' for v in values)})")
    ratio = statistics.median(rates["mailfax"]) / statistics.median(rates["bare aiosmtpd"])
    print(f"ratio mailfax / bare aiosmtpd: {ratio:.2f} (goal >= 0.80)")


if __name__ == "__main__":
    asyncio.run(main())
