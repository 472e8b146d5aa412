"""Recording received instances: one short transaction per instance.

Each statement is an upsert keyed by its UID (``INSERT … ON CONFLICT``), so that
associations storing into the same study at once never trip over each other's
rows and the first statement of every transaction is a write (SQLite then waits
for the write lock instead of failing on a stale read snapshot).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import BindParameter, Engine, Select, Table, bindparam, delete, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Row
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from node.catalog.database import connect, upgrade_schema
from node.catalog.models import ANALYSES, EMBEDDINGS, INSTANCES, PATIENTS, SERIES, STUDIES, Instance
from node.errors import CatalogUnavailable
from node.header import InstanceHeader
from node.storage import StoredFile


class Catalog:
    """The node's record of everything it holds; the source of truth (DESIGN.md)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        insert = postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert
        # Built once: constructing SQLAlchemy statements per C-STORE cost more than running them.
        self._upsert_patient = _upsert(insert, PATIENTS, ["patient_id", "issuer_of_patient_id"], [])
        self._upsert_study = _upsert(
            insert, STUDIES, ["study_instance_uid"], ["updated_at", "assessment_due"]
        )
        self._upsert_series = _upsert(insert, SERIES, ["series_instance_uid"], [])
        instance = insert(INSTANCES).values(_bound(INSTANCES))
        self._insert_instance = instance.on_conflict_do_nothing(
            index_elements=["sop_instance_uid"]
        ).returning(INSTANCES.c.id)
        self._replace_instance = instance.on_conflict_do_update(
            index_elements=["sop_instance_uid"],
            set_={c: instance.excluded[c] for c in _columns(INSTANCES) if c != "sop_instance_uid"},
        ).returning(INSTANCES.c.id)
        self._find_instance = select(INSTANCES.c.id).where(
            INSTANCES.c.sop_instance_uid == bindparam("sop_instance_uid")
        )
        self._request_analysis = insert(ANALYSES).values(_bound(ANALYSES, _REQUEST_COLUMNS))
        self._renew_analysis = self._request_analysis.on_conflict_do_update(
            index_elements=["instance_pk", "model_id"],
            set_={c: self._request_analysis.excluded[c] for c in _REQUEST_COLUMNS if c != "model_id"}
            | dict.fromkeys(_RESULT_COLUMNS),
        )

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
        with self.connection() as connection:
            found = connection.execute(self._find_instance, {"sop_instance_uid": sop_instance_uid})
            return found.first() is not None

    def instance_count(self) -> int:
        with self.connection() as connection:
            return int(connection.execute(select(func.count(Instance.id))).scalar_one())

    def stream(self, statement: Select[Any], batch: int = 100) -> Iterator[Row[Any]]:
        """The rows of a read-only query, fetched ``batch`` at a time as they are consumed
        (a server-side cursor on PostgreSQL), so that a query matching the whole catalog
        never holds it in memory. Closing the iterator early releases the connection."""
        with self.connection() as connection:
            yield from connection.execution_options(yield_per=batch).execute(statement)

    def add_instance(
        self,
        header: InstanceHeader,
        stored: StoredFile,
        calling_ae_title: str,
        analyse_with: str | None = None,
    ) -> bool:
        """Record a new instance with its patient, study and series, and, when
        ``analyse_with`` names a model, its analysis request (the outbox entry) in the
        same transaction: an acknowledged image always has its request.

        Returns False, changing nothing about the instance, when its SOP Instance
        UID is already recorded (a concurrent duplicate).
        """
        with self.transaction() as connection:
            row = self._instance_row(connection, header, stored, calling_ae_title)
            added = connection.execute(self._insert_instance, row).first()
            if added is not None and analyse_with is not None:
                connection.execute(self._request_analysis, _analysis_request(added.id, header, analyse_with))
            return added is not None

    def replace_instance(
        self,
        header: InstanceHeader,
        stored: StoredFile,
        calling_ae_title: str,
        analyse_with: str | None = None,
    ) -> None:
        """Record an instance, overwriting what was recorded under its SOP Instance UID;
        its earlier results for ``analyse_with`` are cleared and requested again."""
        with self.transaction() as connection:
            row = self._instance_row(connection, header, stored, calling_ae_title)
            instance_pk = connection.execute(self._replace_instance, row).scalar_one()
            if analyse_with is not None:
                connection.execute(
                    delete(EMBEDDINGS).where(
                        EMBEDDINGS.c.instance_pk == instance_pk, EMBEDDINGS.c.model_id == analyse_with
                    )
                )
                connection.execute(self._renew_analysis, _analysis_request(instance_pk, header, analyse_with))

    def _instance_row(
        self, connection: Connection, header: InstanceHeader, stored: StoredFile, calling_ae_title: str
    ) -> dict[str, Any]:
        """File the instance's patient, study and series (upserts), and return its own row.

        An existing parent row keeps its first values: the first instance of a study
        names it; each instance only moves the study's ``updated_at``.
        """
        now = datetime.now(UTC)
        patient_pk = connection.execute(
            self._upsert_patient,
            {
                "patient_id": header.patient_id,
                "issuer_of_patient_id": header.issuer_of_patient_id,
                "patient_name": header.patient_name,
                "patient_birth_date": header.patient_birth_date,
                "patient_sex": header.patient_sex,
                "created_at": now,
            },
        ).scalar_one()
        study_pk = connection.execute(
            self._upsert_study,
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
                "assessment_due": True,
            },
        ).scalar_one()
        series_pk = connection.execute(
            self._upsert_series,
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
        ).scalar_one()
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
            "received_at": now,
        }

    def transaction(self) -> _Guarded:
        """A connection in a transaction, committed on leaving; database errors surface as
        :class:`CatalogUnavailable`."""
        return _Guarded(self.engine, transactional=True)

    def connection(self) -> _Guarded:
        """A connection for reads, database errors surfacing as :class:`CatalogUnavailable`."""
        return _Guarded(self.engine, transactional=False)


_REQUEST_COLUMNS = ["instance_pk", "model_id", "state", "reason", "attempts", "requested_at"]
_RESULT_COLUMNS = [
    "claim_token",
    "lease_until",
    "published_at",
    "finished_at",
    "predicted_label",
    "probabilities",
    "frame_index",
    "frames",
    "crop",
    "heatmap",
    "heatmap_size",
    "heatmap_label",
    "timings",
]


def _analysis_request(instance_pk: int, header: InstanceHeader, model_id: str) -> dict[str, Any]:
    """A pending request, or, for an object without an image (SR, PR, KO, …), a request
    already closed as skipped: such objects are kept and served, never failed."""
    is_image = header.rows is not None and header.columns is not None
    return {
        "instance_pk": instance_pk,
        "model_id": model_id,
        "state": "pending" if is_image else "skipped",
        "reason": "" if is_image else "not an image (no Rows/Columns)",
        "attempts": 0,
        "requested_at": datetime.now(UTC),
    }


def _columns(table: Table) -> list[str]:
    return [column.name for column in table.columns if column.name != "id"]


def _bound(table: Table, columns: list[str] | None = None) -> dict[str, BindParameter[Any]]:
    return {name: bindparam(name) for name in (columns or _columns(table))}


def _upsert(insert: Any, table: Table, keys: list[str], touch: list[str]) -> Any:
    """INSERT … ON CONFLICT (keys) DO UPDATE … RETURNING id: one round trip for the row's id.

    ``touch`` names the columns an existing row takes from the new values; with none, the
    update is a no-op that still locks and returns the row.
    """
    statement = insert(table).values(_bound(table))
    update = {column: statement.excluded[column] for column in (touch or keys[:1])}
    return statement.on_conflict_do_update(index_elements=keys, set_=update).returning(table.c.id)


class _Guarded:
    """A connection whose database errors surface as :class:`CatalogUnavailable`."""

    def __init__(self, engine: Engine, *, transactional: bool) -> None:
        self._open = engine.begin if transactional else engine.connect
        self._action = "write" if transactional else "read"

    def __enter__(self) -> Connection:
        try:  # engine.connect() connects at once, engine.begin() on entering: both in here
            self._context = self._open()
            return self._context.__enter__()
        except OperationalError as exc:
            raise CatalogUnavailable(f"catalog database unreachable: {exc.orig}") from exc

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            self._context.__exit__(exc_type, exc, tb)
        except SQLAlchemyError as error:
            raise CatalogUnavailable(f"catalog {self._action} failed: {error}") from error
        if isinstance(exc, SQLAlchemyError):
            raise CatalogUnavailable(f"catalog {self._action} failed: {type(exc).__name__}") from exc
