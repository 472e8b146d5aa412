"""A DICOM peer for hostile tests: data sets as encoded bytes, sent exactly as they are.

Shared by the hostile-input and fuzz tests: a :class:`Wire` is an instance as it travels
(file meta plus raw data set bytes), and the helpers send it with pynetdicom (with
``STORE_SEND_CHUNKED_DATASET`` on, pynetdicom puts a file's data set on the wire untouched)
and read back what the node holds.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import data_element_generator
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import UID
from pynetdicom import AE, _config
from pynetdicom.association import Association
from pynetdicom.dsutils import create_file_meta, split_dataset
from sqlalchemy import select

from node.catalog.models import Instance
from tests.support.data import ultrasound_file
from tests.support.nodes import RunningNode

NODE_AE = "PRECEDENT"
PEER_AE = "HOSTILE"
VERIFICATION = "1.2.840.10008.1.1"

# PS3.4 Annex B.2.3: the C-STORE statuses a peer may be answered with.
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
NOT_THE_INSTANCE_ANNOUNCED = 0xA900
CANNOT_UNDERSTAND = 0xC000
INTERNAL_ERROR = 0xC001

# Data Set Trailing Padding (FFFC,FFFC), OB: a valid element of any length, to grow an instance.
TRAILING_PADDING = b"\xfc\xff\xfc\xff"
# VRs with a 2-byte reserved field and a 4-byte length in explicit VR (PS3.5 7.1.2).
LONG_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"})


# --- instances as they travel ----------------------------------------------------------------


@dataclass(frozen=True)
class Wire:
    """One C-STORE as it travels: the UIDs its request announces and the encoded data set.

    The data set is sent byte for byte as held here, however broken.
    """

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    body: bytes

    @classmethod
    def of_file(cls, path: Path) -> Wire:
        meta, offset = split_dataset(path)
        return cls(
            str(meta.MediaStorageSOPClassUID),
            str(meta.MediaStorageSOPInstanceUID),
            str(meta.TransferSyntaxUID),
            path.read_bytes()[offset:],
        )

    @classmethod
    def of_dataset(cls, dataset: Dataset, transfer_syntax: str) -> Wire:
        """Encode a (possibly altered) data set; its own UIDs are announced."""
        return cls(
            str(dataset.get("SOPClassUID", "")),
            str(dataset.get("SOPInstanceUID", "")),
            transfer_syntax,
            encode(dataset, transfer_syntax),
        )

    def but(self, **changes: str | bytes) -> Wire:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def write(self, directory: Path) -> Path:
        """A DICOM file whose meta announces this C-STORE; pynetdicom sends its data set raw."""
        meta = DicomBytesIO()
        meta.is_little_endian, meta.is_implicit_VR = True, False
        write_file_meta_info(
            meta,
            create_file_meta(
                sop_class_uid=UID(self.sop_class_uid),
                sop_instance_uid=UID(self.sop_instance_uid),
                transfer_syntax=UID(self.transfer_syntax),
            ),
        )
        path = directory / f"{uuid.uuid4().hex}.dcm"
        path.write_bytes(b"\0" * 128 + b"DICM" + meta.getvalue() + self.body)
        return path


def encode(dataset: Dataset, transfer_syntax: str) -> bytes:
    syntax = UID(transfer_syntax)
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = syntax.is_little_endian, syntax.is_implicit_VR
    write_dataset(buffer, dataset)
    return buffer.getvalue()


@dataclass(frozen=True)
class Element:
    """Where one top-level element of an encoded data set lies."""

    tag: int
    offset: int  # of its tag
    vr_offset: int | None  # of its explicit VR, None in implicit VR
    length_offset: int
    length_size: int  # 2 or 4 bytes
    value_offset: int
    length: int


def elements(wire: Wire) -> list[Element]:
    """The top-level elements of ``wire``'s data set, for mutations that aim at one."""
    syntax = UID(wire.transfer_syntax)
    stream = io.BytesIO(wire.body)
    found: list[Element] = []
    for raw in data_element_generator(stream, syntax.is_implicit_VR, syntax.is_little_endian, defer_size=256):
        assert isinstance(raw, RawDataElement)
        value_offset = int(raw.value_tell)
        if syntax.is_implicit_VR:
            offset, vr_offset, length_size = value_offset - 8, None, 4
        elif raw.VR in LONG_VRS:
            offset, vr_offset, length_size = value_offset - 12, value_offset - 8, 4
        else:
            offset, vr_offset, length_size = value_offset - 8, value_offset - 4, 2
        found.append(
            Element(
                raw.tag, offset, vr_offset, value_offset - length_size, length_size, value_offset, raw.length
            )
        )
    return found


def pixel_data(wire: Wire) -> Element:
    return next(e for e in elements(wire) if e.tag == 0x7FE00010)


def padded(wire: Wire, size: int) -> Wire:
    """The same instance grown by a Data Set Trailing Padding element of ``size`` bytes."""
    assert wire.transfer_syntax == "1.2.840.10008.1.2.1"
    return wire.but(body=wire.body + TRAILING_PADDING + b"OB\0\0" + struct.pack("<I", size) + bytes(size))


def ultrasound() -> Wire:
    return Wire.of_file(ultrasound_file())


def ultrasound_dataset() -> Dataset:
    return dcmread(ultrasound_file())


# --- a peer ---------------------------------------------------------------------------------


@contextmanager
def association(port: int, wires: Iterable[Wire] = (), *, ae: AE | None = None) -> Iterator[Association]:
    """An association proposing Verification and each wire's SOP class and transfer syntax."""
    ae = ae or AE(ae_title=PEER_AE)
    ae.add_requested_context(VERIFICATION)
    for sop_class, syntax in dict.fromkeys((w.sop_class_uid, w.transfer_syntax) for w in wires):
        ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AE)
    assert assoc.is_established, "the node refused the association"
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()


def send(assoc: Association, wire: Wire, outbox: Path) -> Dataset:
    """One C-STORE; the response's status data set, empty when no response came."""
    return assoc.send_c_store(wire.write(outbox))


def store(port: int, wire: Wire, outbox: Path) -> Dataset:
    """One C-STORE in an association of its own."""
    with association(port, [wire]) as assoc:
        return send(assoc, wire, outbox)


def echo(port: int) -> int:
    with association(port) as assoc:
        return int(assoc.send_c_echo().get("Status", -1))


def let_the_peer_send_any_uid(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lift pynetdicom's UID checks in the peer's threads only.

    The node runs in this process; its own threads keep whatever validation the node
    configured, as they would in a process of their own. Call after the node started.
    """
    node_validator = _config.VALIDATORS["UI"]

    def validate(value: object) -> tuple[bool, str]:
        thread = threading.current_thread()
        assoc = thread if isinstance(thread, Association) else getattr(thread, "assoc", None)
        if isinstance(assoc, Association) and assoc.is_acceptor:
            return node_validator(value)
        return True, ""

    monkeypatch.setitem(_config.VALIDATORS, "UI", validate)


# --- what the node holds --------------------------------------------------------------------


@dataclass(frozen=True)
class Holdings:
    files: frozenset[Path]
    rows: int


def files_in_objects(running: RunningNode) -> frozenset[Path]:
    objects = running.node.store.objects_dir
    return frozenset(p for p in objects.rglob("*") if p.is_file()) if objects.is_dir() else frozenset()


def holdings(running: RunningNode) -> Holdings:
    return Holdings(files_in_objects(running), running.node.catalog.instance_count())


def incoming(running: RunningNode) -> list[Path]:
    return list(running.node.store.incoming_dir.iterdir())


def eventually(condition: Callable[[], bool], timeout: float = 30) -> bool:
    """For effects of a connection's end, which the node handles in its own thread."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def stored_rows(running: RunningNode) -> dict[str, Path]:
    with running.node.catalog.engine.connect() as connection:
        rows = connection.execute(select(Instance.sop_instance_uid, Instance.file_path)).all()
    return {uid: running.data_dir / path for uid, path in rows}


def stored_body(path: Path) -> bytes:
    _, offset = split_dataset(path)
    return path.read_bytes()[offset:]


def assert_refused(
    running: RunningNode,
    before: Holdings,
    response: Dataset,
    status: int,
    why: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The node answered ``status`` and said ``why`` to the peer and in its log, and kept nothing."""
    assert "Status" in response, "no C-STORE response"
    assert response.Status == status, f"status 0x{response.Status:04X}: {response.get('ErrorComment')}"
    comment = str(response.get("ErrorComment", ""))
    assert why in comment, f"Error Comment {comment!r} does not say {why!r}"
    assert len(comment) <= 64
    logged = [
        r.getMessage() for r in caplog.records if r.name == "node.handlers" and r.levelno == logging.WARNING
    ]
    assert any(f"status 0x{status:04X}" in line and why in line for line in logged), logged
    assert holdings(running) == before, "a refused instance left something in objects/ or the catalog"
    assert not incoming(running), "a refused instance was left in incoming/"


def assert_still_serving(running: RunningNode, outbox: Path) -> None:
    """The next peer is served as if nothing had happened: C-ECHO, and a sound C-STORE kept."""
    assert echo(running.port) == SUCCESS
    wire = ultrasound()
    response = store(running.port, wire, outbox)
    assert response.get("Status") == SUCCESS, response
    assert wire.sop_instance_uid in stored_rows(running)
    assert not incoming(running)


@contextmanager
def idle_association(port: int, calling: str = "IDLE") -> Iterator[Association]:
    """A peer that associates and then does nothing: the slow modality, the hung viewer.

    Aborted on leaving if still open (the node may have ended it, or the test released it).
    """
    ae = AE(ae_title=calling)
    ae.add_requested_context(VERIFICATION)
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AE)
    assert assoc.is_established, f"{calling} could not associate"
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.abort()
        ae.shutdown()
