"""A stable study's results: Grad-CAM captures and a Structured Report, stored and queued.

Run by the ``assess_study`` task under its claim. The order keeps the invariants: each
object is built with UIDs derived from its sources, stored in the node like a received
instance (file durable, catalog row committed), and only then recorded as a result with
its deliveries, in the transaction that finishes the assessment. A crash anywhere leaves
the assessment claimed, to be retried; the retry builds the same UIDs and stores nothing
twice.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath

from pydicom import dcmread
from pydicom.dataset import Dataset
from sqlalchemy import select

from node.catalog.analyses import StudyAssessment
from node.catalog.models import STUDIES
from node.catalog.recording import Catalog
from node.catalog.results import GRADCAM, REPORT, AnalysedImage, MadeObject, ResultRecords, ResultsInput
from node.catalog.work import Claim
from node.errors import NotSearchable
from node.forward import result_destinations
from node.ingest import Ingestor, ReceivedInstance
from node.settings import Settings
from node.similar import (
    DISTANCE_OFFSET,
    FINDING_OFFSET,
    PRIVATE_CREATOR,
    PRIVATE_GROUP,
    SimilarityService,
    parse_similarity_request,
)
from node.storage import ObjectStore
from workers.analysis import decode_heatmap
from workers.captures import CaptureError, CaptureInput, build_capture
from workers.decode import PixelError, display_frame
from workers.index import SimilarityIndex
from workers.index_keeper import open_index
from workers.reports import (
    GradcamCapture,
    ImageFinding,
    ReportModel,
    SimilarStudy,
    StudyReport,
    build_report,
)

log = logging.getLogger(__name__)

# The similar earlier studies of a study, most similar first: (study UID, k) → matches.
FindSimilar = Callable[[str, int], Sequence[SimilarStudy]]


def not_clinical_reason(description: dict[str, object]) -> str:
    """Why a model's results are not for clinical use, in the words the results carry."""
    stated = description.get("not_clinical_reason")
    if isinstance(stated, str) and stated:
        return stated
    if "phantom" in json.dumps(description.get("data_set", description.get("data", ""))).lower():
        return "synthetic phantoms — not for clinical use"
    return "research model — not for clinical use"


class ResultMaker:
    def __init__(self, settings: Settings, records: ResultRecords, find_similar: FindSimilar | None) -> None:
        self._settings = settings
        self._records = records
        self._find_similar = find_similar
        self._store = ObjectStore(
            settings.storage.data_dir,
            fsync=settings.storage.fsync,
            min_free_bytes=settings.storage.min_free_bytes,
        )
        self._ingestor = Ingestor(
            self._store,
            records.catalog,
            max_instance_bytes=settings.dicom.max_instance_bytes,
            replace_duplicates=False,
        )
        self._destinations = [d.name for d in result_destinations(settings.destinations)]

    def make(self, assessment: StudyAssessment, claim: Claim) -> bool:
        """Build, store and record the results of ``assessment``; False if the claim was lost."""
        inputs = self._records.inputs(assessment)
        made_at = datetime.now(UTC)
        made: list[MadeObject] = []
        captures: dict[int, GradcamCapture] = {}
        # Each source header is read once: the captures and the report both describe it.
        sources = {image.instance_pk: self._source(image) for image in inputs.images}
        for image in inputs.images:
            if image.heatmap is None or image.heatmap_size is None:
                continue
            try:
                capture = self._capture(inputs, image, sources[image.instance_pk], made_at)
            except (CaptureError, PixelError) as exc:  # the report still says what was found
                log.warning("no Grad-CAM capture of %s: %s", image.sop_instance_uid, exc)
                continue
            self._store_dataset(capture)
            captures[image.instance_pk] = GradcamCapture(
                str(capture.SOPClassUID),
                str(capture.SOPInstanceUID),
                str(capture.SeriesInstanceUID),
                image.heatmap_label or image.predicted_label,
            )
            made.append(MadeObject(str(capture.SOPInstanceUID), GRADCAM, image.instance_pk))
        if inputs.images:
            report = build_report(self._study_report(inputs, sources, captures, made_at))
            self._store_dataset(report)
            made.append(MadeObject(str(report.SOPInstanceUID), REPORT, None))
        return self._records.record(claim, assessment, made, self._destinations)

    def _source(self, image: AnalysedImage) -> Dataset:
        return dcmread(self._path(image.file_path), stop_before_pixels=True)

    def _path(self, relative: str) -> Path:
        return self._store.absolute(PurePosixPath(relative))

    def _capture(
        self, inputs: ResultsInput, image: AnalysedImage, source: Dataset, made_at: datetime
    ) -> Dataset:
        assert image.heatmap is not None and image.heatmap_size is not None
        path = self._path(image.file_path)
        label = image.heatmap_label or image.predicted_label
        return build_capture(
            CaptureInput(
                source=source,
                frame=display_frame(path, image.frame_index),
                frame_index=image.frame_index,
                heatmap=decode_heatmap(image.heatmap, image.heatmap_size),
                crop=image.crop,
                label=label,
                probability=image.probabilities.get(label, 0.0),
                model_id=inputs.model.model_id,
                architecture=inputs.model.architecture,
                clinical_use=inputs.model.clinical_use,
                made_at=made_at,
            ),
            opacity=self._settings.results.gradcam_opacity,
        )

    def _study_report(
        self,
        inputs: ResultsInput,
        sources: dict[int, Dataset],
        captures: dict[int, GradcamCapture],
        made_at: datetime,
    ) -> StudyReport:
        assessment = inputs.assessment
        model = inputs.model
        findings = [
            ImageFinding(
                source=sources[image.instance_pk],
                frame_number=image.frame_index + 1 if _frames(sources[image.instance_pk]) > 1 else None,
                finding=image.predicted_label,
                probabilities=image.probabilities,
                gradcam=captures.get(image.instance_pk),
            )
            for image in inputs.images
        ]
        source_pk = assessment.source_instance_pk
        source = sources[source_pk] if source_pk else None
        source_image = next((i for i in inputs.images if i.instance_pk == source_pk), None)
        return StudyReport(
            model=ReportModel(
                model_id=model.model_id,
                architecture=model.architecture,
                labels=list(model.labels),
                clinical_use=model.clinical_use,
                not_clinical_reason="" if model.clinical_use else not_clinical_reason(model.description),
            ),
            findings=findings,
            assessment_finding=assessment.finding or "",
            assessment_probability=assessment.probability or 0.0,
            assessment_source_uid=str(source.SOPInstanceUID) if source is not None else "",
            assessment_frame_number=(
                source_image.frame_index + 1
                if source is not None and source_image is not None and _frames(source) > 1
                else None
            ),
            similar=self._similar(inputs.study_instance_uid),
            revision=assessment.revision,
            predecessors=[dcmread(self._path(p)) for p in inputs.earlier_reports],
            made_at=made_at,
        )

    def _similar(self, study_uid: str) -> Sequence[SimilarStudy]:
        k = self._settings.results.similar_studies
        if self._find_similar is None or k == 0:
            return []
        return self._find_similar(study_uid, k)

    def _store_dataset(self, dataset: Dataset) -> None:
        """Store a derived object as the node stores a received one (a retry's second copy
        is kept as a duplicate, changing nothing)."""
        with tempfile.NamedTemporaryFile(dir=self._store.incoming_dir, suffix=".dcm", delete=False) as f:
            path = Path(f.name)
        try:
            dataset.save_as(path, enforce_file_format=True)
            self._ingestor.ingest(
                ReceivedInstance(
                    path, str(dataset.SOPClassUID), str(dataset.SOPInstanceUID), self._settings.dicom.ae_title
                )
            )
        finally:
            path.unlink(missing_ok=True)


class EarlierStudies:
    """The similar earlier studies a report lists: the answer a viewer's similarity C-FIND
    would get (one implementation), limited to studies dated no later than this one."""

    def __init__(self, settings: Settings, catalog: Catalog, model_id: str) -> None:
        self._settings = settings
        self._catalog = catalog
        self._model_id = model_id
        self._index: SimilarityIndex | None = None

    def __call__(self, study_uid: str, k: int) -> list[SimilarStudy]:
        index = self._synced_index()
        service = SimilarityService(self._catalog, index, self._model_id, self._settings.similarity)
        request = Dataset()
        request.QueryRetrieveLevel = "STUDY"
        request.StudyInstanceUID = study_uid
        request.AccessionNumber = ""
        request.StudyDate = self._no_later_than(study_uid)
        try:
            answer = service.answer(parse_similarity_request(request, self._settings.similarity), "")
        except NotSearchable as exc:
            log.info("no similar studies for %s: %s", study_uid, exc)
            return []
        return [_similar_study(identifier) for identifier in answer[:k]]

    def _synced_index(self) -> SimilarityIndex:
        if self._index is None:
            self._index = open_index(self._settings, self._catalog, self._model_id)
        else:
            self._index.sync(self._catalog)
        return self._index

    def _no_later_than(self, study_uid: str) -> str:
        with self._catalog.connection() as connection:
            date = connection.execute(
                select(STUDIES.c.study_date).where(STUDIES.c.study_instance_uid == study_uid)
            ).scalar_one_or_none()
        return f"-{date}" if date else ""


def _similar_study(identifier: Dataset) -> SimilarStudy:
    block = identifier.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)
    finding = block[FINDING_OFFSET].value if FINDING_OFFSET in block else None
    return SimilarStudy(
        study_instance_uid=str(identifier.StudyInstanceUID),
        accession_number=str(identifier.get("AccessionNumber", "") or ""),
        study_date=str(identifier.get("StudyDate", "") or ""),
        finding=str(finding) if finding else None,
        distance=float(block[DISTANCE_OFFSET].value),
    )


def _frames(source: Dataset) -> int:
    return int(source.get("NumberOfFrames", 1) or 1)
