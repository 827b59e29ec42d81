"""Modules imported on first use, so ``serve`` opens its port without loading what only a mail
needs (pikepdf, Pillow, jinja2: about 0.15 s together).

A module that needs one writes, keeping its code unchanged::

    if TYPE_CHECKING:
        import pikepdf
    else:
        pikepdf = lazy_module("pikepdf")

The first attribute looked up imports the module (:func:`importlib.import_module`, so two
threads wait for one import); ``serve`` imports them in a worker thread once its port accepts
(``WARM_UP_MODULES`` in :mod:`mailfax.app`).
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any


class LazyModule:
    """Stands for the module ``name`` and forwards every attribute to it, importing it first."""

    __slots__ = ("_module", "_name")

    def __init__(self, name: str) -> None:
        self._name = name
        self._module: ModuleType | None = None

    def __getattr__(self, attribute: str) -> Any:
        if attribute.startswith("__"):  # introspection (copy, inspect) does not import it
            raise AttributeError(attribute)
        module = self._module
        if module is None:
            module = self._module = importlib.import_module(self._name)
        return getattr(module, attribute)

    def __repr__(self) -> str:
        return f"<lazy module {self._name!r}>"


def lazy_module(name: str) -> Any:
    """The module ``name``, imported when first used (typed as Any: declare the real import
    under ``TYPE_CHECKING`` for the type checker)."""
    return LazyModule(name)
