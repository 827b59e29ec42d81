"""Provider emulators: real HTTP servers that speak each provider's wire protocol on loopback.

Each module exposes ``async def start(host: str, port: int, options: dict[str, str]) ->
Emulator`` (an object with ``url``, ``state`` and ``async close()``), used by the tests and by
``mailfax emulate NAME --listen HOST:PORT [--option key=value ...]``.
"""

from __future__ import annotations

import importlib
import io
from types import ModuleType

EMULATOR_MODULES: dict[str, str] = {
    "fax.de": "mailfax.emulators.faxde",
    "faxnummer.de": "mailfax.emulators.faxnummer",
    "retarus": "mailfax.emulators.retarus",
}


def emulator_module(name: str) -> ModuleType:
    try:
        return importlib.import_module(EMULATOR_MODULES[name])
    except KeyError:
        known = ", ".join(sorted(EMULATOR_MODULES))
        raise ValueError(f"unknown emulator {name!r} (known: {known})") from None


def pdf_pages(data: bytes) -> int | None:
    """How many pages the PDF ``data`` has, or None when it does not open as a PDF."""
    import pikepdf  # here: config loads this package (the emulator account), the CLI need not

    try:
        with pikepdf.open(io.BytesIO(data)) as pdf:
            return len(pdf.pages)
    except pikepdf.PdfError:
        return None
