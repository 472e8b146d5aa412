"""C-FIND: DCMTK's findscu (and pynetdicom, for statuses and C-CANCEL) query a node that was
sent a small catalog with controlled attributes by storescu, on SQLite and on PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom import uid
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
)

from tests.support.data import write_instance
from tests.support.dcmtk import findscu, storescu
from tests.support.nodes import RunningNode, free_port, node_settings, running_node
from tests.support.postgres import scratch_database

STUDY_ROOT = StudyRootQueryRetrieveInformationModelFind
PATIENT_ROOT = PatientRootQueryRetrieveInformationModelFind
PENDING, CANCEL, SUCCESS = 0xFF00, 0xFE00, 0x0000
MISMATCH = 0xA900  # Identifier does not match SOP class
UNABLE_TO_PROCESS = 0xC000

ROOT = "1.2.826.0.1.3680043.10.5432"
SOP_CLASS = {
    "US": uid.UltrasoundImageStorage,
    "MG": uid.DigitalMammographyXRayImageStorageForPresentation,
    "SR": uid.BasicTextSRStorage,
    "OT": uid.SecondaryCaptureImageStorage,
}
BULK = 300  # instances in one series, for C-CANCEL: far more than can be sent before it lands


def uid_of(*parts: int) -> str:
    return ".".join([ROOT, *map(str, parts)])


@dataclass(frozen=True)
class Study:
    patient_id: str
    date: str
    time: str
    accession: str
    series: tuple[tuple[str, int], ...]  # (modality, number of instances)


PATIENTS = {
    "PID-1": {"PatientName": "Doe^Jane", "PatientBirthDate": "19700101", "PatientSex": "F"},
    "PID-2": {"PatientName": "Müller^Anna", "PatientBirthDate": "19800202", "PatientSex": "F"},
    "PID-3": {"PatientName": "DOE^JOHN", "PatientBirthDate": "", "PatientSex": "M"},
    "BULK": {"PatientName": "Bulk^Many", "PatientBirthDate": "", "PatientSex": "O"},
}
STUDIES = {
    1: Study("PID-1", "20200115", "093000", "ACC_1", (("US", 2), ("SR", 1))),
    2: Study("PID-1", "20201231", "235959", "ACC%2", (("MG", 3),)),
    3: Study("PID-2", "20210601", "120000", "ACCX1", (("US", 1),)),
    4: Study("PID-3", "", "", "B-1", (("MG", 1),)),
    5: Study("BULK", "19990101", "080000", "BULK", (("OT", BULK),)),
}
STUDY_OF = {uid_of(number): number for number in STUDIES}


def seed_files(directory: Path) -> list[Path]:
    files = []
    for number, study in STUDIES.items():
        for series_number, (modality, count) in enumerate(study.series, start=1):
            for instance_number in range(1, count + 1):
                instance_uid = uid_of(number, series_number, instance_number)
                files.append(
                    write_instance(
                        directory / f"{instance_uid}.dcm",
                        SOPClassUID=SOP_CLASS[modality],
                        SOPInstanceUID=instance_uid,
                        StudyInstanceUID=uid_of(number),
                        SeriesInstanceUID=uid_of(number, series_number),
                        PatientID=study.patient_id,
                        **PATIENTS[study.patient_id],
                        StudyDate=study.date,
                        StudyTime=study.time,
                        AccessionNumber=study.accession,
                        StudyDescription=f"study {number}",
                        Modality=modality,
                        SeriesNumber=series_number,
                        InstanceNumber=instance_number,
                    )
                )
    return files


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def node(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningNode]:
    """One node per catalog backend for the whole module, holding the studies above."""
    base = tmp_path_factory.mktemp(f"query-{request.param}")
    with ExitStack() as stack:
        if request.param == "sqlite":
            url = f"sqlite:///{base / 'catalog.sqlite3'}"
        else:
            url = stack.enter_context(scratch_database())
        running = stack.enter_context(running_node(node_settings(base / "data", free_port(), url)))
        (base / "seed").mkdir()
        files = seed_files(base / "seed")
        run = storescu(running.port, files, propose=uid.ExplicitVRLittleEndian)
        assert len(run.acknowledged) == len(files), run.output[-2000:]
        yield running


def find(node: RunningNode, tmp_path: Path, *keys: str, model: str = "-S") -> list[Dataset]:
    run = findscu(node.port, keys, tmp_path / "responses", model=model)
    assert run.returncode == 0, run.output[-2000:]
    assert "Received Final Find Response (Success)" in run.output, run.output[-2000:]
    return run.responses


def studies(responses: Sequence[Dataset]) -> list[int]:
    return sorted(STUDY_OF[str(r.StudyInstanceUID)] for r in responses)


def study_query(node: RunningNode, tmp_path: Path, *keys: str) -> list[int]:
    return studies(find(node, tmp_path, "QueryRetrieveLevel=STUDY", "StudyInstanceUID", *keys))


def c_find(
    node: RunningNode,
    identifier: Dataset,
    sop_class: str = STUDY_ROOT,
    called: str = "PRECEDENT",
) -> list[tuple[int, str, Dataset | None]]:
    """A C-FIND from pynetdicom: every response's status, Error Comment and identifier."""
    ae = AE(ae_title="PYFIND")
    ae.add_requested_context(sop_class)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=called)
    assert assoc.is_established
    try:
        return [
            (int(status.Status), str(status.get("ErrorComment", "")), found)
            for status, found in assoc.send_c_find(identifier, sop_class)
        ]
    finally:
        assoc.release()


def identifier(**keys: object) -> Dataset:
    dataset = Dataset()
    for keyword, value in keys.items():
        setattr(dataset, keyword, value)
    return dataset


# --- matching ---------------------------------------------------------------------------------


def test_single_value_matching_finds_exactly_the_equal_values(node: RunningNode, tmp_path: Path) -> None:
    assert study_query(node, tmp_path, "PatientID=PID-1") == [1, 2]
    assert study_query(node, tmp_path, "AccessionNumber=ACC_1") == [1]
    assert study_query(node, tmp_path, "PatientSex=M") == [4]
    # Case-sensitive, except for person names.
    assert study_query(node, tmp_path, "AccessionNumber=acc_1") == []
    assert study_query(node, tmp_path, "PatientName=doe^jane") == [1, 2]


def test_no_match_is_an_empty_success(node: RunningNode, tmp_path: Path) -> None:
    assert find(node, tmp_path, "QueryRetrieveLevel=STUDY", "PatientID=NOBODY") == []
    responses = c_find(node, identifier(QueryRetrieveLevel="STUDY", PatientID="NOBODY"))
    assert [status for status, _, _ in responses] == [SUCCESS]


def test_wildcards_star_and_question_mark(node: RunningNode, tmp_path: Path) -> None:
    assert study_query(node, tmp_path, "PatientName=Doe*") == [1, 2, 4]
    assert study_query(node, tmp_path, "PatientName=D?e^J?ne") == [1, 2]
    assert study_query(node, tmp_path, "PatientID=PID-?") == [1, 2, 3, 4]
    assert study_query(node, tmp_path, "AccessionNumber=*1") == [1, 3, 4]
    assert study_query(node, tmp_path, "AccessionNumber=*") == [1, 2, 3, 4, 5]
    assert study_query(node, tmp_path, "PatientName=Bulk*") == [5]


def test_sql_wildcard_characters_in_a_value_match_only_themselves(node: RunningNode, tmp_path: Path) -> None:
    # Unescaped, "_" would match the X of ACCX1 and "%" every ACC...
    assert study_query(node, tmp_path, "AccessionNumber=ACC_*") == [1]
    assert study_query(node, tmp_path, "AccessionNumber=ACC%*") == [2]
    assert study_query(node, tmp_path, "AccessionNumber=ACC%2") == [2]
    assert study_query(node, tmp_path, "AccessionNumber=?CC_1") == [1]


def test_date_ranges_closed_open_and_single(node: RunningNode, tmp_path: Path) -> None:
    assert study_query(node, tmp_path, "StudyDate=20200101-20201231") == [1, 2]
    assert study_query(node, tmp_path, "StudyDate=20201231-") == [2, 3]
    assert study_query(node, tmp_path, "StudyDate=-20200115") == [1, 5]
    assert study_query(node, tmp_path, "StudyDate=20210601") == [3]
    assert study_query(node, tmp_path, "StudyDate=20220101-") == []
    # A study without a date matches only universal matching.
    assert study_query(node, tmp_path, "StudyDate") == [1, 2, 3, 4, 5]


def test_time_ranges_include_the_whole_unit_of_their_upper_bound(node: RunningNode, tmp_path: Path) -> None:
    assert study_query(node, tmp_path, "StudyTime=0900-1000") == [1]
    assert study_query(node, tmp_path, "StudyTime=-0930") == [1, 5]
    assert study_query(node, tmp_path, "StudyTime=12-") == [2, 3]
    assert study_query(node, tmp_path, "StudyTime=-23") == [1, 2, 3, 5]
    combined = study_query(node, tmp_path, "StudyDate=20200101-20211231", "StudyTime=-1200")
    assert combined == [1, 3]


def test_a_list_of_uids_matches_any_of_them(node: RunningNode, tmp_path: Path) -> None:
    assert study_query(node, tmp_path, f"StudyInstanceUID={uid_of(1)}\\{uid_of(3)}") == [1, 3]
    assert study_query(node, tmp_path, f"StudyInstanceUID={uid_of(2)}") == [2]
    assert study_query(node, tmp_path, f"StudyInstanceUID={uid_of(9)}\\{uid_of(4)}") == [4]


# --- return keys ------------------------------------------------------------------------------


def test_every_requested_key_comes_back_with_its_value_or_empty(node: RunningNode, tmp_path: Path) -> None:
    (response,) = find(
        node,
        tmp_path,
        "QueryRetrieveLevel=STUDY",
        f"StudyInstanceUID={uid_of(1)}",
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "StudyDescription",
        "InstitutionName",  # not a key the node holds: returned empty
    )
    assert str(response.PatientName) == "Doe^Jane"
    assert response.PatientID == "PID-1"
    assert response.PatientBirthDate == "19700101"
    assert (response.StudyDate, response.StudyTime) == ("20200115", "093000")
    assert response.AccessionNumber == "ACC_1"
    assert response.StudyDescription == "study 1"
    assert "InstitutionName" in response and not response.InstitutionName
    assert response.QueryRetrieveLevel == "STUDY"
    assert response.RetrieveAETitle == "PRECEDENT"
    assert "SpecificCharacterSet" not in response  # all ASCII


def test_non_ascii_values_come_back_in_utf8(node: RunningNode, tmp_path: Path) -> None:
    (response,) = study_query_responses(node, tmp_path, "PatientID=PID-2", "PatientName")
    assert response.SpecificCharacterSet == "ISO_IR 192"
    assert str(response.PatientName) == "Müller^Anna"


def study_query_responses(node: RunningNode, tmp_path: Path, *keys: str) -> list[Dataset]:
    return find(node, tmp_path, "QueryRetrieveLevel=STUDY", "StudyInstanceUID", *keys)


def test_study_computed_keys(node: RunningNode, tmp_path: Path) -> None:
    responses = study_query_responses(
        node,
        tmp_path,
        "PatientID=PID-1",
        "NumberOfStudyRelatedSeries",
        "NumberOfStudyRelatedInstances",
        "ModalitiesInStudy",
    )
    by_study = {STUDY_OF[str(r.StudyInstanceUID)]: r for r in responses}
    assert set(by_study) == {1, 2}
    assert (by_study[1].NumberOfStudyRelatedSeries, by_study[1].NumberOfStudyRelatedInstances) == (2, 3)
    assert list(by_study[1].ModalitiesInStudy) == ["SR", "US"]
    assert (by_study[2].NumberOfStudyRelatedSeries, by_study[2].NumberOfStudyRelatedInstances) == (1, 3)
    assert by_study[2].ModalitiesInStudy == "MG"


def test_modalities_in_study_matches_a_study_with_any_series_of_them(
    node: RunningNode, tmp_path: Path
) -> None:
    assert study_query(node, tmp_path, "ModalitiesInStudy=US") == [1, 3]
    assert study_query(node, tmp_path, "ModalitiesInStudy=SR") == [1]
    assert study_query(node, tmp_path, "ModalitiesInStudy=MG") == [2, 4]
    assert study_query(node, tmp_path, "ModalitiesInStudy=US\\MG") == [1, 2, 3, 4]
    assert study_query(node, tmp_path, "ModalitiesInStudy=CT") == []


def test_sop_classes_in_study_lists_and_matches_the_instances_classes(
    node: RunningNode, tmp_path: Path
) -> None:
    (response,) = find(
        node, tmp_path, "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={uid_of(1)}", "SOPClassesInStudy"
    )
    assert sorted(response.SOPClassesInStudy) == sorted([SOP_CLASS["US"], SOP_CLASS["SR"]])
    assert study_query(node, tmp_path, f"SOPClassesInStudy={SOP_CLASS['MG']}") == [2, 4]
    assert study_query(node, tmp_path, f"SOPClassesInStudy={SOP_CLASS['SR']}\\{SOP_CLASS['OT']}") == [1, 5]


# --- levels and information models -------------------------------------------------------------


def test_series_level_under_a_study(node: RunningNode, tmp_path: Path) -> None:
    responses = find(
        node,
        tmp_path,
        "QueryRetrieveLevel=SERIES",
        f"StudyInstanceUID={uid_of(1)}",
        "SeriesInstanceUID",
        "Modality",
        "SeriesNumber",
        "NumberOfSeriesRelatedInstances",
    )
    found = sorted(
        (r.SeriesInstanceUID, r.Modality, r.SeriesNumber, r.NumberOfSeriesRelatedInstances) for r in responses
    )
    assert found == [(uid_of(1, 1), "US", 1, 2), (uid_of(1, 2), "SR", 2, 1)]
    assert all(r.QueryRetrieveLevel == "SERIES" for r in responses)
    modality = find(
        node,
        tmp_path,
        "QueryRetrieveLevel=SERIES",
        f"StudyInstanceUID={uid_of(1)}",
        "SeriesInstanceUID",
        "Modality=SR",
    )
    assert [r.SeriesInstanceUID for r in modality] == [uid_of(1, 2)]


def test_image_level_under_a_series(node: RunningNode, tmp_path: Path) -> None:
    responses = find(
        node,
        tmp_path,
        "QueryRetrieveLevel=IMAGE",
        f"StudyInstanceUID={uid_of(2)}",
        f"SeriesInstanceUID={uid_of(2, 1)}",
        "SOPInstanceUID",
        "SOPClassUID",
        "InstanceNumber",
    )
    found = sorted((r.SOPInstanceUID, r.SOPClassUID, r.InstanceNumber) for r in responses)
    assert found == [(uid_of(2, 1, n), SOP_CLASS["MG"], n) for n in (1, 2, 3)]
    one = find(
        node,
        tmp_path,
        "QueryRetrieveLevel=IMAGE",
        f"StudyInstanceUID={uid_of(2)}",
        f"SeriesInstanceUID={uid_of(2, 1)}",
        "InstanceNumber=2",
    )
    assert [r.InstanceNumber for r in one] == [2]


def test_patient_root_patient_level_with_computed_keys(node: RunningNode, tmp_path: Path) -> None:
    responses = find(
        node,
        tmp_path,
        "QueryRetrieveLevel=PATIENT",
        "PatientID=PID-*",
        "PatientName",
        "NumberOfPatientRelatedStudies",
        "NumberOfPatientRelatedSeries",
        "NumberOfPatientRelatedInstances",
        model="-P",
    )
    found = {
        r.PatientID: (
            str(r.PatientName),
            r.NumberOfPatientRelatedStudies,
            r.NumberOfPatientRelatedSeries,
            r.NumberOfPatientRelatedInstances,
        )
        for r in responses
    }
    assert found == {
        "PID-1": ("Doe^Jane", 2, 3, 6),
        "PID-2": ("Müller^Anna", 1, 1, 1),
        "PID-3": ("DOE^JOHN", 1, 1, 1),
    }
    assert len(responses) == 3


def test_patient_root_study_level_within_a_patient(node: RunningNode, tmp_path: Path) -> None:
    responses = find(
        node, tmp_path, "QueryRetrieveLevel=STUDY", "PatientID=PID-1", "StudyInstanceUID", model="-P"
    )
    assert studies(responses) == [1, 2]


# --- refusals -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sop_class", "keys", "status", "comment"),
    [
        (STUDY_ROOT, {"PatientID": ""}, MISMATCH, "QueryRetrieveLevel"),
        (STUDY_ROOT, {"QueryRetrieveLevel": "WARD"}, MISMATCH, "not a level"),
        (STUDY_ROOT, {"QueryRetrieveLevel": "PATIENT"}, MISMATCH, "not a level"),
        (STUDY_ROOT, {"QueryRetrieveLevel": "SERIES"}, MISMATCH, "StudyInstanceUID"),
        (
            STUDY_ROOT,
            {"QueryRetrieveLevel": "SERIES", "StudyInstanceUID": "1.2.*"},
            MISMATCH,
            "StudyInstanceUID",
        ),
        (
            STUDY_ROOT,
            {"QueryRetrieveLevel": "SERIES", "StudyInstanceUID": [uid_of(1), uid_of(2)]},
            MISMATCH,
            "StudyInstanceUID",
        ),
        (
            STUDY_ROOT,
            {"QueryRetrieveLevel": "IMAGE", "StudyInstanceUID": uid_of(1)},
            MISMATCH,
            "SeriesInstanceUID",
        ),
        (PATIENT_ROOT, {"QueryRetrieveLevel": "STUDY"}, MISMATCH, "PatientID"),
        (
            PATIENT_ROOT,
            {"QueryRetrieveLevel": "SERIES", "StudyInstanceUID": uid_of(1)},
            MISMATCH,
            "PatientID",
        ),
        (
            STUDY_ROOT,
            {"QueryRetrieveLevel": "STUDY", "StudyDate": "2020-01-01"},
            UNABLE_TO_PROCESS,
            "StudyDate",
        ),
        (STUDY_ROOT, {"QueryRetrieveLevel": "STUDY", "StudyTime": "9am-"}, UNABLE_TO_PROCESS, "StudyTime"),
        (STUDY_ROOT, {"QueryRetrieveLevel": "STUDY", "StudyDate": "-"}, UNABLE_TO_PROCESS, "StudyDate"),
        (
            STUDY_ROOT,
            {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "1.2.x"},
            UNABLE_TO_PROCESS,
            "not a UID",
        ),
        (
            STUDY_ROOT,
            {"QueryRetrieveLevel": "STUDY", "AccessionNumber": ["A", "B"]},
            UNABLE_TO_PROCESS,
            "AccessionNumber",
        ),
    ],
)
def test_identifiers_that_do_not_fit_are_refused_with_a_reason(
    node: RunningNode,
    sop_class: str,
    keys: dict[str, object],
    status: int,
    comment: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    responses = c_find(node, identifier(**keys), sop_class)
    assert len(responses) == 1
    got, error_comment, found = responses[0]
    assert (got, found) == (status, None)
    assert comment in error_comment
    assert any(r.levelname == "WARNING" and "C-FIND" in r.message for r in caplog.records)


def test_the_similarity_ae_title_of_a_node_without_a_model_says_search_is_off(node: RunningNode) -> None:
    study_uid = next(iter(STUDY_OF))
    request = identifier(QueryRetrieveLevel="STUDY", StudyInstanceUID=study_uid, PatientID="")
    responses = c_find(node, request, called="PRECEDENT_SIM")
    assert [(status, found) for status, _, found in responses] == [(UNABLE_TO_PROCESS, None)]
    assert "similarity search is off" in responses[0][1]


# --- C-CANCEL -----------------------------------------------------------------------------------


def test_c_cancel_stops_the_matches_and_the_association_goes_on(node: RunningNode) -> None:
    ae = AE(ae_title="PYFIND")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="PRECEDENT")
    assert assoc.is_established
    context_id = assoc.accepted_contexts[0].context_id
    query = identifier(
        QueryRetrieveLevel="IMAGE",
        StudyInstanceUID=uid_of(5),
        SeriesInstanceUID=uid_of(5, 1),
        SOPInstanceUID="",
    )
    try:
        statuses = []
        for status, _ in assoc.send_c_find(query, STUDY_ROOT, msg_id=7):
            statuses.append(int(status.Status))
            if len(statuses) == 1:
                assoc.send_c_cancel(7, context_id)
        assert statuses[-1] == CANCEL
        assert set(statuses[:-1]) == {PENDING}
        assert len(statuses) - 1 < BULK
        # The same query, not cancelled, returns every match.
        complete = [s.Status for s, _ in assoc.send_c_find(query, STUDY_ROOT)]
        assert complete == [PENDING] * BULK + [SUCCESS]
    finally:
        assoc.release()
