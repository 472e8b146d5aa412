"""Similar-case search over DICOM: C-FIND requests to ``dicom.similar_ae_title``.

A request names what it is looking from: a stored study (STUDY level, its
StudyInstanceUID) or a stored image (IMAGE level, its SOPInstanceUID). The answer is the
k most similar other studies or images, most similar first, each as a normal C-FIND match
of its level with the keys asked for, plus a private block (group 0x0077, creator
``PRECEDENT SIMILARITY``) holding its rank, distance and the model's finding. Every
other key of the request filters the matches as in an ordinary C-FIND.

Study similarity is the best image-to-image similarity between the two studies. The
query study is never a match; other studies of the same patient are only with
``similarity.same_patient``. The index may return fewer usable neighbours than asked
(the query's own images, filtered-out matches), so the search widens until k matches
remain or the index has nothing more.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from pydicom.dataset import Dataset
from sqlalchemy import Row

from node.catalog.recording import Catalog
from node.catalog.similarity import QueryVectors, SimilarityCatalog
from node.errors import IdentifierMismatch, NotSearchable, UnprocessableQuery
from node.query import Level, Query, query_at_level
from node.settings import SimilaritySettings

PRIVATE_GROUP = 0x0077
PRIVATE_CREATOR = "PRECEDENT SIMILARITY"
# Offsets in the private block (PS3.5 7.8.1): (0077,xx10) in a request asks for k matches.
K_OFFSET = 0x10
RANK_OFFSET = 0x01  # US: 1 = most similar
DISTANCE_OFFSET = 0x02  # FD: the metric's distance (smaller = more similar)
FINDING_OFFSET = 0x03  # LO: the model's finding for the matching study or image
PROBABILITY_OFFSET = 0x04  # FD: its probability
MATCHED_IMAGE_OFFSET = 0x05  # UI: the image of the match that was closest
QUERY_IMAGE_OFFSET = 0x06  # UI: the query's image it was closest to
METRIC_OFFSET = 0x07  # CS: COSINE or L2
MODEL_OFFSET = 0x08  # LO: the model id (sha256 of the bundle) the embeddings came from

_LEVEL_KEYS = {Level.STUDY: "StudyInstanceUID", Level.IMAGE: "SOPInstanceUID"}
_WIDEN = 4


class Neighbours(Protocol):
    """The similarity index the service searches (the FAISS index of one model)."""

    def search(
        self, vectors: np.ndarray, k: int, *, exclude: Collection[int] = ()
    ) -> Sequence[Sequence[tuple[int, float]]]:
        """For each row of ``vectors``, up to ``k`` (instance pk, distance), nearest first,
        none of them in ``exclude``."""
        ...

    def __len__(self) -> int: ...


@dataclass(frozen=True)
class SimilarityRequest:
    level: Level
    uid: str  # the study or image searched from
    k: int
    filters: Query


@dataclass(frozen=True)
class Match:
    pk: int  # study pk (STUDY level) or instance pk (IMAGE level)
    distance: float
    matched_image: str
    query_image: str


def parse_similarity_request(identifier: Dataset, settings: SimilaritySettings) -> SimilarityRequest:
    """Read a similarity C-FIND identifier; raise :class:`IdentifierMismatch` or
    :class:`UnprocessableQuery` (the edge turns them into statuses) when it does not fit."""
    text = str(identifier.get("QueryRetrieveLevel", "") or "").strip()
    level = next((lv for lv in _LEVEL_KEYS if lv.value == text), None)
    if level is None:
        raise IdentifierMismatch(f"similarity search is at STUDY or IMAGE level, not {text[:16]!r}")
    keyword = _LEVEL_KEYS[level]
    value = str(identifier.get(keyword, "") or "").strip()
    if not value or "\\" in value or "*" in value or "?" in value:
        raise IdentifierMismatch(f"{keyword} must name one stored {level.value.lower()} to search from")
    k = _requested_k(identifier, settings)
    filters = Dataset()
    for element in identifier:
        if element.tag.is_private or element.keyword == keyword:
            continue
        filters.add(element)
    filters.add_new(keyword, "UI", None)  # returned for each match, not a filter
    return SimilarityRequest(level, value, k, query_at_level(filters, level))


def _requested_k(identifier: Dataset, settings: SimilaritySettings) -> int:
    try:
        element = identifier.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)[K_OFFSET]
    except KeyError:
        element = None
    if element is None or element.value in (None, ""):
        return settings.k
    try:
        k = int(element.value)
    except (TypeError, ValueError):
        raise UnprocessableQuery(f"k (0077,xx10) must be a number, not {element.value!r}") from None
    if not 1 <= k <= settings.max_k:
        raise UnprocessableQuery(f"k (0077,xx10) must be 1 to {settings.max_k} (similarity.max_k), not {k}")
    return k


class SimilarityService:
    """Answers similarity requests from the catalog and one model's index."""

    def __init__(
        self,
        catalog: Catalog,
        neighbours: Neighbours | None,
        model_id: str | None,
        settings: SimilaritySettings,
    ) -> None:
        self._catalog = catalog
        self._lookup = SimilarityCatalog(catalog)
        self._neighbours = neighbours
        self._model_id = model_id
        self._settings = settings

    def answer(self, request: SimilarityRequest, retrieve_ae_title: str) -> list[Dataset]:
        """The ranked matches as C-FIND identifiers; :class:`NotSearchable` says why none can be."""
        if self._neighbours is None or self._model_id is None:
            raise NotSearchable("similarity search is off: no model is configured (model.bundle)")
        return self.answer_vectors(request, self._query_vectors(request, self._model_id), retrieve_ae_title)

    def answer_vectors(
        self, request: SimilarityRequest, query: QueryVectors, retrieve_ae_title: str
    ) -> list[Dataset]:
        """The ranked matches of embeddings given as they are (an image that is not stored:
        ``precedent similar FILE``); the query's study and patient pks may be -1 (none)."""
        if self._neighbours is None or self._model_id is None:
            raise NotSearchable("similarity search is off: no model is configured (model.bundle)")
        matches = self._ranked(request, query, self._neighbours)
        findings = self._findings(request.level, [match.pk for _, (match, _) in matches])
        return [
            self._identifier(request, match, rank, row, findings.get(match.pk), retrieve_ae_title)
            for rank, (match, row) in matches
        ]

    def _findings(self, level: Level, pks: list[int]) -> dict[int, tuple[str, float]]:
        """The model's finding of each match, in one read for all of them."""
        assert self._model_id is not None
        if level == Level.STUDY:
            return self._lookup.study_findings(pks, self._model_id)
        return self._lookup.image_findings(pks, self._model_id)

    def _query_vectors(self, request: SimilarityRequest, model_id: str) -> QueryVectors:
        if request.level == Level.STUDY:
            study = self._lookup.study(request.uid)
            if study is None:
                raise NotSearchable(f"study {request.uid} is not stored here")
            vectors = self._lookup.vectors_of_study(*study, model_id)
        else:
            image = self._lookup.image(request.uid)
            if image is None:
                raise NotSearchable(f"image {request.uid} is not stored here")
            vectors = self._lookup.vectors_of_image(image, model_id)
        if not vectors.instance_pks:
            raise NotSearchable(f"{request.level.value.lower()} {request.uid} is not analysed yet")
        return vectors

    def _ranked(
        self, request: SimilarityRequest, query: QueryVectors, neighbours: Neighbours
    ) -> list[tuple[int, tuple[Match, Row[Any]]]]:
        wanted = request.k
        while True:
            found = neighbours.search(query.vectors, wanted, exclude=query.instance_pks)
            candidates = self._candidates(request, query, found)
            rows = self._filtered(request, [m.pk for m in candidates])
            kept = [(m, rows[m.pk]) for m in candidates if m.pk in rows][: request.k]
            exhausted = all(len(hits) < wanted for hits in found) or wanted >= len(neighbours)
            if len(kept) >= request.k or exhausted:
                return list(enumerate(kept, start=1))
            wanted = min(wanted * _WIDEN, len(neighbours))

    def _candidates(
        self, request: SimilarityRequest, query: QueryVectors, found: Sequence[Sequence[tuple[int, float]]]
    ) -> list[Match]:
        """The neighbours that may be matches, best first: at STUDY level the best pair of
        images per study."""
        located = self._lookup.locate(pk for hits in found for pk, _ in hits)
        query_uids = dict(zip(query.instance_pks, self._uids(query.instance_pks), strict=True))
        best: dict[int, Match] = {}
        for query_pk, hits in zip(query.instance_pks, found, strict=True):
            for pk, distance in hits:
                where = located.get(pk)
                if where is None or where.study_pk == query.study_pk:
                    continue
                if where.patient_pk == query.patient_pk and not self._settings.same_patient:
                    continue
                key = where.study_pk if request.level == Level.STUDY else pk
                if key not in best or distance < best[key].distance:
                    best[key] = Match(key, distance, where.sop_instance_uid, query_uids[query_pk])
        return sorted(best.values(), key=lambda m: (m.distance, m.pk))

    def _uids(self, instance_pks: Sequence[int]) -> list[str]:
        located = self._lookup.locate(instance_pks)
        return [located[pk].sop_instance_uid if pk in located else "" for pk in instance_pks]

    def _filtered(self, request: SimilarityRequest, pks: list[int]) -> dict[int, Row[Any]]:
        """The candidates the request's other keys let through, with their response rows."""
        if not pks:
            return {}
        statement = request.filters.statement().where(request.filters.id_column().in_(pks))
        rows = {}
        for row in self._catalog.stream(statement):
            rows[int(row[0])] = row
        return rows

    def _identifier(
        self,
        request: SimilarityRequest,
        match: Match,
        rank: int,
        row: Row[Any],
        finding: tuple[str, float] | None,
        retrieve_ae_title: str,
    ) -> Dataset:
        assert self._model_id is not None
        identifier = request.filters.response(row, retrieve_ae_title)
        block = identifier.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
        block.add_new(RANK_OFFSET, "US", rank)
        block.add_new(DISTANCE_OFFSET, "FD", float(match.distance))
        if finding is not None:
            block.add_new(FINDING_OFFSET, "LO", finding[0])
            block.add_new(PROBABILITY_OFFSET, "FD", finding[1])
        block.add_new(MATCHED_IMAGE_OFFSET, "UI", match.matched_image)
        if match.query_image:
            block.add_new(QUERY_IMAGE_OFFSET, "UI", match.query_image)
        block.add_new(METRIC_OFFSET, "CS", self._settings.metric.upper())
        block.add_new(MODEL_OFFSET, "LO", self._model_id[:64])
        return identifier
