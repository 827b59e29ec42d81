"""Where the store is, read from the config file without pydantic
(:func:`mailfax.support.config_file.store_url_of`, what ``mailfax jobs`` and ``show`` use),
agrees with the validated config (:func:`mailfax.config.load_settings`), or says it cannot be
sure, and then the validated config decides (and names the bad field)."""

from __future__ import annotations

import string
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailfax.config import ConfigError, Settings, config_path, load_settings
from mailfax.support.config_file import SETTINGS_KEYS, store_url_of


@pytest.fixture(autouse=True)
def no_config_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("MAILFAX_CONFIG", raising=False)
    yield


def both(path: Path | None) -> tuple[str | None, str]:
    """The light read's store url, and the validated config's."""
    return store_url_of(config_path(path)), load_settings(path).store_url


def test_the_light_read_knows_every_top_level_key_of_the_config() -> None:
    assert set(Settings.model_fields) == SETTINGS_KEYS
    assert not any(field.alias or field.validation_alias
                   for field in Settings.model_fields.values())


def test_without_a_config_the_store_is_in_the_current_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    light, full = both(None)
    assert light == full == f"sqlite:///{tmp_path}/mailfax-data/mailfax.sqlite3"


CONFIGS = [
    "",  # a file with nothing in it: the defaults, relative to its folder
    'fax_domains = ["fax.example.org"]\n',
    'data_dir = "/srv/mailfax"\n',
    'data_dir = "state"\n',
    'data_dir = "../state/./here"\n',
    'data_dir = "~/mailfax"\n',
    'data_dir = "state"\n[store]\n',
    'data_dir = "state"\n[store]\nurl = ""\n',
    '[store]\nurl = "sqlite:///relative/x.sqlite3"\n',
    'data_dir = "/srv/mailfax"\n[store]\nurl = "sqlite:////var/lib/x.sqlite3"\n',
    '[store]\nurl = "sqlite:///~/x.sqlite3"\n',
    '[store]\nurl = "postgresql://mailfax@db.example.org/mailfax"\n',
    '[store]\nurl = "postgres://db/mailfax"\n',
    'data_dir = "state"\n[smtp]\nlisten = ["127.0.0.1:2526"]\n[accounts.emulator]\n'
    'provider = "emulator"\n',
]


@pytest.mark.parametrize("text", CONFIGS)
def test_the_light_read_agrees_with_the_validated_config(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    config = tmp_path / "etc" / "mailfax.toml"
    config.parent.mkdir()
    config.write_text(text)
    light, full = both(config)
    assert light == full


@pytest.mark.parametrize("text", CONFIGS[:6])
def test_a_relative_config_path_from_the_environment_or_the_command_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    """``MAILFAX_CONFIG=etc/mailfax.toml mailfax jobs`` or ``mailfax -c etc/mailfax.toml``
    run in some folder: paths relative to the file's folder, made absolute."""
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "mailfax.toml").write_text(text)
    monkeypatch.chdir(tmp_path)
    relative = Path("etc/mailfax.toml")
    light, full = both(relative)
    assert light == full and light is not None and light.startswith(
        ("sqlite:////", "postgres"))
    monkeypatch.setenv("MAILFAX_CONFIG", str(relative))
    assert both(None) == (full, full)


UNSURE = [
    'data-dir = "state"\n',  # a typo: the validated config names it
    "data_dir = 5\n",
    'data_dir = ""\n',
    'data_dir = "  "\n',
    '[data_dir]\nx = 1\n',
    'store = "sqlite:///x"\n',
    '[store]\nurl = "mysql://db/mailfax"\n',
    '[store]\nurl = 5\n',
    '[store]\nurl = "sqlite:///x"\npath = "y"\n',
    '[stor]\nurl = "sqlite:///x"\n',
]


@pytest.mark.parametrize("text", UNSURE)
def test_the_light_read_is_unsure_of_what_the_validated_config_might_refuse(
        tmp_path: Path, text: str) -> None:
    config = tmp_path / "mailfax.toml"
    config.write_text(text)
    assert store_url_of(config) is None


@pytest.mark.parametrize("text", ['data-dir = "state"\n', "data_dir = 5\n",
                                  '[store]\nurl = "mysql://db/mailfax"\n'])
def test_jobs_names_the_bad_field_as_before(tmp_path: Path, text: str) -> None:
    config = tmp_path / "mailfax.toml"
    config.write_text(text)
    with pytest.raises(ConfigError) as validated:
        load_settings(config)
    done = subprocess.run([sys.executable, "-m", "mailfax", "-c", str(config), "jobs"],
                          capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stderr.strip()) == (2, f"mailfax: {validated.value}")
    assert str(config) in done.stderr


@pytest.mark.parametrize("content", [b'data_dir = "x\n', b"data_dir = '\xff'\n"])
def test_a_file_that_is_not_toml_is_the_same_error_on_both_paths(
        tmp_path: Path, content: bytes) -> None:
    config = tmp_path / "mailfax.toml"
    config.write_bytes(content)
    with pytest.raises(ConfigError) as light:
        store_url_of(config)
    with pytest.raises(ConfigError) as full:
        load_settings(config)
    assert str(light.value) == str(full.value) and str(config) in str(light.value)


def test_a_missing_file_is_the_same_error_on_both_paths(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as light:
        store_url_of(missing)
    with pytest.raises(ConfigError) as full:
        load_settings(missing)
    assert str(light.value) == str(full.value) == f"{missing}: cannot read: No such file or " \
                                                  "directory"


def toml_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


PATH_TEXT = st.text(alphabet=string.ascii_letters + string.digits + " ./~_-\\\"'é",
                    max_size=20)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data_dir=st.none() | PATH_TEXT, url=st.none() | st.sampled_from(
    ["", "sqlite:///", "postgresql://h/db", "sqlite://x"]).flatmap(
    lambda scheme: PATH_TEXT.map(lambda rest: scheme + rest)))
def test_any_data_dir_and_store_url_agree_or_are_unsure(
        tmp_path: Path, data_dir: str | None, url: str | None) -> None:
    """Whatever the light read answers is what the validated config says (or it does not
    answer: then the validated config is read)."""
    lines = [] if data_dir is None else [f"data_dir = {toml_string(data_dir)}"]
    if url is not None:
        lines += ["[store]", f"url = {toml_string(url)}"]
    config = tmp_path / "mailfax.toml"
    config.write_text("\n".join(lines) + "\n")
    light = store_url_of(config)
    try:
        full: str | None = load_settings(config).store_url
    except ConfigError:
        full = None
    assert light in (None, full)
    if light is None and full is not None:  # unsure only of what it does not read itself
        assert data_dir is not None and not data_dir.strip()
