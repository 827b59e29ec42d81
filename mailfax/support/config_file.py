"""The config file read without pydantic: which file is in use, its TOML (with the errors
:func:`mailfax.config.load_settings` reports), the defaults that say where the data is, and
:func:`store_url_of`, where the store is, for the commands that only read the store
(``mailfax jobs``, ``show``): validating the whole config (pydantic and every model class)
would be most of their start-up (bench/cli.py).

:mod:`mailfax.config` takes its defaults and its file reading from here, so the two cannot
disagree; tests/test_config_file.py checks that :func:`store_url_of` gives what the validated
config gives, or None.
"""

from __future__ import annotations

import logging
import os
import re
import tomllib
from pathlib import Path
from typing import Any

CONFIG_ENV = "MAILFAX_CONFIG"
DEFAULT_DATA_DIR = Path("mailfax-data")  # relative: to the config file's folder, or cwd
SQLITE_FILE = "mailfax.sqlite3"  # in data_dir, when store.url is empty
STORE_SCHEMES = ("sqlite:///", "postgresql://", "postgres://")

# The top-level keys of mailfax.config.Settings (tests/test_config_file.py checks that they
# are): a file with any other key is read by the validated config, which names the bad one.
SETTINGS_KEYS = frozenset({
    "data_dir", "fax_domains", "default_account", "smtp", "store", "senders", "numbers",
    "dial", "dispatch", "notify", "relay", "outbox", "web", "inbound", "templates_dir",
    "accounts", "imap_intake", "imap_delivery", "users", "quotas", "documents",
    "policy_service", "retention", "options", "lists", "list_prefix",
})

log = logging.getLogger("mailfax.config")


class ConfigError(Exception):
    """A config file that cannot be used; the message names the file and the bad field."""


def config_path(path: Path | None = None) -> Path | None:
    """The config file in use: ``path``, else $MAILFAX_CONFIG, else none."""
    if path is None and os.environ.get(CONFIG_ENV):
        return Path(os.environ[CONFIG_ENV])
    return path


def read_config_file(path: Path) -> dict[str, Any]:
    """The file's TOML; ConfigError naming the file when it cannot be read or parsed."""
    try:
        text = path.read_text(encoding="utf-8")
        raw = tomllib.loads(text)
        warn_if_exposed(path, text)
    except OSError as error:
        raise ConfigError(f"{path}: cannot read: {error.strerror}") from error
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML: {error}") from error
    return raw


LITERAL_SECRET = re.compile(r'^\s*(password|product_code|password_hash)\s*=\s*"(?!env:|file:)',
                            re.MULTILINE)


def warn_if_exposed(path: Path, text: str) -> None:
    """A config that holds secrets itself should be readable by its owner only."""
    mode = path.stat().st_mode & 0o777
    if mode & 0o077 and LITERAL_SECRET.search(text):
        log.warning("%s holds passwords and is readable by others (mode %03o): chmod 600 it, "
                    "or give secrets as \"env:NAME\" or \"file:/path\"", path, mode)


def absolute_path(path: Path, base: Path) -> Path:
    """``path`` (``~`` expanded) against ``base``, made absolute. ``~user`` of no such user
    stays a folder of that name, as in a shell (:meth:`Path.expanduser` would raise)."""
    return Path(os.path.abspath(base / os.path.expanduser(path)))


def sqlite_url(data_dir: Path) -> str:
    """The store's url when ``store.url`` is empty: a SQLite file in ``data_dir``."""
    return f"sqlite:///{data_dir / SQLITE_FILE}"


def absolute_store_url(url: str, base: Path) -> str:
    """A relative ``sqlite:///`` url made absolute against ``base``; other urls as they are."""
    sqlite = url.removeprefix("sqlite:///")
    if url.startswith("sqlite:///") and not sqlite.startswith("/"):
        return f"sqlite:///{absolute_path(Path(sqlite), base)}"
    return url


def store_url_of(path: Path | None) -> str | None:
    """``load_settings(path).store_url``, read from the file's ``data_dir`` and ``[store]``
    alone, or None when this read cannot be sure of it: a key the config does not have, a
    ``data_dir`` or ``[store]`` the validated config might refuse or read otherwise. The
    rest of the file is not validated (``mailfax check-config`` does that). A file that
    cannot be read or is not TOML raises the ConfigError ``load_settings`` raises."""
    if path is None:
        return sqlite_url(absolute_path(DEFAULT_DATA_DIR, Path.cwd()))
    raw = read_config_file(path)
    base = Path(os.path.abspath(path.parent))
    data_dir = raw.get("data_dir", str(DEFAULT_DATA_DIR))
    store = raw.get("store", {})
    if not (raw.keys() <= SETTINGS_KEYS and isinstance(data_dir, str) and data_dir.strip()
            and isinstance(store, dict) and store.keys() <= {"url"}):
        return None
    url = store.get("url", "")
    if not isinstance(url, str) or (url and not url.startswith(STORE_SCHEMES)):
        return None
    if url:
        return absolute_store_url(url, base)
    folder = Path(data_dir)
    return sqlite_url(folder if folder.is_absolute() else absolute_path(folder, base))
