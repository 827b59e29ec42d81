"""Pure policy decisions: which domains are ours, who may send, who gets status mail."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from mailfax.config import SenderPolicySettings


def split_address(address: str) -> tuple[str, str]:
    """``local@domain`` → (local, lower-cased domain); the last ``@`` separates them."""
    local, at, domain = address.rpartition("@")
    if not at:
        return address, ""
    return local, domain.lower().rstrip(".")


def is_fax_domain(domain: str, fax_domains: Sequence[str]) -> bool:
    return domain.lower().rstrip(".") in fax_domains


@dataclass(frozen=True)
class SenderVerdict:
    allowed: bool
    reason: str = ""


def check_sender(envelope_from: str, client_ip: str | None,
                 policy: SenderPolicySettings) -> SenderVerdict:
    """May this client send faxes with this envelope sender?

    The client must come from a trusted network; if addresses or domains are listed, the
    sender must also be one of them.
    """
    if not _in_networks(client_ip, policy.trusted_networks):
        return SenderVerdict(False, "your client address may not send faxes here")
    if not policy.allowed_addresses and not policy.allowed_domains:
        return SenderVerdict(True)
    address = envelope_from.lower()
    if address in (a.lower() for a in policy.allowed_addresses):
        return SenderVerdict(True)
    _, domain = split_address(address)
    if domain and domain in (d.lower() for d in policy.allowed_domains):
        return SenderVerdict(True)
    return SenderVerdict(False, f"sender <{envelope_from}> may not send faxes")


def from_trusted_network(client_ip: str | None, policy: SenderPolicySettings) -> bool:
    return _in_networks(client_ip, policy.trusted_networks)


def _in_networks(client_ip: str | None, networks: Sequence[str]) -> bool:
    if not client_ip:
        return False
    try:
        address = ipaddress.ip_address(client_ip.split("%")[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return any(address in ipaddress.ip_network(net, strict=False) for net in networks)


AUTOMATIC_PRECEDENCE = frozenset({"bulk", "junk", "list"})


def status_mail_allowed(envelope_from: str, auto_submitted: str | None,
                        precedence: str | None) -> bool:
    """Never answer a bounce, a daemon or an automatic mail (RFC 3834)."""
    if not envelope_from or envelope_from == "<>":
        return False
    local, _ = split_address(envelope_from.lower())
    if local == "mailer-daemon" or local.startswith("owner-") or local.endswith("-request"):
        return False
    if auto_submitted and auto_submitted.strip().lower().split(";")[0].strip() != "no":
        return False
    return not (precedence and precedence.strip().lower() in AUTOMATIC_PRECEDENCE)


def address_allowed(address: str, allowed: Sequence[str]) -> bool:
    """Is ``address`` one of ``allowed`` (``"a@b.c"``, or ``"@b.c"`` for the whole domain)?"""
    address = address.strip().lower()
    _, domain = split_address(address)
    return any(address == entry or (entry.startswith("@") and domain == entry[1:])
               for entry in allowed)


def quota_refusal(what: str, limit: int | None, used: int, adding: int,
                  period: str) -> str | None:
    """A sentence when ``used + adding`` would go over ``limit``, else None."""
    if limit is None or used + adding <= limit:
        return None
    return (f"Quota reached: {what} may send at most {limit} {period}; {used} already used, "
            f"this mail needs {adding}. Try again later.")


LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})


def exposure_problem(listen_hosts: Sequence[str], senders: SenderPolicySettings,
                     has_users: bool, has_tls: bool) -> str | None:
    """Why listening on these hosts with this sender policy would be unsafe, or None.

    Beyond loopback someone must be able to send (users with AUTH, or an MTA's network), no
    network may be "anyone" without sender rules, and AUTH needs TLS.
    """
    exposed = [host for host in listen_hosts if host not in LOOPBACK_HOSTS
               and not _is_loopback(host)]
    if not exposed:
        return None
    where = ", ".join(exposed)
    anyone = [net for net in senders.trusted_networks
              if ipaddress.ip_network(net, strict=False).prefixlen == 0]
    if anyone and not (senders.allowed_addresses or senders.allowed_domains):
        return (f"listening on {where} with senders.trusted_networks {', '.join(anyone)} lets "
                f"anyone send faxes at your cost; list the networks of your MTA instead, or "
                f"add senders.allowed_addresses/allowed_domains and [users.*]")
    only_loopback = all(_is_loopback(net.split("/")[0]) for net in senders.trusted_networks)
    if only_loopback and not has_users:
        return (f"listening on {where}, but only loopback may send: add [users.*] for SMTP "
                f"AUTH, or your MTA's network to senders.trusted_networks")
    if has_users and not has_tls:
        return (f"listening on {where} with [users.*] but without TLS: passwords would cross "
                f"the network in clear; set smtp.tls_cert and smtp.tls_key")
    return None


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host in LOOPBACK_HOSTS
