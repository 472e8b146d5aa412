"""The network edge: pynetdicom event handlers, and the one place where exceptions
become DIMSE statuses and association rejections."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from pydicom.dataset import Dataset
from pynetdicom.dimse_primitives import C_FIND, C_GET, C_MOVE, C_STORE
from pynetdicom.events import Event

from node.access import AccessPolicy, Permissions, Refusal
from node.catalog.recording import Catalog
from node.errors import (
    CatalogUnavailable,
    DatasetMismatch,
    DestinationUnavailable,
    IdentifierMismatch,
    IngestError,
    InstanceTooLarge,
    InvalidIdentifier,
    NotPermitted,
    NotSearchable,
    StorageUnavailable,
    TooManyMatches,
    UnknownDestination,
    UnprocessableQuery,
    UnreadableDataset,
)
from node.ingest import Ingestor, ReceivedInstance
from node.query import Model, parse_query
from node.retrieve import Originator, Plan, Progress, Retriever
from node.settings import Service, SimilaritySettings
from node.similar import SimilarityService, parse_similarity_request

log = logging.getLogger(__name__)

SUCCESS = 0x0000
# PS3.4 Annex B.2.3, C-STORE statuses.
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000
PROCESSING_FAILURE = 0xC001  # our own sub-code of "cannot understand": an internal fault

# PS3.7 9.1.1.1.9 and Annex C: a C-STORE the calling AE is not allowed to make.
REFUSED_NOT_AUTHORIZED = 0x0124

# PS3.4 C.4.1.1.4, C-FIND statuses (besides Success and the shared failures above).
PENDING = 0xFF00
CANCELLED = 0xFE00
IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS = 0xA900
UNABLE_TO_PROCESS = 0xC000
# Our own "unable to process" sub-code (after 0124 "not authorized", which PS3.4 does
# not list for Query/Retrieve): a C-FIND, C-MOVE or C-GET dicom.permissions refuses.
NOT_PERMITTED = 0xC124

# PS3.4 C.4.2.1.5 and C.4.3.1.4, C-MOVE and C-GET statuses (besides the C-FIND ones).
UNABLE_TO_CALCULATE_MATCHES = 0xA701
UNABLE_TO_PERFORM_SUBOPERATIONS = 0xA702
MOVE_DESTINATION_UNKNOWN = 0xA801
SUBOPERATIONS_WITH_FAILURES = 0xB000

# Every this many matches, the C-FIND handler lets the responses it has yielded be sent
# (see wait_until_sent): the bound on queued responses and on C-CANCEL latency.
_DRAIN_EVERY = 16
_DRAIN_POLL_S = 0.001

# Pending responses to a C-MOVE or C-GET are optional (PS3.4 C.4.2.3, C.4.3.3), and one per
# sub-operation costs a large retrieval about a fifth of its throughput. So a retrieval of
# up to this many instances reports after each, a larger one about this many times in all,
# and always at least once a second (a requestor waiting on a slow destination with a
# DIMSE timeout still hears from the node).
_PENDING_REPORTS = 100
_PENDING_AT_LEAST_EVERY_S = 1.0

_FIND_STATUS: dict[type[Exception], int] = {
    IdentifierMismatch: IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS,
    UnprocessableQuery: UNABLE_TO_PROCESS,
    NotSearchable: UNABLE_TO_PROCESS,
    NotPermitted: NOT_PERMITTED,
    CatalogUnavailable: OUT_OF_RESOURCES,
}

# A C-MOVE or C-GET refused as a whole, before any sub-operation.
_RETRIEVE_STATUS: dict[type[Exception], int] = {
    **_FIND_STATUS,
    UnknownDestination: MOVE_DESTINATION_UNKNOWN,
    TooManyMatches: UNABLE_TO_CALCULATE_MATCHES,
    CatalogUnavailable: UNABLE_TO_CALCULATE_MATCHES,
}

_STORE_STATUS: dict[type[Exception], int] = {
    NotPermitted: REFUSED_NOT_AUTHORIZED,
    UnreadableDataset: CANNOT_UNDERSTAND,
    InvalidIdentifier: DATASET_DOES_NOT_MATCH_SOP_CLASS,
    DatasetMismatch: DATASET_DOES_NOT_MATCH_SOP_CLASS,
    InstanceTooLarge: OUT_OF_RESOURCES,
    StorageUnavailable: OUT_OF_RESOURCES,
    CatalogUnavailable: OUT_OF_RESOURCES,
}

# A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 9.3.4: permanent, service user.
_REJECTION: dict[Refusal, tuple[int, int, int]] = {
    Refusal.CALLING_AE_NOT_RECOGNIZED: (0x01, 0x01, 0x03),
    Refusal.CALLED_AE_NOT_RECOGNIZED: (0x01, 0x01, 0x07),
}

_ERROR_COMMENT_MAX = 64  # LO


def handle_association_requested(event: Event, policy: AccessPolicy) -> str | None:
    """Reject, with the proper A-ASSOCIATE-RJ reason, a peer the policy refuses; return
    why, or None when the association goes on."""
    requestor = event.assoc.requestor
    primitive = requestor.primitive
    calling = str(primitive.calling_ae_title) if primitive is not None else ""
    called = str(primitive.called_ae_title) if primitive is not None else ""
    refusal = policy.refusal(calling, called, str(requestor.address))
    if refusal is None:
        return None
    log.warning(
        "association from %r at %s to %r rejected: %s",
        calling.strip(),
        requestor.address,
        called.strip(),
        refusal.value,
    )
    event.assoc.acse.send_reject(*_REJECTION[refusal])
    # As pynetdicom's own rejections do: wait until the DUL has sent the A-ASSOCIATE-RJ
    # and the peer has closed, or the socket is shut before the reply leaves.
    event.assoc.kill()
    return refusal.value


def handle_store(event: Event, ingestor: Ingestor, permissions: Permissions) -> int | Dataset:
    """Answer Success only once :meth:`Ingestor.ingest` has made the instance durable."""
    request = cast(C_STORE, event.request)
    calling = str(event.assoc.requestor.ae_title).strip()
    instance_uid = str(request.AffectedSOPInstanceUID)
    uid_for_log, calling_for_log = loggable(instance_uid), loggable(calling)
    received = ReceivedInstance(
        path=Path(event.dataset_path),
        sop_class_uid=str(request.AffectedSOPClassUID),
        sop_instance_uid=instance_uid,
        calling_ae_title=calling,
    )
    try:
        permissions.check(calling, "store")
        outcome, header = ingestor.ingest(received)
    except (IngestError, NotPermitted) as exc:
        status = _STORE_STATUS[type(exc)]
        log.warning(
            "C-STORE %s from %s refused, status 0x%04X: %s", uid_for_log, calling_for_log, status, exc
        )
        return failure(status, str(exc))
    except Exception as exc:
        log.exception("C-STORE %s from %s failed inside the node", uid_for_log, calling_for_log)
        return failure(PROCESSING_FAILURE, f"internal error: {type(exc).__name__}")
    log.info(
        "C-STORE %s from %s: %s (study %s)",
        header.sop_instance_uid,
        calling,
        outcome.value,
        header.study_instance_uid,
    )
    return SUCCESS


FindResponse = tuple[int | Dataset, Dataset | None]


@dataclass(frozen=True)
class SimilarityEdge:
    """What the similarity AE title answers with."""

    ae_title: str
    service: SimilarityService
    settings: SimilaritySettings


def handle_find(
    event: Event,
    catalog: Catalog,
    permissions: Permissions,
    ae_title: str,
    similarity: SimilarityEdge | None = None,
) -> Iterator[FindResponse]:
    """Answer a C-FIND with one Pending response per match, streamed from the catalog, or,
    to the similarity AE title, with the ranked similar cases.

    A C-CANCEL is honoured between matches. pynetdicom sends the final Success once this
    generator is exhausted.
    """
    calling = loggable(str(event.assoc.requestor.ae_title).strip())
    if similarity is not None and _called(event, ae_title) == similarity.ae_title:
        yield from _similar_cases(event, similarity, permissions, ae_title)
        return
    try:
        model = _query_retrieve_model(event, permissions, "query", ae_title)
        query = parse_query(event.identifier, model)
    except Exception as exc:
        yield _refused(f"C-FIND from {calling}", exc, _FIND_STATUS), None
        return
    matches = 0
    try:
        for row in catalog.stream(query.statement()):
            if matches % _DRAIN_EVERY == 0:
                wait_until_sent(event)
            if event.is_cancelled:
                log.info("C-FIND from %s cancelled after %d match(es)", calling, matches)
                yield CANCELLED, None
                return
            yield PENDING, query.response(row, ae_title)
            matches += 1
    except CatalogUnavailable as exc:
        log.warning("C-FIND from %s failed, status 0x%04X: %s", calling, OUT_OF_RESOURCES, exc)
        yield failure(OUT_OF_RESOURCES, str(exc)), None
        return
    except Exception as exc:
        log.exception("C-FIND from %s failed inside the node", calling)
        yield failure(PROCESSING_FAILURE, f"internal error: {type(exc).__name__}"), None
        return
    log.info("C-FIND %s level from %s: %d match(es)", query.level.value, calling, matches)


def _similar_cases(
    event: Event, similarity: SimilarityEdge, permissions: Permissions, ae_title: str
) -> Iterator[FindResponse]:
    calling = loggable(str(event.assoc.requestor.ae_title).strip())
    what = f"similarity C-FIND from {calling}"
    try:
        permissions.check(str(event.assoc.requestor.ae_title), "query")
        request = parse_similarity_request(event.identifier, similarity.settings)
        matches = similarity.service.answer(request, ae_title)
    except Exception as exc:
        if type(exc) not in _FIND_STATUS:
            log.exception("%s failed inside the node", what)
        yield _refused(what, exc, _FIND_STATUS), None
        return
    for count, identifier in enumerate(matches):
        if event.is_cancelled:
            log.info("%s cancelled after %d match(es)", what, count)
            yield CANCELLED, None
            return
        yield PENDING, identifier
    log.info("%s, %s level from %s: %d match(es)", what, request.level.value, request.uid, len(matches))


def _called(event: Event, ae_title: str) -> str:
    primitive = event.assoc.requestor.primitive
    return str(primitive.called_ae_title).strip() if primitive is not None else ae_title


def _query_retrieve_model(event: Event, permissions: Permissions, service: Service, ae_title: str) -> Model:
    """The information model of a C-FIND, C-MOVE or C-GET the calling AE may make, to the
    node's main AE title: the similarity title only answers C-FIND with similar cases."""
    permissions.check(str(event.assoc.requestor.ae_title), service)
    called = _called(event, ae_title)
    if called != ae_title:
        raise UnprocessableQuery(f"{loggable(called)} does not serve Query/Retrieve; ask {ae_title}")
    request = cast(C_FIND | C_MOVE | C_GET, event.request)
    model = Model.of_sop_class(str(request.AffectedSOPClassUID))
    if model is None:  # pynetdicom only calls the handlers for the contexts the acceptor supports
        raise IdentifierMismatch(f"not a Query/Retrieve SOP class: {request.AffectedSOPClassUID}")
    return model


RetrieveResponse = tuple[Dataset, Dataset | None]
# The sub-operations of a planned retrieval, counted into the Progress as they are iterated;
# a request refused as a whole (an unknown destination) raises when the transfer is made.
Transfer = Callable[[Plan, Progress], Iterator[Progress]]


def handle_move(
    event: Event, retriever: Retriever, permissions: Permissions, ae_title: str
) -> Iterator[RetrieveResponse]:
    """Answer a C-MOVE: send what its identifier selects to the destination it names, over
    a new association, reporting progress as it goes (see :func:`_retrieval`)."""
    request = cast(C_MOVE, event.request)
    calling = str(event.assoc.requestor.ae_title).strip()
    target = str(request.MoveDestination or "").strip()
    originator = Originator(calling, cast(int, request.MessageID))

    def transfer(plan: Plan, progress: Progress) -> Iterator[Progress]:
        destination = retriever.destination(target)
        return retriever.move(
            plan, destination, event.assoc.ae, originator, progress, lambda: event.is_cancelled
        )

    what = f"C-MOVE from {loggable(calling)} to {loggable(target)}"
    yield from _retrieval(event, what, retriever, permissions, ae_title, transfer)


def handle_get(
    event: Event, retriever: Retriever, permissions: Permissions, ae_title: str
) -> Iterator[RetrieveResponse]:
    """Answer a C-GET: send what its identifier selects back over the same association, on
    the storage contexts the requestor accepted with the SCP role (see :func:`_retrieval`)."""
    request = cast(C_GET, event.request)
    calling = str(event.assoc.requestor.ae_title).strip()

    def transfer(plan: Plan, progress: Progress) -> Iterator[Progress]:
        message_id = cast(int, request.MessageID)
        return retriever.get(plan, event.assoc, message_id, progress, lambda: event.is_cancelled)

    yield from _retrieval(
        event, f"C-GET from {loggable(calling)}", retriever, permissions, ae_title, transfer
    )


def _retrieval(
    event: Event, what: str, retriever: Retriever, permissions: Permissions, ae_title: str, transfer: Transfer
) -> Iterator[RetrieveResponse]:
    """The responses to a C-MOVE or C-GET (PS3.4 C.4.2.3, C.4.3.3).

    A request refused as a whole gets one failure with an Error Comment. Otherwise Pending
    responses follow the sub-operations (each of them, up to a hundred), and the final
    response carries the counts:
    Success; Warning 0xB000 when some failed or had warnings; Failure 0xA702 when all
    failed, or when the retrieval could not go on (the destination cannot be reached, the
    catalog fails midway: what was not sent counts as failed), with an Error Comment; Cancel
    0xFE00 after a C-CANCEL, with the remaining count. Warning, failure and cancel carry
    the Failed SOP Instance UID List.
    """
    try:
        model = _query_retrieve_model(event, permissions, "retrieve", ae_title)
        plan = retriever.plan(event.identifier, model)
        progress = Progress(plan.count)
        sub_operations = transfer(plan, progress)
    except Exception as exc:
        yield _refused(what, exc, _RETRIEVE_STATUS), None
        return
    every, last = max(1, plan.count // _PENDING_REPORTS), time.monotonic()
    try:
        for done, _ in enumerate(sub_operations if plan.count else (), start=1):
            if done % every == 0 or time.monotonic() - last >= _PENDING_AT_LEAST_EVERY_S:
                last = time.monotonic()
                yield _counts(PENDING, progress, remaining=True), None
    except (DestinationUnavailable, CatalogUnavailable) as exc:
        log.warning("%s stopped: %s", what, exc)
        progress.abandon(str(exc))
    except Exception as exc:
        log.exception("%s failed inside the node", what)
        progress.abandon(f"internal error: {type(exc).__name__}")
    log.info(
        "%s, %s level: %d instance(s): %d completed, %d failed, %d warning%s",
        what,
        plan.selection.level.value,
        plan.count,
        progress.completed,
        progress.failed,
        progress.warning,
        ", cancelled" if progress.cancelled else "",
    )
    yield _final(progress)  # the last response: node.qr_service reads no further


def _refused(what: str, exc: Exception, statuses: dict[type[Exception], int]) -> Dataset:
    """The failure response to a request refused as a whole, logged: the status of the
    exception's type, or "unable to process" for any other (pydicom decodes an identifier
    lazily, and a malformed one raises many types)."""
    status = statuses.get(type(exc))
    if status is None:
        log.warning("%s refused: identifier unreadable: %s", what, type(exc).__name__)
        return failure(UNABLE_TO_PROCESS, f"identifier unreadable: {type(exc).__name__}")
    log.warning("%s refused, status 0x%04X: %s", what, status, exc)
    return failure(status, str(exc))


def _final(progress: Progress) -> RetrieveResponse:
    failed_list = Dataset()
    failed_list.FailedSOPInstanceUIDList = progress.failed_uids
    if progress.cancelled:
        return _counts(CANCELLED, progress, remaining=True), failed_list
    if progress.stopped or (progress.failed and not (progress.completed or progress.warning)):
        return _counts(UNABLE_TO_PERFORM_SUBOPERATIONS, progress, comment=progress.last_failure), failed_list
    if progress.failed or progress.warning:
        return _counts(SUBOPERATIONS_WITH_FAILURES, progress), failed_list
    return _counts(SUCCESS, progress), None


def _counts(status: int, progress: Progress, *, remaining: bool = False, comment: str = "") -> Dataset:
    response = failure(status, comment) if comment else Dataset()
    response.Status = status
    if remaining:
        response.NumberOfRemainingSuboperations = progress.remaining
    response.NumberOfCompletedSuboperations = progress.completed
    response.NumberOfFailedSuboperations = progress.failed
    response.NumberOfWarningSuboperations = progress.warning
    return response


def wait_until_sent(event: Event) -> None:
    """Wait until pynetdicom has sent every response queued so far.

    Its DUL sends everything queued before it reads from the peer again, and queues
    without bound: a handler yielding matches as fast as the catalog streams them would
    hold the whole result set in memory and read a C-CANCEL only after the last match.
    """
    queued = event.assoc.dul.to_provider_queue
    while queued.qsize() and event.assoc.is_established:
        time.sleep(_DRAIN_POLL_S)


def loggable(text: str) -> str:
    """A peer-supplied value made safe for a log line: bounded, control characters escaped,
    so a UID holding a newline cannot forge log entries."""
    return ascii(text[:80])[1:-1]


def failure(status: int, comment: str) -> Dataset:
    """A failure response status with an Error Comment the peer's operator can read."""
    response = Dataset()
    response.Status = status
    text = comment.encode("ascii", "replace").decode("ascii").replace("\\", "/")
    response.ErrorComment = text[:_ERROR_COMMENT_MAX]
    return response


def discard_partial_dataset(event: Event) -> None:
    """Remove the data set of a C-STORE cut off by the end of its connection.

    pynetdicom writes it to ``incoming/`` as it arrives but neither passes it to
    :func:`handle_store` nor removes it, so each peer that drops mid-transfer would
    leave a file there until the next start. Runs in the connection's own thread,
    after its last byte was read.
    """
    message = getattr(event.assoc.dimse, "message", None)
    partial = getattr(message, "_data_set_file", None)
    if partial is None:
        return
    partial.close()
    Path(partial.name).unlink(missing_ok=True)
    requestor = event.assoc.requestor
    log.warning(
        "connection from %s at %s ended in the middle of a C-STORE: partial data set discarded",
        loggable(str(requestor.ae_title).strip()),
        requestor.address,
    )


def handle_association_event(event: Event) -> None:
    """Log association lifecycle at INFO: who, from where, with what outcome."""
    requestor = event.assoc.requestor
    log.info(
        "association %s: %s at %s:%s",
        event.event.name.removeprefix("EVT_").lower(),
        loggable(str(requestor.ae_title).strip()),
        requestor.address,
        requestor.port,
    )
