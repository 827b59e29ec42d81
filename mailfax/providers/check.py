"""``mailfax check-account NAME``: the provider set up as ``serve`` would, one harmless
authenticated call, and what it learnt, as lines to print."""

from __future__ import annotations

from dataclasses import dataclass, field

from mailfax.config import Settings
from mailfax.providers import provider_module
from mailfax.providers.base import AccountCheck, ErrorKind, ProviderContext, ProviderError


@dataclass
class CheckResult:
    ok: bool
    lines: list[str] = field(default_factory=list)


def _facts(facts: list[tuple[str, str]]) -> list[str]:
    width = max((len(label) for label, _ in facts), default=0) + 1
    return [f"  {label + ':':<{width}} {value}" for label, value in facts]


async def check_account(settings: Settings, name: str) -> CheckResult:
    account = settings.accounts.get(name)
    if account is None:
        known = ", ".join(sorted(settings.accounts)) or "none"
        return CheckResult(False, [f"no account {name!r} (accounts: {known})"])
    context = ProviderContext(account=name, data_dir=settings.data_dir,
                              allow_plain_http=account.allow_plain_http)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    provider = provider_module(account.provider).create(context, account.provider_settings())
    lines = [f"account {name} ({provider.provider_name})"]
    try:
        check: AccountCheck = await provider.check_account()
    except ProviderError as error:
        lines += _facts(error.facts)
        what = "the account is refused" if error.kind == ErrorKind.ACCOUNT else (
            "the provider could not be asked" if error.transient else "the call failed")
        lines.append(f"FAILED: {what}: {error.reason.for_language('en')}")
        if error.reason.detail:
            lines.append(f"  provider's answer: {error.reason.detail}")
        return CheckResult(False, lines)
    finally:
        await provider.close()
    lines += _facts(check.facts)
    lines += [f"WARNING: {warning}" for warning in check.warnings]
    lines.append("OK" + (", with warnings" if check.warnings else ""))
    return CheckResult(True, lines)
