"""Throwaway databases on the PostgreSQL server that runs on this machine (trust auth)."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator

import psycopg

SERVER = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"


@contextlib.contextmanager
def scratch_database() -> Iterator[str]:
    """A fresh, empty database; yields its SQLAlchemy URL and drops it afterwards."""
    name = f"precedent_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(SERVER, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(SERVER, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
