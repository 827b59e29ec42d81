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


def loaded_after(body: str, env: dict[str, str]) -> list[str]:
    """The heavy modules a fresh interpreter has loaded after running ``body``."""
    script = REPORT.format(body=body, heavy=HEAVY)
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
    body = ("import mailfax.cli\ntry:\n    mailfax.cli.main(['--version'])\n"
            "except SystemExit as stop:\n    assert stop.code == 0")
    assert loaded_after(body, cli_env) == []


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
