"""Keep the deployment files in deploy/ honest, without Docker or systemd.

The compose config must pass mailfax's own validation (and its refusal to listen beyond
loopback unsafely), the systemd unit must carry the hardening and point ExecStart at the
config in its ConfigurationDirectory, the Dockerfile must run as a non-root user with a
health check, compose.yaml must hold mailfax, PostgreSQL and the FAX.de emulator, and
mailfax.example.toml must load and show every setting.
"""

from __future__ import annotations

import configparser
import fnmatch
import re
import shlex
import tomllib
import typing
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Annotated, Any

import pytest
import yaml  # PyYAML is in the test extra: without it these tests must fail, not skip
from pydantic import BaseModel, TypeAdapter

from mailfax.config import (
    AccountSettings,
    ListenAddress,
    Settings,
    load_settings,
    with_absolute_paths,
)
from mailfax.providers import PROVIDER_MODULES, provider_module
from mailfax.trust.policy import exposure_problem

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
UNIT = DEPLOY / "systemd" / "mailfax.service"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE = DEPLOY / "compose.yaml"
COMPOSE_CONFIG = DEPLOY / "compose.mailfax.toml"


# -- compose.mailfax.toml ---------------------------------------------------------------------

@pytest.fixture
def compose_settings(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("FAXDE_PASSWORD", "secret")
    monkeypatch.delenv("MAILFAX_CONFIG", raising=False)
    return load_settings(COMPOSE_CONFIG)


def test_compose_config_validates(compose_settings: Any) -> None:
    settings = compose_settings
    assert settings.default_account == "faxde"
    assert set(settings.accounts) == {"faxde"}
    account = settings.accounts["faxde"]
    assert account.provider == "fax.de"
    faxde = account.provider_settings()
    assert faxde.account == "123456"
    assert faxde.password.get_secret_value() == "secret"
    assert faxde.wsdl_url == "http://faxde-emulator:8080/xmlws.exe?wsdl/IntfXMLWS"
    assert faxde.endpoint_url.startswith("http://faxde-emulator:8080/")
    assert settings.store.url.startswith("postgresql://")
    assert "@postgres:" in settings.store.url
    assert str(settings.data_dir) == "/var/lib/mailfax"


def test_compose_config_keeps_no_secret(compose_settings: Any) -> None:
    text = COMPOSE_CONFIG.read_text(encoding="utf-8")
    assert 'password = "env:FAXDE_PASSWORD"' in text
    user_info = compose_settings.store.url.split("://", 1)[1].split("@", 1)[0]
    assert ":" not in user_info  # the database password comes from PGPASSWORD


def test_compose_config_needs_the_password_to_serve(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading reads no secret (``mailfax jobs`` needs none); what serve checks first does."""
    from mailfax.app import preflight
    from mailfax.config import ConfigError

    monkeypatch.delenv("FAXDE_PASSWORD", raising=False)
    settings = load_settings(COMPOSE_CONFIG)
    with pytest.raises(ConfigError, match=r"accounts\.faxde\.password: environment variable "
                                          r"FAXDE_PASSWORD is not set"):
        preflight(settings)


def test_compose_config_may_listen_in_a_container(compose_settings: Any) -> None:
    """mailfax would refuse to start on 0.0.0.0 if nobody (or everybody) could send."""
    smtp = compose_settings.smtp
    hosts = [ListenAddress(listen).host
             for listen in (*smtp.listen, *smtp.lmtp_listen, *smtp.implicit_tls_listen)]
    assert "0.0.0.0" in hosts
    assert exposure_problem(hosts, compose_settings.senders, bool(compose_settings.users),
                            smtp.tls_cert is not None) is None
    assert "172.16.0.0/12" in compose_settings.senders.trusted_networks
    assert compose_settings.web.listen is not None
    assert ListenAddress(compose_settings.web.listen).port == 8025


# -- systemd unit ------------------------------------------------------------------------------

def read_unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None,
                                       empty_lines_in_values=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read_string(UNIT.read_text(encoding="utf-8"), source=str(UNIT))
    return parser


def test_unit_parses_with_the_usual_sections() -> None:
    unit = read_unit()
    assert {"Unit", "Service", "Install"} <= set(unit.sections())
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_unit_is_hardened() -> None:
    service = read_unit()["Service"]
    expected = {
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "NoNewPrivileges": "yes",
        "CapabilityBoundingSet": "",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "StateDirectory": "mailfax",
        "ConfigurationDirectory": "mailfax",
        "Restart": "on-failure",
    }
    for key, value in expected.items():
        assert key in service, key
        assert service[key] == value, key
    # strict=False keeps the last of repeated keys; the allow-list must be there too.
    text = UNIT.read_text(encoding="utf-8")
    assert "\nSystemCallFilter=@system-service\n" in text
    assert service.get("User") == "mailfax" or service.get("DynamicUser") == "yes"
    assert service.get("User", "root") != "root"


def test_unit_runs_in_its_state_dir_with_the_config_of_its_config_dir() -> None:
    service = read_unit()["Service"]
    assert service["WorkingDirectory"] == f"/var/lib/{service['StateDirectory']}"
    argv = shlex.split(service["ExecStart"])
    assert argv[0] == "/opt/mailfax/bin/mailfax"  # the venv of OPERATIONS.md
    assert argv[-1] == "serve"
    config = PurePosixPath(argv[argv.index("-c") + 1])
    assert config.parent == PurePosixPath("/etc") / service["ConfigurationDirectory"]
    assert config.suffix == ".toml"
    assert "EnvironmentFile" in service or "Environment" in service


def test_unit_command_line_is_mailfax_s() -> None:
    """The flags in ExecStart are the ones mailfax's parser knows."""
    from mailfax.cli import build_parser

    argv = shlex.split(read_unit()["Service"]["ExecStart"])
    args = build_parser().parse_args(argv[1:])
    assert args.command == "serve"
    assert str(args.config) == "/etc/mailfax/mailfax.toml"


# -- Dockerfile ----------------------------------------------------------------------------------

def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    logical: list[str] = []
    pending = ""
    for line in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    result = []
    for entry in logical:
        instruction, _, arguments = entry.partition(" ")
        result.append((instruction.upper(), arguments.strip()))
    return result


def test_dockerfile_runs_as_a_non_root_user_with_a_health_check() -> None:
    instructions = dockerfile_instructions()
    kinds = [kind for kind, _ in instructions]
    assert kinds.count("FROM") == 1
    users = [args for kind, args in instructions if kind == "USER"]
    assert users, "no USER"
    assert users[-1].split(":")[0] not in ("root", "0")
    health = [args for kind, args in instructions if kind == "HEALTHCHECK"]
    assert len(health) == 1
    # mailfax health needs no [web] (the image's default config has none): tests/test_health.py
    assert health[0].endswith('CMD ["mailfax", "health"]')
    assert ("ENTRYPOINT", '["mailfax"]') in instructions
    assert ("CMD", '["serve"]') in instructions
    assert any(kind == "VOLUME" and "/var/lib/mailfax" in args for kind, args in instructions)
    assert any(kind == "RUN"
               and "pip install --no-cache-dir --constraint deploy/constraints.txt ." in args
               for kind, args in instructions)
    base = next(args for kind, args in instructions if kind == "ARG"
                and args.startswith("PYTHON_IMAGE="))
    assert base == "PYTHON_IMAGE=python:3.11-slim"


def test_dockerfile_exposes_the_ports_of_the_compose_config(compose_settings: Any) -> None:
    exposed = {int(port) for kind, args in dockerfile_instructions() if kind == "EXPOSE"
               for port in args.split()}
    assert ListenAddress(compose_settings.smtp.listen[0]).port in exposed
    assert ListenAddress(compose_settings.web.listen).port in exposed


def copied_sources() -> list[str]:
    return [source for kind, args in dockerfile_instructions()
            if kind == "COPY" and "--from" not in args for source in args.split()[:-1]]


def test_dockerfile_copies_what_the_package_needs() -> None:
    root = DEPLOY.parent
    for source in copied_sources():
        assert (root / source).exists(), source
    # What pyproject.toml and setup.py read while building: all of it must be copied.
    project = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))
    needed = {"setup.py", "templates", project["project"]["readme"]}
    needed |= {file for files in project["tool"]["setuptools"]["data-files"].values()
               for file in files}
    assert needed <= set(copied_sources())


def docker_ignores(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern that matches decides; ``!`` re-includes."""
    ignored = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        bare = pattern.removeprefix("!").rstrip("/")
        suffix = bare.removeprefix("**/")
        if (fnmatch.fnmatch(path, bare) or path.startswith(bare + "/")
                or (bare.startswith("**/") and any(fnmatch.fnmatch(part, suffix)
                                                   for part in path.split("/")))):
            ignored = not negated
    return ignored


def test_dockerignore_keeps_what_the_dockerfile_copies_and_drops_the_rest() -> None:
    root = DEPLOY.parent
    lines = (root / ".dockerignore").read_text(encoding="utf-8").splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    for source in copied_sources():
        assert not docker_ignores(source, patterns), source
        files = ([source] if (root / source).is_file() else
                 [str(f.relative_to(root)) for f in (root / source).rglob("*") if f.is_file()])
        kept = [f for f in files if "__pycache__" not in f]
        assert kept and not any(docker_ignores(f, patterns) for f in kept), source
    for local in (".venv/bin/python", ".git/HEAD", "mailfax-data/mailfax.sqlite3",
                  "tests/test_deploy.py", "mailfax/__pycache__/cli.cpython-311.pyc"):
        assert docker_ignores(local, patterns), local


# -- compose.yaml ----------------------------------------------------------------------------------

def load_compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    return data


def test_compose_has_two_mailfax_postgres_and_the_emulator() -> None:
    services = load_compose()["services"]
    postgres = [s for s in services.values() if str(s.get("image", "")).startswith("postgres")]
    assert len(postgres) == 1
    assert "healthcheck" in postgres[0]
    assert postgres[0].get("volumes")
    serving = {name: s for name, s in services.items() if s.get("command", [])[-1:] == ["serve"]}
    replicas = sum(s.get("deploy", {}).get("replicas", 1) for s in serving.values())
    assert replicas >= 2
    emulators = [s for s in services.values()
                 if s.get("command", [])[:2] == ["emulate", "fax.de"]]
    assert len(emulators) == 1
    assert emulators[0]["command"][-2:] == ["--listen", "0.0.0.0:8080"]
    assert "faxde-emulator" in services
    images = {s.get("image") for s in serving.values()} | {emulators[0].get("image")}
    assert len(images) == 1  # the emulator runs from the mailfax image


def test_compose_instances_differ_and_publish_on_loopback_only() -> None:
    services = load_compose()["services"]
    serving = [s for s in services.values() if s.get("command", [])[-1:] == ["serve"]]
    assert len({s.get("hostname") for s in serving}) == len(serving)
    published = [port for s in services.values() for port in s.get("ports", [])]
    assert published
    assert all(str(port).startswith("127.0.0.1:") for port in published)
    host_ports = [str(port).split(":")[1] for port in published]
    assert len(host_ports) == len(set(host_ports))


def test_compose_mounts_the_checked_config() -> None:
    services = load_compose()["services"]
    for service in services.values():
        if service.get("command", [])[-1:] != ["serve"]:
            continue
        mounts = {volume.split(":")[1]: volume.split(":")[0] for volume in service["volumes"]}
        assert mounts["/etc/mailfax/mailfax.toml"] == "./compose.mailfax.toml"
        assert (COMPOSE.parent / mounts["/etc/mailfax/mailfax.toml"]).is_file()
        assert service["environment"]["FAXDE_PASSWORD"] == "secret"
        assert "PGPASSWORD" in service["environment"]
        assert "/var/lib/mailfax" in mounts


# -- mailfax.example.toml ---------------------------------------------------------------------

EXAMPLE = DEPLOY / "mailfax.example.toml"


def test_example_config_is_the_built_in_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """Copying the example changes nothing: no relay, no sender restriction, no cover."""
    monkeypatch.delenv("MAILFAX_CONFIG", raising=False)
    settings = load_settings(EXAMPLE)
    defaults = with_absolute_paths(Settings(), EXAMPLE.parent)
    assert differences(settings.model_dump(), defaults.model_dump()) == []
    assert settings == defaults
    assert settings.relay is None and settings.senders.allowed_domains == []


def differences(found: Any, expected: Any, where: str = "") -> list[str]:
    if isinstance(found, dict) and isinstance(expected, dict):
        return [difference for key in sorted(set(found) | set(expected), key=str)
                for difference in differences(found.get(key), expected.get(key),
                                              f"{where}.{key}" if where else str(key))]
    return [] if found == expected else [f"{where}: {found!r} (default {expected!r})"]


EXAMPLE_LINE = re.compile(r"^# (example: )?([A-Za-z_]+) = (.*)$")


def commented_settings(body: str) -> Iterator[tuple[bool, str, Any]]:
    """(is an example, key, value) of the lines ``# key = value`` and ``# example: …``;
    a value may go on over the following comment lines (a list)."""
    lines = body.splitlines()
    for index, line in enumerate(lines):
        match = EXAMPLE_LINE.match(line)
        if not match:
            continue
        text = f"value = {match.group(3)}"
        following = iter(lines[index + 1:index + 8])
        while True:
            try:
                value = tomllib.loads(text)["value"]
                break
            except tomllib.TOMLDecodeError:
                more = next(following, None)
                assert more is not None and more.startswith("#"), f"cannot read {line!r}"
                text += "\n" + more.removeprefix("#")
        yield bool(match.group(1)), match.group(2), value


def model_of(section: str, sections: dict[str, str]) -> type[BaseModel]:
    model: type[BaseModel] = Settings
    parts = section.split(".") if section else []
    index = 0
    while index < len(parts):
        annotation = model.model_fields[parts[index]].annotation
        kind, sub = models_in(annotation)[0]
        if sub is AccountSettings:
            settings: type[BaseModel] = provider_module(provider_of(section, sections)).Settings
            return settings
        index += 2 if kind == "tables" else 1
        model = sub
    return model


def test_example_config_comments_hold_defaults_or_say_example() -> None:
    """A commented ``# key = value`` must be the default (to switch on, or as reference);
    anything else is written ``# example: key = value``."""
    sections = example_sections()
    wrong = []
    for section, body in sections.items():
        model = model_of(section, sections)
        for example, key, value in commented_settings(body):
            where = f"{section}.{key}" if section else key
            if key == "provider" and section.startswith("accounts."):
                continue
            fields = dict(model.model_fields)
            if section.startswith("accounts."):  # keys every account has, beside its provider's
                fields.update(AccountSettings.model_fields)
            assert key in fields, f"{where} is not a setting"
            field = fields[key]
            if example:
                continue
            if field.is_required():
                wrong.append(f"{where} has no default: write it as '# example: {key} = …'")
                continue
            annotation: Any = field.annotation
            if field.metadata:
                annotation = Annotated[(annotation, *field.metadata)]
            default = field.get_default(call_default_factory=True)
            if TypeAdapter(annotation).validate_python(value) != default:
                wrong.append(f"{where} = {value!r} is not the default {default!r}: mark it "
                             "'# example:'")
    assert wrong == []


def example_sections() -> dict[str, str]:
    """Section name ('' before the first) -> its lines, commented-out sections included."""
    lines: dict[str, list[str]] = {"": []}
    current = ""
    for line in EXAMPLE.read_text(encoding="utf-8").splitlines():
        header = re.match(r"^#? ?\[([A-Za-z0-9_.-]+)\]\s*$", line)
        if header:
            current = header.group(1)
            lines.setdefault(current, [])
        else:
            lines[current].append(line)
    return {name: "\n".join(body) for name, body in lines.items()}


def models_in(annotation: Any) -> list[tuple[str, type[BaseModel]]]:
    """(how the model is written: 'table', 'tables' (one per name) or 'inline', model)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [("table", annotation)]
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is dict:
        return [("tables", model) for _, model in models_in(args[1])]
    if origin is list:
        return [("inline", model) for _, model in models_in(args[0])]
    return [found for arg in args for found in models_in(arg)]


def provider_of(account: str, sections: dict[str, str]) -> str:
    provider = re.search(r'provider = "([^"]+)"', sections[account])
    assert provider, f"[{account}] names no provider"
    return provider.group(1)


def undocumented(model: type[BaseModel], section: str, sections: dict[str, str]) -> list[str]:
    missing = []
    text = sections.get(section, "")
    for name, field in model.model_fields.items():
        where = f"{section}.{name}" if section else name
        nested = models_in(field.annotation)
        if not nested and not re.search(rf"(^|[#\s{{,]){name} *=", text, re.MULTILINE):
            missing.append(where)
        for kind, sub in nested:
            if kind == "table":
                missing += undocumented(sub, where, sections)
            elif kind == "inline":
                missing += undocumented(sub, section, sections)
            elif sub is AccountSettings:
                for account in (key for key in sections if key.startswith(f"{where}.")):
                    settings = provider_module(provider_of(account, sections)).Settings
                    missing += undocumented(settings, account, sections)
            else:
                tables = [key for key in sections if key.startswith(f"{where}.")]
                assert tables, f"no example [{where}.NAME]"
                missing += undocumented(sub, tables[0], sections)
    return missing


def test_example_config_documents_every_setting() -> None:
    sections = example_sections()
    assert undocumented(Settings, "", sections) == []
    providers = {provider_of(name, sections) for name in sections if name.startswith("accounts.")}
    assert providers == set(PROVIDER_MODULES)
