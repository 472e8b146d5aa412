"""Settings: one typed object from defaults, a TOML file and PRECEDENT_* variables."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import BaseModel

from node.settings import CallingAE, ConfigError, Settings, load_settings
from tests.support.nodes import run_precedent

SHIPPED = Path(__file__).resolve().parents[2] / "config" / "precedent.toml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "precedent.toml"
    path.write_text(text, encoding="utf-8")
    return path


def error_of(path: Path | None) -> str:
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    return str(caught.value)


def test_shipped_file_equals_the_embedded_defaults() -> None:
    assert load_settings(SHIPPED) == load_settings(None)


def test_shipped_file_documents_every_key() -> None:
    text = SHIPPED.read_text(encoding="utf-8")
    sections: dict[str, type[BaseModel]] = {
        name: field.annotation  # type: ignore[misc]
        for name, field in Settings.model_fields.items()
        if name != "destinations"
    }
    for section, model in sections.items():
        assert f"[{section}]" in text
        for key in model.model_fields:
            assert f"{key} = " in text or f"# {key} = " in text, f"{section}.{key} undocumented"
    for key in ("name", "ae_title", "host", "port"):
        assert f"# {key} = " in text


def test_defaults_are_the_documented_ones() -> None:
    settings = load_settings(None)
    assert settings.dicom.ae_title == "PRECEDENT"
    assert settings.dicom.port == 11112
    assert settings.dicom.similar_ae_title == "PRECEDENT_SIM"
    assert settings.dicom.allowed_calling_aets == []
    assert settings.queue.broker_url == ""
    assert settings.catalog_url().startswith("sqlite:///")
    assert settings.catalog_url().endswith("precedent-data/catalog.sqlite3")


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, '[dicom]\nport = 4242\nae_title = "FROMFILE"\n')
    monkeypatch.setenv("PRECEDENT_DICOM__PORT", "5151")
    monkeypatch.setenv("PRECEDENT_STORAGE__ON_DUPLICATE", "replace")
    monkeypatch.setenv(
        "PRECEDENT_DESTINATIONS", '[{"name": "pacs", "ae_title": "PACS", "host": "10.0.0.5", "port": 104}]'
    )
    settings = load_settings(path)
    assert settings.dicom.port == 5151
    assert settings.dicom.ae_title == "FROMFILE"
    assert settings.storage.on_duplicate == "replace"
    assert settings.destinations[0].host == "10.0.0.5"


def test_destinations_are_read_from_tables(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "pacs.local"\nport = 104\n'
        '[[destinations]]\nname = "viewer"\nae_title = "VIEW"\nhost = "10.0.0.9"\nport = 11112\n',
    )
    assert [d.name for d in load_settings(path).destinations] == ["pacs", "viewer"]


def test_catalog_url_given_is_used_verbatim(tmp_path: Path) -> None:
    url = "postgresql+psycopg://precedent@db/precedent"
    path = write(tmp_path, f'[catalog]\nurl = "{url}"\n')
    assert load_settings(path).catalog_url() == url


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        ('[dicom]\nport = "abc"\n', "dicom.port", "valid integer"),
        ("[dicom]\nport = 70000\n", "dicom.port", "less than or equal to 65535"),
        ("[dicom]\nprot = 104\n", "dicom.prot", "unknown key"),
        ("[dicomm]\nport = 104\n", "dicomm", "unknown key"),
        ('[dicom]\nae_title = "MUCH_TOO_LONG_AE_TITLE"\n', "dicom.ae_title", "at most 16"),
        ('[dicom]\nae_title = "   "\n', "dicom.ae_title", "must not be empty"),
        ('[dicom]\nae_title = "BACK\\\\SLASH"\n', "dicom.ae_title", "backslash"),
        ('[dicom]\nae_title = "PRECEDENT_SIM"\n', "dicom", "must differ"),
        ("[dicom]\nmax_pdu = 100\n", "dicom.max_pdu", "4096"),
        ("[dicom]\nmax_associations = 0\n", "dicom.max_associations", "greater than or equal to 1"),
        ('[dicom]\nallowed_calling_aets = ["US@not-an-ip"]\n', "dicom.allowed_calling_aets", "not an IP"),
        ('[storage]\non_duplicate = "merge"\n', "storage.on_duplicate", "'keep' or 'replace'"),
        ("[study]\nstable_seconds = -1\n", "study.stable_seconds", "greater than or equal to 0"),
        ('[[destinations]]\nname = "pacs"\nae_title = "PACS"\n', "destinations[0].host", "missing"),
        (
            '[[destinations]]\nname = "a"\nae_title = "A"\nhost = "h"\nport = 1\n'
            '[[destinations]]\nname = "a"\nae_title = "B"\nhost = "h"\nport = 2\n',
            "destinations",
            "unique",
        ),
    ],
)
def test_a_wrong_value_is_named_with_its_key(tmp_path: Path, text: str, key: str, reason: str) -> None:
    message = error_of(write(tmp_path, text))
    line = next(line for line in message.splitlines() if line.strip().startswith(f"{key}:"))
    assert reason in line


def test_a_wrong_environment_value_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRECEDENT_DICOM__PORT", "eleven")
    assert "dicom.port:" in error_of(None)


def test_broken_toml_and_missing_file_are_clear_errors(tmp_path: Path) -> None:
    assert "not valid TOML" in error_of(write(tmp_path, "[dicom\nport = 1\n"))
    assert "does not exist" in error_of(tmp_path / "nowhere.toml")


def test_allowlist_entries_match_title_and_host() -> None:
    assert CallingAE.parse("US1").admits("US1", "192.0.2.7")
    assert not CallingAE.parse("US1").admits("US2", "192.0.2.7")
    assert CallingAE.parse("US1@192.0.2.7").admits("US1 ", "192.0.2.7")
    assert not CallingAE.parse("US1@192.0.2.7").admits("US1", "192.0.2.8")
    assert CallingAE.parse("US1@192.0.2.0/24").admits("US1", "192.0.2.200")
    assert not CallingAE.parse("US1@192.0.2.0/24").admits("US1", "198.51.100.1")


def test_cli_exits_2_naming_the_key(tmp_path: Path) -> None:
    path = write(tmp_path, '[dicom]\nport = "abc"\n')
    done = run_precedent("config", "--config", str(path))
    assert done.returncode == 2
    assert "dicom.port" in done.stderr
    assert "Traceback" not in done.stderr


def test_cli_prints_the_settings_in_effect(tmp_path: Path) -> None:
    path = write(tmp_path, "[dicom]\nport = 4104\n")
    done = run_precedent("config", "--config", str(path))
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    assert shown["dicom"]["port"] == 4104
    assert shown["dicom"]["ae_title"] == "PRECEDENT"
