"""Settings as a user meets them: paths made absolute once at load (relative to the config
file's folder, or to the current directory without one), `check-config` refusing exactly what
`serve` refuses with the same message, secrets read only by the commands that need them, and
office documents on the embedded defaults."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiosmtplib
import pikepdf
import pytest

from mailfax import cli
from mailfax.app import Application
from mailfax.config import (
    AccountSettings,
    ConfigError,
    Settings,
    default_settings,
    load_settings,
    with_absolute_paths,
)
from mailfax.documents import office
from mailfax.documents.office import OfficeLimits, convert_office
from mailfax.model import JobState
from mailfax.store.base import Job
from mailfax.trust.auth import hash_password
from tests.conftest import fax_mail

needs_libreoffice = pytest.mark.skipif(shutil.which("soffice") is None,
                                       reason="needs LibreOffice (libreoffice-writer-nogui)")


@pytest.fixture(autouse=True)
def no_config_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("MAILFAX_CONFIG", raising=False)
    yield
    office.configure(OfficeLimits())


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# -- paths --------------------------------------------------------------------------------------

def test_without_a_config_paths_are_relative_to_the_current_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    settings = load_settings(None)
    assert settings.data_dir == tmp_path / "mailfax-data"
    assert settings.maildir_path == tmp_path / "mailfax-data" / "outbox"
    assert settings.store_url == f"sqlite:///{tmp_path}/mailfax-data/mailfax.sqlite3"


def test_a_relative_config_path_makes_paths_relative_to_the_config_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "cfg" / "x.toml", """
data_dir = "data"
templates_dir = "../templates"
[smtp]
tls_cert = "tls/cert.pem"
tls_key = "/etc/ssl/key.pem"
[outbox]
maildir = "mail"
[store]
url = "sqlite:///db/store.sqlite3"
""")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    settings = load_settings(Path("../cfg/x.toml"))
    cfg = tmp_path / "cfg"
    assert settings.data_dir == cfg / "data"
    assert settings.templates_dir == tmp_path / "templates"
    assert settings.smtp.tls_cert == cfg / "tls" / "cert.pem"
    assert settings.smtp.tls_key == Path("/etc/ssl/key.pem")
    assert settings.maildir_path == cfg / "mail"
    assert settings.store_url == f"sqlite:///{cfg}/db/store.sqlite3"


def test_an_unwritten_data_dir_is_beside_the_config_file(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    config = write(tmp_path / "etc" / "mailfax.toml", 'fax_domains = ["fax.example.com"]\n')
    monkeypatch.chdir(tmp_path)
    assert load_settings(config).data_dir == tmp_path / "etc" / "mailfax-data"


def test_a_relative_office_profile_folder_still_converts(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """LibreOffice takes its profile as a file URI, which a relative path cannot be."""
    monkeypatch.chdir(tmp_path)
    script = write(tmp_path / "soffice", '#!/bin/sh\nfor a; do s=$a; done\n'
                   f'cp {tmp_path / "one.pdf"} "${{s%.*}}.pdf"\n')
    script.chmod(0o755)
    blank_pdf(tmp_path / "one.pdf", 1)
    office.configure(OfficeLimits(soffice=str(script), profile_root=Path("profiles")))
    assert convert_office("note.txt", b"hello").pages == 1
    assert (tmp_path / "profiles" / "slot-0").is_dir()


def blank_pdf(path: Path, pages: int) -> bytes:
    pdf = pikepdf.new()
    for _ in range(pages):
        pdf.add_blank_page(page_size=(595, 842))
    pdf.save(path)
    return path.read_bytes()


# -- check-config refuses what serve refuses ----------------------------------------------------

def refused_configs(tmp_path: Path) -> dict[str, tuple[str, str]]:
    """Case name -> (config text, what the message must say)."""
    digest = hash_password("correct horse battery")
    write(tmp_path / "empty.secret", "")
    user = f'[users.alice]\npassword_hash = "{digest}"\naddresses = ["alice@example.org"]\n'
    return {
        "beyond loopback, nobody may send": (
            '[smtp]\nlisten = ["0.0.0.0:0"]\n', "only loopback may send"),
        "beyond loopback, anyone may send": (
            '[smtp]\nlisten = ["0.0.0.0:0"]\n[senders]\ntrusted_networks = ["0.0.0.0/0"]\n',
            "lets anyone send faxes"),
        "users without TLS": ('[smtp]\nlisten = ["0.0.0.0:0"]\n' + user, "without TLS"),
        "not a country": ('[numbers]\ndefault_country = "XX"\n',
                          "numbers.default_country: Value error, 'XX' is not a country"),
        "web listen without port": ('[web]\nlisten = "127.0.0.1"\n',
                                    "web.listen: Value error, '127.0.0.1' has no port"),
        "missing file secret": (
            '[relay]\nhost = "127.0.0.1"\nusername = "u"\npassword = "file:no-such.secret"\n',
            f"relay.password: cannot read {tmp_path}/no-such.secret: No such file"),
        "empty file secret": (
            '[relay]\nhost = "127.0.0.1"\nusername = "u"\npassword = "file:empty.secret"\n',
            f"relay.password: {tmp_path}/empty.secret is empty"),
        "unset environment secret": (
            'default_account = "faxde"\n[accounts.faxde]\nprovider = "fax.de"\n'
            'account = "123456"\npassword = "env:MAILFAX_TEST_UNSET"\n',
            "accounts.faxde.password: environment variable MAILFAX_TEST_UNSET is not set"),
        "IMAP intake open to anyone": (
            '[imap_intake]\nhost = "127.0.0.1"\nusername = "u"\npassword = "p"\n',
            "anyone who can mail the watched mailbox could send faxes"),
        "data folder under a file": ('data_dir = "empty.secret/data"\n',
                                     f"data_dir {tmp_path}/empty.secret/data cannot be made: "
                                     f"{tmp_path}/empty.secret is not a folder"),
        "certificate that is not there": (
            '[smtp]\ntls_cert = "tls/cert.pem"\ntls_key = "tls/key.pem"\n',
            "smtp.tls_cert/tls_key"),
    }


CASES = list(refused_configs(Path("/nowhere")))


def run_mailfax(*args: str, cwd: Path, env: dict[str, str] | None = None
                ) -> subprocess.CompletedProcess[str]:
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("MAILFAX_CONFIG", "MAILFAX_TEST_UNSET")}
    return subprocess.run([sys.executable, "-m", "mailfax", *args], cwd=cwd, timeout=60,
                          capture_output=True, text=True, env={**environment, **(env or {})})


def error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("mailfax: ")]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr, stderr
    return lines[0]


@pytest.mark.parametrize("case", CASES)
def test_check_config_refuses_what_serve_refuses_with_the_same_message(
        tmp_path: Path, case: str) -> None:
    text, expected = refused_configs(tmp_path)[case]
    data_dir = "" if text.startswith("data_dir") else 'data_dir = "data"\n'
    config = write(tmp_path / "mailfax.toml", data_dir + text)
    checked = run_mailfax("check-config", str(config), cwd=tmp_path)
    served = run_mailfax("-c", str(config), "serve", cwd=tmp_path)
    assert checked.returncode == 2, checked
    assert served.returncode == 2, served
    assert expected in error_line(checked.stderr)
    assert error_line(checked.stderr) == error_line(served.stderr)


def test_check_config_reads_mailfax_config(tmp_path: Path) -> None:
    bad = write(tmp_path / "bad.toml", '[numbers]\ndefault_country = "XX"\n')
    good = write(tmp_path / "good.toml", 'fax_domains = ["fax.example.com"]\n')
    refused = run_mailfax("check-config", cwd=tmp_path, env={"MAILFAX_CONFIG": str(bad)})
    assert refused.returncode == 2
    assert error_line(refused.stderr).startswith(f"mailfax: {bad}: numbers.default_country")
    checked = run_mailfax("check-config", cwd=tmp_path, env={"MAILFAX_CONFIG": str(good)})
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.startswith(f"{good}: OK")
    assert f"data in {tmp_path}/mailfax-data" in checked.stdout


def test_check_config_with_a_relative_config_path(tmp_path: Path) -> None:
    write(tmp_path / "cfg" / "x.toml", 'data_dir = "state"\n')
    (tmp_path / "work").mkdir()
    checked = run_mailfax("-c", "../cfg/x.toml", "check-config", cwd=tmp_path / "work")
    assert checked.returncode == 0, checked.stderr
    assert f"data in {tmp_path}/cfg/state" in checked.stdout


def test_a_secret_file_is_read_relative_to_the_config_and_only_its_first_line(
        tmp_path: Path) -> None:
    write(tmp_path / "cfg" / "relay.secret", "s3cret\nsecond line\n")
    config = write(tmp_path / "cfg" / "x.toml",
                   '[relay]\nhost = "127.0.0.1"\nusername = "u"\npassword = "file:relay.secret"\n')
    settings = load_settings(config)
    assert settings.relay is not None and settings.relay.password is not None
    assert settings.relay.password.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(settings) and "s3cret" not in str(settings.model_dump())


# -- secrets only where needed -----------------------------------------------------------------

def test_store_commands_need_no_provider_secret(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    config = write(tmp_path / "mailfax.toml", """
data_dir = "data"
default_account = "faxde"
[accounts.faxde]
provider = "fax.de"
account = "123456"
password = "env:MAILFAX_TEST_UNSET"
""")
    os.environ.pop("MAILFAX_TEST_UNSET", None)
    letter = tmp_path / "letter.pdf"
    blank_pdf(letter, 2)
    assert cli.main(["-c", str(config), "send", "--to", "030123456", str(letter)]) == 0
    job_id = capsys.readouterr().out.strip()
    assert cli.main(["-c", str(config), "jobs", "--json"]) == 0
    jobs = json.loads(capsys.readouterr().out)
    assert [(job["id"], job["state"], job["pages"]) for job in jobs] == [(job_id, "queued", 2)]
    assert cli.main(["-c", str(config), "show", job_id]) == 0
    assert job_id in capsys.readouterr().out
    assert cli.main(["-c", str(config), "inbox"]) == 0
    capsys.readouterr()
    assert cli.main(["-c", str(config), "cancel", job_id]) == 0
    assert capsys.readouterr().out.strip() == f"job {job_id} cancelled"
    with pytest.raises(ConfigError, match=r"accounts\.faxde\.password: environment variable "
                                          r"MAILFAX_TEST_UNSET is not set"):
        faxde: Any = load_settings(config).accounts["faxde"].provider_settings()
        faxde.password.get_secret_value()


# -- office documents on the embedded defaults --------------------------------------------------

THREE_PAGES = """<?xml version="1.0" encoding="UTF-8"?>
<office:document xmlns:office="urn:oasis:names:tc:opendocument:xmlns:office:1.0"
 xmlns:style="urn:oasis:names:tc:opendocument:xmlns:style:1.0"
 xmlns:text="urn:oasis:names:tc:opendocument:xmlns:text:1.0"
 xmlns:fo="urn:oasis:names:tc:opendocument:xmlns:xsl-fo-compatible:1.0"
 office:version="1.2" office:mimetype="application/vnd.oasis.opendocument.text">
<office:automatic-styles><style:style style:name="Break" style:family="paragraph">
<style:paragraph-properties fo:break-before="page"/></style:style></office:automatic-styles>
<office:body><office:text><text:p>Page one</text:p>
<text:p text:style-name="Break">Page two</text:p>
<text:p text:style-name="Break">Page three</text:p></office:text></office:body>
</office:document>
"""


@pytest.fixture(scope="module")
def word_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """A three-page document saved by LibreOffice as .docx and as Word 97 .doc."""
    if shutil.which("soffice") is None:
        pytest.skip("needs LibreOffice (libreoffice-writer-nogui) to make and convert .doc(x)")
    folder = tmp_path_factory.mktemp("word")
    source = write(folder / "three.fodt", THREE_PAGES)
    for target in ("docx", "doc:MS Word 97"):
        subprocess.run(["soffice", f"-env:UserInstallation={(folder / 'profile').as_uri()}",
                        "--headless", "--convert-to", target, "--outdir", str(folder),
                        str(source)], check=True, capture_output=True, timeout=120)
    return {"docx": (folder / "three.docx").read_bytes(),
            "doc": (folder / "three.doc").read_bytes()}


def tnef(filename: str, data: bytes) -> bytes:
    """A minimal winmail.dat (TNEF) that carries one attached file, as Outlook writes it."""
    def attribute(level: int, kind: int, name: int, value: bytes) -> bytes:
        checksum = sum(value) & 0xFFFF
        return (bytes([level]) + name.to_bytes(2, "little") + kind.to_bytes(2, "little")
                + len(value).to_bytes(4, "little") + value + checksum.to_bytes(2, "little"))

    return (0x223E9F78.to_bytes(4, "little") + (1).to_bytes(2, "little")
            + attribute(1, 0x0008, 0x9006, (0x00010000).to_bytes(4, "little"))
            + attribute(2, 0x0006, 0x9002, bytes(14))  # attAttachRendData: one attachment
            + attribute(2, 0x0001, 0x8010, filename.encode("ascii") + b"\0")
            + attribute(2, 0x0006, 0x800F, data))


@needs_libreoffice
async def test_serve_on_defaults_in_an_empty_folder_faxes_word_files(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, word_files: dict[str, bytes]) -> None:
    """No config file, an empty current folder: the relative default data dir must not stop
    LibreOffice (it once did, as a 451 for every office file)."""
    monkeypatch.chdir(tmp_path)
    defaults = load_settings(None)
    # Only the port differs from the defaults, so parallel test runs do not collide.
    settings = defaults.model_copy(update={
        "smtp": defaults.smtp.model_copy(update={"listen": ["127.0.0.1:0"]})})
    app = Application(settings)
    await app.start()
    try:
        port = app.smtp_servers[0].sockets[0].getsockname()[1]
        mails = {
            "docx": fax_mail([("Angebot.docx", word_files["docx"], "application/vnd."
                               "openxmlformats-officedocument.wordprocessingml.document")]),
            "doc": fax_mail([("Brief.doc", word_files["doc"], "application/msword")]),
            "winmail.dat": fax_mail([("winmail.dat", tnef("Brief.doc", word_files["doc"]),
                                      "application/ms-tnef")]),
        }
        for kind, mail in mails.items():
            code, reply = await send_data(port, mail.as_bytes())
            assert (code, reply.split(" queued as ")[0]) == (250, "2.0.0"), (kind, reply)
            job_id = reply.split()[-1]
            job = await wait_for_final(app, job_id)
            assert (job.state, job.pages) == (JobState.DELIVERED, 3), kind
    finally:
        await app.stop()
    assert (tmp_path / "mailfax-data" / "mailfax.sqlite3").is_file()


@needs_libreoffice
async def test_the_mailfax_command_with_no_config_faxes_word_files(
        tmp_path: Path, word_files: dict[str, bytes]) -> None:
    """README's first command as it is, `mailfax serve` in an empty folder, on port 2525."""
    environment = {key: value for key, value in os.environ.items() if key != "MAILFAX_CONFIG"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mailfax", "serve", cwd=tmp_path, env=environment,
        stderr=asyncio.subprocess.PIPE)
    assert process.stderr is not None
    log: list[str] = []
    try:
        while not any("listening for mail on" in line for line in log):
            line = (await asyncio.wait_for(process.stderr.readline(), 60)).decode()
            if not line:
                if any("Address already in use" in line for line in log):
                    pytest.skip("port 2525 is taken by another program on this machine")
                raise AssertionError("".join(log))
            log.append(line)
        drain = asyncio.create_task(process.stderr.read())  # so its log never fills the pipe
        attachments = {
            "Angebot.docx": (word_files["docx"], "application/vnd.openxmlformats-"
                             "officedocument.wordprocessingml.document"),
            "Brief.doc": (word_files["doc"], "application/msword"),
            "winmail.dat": (tnef("Brief.doc", word_files["doc"]), "application/ms-tnef")}
        job_ids = []
        for name, (data, content_type) in attachments.items():
            code, reply = await send_data(2525, fax_mail([(name, data, content_type)]).as_bytes())
            assert (code, reply.split(" queued as ")[0]) == (250, "2.0.0"), (name, reply)
            job_ids.append(reply.split()[-1])
        deadline = time.monotonic() + 60
        while True:
            listed = await asyncio.to_thread(run_mailfax, "jobs", "--json", cwd=tmp_path)
            jobs = {job["id"]: job for job in json.loads(listed.stdout)}
            if all(jobs[job_id]["state"] == "delivered" for job_id in job_ids):
                break
            assert time.monotonic() < deadline, jobs
            await asyncio.sleep(0.5)
        assert [jobs[job_id]["pages"] for job_id in job_ids] == [3, 3, 3]
    finally:
        if process.returncode is None:
            process.terminate()
            await asyncio.wait_for(process.wait(), 30)
    assert "Traceback" not in (await drain).decode()
    assert (tmp_path / "mailfax-data" / "mailfax.sqlite3").is_file()


async def send_data(port: int, raw: bytes, recipient: str = "030123456@fax.local"
                    ) -> tuple[int, str]:
    """The DATA reply (code, text) for one mail, whatever it is."""
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=120) as smtp:
        await smtp.mail("alice@example.org")
        await smtp.rcpt(recipient)
        try:
            response = await smtp.data(raw)
        except aiosmtplib.SMTPResponseException as error:
            return error.code, error.message
        return response.code, response.message


async def wait_for_final(app: Application, job_id: str, timeout: float = 60) -> Job:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = await app.store.get_job(job_id)
        if job is not None and job.state.is_final:
            return job
        await asyncio.sleep(0.2)
    raise AssertionError(f"job {job_id} did not end within {timeout} s")


def test_the_defaults_are_the_same_settings_with_absolute_paths(tmp_path: Path) -> None:
    assert with_absolute_paths(Settings(), tmp_path) == Settings(
        data_dir=tmp_path / "mailfax-data")


def test_the_defaults_without_a_file_are_the_validated_defaults(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No config file: the defaults are made without validating them (the validator is not
    built); they are what validating them gives, down to the fields set and the account."""
    made = default_settings()
    assert made == Settings()
    assert made.model_fields_set == set()
    assert made.accounts["emulator"] == AccountSettings(provider="emulator")
    monkeypatch.delenv("MAILFAX_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    assert load_settings(None) == with_absolute_paths(Settings(), tmp_path)


def test_each_sections_unvalidated_defaults_equal_its_validated_defaults() -> None:
    """A section missing from the file is made with ``model_construct`` (no validator built
    for it: ``mailfax jobs`` starts faster); that must be what validating its defaults gives
    (the validators normalise: country codes upper-cased, prefixes in E.164)."""
    from pydantic import BaseModel

    constructed = 0
    for name, field in Settings.model_fields.items():
        factory = field.default_factory
        model = getattr(factory, "__self__", None)
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            continue
        assert factory is not None
        made = factory()  # type: ignore[call-arg]
        assert made == model.model_validate({}), name
        assert made.model_fields_set == set(), name
        constructed += 1
    assert constructed >= 14  # smtp, store, senders, numbers, dial, ...


def test_a_section_given_in_the_file_is_still_validated(tmp_path: Path) -> None:
    """Only the defaults skip validation: what a file says is checked as before."""
    config = tmp_path / "mailfax.toml"
    config.write_text('[dial]\nallowed_countries = ["de", "Mars"]\n')
    with pytest.raises(ConfigError, match=r"dial\.allowed_countries.*'Mars' is not a country"):
        load_settings(config)
    config.write_text('[dial]\nallowed_countries = ["de"]\n[smtp]\nmax_recipients = 0\n')
    with pytest.raises(ConfigError, match=r"smtp\.max_recipients"):
        load_settings(config)
    config.write_text('[dial]\nallowed_countries = ["de"]\n')
    assert load_settings(config).dial.allowed_countries == ["DE"]
