"""``precedent similar FILE.dcm``: the stored studies most like an image that is not stored.

The file goes through the same decoding, preprocessing and model as a received image, and
its embedding through the same similarity service as a viewer's C-FIND: one implementation
of "similar", whoever asks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from node.catalog.analyses import AnalysisOutcome, AnalysisTarget
from node.catalog.recording import Catalog
from node.catalog.similarity import QueryVectors, SimilarityCatalog
from node.query import Level, query_at_level
from node.settings import Settings
from node.similar import (
    DISTANCE_OFFSET,
    FINDING_OFFSET,
    PRIVATE_CREATOR,
    PRIVATE_GROUP,
    SimilarityRequest,
    SimilarityService,
)
from workers.analysis import Analyzer
from workers.index_keeper import open_index
from workers.runtime import bundle_of

# The keys each match is described by.
_KEYS = (
    "StudyInstanceUID",
    "PatientID",
    "StudyDate",
    "AccessionNumber",
    "StudyDescription",
    "ModalitiesInStudy",
)


class NotAnalysable(Exception):
    """The file cannot be read or analysed; the message says why."""


@dataclass(frozen=True)
class SimilarCase:
    rank: int
    distance: float
    study_instance_uid: str
    patient_id: str
    study_date: str
    accession_number: str
    study_description: str
    modalities: str
    finding: str


@dataclass(frozen=True)
class FileSimilarity:
    finding: str
    probability: float
    model_id: str
    cases: list[SimilarCase]


def similar_to_file(settings: Settings, path: Path, k: int) -> FileSimilarity:
    bundle = bundle_of(settings)
    header = _header(path)
    analyzer = Analyzer(bundle, settings.model.model_copy(update={"gradcam": False}))
    try:
        [result] = analyzer.analyse([AnalysisTarget(0, -1, "", str(path.resolve()), 0)], Path("/"))
    finally:
        analyzer.close()
    if isinstance(result, AnalysisOutcome):
        raise NotAnalysable(f"{path}: {result.reason}")
    catalog = Catalog.open(settings.catalog_url())
    try:
        service = SimilarityService(
            catalog, open_index(settings, catalog, bundle.id), bundle.id, settings.similarity
        )
        stored = SimilarityCatalog(catalog).study(str(header.get("StudyInstanceUID", "")))
        study_pk, patient_pk = stored if stored is not None else (-1, -1)
        query = QueryVectors(study_pk, patient_pk, [-1], np.asarray(result.embedding, np.float32)[None, :])
        keys = Dataset()
        for keyword in _KEYS:
            setattr(keys, keyword, "")
        request = SimilarityRequest(Level.STUDY, "", k, query_at_level(keys, Level.STUDY))
        answer = service.answer_vectors(request, query, "")
    finally:
        catalog.close()
    cases = [_case(rank, identifier) for rank, identifier in enumerate(answer, start=1)]
    label = result.predicted_label
    return FileSimilarity(label, result.probabilities[label], bundle.id, cases)


def _header(path: Path) -> Dataset:
    try:
        return dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, ValueError) as exc:
        raise NotAnalysable(f"{path} cannot be read as DICOM: {exc}") from exc


def _case(rank: int, identifier: Dataset) -> SimilarCase:
    block = identifier.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)
    return SimilarCase(
        rank=rank,
        distance=float(block[DISTANCE_OFFSET].value),
        study_instance_uid=str(identifier.StudyInstanceUID),
        patient_id=str(identifier.get("PatientID", "") or ""),
        study_date=str(identifier.get("StudyDate", "") or ""),
        accession_number=str(identifier.get("AccessionNumber", "") or ""),
        study_description=str(identifier.get("StudyDescription", "") or ""),
        modalities=str(identifier.get("ModalitiesInStudy", "") or ""),
        finding=str(block[FINDING_OFFSET].value) if FINDING_OFFSET in block else "",
    )
