"""The network edge: pynetdicom event handlers, and the one place where exceptions
become DIMSE statuses and association rejections."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import cast

from pydicom.dataset import Dataset
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event

from node.access import AccessPolicy, Refusal
from node.errors import (
    CatalogUnavailable,
    DatasetMismatch,
    IngestError,
    InstanceTooLarge,
    InvalidIdentifier,
    StorageUnavailable,
    UnreadableDataset,
)
from node.ingest import Ingestor, ReceivedInstance

log = logging.getLogger(__name__)

SUCCESS = 0x0000
# PS3.4 Annex B.2.3, C-STORE statuses.
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000
PROCESSING_FAILURE = 0xC001  # our own sub-code of "cannot understand": an internal fault

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
        return store_failure(status, str(exc))
    except Exception as exc:
        log.exception("C-STORE %s from %s failed inside the node", uid_for_log, calling_for_log)
        return store_failure(PROCESSING_FAILURE, f"internal error: {type(exc).__name__}")
    log.info(
        "C-STORE %s from %s: %s (study %s)",
        header.sop_instance_uid,
        calling,
        outcome.value,
        header.study_instance_uid,
    )
    return SUCCESS


def loggable(text: str) -> str:
    """A peer-supplied value made safe for a log line: bounded, control characters escaped,
    so a UID holding a newline cannot forge log entries."""
    return ascii(text[:80])[1:-1]


def store_failure(status: int, comment: str) -> Dataset:
    """A C-STORE response status with an Error Comment the modality operator can read."""
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
