"""Fax provider adapters. Adding a provider: one module plus one line in ``PROVIDER_MODULES``.

Each module defines ``Settings`` (a pydantic model of its account settings, as written in the
``[accounts.NAME]`` table of the config) and ``create(context, settings) -> Provider``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

PROVIDER_MODULES: dict[str, str] = {
    "emulator": "mailfax.providers.emulator",
    "fax.de": "mailfax.providers.faxde",
    "faxnummer.de": "mailfax.providers.faxnummer",
    "retarus": "mailfax.providers.retarus",
}


def provider_module(name: str) -> ModuleType:
    try:
        return importlib.import_module(PROVIDER_MODULES[name])
    except KeyError:
        known = ", ".join(sorted(PROVIDER_MODULES))
        raise ValueError(f"unknown provider {name!r} (known: {known})") from None
