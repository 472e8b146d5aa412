"""Recording received instances: one short transaction per instance.

Each statement is an upsert keyed by its UID (``INSERT … ON CONFLICT``), so that
associations storing into the same study at once never trip over each other's
rows and the first statement of every transaction is a write (SQLite then waits
for the write lock instead of failing on a stale read snapshot).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, Table, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from node.catalog.database import connect, upgrade_schema
from node.catalog.models import Base, Instance
from node.errors import CatalogUnavailable
from node.header import InstanceHeader
from node.storage import StoredFile

_PATIENTS = Base.metadata.tables["patients"]
_STUDIES = Base.metadata.tables["studies"]
_SERIES = Base.metadata.tables["series"]
_INSTANCES = Base.metadata.tables["instances"]


class Catalog:
    """The node's record of everything it holds; the source of truth (DESIGN.md)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._insert = postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert

    @classmethod
    def open(cls, url: str) -> Catalog:
        """Connect and migrate the schema to the current revision."""
        engine = connect(url)
        try:
            upgrade_schema(engine)
        except OperationalError as exc:
            raise CatalogUnavailable(f"catalog database unreachable: {exc.orig}") from exc
        return cls(engine)

    def close(self) -> None:
        self.engine.dispose()

    def has_instance(self, sop_instance_uid: str) -> bool:
        with self._connection() as connection:
            found = connection.execute(
                select(Instance.id).where(Instance.sop_instance_uid == sop_instance_uid)
            ).first()
        return found is not None

    def instance_count(self) -> int:
        with self._connection() as connection:
            return int(connection.execute(select(func.count(Instance.id))).scalar_one())

    def add_instance(self, header: InstanceHeader, stored: StoredFile, calling_ae_title: str) -> bool:
        """Record a new instance with its patient, study and series.

        Returns False, changing nothing about the instance, when its SOP Instance
        UID is already recorded (a concurrent duplicate).
        """
        with self._transaction() as connection:
            series_pk = self._file_series(connection, header)
            statement = (
                self._insert(_INSTANCES)
                .values(self._instance_row(header, stored, calling_ae_title, series_pk))
                .on_conflict_do_nothing(index_elements=["sop_instance_uid"])
                .returning(Instance.id)
            )
            return connection.execute(statement).first() is not None

    def replace_instance(self, header: InstanceHeader, stored: StoredFile, calling_ae_title: str) -> None:
        """Record an instance, overwriting what was recorded under its SOP Instance UID."""
        with self._transaction() as connection:
            series_pk = self._file_series(connection, header)
            row = self._instance_row(header, stored, calling_ae_title, series_pk)
            statement = self._insert(_INSTANCES).values(row)
            statement = statement.on_conflict_do_update(
                index_elements=["sop_instance_uid"],
                set_={key: statement.excluded[key] for key in row if key != "sop_instance_uid"},
            )
            connection.execute(statement)

    def _file_series(self, connection: Connection, header: InstanceHeader) -> int:
        now = datetime.now(UTC)
        patient_pk = self._upsert(
            connection,
            _PATIENTS,
            ["patient_id", "issuer_of_patient_id"],
            {
                "patient_id": header.patient_id,
                "issuer_of_patient_id": header.issuer_of_patient_id,
                "patient_name": header.patient_name,
                "patient_birth_date": header.patient_birth_date,
                "patient_sex": header.patient_sex,
                "created_at": now,
            },
            touch={},
        )
        study_pk = self._upsert(
            connection,
            _STUDIES,
            ["study_instance_uid"],
            {
                "study_instance_uid": header.study_instance_uid,
                "patient_pk": patient_pk,
                "study_date": header.study_date,
                "study_time": header.study_time,
                "accession_number": header.accession_number,
                "study_id": header.study_id,
                "study_description": header.study_description,
                "referring_physician_name": header.referring_physician_name,
                "created_at": now,
                "updated_at": now,
            },
            touch={"updated_at": now},
        )
        return self._upsert(
            connection,
            _SERIES,
            ["series_instance_uid"],
            {
                "series_instance_uid": header.series_instance_uid,
                "study_pk": study_pk,
                "modality": header.modality,
                "series_number": header.series_number,
                "series_description": header.series_description,
                "body_part_examined": header.body_part_examined,
                "laterality": header.laterality,
                "created_at": now,
            },
            touch={},
        )

    def _upsert(
        self,
        connection: Connection,
        table: Table,
        keys: list[str],
        values: dict[str, Any],
        touch: dict[str, Any],
    ) -> int:
        """Insert the row or keep the existing one (updating ``touch``); return its id.

        An existing row keeps its first values: the first instance of a study names it.
        """
        statement = self._insert(table).values(values)
        update = touch or {keys[0]: statement.excluded[keys[0]]}
        statement = statement.on_conflict_do_update(index_elements=keys, set_=update)
        return int(connection.execute(statement.returning(table.c.id)).scalar_one())

    @staticmethod
    def _instance_row(
        header: InstanceHeader, stored: StoredFile, calling_ae_title: str, series_pk: int
    ) -> dict[str, Any]:
        return {
            "sop_instance_uid": header.sop_instance_uid,
            "sop_class_uid": header.sop_class_uid,
            "series_pk": series_pk,
            "instance_number": header.instance_number,
            "transfer_syntax_uid": header.transfer_syntax_uid,
            "image_laterality": header.image_laterality,
            "view_position": header.view_position,
            "rows": header.rows,
            "columns": header.columns,
            "number_of_frames": header.number_of_frames,
            "file_path": str(stored.relative_path),
            "file_size": stored.size,
            "calling_ae_title": calling_ae_title,
            "received_at": datetime.now(UTC),
        }

    def _transaction(self) -> _Guarded:
        return _Guarded(self.engine, transactional=True)

    def _connection(self) -> _Guarded:
        return _Guarded(self.engine, transactional=False)


class _Guarded:
    """A connection whose database errors surface as :class:`CatalogUnavailable`."""

    def __init__(self, engine: Engine, *, transactional: bool) -> None:
        self._context = engine.begin() if transactional else engine.connect()

    def __enter__(self) -> Connection:
        try:
            return self._context.__enter__()
        except OperationalError as exc:
            raise CatalogUnavailable(f"catalog database unreachable: {exc.orig}") from exc

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            self._context.__exit__(exc_type, exc, tb)
        except SQLAlchemyError as error:
            raise CatalogUnavailable(f"catalog write failed: {error}") from error
        if isinstance(exc, SQLAlchemyError):
            raise CatalogUnavailable(f"catalog write failed: {type(exc).__name__}") from exc
