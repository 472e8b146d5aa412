"""The catalog: migrations equal the models, upserts hold under concurrency, on both engines."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path, PurePosixPath

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, select, text

from node.catalog.database import alembic_config
from node.catalog.models import Base, Instance, Patient, Series, Study
from node.catalog.recording import Catalog
from node.errors import CatalogUnavailable
from node.header import InstanceHeader
from node.storage import StoredFile

STUDY = "1.2.826.0.1.3680043.10.1.1"


def header(n: int, *, study: str = STUDY, series: str = STUDY + ".1", patient: str = "P1") -> InstanceHeader:
    return InstanceHeader(
        sop_class_uid="1.2.840.10008.5.1.4.1.1.6.1",
        sop_instance_uid=f"{series}.{n}",
        study_instance_uid=study,
        series_instance_uid=series,
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        patient_id=patient,
        patient_name="Doe^Jane",
        study_date="20260101",
        accession_number="ACC1",
        modality="US",
        instance_number=n,
    )


def stored(n: int) -> StoredFile:
    return StoredFile(PurePosixPath(f"objects/aa/bb/{n}.dcm"), 1000 + n)


@pytest.fixture
def catalog(catalog_url: str) -> Catalog:
    opened = Catalog.open(catalog_url)
    yield opened
    opened.close()


def count(catalog: Catalog, model: type[Base]) -> int:
    with catalog.engine.connect() as connection:
        return len(connection.execute(select(model)).all())


def test_migrations_create_exactly_the_models_schema(catalog: Catalog) -> None:
    with catalog.engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert differences == []


def test_upgrading_again_changes_nothing(catalog_url: str) -> None:
    Catalog.open(catalog_url).close()
    again = Catalog.open(catalog_url)
    with again.engine.connect() as connection:
        applied = connection.execute(text("SELECT version_num FROM alembic_version")).scalar_one()
    assert applied == ScriptDirectory.from_config(alembic_config()).get_current_head()
    again.close()


def test_query_keys_are_indexed(catalog: Catalog) -> None:
    inspector = inspect(catalog.engine)
    indexed = {
        (table, column)
        for table in ("patients", "studies", "series", "instances")
        for index in inspector.get_indexes(table) + inspector.get_unique_constraints(table)
        for column in index["column_names"]
    }
    for key in [
        ("patients", "patient_id"),
        ("patients", "patient_name"),
        ("studies", "study_instance_uid"),
        ("studies", "study_date"),
        ("studies", "accession_number"),
        ("series", "series_instance_uid"),
        ("series", "modality"),
        ("instances", "sop_instance_uid"),
        ("instances", "sop_class_uid"),
    ]:
        assert key in indexed, key


def test_an_instance_files_its_patient_study_and_series(catalog: Catalog) -> None:
    assert catalog.add_instance(header(1), stored(1), "US1")
    assert catalog.add_instance(header(2), stored(2), "US1")
    assert (count(catalog, Patient), count(catalog, Study), count(catalog, Series)) == (1, 1, 1)
    assert catalog.instance_count() == 2
    with catalog.engine.connect() as connection:
        row = connection.execute(select(Instance).where(Instance.instance_number == 2)).one()
    assert row.file_path == "objects/aa/bb/2.dcm"
    assert row.calling_ae_title == "US1"


def test_a_known_instance_is_not_added_twice(catalog: Catalog) -> None:
    assert catalog.add_instance(header(1), stored(1), "US1")
    assert not catalog.add_instance(header(1), stored(99), "OTHER")
    with catalog.engine.connect() as connection:
        row = connection.execute(select(Instance)).one()
    assert (row.file_size, row.calling_ae_title) == (1001, "US1")


def test_replace_overwrites_the_record(catalog: Catalog) -> None:
    catalog.add_instance(header(1), stored(1), "US1")
    catalog.replace_instance(replace(header(1), rows=512), stored(7), "US2")
    with catalog.engine.connect() as connection:
        row = connection.execute(select(Instance)).one()
    assert (row.rows, row.file_size, row.calling_ae_title) == (512, 1007, "US2")


def test_each_instance_touches_its_study(catalog: Catalog) -> None:
    catalog.add_instance(header(1), stored(1), "US1")
    with catalog.engine.connect() as connection:
        first = connection.execute(select(Study.updated_at)).scalar_one()
    catalog.add_instance(header(2), stored(2), "US1")
    with catalog.engine.connect() as connection:
        second = connection.execute(select(Study.updated_at)).scalar_one()
    assert second > first


def test_concurrent_stores_into_one_study_make_one_study(catalog: Catalog) -> None:
    """Many associations storing one study at once: every instance kept, no duplicate parents."""
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda n: catalog.add_instance(header(n), stored(n), "US1"), range(64)))
    assert all(results)
    assert catalog.instance_count() == 64
    assert (count(catalog, Patient), count(catalog, Study), count(catalog, Series)) == (1, 1, 1)


def test_sqlite_is_durable_and_concurrent(tmp_path: Path) -> None:
    catalog = Catalog.open(f"sqlite:///{tmp_path / 'c.sqlite3'}")
    with catalog.engine.connect() as connection:
        assert connection.execute(text("PRAGMA journal_mode")).scalar_one() == "wal"
        assert connection.execute(text("PRAGMA synchronous")).scalar_one() == 2  # FULL
    catalog.close()


def test_an_unreachable_database_is_a_clear_error() -> None:
    with pytest.raises(CatalogUnavailable, match="unreachable"):
        Catalog.open("postgresql+psycopg://postgres@127.0.0.1:1/none?connect_timeout=2")
