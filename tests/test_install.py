"""The documented install works as written: the Debian 12 commands of deploy/OPERATIONS.md,
taken from the document itself (so the two cannot drift), run with a temporary folder in place
of /opt/mailfax, in a copy of the source tree. The installed mailfax, started from an empty
folder with no checkout anywhere on its path, renders status mails and cover pages from the
templates it carries; the unit's ExecStart and Documentation= point at what the install made.
"""

from __future__ import annotations

import asyncio
import configparser
import email
import email.policy
import importlib.metadata
import json
import re
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import aiosmtplib
import pytest
from packaging.requirements import Requirement

from tests.acceptance import documents
from tests.conftest import fax_mail
from tests.ports import free_port
from tests.test_crash_recovery import wait_for_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
OPERATIONS = ROOT / "deploy" / "OPERATIONS.md"
UNIT = ROOT / "deploy" / "systemd" / "mailfax.service"
CONSTRAINTS = ROOT / "deploy" / "constraints.txt"
DOCUMENTED_PREFIX = "/opt/mailfax"


def debian_commands() -> list[str]:
    """The shell block after the ``debian-install`` marker of OPERATIONS.md."""
    text = OPERATIONS.read_text(encoding="utf-8")
    match = re.search(r"<!-- debian-install:.*?-->\s*```sh\n(.*?)```", text, re.DOTALL)
    assert match, "OPERATIONS.md has no debian-install block"
    return [line.split("  #")[0].strip() for line in match.group(1).splitlines()
            if line.strip()]


def source_tree(destination: Path) -> Path:
    """The files of the repository (tracked or new, not ignored): what a checkout holds."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard",
                             "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, listed.decode().split("\0")):
        if (ROOT / name).is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, destination / name)
    return destination


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run the documented commands that install into /opt/mailfax (the others need root and
    touch the host: useradd, apt-get, /etc, systemctl), with a temporary prefix instead."""
    base = tmp_path_factory.mktemp("install")
    source = source_tree(base / "src")
    prefix = base / "opt" / "mailfax"
    commands = [line for line in debian_commands() if DOCUMENTED_PREFIX in line]
    assert [shlex.split(line)[0] for line in commands][:2] == ["python3",
                                                               f"{DOCUMENTED_PREFIX}/bin/pip"]
    for line in commands:
        done = subprocess.run(line.replace(DOCUMENTED_PREFIX, str(prefix)), shell=True,
                              cwd=source, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"{line}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    wheel = subprocess.run([str(prefix / "bin" / "pip"), "wheel", ".", "--no-deps", "-q",
                            "-w", str(base / "wheels")], cwd=source, capture_output=True,
                           text=True, timeout=900)
    assert wheel.returncode == 0, wheel.stderr[-3000:]
    shutil.rmtree(source)  # nothing of the checkout is left to be found
    return prefix


def test_the_documented_commands_are_all_in_the_block() -> None:
    commands = debian_commands()
    assert f"python3 -m venv {DOCUMENTED_PREFIX}" in commands
    assert any(line.startswith("install -m 0644 deploy/systemd/mailfax.service")
               for line in commands)
    assert commands[-1] == "systemctl enable --now mailfax"


def test_the_unit_points_at_what_the_install_made(installed: Path) -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string(UNIT.read_text(encoding="utf-8"))
    for key in ("ExecStart", "ExecStartPre"):
        program = shlex.split(unit["Service"][key])[0]
        assert program.startswith(f"{DOCUMENTED_PREFIX}/"), key
        assert (installed / program.removeprefix(f"{DOCUMENTED_PREFIX}/")).is_file(), key
    documentation = unit["Unit"]["Documentation"]
    assert documentation.startswith(f"file://{DOCUMENTED_PREFIX}/")
    doc = installed / documentation.removeprefix(f"file://{DOCUMENTED_PREFIX}/")
    assert doc.read_text(encoding="utf-8") == OPERATIONS.read_text(encoding="utf-8")


def test_the_installed_package_carries_its_templates(installed: Path, tmp_path: Path) -> None:
    python = installed / "bin" / "python"
    done = subprocess.run(
        [str(python), "-c", "import mailfax, mailfax.outbound.notify as n; "
                            "print(mailfax.__file__); print(n.TEMPLATES_DIR)"],
        cwd=tmp_path, capture_output=True, text=True, check=True, env={"PATH": "/usr/bin"})
    package, templates = done.stdout.splitlines()
    assert Path(package).is_relative_to(installed)
    assert Path(templates).is_relative_to(installed)
    assert {path.name for path in Path(templates).iterdir()} == {"en", "de"}
    for language in ("en", "de"):
        shipped = sorted(path.name for path in (ROOT / "templates" / language).iterdir())
        assert sorted(path.name for path in (Path(templates) / language).iterdir()) == shipped


COVER = """
import sys
from datetime import datetime, timezone
import mailfax
from mailfax.documents.cover import CoverInfo, render_cover
from mailfax.outbound.notify import TEMPLATES_DIR
print(mailfax.__file__)
print(TEMPLATES_DIR)
info = CoverInfo("alice@example.org", "+49 30 123456", "Installed with --target",
                 datetime(2026, 12, 1, 9, 30, tzinfo=timezone.utc), "Cover text here.", 1)
sys.stdout.flush()
sys.stdout.buffer.write(render_cover(info, "de", TEMPLATES_DIR).data)
"""


def test_a_wheel_installed_with_target_renders_a_cover_from_its_own_templates(
        installed: Path, tmp_path: Path) -> None:
    """``pip wheel . --no-deps``, then ``pip install --target``: the templates come along."""
    [wheel] = (installed.parent.parent / "wheels").glob("mailfax-*.whl")
    target = tmp_path / "target"
    subprocess.run([str(installed / "bin" / "pip"), "install", "-q", "--no-deps", "--target",
                    str(target), str(wheel)], check=True, capture_output=True, timeout=300)
    empty = tmp_path / "empty"
    empty.mkdir()
    done = subprocess.run([str(installed / "bin" / "python"), "-c", COVER], cwd=empty,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(target)},
                          capture_output=True, check=True, timeout=120)
    package, templates, pdf = done.stdout.split(b"\n", 2)
    assert Path(package.decode()).is_relative_to(target)
    assert Path(templates.decode()) == target / "mailfax" / "templates"
    (tmp_path / "cover.pdf").write_bytes(pdf)
    text = subprocess.run(["pdftotext", str(tmp_path / "cover.pdf"), "-"], capture_output=True,
                          text=True, check=True).stdout
    assert "Installed with --target" in text and "Cover text here." in text
    assert "+49 30 123456" in text


@pytest.fixture
def serving(installed: Path, tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """The installed mailfax serving from an empty folder on its own config."""
    folder = tmp_path / "empty"
    folder.mkdir()
    port = free_port()
    config = tmp_path / "mailfax.toml"
    config.write_text(f"""
data_dir = "{tmp_path / 'data'}"
[smtp]
listen = ["127.0.0.1:{port}"]
[documents]
cover = "always"
[dispatch]
status_poll_seconds = 1
retry_initial_seconds = 0.5
[notify]
events = ["accepted", "delivered"]
[accounts.emulator]
provider = "emulator"
delay_seconds = 0.5
""", encoding="utf-8")
    log = (tmp_path / "serve.log").open("wb")
    server = subprocess.Popen([str(installed / "bin" / "mailfax"), "-c", str(config), "serve"],
                              cwd=folder, stdout=log, stderr=subprocess.STDOUT,
                              env={"PATH": "/usr/bin:/bin"})
    try:
        asyncio.run(wait_for_port(port, timeout=60))
        yield config, port
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
        log.close()


def test_the_installed_mailfax_renders_covers_and_status_mails(
        installed: Path, serving: tuple[Path, int], tmp_path: Path) -> None:
    config, port = serving
    mail = fax_mail([("letter.pdf", documents.pdf(1), "application/pdf")],
                    sender="alice@example.org", subject="Installed",
                    body="Dear Sir, this text is the cover page.")

    async def send() -> str:
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=60) as client:
            _, reply = await client.send_message(mail)
        return reply

    asyncio.run(send())
    outbox = tmp_path / "data" / "outbox" / "new"
    deadline = time.monotonic() + 90
    subjects: dict[str, email.message.EmailMessage] = {}
    while time.monotonic() < deadline and len(subjects) < 2:
        for path in outbox.glob("*") if outbox.is_dir() else []:
            message = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
            assert isinstance(message, email.message.EmailMessage)
            subjects[str(message["Subject"])] = message
        time.sleep(0.5)
    log = (tmp_path / "serve.log").read_text(encoding="utf-8", errors="replace")
    assert len(subjects) == 2, f"{sorted(subjects)}\n{log[-3000:]}"
    bodies = [message.get_body(("plain",)) for message in subjects.values()]
    texts = [body.get_content() for body in bodies if body is not None]
    assert len(texts) == 2
    assert all("+49 30 123456" in text and "Subject of your mail: Installed" in text
               for text in texts), texts
    assert sum("+49 30 123456 (2 pages) was accepted" in text for text in texts) == 1, texts
    assert "Traceback" not in log and "TemplateNotFound" not in log

    jobs = json.loads(subprocess.run(
        [str(installed / "bin" / "mailfax"), "-c", str(config), "jobs", "--json"],
        cwd=tmp_path / "empty", capture_output=True, text=True, check=True,
        env={"PATH": "/usr/bin:/bin"}).stdout)
    assert [(job["state"], job["pages"]) for job in jobs] == [("delivered", 2)]  # cover + 1


def test_the_constraints_pin_everything_mailfax_needs() -> None:
    """deploy/constraints.txt (used by the Dockerfile and the Debian install) pins each
    distribution mailfax depends on, directly or not, with ``==``."""
    pinned = {}
    for line in CONSTRAINTS.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"not pinned: {line}"
            pinned[canonical(name)] = version.strip()
    missing = sorted(needed("mailfax", set()) - set(pinned) - {"mailfax"})
    assert missing == []


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def needed(name: str, seen: set[str], extras: frozenset[str] = frozenset()) -> set[str]:
    """The distribution and, recursively, what it requires (with its chosen extras)."""
    key = canonical(name)
    if key in seen:
        return seen
    seen.add(key)
    for text in importlib.metadata.requires(name) or []:
        requirement = Requirement(text)
        environments = [{"extra": extra} for extra in extras] or [{"extra": ""}]
        if requirement.marker and not any(requirement.marker.evaluate(env)
                                          for env in environments):
            continue
        needed(requirement.name, seen, frozenset(requirement.extras))
    return seen
