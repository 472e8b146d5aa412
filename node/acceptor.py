"""The DICOM acceptor: one pynetdicom AE listening for the node's AE titles.

pynetdicom's switches are module-level; :func:`configure_pynetdicom` sets the
ones the node relies on, once per process, before the AE exists:

* received data sets are streamed to a file in ``incoming/`` instead of being
  decoded in memory (bounded memory for large mammograms; no parse on receipt);
* a file sent as stored (C-MOVE, C-GET) is streamed from disk as it is, not decoded
  and re-encoded;
* presentation contexts of private or unknown storage SOP classes are accepted
  when ``dicom.accept_private_sop_classes`` is on (vendor mammography objects);
* C-MOVE and C-GET are served by the node's handlers (:mod:`node.qr_service`).
"""

from __future__ import annotations

import logging
import socket
import ssl
import tempfile
import time
from pathlib import Path

from pydicom import uid
from pynetdicom import AE, _config, evt
from pynetdicom.events import Event, EventHandlerType
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)
from pynetdicom.transport import ThreadedAssociationServer

from node import qr_service
from node.access import AccessPolicy, Permissions
from node.catalog.recording import Catalog
from node.handlers import (
    SimilarityEdge,
    discard_partial_dataset,
    handle_association_event,
    handle_association_requested,
    handle_find,
    handle_get,
    handle_move,
    handle_store,
)
from node.ingest import Ingestor
from node.observe import EdgeObservers
from node.retrieve import Retriever
from node.settings import Destination, DicomSettings
from node.sockets import send_without_delay
from node.storage import ObjectStore
from node.tls import PLAIN, OutgoingTls, complete_handshake

log = logging.getLogger(__name__)

# Identifiers are small: the two uncompressed syntaxes every peer offers suffice.
QUERY_TRANSFER_SYNTAXES: list[str] = [uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian]
QUERY_RETRIEVE_SOP_CLASSES = [
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelMove,
    PatientRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelGet,
]

# Accepted as sent; the node never transcodes on receipt.
STORAGE_TRANSFER_SYNTAXES: list[str] = [
    uid.ExplicitVRLittleEndian,
    uid.ImplicitVRLittleEndian,
    uid.DeflatedExplicitVRLittleEndian,
    uid.ExplicitVRBigEndian,
    uid.JPEGBaseline8Bit,
    uid.JPEGExtended12Bit,
    uid.JPEGLossless,
    uid.JPEGLosslessSV1,
    uid.JPEGLSLossless,
    uid.JPEGLSNearLossless,
    uid.JPEG2000Lossless,
    uid.JPEG2000,
    uid.HTJ2KLossless,
    uid.HTJ2KLosslessRPCL,
    uid.HTJ2K,
    uid.RLELossless,
    uid.MPEG2MPML,
    uid.MPEG2MPHL,
    uid.MPEG4HP41,
    uid.MPEG4HP41BD,
    uid.HEVCMP51,
]


def configure_pynetdicom(incoming_dir: Path, *, accept_private_sop_classes: bool) -> str | None:
    """Set pynetdicom's switches for this process; return the previous temp dir to restore."""
    _config.STORE_RECV_CHUNKED_DATASET = True
    _config.STORE_SEND_CHUNKED_DATASET = True
    _config.UNRESTRICTED_STORAGE_SERVICE = accept_private_sop_classes
    qr_service.install()
    _config.VALIDATORS["UI"] = _any_uid
    # pynetdicom creates its receive files with tempfile; keep them on the data disk
    # so that placing one is a rename, not a copy.
    previous = tempfile.tempdir
    tempfile.tempdir = str(incoming_dir)
    return previous


def _any_uid(value: object) -> tuple[bool, str]:
    """pynetdicom aborts the association on a command UID over 64 characters, before any
    handler runs and leaving the received file behind; the node judges UIDs itself
    (:func:`node.header.clean_uid`) and answers such a request with a status."""
    return True, ""


class Acceptor:
    """Listens on ``dicom.bind:dicom.port`` and serves associations until stopped."""

    def __init__(
        self,
        settings: DicomSettings,
        ingestor: Ingestor,
        catalog: Catalog,
        *,
        store: ObjectStore,
        destinations: list[Destination] | None = None,
        similarity: SimilarityEdge | None = None,
        observers: EdgeObservers | None = None,
        tls: ssl.SSLContext | None = None,
        outgoing: OutgoingTls = PLAIN,
    ) -> None:
        self._settings = settings
        self._tls = tls
        self._observers = observers or EdgeObservers()
        self._ingestor = ingestor
        self._catalog = catalog
        self._retriever = Retriever(catalog, store, destinations or [], outgoing)
        self._similarity = similarity
        self._policy = AccessPolicy(settings.calling_aes(), {settings.ae_title, settings.similar_ae_title})
        self._permissions = Permissions(settings)
        self._ae = self._build_ae()
        self._server: ThreadedAssociationServer | None = None

    def _build_ae(self) -> AE:
        s = self._settings
        ae = AE(ae_title=s.ae_title)
        ae.maximum_associations = s.max_associations
        ae.maximum_pdu_size = s.max_pdu
        ae.acse_timeout = s.acse_timeout
        ae.dimse_timeout = s.dimse_timeout
        ae.network_timeout = s.network_timeout
        ae.connection_timeout = s.acse_timeout  # a C-MOVE's destination that never answers
        ae.require_called_aet = False  # checked by the access policy: two titles, one port
        ae.add_supported_context(Verification, QUERY_TRANSFER_SYNTAXES)
        for sop_class in QUERY_RETRIEVE_SOP_CLASSES:
            ae.add_supported_context(sop_class, QUERY_TRANSFER_SYNTAXES)
        # Role selection accepted as proposed: a C-GET requestor takes the SCP role of the
        # storage SOP classes it wants to receive.
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(
                str(context.abstract_syntax), STORAGE_TRANSFER_SYNTAXES, scu_role=True, scp_role=True
            )
        return ae

    def start(self) -> tuple[str, int]:
        """Start listening in background threads; return the bound address."""
        observed = self._observers
        handlers: list[EventHandlerType] = [
            (evt.EVT_REQUESTED, observed.requested(handle_association_requested), [self._policy]),
            (evt.EVT_C_STORE, observed.store(handle_store), [self._ingestor, self._permissions]),
            (
                evt.EVT_C_FIND,
                observed.responses(handle_find, "find"),
                [self._catalog, self._permissions, self._settings.ae_title, self._similarity],
            ),
            (
                evt.EVT_C_MOVE,
                observed.responses(handle_move, "move"),
                [self._retriever, self._permissions, self._settings.ae_title],
            ),
            (
                evt.EVT_C_GET,
                observed.responses(handle_get, "get"),
                [self._retriever, self._permissions, self._settings.ae_title],
            ),
            (evt.EVT_ACCEPTED, handle_association_event),
            (evt.EVT_RELEASED, handle_association_event),
            (evt.EVT_ABORTED, handle_association_event),
            (evt.EVT_CONN_OPEN, send_without_delay),
            (evt.EVT_CONN_OPEN, end_stalled_reads, [self._settings.network_timeout]),
            (evt.EVT_CONN_CLOSE, discard_partial_dataset),
        ]
        if self._tls is not None:
            handlers.append((evt.EVT_CONN_OPEN, complete_handshake, [self._settings.acse_timeout]))
        self._server = self._ae.start_server(
            (self._settings.bind, self._settings.port),
            block=False,
            evt_handlers=handlers,
            ssl_context=self._tls,
        )
        assert self._server is not None
        host, port = self._server.server_address[:2]
        log.info(
            "listening on %s:%s as %s (similarity: %s)%s",
            host,
            port,
            self._settings.ae_title,
            self._settings.similar_ae_title,
            " over TLS" if self._tls is not None else "",
        )
        return str(host), int(port)

    def active_associations(self) -> int:
        return len(self._server.active_associations) if self._server else 0

    def stop(self, timeout: float) -> bool:
        """Stop listening, let associations in flight finish for up to ``timeout`` seconds,
        then abort the rest. Returns True when none had to be aborted."""
        if self._server is None:
            return True
        server, self._server = self._server, None
        server.shutdown()
        deadline = time.monotonic() + timeout
        while server.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        remaining = len(server.active_associations)
        if remaining:
            log.warning("aborting %d association(s) still open after %.0f s", remaining, timeout)
        self._ae.shutdown()
        return remaining == 0


def end_stalled_reads(event: Event, timeout: float) -> None:
    """EVT_CONN_OPEN: no read or write on the connection waits more than ``timeout``
    seconds (``dicom.network_timeout``).

    pynetdicom reads a PDU with blocking receives once its first bytes have arrived, and
    checks its own network timeout only between PDUs, in the thread that is blocked. A peer
    that stops in the middle of a PDU (a modality switched off mid-push, a link gone without
    a reset) would hold the connection's thread, its association slot and its partial file
    in ``incoming/`` until the peer closed the connection, which a vanished peer never
    does. With a socket timeout the receive fails, pynetdicom closes the connection and
    :func:`~node.handlers.discard_partial_dataset` removes the file.
    """
    channel = getattr(event.assoc.dul.socket, "socket", None)
    if isinstance(channel, socket.socket):
        channel.settimeout(timeout)
