"""The network edge: pynetdicom event handlers, and the one place where exceptions
become DIMSE statuses and association rejections."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import cast

from pydicom.dataset import Dataset
from pynetdicom.dimse_primitives import C_FIND, C_STORE
from pynetdicom.events import Event

from node.access import AccessPolicy, Refusal
from node.catalog.recording import Catalog
from node.errors import (
    CatalogUnavailable,
    DatasetMismatch,
    IdentifierMismatch,
    IngestError,
    InstanceTooLarge,
    InvalidIdentifier,
    QueryError,
    StorageUnavailable,
    UnprocessableQuery,
    UnreadableDataset,
)
from node.ingest import Ingestor, ReceivedInstance
from node.query import Model, parse_query

log = logging.getLogger(__name__)

SUCCESS = 0x0000
# PS3.4 Annex B.2.3, C-STORE statuses.
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000
PROCESSING_FAILURE = 0xC001  # our own sub-code of "cannot understand": an internal fault

# PS3.4 C.4.1.1.4, C-FIND statuses (besides Success and the shared failures above).
PENDING = 0xFF00
CANCELLED = 0xFE00
IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS = 0xA900
UNABLE_TO_PROCESS = 0xC000

# Every this many matches, the C-FIND handler lets the responses it has yielded be sent
# (see wait_until_sent): the bound on queued responses and on C-CANCEL latency.
_DRAIN_EVERY = 16
_DRAIN_POLL_S = 0.001

_FIND_STATUS: dict[type[QueryError], int] = {
    IdentifierMismatch: IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS,
    UnprocessableQuery: UNABLE_TO_PROCESS,
}

_STORE_STATUS: dict[type[IngestError], int] = {
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


def handle_association_requested(event: Event, policy: AccessPolicy) -> None:
    """Reject, with the proper A-ASSOCIATE-RJ reason, a peer the policy refuses."""
    requestor = event.assoc.requestor
    primitive = requestor.primitive
    calling = str(primitive.calling_ae_title) if primitive is not None else ""
    called = str(primitive.called_ae_title) if primitive is not None else ""
    refusal = policy.refusal(calling, called, str(requestor.address))
    if refusal is None:
        return
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


def handle_store(event: Event, ingestor: Ingestor) -> int | Dataset:
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
        outcome, header = ingestor.ingest(received)
    except IngestError as exc:
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


def handle_find(event: Event, catalog: Catalog, ae_title: str) -> Iterator[FindResponse]:
    """Answer a C-FIND with one Pending response per match, streamed from the catalog.

    Only the node's main AE title serves Query/Retrieve; the similarity title will answer
    C-FIND with similar cases, which it cannot yet. A C-CANCEL is honoured between matches.
    pynetdicom sends the final Success once this generator is exhausted.
    """
    request = cast(C_FIND, event.request)
    calling = loggable(str(event.assoc.requestor.ae_title).strip())
    primitive = event.assoc.requestor.primitive
    called = str(primitive.called_ae_title).strip() if primitive is not None else ae_title
    try:
        if called != ae_title:
            raise UnprocessableQuery(f"{loggable(called)} does not serve Query/Retrieve; ask {ae_title}")
        model = Model.of_sop_class(str(request.AffectedSOPClassUID))
        if model is None:  # pynetdicom only calls this for the contexts the acceptor supports
            raise IdentifierMismatch(f"not a FIND SOP class: {request.AffectedSOPClassUID}")
        query = parse_query(event.identifier, model)
    except QueryError as exc:
        status = _FIND_STATUS[type(exc)]
        log.warning("C-FIND from %s refused, status 0x%04X: %s", calling, status, exc)
        yield failure(status, str(exc)), None
        return
    except Exception as exc:  # pydicom decodes the identifier lazily and raises many types
        log.warning("C-FIND from %s refused: identifier unreadable: %s", calling, type(exc).__name__)
        yield failure(UNABLE_TO_PROCESS, f"identifier unreadable: {type(exc).__name__}"), None
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
