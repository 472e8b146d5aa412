"""The objects Precedent derives for a study (its SR, its Grad-CAM captures) in the catalog.

A worker reads here what a claimed study assessment is made of, builds the objects, stores
them like any received instance, and then records them here in one transaction with the
assessment itself and their deliveries: the assessment is done only when its objects are
stored and queued for every destination. Every step before that can be repeated: the
objects' UIDs are derived from their sources, so a retry stores nothing twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite

from node.catalog.analyses import AnalysisRecords, ModelRecord, StudyAssessment
from node.catalog.deliveries import DeliveryQueue
from node.catalog.models import ANALYSES, INSTANCES, MODELS, RESULTS, SERIES, STUDIES, STUDY_ASSESSMENTS
from node.catalog.recording import Catalog
from node.catalog.work import DONE, Claim

REPORT = "report"
GRADCAM = "gradcam"


@dataclass(frozen=True)
class AnalysedImage:
    """One analysed image of the study and what the model said about it."""

    instance_pk: int
    sop_instance_uid: str
    file_path: str  # relative to the data directory
    predicted_label: str
    probabilities: dict[str, float]
    frame_index: int
    crop: tuple[int, int, int, int]
    heatmap: bytes | None
    heatmap_size: int | None
    heatmap_label: str | None


@dataclass(frozen=True)
class ResultsInput:
    """Everything the results of one study assessment are made from."""

    assessment: StudyAssessment
    study_instance_uid: str
    model: ModelRecord
    images: list[AnalysedImage]
    earlier_reports: list[str]  # file paths of the SRs of earlier revisions, oldest first


@dataclass(frozen=True)
class MadeObject:
    """A derived object already stored in the node, to be recorded as a result."""

    sop_instance_uid: str
    kind: str  # REPORT or GRADCAM
    source_instance_pk: int | None


class ResultRecords:
    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self.analyses = AnalysisRecords(catalog)
        self.deliveries = DeliveryQueue(catalog)
        dialect = postgresql if catalog.engine.dialect.name == "postgresql" else sqlite
        self._insert_result = dialect.insert(RESULTS).on_conflict_do_nothing(index_elements=["instance_pk"])

    def inputs(self, assessment: StudyAssessment) -> ResultsInput:
        with self.catalog.connection() as connection:
            study_uid = connection.execute(
                select(STUDIES.c.study_instance_uid).where(STUDIES.c.id == assessment.study_pk)
            ).scalar_one()
            model = connection.execute(select(MODELS).where(MODELS.c.model_id == assessment.model_id)).one()
            images = connection.execute(_analysed_images(assessment.study_pk, assessment.model_id)).all()
            earlier = connection.execute(_earlier_reports(assessment)).scalars().all()
        return ResultsInput(
            assessment=assessment,
            study_instance_uid=study_uid,
            model=ModelRecord(
                model.model_id, model.architecture, list(model.labels), model.clinical_use, model.description
            ),
            images=[_image(row) for row in images],
            earlier_reports=list(earlier),
        )

    def record(
        self,
        claim: Claim,
        assessment: StudyAssessment,
        made: Sequence[MadeObject],
        destinations: Sequence[str],
    ) -> bool:
        """Record the stored objects, queue them for ``destinations`` and finish the
        assessment, all in one transaction. False, writing nothing, if the claim was lost."""
        now = datetime.now(UTC)
        with self.catalog.transaction() as connection:
            if not self.analyses.finish_assessment(connection, assessment, claim):
                return False
            uids = [m.sop_instance_uid for m in made]
            pk_of = dict(
                connection.execute(
                    select(INSTANCES.c.sop_instance_uid, INSTANCES.c.id).where(
                        INSTANCES.c.sop_instance_uid.in_(uids)
                    )
                ).all()
            )
            missing = [uid for uid in uids if uid not in pk_of]
            if missing:
                raise LookupError(f"derived objects not in the catalog: {', '.join(missing)}")
            rows: list[dict[str, Any]] = [
                {
                    "instance_pk": pk_of[m.sop_instance_uid],
                    "kind": m.kind,
                    "study_pk": assessment.study_pk,
                    "model_id": assessment.model_id,
                    "assessment_pk": assessment.assessment_id if m.kind == REPORT else None,
                    "source_instance_pk": m.source_instance_pk,
                    "created_at": now,
                }
                for m in made
            ]
            if rows:
                connection.execute(self._insert_result, rows)
            self.deliveries.request(connection, [pk_of[uid] for uid in uids], destinations)
        return True


def _analysed_images(study_pk: int, model_id: str) -> Any:
    a, i = ANALYSES.c, INSTANCES.c
    return (
        select(
            a.instance_pk,
            i.sop_instance_uid,
            i.file_path,
            a.predicted_label,
            a.probabilities,
            a.frame_index,
            a.crop,
            a.heatmap,
            a.heatmap_size,
            a.heatmap_label,
        )
        .join(INSTANCES, i.id == a.instance_pk)
        .join(SERIES, SERIES.c.id == i.series_pk)
        .where(SERIES.c.study_pk == study_pk, a.model_id == model_id, a.state == DONE)
        .order_by(SERIES.c.series_number, i.instance_number, i.id)
    )


def _earlier_reports(assessment: StudyAssessment) -> Any:
    r, sa = RESULTS.c, STUDY_ASSESSMENTS.c
    return (
        select(INSTANCES.c.file_path)
        .join(RESULTS, r.instance_pk == INSTANCES.c.id)
        .join(STUDY_ASSESSMENTS, sa.id == r.assessment_pk)
        .where(
            r.kind == REPORT,
            r.study_pk == assessment.study_pk,
            r.model_id == assessment.model_id,
            sa.revision < assessment.revision,
        )
        .order_by(sa.revision)
    )


def _image(row: Any) -> AnalysedImage:
    top, left, bottom, right = row.crop
    return AnalysedImage(
        instance_pk=row.instance_pk,
        sop_instance_uid=row.sop_instance_uid,
        file_path=row.file_path,
        predicted_label=row.predicted_label,
        probabilities=dict(row.probabilities),
        frame_index=row.frame_index,
        crop=(top, left, bottom, right),
        heatmap=row.heatmap,
        heatmap_size=row.heatmap_size,
        heatmap_label=row.heatmap_label,
    )
