"""What similar-case search reads from the catalog: the query's own embeddings, where each
matching image belongs (study, patient), and what the model found there.

The reads select by primary or unique keys only and filter the work state in Python: with
no statistics (a SQLite catalog is never ANALYZEd), SQLite's planner prefers the index on
``state`` — every row of a searched catalog is ``done`` — and walks the whole table
(18 ms a query at 100k studies, against well under 1 ms by the keys)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import Row, Select, select

from node.catalog.models import ANALYSES, EMBEDDINGS, INSTANCES, SERIES, STUDIES, STUDY_ASSESSMENTS
from node.catalog.recording import Catalog
from node.catalog.work import DONE


@dataclass(frozen=True)
class Located:
    """Where an image is: its study and patient."""

    instance_pk: int
    sop_instance_uid: str
    study_pk: int
    patient_pk: int


@dataclass(frozen=True)
class QueryVectors:
    """The embeddings of the images a similarity query names (a study's, or one image's)."""

    study_pk: int
    patient_pk: int
    instance_pks: list[int]
    vectors: np.ndarray  # float32, one row per image


class SimilarityCatalog:
    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    def study(self, study_uid: str) -> tuple[int, int] | None:
        """(study pk, patient pk) of a stored study."""
        s = STUDIES.c
        with self.catalog.connection() as connection:
            row = connection.execute(
                select(s.id, s.patient_pk).where(s.study_instance_uid == study_uid)
            ).first()
        return None if row is None else (int(row[0]), int(row[1]))

    def image(self, sop_uid: str) -> Located | None:
        with self.catalog.connection() as connection:
            row = connection.execute(_located().where(INSTANCES.c.sop_instance_uid == sop_uid)).first()
        return None if row is None else Located(*row)

    def vectors_of_study(self, study_pk: int, patient_pk: int, model_id: str) -> QueryVectors:
        """The study's embeddings: its images first, then their vectors by instance (a
        join would let the database walk the model's whole embedding table)."""
        e, i = EMBEDDINGS.c, INSTANCES.c
        with self.catalog.connection() as connection:
            images = connection.execute(
                select(i.id).join(SERIES, SERIES.c.id == i.series_pk).where(SERIES.c.study_pk == study_pk)
            ).scalars()
            rows = connection.execute(
                select(e.instance_pk, e.vector)
                .where(e.instance_pk.in_(list(images)), e.model_id == model_id)
                .order_by(e.instance_pk)
            ).all()
        return _query_vectors(study_pk, patient_pk, rows)

    def vectors_of_image(self, image: Located, model_id: str) -> QueryVectors:
        e = EMBEDDINGS.c
        with self.catalog.connection() as connection:
            rows = connection.execute(
                select(e.instance_pk, e.vector).where(
                    e.instance_pk == image.instance_pk, e.model_id == model_id
                )
            ).all()
        return _query_vectors(image.study_pk, image.patient_pk, rows)

    def locate(self, instance_pks: Iterable[int]) -> dict[int, Located]:
        wanted = list(set(instance_pks))
        if not wanted:
            return {}
        with self.catalog.connection() as connection:
            rows = connection.execute(_located().where(INSTANCES.c.id.in_(wanted))).all()
        return {int(row[0]): Located(*row) for row in rows}

    def image_findings(self, instance_pks: Iterable[int], model_id: str) -> dict[int, tuple[str, float]]:
        """instance pk → (predicted label, its probability)."""
        a = ANALYSES.c
        with self.catalog.connection() as connection:
            rows = connection.execute(
                select(a.instance_pk, a.state, a.predicted_label, a.probabilities).where(
                    a.instance_pk.in_(list(instance_pks)), a.model_id == model_id
                )
            ).all()
        return {
            int(pk): (label, float(probs[label]))
            for pk, state, label, probs in rows
            if state == DONE and label
        }

    def study_findings(self, study_pks: Iterable[int], model_id: str) -> dict[int, tuple[str, float]]:
        """study pk → (finding, probability) of its latest done assessment."""
        sa = STUDY_ASSESSMENTS.c
        with self.catalog.connection() as connection:
            rows = connection.execute(
                select(sa.study_pk, sa.revision, sa.state, sa.finding, sa.probability)
                .where(sa.study_pk.in_(list(study_pks)), sa.model_id == model_id)
                .order_by(sa.study_pk, sa.revision)
            ).all()
        latest = {int(pk): (finding, float(p or 0.0)) for pk, _, state, finding, p in rows if state == DONE}
        return {pk: found for pk, found in latest.items() if found[0]}


def _located() -> Select[Any]:
    return (
        select(INSTANCES.c.id, INSTANCES.c.sop_instance_uid, SERIES.c.study_pk, STUDIES.c.patient_pk)
        .join(SERIES, SERIES.c.id == INSTANCES.c.series_pk)
        .join(STUDIES, STUDIES.c.id == SERIES.c.study_pk)
    )


def _query_vectors(study_pk: int, patient_pk: int, rows: Sequence[Row[Any, Any]]) -> QueryVectors:
    pks = [int(row[0]) for row in rows]
    vectors = [np.frombuffer(row[1], dtype="<f4") for row in rows]
    matrix = np.vstack(vectors).astype(np.float32) if vectors else np.zeros((0, 0), np.float32)
    return QueryVectors(study_pk, patient_pk, pks, matrix)
