"""Per-AE permissions (``dicom.permissions``): what each calling AE may ask once associated.

A modality that may only store, a viewer that may only query and retrieve, and an AE
title not listed, which may do everything. Refusals are statuses with an Error Comment
naming the setting, and a log line: 0x0124 (Refused: Not Authorized) for C-STORE, 0xC124
(an "unable to process" code) for C-FIND, C-MOVE and C-GET.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread, uid
from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    UltrasoundImageStorage,
)

from node.settings import ConfigError, Settings, load_settings
from tests.support.data import ultrasound_file
from tests.support.dcmtk import storescu
from tests.support.nodes import RunningNode, free_port, node_settings, running_node
from tests.support.peers import storage_scp

NOT_AUTHORIZED = 0x0124
NOT_PERMITTED = 0xC124
SUCCESS, PENDING = 0x0000, 0xFF00
PERMISSIONS = {"MODALITY": ["store"], "VIEWER": ["query", "retrieve"]}
FIND = StudyRootQueryRetrieveInformationModelFind
MOVE = StudyRootQueryRetrieveInformationModelMove
GET = StudyRootQueryRetrieveInformationModelGet


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningNode, int]]:
    """A node with the permissions above holding one ultrasound image, and the port of
    its one destination, SINK."""
    base = tmp_path_factory.mktemp("permissions")
    sink = free_port()
    settings = node_settings(base / "data", free_port(), dicom={"permissions": PERMISSIONS})
    destinations = [{"name": "sink", "ae_title": "SINK", "host": "127.0.0.1", "port": sink}]
    settings = Settings(**{**settings.model_dump(), "destinations": destinations})
    with running_node(settings) as running:
        run = storescu(running.port, [ultrasound_file()], calling="MODALITY")
        assert len(run.acknowledged) == 1, run.output[-2000:]
        yield running, sink


def study_uid() -> str:
    return str(dcmread(ultrasound_file(), stop_before_pixels=True).StudyInstanceUID)


def study() -> Dataset:
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study_uid()
    return query


def store(port: int, calling: str) -> Dataset:
    ae = AE(ae_title=calling)
    ae.add_requested_context(UltrasoundImageStorage, uid.ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="PRECEDENT")
    assert assoc.is_established
    try:
        return assoc.send_c_store(ultrasound_file())
    finally:
        assoc.release()


def find(port: int, calling: str) -> list[int]:
    ae = AE(ae_title=calling)
    ae.add_requested_context(FIND)
    assoc = ae.associate("127.0.0.1", port, ae_title="PRECEDENT")
    assert assoc.is_established
    try:
        return [int(status.Status) for status, _ in assoc.send_c_find(study(), FIND)]
    finally:
        assoc.release()


def retrieve(port: int, calling: str, service: str) -> list[Dataset]:
    ae = AE(ae_title=calling)
    ae.add_requested_context(MOVE if service == "move" else GET)
    ae.add_requested_context(UltrasoundImageStorage, uid.ExplicitVRLittleEndian)
    role = build_role(UltrasoundImageStorage, scp_role=True)
    handlers = [(evt.EVT_C_STORE, lambda event: SUCCESS)]
    assoc = ae.associate("127.0.0.1", port, ae_title="PRECEDENT", ext_neg=[role], evt_handlers=handlers)
    assert assoc.is_established
    try:
        if service == "move":
            return [status for status, _ in assoc.send_c_move(study(), "SINK", MOVE)]
        return [status for status, _ in assoc.send_c_get(study(), GET)]
    finally:
        assoc.release()


def refused(caplog: pytest.LogCaptureFixture, what: str, calling: str) -> bool:
    return any(
        r.levelname == "WARNING"
        and what in r.message
        and calling in r.message
        and "dicom.permissions" in r.message
        for r in caplog.records
    )


def test_an_ae_without_store_permission_is_refused_0124(
    node: tuple[RunningNode, int], caplog: pytest.LogCaptureFixture
) -> None:
    running, _ = node
    status = store(running.port, "VIEWER")
    assert int(status.Status) == NOT_AUTHORIZED
    assert str(status.ErrorComment) == "calling AE VIEWER may not store (dicom.permissions)"
    assert refused(caplog, "C-STORE", "VIEWER")
    assert int(store(running.port, "MODALITY").Status) == SUCCESS


def test_an_ae_without_query_permission_is_refused_c124(
    node: tuple[RunningNode, int], caplog: pytest.LogCaptureFixture
) -> None:
    running, _ = node
    assert find(running.port, "MODALITY") == [NOT_PERMITTED]
    assert refused(caplog, "C-FIND", "MODALITY")
    assert find(running.port, "VIEWER") == [PENDING, SUCCESS]


@pytest.mark.parametrize("service", ["move", "get"])
def test_an_ae_without_retrieve_permission_is_refused_c124(
    node: tuple[RunningNode, int], service: str, caplog: pytest.LogCaptureFixture
) -> None:
    running, sink = node
    with storage_scp(sink, "SINK") as scp:
        (status,) = retrieve(running.port, "MODALITY", service)
        assert int(status.Status) == NOT_PERMITTED
        assert "may not retrieve (dicom.permissions)" in str(status.ErrorComment)
        assert refused(caplog, f"C-{service.upper()}", "MODALITY")
        statuses = retrieve(running.port, "VIEWER", service)
        assert [int(s.Status) for s in statuses] == [PENDING, SUCCESS]
    assert len(scp.received) == (1 if service == "move" else 0)


def test_an_ae_not_listed_may_do_everything(node: tuple[RunningNode, int]) -> None:
    running, sink = node
    assert int(store(running.port, "ANYONE").Status) == SUCCESS
    assert find(running.port, "ANYONE") == [PENDING, SUCCESS]
    with storage_scp(sink, "SINK"):
        assert [int(s.Status) for s in retrieve(running.port, "ANYONE", "move")] == [PENDING, SUCCESS]


def test_permissions_are_read_from_the_file_and_checked(tmp_path: Path) -> None:
    path = tmp_path / "precedent.toml"
    path.write_text('[dicom]\npermissions = { US_ROOM1 = ["store"], VIEWER = ["query", "retrieve"] }\n')
    settings = load_settings(path).dicom
    assert settings.services_of("US_ROOM1") == {"store"}
    assert settings.services_of("VIEWER  ") == {"query", "retrieve"}
    assert settings.services_of("OTHER") == {"store", "query", "retrieve"}

    path.write_text('[dicom]\npermissions = { VIEWER = ["delete"] }\n')
    with pytest.raises(ConfigError, match=r"dicom\.permissions\.VIEWER"):
        load_settings(path)
    path.write_text('[dicom]\npermissions = { THIS_TITLE_IS_TOO_LONG = ["query"] }\n')
    with pytest.raises(ConfigError, match=r"dicom\.permissions"):
        load_settings(path)
