"""An open-relay probe: the classic relay tests, scripted against a live service.

mailfax takes mail for ``<number>@<fax domain>`` only. Every address below tries to make it pass
a mail on to some other domain (or to smuggle one past the domain check); each must get a 5xx
at RCPT, and none may leave a job or a mail in the outbox.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from mailfax.app import Application
from tests.conftest import Service, make_settings
from tests.test_hostile import RawSmtp, Reply, stuffed

HOSTILE = Path(__file__).resolve().parent / "hostile"

# (what the probe tries, the RCPT TO argument as sent)
RELAY_PROBES: list[tuple[str, str]] = [
    ("foreign domain", "<user@example.com>"),
    ("foreign domain, a number as local part", "<030123456@example.com>"),
    ("postmaster elsewhere", "<postmaster@example.com>"),
    ("localhost", "<root@localhost>"),
    ("number at localhost", "<030123456@localhost>"),
    ("% hack", "<user%example.com@fax.local>"),
    ("% hack with a number", "<030123456%example.com@fax.local>"),
    ("% hack, foreign last", "<030123456%fax.local@example.com>"),
    ("! bang path", "<example.com!user@fax.local>"),
    ("! bang path with a number", "<example.com!030123456@fax.local>"),
    ("quoted local part with @", '<"user@example.com"@fax.local>'),
    ("quoted number with @", '<"030123456@example.com"@fax.local>'),
    ("quoted local part with %", '<"user%example.com"@fax.local>'),
    ("source route", "<@fax.local:user@example.com>"),
    ("source route, two hops", "<@fax.local,@example.net:user@example.com>"),
    ("source route to a number elsewhere", "<@fax.local:030123456@example.com>"),
    ("two @, ours last", "<user@example.com@fax.local>"),
    ("two @, ours first", "<030123456@fax.local@example.com>"),
    ("IP literal", "<user@[127.0.0.1]>"),
    ("IP literal with a number", "<030123456@[127.0.0.1]>"),
    ("IPv6 literal", "<030123456@[IPv6:::1]>"),
    ("bare IP", "<030123456@127.0.0.1>"),
    ("our domain as a prefix", "<030123456@fax.local.example.com>"),
    ("our domain as a suffix", "<030123456@evilfax.local>"),
    ("a subdomain of ours", "<030123456@relay.fax.local>"),
    ("two trailing dots", "<030123456@fax.local..>"),
    ("one trailing dot (not RFC 5321 syntax)", "<030123456@fax.local.>"),
    ("one trailing dot, upper case", "<030123456@FAX.LOCAL.>"),
    ("capital I for l", "<030123456@fax.locaI>"),
    ("Cyrillic а in our domain", "<030123456@fаx.local>"),
    ("fullwidth dot in our domain", "<030123456@fax．local>"),
    ("NUL in our domain", "<030123456@fax.local\x00.example.com>"),
    ("port in the domain", "<030123456@fax.local:25>"),
    ("no domain at all", "<user>"),
    ("number without domain", "<030123456>"),
]

# Our own domain in any case. (A trailing dot, "@fax.local.", is not RFC 5321 syntax: aiosmtpd
# answers 553 malformed, a refusal like the probes above.)
OUR_DOMAIN = ["<030123456@Fax.Local>", "<030123456@FAX.LOCAL>"]


async def _open(service: Service, sender: str = "<alice@example.org>") -> RawSmtp:
    client = await RawSmtp.connect(service.port)
    assert (await client.reply()).code == 220
    assert (await client.command("EHLO probe.example.net")).code == 250
    reply = await client.command(f"MAIL FROM:{sender}")
    assert reply.code == 250, reply
    return client


async def _probe(service: Service, address: str, sender: str) -> tuple[Reply, Reply]:
    """RCPT TO the probe, then DATA with a message anyway: both replies."""
    client = await _open(service, sender)
    try:
        rcpt = await client.command(f"RCPT TO:{address}")
        data = await client.command("DATA")
        if data.code == 354:  # a relay would take it: send the message so it shows
            await client.send(stuffed((HOSTILE / "path_traversal_name.eml").read_bytes()))
            data = await client.reply()
        return rcpt, data
    finally:
        await client.close()


@pytest.mark.parametrize("sender", ["<alice@example.org>", "<>", "<spammer@example.net>"])
async def test_no_relay_probe_is_accepted(service: Service, sender: str) -> None:
    accepted = []
    for what, address in RELAY_PROBES:
        rcpt, data = await _probe(service, address, sender)
        if not 500 <= rcpt.code < 600 or data.code != 503:
            accepted.append(f"{what} {address!r}: RCPT {rcpt}; DATA {data}")
        elif rcpt.code == 550:
            # mailfax's own refusals: relaying (5.7.1) or not a fax number (5.1.1).
            assert rcpt.text.split()[0] in ("5.7.1", "5.1.1"), f"{what}: {rcpt}"
    assert accepted == [], "relay probes not refused at RCPT:\n" + "\n".join(accepted)
    assert await service.app.store.list_jobs() == []
    await asyncio.sleep(0.5)
    assert service.outbox_messages() == []


async def test_foreign_domains_are_refused_as_relaying(service: Service) -> None:
    client = await _open(service)
    try:
        for address in ("<user@example.com>", "<030123456@fax.local.example.com>",
                        "<030123456@[127.0.0.1]>", "<@fax.local:030123456@example.com>"):
            reply = await client.command(f"RCPT TO:{address}")
            assert reply.code == 550 and "5.7.1 Relaying denied" in reply.text, reply
    finally:
        await client.close()


@pytest.mark.parametrize("address", OUR_DOMAIN)
async def test_our_domain_in_any_case_is_ours(service: Service, address: str) -> None:
    """policy.split_address lower-cases the domain."""
    client = await _open(service)
    try:
        reply = await client.command(f"RCPT TO:{address}")
        assert reply.code == 250 and "fax to +4930123456" in reply.text, reply
    finally:
        await client.close()


async def test_a_relay_recipient_beside_a_fax_recipient_is_not_delivered(
        service: Service) -> None:
    """The fax goes out; the foreign address gets nothing (no job, no mail to it)."""
    client = await _open(service)
    try:
        assert (await client.command("RCPT TO:<user@example.com>")).code == 550
        assert (await client.command("RCPT TO:<030123456@fax.local>")).code == 250
        assert (await client.command("DATA")).code == 354
        await client.send(stuffed((HOSTILE / "path_traversal_name.eml").read_bytes()))
        reply = await client.reply()
        assert reply.code == 250, reply
    finally:
        await client.close()
    jobs = await service.app.store.list_jobs()
    assert [job.number for job in jobs] == ["+4930123456"]
    await service.wait_for_mail(lambda mail: mail["X-Mailfax-Job"] == jobs[0].id)
    for message in service.outbox_messages():
        assert "example.com" not in str(message["To"]), message["To"]


async def test_an_untrusted_client_cannot_send_even_to_a_fax_address(tmp_path: Path) -> None:
    app = Application(make_settings(tmp_path, senders={"trusted_networks": ["192.0.2.0/24"]}))
    await app.start()
    try:
        client = await RawSmtp.connect(Service(app).port)
        try:
            assert (await client.reply()).code == 220
            assert (await client.command("EHLO outside.example")).code == 250
            reply = await client.command("MAIL FROM:<alice@example.org>")
            assert reply.code == 550 and "5.7.1" in reply.text, reply
            reply = await client.command("RCPT TO:<030123456@fax.local>")
            assert reply.code == 503, reply  # no sender, no recipients
        finally:
            await client.close()
        assert await app.store.list_jobs() == []
    finally:
        await app.stop()
