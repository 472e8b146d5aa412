"""Broken and hostile C-STOREs, sent by a pynetdicom peer that puts any bytes on the wire.

Whatever a peer sends, the node owes it an answer: the fitting failure status (A7xx out
of resources, A9xx not the instance announced, Cxxx cannot understand) with an Error
Comment that says why, a WARNING in its log that says the same, nothing half-written
in ``objects/``, the catalog or ``incoming/``, and service as usual for the next peer.
"""

from __future__ import annotations

import itertools
import logging
import random
import shutil
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.dimse_messages import C_STORE_RQ
from sqlalchemy import text

from node.catalog.database import connect, upgrade_schema
from node.logs import OneLineFormatter
from tests.support.data import ultrasound_file
from tests.support.nodes import RunningNode
from tests.support.postgres import SERVER, scratch_database
from tests.support.wire import (
    CANNOT_UNDERSTAND,
    INTERNAL_ERROR,
    NOT_THE_INSTANCE_ANNOUNCED,
    OUT_OF_RESOURCES,
    PEER_AE,
    SUCCESS,
    Holdings,
    Wire,
    assert_refused,
    assert_still_serving,
    association,
    echo,
    elements,
    eventually,
    files_in_objects,
    holdings,
    incoming,
    let_the_peer_send_any_uid,
    padded,
    pixel_data,
    send,
    store,
    stored_body,
    stored_rows,
    ultrasound,
    ultrasound_dataset,
)

# --- a peer ---------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def send_data_sets_as_they_are(monkeypatch: pytest.MonkeyPatch) -> None:
    """pynetdicom then sends a file's data set raw instead of decoding and re-encoding it."""
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)


# --- what the node holds ----------------------------------------------------------------------


@pytest.fixture
def outbox(tmp_path: Path) -> Path:
    """Where the peer writes what it sends: beside, never inside, a node's data directory."""
    directory = tmp_path / "outbox"
    directory.mkdir()
    return directory


# --- data sets that cannot be read ------------------------------------------------------------


def cut_in_pixel_data(wire: Wire) -> bytes:
    pixels = pixel_data(wire)
    return wire.body[: pixels.value_offset + pixels.length // 2]


def cut_in_pixel_data_header(wire: Wire) -> bytes:
    return wire.body[: pixel_data(wire).offset + 6]


def cut_in_last_element_header(wire: Wire) -> bytes:
    """The ultrasound ends with trailing padding after its pixel data: cut inside its header."""
    return wire.body[: elements(wire)[-1].offset + 5]


def garbage(_: Wire) -> bytes:
    return random.Random(20240826).randbytes(64 * 1024)


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        (cut_in_pixel_data, "past the end"),
        (cut_in_pixel_data_header, "data set ends at byte"),
        (cut_in_last_element_header, "data set ends at byte"),
        (garbage, "past the end"),
        (lambda _: b"", "data set is empty"),
    ],
    ids=["cut-in-pixel-data", "cut-in-pixel-data-header", "cut-in-last-header", "garbage", "empty"],
)
def test_a_data_set_that_cannot_be_read_is_not_understood(
    start_node: Callable[..., RunningNode],
    outbox: Path,
    caplog: pytest.LogCaptureFixture,
    damage: Callable[[Wire], bytes],
    why: str,
) -> None:
    running = start_node()
    before = holdings(running)
    response = store(running.port, ultrasound().but(body=damage(ultrasound())), outbox)
    assert_refused(running, before, response, CANNOT_UNDERSTAND, why, caplog)
    assert_still_serving(running, outbox)


# --- identifiers ------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [None, ""], ids=["absent", "empty"])
def test_a_data_set_without_a_sop_instance_uid_is_refused(
    start_node: Callable[..., RunningNode],
    outbox: Path,
    caplog: pytest.LogCaptureFixture,
    value: str | None,
) -> None:
    running = start_node()
    dataset = ultrasound_dataset()
    if value is None:
        del dataset.SOPInstanceUID
    else:
        dataset.SOPInstanceUID = value
    wire = Wire.of_dataset(dataset, ultrasound().transfer_syntax).but(
        sop_instance_uid=ultrasound().sop_instance_uid
    )
    before = holdings(running)
    response = store(running.port, wire, outbox)
    assert_refused(running, before, response, NOT_THE_INSTANCE_ANNOUNCED, "SOPInstanceUID is missing", caplog)
    assert_still_serving(running, outbox)


def files_beside(directory: Path) -> set[Path]:
    """Everything under ``directory``'s parent, except ``directory`` itself."""
    return {p for p in directory.parent.rglob("*") if p != directory and directory not in p.parents}


@pytest.mark.parametrize(
    "hostile_uid",
    ["../../../etc/passwd", "1.2.3/../../x", "1.2.840.10008.abc", "1." * 40 + "1"],
    ids=["dot-dot-slash", "uid-then-dot-dot", "letters", "over-64-characters"],
)
def test_a_uid_that_is_no_uid_is_refused_and_names_no_file(
    start_node: Callable[..., RunningNode],
    outbox: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    hostile_uid: str,
) -> None:
    """Request and data set agree on a UID that tries to climb out of the data directory."""
    running = start_node()
    let_the_peer_send_any_uid(monkeypatch)
    dataset = ultrasound_dataset()
    dataset.SOPInstanceUID = hostile_uid
    wire = Wire.of_dataset(dataset, ultrasound().transfer_syntax)
    data_dir = running.data_dir
    naive_targets = [(base / hostile_uid).resolve() for base in (data_dir, data_dir / "objects")]
    naive_targets += [(data_dir / "incoming" / hostile_uid).resolve()]
    passwd = Path("/etc/passwd").read_bytes()
    beside = files_beside(data_dir)
    before = holdings(running)

    response = store(running.port, wire, outbox)

    assert_refused(
        running, before, response, NOT_THE_INSTANCE_ANNOUNCED, "SOPInstanceUID is not a valid UID", caplog
    )
    assert files_beside(data_dir) == beside | set(outbox.iterdir()), "a file appeared outside the data dir"
    assert not any(t.exists() for t in naive_targets if t != Path("/etc/passwd"))
    assert Path("/etc/passwd").read_bytes() == passwd
    assert_still_serving(running, outbox)


def test_a_data_set_that_is_not_the_instance_announced_is_refused(
    start_node: Callable[..., RunningNode], outbox: Path, caplog: pytest.LogCaptureFixture
) -> None:
    running = start_node()
    wire = ultrasound().but(sop_instance_uid="1.2.826.0.1.3680043.8.498.1")
    before = holdings(running)
    response = store(running.port, wire, outbox)
    assert_refused(
        running,
        before,
        response,
        NOT_THE_INSTANCE_ANNOUNCED,
        "SOPInstanceUID differs from the request's",
        caplog,
    )
    assert_still_serving(running, outbox)


@pytest.mark.parametrize(
    ("keyword", "value", "query", "recorded"),
    [
        ("InstanceNumber", "99999999999999999999", "SELECT instance_number FROM instances", None),
        ("SeriesNumber", "2147483648", "SELECT series_number FROM series", None),
        ("PatientName", "DOE\0JOHN", "SELECT patient_name FROM patients", "DOEJOHN"),
    ],
    ids=["instance-number-past-64-bits", "series-number-past-32-bits", "nul-in-patient-name"],
)
def test_a_query_key_no_catalog_column_can_hold_is_left_out(
    start_node: Callable[..., RunningNode],
    catalog_url: str,
    outbox: Path,
    keyword: str,
    value: str,
    query: str,
    recorded: str | None,
) -> None:
    """Query keys are copies made for searching; the file keeps every value as sent. A value
    neither catalog can hold (an integer past the 32-bit column, a NUL in text) is left out
    of the copy: refusing it would be "out of resources", which a modality retries forever,
    or an internal error that left the placed file without its row."""
    running = start_node(catalog_url)
    dataset = ultrasound_dataset()
    setattr(dataset, keyword, value)
    wire = Wire.of_dataset(dataset, ultrasound().transfer_syntax)

    assert store(running.port, wire, outbox).get("Status") == SUCCESS

    rows = stored_rows(running)
    assert list(rows) == [wire.sop_instance_uid]
    assert stored_body(rows[wire.sop_instance_uid]) == wire.body
    assert holdings(running) == Holdings(frozenset(rows.values()), 1)
    with running.node.catalog.engine.connect() as connection:
        assert connection.execute(text(query)).scalar_one() == recorded


# --- resources --------------------------------------------------------------------------------


def test_an_instance_over_the_size_limit_is_refused(
    start_node: Callable[..., RunningNode], outbox: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The limit sits just above the ultrasound; the same instance with 64 KiB of padding is over."""
    limit = ultrasound_file().stat().st_size + 16 * 1024
    running = start_node(dicom={"max_instance_bytes": limit})
    before = holdings(running)
    response = store(running.port, padded(ultrasound(), 64 * 1024), outbox)
    assert_refused(running, before, response, OUT_OF_RESOURCES, "(dicom.max_instance_bytes)", caplog)
    assert_still_serving(running, outbox)


def test_an_unwritable_data_directory_refuses_and_recovers(
    start_node: Callable[..., RunningNode], outbox: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """objects/ replaced by a regular file: nothing can be placed (chmod would not stop root)."""
    running = start_node()
    objects = running.node.store.objects_dir
    shutil.rmtree(objects)
    objects.write_bytes(b"not a directory")
    before = holdings(running)
    response = store(running.port, ultrasound(), outbox)
    assert_refused(running, before, response, OUT_OF_RESOURCES, "cannot write to the data directory", caplog)
    assert echo(running.port) == SUCCESS

    objects.unlink()
    objects.mkdir()
    assert_still_serving(running, outbox)


def test_a_full_disk_refuses_every_instance_and_keeps_answering(
    start_node: Callable[..., RunningNode], outbox: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """No disk has 2**62 bytes free: storage.min_free_bytes stands in for a full one."""
    running = start_node(storage={"min_free_bytes": 2**62})
    before = holdings(running)
    for _ in range(2):
        response = store(running.port, ultrasound(), outbox)
        assert_refused(running, before, response, OUT_OF_RESOURCES, "below storage.min_free_bytes", caplog)
        assert echo(running.port) == SUCCESS


def test_an_unreachable_catalog_refuses_and_recovers_when_it_returns(
    start_node: Callable[..., RunningNode], outbox: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with scratch_database() as url:
        running = start_node(url)
        before = holdings(running)
        name = url.rsplit("/", 1)[1]
        with psycopg.connect(SERVER, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')

        response = store(running.port, ultrasound(), outbox)

        assert response.get("Status") == OUT_OF_RESOURCES, response
        why = "catalog database unreachable"
        assert why in str(response.get("ErrorComment"))
        logged = [r.getMessage() for r in caplog.records if r.name == "node.handlers"]
        assert any("status 0xA700" in line and why in line for line in logged), logged
        assert files_in_objects(running) == before.files
        assert not incoming(running)
        assert echo(running.port) == SUCCESS

        with psycopg.connect(SERVER, autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        engine = connect(url)
        upgrade_schema(engine)
        engine.dispose()
        assert_still_serving(running, outbox)


def test_a_catalog_that_fails_the_write_leaves_no_file_placed(
    start_node: Callable[..., RunningNode], outbox: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The catalog fails after the file was placed in objects/: the file must go again."""
    with scratch_database() as url:
        running = start_node(url)
        name = url.rsplit("/", 1)[1]
        with psycopg.connect(SERVER.replace("dbname=postgres", f"dbname={name}"), autocommit=True) as db:
            db.execute(
                "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS "
                "$$ BEGIN RAISE EXCEPTION 'refused by a test trigger'; END $$"
            )
            db.execute("CREATE TRIGGER refuse BEFORE INSERT ON instances EXECUTE FUNCTION refuse()")
        before = holdings(running)
        response = store(running.port, ultrasound(), outbox)
        assert_refused(running, before, response, OUT_OF_RESOURCES, "catalog write failed", caplog)

        with psycopg.connect(SERVER.replace("dbname=postgres", f"dbname={name}"), autocommit=True) as db:
            db.execute("DROP TRIGGER refuse ON instances")
        assert_still_serving(running, outbox)


def test_a_fault_inside_the_node_is_reported_as_such_and_leaves_no_file(
    start_node: Callable[..., RunningNode],
    outbox: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A failure nobody foresaw, after the file was placed: 0xC001 names it, the log keeps the
    traceback, and the file goes again, as for any catalog failure."""
    running = start_node()

    def fault(*_: object) -> bool:
        raise RuntimeError("a fault nobody foresaw")

    before = holdings(running)
    with monkeypatch.context() as patch:
        patch.setattr(running.node.catalog, "add_instance", fault)
        response = store(running.port, ultrasound(), outbox)

    assert response.get("Status") == INTERNAL_ERROR, response
    assert response.get("ErrorComment") == "internal error: RuntimeError"
    assert any(
        r.name == "node.handlers" and r.levelno == logging.ERROR and r.exc_info for r in caplog.records
    )
    assert holdings(running) == before, "the placed file outlived the failure"
    assert not incoming(running)
    assert_still_serving(running, outbox)


# --- connections that are not DICOM, or end too soon -----------------------------------------


# A connection that never sends an A-ASSOCIATE-RQ holds its slot until dicom.acse_timeout:
# short here, so that the test sees the slots freed.
QUICK_ACSE = {"acse_timeout": 2}


def test_bytes_that_are_no_dicom_do_not_stop_the_node(start_node: Callable[..., RunningNode]) -> None:
    running = start_node(dicom=QUICK_ACSE)
    with socket.create_connection(("127.0.0.1", running.port), timeout=60) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: precedent\r\n\r\n" + random.Random(7).randbytes(4096))
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(65536):  # the node may answer with an A-ABORT; it must close
            pass
    assert echo(running.port) == SUCCESS
    assert eventually(lambda: running.node.acceptor.active_associations() == 0)


def test_a_connection_opened_and_closed_in_silence_does_not_stop_the_node(
    start_node: Callable[..., RunningNode],
) -> None:
    running = start_node(dicom=QUICK_ACSE)
    for _ in range(3):
        socket.create_connection(("127.0.0.1", running.port), timeout=60).close()
    assert echo(running.port) == SUCCESS
    assert eventually(lambda: running.node.acceptor.active_associations() == 0)


@contextmanager
def peer_that_stops_mid_transfer(monkeypatch: pytest.MonkeyPatch) -> Iterator[AE]:
    """A peer that sends the command and the first fragments of a data set, then falls
    silent until its DIMSE timeout, when it aborts: a modality switched off mid-push.
    (The node never encodes a C-STORE request, so the patched encoder is the peer's alone.)"""
    encode_msg = C_STORE_RQ.encode_msg

    def first_fragments(self: C_STORE_RQ, context_id: int, max_pdu: int) -> Iterator[object]:
        yield from itertools.islice(encode_msg(self, context_id, max_pdu), 4)

    with monkeypatch.context() as patch:
        patch.setattr(C_STORE_RQ, "encode_msg", first_fragments)
        ae = AE(ae_title=PEER_AE)
        ae.dimse_timeout = 1
        yield ae


def test_a_peer_that_stops_mid_transfer_leaves_nothing_behind(
    start_node: Callable[..., RunningNode],
    outbox: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    running = start_node()
    before = holdings(running)
    with (
        peer_that_stops_mid_transfer(monkeypatch) as peer,
        association(running.port, [ultrasound()], ae=peer) as assoc,
    ):
        assert "Status" not in send(assoc, ultrasound(), outbox)
        assert assoc.is_aborted

    assert eventually(lambda: not incoming(running)), "the partial data set stayed in incoming/"
    assert holdings(running) == before
    assert any("partial data set discarded" in r.getMessage() for r in caplog.records)
    assert_still_serving(running, outbox)


# --- duplicates -------------------------------------------------------------------------------


def second_version() -> Wire:
    """The ultrasound again, same UIDs, different content: a corrected resend."""
    dataset = ultrasound_dataset()
    dataset.StudyDescription = "corrected resend"
    return Wire.of_dataset(dataset, ultrasound().transfer_syntax)


def test_an_instance_sent_twice_is_kept_once(
    start_node: Callable[..., RunningNode], catalog_url: str, outbox: Path
) -> None:
    """on_duplicate = "keep": every send succeeds, the first version stays."""
    running = start_node(catalog_url)
    first, second = ultrasound(), second_version()
    assert first.body != second.body
    with association(running.port, [first]) as assoc:
        for wire in (first, first, second):
            assert send(assoc, wire, outbox).Status == SUCCESS
    rows = stored_rows(running)
    assert list(rows) == [first.sop_instance_uid]
    assert len(holdings(running).files) == 1
    assert stored_body(rows[first.sop_instance_uid]) == first.body


def test_an_instance_sent_twice_is_replaced_when_configured(
    start_node: Callable[..., RunningNode], catalog_url: str, outbox: Path
) -> None:
    """on_duplicate = "replace": both sends succeed, the second version is what is kept."""
    running = start_node(catalog_url, storage={"on_duplicate": "replace"})
    first, second = ultrasound(), second_version()
    with association(running.port, [first]) as assoc:
        assert send(assoc, first, outbox).Status == SUCCESS
        assert send(assoc, second, outbox).Status == SUCCESS
    rows = stored_rows(running)
    assert list(rows) == [first.sop_instance_uid]
    assert len(holdings(running).files) == 1
    assert stored_body(rows[first.sop_instance_uid]) == second.body
    assert dcmread(rows[first.sop_instance_uid]).StudyDescription == "corrected resend"


def test_a_uid_with_a_newline_cannot_forge_a_log_line(
    start_node: Callable[..., RunningNode],
    outbox: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    running = start_node()
    let_the_peer_send_any_uid(monkeypatch)
    forged = "1.2.3\n2026-01-01 00:00:00 INFO node.handlers: C-STORE 9.9 from X: stored"
    dataset = ultrasound_dataset()
    dataset.SOPInstanceUID = forged
    with caplog.at_level(logging.INFO, logger="node.handlers"):
        response = store(running.port, Wire.of_dataset(dataset, ExplicitVRLittleEndian), outbox)
    assert response.get("Status") == NOT_THE_INSTANCE_ANNOUNCED
    ours = [r for r in caplog.records if r.name.startswith("node.")]
    assert all("\n" not in record.getMessage() for record in ours)
    assert any("\\n2026-01-01" in record.getMessage() for record in ours)
    # Whatever another library quotes, the node's log format keeps it on one line.
    formatter = OneLineFormatter("%(message)s")
    assert all("\n" not in formatter.format(record) for record in caplog.records)
