"""Reading stored embeddings for the similarity index (``workers.index``).

The index is a cache of the ``embeddings`` table: it follows the table by id, one model at
a time, and may be thrown away and rebuilt from here at any moment. Vectors are stored as
float32 little-endian bytes (written by :meth:`~node.catalog.analyses.AnalysisRecords.record`)
and come back as one ``(n, dimension)`` float32 array per batch, decoded without a copy per
row.

Reading by id alone is not enough on PostgreSQL: ids are handed out when a row is
inserted, not when it commits, so a transaction that commits late makes a row appear
*below* ids already read. :meth:`EmbeddingRecords.after` therefore also reports the ids of
every model it walked past, so the caller can tell which ids below its high-water mark
are still missing (gaps) and ask for them again with :meth:`EmbeddingRecords.by_ids`.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import case, func, null, select

from node.catalog.models import EMBEDDINGS, MODELS
from node.catalog.recording import Catalog

_FLOAT32 = np.dtype("<f4")
_BYTES_PER_VALUE = _FLOAT32.itemsize
# Bound parameters per IN list: SQLite allows 32766, PostgreSQL 65535.
_IN_CHUNK = 10_000


class EmbeddingError(Exception):
    """A stored embedding that cannot be read as its row declares; names the row and why."""


@dataclass(frozen=True)
class StoredEmbeddings:
    """Embeddings of one model, in id order: ``ids[i]`` (the row), ``instance_pks[i]`` and
    ``vectors[i]`` belong together. ``vectors`` is C-contiguous float32 ``(n, dimension)``."""

    ids: np.ndarray
    instance_pks: np.ndarray
    vectors: np.ndarray

    def __len__(self) -> int:
        return int(self.ids.size)

    @property
    def dimension(self) -> int:
        return int(self.vectors.shape[1])


@dataclass(frozen=True)
class Walk:
    """One step along the table after a high-water mark: this model's rows (``rows``) and
    the ids of every row the step passed, of any model (``seen``, ascending), so that the
    caller can find the ids that were not there yet."""

    rows: StoredEmbeddings
    seen: np.ndarray

    @property
    def last_id(self) -> int | None:
        return int(self.seen[-1]) if self.seen.size else None


class EmbeddingRecords:
    """Read access to the ``embeddings`` table; every method is one short read."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    def after(self, model_id: str, high_water: int, limit: int) -> Walk:
        """The next ``limit`` rows of the table with an id above ``high_water``, in id order,
        the vectors of ``model_id`` among them decoded.

        Rows of other models are walked past (their ids only, no vector is transferred),
        so a step may hold fewer than ``limit`` rows of the model; an empty ``seen`` means
        the end of the table.
        """
        e = EMBEDDINGS.c
        mine = e.model_id == model_id
        statement = (
            select(
                e.id,
                mine.label("mine"),
                e.instance_pk,
                e.dimension,
                case((mine, e.vector), else_=null()).label("vector"),
            )
            .where(e.id > high_water)
            .order_by(e.id)
            .limit(limit)
        )
        with self.catalog.connection() as connection:
            rows = connection.execute(statement).all()
        seen = np.fromiter((row.id for row in rows), dtype=np.int64, count=len(rows))
        return Walk(_decode(model_id, [row for row in rows if row.mine]), seen)

    def by_ids(self, model_id: str, ids: Collection[int]) -> StoredEmbeddings:
        """The rows of ``model_id`` among ``ids`` (those that exist now), in id order."""
        return self._where_in(model_id, EMBEDDINGS.c.id, ids)

    def of_instances(self, model_id: str, instance_pks: Collection[int]) -> StoredEmbeddings:
        """The embeddings of ``model_id`` for the given instances (those it has), in id order."""
        return self._where_in(model_id, EMBEDDINGS.c.instance_pk, instance_pks)

    def _where_in(self, model_id: str, column: Any, values: Collection[int]) -> StoredEmbeddings:
        """The rows of ``model_id`` whose ``column`` is among ``values``, read in chunks (the
        database's bound on parameters), in id order."""
        e = EMBEDDINGS.c
        rows: list[Any] = []
        wanted = sorted(values)
        with self.catalog.connection() as connection:
            for start in range(0, len(wanted), _IN_CHUNK):
                rows += connection.execute(
                    select(e.id, e.instance_pk, e.dimension, e.vector).where(
                        e.model_id == model_id, column.in_(wanted[start : start + _IN_CHUNK])
                    )
                ).all()
        return _decode(model_id, sorted(rows, key=lambda row: row.id))

    def count(self, model_id: str) -> int:
        """How many embeddings ``model_id`` has."""
        e = EMBEDDINGS.c
        with self.catalog.connection() as connection:
            found = connection.execute(select(func.count()).where(e.model_id == model_id)).scalar_one()
        return int(found)

    def counts(self) -> dict[str, int]:
        """The number of embeddings per model id, for every model that has any."""
        e = EMBEDDINGS.c
        with self.catalog.connection() as connection:
            rows = connection.execute(select(e.model_id, func.count()).group_by(e.model_id)).all()
        return {model_id: int(n) for model_id, n in rows}

    def last_id(self) -> int:
        """The highest embedding id of any model (0 for an empty table)."""
        with self.catalog.connection() as connection:
            found = connection.execute(select(func.max(EMBEDDINGS.c.id))).scalar_one()
        return int(found or 0)

    def is_known_model(self, model_id: str) -> bool:
        """Whether the catalog has heard of ``model_id``: registered, or with embeddings."""
        e = EMBEDDINGS.c
        with self.catalog.connection() as connection:
            registered = connection.execute(
                select(MODELS.c.id).where(MODELS.c.model_id == model_id).limit(1)
            ).first()
            embedded = connection.execute(select(e.id).where(e.model_id == model_id).limit(1)).first()
        return registered is not None or embedded is not None


def _decode(model_id: str, rows: Sequence[Any]) -> StoredEmbeddings:
    """Stack the rows' vectors into one array; every row must declare the same dimension
    and hold exactly that many float32 values (a model has one embedding size)."""
    if not rows:
        return StoredEmbeddings(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 0), np.float32))
    dimension = int(rows[0].dimension)
    for row in rows:
        if row.dimension != dimension:
            raise EmbeddingError(
                f"embedding {row.id} of model {model_id}: dimension {row.dimension}, "
                f"but embedding {rows[0].id} of the same model has {dimension}"
            )
        if row.vector is None or len(row.vector) != dimension * _BYTES_PER_VALUE:
            size = 0 if row.vector is None else len(row.vector)
            raise EmbeddingError(
                f"embedding {row.id} of model {model_id}: {size} bytes stored, "
                f"{dimension * _BYTES_PER_VALUE} expected for dimension {dimension}"
            )
    joined = b"".join(row.vector for row in rows)
    vectors = np.frombuffer(joined, dtype=_FLOAT32).reshape(len(rows), dimension)
    return StoredEmbeddings(
        np.fromiter((row.id for row in rows), dtype=np.int64, count=len(rows)),
        np.fromiter((row.instance_pk for row in rows), dtype=np.int64, count=len(rows)),
        vectors.astype(np.float32, copy=False),
    )
