"""Inbound routing rules ([[inbound.rules]]): the pure matching, and every match type and
field through the FAX.de emulator's inbox to what the recipients get (the relay's envelope,
the outbox Maildir); privacy mode, duplicates, junk faxes and unreadable faxes."""

from __future__ import annotations

import asyncio
import email
import email.policy
import io
import json
import mailbox
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pikepdf
import pytest
from aiosmtpd.controller import Controller

from mailfax.app import Application
from mailfax.config import ConfigError, InboundSettings, load_settings
from mailfax.emulators import faxde as emulator
from mailfax.inbound.routing import FaxFacts, choose_route
from mailfax.inbound.screening import add_block_entry, block_file, page_hashes
from tests.conftest import make_settings
from tests.ports import free_port

PASSWORD = "routing-secret"

OFFICE_RULES: list[dict[str, Any]] = [
    {"name": "health", "called": ["030 1234569"], "to": ["health@example.org"],
     "format": "none", "language": "de"},
    {"name": "boss line", "caller_prefix": ["+4940555"], "to": ["boss@example.org"],
     "cc": ["assistant@example.org"], "bcc": ["archive@example.org"], "format": "pdf+tiff",
     "subject": "Chef-Fax von {{ originator }}"},
    {"name": "acme", "tsi": "^acme", "to": ["acme-desk@example.org"], "format": "tiff",
     "notify_postmaster": True},
    {"name": "caller exact", "caller": ["089 7777"], "to": ["munich@example.org"]},
    {"name": "accounts", "called_prefix": ["+4930123457"], "account": ["main"],
     "to": ["accounts@example.org"], "cc": ["boss@example.org"]},
    {"name": "other account", "account": ["elsewhere"], "to": ["never@example.org"]},
    {"name": "reception", "to": ["reception@example.org"]},
]


def inbound(**overrides: Any) -> InboundSettings:
    return InboundSettings.model_validate({"rules": OFFICE_RULES,
                                           "postmaster": "pm@example.org", **overrides})


def route(called: str, caller: str = "", tsi: str = "", account: str = "main") -> str:
    choice = choose_route(FaxFacts(called, caller, tsi, account), inbound(), "DE")
    return choice.rule.name


# -- the pure matching ------------------------------------------------------------------------

def test_called_number_exact_in_any_spelling_and_first_match_wins() -> None:
    assert route("+49301234569", caller="+4940555123") == "health"  # rule 2 would match too
    assert route("030/123 45 69") == "health"
    assert route("+493012345690") == "reception"  # exact means exact


def test_called_number_prefix_and_account_must_both_match() -> None:
    assert route("+49301234571") == "accounts"
    assert route("030 1234578") == "accounts"
    assert route("+49301234571", account="other") == "reception"


def test_caller_exact_and_prefix() -> None:
    assert route("+4930555", caller="040 555 999") == "boss line"
    assert route("+4930555", caller="+49897777") == "caller exact"
    assert route("+4930555", caller="+498977770") == "reception"
    assert route("+4930555", caller="") == "reception"  # no caller id matches no caller rule


def test_station_id_is_a_regex_in_any_case() -> None:
    assert route("+4930555", tsi="ACME Corp") == "acme"
    assert route("+4930555", tsi="not acme") == "reception"


def test_account_rule() -> None:
    assert route("+4930555", account="elsewhere") == "other account"


def test_reasons_say_why() -> None:
    choice = choose_route(FaxFacts("030 1234571", "+4940111", "X", "main"), inbound(), "DE")
    assert choice.label == "rule 5 'accounts'"
    assert choice.reasons == ("called +49301234571 starts with +4930123457", "account main")


def test_without_a_default_rule_the_postmaster_gets_it() -> None:
    settings = InboundSettings.model_validate({"rules": OFFICE_RULES[:1],
                                               "postmaster": "pm@example.org"})
    choice = choose_route(FaxFacts("+4930555"), settings, "DE")
    assert choice.number is None and choice.rule.to == ["pm@example.org"]


def test_the_old_routes_form_still_works() -> None:
    settings = InboundSettings.model_validate({
        "routes": {"030 1234567": ["sales@example.org"]}, "default_route": ["office@x.org"]})
    assert choose_route(FaxFacts("+49301234567"), settings, "DE").rule.to == [
        "sales@example.org"]
    assert choose_route(FaxFacts("+4940"), settings, "DE").rule.to == ["office@x.org"]


@pytest.mark.parametrize(("toml", "message"), [
    ('[inbound]\nroutes = {"030 1" = ["a@x"]}\n[[inbound.rules]]\nto = ["b@x"]\n',
     "replace inbound.routes"),
    ('[[inbound.rules]]\nto = ["a@x"]\n[[inbound.rules]]\ncalled = ["030 1"]\nto = ["b@x"]\n',
     "rule 1 '' matches every fax"),
    ('[[inbound.rules]]\ntsi = "(unclosed"\nto = ["a@x"]\n', "not a regular expression"),
    ('[[inbound.rules]]\ncalled_prefix = ["030"]\nto = ["a@x"]\n', "not an E.164 prefix"),
    ('[[inbound.rules]]\nformat = "png"\nto = ["a@x"]\n', "inbound.rules.0.format"),
    ('[[inbound.rules]]\ncalled = ["030 1"]\n', "inbound.rules.0.to"),
    ('[[inbound.rules]]\nsubject = "{{ pages"\nto = ["a@x"]\n', "not a Jinja template"),
])
def test_bad_rules_are_refused_with_the_field_named(tmp_path: Path, toml: str,
                                                     message: str) -> None:
    path = tmp_path / "mailfax.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_settings(path)


# -- through the FAX.de emulator --------------------------------------------------------------

@dataclass
class Relay:
    """A real SMTP server on loopback that keeps what the relay is handed: the envelope."""

    received: list[tuple[list[str], EmailMessage]] = field(default_factory=list)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        self.received.append((list(envelope.rcpt_tos), message))
        return "250 OK"


@pytest.fixture
def relay() -> Any:
    keeper = Relay()
    controller = Controller(keeper, hostname="127.0.0.1", port=free_port())
    controller.start()
    yield keeper, controller.port
    controller.stop()


@pytest.fixture
async def faxde() -> AsyncIterator[emulator.Emulator]:
    server = await emulator.start("127.0.0.1", 0, {"password": PASSWORD})
    yield server
    await server.close()


def settings_for(tmp_path: Path, server: emulator.Emulator, **inbound_settings: Any) -> Any:
    extra: dict[str, Any] = inbound_settings.pop("extra", {})
    return make_settings(
        tmp_path, accounts={"main": {"provider": "fax.de", "account": "123456",
                                     "password": PASSWORD, "wsdl_url": server.wsdl_url}},
        default_account="main",
        inbound={"poll_seconds": 0.2, "postmaster": "pm@example.org",
                 "from_address": "fax@example.org", "handoff_timeout": 5.0,
                 "rules": OFFICE_RULES, **inbound_settings}, **extra)


async def until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.1)


async def run_until(settings: Any, condition: Callable[[], bool]) -> None:
    """Run the whole service until ``condition`` holds."""
    app = Application(settings)
    await app.start()
    try:
        await until(condition)
    finally:
        await app.stop()


def attachments(message: EmailMessage) -> list[tuple[str, bytes]]:
    found = []
    for part in message.iter_attachments():
        data = part.get_payload(decode=True)
        assert isinstance(data, bytes)
        found.append((part.get_content_type(), data))
    return found


def pdf_pages(data: bytes) -> int:
    with pikepdf.open(io.BytesIO(data)) as pdf:
        return len(pdf.pages)


def by_fax_id(received: list[tuple[list[str], EmailMessage]]
              ) -> dict[str, tuple[list[str], EmailMessage]]:
    return {str(message["X-Mailfax-Fax-Id"]): (rcpts, message) for rcpts, message in received}


async def test_each_rule_sets_its_recipients_format_language_and_subject(
        tmp_path: Path, corpus: Path, faxde: emulator.Emulator, relay: Any) -> None:
    keeper, port = relay
    tiff = (corpus / "fax-tiff" / "fax2d.tif").read_bytes()
    multi = (corpus / "fax-tiff" / "g4-multi.tiff").read_bytes()
    boss = faxde.state.add_inbound(multi, called_number="+4930555", originator="+4940555777",
                             remote_id="HQ")
    acme = faxde.state.add_inbound(tiff, called_number="+4930555", originator="+4989111",
                             remote_id="Acme Corp")
    accounts = faxde.state.add_inbound(tiff, called_number="030 1234571", originator="")
    reception = faxde.state.add_inbound(  # another fax: the same pages would be a duplicate
        (corpus / "fax-tiff" / "g3test.tif").read_bytes(), called_number="+4930555",
        originator="+4989111", remote_id="OTHER")
    munich = faxde.state.add_inbound(  # the caller exactly, in another spelling
        (corpus / "fax-tiff" / "g4-multi.tiff").read_bytes(), called_number="030 1234571",
        originator="+49897777", remote_id="")
    settings = settings_for(tmp_path, faxde, extra={"relay": {"host": "127.0.0.1",
                                                              "port": port}})
    await run_until(settings, lambda: len(keeper.received) == 5 and not faxde.state.inbox)
    mails = by_fax_id(keeper.received)

    rcpts, message = mails[str(munich)]
    assert rcpts == ["munich@example.org"] and message["To"] == "munich@example.org"

    rcpts, message = mails[str(boss)]
    assert rcpts == ["boss@example.org", "assistant@example.org", "archive@example.org"]
    assert message["To"] == "boss@example.org" and message["Cc"] == "assistant@example.org"
    assert message["Bcc"] is None and b"archive@" not in message.as_bytes()
    assert message["Subject"] == "Chef-Fax von +49 40 555777"
    kinds = attachments(message)
    assert [kind for kind, _ in kinds] == ["application/pdf", "image/tiff"]
    assert pdf_pages(kinds[0][1]) == 3 and kinds[1][1] == multi

    rcpts, message = mails[str(acme)]
    assert rcpts == ["acme-desk@example.org", "pm@example.org"]  # notify_postmaster
    assert message["To"] == "acme-desk@example.org" and message["Cc"] is None
    assert attachments(message) == [("image/tiff", tiff)]
    plain = message.get_body(("plain",))
    assert plain is not None and "attached as a TIFF file" in plain.get_content()

    rcpts, message = mails[str(accounts)]
    assert rcpts == ["accounts@example.org", "boss@example.org"]
    assert message["Cc"] == "boss@example.org"
    assert [kind for kind, _ in attachments(message)] == ["application/pdf"]

    rcpts, message = mails[str(reception)]
    assert rcpts == ["reception@example.org"]
    assert message["Subject"] == "Fax from +49 89 111 (OTHER), 1 page"


async def test_an_account_rule_takes_the_faxes_of_its_account(
        tmp_path: Path, corpus: Path, faxde: emulator.Emulator, relay: Any) -> None:
    keeper, port = relay
    fax = faxde.state.add_inbound((corpus / "fax-tiff" / "fax2d.tif").read_bytes(),
                                  called_number="+4930555", originator="+4989111")
    rules = [{"name": "not ours", "account": ["elsewhere"], "to": ["never@example.org"]},
             {"name": "main desk", "account": ["main"], "to": ["main-desk@example.org"]},
             {"name": "reception", "to": ["reception@example.org"]}]
    settings = settings_for(tmp_path, faxde, rules=rules,
                            extra={"relay": {"host": "127.0.0.1", "port": port}})
    await run_until(settings, lambda: len(keeper.received) == 1 and not faxde.state.inbox)
    rcpts, message = by_fax_id(keeper.received)[str(fax)]
    assert rcpts == ["main-desk@example.org"] and message["To"] == "main-desk@example.org"


def maildir_mails(path: Path) -> list[EmailMessage]:
    if not path.exists():
        return []
    found = []
    for item in mailbox.Maildir(path, create=False):
        message = email.message_from_bytes(bytes(item), policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        found.append(message)
    return found


def run_cli(tmp_path: Path, settings: Any, *args: str) -> subprocess.CompletedProcess[bytes]:
    config = tmp_path / "cli.toml"
    config.write_text(f'data_dir = "{settings.data_dir}"\n')
    return subprocess.run([sys.executable, "-m", "mailfax", "-c", str(config), *args],
                          capture_output=True, timeout=60, check=False)


async def test_privacy_mode_mails_no_document_and_it_stays_retrievable(
        tmp_path: Path, corpus: Path, faxde: emulator.Emulator) -> None:
    multi = (corpus / "fax-tiff" / "g4-multi.tiff").read_bytes()
    health = faxde.state.add_inbound(multi, called_number="+49301234569", originator="+4940555123",
                               remote_id="PRAXIS DR. M")
    settings = settings_for(tmp_path, faxde)
    await run_until(settings, lambda: len(maildir_mails(settings.maildir_path)) == 1
                    and not faxde.state.inbox)
    [message] = maildir_mails(settings.maildir_path)
    assert message["To"] == "health@example.org"
    assert message["Subject"] == "Fax von +49 40 555123 (PRAXIS DR. M), 3 Seiten"
    assert attachments(message) == []
    assert not [part for part in message.walk() if part.get_content_maintype() == "image"]
    plain = message.get_body(("plain",))
    assert plain is not None
    text = plain.get_content()
    assert "Seiten:      3" in text and "Datenschutz" in text
    assert f"mailfax inbox show {health} --pdf" in text
    shown = run_cli(tmp_path, settings, "inbox", "show", str(health), "--pdf")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith(b"%PDF") and pdf_pages(shown.stdout) == 3
    raw = tmp_path / "fax.tif"
    assert run_cli(tmp_path, settings, "inbox", "show", str(health), "--tiff",
                   str(raw)).returncode == 0
    assert raw.read_bytes() == multi  # as received
    assert run_cli(tmp_path, settings, "inbox", "--pdf").returncode == 2  # show FAXID missing
    listed = run_cli(tmp_path, settings, "inbox", "show", str(health))
    assert b"pages:       3" in listed.stdout and b"state:       deleted" in listed.stdout


async def test_a_duplicate_is_mailed_once_and_a_blocked_caller_never(
        tmp_path: Path, corpus: Path, faxde: emulator.Emulator,
        caplog: pytest.LogCaptureFixture) -> None:
    tiff = (corpus / "fax-tiff" / "fax2d.tif").read_bytes()
    settings = settings_for(tmp_path, faxde, block_tsi=["^WERBUNG"])
    assert add_block_entry(block_file(settings.data_dir), "caller", "0180 5")
    first = faxde.state.add_inbound(tiff, called_number="+4930555", originator="+4989111")
    again = faxde.state.add_inbound(tiff, called_number="+4930555", originator="+4989111")
    junk = faxde.state.add_inbound(tiff, called_number="+4930555", originator="+49180512345")
    junk_tsi = faxde.state.add_inbound((corpus / "fax-tiff" / "g3test.tif").read_bytes(),
                                       called_number="+4930555", remote_id="Werbung GmbH")
    await run_until(settings, lambda: len(faxde.state.deleted) == 4)
    listed = json.loads(run_cli(tmp_path, settings, "inbox", "--json").stdout)
    records = {fax["fax_id"]: fax["state"] for fax in listed}
    assert faxde.state.deleted == [first, again, junk, junk_tsi]
    [message] = maildir_mails(settings.maildir_path)
    assert message["X-Mailfax-Fax-Id"] == str(first)
    assert records == {str(first): "mailed", str(again): "duplicate", str(junk): "blocked",
                       str(junk_tsi): "blocked"}
    assert f"fax {again} from +4989111 is a duplicate of fax {first}" in caplog.text
    listing = run_cli(tmp_path, settings, "inbox").stdout.decode()
    summary, _, counted = listing.splitlines()[-1].partition(": ")
    assert summary == "-- 4 received faxes"
    assert set(counted.split(", ")) == {"2 blocked", "1 duplicate", "1 mailed"}


async def test_duplicates_are_mailed_when_the_window_is_zero(
        tmp_path: Path, corpus: Path, faxde: emulator.Emulator) -> None:
    tiff = (corpus / "fax-tiff" / "fax2d.tif").read_bytes()
    for _ in range(2):
        faxde.state.add_inbound(tiff, called_number="+4930555", originator="+4989111")
    settings = settings_for(tmp_path, faxde, duplicate_window_minutes=0)
    await run_until(settings, lambda: len(maildir_mails(settings.maildir_path)) == 2)


def test_the_same_pages_encoded_otherwise_hash_the_same(corpus: Path) -> None:
    from PIL import Image

    original = (corpus / "fax-tiff" / "fax2d.tif").read_bytes()
    out = io.BytesIO()
    with Image.open(io.BytesIO(original)) as picture:
        picture.save(out, format="TIFF", compression="group4")
    assert out.getvalue() != original
    assert page_hashes(out.getvalue()) == page_hashes(original)
    other = (corpus / "fax-tiff" / "g3test.tif").read_bytes()
    assert page_hashes(other) != page_hashes(original)


async def test_empty_and_broken_faxes_reach_the_route_and_the_postmaster(
        tmp_path: Path, corpus: Path, faxde: emulator.Emulator) -> None:
    broken = (corpus / "fax-tiff" / "hostile" / "crash-2020-10-test.tif").read_bytes()
    empty = faxde.state.add_inbound(b"", called_number="030 1234571", originator="+4989111",
                                    pages=0)
    bad = faxde.state.add_inbound(broken, called_number="030 1234571", originator="+4989222",
                                  pages=1)
    settings = settings_for(tmp_path, faxde)
    await run_until(settings, lambda: len(faxde.state.deleted) == 2)
    mails = {str(m["X-Mailfax-Fax-Id"]): m for m in maildir_mails(settings.maildir_path)}
    for fax_id in (empty, bad):
        message = mails[str(fax_id)]
        assert message["To"] == "accounts@example.org"
        assert message["Cc"] == "boss@example.org"
    # The postmaster is in the envelope: the outbox's recipients, as the relay would get.
    empty_text = mails[str(empty)].get_body(("plain",))
    assert empty_text is not None and "without any image (0 bytes)" in empty_text.get_content()
    assert attachments(mails[str(empty)]) == []
    assert attachments(mails[str(bad)]) == [("image/tiff", broken)]
    bad_text = mails[str(bad)].get_body(("plain",))
    assert bad_text is not None and "could not be converted" in bad_text.get_content()
    shown = run_cli(tmp_path, settings, "inbox", "show", str(empty), "--pdf")
    assert shown.returncode == 1 and b"has no image stored" in shown.stderr


async def test_broken_fax_envelope_includes_the_postmaster(
        tmp_path: Path, corpus: Path, faxde: emulator.Emulator, relay: Any) -> None:
    keeper, port = relay
    for _ in range(2):  # the second empty fax is no "duplicate": each is told
        faxde.state.add_inbound(b"", called_number="030 1234571", originator="", pages=0)
    settings = settings_for(tmp_path, faxde, extra={"relay": {"host": "127.0.0.1",
                                                              "port": port}})
    # Deleted at the provider only after the relay took the mail: wait for both.
    await run_until(settings, lambda: len(keeper.received) == 2
                    and len(faxde.state.deleted) == 2)
    for rcpts, _ in keeper.received:
        assert rcpts == ["accounts@example.org", "boss@example.org", "pm@example.org"]


def test_mailfax_route_prints_the_rule_and_why(tmp_path: Path) -> None:
    config = tmp_path / "mailfax.toml"
    lines = [f'data_dir = "{tmp_path / "data"}"', "[inbound]", 'postmaster = "pm@x.org"',
             'block_callers = ["+49180"]']
    for rule in OFFICE_RULES[:2]:
        lines.append("[[inbound.rules]]")
        for key, value in rule.items():
            lines.append(f"{key} = " + (f'"{value}"' if isinstance(value, str) else
                                        "[" + ", ".join(f'"{v}"' for v in value) + "]"))
    config.write_text("\n".join(lines) + "\n")

    def mailfax_route(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "mailfax", "-c", str(config), "route",
                               *args], capture_output=True, text=True, timeout=60, check=True)
        return done.stdout

    out = mailfax_route("030", "1234569")
    assert out.splitlines()[0] == (
        "rule 1 'health': called +49301234569 is one of 030 1234569")
    assert "  format:     none (privacy: no document in the mail)" in out
    assert "  language:   de" in out
    out = mailfax_route("+4930555", "--caller", "040 555 1")
    assert out.splitlines()[0] == "rule 2 'boss line': caller +49405551 starts with +4940555"
    assert "  cc:         assistant@example.org" in out
    assert "  bcc:        archive@example.org" in out
    out = mailfax_route("+4930555", "--caller", "+4918099")
    assert out.splitlines()[0] == ("blocked (caller +4918099 starts with the blocked +49180): "
                                   "deleted at the provider, never mailed; without the block:")
    assert "the implicit default 'postmaster': no rule matched" in out


async def test_a_rule_names_its_own_template(tmp_path: Path, corpus: Path,
                                             faxde: emulator.Emulator) -> None:
    import shutil

    from mailfax.outbound.notify import TEMPLATES_DIR

    templates = tmp_path / "templates"
    shutil.copytree(TEMPLATES_DIR, templates)
    (templates / "en" / "brief.subject").write_text("Fax {{ fax_id }} for the lab")
    (templates / "en" / "brief.txt").write_text("{{ pages }} page(s) from {{ originator }}.\n")
    (templates / "en" / "brief.html").write_text("<p>{{ pages }} page(s)</p>\n")
    rules = [{"name": "lab", "caller": ["+4989111"], "to": ["lab@example.org"],
              "template": "brief"}, {"to": ["reception@example.org"]}]
    fax_id = faxde.state.add_inbound((corpus / "fax-tiff" / "fax2d.tif").read_bytes(),
                                     called_number="+4930555", originator="+4989111")
    settings = settings_for(tmp_path, faxde, rules=rules,
                            extra={"templates_dir": str(templates)})
    await run_until(settings, lambda: len(maildir_mails(settings.maildir_path)) == 1)
    [message] = maildir_mails(settings.maildir_path)
    assert message["Subject"] == f"Fax {fax_id} for the lab"
    plain = message.get_body(("plain",))
    assert plain is not None and plain.get_content() == "1 page(s) from +49 89 111.\n"
    assert [kind for kind, _ in attachments(message)] == ["application/pdf"]


@pytest.mark.parametrize(("first_lines", "shown"), [(False, False), (True, True)])
def test_privacy_mode_shows_the_first_lines_only_if_the_rule_allows(
        tmp_path: Path, first_lines: bool, shown: bool) -> None:
    from datetime import UTC, datetime

    from mailfax.app import inbound_mailer
    from mailfax.config import InboundRoute
    from mailfax.inbound.mailer import FaxFiles
    from mailfax.store.base import InboundRecord

    received = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
    record = InboundRecord("main", "78", received, "+4930555", received, "", "", 1,
                           "received", 0)
    files = FaxFiles(pdf=b"%PDF-", pages=1, note="", preview_png=b"png",
                     text_lines=("Befund Patient Muster",))
    message = inbound_mailer(make_settings(tmp_path)).compose(
        record, files, b"II*\0", [], InboundRoute(to=["a@example.org"], format="none",
                                                 privacy_first_lines=first_lines))
    plain = message.get_body(("plain",))
    assert plain is not None
    assert ("Befund Patient Muster" in plain.get_content()) is shown
    assert attachments(message) == [] and "image/png" not in {
        part.get_content_type() for part in message.walk()}


def test_a_missing_template_falls_back_to_the_standard_one(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from datetime import UTC, datetime

    from mailfax.app import inbound_mailer
    from mailfax.config import InboundRoute
    from mailfax.inbound.mailer import FaxFiles
    from mailfax.store.base import InboundRecord

    mailer = inbound_mailer(make_settings(tmp_path))
    received = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
    record = InboundRecord("main", "77", received, "+4930555", received, "", "", 1,
                           "received", 0)
    message = mailer.compose(record, FaxFiles(pdf=b"%PDF-", pages=1, note="",
                                              preview_png=None), b"II*\0", [],
                             InboundRoute(to=["a@example.org"], template="typo"))
    assert str(message["Subject"]).startswith("Fax from unknown sender")
    assert "template en/typo.txt is missing" in caplog.text


def test_the_example_configs_rules_load_and_route(tmp_path: Path) -> None:
    """The commented [[inbound.rules]] of deploy/mailfax.example.toml, uncommented, are a
    config that loads and routes as their comments say."""
    example = (Path(__file__).parents[1] / "deploy" / "mailfax.example.toml").read_text()
    block = example.split("# rules = []\n# example:\n", 1)[1].split("\n\n", 1)[0]
    rules = "\n".join(line.removeprefix("#").strip() for line in block.splitlines())
    config = tmp_path / "mailfax.toml"
    config.write_text(
        'default_account = "faxde"\n[accounts.faxde]\nprovider = "emulator"\n[inbound]\n'
        + rules + "\n")
    inbound_settings = load_settings(config).inbound
    assert [rule.name for rule in inbound_settings.rules] == ["health", "accounts",
                                                              "reception"]

    def name(called: str, tsi: str = "") -> str:
        return choose_route(FaxFacts(called, "", tsi, "faxde"), inbound_settings,
                            "DE").rule.name

    assert name("030 1234569") == "health"
    assert name("030 1234563", tsi="ACME") == "accounts"
    assert name("030 1234563") == "reception"  # no station id


def test_mailfax_block_adds_once_lists_and_refuses_a_bad_regex(tmp_path: Path) -> None:
    config = tmp_path / "mailfax.toml"
    config.write_text(f'data_dir = "{tmp_path / "data"}"\n[inbound]\nblock_tsi = ["^SPAM"]\n')

    def mailfax_block(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "mailfax", "-c", str(config), "block",
                               *args], capture_output=True, text=True, timeout=60, check=False)

    assert mailfax_block("0190", "1").stdout.startswith("blocked: caller 0190 1 (")
    assert mailfax_block("0190", "1").stdout.startswith("already blocked: caller 0190 1")
    assert mailfax_block("--tsi", "(open").returncode == 2
    listed = mailfax_block()
    assert listed.stdout.splitlines() == ["caller 0190 1", "tsi ^SPAM"]
    lines = (tmp_path / "data" / "inbound-blocklist").read_text().splitlines()
    assert lines[1:] == ["caller 0190 1"]


async def test_screened_faxes_are_counted_in_the_metrics_not_as_pending(
        tmp_path: Path) -> None:
    from datetime import UTC, datetime

    from prometheus_client.parser import text_string_to_metric_families

    from mailfax.providers.base import InboundFax
    from mailfax.store.sqlite import SqliteStore
    from mailfax.web.metrics import Metrics

    store = SqliteStore(tmp_path / "s.sqlite3")
    await store.open()
    try:
        received = datetime(2026, 12, 1, tzinfo=UTC)
        for fax_id, state in (("1", "blocked"), ("2", "blocked"), ("3", "duplicate"),
                              ("4", "")):
            await store.add_inbound_fax("main", InboundFax(fax_id, "+4930555", received, "",
                                                           "", 1, b"II*\0"))
            if state:
                await store.mark_inbound_screened("main", fax_id, state)
        text = (await Metrics().render(store)).decode()
    finally:
        await store.close()
    samples = {(sample.name, tuple(sample.labels.values())): sample.value
               for family in text_string_to_metric_families(text) for sample in family.samples}
    assert samples[("mailfax_inbound_screened", ("blocked",))] == 2
    assert samples[("mailfax_inbound_screened", ("duplicate",))] == 1
    assert samples[("mailfax_inbound_pending", ())] == 1
