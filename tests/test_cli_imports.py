"""The CLI starts fast: ``import mailfax.cli``, ``mailfax --version`` and ``mailfax jobs`` do
not load the heavy libraries only ``serve`` and the providers need (timed in bench/cli.py;
here only which modules are loaded, checked in a fresh interpreter)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("aiohttp", "zeep", "pikepdf", "jinja2", "reportlab", "httpx", "aiosmtpd", "PIL",
         "phonenumbers.geocoder")

REPORT = """
import json, sys
{body}
heavy = {heavy!r}
print(json.dumps(sorted(name for name in heavy if name in sys.modules)))
"""


def loaded_after(body: str, env: dict[str, str], heavy: tuple[str, ...] = HEAVY) -> list[str]:
    """The ``heavy`` modules a fresh interpreter has loaded after running ``body``."""
    script = REPORT.format(body=body, heavy=heavy)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=120, check=True)
    loaded: list[str] = json.loads(done.stdout.strip().splitlines()[-1])
    return loaded


@pytest.fixture
def cli_env(tmp_path: Path) -> dict[str, str]:
    """A config of its own (data in tmp_path) with a migrated store holding no jobs."""
    config = tmp_path / "mailfax.toml"
    config.write_text(f'data_dir = "{tmp_path / "data"}"\n')
    env = {**os.environ, "MAILFAX_CONFIG": str(config)}
    subprocess.run([sys.executable, "-m", "mailfax", "migrate"], env=env, check=True,
                   capture_output=True, timeout=120)
    return env


def test_importing_the_cli_loads_no_heavy_library(cli_env: dict[str, str]) -> None:
    assert loaded_after("import mailfax.cli", cli_env) == []


def test_jobs_loads_no_heavy_library(cli_env: dict[str, str]) -> None:
    body = ("import io, contextlib\nimport mailfax.cli\nout = io.StringIO()\n"
            "with contextlib.redirect_stdout(out):\n"
            "    code = mailfax.cli.main(['jobs'])\n"
            "assert code == 0 and '-- no jobs' in out.getvalue(), out.getvalue()")
    assert loaded_after(body, cli_env) == []
    body_json = body.replace("['jobs']", "['jobs', '--json']").replace("'-- no jobs'", "'[]'")
    assert loaded_after(body_json, cli_env) == []


def test_version_loads_no_heavy_library(cli_env: dict[str, str]) -> None:
    body = "import mailfax.cli\nassert mailfax.cli.main(['--version']) == 0"
    assert loaded_after(body, cli_env) == []


VERSION_REPORT = """
import contextlib, io, json, sys
sys.argv = ["mailfax", "--version"]  # as the console script is started
import mailfax.cli
out = io.StringIO()
with contextlib.redirect_stdout(out):
    code = mailfax.cli.main()
print(json.dumps({"code": code, "out": out.getvalue(),
                  "loaded": sorted(name for name in sys.modules if name in WATCHED)}))
"""


def test_version_imports_neither_pydantic_nor_the_config(cli_env: dict[str, str]) -> None:
    """``mailfax --version`` answers from the package's version: no config models, no
    store, no event loop (bench/cli.py times it)."""
    watched = ("pydantic", "pydantic_core", "mailfax.config", "mailfax.store", "asyncio",
               "mailfax.inbound.commands")
    script = f"WATCHED = {watched!r}\n" + VERSION_REPORT
    done = subprocess.run([sys.executable, "-c", script], env=cli_env, capture_output=True,
                          text=True, timeout=120, check=True)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    from mailfax import __version__

    assert report == {"code": 0, "out": f"mailfax {__version__}\n", "loaded": []}
    # and the report is real: a command that validates the config loads them
    check = subprocess.run([sys.executable, "-c",
                            script.replace('"--version"', '"check-config"')],
                           env=cli_env, capture_output=True, text=True, timeout=120, check=True)
    loaded = json.loads(check.stdout.strip().splitlines()[-1])["loaded"]
    assert {"pydantic", "mailfax.config", "asyncio"} <= set(loaded)


# What validating the config imports: `jobs`, `show`, `inbox` and `cancel` (of a job no
# provider has yet) read only where the store is (mailfax.support.config_file).
CONFIG_MODULES = ("pydantic", "pydantic_core", "mailfax.config", "mailfax.inbound.routing",
                  "mailfax.inbound.screening", "mailfax.providers.account_settings",
                  "mailfax.trust.dialing")


def watched_after(argv: list[str], watched: tuple[str, ...], env: dict[str, str]
                  ) -> dict[str, object]:
    """``mailfax ARGV`` run as the console script runs it, in a fresh interpreter: its exit
    code, output, and which of ``watched`` it loaded."""
    script = (f"WATCHED = {watched!r}\n"
              + VERSION_REPORT.replace('["mailfax", "--version"]', repr(["mailfax", *argv])))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=120, check=True)
    report: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return report


@pytest.mark.parametrize("argv", [["jobs"], ["jobs", "--json"], ["show", "nosuchjob"],
                                  ["cancel", "nosuchjob"], ["inbox"]])
def test_store_commands_do_not_validate_the_config(cli_env: dict[str, str],
                                                   argv: list[str]) -> None:
    report = watched_after(argv, CONFIG_MODULES, cli_env)
    assert report["loaded"] == [], report
    assert report["code"] == (1 if "nosuchjob" in argv else 0), report


def test_store_commands_validate_a_config_they_cannot_be_sure_of(
        cli_env: dict[str, str]) -> None:
    """The check is real: a key the light read does not know sends ``jobs`` through the
    validated config, which names it."""
    config = Path(cli_env["MAILFAX_CONFIG"])
    config.write_text(config.read_text() + 'data-dir = "elsewhere"\n')
    done = subprocess.run([sys.executable, "-m", "mailfax", "jobs"], env=cli_env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert f"mailfax: {config}: data-dir: Extra inputs are not permitted" in done.stderr
    config.write_text("data_dir = 5\n")  # the validated config refuses it
    report = watched_after(["jobs"], CONFIG_MODULES, cli_env)
    assert report["code"] == 2 and {"pydantic", "mailfax.config"} <= set(report["loaded"])


def test_the_check_sees_a_heavy_import(cli_env: dict[str, str]) -> None:
    """The report is real: what needs aiohttp (the web endpoint) and ReportLab shows them."""
    assert loaded_after("import mailfax.web.server, mailfax.documents.cover_pdf",
                        cli_env) == ["PIL", "aiohttp", "jinja2", "reportlab"]


def test_jobs_with_every_provider_configured_loads_no_heavy_library(
        tmp_path: Path, cli_env: dict[str, str]) -> None:
    """Validating the accounts' settings does not import their adapters (zeep, httpx...)."""
    config = Path(cli_env["MAILFAX_CONFIG"])
    config.write_text(config.read_text() + """default_account = "faxde"

[accounts.faxde]
provider = "fax.de"
account = "123456"
password = "env:TEST_FAXDE_PASSWORD"

[accounts.portunity]
provider = "faxnummer.de"
product_login = "acc12345"
product_code = "env:TEST_FAXDE_PASSWORD"
status_email = "fax-admin@example.org"

[accounts.retarus]
provider = "retarus"
customer_number = "99999TE"
username = "mailfax"
password = "env:TEST_FAXDE_PASSWORD"
""")
    env = {**cli_env, "TEST_FAXDE_PASSWORD": "not-used"}
    body = ("import io, contextlib\nimport mailfax.cli\nout = io.StringIO()\n"
            "with contextlib.redirect_stdout(out):\n"
            "    code = mailfax.cli.main(['jobs'])\n"
            "assert code == 0 and '-- no jobs' in out.getvalue(), out.getvalue()")
    assert loaded_after(body, env) == []


def test_each_adapter_uses_the_settings_class_config_validates() -> None:
    from mailfax.providers import PROVIDER_MODULES, provider_module, settings_class

    for name in PROVIDER_MODULES:
        assert provider_module(name).Settings is settings_class(name), name


def test_importing_what_serve_needs_loads_only_the_smtp_server(cli_env: dict[str, str]) -> None:
    """pikepdf, Pillow, jinja2, aiosmtplib... are loaded by the first mail (or the warm-up
    once the port accepts), not by importing the application."""
    assert loaded_after("import mailfax.app", cli_env,
                        (*HEAVY, "prometheus_client")) == ["aiosmtpd"]


SERVE_THEN_MAIL = """
import asyncio, json, smtplib, sys
from email.message import EmailMessage
from email.policy import SMTP
from pathlib import Path

import mailfax.app
from mailfax.app import Application
from mailfax.config import load_settings

heavy = {heavy!r}
after_port = {after_port!r}
at_port = []


async def listening(*args, **kwargs):
    servers = await start_listeners(*args, **kwargs)
    at_port.extend(sorted(name for name in (*heavy, *after_port) if name in sys.modules))
    return servers

start_listeners, mailfax.app.start_listeners = mailfax.app.start_listeners, listening


def send(port: int) -> str:
    message = EmailMessage()
    message["From"] = "alice@example.org"
    message["To"] = "030123456@fax.local"
    message["Subject"] = "Letter"
    message.set_content("Please fax this.")
    message.add_attachment(Path({pdf!r}).read_bytes(), maintype="application",
                           subtype="pdf", filename="letter.pdf")
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
        client.ehlo()
        client.mail("alice@example.org")
        client.rcpt("030123456@fax.local")
        code, reply = client.data(message.as_bytes(policy=SMTP))
        assert code == 250, (code, reply)
        return reply.decode()


async def main() -> None:
    app = Application(load_settings(Path({config!r})))
    await app.start()  # the port accepts, then the loops are made; the warm-up goes on
    loops_loaded = sorted(name for name in after_port if name in sys.modules)
    try:
        port = app.smtp_servers[0].sockets[0].getsockname()[1]
        reply = await asyncio.to_thread(send, port)  # at once, while the warm-up runs
        job = await app.store.get_job(reply.split()[-1])
        pages = job.pages if job else None
        accepted = app.metrics.mails_accepted._value.get()
        paused = app.metrics.account_paused.labels("emulator")._value.get()
        for _ in range(600):  # sent through the bundled emulator by the loops
            job = await app.store.get_job(reply.split()[-1])
            if job is not None and job.state == "delivered":
                break
            await asyncio.sleep(0.05)
        state = job.state if job else None
    finally:
        await app.stop()
    print(json.dumps({{"at_port": at_port, "reply": reply,
                      "pages": pages, "pikepdf": "pikepdf" in sys.modules,
                      "accepted": accepted, "paused": paused,
                      "loops_loaded": loops_loaded, "state": state}}))

asyncio.run(main())
"""


# What only the loops need (the status mails, the dispatcher, tracker, outbox, inbound, IMAP,
# the accounts' adapters): imported once the SMTP port accepts, not before.
AFTER_PORT = ("mailfax.outbound.dispatch", "mailfax.outbound.tracking", "mailfax.outbound.outbox",
              "mailfax.outbound.notify", "mailfax.outbound.windows", "mailfax.store.retention",
              "mailfax.inbound.poller", "mailfax.inbound.mailer", "mailfax.imap.intake",
              "mailfax.imap.delivery", "mailfax.web.health", "mailfax.providers.emulator")


def test_serve_opens_its_port_without_the_heavy_libraries_and_takes_a_mail_at_once(
        tmp_path: Path, cli_env: dict[str, str], corpus: Path) -> None:
    """In a fresh interpreter: what is loaded when the SMTP port accepts (neither the heavy
    libraries nor the loops' modules), then a PDF mail sent right away is queued with its
    pages counted (pikepdf imported by then) and faxed through the bundled emulator by the
    loops started after the port."""
    config = Path(cli_env["MAILFAX_CONFIG"])
    config.write_text(f'data_dir = "{tmp_path / "data"}"\n' """
[smtp]
listen = ["127.0.0.1:0"]

[accounts.emulator]
provider = "emulator"
delay_seconds = 0.3

[notify]
from_address = "fax@mailfax.test"

[inbound]
ocr = "off"
""")
    # and what a mail needs that is not heavy enough for the CLI's list
    script = SERVE_THEN_MAIL.format(heavy=(*HEAVY, "phonenumbers", "aiosmtplib", "aioimaplib",
                                           "prometheus_client"),
                                    after_port=AFTER_PORT, config=str(config),
                                    pdf=str(corpus / "pdf" / "two-different-pages.pdf"))
    done = subprocess.run([sys.executable, "-c", script], env=cli_env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["at_port"] == ["aiosmtpd"]
    # made once the port accepted: start() returns with them loaded, the mail is faxed
    assert report["loops_loaded"] == sorted(AFTER_PORT)
    assert report["state"] == "delivered"
    assert report["reply"].startswith("2.0.0 queued as ")
    assert report["pages"] == 2
    assert report["pikepdf"] is True
    # the metrics, made once the port accepted, counted the mail; the account is at 0
    assert (report["accepted"], report["paused"]) == (1.0, 0.0)
