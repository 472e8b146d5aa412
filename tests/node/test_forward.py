"""Forwarding: each queued object reaches each destination once, whatever the destination does.

The node's object store and catalog hold a few real instances; each test queues them for a
destination (as the results step does) and runs the destination's forwarder round by round.
The destinations are real peers: pynetdicom storage SCPs answering what the test tells them,
DCMTK's storescp (accepting everything, or only some SOP classes), and a port nobody
listens on.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom import dcmread, uid
from pydicom.dataset import Dataset
from sqlalchemy import select

from node.catalog.deliveries import DONE, FAILED, PENDING, DeliveryQueue
from node.catalog.models import DELIVERIES, INSTANCES
from node.catalog.recording import Catalog
from node.forward import DestinationForwarder, echo, new_ae
from node.header import read_instance_header
from node.settings import Destination, ForwardingSettings
from node.storage import ObjectStore
from tests.support.data import PYDICOM_DATA_DIR, write_instance
from tests.support.nodes import free_port
from tests.support.peers import picky_storescp, storage_scp, storescp

QUICK = ForwardingSettings(
    poll_seconds=0.05, retry_backoff_seconds=0.2, max_backoff_seconds=0.4, timeout_seconds=5
)
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
ROOT = "1.2.826.0.1.3680043.10.5433"


@dataclass
class Holding:
    """A node's store and catalog with some instances, and their queue."""

    store: ObjectStore
    catalog: Catalog
    queue: DeliveryQueue
    uids: list[str]

    def queue_for(self, destination: Destination, uids: list[str] | None = None) -> None:
        with self.catalog.transaction() as connection:
            pks = connection.execute(
                select(INSTANCES.c.id).where(INSTANCES.c.sop_instance_uid.in_(uids or self.uids))
            ).scalars()
            self.queue.request(connection, list(pks), [destination.name])

    def rows(self) -> list[tuple[str, str, int, int | None, str]]:
        """(SOP Instance UID, state, attempts, status, reason) of every delivery row."""
        d = DELIVERIES.c
        with self.catalog.connection() as connection:
            found = connection.execute(
                select(INSTANCES.c.sop_instance_uid, d.state, d.attempts, d.status, d.reason)
                .join(INSTANCES, INSTANCES.c.id == d.instance_pk)
                .order_by(d.id)
            ).all()
        return [(row[0], row[1], row[2], row[3], row[4]) for row in found]

    def forwarder(
        self, destination: Destination, settings: ForwardingSettings = QUICK
    ) -> DestinationForwarder:
        return DestinationForwarder(
            destination, self.queue, self.store, new_ae("PRECEDENT", settings), settings
        )


def _stored(store: ObjectStore, catalog: Catalog, source: Path) -> str:
    header = read_instance_header(source)
    stored = store.place(source, header.sop_instance_uid)
    assert catalog.add_instance(header, stored, "MODALITY")
    return header.sop_instance_uid


def _sr_file(path: Path, uid: str) -> Path:
    """A small SR header: an object of another SOP class than the images."""
    return write_instance(
        path,
        SOPClassUID=SR_CLASS,
        SOPInstanceUID=uid,
        StudyInstanceUID="1.2.826.0.1.3680043.10.5433.77.1",
        SeriesInstanceUID="1.2.826.0.1.3680043.10.5433.77.2",
        PatientID="FWD",
        PatientName="FORWARD^TEST",
        Modality="SR",
    )


@pytest.fixture
def holding(tmp_path: Path, catalog_url: str) -> Iterator[Holding]:
    store = ObjectStore(tmp_path / "data", fsync=False, min_free_bytes=0)
    store.prepare()
    catalog = Catalog.open(catalog_url)
    uids = []
    for n in range(3):
        source = tmp_path / f"us{n}.dcm"
        ds = dcmread(PYDICOM_DATA_DIR / "OBXXXX1A.dcm")
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid.UID(f"{ROOT}.78.{n}")
        ds.save_as(source)
        uids.append(_stored(store, catalog, source))
    uids.append(_stored(store, catalog, _sr_file(tmp_path / "sr.dcm", "1.2.826.0.1.3680043.10.5433.79.1")))
    try:
        yield Holding(store, catalog, DeliveryQueue(catalog), uids)
    finally:
        catalog.close()


def _destination(port: int, ae_title: str = "DEST") -> Destination:
    return Destination(name="pacs", ae_title=ae_title, host="127.0.0.1", port=port)


def test_each_object_is_delivered_once_with_its_status(holding: Holding) -> None:
    port = free_port()
    destination = _destination(port)
    holding.queue_for(destination)
    holding.queue_for(destination)  # queued twice: still one row per object and destination
    with storage_scp(port, "DEST") as scp:
        assert holding.forwarder(destination).run_once() == 4
        assert holding.forwarder(destination).run_once() == 0
    assert sorted(r.sop_instance_uid for r in scp.received) == sorted(holding.uids)
    assert [(state, status) for _, state, _, status, _ in holding.rows()] == [(DONE, 0)] * 4


def test_an_unreachable_destination_gets_everything_once_it_is_back(holding: Holding) -> None:
    port = free_port()
    destination = _destination(port)
    holding.queue_for(destination)
    forwarder = holding.forwarder(destination)
    assert forwarder.run_once() == 0  # nobody listens
    rows = holding.rows()
    assert {state for _, state, _, _, _ in rows} == {PENDING}
    assert all("cannot be reached" in reason for *_, reason in rows)
    assert forwarder.run_once() == 0  # not due yet: backoff
    assert {attempts for _, _, attempts, _, _ in holding.rows()} == {1}
    with storage_scp(port, "DEST") as scp:
        deadline = time.monotonic() + 10
        while any(state != DONE for _, state, *_ in holding.rows()) and time.monotonic() < deadline:
            forwarder.run_once()
            time.sleep(0.05)
    assert sorted(r.sop_instance_uid for r in scp.received) == sorted(holding.uids)
    assert {state for _, state, *_ in holding.rows()} == {DONE}


def test_a_refused_object_is_recorded_with_the_status_given_and_not_resent(holding: Holding) -> None:
    port = free_port()
    destination = _destination(port)
    holding.queue_for(destination)
    refused_uid = holding.uids[1]

    def status_of(dataset: Dataset) -> int:
        return 0xA700 if dataset.SOPInstanceUID == refused_uid else 0xB000

    with storage_scp(port, "DEST", status_of=status_of) as scp:
        forwarder = holding.forwarder(destination)
        forwarder.run_once()
        forwarder.run_once()
    assert [r.sop_instance_uid for r in scp.received].count(refused_uid) == 1
    by_uid = {uid: (state, status, reason) for uid, state, _, status, reason in holding.rows()}
    assert by_uid[refused_uid][:2] == (FAILED, 0xA700)
    assert "0xA700" in by_uid[refused_uid][2]
    assert {by_uid[u][:2] for u in holding.uids if u != refused_uid} == {(DONE, 0xB000)}


def test_a_destination_without_the_sop_class_refuses_only_those_objects(
    holding: Holding, tmp_path: Path
) -> None:
    port = free_port()
    destination = _destination(port, "PICKY")
    holding.queue_for(destination)
    with picky_storescp(port, tmp_path / "picky", {"UltrasoundImageStorage": "Uncompressed"}) as received:
        holding.forwarder(destination).run_once()
        files = sorted(p.name for p in received.iterdir())
    by_uid = {uid: (state, reason) for uid, state, _, _, reason in holding.rows()}
    assert by_uid[holding.uids[3]][0] == FAILED
    assert "no usable presentation context" in by_uid[holding.uids[3]][1]
    assert {by_uid[u][0] for u in holding.uids[:3]} == {DONE}
    assert len(files) == 3


def test_a_claim_whose_forwarder_died_is_sent_again_after_its_lease(holding: Holding) -> None:
    port = free_port()
    destination = _destination(port)
    holding.queue_for(destination, holding.uids[:1])
    claim, due = holding.queue.claim_due(destination.name, 10, lease_seconds=0.2)
    assert len(due) == 1
    assert holding.queue.claim_due(destination.name, 10, lease_seconds=0.2)[1] == []  # held
    time.sleep(0.3)
    with storage_scp(port, "DEST") as scp:
        holding.forwarder(destination).run_once()
    assert [r.sop_instance_uid for r in scp.received] == holding.uids[:1]
    holding.queue.delivered(claim, due[0].delivery_id, 0)  # the dead claim's late answer
    assert [(state, attempts) for _, state, attempts, _, _ in holding.rows()] == [(DONE, 2)]


def test_status_shows_each_destination_queue(holding: Holding) -> None:
    up, down = (
        _destination(free_port()),
        Destination(name="down", ae_title="DOWN", host="127.0.0.1", port=free_port()),
    )
    holding.queue_for(up, holding.uids[:2])
    holding.queue_for(down, holding.uids[:1])
    with storage_scp(up.port, "DEST"):
        holding.forwarder(up).run_once()
    holding.forwarder(down).run_once()
    states = {s.destination: s for s in holding.queue.states(["pacs", "down"])}
    assert states["pacs"].counts == {DONE: 2}
    assert states["pacs"].last_delivered_at is not None
    assert states["down"].counts == {PENDING: 1}
    assert "cannot be reached" in states["down"].last_failure
    assert states["down"].next_attempt_at is not None


def test_echo_tells_a_live_destination_from_a_missing_one(tmp_path: Path) -> None:
    port = free_port()
    ae = new_ae("PRECEDENT", QUICK)
    with storescp(port, tmp_path / "received"):
        live = echo(_destination(port), ae)
    missing = echo(_destination(free_port()), ae)
    assert live.ok and live.detail == "C-ECHO Success"
    assert not missing.ok and "cannot be reached" in missing.detail
