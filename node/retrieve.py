"""Retrieval: what a C-MOVE or C-GET selects, sent to a peer as C-STORE sub-operations.

A C-MOVE sends over a new association to a destination listed in ``[[destinations]]``; a
C-GET over the requestor's own association, on the storage contexts it proposed with the
SCP role. Each instance goes, in the order the catalog streams it:

* **as stored** when the peer accepted its SOP class in its stored transfer syntax: the
  file is streamed from the object store, never decoded (bit-identical pixel data);
* otherwise **transcoded** to an uncompressed syntax the peer accepted: re-encoded when it
  is stored uncompressed, byte-swapped when it is stored big endian, its pixel data decoded
  (pydicom with pylibjpeg / gdcm) when it is stored compressed;
* otherwise not at all: a failed sub-operation, its reason logged.

Nothing here knows the C-MOVE / C-GET statuses: a :class:`Progress` counts the
sub-operations, and the network edge (:mod:`node.handlers`) turns it into responses.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from pydicom import dcmread, uid
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.status import STATUS_SUCCESS, STATUS_WARNING, code_to_category

from node.catalog.recording import Catalog
from node.errors import DestinationUnavailable, TooManyMatches, UnknownDestination
from node.query import Model, Selection, parse_retrieve
from node.settings import Destination
from node.sockets import send_without_delay
from node.storage import ObjectStore
from node.tls import PLAIN, OutgoingTls

log = logging.getLogger(__name__)

# The sub-operation counters of C-MOVE / C-GET responses are US: one retrieval sends at most this.
MAX_SUBOPERATIONS = 65535
# Presentation contexts one association may propose (PS3.8: odd IDs 1-255).
MAX_CONTEXTS = 128
# What the node can turn any decodable instance into, and proposes for every SOP class it moves.
UNCOMPRESSED: list[str | uid.UID] = [uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian]
# Stored syntaxes pydicom re-encodes into an accepted uncompressed one without touching values.
_LITTLE_ENDIAN = {uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian, uid.DeflatedExplicitVRLittleEndian}
# The VRs whose values pydicom keeps as the file's bytes, by item size: what a change of byte
# order must swap.
_SWAPPED_VRS = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}
_PIXEL_DATA = 0x7FE00010


@dataclass(frozen=True)
class StoredInstance:
    """One instance to send, as the catalog records it."""

    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    file_path: str


@dataclass(frozen=True)
class Plan:
    """What one retrieval will send: its selection and, per (SOP class, stored transfer
    syntax), how many instances."""

    selection: Selection
    composition: tuple[tuple[str, str, int], ...]

    @property
    def count(self) -> int:
        return sum(instances for _, _, instances in self.composition)

    def contexts(self) -> list[PresentationContext]:
        """What a C-MOVE proposes to its destination: each SOP class in the uncompressed
        syntaxes (anything can be sent so), then each SOP class in each syntax it is stored
        in (so that it can go as stored) as far as the 128 contexts allow."""
        classes = sorted({sop_class for sop_class, _, _ in self.composition})
        stored = sorted({(sop_class, syntax) for sop_class, syntax, _ in self.composition})
        contexts = [build_context(sop_class, UNCOMPRESSED) for sop_class in classes]
        contexts += [build_context(c, [syntax]) for c, syntax in stored if syntax != UNCOMPRESSED[0]]
        return contexts[:MAX_CONTEXTS]


@dataclass
class Progress:
    """The sub-operations of one retrieval so far (PS3.4 C.4.2.1.5 / C.4.3.1.5)."""

    total: int
    completed: int = 0
    failed: int = 0
    warning: int = 0
    failed_uids: list[str] = field(default_factory=list)
    cancelled: bool = False
    stopped: bool = False
    last_failure: str = ""

    @property
    def remaining(self) -> int:
        return self.total - self.completed - self.failed - self.warning

    def fail(self, sop_instance_uid: str, reason: str) -> None:
        self.failed += 1
        self.failed_uids.append(sop_instance_uid)
        self.last_failure = reason

    def abandon(self, reason: str) -> None:
        """Count every sub-operation not yet performed as failed: the retrieval cannot go on."""
        self.failed += self.remaining
        self.stopped = True
        self.last_failure = reason


@dataclass(frozen=True)
class Originator:
    """Who asked for a C-MOVE: named in each C-STORE sub-operation (PS3.7 9.1.1.1)."""

    ae_title: str
    message_id: int


class NotSendable(Exception):
    """This instance cannot go to this peer; ``str(exc)`` says why."""


class Retriever:
    """Carries out C-MOVE and C-GET requests from the catalog and the object store."""

    def __init__(
        self,
        catalog: Catalog,
        store: ObjectStore,
        destinations: list[Destination],
        outgoing: OutgoingTls = PLAIN,
    ) -> None:
        self._catalog = catalog
        self._store = store
        self._destinations = destinations
        self._outgoing = outgoing

    def destination(self, ae_title: str) -> Destination:
        """The configured destination with this AE title (the first, if several share it)."""
        for destination in self._destinations:
            if destination.ae_title == ae_title.strip():
                return destination
        raise UnknownDestination(f"move destination {ae_title.strip()!r} is not in [[destinations]]")

    def plan(self, identifier: Dataset, model: Model) -> Plan:
        """Select and count what ``identifier`` names; raise :class:`~node.errors.QueryError`
        for an identifier that does not fit, :class:`TooManyMatches` beyond what one
        retrieval can count."""
        selection = parse_retrieve(identifier, model)
        rows = self._catalog.stream(selection.composition())
        composition = ((str(r.sop_class_uid), str(r.transfer_syntax_uid), int(r.instances)) for r in rows)
        plan = Plan(selection, tuple(composition))
        if plan.count > MAX_SUBOPERATIONS:
            raise TooManyMatches(f"{plan.count} instances match; one retrieval sends {MAX_SUBOPERATIONS}")
        return plan

    def move(
        self,
        plan: Plan,
        destination: Destination,
        ae: AE,
        originator: Originator,
        progress: Progress,
        cancelled: Callable[[], bool],
    ) -> Iterator[Progress]:
        """Send the plan's instances to ``destination`` over a new association from ``ae``,
        yielding ``progress`` after each sub-operation; raise :class:`DestinationUnavailable`
        (before any) when the destination cannot be associated with."""
        assoc = ae.associate(
            destination.host,
            destination.port,
            contexts=plan.contexts(),
            ae_title=destination.ae_title,
            max_pdu=ae.maximum_pdu_size,
            evt_handlers=[(evt.EVT_CONN_OPEN, send_without_delay)],
            tls_args=self._outgoing.tls_args(destination),
        )
        # A destination that accepted none of the proposed contexts (pynetdicom then aborts)
        # is reachable: each instance fails on its own, for want of a context.
        if not assoc.is_established and not assoc.rejected_contexts:
            outcome = "rejected the association" if assoc.is_rejected else "cannot be reached"
            where = f"{destination.host}:{destination.port}"
            raise DestinationUnavailable(f"destination {destination.ae_title} at {where} {outcome}")
        keep_responses(assoc)
        try:
            yield from self._send_all(plan, assoc, originator, progress, cancelled)
        finally:
            if assoc.is_established:
                assoc.release()

    def get(
        self,
        plan: Plan,
        assoc: Association,
        message_id: int,
        progress: Progress,
        cancelled: Callable[[], bool],
    ) -> Iterator[Progress]:
        """Send the plan's instances back over the C-GET's own association, yielding
        ``progress`` after each sub-operation; ``message_id`` is the C-GET's, which the
        sub-operations' own IDs avoid."""
        return self._send_all(plan, assoc, Originator("", message_id), progress, cancelled)

    def _send_all(
        self,
        plan: Plan,
        assoc: Association,
        originator: Originator,
        progress: Progress,
        cancelled: Callable[[], bool],
    ) -> Iterator[Progress]:
        established = assoc.is_established
        rows = self._catalog.stream(plan.selection.instances().limit(plan.count))
        for index, row in enumerate(rows, start=1):
            if cancelled():
                progress.cancelled = True
                return
            if established and not assoc.is_established:
                ended = "aborted" if assoc.is_aborted else "released"
                raise DestinationUnavailable(f"the association with {_peer(assoc)} was {ended}")
            instance = StoredInstance(*map(str, row))
            # Sub-operation message IDs run on from the request's, never reaching it again.
            message_id = 1 + (originator.message_id + index - 1) % 65535
            self._send(assoc, instance, message_id, originator, progress)
            yield progress

    def _send(
        self,
        assoc: Association,
        instance: StoredInstance,
        message_id: int,
        originator: Originator,
        progress: Progress,
    ) -> None:
        peer = _peer(assoc)
        try:
            payload = self._payload(assoc, instance)
            status = assoc.send_c_store(
                payload,
                msg_id=message_id,
                originator_aet=originator.ae_title or None,
                originator_id=originator.message_id if originator.ae_title else None,
            )
        except NotSendable as exc:
            reason = str(exc)
        except (OSError, ValueError, AttributeError, RuntimeError) as exc:  # pynetdicom's, and reading
            reason = f"C-STORE not sent: {exc}"
        else:
            code = status.get("Status")
            category = code_to_category(int(code)) if code is not None else "no response"
            if category == STATUS_SUCCESS:
                progress.completed += 1
                return
            if category == STATUS_WARNING:
                progress.warning += 1
                log.info("%s stored %s with warning 0x%04X", peer, instance.sop_instance_uid, code)
                return
            reason = f"{peer} answered 0x{code:04X}" if code is not None else f"{peer} did not answer"
        progress.fail(instance.sop_instance_uid, reason)
        log.warning("sub-operation for %s to %s failed: %s", instance.sop_instance_uid, peer, reason)

    def _payload(self, assoc: Association, instance: StoredInstance) -> Path | Dataset:
        return payload(assoc, instance, self._store.absolute(PurePosixPath(instance.file_path)))


def payload(assoc: Association, instance: StoredInstance, path: Path) -> Path | Dataset:
    """What to send of the instance stored at ``path``: the file itself when the peer
    accepted its stored syntax, else a data set that pynetdicom encodes in an accepted
    uncompressed one; :class:`NotSendable` when none."""
    sop_class = uid.UID(instance.sop_class_uid)
    accepted = {
        str(cx.transfer_syntax[0])
        for cx in assoc.accepted_contexts
        if cx.abstract_syntax == sop_class and _may_store(assoc, cx)
    }
    if not accepted:
        raise NotSendable(f"no usable presentation context for {sop_class.name}")
    if instance.transfer_syntax_uid in accepted:
        return path
    if not accepted & _LITTLE_ENDIAN:
        names = ", ".join(sorted(uid.UID(s).name for s in accepted))
        raise NotSendable(f"peer accepts {sop_class.name} only as {names}")
    return transcoded(path, uid.UID(instance.transfer_syntax_uid))


def keep_responses(assoc: Association) -> None:
    """Make sure no C-STORE response of ``assoc`` is lost between its two threads.

    In pynetdicom 3.0 a requestor association's own reactor thread polls the received
    DIMSE messages between our sends. ``send_c_store`` pauses it first, but can find it
    just past its pause point: the reactor then takes the response off the queue, drops it
    as unexpected, and the send waits out ``dicom.dimse_timeout`` before pynetdicom aborts
    the association (seen here about once in 2,000 sub-operations on a loaded 2-core
    machine). So a response the reactor takes is put back where the send waits for it;
    anything else still goes to pynetdicom's own handling.
    """
    serve = assoc._serve_request
    queue = assoc.dimse.msg_queue

    def put_back_responses(message: Any, context_id: int) -> None:
        if message.is_valid_response:
            log.debug("a response pynetdicom's reactor took is put back for the send waiting on it")
            queue.put((context_id, message))
        else:
            serve(message, context_id)

    assoc._serve_request = put_back_responses  # type: ignore[method-assign,assignment]


def _may_store(assoc: Association, context: PresentationContext) -> bool:
    """Whether the node may send C-STORE on ``context``: as the requestor of a C-MOVE's
    association, always; on a C-GET's, only where the requestor proposed the SCP role
    (pynetdicom's unrestricted storage negotiation marks every storage context usable
    both ways, proposed or not)."""
    if not context.as_scu:
        return False
    if assoc.is_requestor:
        return True
    role = assoc.requestor.role_selection.get(uid.UID(str(context.abstract_syntax)))
    return role is not None and bool(role.scp_role)


def _peer(assoc: Association) -> str:
    """The AE title of the other side of ``assoc``."""
    return str(assoc.acceptor.ae_title if assoc.is_requestor else assoc.requestor.ae_title).strip()


def transcoded(path: Path, stored: uid.UID) -> Dataset:
    """The instance at ``path`` as a data set in Explicit VR Little Endian (or, when stored
    in another little endian uncompressed syntax, in that one: both re-encode freely).
    Raises :class:`NotSendable` when the file cannot be read or its pixel data decoded."""
    try:
        dataset = dcmread(path)
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        raise NotSendable(f"stored file unreadable: {type(exc).__name__}") from exc
    if stored in _LITTLE_ENDIAN:
        return dataset
    if stored == uid.ExplicitVRBigEndian:
        return _to_little_endian(dataset)
    try:
        # The same instance in another encoding, so under its own UID (pydicom would make
        # a new one): the peer asked for this instance, and may already hold it.
        dataset.decompress(generate_instance_uid=False)
    except Exception as exc:  # each decoder plug-in raises its own types
        raise NotSendable(f"cannot decode {stored.name} pixel data: {type(exc).__name__}") from exc
    return dataset


def _to_little_endian(dataset: Dataset) -> Dataset:
    """Convert a data set read as Explicit VR Big Endian to Explicit VR Little Endian.

    pydicom decodes numbers, text and tags by itself but keeps the values of OW, OF, OL,
    OD and OV as the file's bytes, which must be swapped item by item; pixel data by its
    cell size (Bits Allocated), since a 32-bit pixel is one item, not two words.
    """
    for item in _all_datasets(dataset):
        for element in item:
            if not isinstance(element.value, bytes):
                continue
            if element.tag == _PIXEL_DATA and item is dataset:
                bits = int(dataset.get("BitsAllocated", 16))
                size = bits // 8 if bits >= 16 else (2 if element.VR == "OW" else 1)
            else:
                size = _SWAPPED_VRS.get(element.VR, 1)
            if size > 1 and len(element.value) % size == 0:
                element.value = np.frombuffer(element.value, f">u{size}").astype(f"<u{size}").tobytes()
        item.set_original_encoding(False, True)
    dataset.file_meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
    return dataset


def _all_datasets(dataset: Dataset) -> Iterator[Dataset]:
    yield dataset
    for element in dataset:
        if element.VR == "SQ":
            for item in element.value:
                yield from _all_datasets(item)
