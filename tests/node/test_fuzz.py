"""Fuzzing C-STORE: real data sets, mutated in their bytes and their encodings, all sent.

Whatever arrives, the node answers with a status (Success, or one of the documented
failures 0xA900 and 0xC000), never with an internal error (0xC001), never with "out of
resources" (0xA700) when resources are plenty, never with silence, and never dies; what
it accepted is whole, readable and catalogued, and ``incoming/`` is left empty.
Hypothesis draws the mutants; one node and one long-lived association serve every
mutant of a test, on each catalog backend.

CI runs a short pass. The long pass is the same tests with more cases::

    PRECEDENT_FUZZ_CASES=10000 pytest tests/node/test_fuzz.py

(its tests then carry the ``fuzz_long`` marker).
"""

from __future__ import annotations

import itertools
import os
import struct
import zlib
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import dcmread
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.association import Association

from node.header import read_instance_header
from tests.support.data import PYDICOM_DATA_DIR, PYDICOM_TEST_DIR, ultrasound_file
from tests.support.nodes import RunningNode, free_port, node_settings, running_node
from tests.support.wire import (
    CANNOT_UNDERSTAND,
    INTERNAL_ERROR,
    NODE_AE,
    NOT_THE_INSTANCE_ANNOUNCED,
    OUT_OF_RESOURCES,
    PEER_AE,
    SUCCESS,
    VERIFICATION,
    Element,
    Wire,
    echo,
    elements,
    holdings,
    incoming,
    store,
    stored_rows,
    ultrasound,
)

CI_CASES = 60
CASES = int(os.environ.get("PRECEDENT_FUZZ_CASES", CI_CASES))
ANSWERS = frozenset({SUCCESS, OUT_OF_RESOURCES, NOT_THE_INSTANCE_ANNOUNCED, CANNOT_UNDERSTAND})

pytestmark = [
    pytest.mark.timeout(300 + 2 * CASES),
    *([pytest.mark.fuzz_long] if CASES > CI_CASES else []),
]

# The uncompressed encodings a data set may be relabelled with: its bytes then say one
# thing and the request another.
RELABELS = [
    "1.2.840.10008.1.2",
    "1.2.840.10008.1.2.1",
    "1.2.840.10008.1.2.2",
    DeflatedExplicitVRLittleEndian,
]
VRS = ["AE", "AS", "AT", "CS", "DA", "DS", "DT", "FD", "FL", "IS", "LO", "LT", "OB", "OD", "OF", "OL"]
VRS += ["OV", "OW", "PN", "SH", "SL", "SQ", "SS", "ST", "SV", "TM", "UC", "UI", "UL", "UN", "UR", "US"]
VRS += ["UT", "UV"]


# --- the data sets mutated --------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """A real file's data set, plain (inflated if it travels deflated), and its element map."""

    name: str
    wire: Wire = field(repr=False)
    plain: bytes = field(repr=False)
    elements: list[Element] = field(repr=False)
    uid_at: int  # offset of the SOP Instance UID's value in ``plain``
    hot: int  # the bytes before this (all but the pixel values) are where readers break

    @property
    def deflated(self) -> bool:
        return self.wire.transfer_syntax == DeflatedExplicitVRLittleEndian

    @classmethod
    def of(cls, path: Path) -> Source:
        wire = Wire.of_file(path)
        plain = wire.body
        syntax = wire.transfer_syntax
        if syntax == DeflatedExplicitVRLittleEndian:
            plain, syntax = zlib.decompress(plain, -zlib.MAX_WBITS), ExplicitVRLittleEndian
        found = elements(wire.but(body=plain, transfer_syntax=syntax))
        uid = next(e for e in found if e.tag == 0x00080018)
        assert plain[uid.value_offset : uid.value_offset + uid.length].rstrip(b"\0 ").decode() == (
            wire.sop_instance_uid
        )
        pixels = [e for e in found if e.tag == 0x7FE00010]
        hot = pixels[0].value_offset + 16 if pixels else len(plain)
        return cls(path.name, wire, plain, found, uid.value_offset, hot)


def sources() -> list[Source]:
    """Five encodings: explicit VR little and big endian, implicit VR, encapsulated, deflated."""
    return [
        Source.of(ultrasound_file()),
        Source.of(PYDICOM_DATA_DIR / "emri_small_big_endian.dcm"),
        Source.of(PYDICOM_DATA_DIR / "emri_small_jpeg_ls_lossless.dcm"),
        Source.of(PYDICOM_TEST_DIR / "MR_small_implicit.dcm"),
        Source.of(PYDICOM_TEST_DIR / "image_dfl.dcm"),
    ]


def deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


# --- mutations ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mutant:
    """What was sent, and what was done to which source (for Hypothesis to print)."""

    source: str
    steps: list[str]
    wire: Wire = field(repr=False)


def position(draw: st.DrawFn, size: int, hot: int) -> int:
    """Anywhere, but as often in the header bytes as in the (much longer) pixel values.

    Drawn on a fixed scale, then scaled to ``size``: what Hypothesis is asked for must not
    depend on the bytes (a deflated body's length depends on the UID it carries).
    """
    hot_spot, anywhere = draw(st.tuples(st.booleans(), st.integers(0, 2**20 - 1)))
    return anywhere * (min(hot, size) if hot_spot else size) >> 20


def flip(draw: st.DrawFn, body: bytearray, hot: int) -> str:
    spots = draw(st.lists(st.integers(0, 255), min_size=1, max_size=8))
    where = [position(draw, len(body), hot) for _ in spots]
    for at, spot in zip(where, spots, strict=True):
        if at < len(body):
            body[at] ^= spot or 0xFF
    return f"flip at {where}"


def truncate(draw: st.DrawFn, body: bytearray, hot: int) -> str:
    at = position(draw, len(body), hot)
    del body[at:]
    return f"truncate at {at}"


def insert(draw: st.DrawFn, body: bytearray, hot: int) -> str:
    at = position(draw, len(body), hot)
    data = draw(st.binary(min_size=1, max_size=64))
    body[at:at] = data
    return f"insert {data!r} at {at}"


def delete(draw: st.DrawFn, body: bytearray, hot: int) -> str:
    at = position(draw, len(body), hot)
    size = draw(st.integers(1, 256))
    del body[at : at + size]
    return f"delete {size} at {at}"


def duplicate(draw: st.DrawFn, body: bytearray, hot: int) -> str:
    start = position(draw, len(body), hot)
    chunk = bytes(body[start : start + draw(st.integers(1, 512))])
    at = position(draw, len(body), hot)
    body[at:at] = chunk
    return f"copy {len(chunk)} from {start} to {at}"


BYTE_MUTATIONS = [flip, truncate, insert, delete, duplicate]


def name(element: Element) -> str:
    return f"({element.tag >> 16:04X},{element.tag & 0xFFFF:04X})"


def pack_length(source: Source, element: Element, length: int) -> bytes:
    big = not source.deflated and source.wire.transfer_syntax == "1.2.840.10008.1.2.2"
    return struct.pack((">" if big else "<") + ("H" if element.length_size == 2 else "I"), length)


def corrupt_length(draw: st.DrawFn, source: Source, body: bytearray, element: Element) -> str:
    top = 2 ** (8 * element.length_size) - 1
    near = [element.length + d for d in (-2, -1, 1, 2, 8) if 0 <= element.length + d <= top]
    length = draw(
        st.one_of(
            st.sampled_from([0, 1, top, top - 1, (top + 1) // 2]),
            st.sampled_from(near),
            st.integers(0, top),
        )
    )
    body[element.length_offset : element.value_offset] = pack_length(source, element, length)
    return f"length of {name(element)} := {length}"


def corrupt_vr(draw: st.DrawFn, source: Source, body: bytearray, element: Element) -> str:
    if element.vr_offset is None:  # implicit VR: there is none to corrupt
        return replace_value(draw, source, body, element)
    vr = draw(st.one_of(st.sampled_from(VRS).map(str.encode), st.binary(min_size=2, max_size=2)))
    body[element.vr_offset : element.vr_offset + 2] = vr
    return f"VR of {name(element)} := {vr!r}"


def corrupt_tag(draw: st.DrawFn, source: Source, body: bytearray, element: Element) -> str:
    tag = draw(st.binary(min_size=4, max_size=4))
    body[element.offset : element.offset + 4] = tag
    return f"tag of {name(element)} := {tag!r}"


# Values that have broken DICOM readers and databases: numbers out of every range, NULs,
# separators, bytes of no character set, character set terms, escape sequences.
AWKWARD_VALUES = [
    b"",
    b"9" * 20,
    b"2147483648",
    b"-99999999999",
    b"1e400",
    b"NaN",
    b"\0" * 8,
    b"A\0B",
    b"\\" * 16,
    b"\xff\xfe\xfd\xfc",
    "Ÿ€ß漢字^한국어".encode(),
    b"ISO_IR 192",
    b"ISO 2022 IR 87\\ISO 2022 IR 159",
    b"GB18030\\ISO_IR 100",
    b"\x1b$B\x1b(B",
    b"1.2.3..4",
    b" " * 64,
    b"X" * 1024,
]


def replace_value(draw: st.DrawFn, source: Source, body: bytearray, element: Element) -> str:
    """A new value, its length field to match: the encoding stays sound, the content is not."""
    if element.length == 0xFFFFFFFF:  # a sequence or encapsulated pixel data: not one value
        return corrupt_length(draw, source, body, element)
    value = draw(
        st.one_of(
            st.sampled_from(AWKWARD_VALUES),
            st.binary(max_size=80),
            st.text(max_size=40).map(str.encode),
        )
    )
    value = value[: 2 ** (8 * element.length_size) - 2]
    value += b" " * (len(value) % 2)
    body[element.value_offset : element.value_offset + element.length] = value
    body[element.length_offset : element.value_offset] = pack_length(source, element, len(value))
    return f"value of {name(element)} := {value[:80]!r}"


ELEMENT_MUTATIONS = [corrupt_length, corrupt_vr, corrupt_tag, replace_value, replace_value]

_serial = itertools.count(1)


def fresh_uid(like: str) -> str:
    """A UID never sent before, as long as ``like``: the element map stays true, and every
    accepted mutant is a new instance (a duplicate would not reach the catalog)."""
    serial = str(next(_serial))
    return "2.25." + serial.rjust(len(like) - 5, "9")


@st.composite
def mutants(draw: st.DrawFn, pool: list[Source]) -> Mutant:
    source = draw(st.sampled_from(pool))
    steps: list[str] = []
    uid = fresh_uid(source.wire.sop_instance_uid)
    body = bytearray(source.plain)
    body[source.uid_at : source.uid_at + len(uid)] = uid.encode()
    aimed = draw(
        st.lists(st.tuples(st.sampled_from(ELEMENT_MUTATIONS), st.sampled_from(source.elements)), max_size=2)
    )
    for mutation, element in sorted(aimed, key=lambda aim: -aim[1].offset):  # later offsets stay true
        steps.append(mutation(draw, source, body, element))
    for mutate in draw(st.lists(st.sampled_from(BYTE_MUTATIONS), max_size=3)):
        steps.append(mutate(draw, body, source.hot))
    if source.deflated:
        body = bytearray(deflate(bytes(body)))
        if draw(st.booleans()):
            steps.append("in the deflated stream: " + draw(st.sampled_from(BYTE_MUTATIONS))(draw, body, 64))
    syntax = source.wire.transfer_syntax
    if draw(st.integers(0, 4)) == 0:
        syntax = draw(st.sampled_from(RELABELS))
        steps.append(f"announced as {syntax}")
    if not steps:
        steps.append(flip(draw, body, source.hot))
    wire = source.wire.but(body=bytes(body), transfer_syntax=syntax, sop_instance_uid=uid)
    return Mutant(source.name, steps, wire)


# --- the peer -----------------------------------------------------------------------------------


class Peer:
    """One association kept open for every mutant; opened again if the node ended it."""

    def __init__(self, port: int, pool: list[Source]) -> None:
        self._ae = AE(ae_title=PEER_AE)
        self._ae.add_requested_context(VERIFICATION)
        for sop_class in dict.fromkeys(s.wire.sop_class_uid for s in pool):
            for syntax in dict.fromkeys([*RELABELS, *(s.wire.transfer_syntax for s in pool)]):
                self._ae.add_requested_context(sop_class, syntax)
        self._port = port
        self._assoc: Association | None = None
        self.associations = 0

    def send(self, wire: Wire, outbox: Path) -> int | None:
        """The status the node answered, or None for no answer."""
        if self._assoc is None or not self._assoc.is_established:
            self._assoc = self._ae.associate("127.0.0.1", self._port, ae_title=NODE_AE)
            self.associations += 1
            assert self._assoc.is_established, "the node refused a new association"
        path = wire.write(outbox)
        try:
            response = self._assoc.send_c_store(path)
        finally:
            path.unlink()
        return int(response.Status) if "Status" in response else None

    def close(self) -> None:
        if self._assoc is not None and self._assoc.is_established:
            self._assoc.release()


@contextmanager
def fuzzing_node(tmp_path: Path, catalog_url: str) -> Iterator[RunningNode]:
    """One node for all the mutants of a test. Without fsync: durability is not under test
    here, and the long pass stores thousands of instances."""
    settings = node_settings(tmp_path / "data", free_port(), catalog_url, storage={"fsync": False})
    with running_node(settings) as running:
        yield running


# --- the test -----------------------------------------------------------------------------------


def test_every_source_as_it_is_is_stored(
    tmp_path: Path, catalog_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The control group: unmutated, every source is stored, so a mutant refused was refused
    for what was done to it."""
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    pool = sources()
    with fuzzing_node(tmp_path, catalog_url) as running:
        peer = Peer(running.port, pool)
        try:
            for source in pool:
                assert peer.send(source.wire, tmp_path) == SUCCESS, source.name
        finally:
            peer.close()
        assert set(stored_rows(running)) == {source.wire.sop_instance_uid for source in pool}


def test_every_mutant_gets_a_status_and_the_node_survives(
    tmp_path: Path, catalog_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    pool = sources()
    outbox = tmp_path / "outbox"
    outbox.mkdir()
    statuses: Counter[int | None] = Counter()

    with fuzzing_node(tmp_path, catalog_url) as running:
        peer = Peer(running.port, pool)

        @settings(
            max_examples=CASES,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(mutants(pool))
        def the_node_answers(mutant: Mutant) -> None:
            status = peer.send(mutant.wire, outbox)
            statuses[status] += 1
            assert status is not None, "no response"
            assert status != INTERNAL_ERROR, "the node failed inside on this mutant"
            assert status in ANSWERS, f"undocumented status 0x{status:04X}"
            assert status != OUT_OF_RESOURCES, "bad data answered as a lack of resources"
            assert not incoming(running), "a received file was left in incoming/"

        try:
            the_node_answers()
        finally:
            peer.close()
            print("\nstatuses:", {f"0x{s:04X}" if s is not None else None: n for s, n in statuses.items()})

        assert statuses[INTERNAL_ERROR] == 0
        # The disk has room, no instance nears the size limit, the catalog is up: "out of
        # resources" here would blame resources for bad data, which a modality retries forever.
        assert statuses[OUT_OF_RESOURCES] == 0
        assert statuses[None] == 0
        assert peer.associations == 1, "the node ended the association"
        assert echo(running.port) == SUCCESS
        assert store(running.port, ultrasound(), outbox).get("Status") == SUCCESS
        assert not incoming(running)
        rows = stored_rows(running)
        assert holdings(running).files == set(rows.values()), "a file in objects/ has no catalog row"
        for uid, path in rows.items():
            assert path.is_file(), uid
            dataset = dcmread(path)
            assert str(dataset.SOPInstanceUID).strip("\x00 ") == uid
            read_instance_header(path)  # still sound by the node's own reading
