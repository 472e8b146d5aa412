"""Analyses and study assessments in the catalog: what workers read and write.

Results are keyed by (instance, model id): a second run of the same request finds the
row finished (its claim fails) and changes nothing; the embedding table refuses a second
vector for the same key.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
from sqlalchemy import exists, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from node.catalog.models import (
    ANALYSES,
    EMBEDDINGS,
    INSTANCES,
    MODELS,
    RESULTS,
    SERIES,
    STUDIES,
    STUDY_ASSESSMENTS,
)
from node.catalog.recording import Catalog
from node.catalog.work import DONE, FAILED, PENDING, UNFINISHED, Claim, WorkTable


@dataclass(frozen=True)
class AnalysisTarget:
    """One claimed analysis: which file to read."""

    analysis_id: int
    instance_pk: int
    sop_instance_uid: str
    file_path: str  # relative to the data directory
    attempts: int


@dataclass(frozen=True)
class AnalysisResult:
    """What the model said about one instance (the reported frame's outputs)."""

    analysis_id: int
    predicted_label: str
    probabilities: dict[str, float]
    frame_index: int
    frames: list[dict[str, Any]] | None
    crop: tuple[int, int, int, int]
    embedding: np.ndarray
    heatmap: bytes | None
    heatmap_size: int | None
    heatmap_label: str | None
    timings: dict[str, float]


@dataclass(frozen=True)
class AnalysisOutcome:
    """A request closed without results: ``failed`` (with why) or ``skipped`` (not an image)."""

    analysis_id: int
    state: str
    reason: str


@dataclass(frozen=True)
class StudyAssessment:
    """A study's finding by one model: its most severe image finding."""

    assessment_id: int
    study_pk: int
    model_id: str
    revision: int
    finding: str | None
    probability: float | None
    source_instance_pk: int | None
    analysed_instances: int


@dataclass(frozen=True)
class ModelRecord:
    model_id: str
    architecture: str
    labels: Sequence[str]
    clinical_use: bool
    description: dict[str, Any]


class AnalysisRecords:
    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self.analyses = WorkTable(catalog, ANALYSES)
        self.assessments = WorkTable(catalog, STUDY_ASSESSMENTS)
        dialect = postgresql if catalog.engine.dialect.name == "postgresql" else sqlite
        self._insert_embedding = dialect.insert(EMBEDDINGS).on_conflict_do_nothing(
            index_elements=["instance_pk", "model_id"]
        )
        self._insert_model = dialect.insert(MODELS).on_conflict_do_nothing(index_elements=["model_id"])

    def register_model(self, model: ModelRecord) -> None:
        """Record what a model's results mean (its labels), once per model id."""
        with self.catalog.transaction() as connection:
            connection.execute(
                self._insert_model,
                {
                    "model_id": model.model_id,
                    "architecture": model.architecture,
                    "labels": list(model.labels),
                    "clinical_use": model.clinical_use,
                    "description": model.description,
                    "registered_at": datetime.now(UTC),
                },
            )

    def model_labels(self, model_id: str) -> list[str] | None:
        with self.catalog.connection() as connection:
            found = connection.execute(select(MODELS.c.labels).where(MODELS.c.model_id == model_id)).first()
        return None if found is None else list(found[0])

    def model_of(self, analysis_id: int) -> str | None:
        with self.catalog.connection() as connection:
            found = connection.execute(select(ANALYSES.c.model_id).where(ANALYSES.c.id == analysis_id))
            return found.scalar_one_or_none()

    def targets(self, claim: Claim) -> list[AnalysisTarget]:
        a, i = ANALYSES.c, INSTANCES.c
        with self.catalog.connection() as connection:
            rows = connection.execute(
                select(a.id, a.instance_pk, i.sop_instance_uid, i.file_path, a.attempts)
                .join(INSTANCES, INSTANCES.c.id == a.instance_pk)
                .where(a.id.in_(claim.ids), a.claim_token == claim.token)
                .order_by(a.id)
            ).all()
        return [
            AnalysisTarget(r.id, r.instance_pk, r.sop_instance_uid, r.file_path, r.attempts) for r in rows
        ]

    def record(self, claim: Claim, model_id: str, results: Sequence[AnalysisResult | AnalysisOutcome]) -> int:
        """Write the results of a claimed batch in one transaction; returns how many rows
        this claim still held (the others were taken over and are left to their taker)."""
        instance_of = {t.analysis_id: t.instance_pk for t in self.targets(claim)}
        written = 0
        now = datetime.now(UTC)
        with self.catalog.transaction() as connection:
            for result in results:
                if isinstance(result, AnalysisOutcome):
                    values: dict[str, Any] = {"reason": result.reason}
                    written += self.analyses.finish(
                        connection, result.analysis_id, claim, result.state, values
                    )
                    continue
                if not self.analyses.finish(
                    connection, result.analysis_id, claim, DONE, _result_values(result)
                ):
                    continue
                written += 1
                vector = np.ascontiguousarray(result.embedding, dtype="<f4")
                connection.execute(
                    self._insert_embedding,
                    {
                        "instance_pk": instance_of[result.analysis_id],
                        "model_id": model_id,
                        "dimension": int(vector.size),
                        "vector": vector.tobytes(),
                        "created_at": now,
                    },
                )
        return written

    def request_reanalysis(self, model_id: str, *, study_uid: str | None, failed_only: bool) -> int:
        """Make finished analyses pending again (and request analyses the model never had)."""
        a = ANALYSES.c
        criteria = [a.model_id == model_id]
        if failed_only:
            criteria.append(a.state == FAILED)
        if study_uid is not None:
            criteria.append(a.instance_pk.in_(_instances_of_study(study_uid)))
        again = self.analyses.request_again(*criteria)
        requested = again + (0 if failed_only else self._request_missing(model_id, study_uid))
        self._flag_studies_with_pending_analyses(model_id)
        return requested

    def _flag_studies_with_pending_analyses(self, model_id: str) -> None:
        """Their assessment is due again once the new analyses finish."""
        pending = (
            select(SERIES.c.study_pk)
            .join(INSTANCES, INSTANCES.c.series_pk == SERIES.c.id)
            .join(ANALYSES, ANALYSES.c.instance_pk == INSTANCES.c.id)
            .where(ANALYSES.c.model_id == model_id, ANALYSES.c.state == PENDING)
        )
        with self.catalog.transaction() as connection:
            connection.execute(update(STUDIES).where(STUDIES.c.id.in_(pending)).values(assessment_due=True))

    def request_missing(self, model_id: str) -> int:
        """Request the analyses ``model_id`` never had (a new model re-embedding the archive);
        finished ones are kept, so an interrupted run resumes where it stopped."""
        return self._request_missing(model_id, None)

    def _request_missing(self, model_id: str, study_uid: str | None) -> int:
        i = INSTANCES.c
        missing = (
            select(i.id)
            .where(~exists().where(ANALYSES.c.instance_pk == i.id, ANALYSES.c.model_id == model_id))
            .where(i.rows.is_not(None))
            .where(~exists().where(RESULTS.c.instance_pk == i.id))  # never analyse what we derived
        )
        if study_uid is not None:
            missing = missing.where(i.id.in_(_instances_of_study(study_uid)))
        with self.catalog.transaction() as connection:
            ids = [row.id for row in connection.execute(missing)]
            if ids:
                now = datetime.now(UTC)
                connection.execute(
                    insert(ANALYSES),
                    [
                        {
                            "instance_pk": pk,
                            "model_id": model_id,
                            "state": PENDING,
                            "reason": "",
                            "attempts": 0,
                            "requested_at": now,
                        }
                        for pk in ids
                    ],
                )
        return len(ids)

    def failures(self, limit: int = 20) -> list[tuple[str, str, int]]:
        """The most frequent failure reasons with an example SOP Instance UID each."""
        a = ANALYSES.c
        with self.catalog.connection() as connection:
            rows = connection.execute(
                select(a.reason, func.min(INSTANCES.c.sop_instance_uid), func.count())
                .join(INSTANCES, INSTANCES.c.id == a.instance_pk)
                .where(a.state == FAILED)
                .group_by(a.reason)
                .order_by(func.count().desc())
                .limit(limit)
            ).all()
        return [(reason, uid, int(n)) for reason, uid, n in rows]

    def request_due_assessments(self, model_id: str, stable_seconds: float, limit: int = 100) -> int:
        """Create assessment requests for studies that are stable (no instance for
        ``stable_seconds``) and whose analyses are all finished; a study whose finished
        analyses are those its last revision already covered just has its flag cleared."""
        s = STUDIES.c
        cutoff = datetime.now(UTC) - timedelta(seconds=stable_seconds)
        with self.catalog.transaction() as connection:
            due = connection.execute(
                select(s.id)
                .where(s.assessment_due.is_(True), s.updated_at <= cutoff)
                .where(~exists(_analyses_of_study(s.id, model_id).where(ANALYSES.c.state.in_(UNFINISHED))))
                .where(
                    ~exists().where(
                        STUDY_ASSESSMENTS.c.study_pk == s.id,
                        STUDY_ASSESSMENTS.c.model_id == model_id,
                        STUDY_ASSESSMENTS.c.state.in_(UNFINISHED),
                    )
                )
                .order_by(s.id)
                .limit(limit)
            ).scalars()
            requested = sum(
                self._request_assessment(connection, study_pk, model_id) for study_pk in list(due)
            )
        return requested

    def _request_assessment(self, connection: Connection, study_pk: int, model_id: str) -> int:
        """Request a new revision of the study's assessment if what it would cover has
        changed. While the last revision is still being made (its results being stored move
        the study too) the flag stays, and the study is looked at again once it is done."""
        sa = STUDY_ASSESSMENTS.c
        last = connection.execute(
            select(sa.revision, sa.analysed_instances, sa.state)
            .where(sa.study_pk == study_pk, sa.model_id == model_id)
            .order_by(sa.revision.desc())
            .limit(1)
        ).first()
        if last is not None and last.state in UNFINISHED:
            return 0
        connection.execute(update(STUDIES).where(STUDIES.c.id == study_pk).values(assessment_due=False))
        requested = connection.execute(
            select(func.count()).select_from(_analyses_of_study(study_pk, model_id).subquery())
        ).scalar_one()
        if not requested:  # stored while analysis was off: reanalysis flags it again
            return 0
        finished = connection.execute(
            select(func.count()).select_from(
                _analyses_of_study(study_pk, model_id).where(ANALYSES.c.state == DONE).subquery()
            )
        ).scalar_one()
        if last is not None and last.state == DONE and last.analysed_instances == finished:
            return 0
        connection.execute(
            insert(STUDY_ASSESSMENTS).values(
                study_pk=study_pk,
                model_id=model_id,
                revision=1 if last is None else last.revision + 1,
                state=PENDING,
                reason="",
                attempts=0,
                requested_at=datetime.now(UTC),
            )
        )
        return 1

    def assessment(self, assessment_id: int, claim: Claim) -> StudyAssessment | None:
        """The study-level assessment of a claimed request: the most severe finding among
        the study's analysed images (labels are listed in ascending severity), its
        probability and the image it came from. None if the claim was lost."""
        sa = STUDY_ASSESSMENTS.c
        with self.catalog.connection() as connection:
            row = connection.execute(
                select(sa.study_pk, sa.model_id, sa.revision).where(
                    sa.id == assessment_id, sa.claim_token == claim.token
                )
            ).first()
            if row is None:
                return None
            labels = connection.execute(
                select(MODELS.c.labels).where(MODELS.c.model_id == row.model_id)
            ).scalar_one()
            analysed = connection.execute(
                _analyses_of_study(row.study_pk, row.model_id)
                .where(ANALYSES.c.state == DONE)
                .with_only_columns(
                    ANALYSES.c.instance_pk, ANALYSES.c.predicted_label, ANALYSES.c.probabilities
                )
                .order_by(ANALYSES.c.instance_pk)
            ).all()
        finding, probability, source = _most_severe(list(labels), analysed)
        return StudyAssessment(
            assessment_id,
            row.study_pk,
            row.model_id,
            row.revision,
            finding,
            probability,
            source,
            len(analysed),
        )

    def finish_assessment(self, connection: Connection, assessment: StudyAssessment, claim: Claim) -> bool:
        """Record ``assessment`` in the caller's transaction; False if the claim was lost."""
        values = {
            "finding": assessment.finding,
            "probability": assessment.probability,
            "source_instance_pk": assessment.source_instance_pk,
            "analysed_instances": assessment.analysed_instances,
            "reason": "" if assessment.analysed_instances else "no image of the study could be analysed",
        }
        return self.assessments.finish(connection, assessment.assessment_id, claim, DONE, values)

    def assess_study(self, assessment_id: int, claim: Claim) -> str | None:
        """Make and record the assessment (without results objects). Returns the finding,
        or None if the claim was lost."""
        assessment = self.assessment(assessment_id, claim)
        if assessment is None:
            return None
        with self.catalog.transaction() as connection:
            if not self.finish_assessment(connection, assessment, claim):
                return None
        return assessment.finding


def _result_values(result: AnalysisResult) -> dict[str, Any]:
    return {
        "predicted_label": result.predicted_label,
        "probabilities": result.probabilities,
        "frame_index": result.frame_index,
        "frames": result.frames,
        "crop": list(result.crop),
        "heatmap": result.heatmap,
        "heatmap_size": result.heatmap_size,
        "heatmap_label": result.heatmap_label,
        "timings": result.timings,
        "reason": "",
    }


def _instances_of_study(study_uid: str) -> Any:
    return (
        select(INSTANCES.c.id)
        .join(SERIES, SERIES.c.id == INSTANCES.c.series_pk)
        .join(STUDIES, STUDIES.c.id == SERIES.c.study_pk)
        .where(STUDIES.c.study_instance_uid == study_uid)
    )


def _analyses_of_study(study_pk: Any, model_id: str) -> Any:
    return (
        select(ANALYSES.c.id)
        .join(INSTANCES, INSTANCES.c.id == ANALYSES.c.instance_pk)
        .join(SERIES, SERIES.c.id == INSTANCES.c.series_pk)
        .where(SERIES.c.study_pk == study_pk, ANALYSES.c.model_id == model_id)
    )


def _most_severe(labels: list[str], analysed: Sequence[Any]) -> tuple[str | None, float | None, int | None]:
    """The finding of highest severity (position in ``labels``); ties go to the image
    that gives it the highest probability."""
    best: tuple[int, float, int] | None = None
    for row in analysed:
        severity = labels.index(row.predicted_label) if row.predicted_label in labels else -1
        candidate = (severity, float(row.probabilities[row.predicted_label]), row.instance_pk)
        if best is None or candidate[:2] > best[:2]:
            best = candidate
    if best is None:
        return None, None, None
    return labels[best[0]], best[1], best[2]
