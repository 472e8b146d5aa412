"""Connecting to the catalog database and bringing its schema up to date.

SQLite runs in WAL mode so that readers never block the C-STORE writers, with
``synchronous=FULL`` so that a committed row survives a power cut, as the file it
describes does, and with a case-sensitive ``LIKE`` as on PostgreSQL. PostgreSQL needs nothing special.
"""

from __future__ import annotations

import logging
from importlib import resources
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.pool import ConnectionPoolEntry

log = logging.getLogger(__name__)

_SQLITE_BUSY_TIMEOUT_MS = 30_000


class CatalogConfigError(Exception):
    """The catalog URL is unusable; the message says why."""


def connect(url: str) -> Engine:
    """Create the engine for ``url``; nothing is connected until first use."""
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise CatalogConfigError(f"catalog.url {url!r} is not a database URL") from exc
    if parsed.get_backend_name() == "sqlite":
        return _connect_sqlite(url)
    try:
        return create_engine(url, pool_pre_ping=True, pool_size=8, max_overflow=16)
    except (SQLAlchemyError, ImportError) as exc:
        raise CatalogConfigError(f"catalog.url {parsed.render_as_string()}: {exc}") from exc


def _connect_sqlite(url: str) -> Engine:
    engine = create_engine(url, pool_size=8, max_overflow=16)

    @event.listens_for(engine, "connect")
    def _configure(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute(f"PRAGMA busy_timeout={_SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        # DICOM matching is case-sensitive (PS3.4 C.2.2.2.1); SQLite's LIKE is not by default.
        cursor.execute("PRAGMA case_sensitive_like=ON")
        cursor.close()

    return engine


def alembic_config() -> Config:
    """The Alembic configuration of the catalog's migrations (shipped inside the package)."""
    config = Config()
    config.set_main_option("script_location", str(resources.files("node.catalog") / "migrations"))
    return config


def upgrade_schema(engine: Engine) -> None:
    """Apply every Alembic revision not yet applied; safe to run at each start-up."""
    config = alembic_config()
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
