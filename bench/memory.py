"""Peak memory per mail: `mailfax serve` next to a bare aiosmtpd that does nothing.

For each size, a fresh process of each (so the peak is that mail's), one mail with a PDF of
random pages sent over real SMTP; the growth is the process's peak (``VmHWM`` in
/proc/<pid>/status, reset after a warm-up mail) at the reply minus its memory (``VmRSS``)
before it; for mailfax also the peak once every job went to the provider (the bundled
emulator; the page check and the dispatcher read the stored document after the 250). Then
ten mails of the largest size at once: mailfax's ``smtp.receiving_budget`` answers those
that do not fit with 452, and its peak stays within the budget. Which server goes first alternates.

    python bench/memory.py [--sizes 1,10,30] [--parallel 10] [--budget-mails 4]
                           [--provider emulator|fax.de|faxnummer.de|retarus]

``--provider`` other than the bundled emulator sends through that provider's adapter to its
emulator (``mailfax emulate``, a process of its own, not measured): the request then carries
the document, as base64 in SOAP or JSON, or as a form part.

Goal (issue 19): growth <= 2x the message for one mail; within the budget for many.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import random
import re
import sqlite3
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path

import aiosmtplib
import pikepdf

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.intake import BARE_SERVER, free_port, wait_for  # noqa: E402

MB = 1_000_000
MEMORY_PER_BYTE = 4  # mailfax.intake.spool.MEMORY_PER_BYTE, read from the module in main()
HAS_BUDGET = True  # False: measuring a mailfax from before smtp.receiving_budget



def random_pdf(size: int, pages: int = 4) -> bytes:
    """A PDF of about ``size`` bytes: pages of incompressible grey noise."""
    pdf = pikepdf.new()
    side = max(8, int((size / pages) ** 0.5))
    noise = random.Random(size)
    for _ in range(pages):
        page = pdf.add_blank_page(page_size=(595, 842))
        image = pikepdf.Stream(pdf, noise.randbytes(side * side))
        image.Type, image.Subtype = pikepdf.Name.XObject, pikepdf.Name.Image
        image.Width, image.Height, image.BitsPerComponent = side, side, 8
        image.ColorSpace = pikepdf.Name.DeviceGray
        page.Resources = pikepdf.Dictionary(XObject=pikepdf.Dictionary(Im0=image))
        page.Contents = pikepdf.Stream(pdf, b"q 595 0 0 842 0 0 cm /Im0 Do Q")
    out = io.BytesIO()
    pdf.save(out)
    return out.getvalue()


def pdf_mail(message_size: int) -> bytes:
    """A mail of about ``message_size`` bytes on the wire (base64: 4/3 of the PDF)."""
    mail = EmailMessage()
    mail["From"] = "bench@example.org"
    mail["To"] = "030123456@fax.local"
    mail["Subject"] = f"memory {message_size}"
    mail.set_content("Please fax the attachment.")
    mail.add_attachment(random_pdf(message_size * 3 // 4 - 4096), maintype="application",
                        subtype="pdf", filename="scan.pdf")
    return mail.as_bytes()


def memory(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process, bytes."""
    status = Path(f"/proc/{pid}/status").read_text()
    found = dict(re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", status, re.MULTILINE))
    return int(found["VmRSS"]) * 1024, int(found["VmHWM"]) * 1024


def reset_peak(pid: int) -> None:
    """Start the process's VmHWM afresh from its VmRSS (Linux: clear_refs 5), so a peak at
    start-up is not taken for the mail's."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


@dataclass
class Result:
    before: int
    peak: int
    replies: list[int]
    sent_peak: int | None = None  # mailfax: the peak once every job went to the provider
    states: str = ""  # mailfax: its jobs' states then (a refused send shows here)

    @property
    def sent_growth(self) -> int | None:
        return None if self.sent_peak is None else self.sent_peak - self.before

    @property
    def growth(self) -> int:
        return self.peak - self.before


async def send(port: int, raw: bytes, number: str = "030123456") -> int:
    try:
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=300) as smtp:
            await smtp.sendmail("bench@example.org", [f"{number}@fax.local"], raw)
    except aiosmtplib.SMTPResponseException as error:
        return error.code
    return 250


PROVIDER = "emulator"  # --provider


def account(provider: str, url: str) -> str:
    """The ``[accounts.bench]`` table for ``provider``, its emulator at ``url``."""
    if provider == "emulator":
        return 'provider = "emulator"\ndelay_seconds = 3600\n'
    if provider == "fax.de":
        return (f'provider = "fax.de"\naccount = "123456"\npassword = "secret"\n'
                f'wsdl_url = "{url}/xmlws.exe?wsdl/IntfXMLWS"\n')
    if provider == "faxnummer.de":
        return (f'provider = "faxnummer.de"\nurl = "{url}/webrequests/product-voip/index.php"\n'
                f'product_login = "acc12345"\nproduct_code = "secret"\n'
                f'status_email = "fax-admin@example.org"\n')
    return (f'provider = "retarus"\ncustomer_number = "99999TE"\nusername = "mailfax"\n'
            f'password = "secret"\nsend_url = "{url}/ha/rest/v1"\n'
            f'data_centres = {{ DE1 = "{url}/dc/DE1/rest/v1" }}\nstatus_push = false\n')


class Server:
    def __init__(self, name: str, folder: Path, budget: int, max_size: int):
        self.name = name
        self.database = folder / "data" / "mailfax.sqlite3"
        self.port = free_port()
        self.emulator: subprocess.Popen[bytes] | None = None
        self.emulator_port = free_port()
        if name == "mailfax":
            if PROVIDER != "emulator":
                self.emulator = subprocess.Popen(
                    [sys.executable, "-m", "mailfax", "emulate", PROVIDER, "--listen",
                     f"127.0.0.1:{self.emulator_port}"], cwd=folder,
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            config = folder / "mailfax.toml"
            config.write_text(
                f'data_dir = "data"\ndefault_account = "bench"\n'
                f'[smtp]\nlisten = ["127.0.0.1:{self.port}"]\n'
                f'max_message_size = {max_size}\n'
                + (f'receiving_budget = {budget}\n' if HAS_BUDGET else '') +
                '[accounts.bench]\n'
                + account(PROVIDER, f"http://127.0.0.1:{self.emulator_port}"))
            config.chmod(0o600)
            command = [sys.executable, "-m", "mailfax", "-c", str(config), "serve"]
        else:
            command = [sys.executable, "-c", BARE_SERVER, str(self.port), str(max_size)]
        self.process = subprocess.Popen(command, cwd=folder, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)

    async def measure(self, mails: list[bytes], warm_up: bytes) -> Result:
        if self.emulator is not None:
            await wait_for(self.emulator_port)
        await wait_for(self.port)
        # every module of the mail path imported; to a number of its own, as the emulator
        # keeps a fax dialling for an hour and the next one to that number waits for it
        await send(self.port, warm_up, "030888888")  # no emulator fails it
        if self.name == "mailfax":  # and what follows its 250: the page check, the send
            await self.peak_once_sent()
        await asyncio.sleep(1.0)
        reset_peak(self.process.pid)
        before, _ = memory(self.process.pid)
        replies = await asyncio.gather(*(send(self.port, raw, f"0301234{index:02d}")
                                         for index, raw in enumerate(mails)))
        _, peak = memory(self.process.pid)  # at the reply: receiving, checking, storing
        if self.name != "mailfax":
            return Result(before, peak, list(replies))
        return Result(before, peak, list(replies), await self.peak_once_sent(), self.states())

    def states(self) -> str:
        with contextlib.closing(sqlite3.connect(f"{self.database.as_uri()}?mode=ro",
                                                uri=True)) as db:
            rows = db.execute("SELECT state, json_extract(reason, '$.code'), count(*)"
                              " FROM jobs GROUP BY 1, 2 ORDER BY 1, 2")
            return ", ".join(f"{count} {state}" + (f" ({code})" if code else "")
                             for state, code, count in rows)

    async def peak_once_sent(self, timeout: float = 120.0) -> int | None:
        """The peak once no job waits for its send or is being sent (the page check holds
        each job until it is done, then the dispatcher reads its document and sends it);
        None if that took longer than ``timeout``."""
        for _ in range(int(timeout / 0.2)):
            with contextlib.closing(sqlite3.connect(f"{self.database.as_uri()}?mode=ro",
                                                    uri=True)) as db:
                waiting = db.execute(  # not sent yet, or being sent (leased, attempt 1)
                    "SELECT count(*) FROM jobs WHERE state = 'queued'").fetchone()[0]
            if not waiting:
                await asyncio.sleep(0.5)
                return memory(self.process.pid)[1]
            await asyncio.sleep(0.2)
        return None

    def stop(self) -> None:
        for process in (self.process, self.emulator):
            if process is not None:
                process.terminate()
                process.wait()


async def run(name: str, mails: list[bytes], warm_up: bytes, budget: int) -> Result:
    # The largest mail just fits (and so does one mail of that size into the budget).
    max_size = min(budget // MEMORY_PER_BYTE, max(len(raw) for raw in mails) + 1024 * 1024)
    with tempfile.TemporaryDirectory() as folder:
        server = Server(name, Path(folder), budget, max_size)
        try:
            return await server.measure(mails, warm_up)
        finally:
            server.stop()


async def both(mails: list[bytes], warm_up: bytes, budget: int, mailfax_first: bool
               ) -> dict[str, Result]:
    order = ["mailfax", "bare aiosmtpd"] if mailfax_first else ["bare aiosmtpd", "mailfax"]
    return {name: await run(name, mails, warm_up, budget) for name in order}


def row(label: str, size: int, results: dict[str, Result]) -> str:
    cells = []
    for name in ("mailfax", "bare aiosmtpd"):
        result = results[name]
        cells.append(f"{name} +{result.growth / MB:6.1f} MB = {result.growth / size:4.1f}x")
    ratio = results["mailfax"].growth / max(1, results["bare aiosmtpd"].growth)
    sent = results["mailfax"].sent_growth
    after = "not sent in 120 s" if sent is None else \
        f"+{sent / MB:6.1f} MB = {sent / size:4.1f}x"
    return (f"  {label:<22} {'   '.join(cells)}   mailfax/bare {ratio:4.2f}   "
            f"mailfax once sent {after} (jobs: {results['mailfax'].states})")


def replies(result: Result) -> str:
    codes = sorted(set(result.replies))
    return ", ".join(f"{result.replies.count(code)}x {code}" for code in codes)


async def main() -> None:
    global MEMORY_PER_BYTE, HAS_BUDGET, PROVIDER
    parser = argparse.ArgumentParser()
    parser.add_argument("--provider", default="emulator",
                        choices=["emulator", "fax.de", "faxnummer.de", "retarus"])
    parser.add_argument("--sizes", default="1,10,30", help="message sizes in MB")
    parser.add_argument("--parallel", type=int, default=10)
    parser.add_argument("--budget-mails", type=int, default=4,
                        help="receiving_budget: room for this many mails of the largest size")
    args = parser.parse_args()
    PROVIDER = args.provider
    # The mailfax that `serve` runs (PYTHONPATH may point at an older one to compare with).
    probe = subprocess.run([sys.executable, "-c", "from mailfax.intake import spool; "
                            "print(spool.MEMORY_PER_BYTE)"], cwd=tempfile.gettempdir(),
                           capture_output=True, text=True)
    HAS_BUDGET = probe.returncode == 0
    if HAS_BUDGET:
        MEMORY_PER_BYTE = int(probe.stdout)
    sizes = [int(float(size) * MB) for size in args.sizes.split(",")]
    warm_up = pdf_mail(100_000)
    largest = max(sizes)
    budget = args.budget_mails * MEMORY_PER_BYTE * largest
    print(f"peak memory growth per mail (VmHWM at the reply, and once sent, minus VmRSS "
          f"before), x = growth / message size; receiving_budget {budget / MB:.0f} MB; "
          f"sent through {PROVIDER}")
    for index, size in enumerate(sizes):
        results = await both([pdf_mail(size)], warm_up, budget, mailfax_first=index % 2 == 0)
        print(row(f"one {size / MB:.0f} MB mail", size, results), flush=True)
    mails = [pdf_mail(largest)] * args.parallel
    results = await both(mails, warm_up, budget, mailfax_first=len(sizes) % 2 == 0)
    print(row(f"{args.parallel} x {largest / MB:.0f} MB at once", largest, results))
    mailfax = results["mailfax"]
    print(f"    mailfax replies: {replies(mailfax)}; peak growth {mailfax.growth / MB:.0f} MB "
          f"= {mailfax.growth / budget:.2f} of the budget")
    print("goal: <= 2.0x for one mail; within the budget for many")


if __name__ == "__main__":
    asyncio.run(main())
