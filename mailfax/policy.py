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
