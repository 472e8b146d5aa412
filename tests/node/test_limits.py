"""Limits under load: how many associations at once, how long a silent peer may hold one,
and how much memory large pushes cost.

Every limit is met over real sockets: pynetdicom peers that hold associations open, raw
sockets that say nothing or stop half-way through a PDU, and DCMTK's storescu as the
modality that must be served meanwhile. Timeouts are short (1.5 to 2 s) so that the
tests see them expire; each is asserted to expire near its setting, not merely at all.
(Peers that abort on their own in the middle of a transfer, and bytes that are no DICOM,
are in test_hostile.py.)
"""

from __future__ import annotations

import io
import logging
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_primitives import A_ASSOCIATE
from sqlalchemy import create_engine, select
from sqlalchemy.pool import NullPool

from node.catalog.models import Instance
from tests.support.data import ultrasound_file
from tests.support.dcmtk import StoreRun, storescu
from tests.support.nodes import NodeProcess, RunningNode, free_port, write_config
from tests.support.waiting import wait_until
from tests.support.wire import NODE_AE, VERIFICATION, Wire, idle_association, incoming, stored_rows

ACSE_TIMEOUT = 1.5
NETWORK_TIMEOUT = 2.0
SHORT = {"acse_timeout": ACSE_TIMEOUT, "network_timeout": NETWORK_TIMEOUT, "dimse_timeout": NETWORK_TIMEOUT}
# How late past its setting a timeout may be seen on a loaded 2-core machine.
SLACK = 3.0


def seconds_until(condition: Callable[[], bool], since: float, timeout: float = 30) -> float:
    wait_until(condition, timeout, "the node acted")
    return time.monotonic() - since


@contextmanager
def a_modality_storing(running: RunningNode, calling: str = "MODALITY") -> Iterator[None]:
    """DCMTK's storescu pushing the ultrasound while the block runs; on leaving, it must
    have been told Success and the node must hold the instance."""
    runs: list[StoreRun] = []
    push = threading.Thread(
        target=lambda: runs.append(storescu(running.port, [ultrasound_file()], calling=calling, timeout=60))
    )
    push.start()
    try:
        yield
    finally:
        push.join(90)
    (run,) = runs
    assert run.acknowledged == [ultrasound_file()], run.output[-2000:]
    assert Wire.of_file(ultrasound_file()).sop_instance_uid in stored_rows(running)


# --- how many at once ---------------------------------------------------------------------------


def associate(port: int, calling: str) -> tuple[bool, list[A_ASSOCIATE]]:
    """A Verification association from ``calling``; whether it was established, and the
    A-ASSOCIATE response primitives the peer received."""
    answers: list[A_ASSOCIATE] = []

    def record(event: Event) -> None:
        if isinstance(event.primitive, A_ASSOCIATE):
            answers.append(event.primitive)

    ae = AE(ae_title=calling)
    ae.add_requested_context(VERIFICATION)
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AE, evt_handlers=[(evt.EVT_ACSE_RECV, record)])
    established = assoc.is_established
    if established:
        assoc.release()
    ae.shutdown()
    return established, answers


def test_beyond_max_associations_the_peer_is_told_transient_local_limit_until_one_ends(
    start_node: Callable[..., RunningNode],
) -> None:
    running = start_node(dicom={"max_associations": 2})
    with idle_association(running.port, "HOLDER1"), idle_association(running.port, "HOLDER2") as second:
        established, answers = associate(running.port, "THIRD")
        assert not established
        (rejection,) = answers
        # PS3.8 9.3.4: rejected-transient (2), by the DICOM UL service provider's presentation
        # related function (3), for local-limit-exceeded (2).
        assert (rejection.result, rejection.result_source, rejection.diagnostic) == (2, 3, 2)
        assert rejection.reason_str == "Local limit exceeded"

        second.release()
        wait_until(lambda: running.node.acceptor.active_associations() < 2, 10, "a slot is free")
        established, _ = associate(running.port, "THIRD")
        assert established


# --- silent peers -------------------------------------------------------------------------------


def test_a_connection_that_never_asks_to_associate_is_closed_after_acse_timeout(
    start_node: Callable[..., RunningNode],
) -> None:
    running = start_node(dicom=SHORT)
    with socket.create_connection(("127.0.0.1", running.port)) as silent:
        opened = time.monotonic()
        with a_modality_storing(running):
            silent.settimeout(30)
            assert silent.recv(1) == b"", "the node sent something to a peer that said nothing"
            closed_after = time.monotonic() - opened
    assert ACSE_TIMEOUT - 0.5 <= closed_after <= ACSE_TIMEOUT + SLACK, closed_after
    wait_until(lambda: running.node.acceptor.active_associations() == 0, 10, "its slot is free")


def test_an_association_that_falls_silent_is_aborted_after_network_timeout(
    start_node: Callable[..., RunningNode], caplog: pytest.LogCaptureFixture
) -> None:
    running = start_node(dicom=SHORT)
    caplog.set_level(logging.INFO, logger="node.handlers")
    with idle_association(running.port, "SILENT") as silent:  # its own timeouts are pynetdicom's 60 s
        established = time.monotonic()
        with a_modality_storing(running):
            aborted_after = seconds_until(lambda: not silent.is_established, established)
        assert silent.is_aborted, "the association ended otherwise than by an A-ABORT"
    assert NETWORK_TIMEOUT - 0.5 <= aborted_after <= NETWORK_TIMEOUT + SLACK, aborted_after
    assert any("association aborted: SILENT" in r.getMessage() for r in caplog.records)


def store_command_and_data(wire: Wire, context_id: int, max_pdu: int) -> list[bytes]:
    """The P-DATA-TF PDUs of one C-STORE of ``wire``, encoded as they go on the wire."""
    request = C_STORE()
    request.MessageID = 1
    request.AffectedSOPClassUID = wire.sop_class_uid
    request.AffectedSOPInstanceUID = wire.sop_instance_uid
    request.Priority = 2
    request.DataSet = io.BytesIO(wire.body)
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    pdus = []
    for fragment in message.encode_msg(context_id, max_pdu):
        pdu = P_DATA_TF()
        pdu.from_primitive(fragment)
        pdus.append(pdu.encode())
    return pdus


def test_a_peer_that_stops_in_the_middle_of_a_pdu_is_dropped_and_its_partial_file_removed(
    start_node: Callable[..., RunningNode], caplog: pytest.LogCaptureFixture
) -> None:
    """The peer sends the C-STORE request, some data and half of the next P-DATA-TF PDU,
    then nothing, and never closes: a modality whose link went away without a reset.
    (pynetdicom alone would wait inside the PDU until the peer closed the connection.)"""
    running = start_node(dicom=SHORT)
    wire = Wire.of_file(ultrasound_file())
    peer = AE(ae_title="HALFWAY")
    peer.network_timeout = peer.dimse_timeout = 60  # it must not end the connection itself
    peer.add_requested_context(wire.sop_class_uid, wire.transfer_syntax)
    assoc = peer.associate("127.0.0.1", running.port, ae_title=NODE_AE)
    assert assoc.is_established
    try:
        (context,) = assoc.accepted_contexts
        pdus = store_command_and_data(wire, int(context.context_id), assoc.acceptor.maximum_length)
        assert len(pdus) > 4, "the instance must span several PDUs"
        channel = assoc.dul.socket.socket  # type: ignore[union-attr]
        channel.sendall(b"".join(pdus[:3]) + pdus[3][: len(pdus[3]) // 2])
        stalled = time.monotonic()
        wait_until(lambda: bool(incoming(running)), 10, "the partial data set is in incoming/")

        with a_modality_storing(running):
            removed_after = seconds_until(lambda: not incoming(running), stalled)
        wait_until(lambda: not assoc.is_established, 10, "the peer sees its connection end")
    finally:
        if assoc.is_established:
            assoc.abort()
        peer.shutdown()

    assert NETWORK_TIMEOUT - 0.5 <= removed_after <= NETWORK_TIMEOUT + SLACK, removed_after
    assert any(
        "HALFWAY" in r.getMessage() and "partial data set discarded" in r.getMessage() for r in caplog.records
    )
    assert list(stored_rows(running)) == [wire.sop_instance_uid]  # the modality's, not the half one
    wait_until(lambda: running.node.acceptor.active_associations() == 0, 10, "every slot is free")


# --- memory -------------------------------------------------------------------------------------

PUSHES = 6
PIXEL_BYTES = 60 * 1000 * 1000  # 5000 x 6000 pixels of 16 bits: a large digital mammogram


def large_mammogram(path: Path) -> Path:
    """A Digital Mammography X-Ray image (For Presentation) of ``PIXEL_BYTES`` pixel data."""
    dataset = Dataset()
    dataset.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.2"
    dataset.SOPInstanceUID = generate_uid()
    dataset.StudyInstanceUID = generate_uid()
    dataset.SeriesInstanceUID = generate_uid()
    dataset.PatientID = "LIMITS"
    dataset.PatientName = "LARGE^PUSH"
    dataset.Modality = "MG"
    dataset.Rows, dataset.Columns = 5000, 6000
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = "MONOCHROME2"
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = 16, 12, 11
    dataset.PixelRepresentation = 0
    dataset.PixelData = bytes(PIXEL_BYTES)
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.MediaStorageSOPClassUID = dataset.SOPClassUID
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.save_as(path, enforce_file_format=True)
    return path


def peak_rss_bytes(pid: int) -> int:
    """The process's peak resident set size (VmHWM) so far."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM in /proc/{pid}/status")


def catalogued(data_dir: Path) -> set[str]:
    engine = create_engine(f"sqlite:///{data_dir / 'catalog.sqlite3'}", poolclass=NullPool)
    try:
        with engine.connect() as connection:
            return set(connection.execute(select(Instance.sop_instance_uid)).scalars())
    finally:
        engine.dispose()


def test_concurrent_large_pushes_are_streamed_to_disk_not_held_in_memory(tmp_path: Path) -> None:
    """Six modalities push a 60 MB image each at once; the node's peak memory grows by a
    small fraction of what it received (received data sets go straight to incoming/)."""
    files = [large_mammogram(tmp_path / f"mg{n}.dcm") for n in range(PUSHES)]
    sent = sum(f.stat().st_size for f in files)
    data_dir = tmp_path / "data"
    port = free_port()
    config = write_config(
        tmp_path / "precedent.toml",
        f'[dicom]\nbind = "127.0.0.1"\nport = {port}\n\n'
        f'[storage]\ndata_dir = "{data_dir}"\nmin_free_bytes = 0\nfsync = false\n',
    )
    node = NodeProcess(config, tmp_path / "node.log")
    node.start()
    try:
        assert node.process is not None
        warm_up = storescu(port, [ultrasound_file()])  # every code path of a store has run once
        assert warm_up.acknowledged, warm_up.output[-2000:]
        before = peak_rss_bytes(node.process.pid)

        with ThreadPoolExecutor(PUSHES) as pool:
            runs = list(pool.map(lambda n: storescu(port, [files[n]], calling=f"MG{n}"), range(PUSHES)))

        after = peak_rss_bytes(node.process.pid)
        for run in runs:
            assert run.returncode == 0 and len(run.acknowledged) == 1, run.output[-2000:]
        uids = {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
        assert uids <= catalogued(data_dir)
        growth = after - before
        print(
            f"peak RSS {before / 2**20:.0f} -> {after / 2**20:.0f} MiB (+{growth / 2**20:.1f} MiB) "
            f"while receiving {PUSHES} x {files[0].stat().st_size / 2**20:.0f} MiB = {sent / 2**20:.0f} MiB"
        )
        assert growth < sent / 3, (
            f"peak RSS grew {growth / 2**20:.0f} MiB for {sent / 2**20:.0f} MiB received"
        )
    finally:
        node.kill()
        shutil.rmtree(data_dir, ignore_errors=True)
        for f in files:
            f.unlink(missing_ok=True)
