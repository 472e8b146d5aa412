"""C-MOVE and C-GET: real peers retrieve what real files pushed into a node hold.

The node holds one study of eight real images (pydicom-data), one per stored encoding:
uncompressed explicit, implicit and big endian, RLE, JPEG Lossless, JPEG 2000, JPEG-LS;
ultrasound, enhanced MR and secondary capture. Its UIDs are rewritten so that every file
is its own instance. Beside it: a study with an image whose JPEG 2000 data cannot be
decoded, and a study of many small instances for C-CANCEL.

Peers: DCMTK's movescu and getscu ask; DCMTK's storescp (accepting everything, or only
what a profile lists), an Orthanc and pynetdicom SCPs receive. pynetdicom SCUs ask where
the test must read a status's counts and Failed SOP Instance UID List, or send C-CANCEL.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread, uid
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pynetdicom import AE, _config, build_role, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from node.retrieve import keep_responses
from node.settings import Settings
from tests.support.data import PYDICOM_DATA_DIR, transfer_syntax_of, write_instance
from tests.support.dcmtk import getscu, group_by_transfer_syntax, movescu, storescu
from tests.support.nodes import RunningNode, free_port, node_settings, running_node
from tests.support.peers import orthanc, picky_storescp, storage_scp, storescp
from tests.support.postgres import scratch_database

STUDY_MOVE = StudyRootQueryRetrieveInformationModelMove
STUDY_GET = StudyRootQueryRetrieveInformationModelGet
PATIENT_MOVE = PatientRootQueryRetrieveInformationModelMove
PATIENT_GET = PatientRootQueryRetrieveInformationModelGet

SUCCESS, PENDING, CANCEL, WARNING = 0x0000, 0xFF00, 0xFE00, 0xB000
SUBOPERATIONS_FAILED = 0xA702
DESTINATION_UNKNOWN = 0xA801
MISMATCH, UNABLE_TO_PROCESS = 0xA900, 0xC000

ROOT = "1.2.826.0.1.3680043.10.5433"
MIX, BROKEN, BULK = 1, 2, 3
BULK_SIZE = 300

# Series of the MIX study: the source file and what it exercises.
MIX_SERIES = {
    1: "OBXXXX1A.dcm",  # US, Explicit VR Little Endian
    2: "gdcm-US-ALOKA-16.dcm",  # US, Implicit VR Little Endian
    3: "OBXXXX1A_expb.dcm",  # US, Explicit VR Big Endian (retired)
    4: "OBXXXX1A_rle.dcm",  # US, RLE Lossless
    5: "JPGLosslessP14SV1_1s_1f_8b.dcm",  # US, JPEG Lossless SV1
    6: "US1_J2KR.dcm",  # US, JPEG 2000 Lossless
    7: "emri_small_jpeg_ls_lossless.dcm",  # Enhanced MR, JPEG-LS Lossless
    8: "JPEG-LL.dcm",  # Secondary Capture, JPEG Lossless SV1
}
JPEG_LOSSLESS_SERIES = (5, 8)


def uid_of(*parts: int) -> str:
    return ".".join([ROOT, *map(str, parts)])


@dataclass(frozen=True)
class Site:
    """A node holding the corpus, and the ports its destinations listen on when started."""

    node: RunningNode
    files: dict[str, Path]  # SOP Instance UID → the file pushed
    ports: dict[str, int]  # destination AE title → port

    @property
    def port(self) -> int:
        return self.node.port

    def instances(self, study: int, *series: int) -> set[str]:
        """The SOP Instance UIDs of a study, or of some of its series."""
        held = {u: tuple(map(int, u.removeprefix(ROOT + ".").split("."))) for u in self.files}
        return {u for u, (st, se, _) in held.items() if st == study and (not series or se in series)}


def rewritten(source: Path, target: Path, study: int, series: int, instance: int) -> Path:
    """``source`` as a new instance of our own study and series, its encoding untouched."""
    dataset = dcmread(source)
    dataset.PatientID = f"RT-{study}"
    dataset.PatientName = f"Retrieve^{study}"
    dataset.StudyInstanceUID = uid_of(study)
    dataset.SeriesInstanceUID = uid_of(study, series)
    dataset.SOPInstanceUID = uid_of(study, series, instance)
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    dataset.SeriesNumber = series
    dataset.InstanceNumber = instance
    dataset.save_as(target)
    return target


def corpus(directory: Path) -> list[Path]:
    files = [
        rewritten(PYDICOM_DATA_DIR / name, directory / f"mix-{series}.dcm", MIX, series, 1)
        for series, name in MIX_SERIES.items()
    ]
    # A JPEG 2000 image whose code stream is zeros after its first two markers: stored as
    # sent, never decodable; beside it a sound uncompressed one.
    broken = rewritten(PYDICOM_DATA_DIR / "US1_J2KR.dcm", directory / "broken-1.dcm", BROKEN, 1, 1)
    dataset = dcmread(broken)
    dataset.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(60)])
    dataset.save_as(broken)
    files.append(broken)
    files.append(rewritten(PYDICOM_DATA_DIR / "OBXXXX1A.dcm", directory / "broken-2.dcm", BROKEN, 1, 2))
    for number in range(1, BULK_SIZE + 1):
        files.append(
            write_instance(
                directory / f"bulk-{number}.dcm",
                SOPClassUID=uid.SecondaryCaptureImageStorage,
                SOPInstanceUID=uid_of(BULK, 1, number),
                StudyInstanceUID=uid_of(BULK),
                SeriesInstanceUID=uid_of(BULK, 1),
                PatientID=f"RT-{BULK}",
                Modality="OT",
                InstanceNumber=number,
            )
        )
    return files


DESTINATIONS = ("STORESCP", "PICKY", "REFUSER", "SINK", "ORTHANC", "DOWN")


def start_site(stack: ExitStack, base: Path, catalog_url: str = "", **sections: dict[str, object]) -> Site:
    ports = {title: free_port() for title in DESTINATIONS}  # DOWN: nothing ever listens
    destinations = [
        {"name": title.lower(), "ae_title": title, "host": "127.0.0.1", "port": port}
        for title, port in ports.items()
    ]
    settings = node_settings(base / "data", free_port(), catalog_url, **sections)
    settings = Settings(**{**settings.model_dump(), "destinations": destinations})
    node = stack.enter_context(running_node(settings))
    (base / "corpus").mkdir()
    files = corpus(base / "corpus")
    syntax_of = {path: str(transfer_syntax_of(path)) for path in files}
    for syntax, group in group_by_transfer_syntax(files, syntax_of).items():
        run = storescu(node.port, group, propose=syntax)
        assert len(run.acknowledged) == len(group), run.output[-2000:]
    by_uid = {str(dcmread(path, stop_before_pixels=True).SOPInstanceUID): path for path in files}
    return Site(node, by_uid, ports)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """One node for the module, on SQLite, holding the corpus."""
    with ExitStack() as stack:
        yield start_site(stack, tmp_path_factory.mktemp("retrieve"))


# --- helpers ------------------------------------------------------------------------------------


def identifier(**keys: object) -> Dataset:
    dataset = Dataset()
    for keyword, value in keys.items():
        setattr(dataset, keyword, value)
    return dataset


def study(number: int) -> Dataset:
    return identifier(QueryRetrieveLevel="STUDY", StudyInstanceUID=uid_of(number))


Responses = list[tuple[Dataset, Dataset | None]]


def c_move(
    port: int, query: Dataset, destination: str, model: str = STUDY_MOVE, calling: str = "PYMOVE"
) -> Responses:
    ae = AE(ae_title=calling)
    ae.add_requested_context(model)
    assoc = ae.associate("127.0.0.1", port, ae_title="PRECEDENT")
    assert assoc.is_established
    try:
        return list(assoc.send_c_move(query, destination, model))
    finally:
        assoc.release()


@dataclass
class GetRun:
    responses: Responses
    received: dict[str, Dataset]  # SOP Instance UID → the data set, with its file meta


def c_get(
    port: int,
    query: Dataset,
    storage: Sequence[tuple[str, Sequence[str]]],
    model: str = STUDY_GET,
    calling: str = "PYGET",
    scp_role: bool = True,
) -> GetRun:
    """A pynetdicom C-GET proposing each (SOP class, transfer syntaxes) in ``storage``, with
    the SCP role unless told not to."""
    received: dict[str, Dataset] = {}

    def on_store(event: Event) -> int:
        dataset = event.dataset
        dataset.file_meta = event.file_meta
        _ = dataset.get("PixelData")  # read now: pynetdicom removes the received file after
        received[str(dataset.SOPInstanceUID)] = dataset
        return SUCCESS

    ae = AE(ae_title=calling)
    ae.add_requested_context(model)
    for sop_class, syntaxes in storage:
        ae.add_requested_context(sop_class, list(syntaxes))
    roles = [build_role(sop_class, scp_role=True) for sop_class in dict.fromkeys(c for c, _ in storage)]
    roles = roles if scp_role else []
    assoc = ae.associate(
        "127.0.0.1", port, ae_title="PRECEDENT", ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    assert assoc.is_established
    try:
        return GetRun(list(assoc.send_c_get(query, model)), received)
    finally:
        assoc.release()


def final(responses: Responses) -> tuple[Dataset, Dataset | None]:
    status, found = responses[-1]
    assert all(int(s.Status) == PENDING for s, _ in responses[:-1])
    return status, found


def counts(status: Dataset) -> tuple[int, int, int]:
    """(completed, failed, warning) sub-operations of a response."""
    return (
        int(status.NumberOfCompletedSuboperations),
        int(status.NumberOfFailedSuboperations),
        int(status.NumberOfWarningSuboperations),
    )


def failed_list(found: Dataset | None) -> set[str]:
    assert found is not None
    value = found.get("FailedSOPInstanceUIDList", [])
    return {str(v) for v in ([value] if isinstance(value, str) else value) if v}


def read_all(paths: Sequence[Path]) -> dict[str, Dataset]:
    return {str(ds.SOPInstanceUID): ds for ds in map(dcmread, paths)}


# --- C-MOVE with DCMTK and Orthanc ----------------------------------------------------------------


def test_movescu_to_storescp_sends_every_instance_as_stored(site: Site, tmp_path: Path) -> None:
    with storescp(site.ports["STORESCP"], tmp_path / "received") as directory:
        run = movescu(site.port, ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={uid_of(MIX)}"], "STORESCP")
    assert run.final == "Success", run.output[-3000:]
    assert run.statuses.count("Pending") == len(MIX_SERIES)
    received = read_all(sorted(directory.iterdir()))
    assert set(received) == site.instances(MIX)
    for sop_instance_uid, dataset in received.items():
        source = dcmread(site.files[sop_instance_uid])
        # Proposed in its own syntax, accepted so by storescp: sent as stored, bit for bit.
        assert dataset.file_meta.TransferSyntaxUID == source.file_meta.TransferSyntaxUID
        assert dataset.PixelData == source.PixelData, sop_instance_uid


def test_movescu_to_orthanc(site: Site, tmp_path: Path) -> None:
    with orthanc(tmp_path / "orthanc", site.ports["ORTHANC"], free_port(), modalities={}) as pacs:
        run = movescu(site.port, ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={uid_of(MIX)}"], "ORTHANC")
        assert run.final == "Success", run.output[-3000:]
        held = pacs.instances()
        assert set(held) == site.instances(MIX)
        j2k = uid_of(MIX, 6, 1)
        assert (
            dcmread(_bytes_file(tmp_path, pacs.file(held[j2k]))).PixelData
            == dcmread(site.files[j2k]).PixelData
        )


def _bytes_file(directory: Path, content: bytes) -> Path:
    path = directory / "from-orthanc.dcm"
    path.write_bytes(content)
    return path


def test_orthanc_finds_and_retrieves_from_the_node_as_a_viewer_would(site: Site, tmp_path: Path) -> None:
    """Orthanc's own Query/Retrieve, with the node as a remote modality: its C-FIND finds
    the study, its C-MOVE has the node send the study to Orthanc."""
    modalities = {"precedent": ["PRECEDENT", "127.0.0.1", site.port]}
    with orthanc(tmp_path / "orthanc", site.ports["ORTHANC"], free_port(), modalities=modalities) as pacs:
        query = pacs.post(
            "/modalities/precedent/query", {"Level": "Study", "Query": {"StudyInstanceUID": uid_of(BROKEN)}}
        )
        assert pacs.get(f"/queries/{query['ID']}/answers") == ["0"]
        pacs.post(f"/queries/{query['ID']}/retrieve", {"TargetAet": "ORTHANC", "Synchronous": True})
        assert set(pacs.instances()) == site.instances(BROKEN)


# --- C-GET with DCMTK ---------------------------------------------------------------------------------


def test_getscu_without_compressed_syntaxes_receives_everything_transcoded(
    site: Site, tmp_path: Path
) -> None:
    run = getscu(site.port, ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={uid_of(MIX)}"], tmp_path / "got")
    assert run.final == "Success", run.output[-3000:]
    received = read_all(run.files)
    assert set(received) == site.instances(MIX)  # the UIDs are kept through transcoding
    for sop_instance_uid, dataset in received.items():
        source = dcmread(site.files[sop_instance_uid])
        assert dataset.file_meta.TransferSyntaxUID == uid.ExplicitVRLittleEndian
        assert np.array_equal(dataset.pixel_array, source.pixel_array), sop_instance_uid


def test_getscu_proposing_jpeg_lossless_receives_it_as_stored(site: Site, tmp_path: Path) -> None:
    series = "\\".join(uid_of(MIX, s) for s in JPEG_LOSSLESS_SERIES)
    keys = ["QueryRetrieveLevel=SERIES", f"StudyInstanceUID={uid_of(MIX)}", f"SeriesInstanceUID={series}"]
    run = getscu(site.port, keys, tmp_path / "got", "+xs")
    assert run.final == "Success", run.output[-3000:]
    received = read_all(run.files)
    assert set(received) == site.instances(MIX, *JPEG_LOSSLESS_SERIES)
    for sop_instance_uid, dataset in received.items():
        assert dataset.file_meta.TransferSyntaxUID == uid.JPEGLosslessSV1
        assert dataset.PixelData == dcmread(site.files[sop_instance_uid]).PixelData


def test_getscu_of_an_undecodable_image_without_its_syntax_reports_the_failure(
    site: Site, tmp_path: Path
) -> None:
    run = getscu(
        site.port, ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={uid_of(BROKEN)}"], tmp_path / "got"
    )
    assert run.final == "Warning: SubOperationsCompleteOneOrMoreFailures", run.output[-3000:]
    assert set(read_all(run.files)) == {uid_of(BROKEN, 1, 2)}


# --- C-GET statuses (pynetdicom) ----------------------------------------------------------------------

US, UNCOMPRESSED = uid.UltrasoundImageStorage, [uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian]


def test_c_get_counts_an_undecodable_image_as_failed_and_lists_it(site: Site) -> None:
    run = c_get(site.port, study(BROKEN), [(US, UNCOMPRESSED)])
    status, found = final(run.responses)
    assert int(status.Status) == WARNING
    assert counts(status) == (1, 1, 0)
    assert failed_list(found) == {uid_of(BROKEN, 1, 1)}
    assert set(run.received) == {uid_of(BROKEN, 1, 2)}

    only_broken = identifier(
        QueryRetrieveLevel="IMAGE",
        StudyInstanceUID=uid_of(BROKEN),
        SeriesInstanceUID=uid_of(BROKEN, 1),
        SOPInstanceUID=uid_of(BROKEN, 1, 1),
    )
    status, found = final(c_get(site.port, only_broken, [(US, UNCOMPRESSED)]).responses)
    assert (int(status.Status), counts(status)) == (SUBOPERATIONS_FAILED, (0, 1, 0))
    assert "cannot decode" in str(status.ErrorComment)
    assert failed_list(found) == {uid_of(BROKEN, 1, 1)}

    # Offered in its own syntax, it goes as stored: the node decodes only what it must.
    run = c_get(site.port, only_broken, [(US, [uid.JPEG2000Lossless])])
    status, _ = final(run.responses)
    assert (int(status.Status), counts(status)) == (SUCCESS, (1, 0, 0))
    assert run.received[uid_of(BROKEN, 1, 1)].file_meta.TransferSyntaxUID == uid.JPEG2000Lossless


def test_c_get_of_a_class_the_requestor_did_not_offer_fails_those_instances(site: Site) -> None:
    run = c_get(site.port, study(MIX), [(US, UNCOMPRESSED)])
    status, found = final(run.responses)
    not_us = site.instances(MIX, 7, 8)
    assert int(status.Status) == WARNING
    assert counts(status) == (len(MIX_SERIES) - 2, 2, 0)
    assert failed_list(found) == not_us
    assert set(run.received) == site.instances(MIX) - not_us
    pending = [s for s, _ in run.responses[:-1]]
    assert [int(s.NumberOfRemainingSuboperations) for s in pending] == list(
        range(len(MIX_SERIES) - 1, -1, -1)
    )


def test_c_get_sends_only_where_the_requestor_took_the_scp_role(site: Site) -> None:
    run = c_get(site.port, study(BROKEN), [(US, UNCOMPRESSED)], scp_role=False)
    status, found = final(run.responses)
    assert (int(status.Status), counts(status), run.received) == (SUBOPERATIONS_FAILED, (0, 2, 0), {})
    assert "no usable presentation context" in str(status.ErrorComment)
    assert failed_list(found) == site.instances(BROKEN)


def test_c_get_converts_big_endian_and_implicit_to_the_accepted_syntax(site: Site) -> None:
    series = identifier(
        QueryRetrieveLevel="SERIES",
        StudyInstanceUID=uid_of(MIX),
        SeriesInstanceUID=[uid_of(MIX, 2), uid_of(MIX, 3)],
    )
    run = c_get(site.port, series, [(US, [uid.ImplicitVRLittleEndian])])
    status, _ = final(run.responses)
    assert (int(status.Status), counts(status)) == (SUCCESS, (2, 0, 0))
    for sop_instance_uid, dataset in run.received.items():
        source = dcmread(site.files[sop_instance_uid])
        assert dataset.file_meta.TransferSyntaxUID == uid.ImplicitVRLittleEndian
        assert np.array_equal(dataset.pixel_array, source.pixel_array)
        if sop_instance_uid == uid_of(MIX, 3, 1):  # big endian: an OW value besides the pixels
            little = dcmread(PYDICOM_DATA_DIR / "OBXXXX1A.dcm")  # the same image, little endian
            assert dataset.RedPaletteColorLookupTableData == little.RedPaletteColorLookupTableData


def test_patient_root_retrieves_a_patient_and_an_image_list(site: Site) -> None:
    patient = identifier(QueryRetrieveLevel="PATIENT", PatientID=f"RT-{BROKEN}")
    run = c_get(site.port, patient, [(US, [uid.JPEG2000Lossless]), (US, UNCOMPRESSED)], PATIENT_GET)
    assert set(run.received) == site.instances(BROKEN)
    assert {str(ds.file_meta.TransferSyntaxUID) for ds in run.received.values()} == {
        uid.JPEG2000Lossless,
        uid.ExplicitVRLittleEndian,
    }
    images = identifier(
        QueryRetrieveLevel="IMAGE",
        PatientID=f"RT-{MIX}",
        StudyInstanceUID=uid_of(MIX),
        SeriesInstanceUID=uid_of(MIX, 1),
        SOPInstanceUID=[uid_of(MIX, 1, 1), uid_of(MIX, 1, 9)],  # the second is not held
    )
    run = c_get(site.port, images, [(US, UNCOMPRESSED)], PATIENT_GET)
    assert (int(final(run.responses)[0].Status), set(run.received)) == (SUCCESS, {uid_of(MIX, 1, 1)})


def test_nothing_matched_is_an_empty_success(site: Site) -> None:
    status, found = final(c_get(site.port, study(99), [(US, UNCOMPRESSED)]).responses)
    assert (int(status.Status), counts(status), bool(found)) == (SUCCESS, (0, 0, 0), False)


@pytest.mark.parametrize(
    ("keys", "status", "comment"),
    [
        ({"QueryRetrieveLevel": "STUDY"}, MISMATCH, "StudyInstanceUID"),
        ({"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": ""}, MISMATCH, "StudyInstanceUID"),
        ({"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": f"{ROOT}.*"}, MISMATCH, "StudyInstanceUID"),
        ({"QueryRetrieveLevel": "SERIES", "SeriesInstanceUID": uid_of(MIX, 1)}, MISMATCH, "StudyInstanceUID"),
        ({"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "1.2.x"}, UNABLE_TO_PROCESS, "not a UID"),
        ({"QueryRetrieveLevel": "WARD", "StudyInstanceUID": uid_of(MIX)}, MISMATCH, "QueryRetrieveLevel"),
    ],
)
def test_identifiers_that_do_not_fit_are_refused_with_a_reason(
    site: Site, keys: dict[str, object], status: int, comment: str, caplog: pytest.LogCaptureFixture
) -> None:
    for responses in (
        c_move(site.port, identifier(**keys), "STORESCP"),
        c_get(site.port, identifier(**keys), [(US, UNCOMPRESSED)]).responses,
    ):
        assert len(responses) == 1
        got, found = responses[0]
        assert (int(got.Status), bool(found)) == (status, False)
        assert comment in str(got.ErrorComment)
    assert any(r.levelname == "WARNING" and "C-MOVE" in r.message for r in caplog.records)
    assert any(r.levelname == "WARNING" and "C-GET" in r.message for r in caplog.records)


def test_the_similarity_ae_title_does_not_retrieve(site: Site) -> None:
    ae = AE(ae_title="PYMOVE")
    ae.add_requested_context(STUDY_MOVE)
    assoc = ae.associate("127.0.0.1", site.port, ae_title="PRECEDENT_SIM")
    assert assoc.is_established
    try:
        (response,) = assoc.send_c_move(study(MIX), "STORESCP", STUDY_MOVE)
    finally:
        assoc.release()
    assert int(response[0].Status) == UNABLE_TO_PROCESS
    assert "PRECEDENT" in str(response[0].ErrorComment)


# --- C-MOVE statuses ----------------------------------------------------------------------------------


def test_an_unknown_destination_is_refused_with_a801(site: Site, caplog: pytest.LogCaptureFixture) -> None:
    responses = c_move(site.port, study(MIX), "NOBODY")
    assert len(responses) == 1
    status, _ = responses[0]
    assert int(status.Status) == DESTINATION_UNKNOWN
    assert "NOBODY" in str(status.ErrorComment)
    assert any("NOBODY" in r.message and r.levelname == "WARNING" for r in caplog.records)
    # DCMTK names it too.
    run = movescu(site.port, ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={uid_of(MIX)}"], "NOBODY")
    assert "MoveDestinationUnknown" in run.final, run.output[-2000:]


def test_a_destination_that_is_down_fails_every_sub_operation_with_a_reason(site: Site) -> None:
    status, _ = final(c_move(site.port, study(MIX), "DOWN"))
    assert int(status.Status) == SUBOPERATIONS_FAILED
    assert counts(status) == (0, len(MIX_SERIES), 0)
    assert "DOWN" in str(status.ErrorComment) and "cannot be reached" in str(status.ErrorComment)


def test_a_destination_refusing_some_sop_classes_gets_a_warning_with_the_failed_list(
    site: Site, tmp_path: Path
) -> None:
    """storescp accepting ultrasound in any syntax, enhanced MR uncompressed only, and no
    secondary capture: MR goes transcoded, SC fails."""
    accepts = {"UltrasoundImageStorage": "Any", "EnhancedMRImageStorage": "Uncompressed"}
    with picky_storescp(site.ports["PICKY"], tmp_path / "picky", accepts) as directory:
        status, found = final(c_move(site.port, study(MIX), "PICKY"))
        assert int(status.Status) == WARNING
        assert counts(status) == (len(MIX_SERIES) - 1, 1, 0)
        assert failed_list(found) == site.instances(MIX, 8)
        received = read_all(sorted(directory.iterdir()))
        assert set(received) == site.instances(MIX) - site.instances(MIX, 8)
        (mr,) = site.instances(MIX, 7)
        assert received[mr].file_meta.TransferSyntaxUID in UNCOMPRESSED
        assert np.array_equal(received[mr].pixel_array, dcmread(site.files[mr]).pixel_array)

        # Only what it refuses: every sub-operation failed.
        status, found = final(c_move(site.port, study(BULK), "PICKY"))
        assert int(status.Status) == SUBOPERATIONS_FAILED
        assert counts(status) == (0, BULK_SIZE, 0)
        assert failed_list(found) == site.instances(BULK)


def test_a_destination_answering_failure_for_some_instances(site: Site) -> None:
    refused = uid_of(MIX, 4, 1)

    def status_of(dataset: Dataset) -> int:
        return 0xA700 if dataset.SOPInstanceUID == refused else (0xB000 if dataset.SeriesNumber == 2 else 0)

    with storage_scp(site.ports["REFUSER"], "REFUSER", status_of) as scp:
        status, found = final(c_move(site.port, study(MIX), "REFUSER", calling="ORIGIN"))
    assert int(status.Status) == WARNING
    assert counts(status) == (len(MIX_SERIES) - 2, 1, 1)  # one refused, one stored with a warning
    assert failed_list(found) == {refused}
    assert {r.sop_instance_uid for r in scp.received} == site.instances(MIX)
    # Each sub-operation names who asked for the move (PS3.7 9.1.1.1).
    assert {(r.move_originator, r.move_originator_id) for r in scp.received} == {("ORIGIN", 1)}


def test_c_cancel_stops_a_move_and_reports_what_remains(site: Site) -> None:
    ae = AE(ae_title="PYMOVE")
    ae.add_requested_context(STUDY_MOVE)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    with storage_scp(site.ports["SINK"], "SINK", delay=0.01) as scp:
        assoc = ae.associate("127.0.0.1", site.port, ae_title="PRECEDENT")
        assert assoc.is_established
        context_id = next(cx.context_id for cx in assoc.accepted_contexts if cx.abstract_syntax == STUDY_MOVE)
        try:
            statuses: list[Dataset] = []
            for status, _ in assoc.send_c_move(study(BULK), "SINK", STUDY_MOVE, msg_id=9):
                statuses.append(status)
                if len(statuses) == 1:
                    assoc.send_c_cancel(9, context_id)
            last = statuses[-1]
            assert int(last.Status) == CANCEL
            completed, failed, _ = counts(last)
            remaining = int(last.NumberOfRemainingSuboperations)
            assert remaining > 0 and completed + failed + remaining == BULK_SIZE
            assert len(scp.received) == completed
            # The association goes on.
            found = list(assoc.send_c_find(study(BULK), StudyRootQueryRetrieveInformationModelFind))
            assert [int(s.Status) for s, _ in found] == [PENDING, SUCCESS]
        finally:
            assoc.release()


def test_c_cancel_stops_a_get(site: Site) -> None:
    ae = AE(ae_title="PYGET")
    ae.add_requested_context(STUDY_GET)
    ae.add_requested_context(uid.SecondaryCaptureImageStorage, UNCOMPRESSED)
    assoc = ae.associate(
        "127.0.0.1",
        site.port,
        ae_title="PRECEDENT",
        ext_neg=[build_role(uid.SecondaryCaptureImageStorage, scp_role=True)],
        evt_handlers=[(evt.EVT_C_STORE, lambda event: SUCCESS)],
    )
    assert assoc.is_established
    context_id = next(cx.context_id for cx in assoc.accepted_contexts if cx.abstract_syntax == STUDY_GET)
    try:
        statuses = []
        for status, _ in assoc.send_c_get(study(BULK), STUDY_GET, msg_id=11):
            statuses.append(status)
            if len(statuses) == 1:
                assoc.send_c_cancel(11, context_id)
        assert int(statuses[-1].Status) == CANCEL
        assert int(statuses[-1].NumberOfRemainingSuboperations) > 0
    finally:
        assoc.release()


def test_a_response_taken_by_pynetdicoms_reactor_is_put_back_for_the_send(site: Site) -> None:
    """The race :func:`node.retrieve.keep_responses` closes, played by hand: the
    association's reactor thread hands the C-STORE response it took to its request
    handler, which must queue it for the send waiting on it, not drop it."""
    with storage_scp(site.ports["SINK"], "SINK"):
        ae = AE(ae_title="PRECEDENT")
        ae.add_requested_context(US)
        assoc = ae.associate("127.0.0.1", site.ports["SINK"], ae_title="SINK")
        assert assoc.is_established
        try:
            keep_responses(assoc)
            response = C_STORE()
            response.MessageIDBeingRespondedTo = 5
            response.AffectedSOPClassUID = US
            response.AffectedSOPInstanceUID = uid_of(MIX, 1, 1)
            response.Status = SUCCESS
            assoc._serve_request(response, 1)
            assert assoc.dimse.msg_queue.get_nowait() == (1, response)
        finally:
            assoc.release()


def test_retrieval_logs_a_summary(site: Site, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="node.handlers")
    c_get(site.port, study(BROKEN), [(US, UNCOMPRESSED)])
    (summary,) = [r.message for r in caplog.records if "C-GET from PYGET" in r.message]
    assert "STUDY level: 2 instance(s): 1 completed, 1 failed, 0 warning" in summary
    assert any(uid_of(BROKEN, 1, 1) in r.message and r.levelname == "WARNING" for r in caplog.records)


# --- PostgreSQL ---------------------------------------------------------------------------------------


def test_retrieval_from_a_postgresql_catalog(tmp_path: Path) -> None:
    with ExitStack() as stack:
        url = stack.enter_context(scratch_database())
        site = start_site(stack, tmp_path, url)
        with storescp(site.ports["STORESCP"], tmp_path / "received") as directory:
            status, _ = final(c_move(site.port, study(MIX), "STORESCP"))
        assert (int(status.Status), counts(status)) == (SUCCESS, (len(MIX_SERIES), 0, 0))
        assert set(read_all(sorted(directory.iterdir()))) == site.instances(MIX)


def test_c_get_when_only_known_storage_classes_are_accepted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``dicom.accept_private_sop_classes`` off, pynetdicom negotiates storage contexts
    from the node's own list: role selection must still give a C-GET requestor the SCP role."""
    monkeypatch.setattr(_config, "UNRESTRICTED_STORAGE_SERVICE", _config.UNRESTRICTED_STORAGE_SERVICE)
    settings = node_settings(tmp_path / "data", free_port(), dicom={"accept_private_sop_classes": False})
    with running_node(settings) as node:
        source = rewritten(PYDICOM_DATA_DIR / "OBXXXX1A.dcm", tmp_path / "one.dcm", MIX, 1, 1)
        assert len(storescu(node.port, [source]).acknowledged) == 1
        run = c_get(node.port, study(MIX), [(US, UNCOMPRESSED)])
        assert (int(final(run.responses)[0].Status), set(run.received)) == (SUCCESS, {uid_of(MIX, 1, 1)})
        status, _ = final(c_get(node.port, study(MIX), [(US, UNCOMPRESSED)], scp_role=False).responses)
        assert int(status.Status) == SUBOPERATIONS_FAILED
