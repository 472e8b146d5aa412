"""Similarity C-FIND: a viewer asks the similarity AE title for the studies or images most
like a stored one, and gets them ranked, filtered and described.

The node's catalog holds analysed studies whose embeddings the test chose (clustered
random vectors, one cluster per finding), written as the analysis stage writes them; the
ground truth is the same search done with numpy. Requests come from DCMTK's findscu and,
where statuses and Error Comments are read, from a pynetdicom SCU.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore[attr-defined]
from sqlalchemy import insert

from node.catalog.analyses import AnalysisRecords, ModelRecord
from node.catalog.models import ANALYSES, EMBEDDINGS, STUDY_ASSESSMENTS
from node.catalog.recording import Catalog
from node.header import read_instance_header
from node.similar import DISTANCE_OFFSET, FINDING_OFFSET, PRIVATE_CREATOR, PRIVATE_GROUP, RANK_OFFSET
from node.storage import StoredFile
from tests.support.data import write_instance
from tests.support.dcmtk import findscu
from tests.support.models import LABELS, tiny_bundle
from tests.support.nodes import RunningNode, free_port, node_settings, running_node
from workers.bundles import load_bundle

ROOT = "1.2.826.0.1.3680043.10.5433.90"
DIM = 32
STUDIES = 24
IMAGES = 2
UNABLE_TO_PROCESS, IDENTIFIER_MISMATCH = 0xC000, 0xA900


@dataclass(frozen=True)
class Image:
    uid: str
    study: int
    vector: np.ndarray
    label: str


@dataclass
class Holding:
    node: RunningNode
    images: list[Image]
    patient_of: dict[int, int]
    catalog_url: str
    model_id: str

    def study_uid(self, study: int) -> str:
        return f"{ROOT}.{study}"

    def expected_studies(
        self, query: int, k: int, allowed: set[int] | None = None
    ) -> list[tuple[int, float]]:
        """The k studies nearest to ``query`` by best image pair (cosine), other patients only."""
        mine = [im for im in self.images if im.study == query]
        best: dict[int, float] = {}
        for other in self.images:
            if self.patient_of[other.study] == self.patient_of[query]:
                continue
            if allowed is not None and other.study not in allowed:
                continue
            distance = min(_cosine_distance(m.vector, other.vector) for m in mine)
            best[other.study] = min(distance, best.get(other.study, 2.0))
        return sorted(best.items(), key=lambda item: item[1])[:k]


def _cosine_distance(a: np.ndarray, b: np.ndarray) -> float:
    return float(1 - a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _header(tmp_path: Path, study: int, image: int, patient: int) -> Path:
    return write_instance(
        tmp_path / f"s{study}-i{image}.dcm",
        SOPClassUID="1.2.840.10008.5.1.4.1.1.6.1",
        SOPInstanceUID=f"{ROOT}.{study}.1.{image}",
        StudyInstanceUID=f"{ROOT}.{study}",
        SeriesInstanceUID=f"{ROOT}.{study}.1",
        PatientID=f"PAT-{patient}",
        PatientName=f"SIMILAR^{patient}",
        StudyDate=f"2025{1 + study % 12:02d}01",
        AccessionNumber=f"ACC{study:03d}",
        Modality="US" if study % 3 else "MG",
        Rows=64,
        Columns=64,
    )


def _fill(catalog: Catalog, tmp_path: Path, model_id: str) -> tuple[list[Image], dict[int, int]]:
    """Studies of 2 images each, every study of one finding, written as analysis writes them;
    studies 0 and 1 share a patient."""
    rng = np.random.default_rng(7)
    centres = {label: rng.normal(size=DIM) * 3 for label in LABELS}
    AnalysisRecords(catalog).register_model(ModelRecord(model_id, "cnn4", LABELS, False, {}))
    images, patient_of = [], {}
    now = datetime.now(UTC)
    for study in range(STUDIES):
        label = LABELS[study % 3]
        patient_of[study] = 0 if study == 1 else study
        for image in range(IMAGES):
            header = read_instance_header(_header(tmp_path, study, image, patient_of[study]))
            catalog.add_instance(header, StoredFile(PurePosixPath(f"x/{study}-{image}.dcm"), 1), "TEST")
            vector = (centres[label] + rng.normal(size=DIM)).astype(np.float32)
            images.append(Image(header.sop_instance_uid, study, vector, label))
    with catalog.transaction() as connection:
        pk_of = {
            uid: pk
            for pk, uid in connection.exec_driver_sql("SELECT id, sop_instance_uid FROM instances").all()
        }
        for image in images:
            probabilities = dict.fromkeys(LABELS, 0.1) | {image.label: 0.8}
            connection.execute(
                insert(ANALYSES).values(
                    instance_pk=pk_of[image.uid],
                    model_id=model_id,
                    state="done",
                    reason="",
                    attempts=1,
                    requested_at=now,
                    predicted_label=image.label,
                    probabilities=probabilities,
                )
            )
            connection.execute(
                insert(EMBEDDINGS).values(
                    instance_pk=pk_of[image.uid],
                    model_id=model_id,
                    dimension=DIM,
                    vector=image.vector.astype("<f4").tobytes(),
                    created_at=now,
                )
            )
        study_pks = dict(connection.exec_driver_sql("SELECT study_instance_uid, id FROM studies").all())
        for study in range(STUDIES):
            connection.execute(
                insert(STUDY_ASSESSMENTS).values(
                    study_pk=study_pks[f"{ROOT}.{study}"],
                    model_id=model_id,
                    revision=1,
                    state="done",
                    reason="",
                    attempts=1,
                    requested_at=now,
                    finding=LABELS[study % 3],
                    probability=0.8,
                    analysed_instances=IMAGES,
                )
            )
    return images, patient_of


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_bundle(tmp_path_factory.mktemp("model") / "cnn4.bundle")


@contextlib.contextmanager
def _holding(directory: Path, bundle: Path) -> Iterator[Holding]:
    url = f"sqlite:///{directory / 'catalog.sqlite3'}"
    model_id = load_bundle(bundle).id
    catalog = Catalog.open(url)
    images, patient_of = _fill(catalog, directory, model_id)
    catalog.close()
    settings = node_settings(
        directory / "data",
        free_port(),
        url,
        model={"bundle": str(bundle)},
        queue={"serve_workers": 0},
        similarity={"sync_seconds": 0.1, "k": 5},
    )
    with running_node(settings) as node:
        holding = Holding(node, images, patient_of, url, model_id)
        _wait_for_index(holding)
        yield holding


@pytest.fixture(scope="module")
def holding(tmp_path_factory: pytest.TempPathFactory, bundle: Path) -> Iterator[Holding]:
    """A node the tests only query: shared by the module."""
    with _holding(tmp_path_factory.mktemp("similar"), bundle) as made:
        yield made


@pytest.fixture
def own_holding(tmp_path: Path, bundle: Path) -> Iterator[Holding]:
    """A node the test may change."""
    with _holding(tmp_path, bundle) as made:
        yield made


def _wait_for_index(holding: Holding) -> None:
    deadline = time.monotonic() + 30
    while len(holding.node.node.index or []) < STUDIES * IMAGES:
        assert time.monotonic() < deadline, "the similarity index never filled"
        time.sleep(0.05)


def similar_find(holding: Holding, tmp_path: Path, *keys: str) -> list[Dataset]:
    run = findscu(holding.node.port, keys, tmp_path / "rsp", called="PRECEDENT_SIM")
    assert run.returncode == 0, run.output
    return run.responses


def c_find(holding: Holding, request: Dataset) -> list[tuple[int, str, Dataset | None]]:
    ae = AE(ae_title="PYFIND")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", holding.node.port, ae_title="PRECEDENT_SIM")
    assert assoc.is_established
    try:
        return [
            (int(status.Status), str(status.get("ErrorComment", "")), found)
            for status, found in assoc.send_c_find(request, StudyRootQueryRetrieveInformationModelFind)
        ]
    finally:
        assoc.release()


def _private(response: Dataset, offset: int) -> object:
    return response.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)[offset].value


def _study_number(response: Dataset) -> int:
    return int(str(response.StudyInstanceUID).rsplit(".", 1)[1])


def test_study_level_answers_the_nearest_studies_ranked_as_numpy_finds_them(
    holding: Holding, tmp_path: Path
) -> None:
    responses = similar_find(
        holding, tmp_path, "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={holding.study_uid(4)}", "PatientID"
    )
    expected = holding.expected_studies(4, 5)
    assert [_study_number(r) for r in responses] == [study for study, _ in expected]
    assert [_private(r, RANK_OFFSET) for r in responses] == [1, 2, 3, 4, 5]
    distances = [float(_private(r, DISTANCE_OFFSET)) for r in responses]  # type: ignore[arg-type]
    assert distances == pytest.approx([d for _, d in expected], abs=1e-5)
    assert all(str(_private(r, FINDING_OFFSET)) == LABELS[_study_number(r) % 3] for r in responses)
    assert all(r.PatientID for r in responses)


def test_the_nearest_study_is_of_the_same_finding_more_often_than_chance(
    holding: Holding, tmp_path: Path
) -> None:
    same = 0
    for study in range(STUDIES):
        responses = similar_find(
            holding, tmp_path, "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={holding.study_uid(study)}"
        )
        same += str(_private(responses[0], FINDING_OFFSET)) == LABELS[study % 3]
    assert same / STUDIES > 0.6  # chance: 1/3


def test_the_query_study_and_by_default_its_patient_are_never_matches(
    holding: Holding, tmp_path: Path
) -> None:
    responses = similar_find(
        holding, tmp_path, "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={holding.study_uid(0)}", "PatientID"
    )
    numbers = {_study_number(r) for r in responses}
    assert 0 not in numbers and 1 not in numbers  # study 1 is the same patient's
    assert len(numbers) == 5


def test_other_keys_filter_the_matches(holding: Holding, tmp_path: Path) -> None:
    responses = similar_find(
        holding,
        tmp_path,
        "QueryRetrieveLevel=STUDY",
        f"StudyInstanceUID={holding.study_uid(5)}",
        "ModalitiesInStudy=MG",
        "AccessionNumber",
    )
    mg = {s for s in range(STUDIES) if s % 3 == 0}
    assert [_study_number(r) for r in responses] == [s for s, _ in holding.expected_studies(5, 5, mg)]
    assert all(r.ModalitiesInStudy == "MG" for r in responses)


def test_k_can_be_asked_for_in_the_private_block(holding: Holding) -> None:
    request = Dataset()
    request.QueryRetrieveLevel = "STUDY"
    request.StudyInstanceUID = holding.study_uid(6)
    request.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True).add_new(0x10, "US", 3)
    responses = c_find(holding, request)
    assert [status for status, _, _ in responses] == [0xFF00] * 3 + [0x0000]


def test_image_level_answers_the_nearest_images_of_other_studies(holding: Holding, tmp_path: Path) -> None:
    query = holding.images[10]
    responses = similar_find(
        holding, tmp_path, "QueryRetrieveLevel=IMAGE", f"SOPInstanceUID={query.uid}", "StudyInstanceUID"
    )
    others = [im for im in holding.images if holding.patient_of[im.study] != holding.patient_of[query.study]]
    expected = sorted(others, key=lambda im: _cosine_distance(query.vector, im.vector))[:5]
    assert [str(r.SOPInstanceUID) for r in responses] == [im.uid for im in expected]


@pytest.mark.parametrize(
    ("keys", "status", "comment"),
    [
        ({"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": f"{ROOT}.999"}, UNABLE_TO_PROCESS, "not stored"),
        ({"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": f"{ROOT}.*"}, IDENTIFIER_MISMATCH, "one stored"),
        ({"QueryRetrieveLevel": "STUDY"}, IDENTIFIER_MISMATCH, "StudyInstanceUID"),
        (
            {"QueryRetrieveLevel": "SERIES", "SeriesInstanceUID": "1.2.3"},
            IDENTIFIER_MISMATCH,
            "STUDY or IMAGE",
        ),
        ({"QueryRetrieveLevel": "IMAGE", "SOPInstanceUID": f"{ROOT}.1.9.9"}, UNABLE_TO_PROCESS, "not stored"),
    ],
)
def test_requests_that_cannot_be_answered_get_a_reason(
    holding: Holding, keys: dict[str, str], status: int, comment: str
) -> None:
    request = Dataset()
    for keyword, value in keys.items():
        setattr(request, keyword, value)
    responses = c_find(holding, request)
    assert len(responses) == 1
    assert responses[0][0] == status and responses[0][2] is None
    assert comment in responses[0][1]


@pytest.mark.parametrize("k", [0, 101])
def test_k_out_of_range_is_refused(holding: Holding, k: int) -> None:
    request = Dataset()
    request.QueryRetrieveLevel = "STUDY"
    request.StudyInstanceUID = holding.study_uid(6)
    request.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True).add_new(0x10, "US", k)
    [(status, comment, _)] = c_find(holding, request)
    assert status == UNABLE_TO_PROCESS and "similarity.max_k" in comment


def test_a_stored_study_not_analysed_yet_is_said_so_and_new_embeddings_are_found_within_a_second(
    own_holding: Holding, tmp_path: Path
) -> None:
    holding = own_holding
    catalog = Catalog.open(holding.catalog_url)
    try:
        header = read_instance_header(_header(tmp_path, 50, 0, 50))
        catalog.add_instance(header, StoredFile(PurePosixPath("x/50.dcm"), 1), "TEST")
        request = Dataset()
        request.QueryRetrieveLevel = "STUDY"
        request.StudyInstanceUID = holding.study_uid(50)
        [(status, comment, _)] = c_find(holding, request)
        assert status == UNABLE_TO_PROCESS and "not analysed yet" in comment
        # Its embedding is the same as study 7's first image: the nearest study becomes study 50.
        with catalog.transaction() as connection:
            pk = connection.exec_driver_sql(
                f"SELECT id FROM instances WHERE sop_instance_uid = '{header.sop_instance_uid}'"
            ).scalar_one()
            connection.execute(
                insert(EMBEDDINGS).values(
                    instance_pk=pk,
                    model_id=holding.model_id,
                    dimension=DIM,
                    vector=holding.images[14].vector.astype("<f4").tobytes(),
                    created_at=datetime.now(UTC),
                )
            )
        committed = time.monotonic()
        while True:
            responses = similar_find(
                holding, tmp_path, "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={holding.study_uid(7)}"
            )
            if _study_number(responses[0]) == 50:
                break
            assert time.monotonic() - committed < 1.0, "new embedding not searchable within a second"
    finally:
        catalog.close()
