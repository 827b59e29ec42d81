"""README's own commands, run as written in an empty folder with no config: the mail → fax
tour (swaks, ``mailfax jobs``, the status mail in the Maildir) and the fax → mail tour
(``mailfax emulate receive``, ``mailfax inbox``, the fax mail with its PDF). The commands are
read from README.md, so README cannot drift from what works.

Two things differ from a user's terminal, both on purpose: ``serve`` gets ``--listen`` with a
free port (and README's ``127.0.0.1:2525`` in the commands becomes that port), since a shared
machine may have 2525 taken; and ``mutt`` is not run (it needs a terminal): the Maildir it
would open is read instead.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailfax.config import Settings
from tests.acceptance.user import (
    MAILFAX,
    Mailfax,
    eventually,
    final_job,
    status_mail,
    user_environment,
)

README = Path(__file__).resolve().parents[2] / "README.md"
DEFAULT_LISTEN = "127.0.0.1:2525"


def sh_blocks() -> list[list[str]]:
    """README's ```sh blocks, each as its lines."""
    return [block.strip("\n").splitlines()
            for block in re.findall(r"^```sh\n(.*?)^```", README.read_text(), re.M | re.S)]


def block_with(command: str) -> list[str]:
    return next(block for block in sh_blocks() if any(line.startswith(command)
                                                      for line in block))


def commands(block: list[str]) -> list[list[str]]:
    """The block's commands as argv lists (comments and blank lines dropped)."""
    return [argv for argv in (shlex.split(line, comments=True) for line in block) if argv]


def comment_after(block: list[str], command: str) -> str:
    line = next(line for line in block if line.startswith(command))
    return line.partition("#")[2]


def quoted_in(text: str) -> str:
    match = re.search(r'"([^"]+)"', text)
    assert match, text
    return match.group(1)


def pattern_of(example: str) -> re.Pattern[str]:
    """README's example text as a pattern: its "…" stands for anything."""
    return re.compile(".*".join(re.escape(part) for part in example.split("…")))


@pytest.fixture(scope="module")
def readme_mailfax(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mailfax]:
    """``mailfax serve`` started as README's first command does, in an empty folder."""
    if not MAILFAX.exists():
        pytest.skip(f"no installed mailfax console script at {MAILFAX} (pip install -e .)")
    first = sh_blocks()[0]  # README's first commands: install, then `mailfax serve`
    assert any(line.split("#")[0].split("&&")[-1].split() == ["mailfax", "serve"]
               for line in first), first
    assert Settings().smtp.listen == [DEFAULT_LISTEN]  # what README's swaks line talks to
    server = Mailfax(tmp_path_factory.mktemp("readme-folder"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def run_as_user(mailfax: Mailfax, argv: list[str]) -> subprocess.CompletedProcess[str]:
    argv = [arg.replace(DEFAULT_LISTEN, f"127.0.0.1:{mailfax.port}") for arg in argv]
    result = subprocess.run(argv, cwd=mailfax.folder, env=user_environment(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{shlex.join(argv)}: {result.stdout}{result.stderr}"
    return result


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks is not installed")
def test_readme_mail_to_fax_tour(readme_mailfax: Mailfax) -> None:
    block = block_with("swaks")
    outputs: dict[str, str] = {}
    for argv in commands(block):
        if argv[0] == "mutt":
            assert argv[1:] == ["-f", "mailfax-data/outbox"]  # the Maildir read below
            continue
        outputs[argv[0]] = run_as_user(readme_mailfax, argv).stdout
    assert (readme_mailfax.folder / "letter.pdf").is_file()
    queued = re.search(r"<-\s+250 2\.0\.0 queued as ([0-9a-z]{12})", outputs["swaks"])
    assert queued, outputs["swaks"]
    job_id = queued.group(1)
    assert 'filename="letter.pdf"' in outputs["swaks"]  # not "@letter.pdf"

    job = final_job(readme_mailfax, job_id)
    assert (job["state"], job["pages"], job["number"]) == ("delivered", 1, "+4930123456")
    listing = readme_mailfax.run("jobs").stdout
    assert re.search(rf"^{job_id}\s+delivered\s+\+4930123456\s+1\s+1\s", listing, re.M), listing
    assert listing.rstrip().endswith("-- 1 job: 1 delivered"), listing

    expected = pattern_of(quoted_in(comment_after(block, "mutt")))
    mail = status_mail(readme_mailfax, job_id)
    assert expected.fullmatch(" ".join(str(mail["Subject"]).split())), mail["Subject"]
    assert mail["To"] == "you@example.org"


def test_readme_fax_to_mail_tour(readme_mailfax: Mailfax, tmp_path: Path) -> None:
    block = block_with("mailfax emulate receive")
    before = {str(mail["Message-ID"]) for mail in readme_mailfax.mails()}
    for argv in commands(block):
        run_as_user(readme_mailfax, argv)
    # The poller deletes the fax at the provider once it sees the mail handed off (it looks
    # again within a second): "mailed" may show a moment before "deleted" does.
    fax = eventually(lambda: next((fax for fax in readme_mailfax.inbox()
                                   if fax["state"] == "mailed"
                                   and fax["at_provider"] == "deleted"), None), 60,
                     "the fax mailed and deleted at the provider")
    assert (fax["pages"], fax["called"], fax["originator"]) == (2, "+4930123456", "040555123")
    listing = readme_mailfax.run("inbox").stdout
    assert re.search(rf"^{fax['fax_id']}\s+emulator\s.*\s2\s+1\s+mailed$", listing, re.M), listing

    mail = eventually(lambda: next((m for m in readme_mailfax.mails()
                                    if str(m["Message-ID"]) not in before), None), 10, "a mail")
    expected = pattern_of(quoted_in(comment_after(block, "mailfax inbox")))
    assert expected.fullmatch(str(mail["Subject"])), mail["Subject"]
    assert mail["To"] == "postmaster@localhost"  # the documented default recipient
    pdf = next(part for part in mail.iter_attachments()
               if part.get_content_type() == "application/pdf")
    assert_pages_have_ink(pdf.get_content(), 2, tmp_path)


def assert_pages_have_ink(pdf: bytes, pages: int, folder: Path) -> None:
    """Rendered as a person sees it (pdftoppm): ``pages`` pages, none of them blank."""
    if shutil.which("pdftoppm") is None:
        pytest.skip("pdftoppm (poppler-utils) is not installed")
    from PIL import Image, ImageOps

    (folder / "fax.pdf").write_bytes(pdf)
    subprocess.run(["pdftoppm", "-r", "40", "-png", str(folder / "fax.pdf"),
                    str(folder / "page")], check=True, timeout=60)
    rendered = sorted(folder.glob("page*.png"))
    assert len(rendered) == pages
    for path in rendered:
        with Image.open(path) as page:
            assert ImageOps.invert(page.convert("L")).getbbox() is not None, f"{path} is blank"


def test_redeliver_shows_in_inbox(readme_mailfax: Mailfax) -> None:
    """``mailfax redeliver`` queues the fax's mail again; ``inbox`` shows it queued, then
    mailed (a running serve's outbox looks for new mail every 30 s)."""
    fax = eventually(lambda: next((fax for fax in readme_mailfax.inbox()
                                   if fax["state"] == "mailed"), None), 60, "a mailed fax")
    mails = len(readme_mailfax.mails())
    out = readme_mailfax.run("redeliver", fax["fax_id"]).stdout
    assert "queued for delivery again" in out
    again = next(f for f in readme_mailfax.inbox() if f["fax_id"] == fax["fax_id"])
    assert (again["state"], again["deliveries"], again["at_provider"]) == (
        "queued", fax["deliveries"] + 1, "deleted")
    eventually(lambda: next((f for f in readme_mailfax.inbox() if f["fax_id"] == fax["fax_id"]
                             and f["state"] == "mailed"), None), 60, "mailed again")
    assert len(readme_mailfax.mails()) == mails + 1
