"""`precedent serve` and `precedent db upgrade` stop with a clear message and the right exit code."""

from __future__ import annotations

import socket
import sqlite3
import subprocess
from pathlib import Path

from tests.support.nodes import run_precedent

CONFIG_EXIT = 2
RUNTIME_EXIT = 1


def serve(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    base = {
        "PRECEDENT_DICOM__BIND": "127.0.0.1",
        "PRECEDENT_STORAGE__DATA_DIR": str(tmp_path / "data"),
        "PRECEDENT_STORAGE__MIN_FREE_BYTES": "0",
    }
    return run_precedent("serve", **{**base, **env})


def test_a_port_in_use_is_named(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = serve(tmp_path, PRECEDENT_DICOM__PORT=str(port))
    assert done.returncode == RUNTIME_EXIT
    assert f"cannot listen on 127.0.0.1:{port} (dicom.bind, dicom.port)" in done.stderr
    assert "Traceback" not in done.stderr


def test_an_unusable_data_directory_is_named(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    done = serve(tmp_path, PRECEDENT_STORAGE__DATA_DIR=str(blocker / "data"))
    assert done.returncode == RUNTIME_EXIT
    assert "storage.data_dir" in done.stderr
    assert "Traceback" not in done.stderr


def test_an_unreachable_catalog_is_reported(tmp_path: Path) -> None:
    done = serve(tmp_path, PRECEDENT_CATALOG__URL="postgresql+psycopg://postgres@127.0.0.1:1/none")
    assert done.returncode == RUNTIME_EXIT
    assert "catalog database unreachable" in done.stderr


def test_a_malformed_catalog_url_is_a_configuration_error(tmp_path: Path) -> None:
    done = serve(tmp_path, PRECEDENT_CATALOG__URL="not a url")
    assert done.returncode == CONFIG_EXIT
    assert "catalog.url" in done.stderr


def test_db_upgrade_creates_the_catalog_schema(tmp_path: Path) -> None:
    database = tmp_path / "catalog.sqlite3"
    done = run_precedent("db", "upgrade", PRECEDENT_CATALOG__URL=f"sqlite:///{database}")
    assert done.returncode == 0, done.stderr
    assert "up to date" in done.stdout
    with sqlite3.connect(database) as connection:
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"patients", "studies", "series", "instances", "alembic_version"} <= tables


def test_db_upgrade_reports_an_unreachable_catalog(tmp_path: Path) -> None:
    done = run_precedent(
        "db", "upgrade", PRECEDENT_CATALOG__URL="postgresql+psycopg://postgres@127.0.0.1:1/none"
    )
    assert done.returncode == RUNTIME_EXIT
    assert "catalog database unreachable" in done.stderr
    assert "Traceback" not in done.stderr
