"""Fax provider adapters. Adding a provider: one module plus one line in ``PROVIDER_MODULES``.

Each module defines ``Settings`` (a pydantic model of its account settings, as written in the
``[accounts.NAME]`` table of the config) and ``create(context, settings) -> Provider``. The
settings classes themselves live in :mod:`mailfax.providers.account_settings`, so that loading
a config does not import the adapters (``ACCOUNT_SETTINGS`` names each one's class).
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import BaseModel

PROVIDER_MODULES: dict[str, str] = {
    "emulator": "mailfax.providers.emulator",
    "fax.de": "mailfax.providers.faxde",
    "faxnummer.de": "mailfax.providers.faxnummer",
    "retarus": "mailfax.providers.retarus",
}

ACCOUNT_SETTINGS: dict[str, str] = {
    "emulator": "EmulatorSettings",
    "fax.de": "FaxDeSettings",
    "faxnummer.de": "FaxnummerSettings",
    "retarus": "RetarusSettings",
}


def settings_class(name: str) -> type[BaseModel]:
    """The pydantic model of provider ``name``'s account settings, without its adapter."""
    from mailfax.providers import account_settings

    try:
        found: type[BaseModel] = getattr(account_settings, ACCOUNT_SETTINGS[name])
    except KeyError:
        known = ", ".join(sorted(PROVIDER_MODULES))
        raise ValueError(f"unknown provider {name!r} (known: {known})") from None
    return found


def provider_module(name: str) -> ModuleType:
    try:
        return importlib.import_module(PROVIDER_MODULES[name])
    except KeyError:
        known = ", ".join(sorted(PROVIDER_MODULES))
        raise ValueError(f"unknown provider {name!r} (known: {known})") from None
