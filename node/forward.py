"""Forwarding: results go to each ``[[destinations]]`` entry by C-STORE until they arrive.

One thread per destination, so a destination that is down or slow never holds up the
others. Each round claims what is due in the destination's queue (the catalog's
``deliveries`` table), sends it over one association and writes each answer:

* Success or Warning → delivered, with the status;
* a Failure status (the destination refused the object), or an object it accepts no
  presentation context for → recorded as refused with that status: resending would get
  the same answer;
* no association, an association that breaks, or no answer in time → the rest of the batch
  is due again after a backoff (doubling, capped), for as long as the destination is away.
"""

from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath

from pydicom import uid
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.status import STATUS_SUCCESS, STATUS_WARNING, code_to_category

from node.catalog.deliveries import DeliveryQueue, DueDelivery
from node.catalog.work import Claim
from node.errors import CatalogUnavailable
from node.retrieve import MAX_CONTEXTS, UNCOMPRESSED, NotSendable, StoredInstance, keep_responses, payload
from node.settings import Destination, ForwardingSettings
from node.sockets import send_without_delay
from node.storage import ObjectStore

log = logging.getLogger(__name__)


class Unreachable(Exception):
    """The destination cannot be associated with, or the association broke: try later."""


class NoContextAccepted(Exception):
    """The destination accepts none of the objects' SOP classes: it refuses them all."""


@dataclass(frozen=True)
class EchoResult:
    destination: Destination
    ok: bool
    detail: str


def result_destinations(destinations: Sequence[Destination]) -> list[Destination]:
    """The destinations results are forwarded to."""
    return [d for d in destinations if d.results]


def new_ae(ae_title: str, settings: ForwardingSettings) -> AE:
    """The requesting AE of the node's own associations to destinations."""
    ae = AE(ae_title=ae_title)
    ae.acse_timeout = settings.timeout_seconds
    ae.dimse_timeout = settings.timeout_seconds
    ae.network_timeout = settings.timeout_seconds
    ae.connection_timeout = settings.timeout_seconds
    return ae


def echo(destination: Destination, ae: AE, tls_args: tuple[ssl.SSLContext, str] | None = None) -> EchoResult:
    """C-ECHO one destination: what ``precedent destinations check`` shows."""
    assoc = ae.associate(
        destination.host,
        destination.port,
        contexts=[build_context(Verification)],
        ae_title=destination.ae_title,
        evt_handlers=[(evt.EVT_CONN_OPEN, send_without_delay)],
        tls_args=tls_args,
    )
    if not assoc.is_established:
        return EchoResult(destination, False, _association_failure(assoc, destination))
    try:
        status = assoc.send_c_echo()
    finally:
        if assoc.is_established:
            assoc.release()
    code = status.get("Status") if status else None
    if code == 0:
        return EchoResult(destination, True, "C-ECHO Success")
    return EchoResult(destination, False, "no C-ECHO answer" if code is None else f"C-ECHO 0x{code:04X}")


class DestinationForwarder:
    """Empties one destination's queue, round after round, in its own thread."""

    def __init__(
        self,
        destination: Destination,
        queue: DeliveryQueue,
        store: ObjectStore,
        ae: AE,
        settings: ForwardingSettings,
        *,
        tls_args: tuple[ssl.SSLContext, str] | None = None,
    ) -> None:
        """``tls_args``: pynetdicom's, for a destination with ``tls = true``
        (:meth:`node.tls.OutgoingTls.tls_args`)."""
        self.destination = destination
        self._queue = queue
        self._store = store
        self._ae = ae
        self._settings = settings
        self._tls_args = tls_args
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failures_in_a_row = 0

    def run_once(self) -> int:
        """Send one batch of what is due; returns how many objects were answered."""
        claim, due = self._queue.claim_due(
            self.destination.name, self._settings.batch_size, self._settings.lease_seconds
        )
        if not due:
            return 0
        try:
            answered = self._send_batch(claim, due)
        except Unreachable as exc:
            self._postpone(claim, [d.delivery_id for d in due], str(exc))
            return 0
        except NoContextAccepted as exc:
            for delivery in due:
                self._queue.refused(claim, delivery.delivery_id, None, str(exc))
            log.warning("%d objects refused by %s: %s", len(due), self.destination.name, exc)
            return len(due)
        if answered == len(due):
            self._failures_in_a_row = 0
        return answered

    def _send_batch(self, claim: Claim, due: list[DueDelivery]) -> int:
        assoc = self._associate(due)
        answered = 0
        try:
            for index, delivery in enumerate(due):
                if not assoc.is_established:
                    rest = [d.delivery_id for d in due[index:]]
                    self._postpone(claim, rest, f"association with {self.destination.ae_title} ended")
                    break
                self._send_one(assoc, claim, delivery)
                answered += 1
        finally:
            if assoc.is_established:
                assoc.release()
        return answered

    def _associate(self, due: list[DueDelivery]) -> Association:
        classes = sorted({d.sop_class_uid for d in due})
        contexts = [build_context(sop_class, UNCOMPRESSED) for sop_class in classes]
        stored = sorted({(d.sop_class_uid, d.transfer_syntax_uid) for d in due})
        contexts += [build_context(c, [s]) for c, s in stored if uid.UID(s) not in UNCOMPRESSED]
        assoc = self._ae.associate(
            self.destination.host,
            self.destination.port,
            contexts=contexts[:MAX_CONTEXTS],
            ae_title=self.destination.ae_title,
            evt_handlers=[(evt.EVT_CONN_OPEN, send_without_delay)],
            tls_args=self._tls_args,
        )
        if not assoc.is_established and assoc.rejected_contexts and not assoc.accepted_contexts:
            # pynetdicom aborts an association whose contexts were all rejected
            raise NoContextAccepted(_association_failure(assoc, self.destination))
        if not assoc.is_established:
            raise Unreachable(_association_failure(assoc, self.destination))
        keep_responses(assoc)
        return assoc

    def _send_one(self, assoc: Association, claim: Claim, delivery: DueDelivery) -> None:
        instance = StoredInstance(
            delivery.sop_instance_uid,
            delivery.sop_class_uid,
            delivery.transfer_syntax_uid,
            delivery.file_path,
        )
        try:
            sent = payload(assoc, instance, self._store.absolute(PurePosixPath(delivery.file_path)))
        except NotSendable as exc:
            self._queue.refused(claim, delivery.delivery_id, None, str(exc))
            log.warning("%s not sent to %s: %s", delivery.sop_instance_uid, self.destination.name, exc)
            return
        status = assoc.send_c_store(sent)
        code = status.get("Status") if status else None
        if code is None:  # no answer in time: pynetdicom has aborted the association
            self._postpone(claim, [delivery.delivery_id], f"{self.destination.ae_title} did not answer")
            return
        category = code_to_category(int(code))
        if category in (STATUS_SUCCESS, STATUS_WARNING):
            self._queue.delivered(claim, delivery.delivery_id, int(code))
            log.info("%s delivered to %s (0x%04X)", delivery.sop_instance_uid, self.destination.name, code)
            return
        comment = str(status.get("ErrorComment", "")).strip()
        reason = f"{self.destination.ae_title} refused it: 0x{code:04X}" + (f" {comment}" if comment else "")
        self._queue.refused(claim, delivery.delivery_id, int(code), reason)
        log.warning("%s refused by %s: %s", delivery.sop_instance_uid, self.destination.name, reason)

    def _postpone(self, claim: Claim, ids: list[int], reason: str) -> None:
        self._failures_in_a_row += 1
        s = self._settings
        delay = min(
            s.retry_backoff_seconds * 2 ** min(self._failures_in_a_row - 1, 30), s.max_backoff_seconds
        )
        self._queue.retry_later(claim, ids, reason, delay)
        log.warning("%d objects for %s wait %.0f s: %s", len(ids), self.destination.name, delay, reason)

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._run, name=f"forward-{self.destination.name}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self._settings.timeout_seconds + 5)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                busy = self.run_once() > 0
            except CatalogUnavailable as exc:
                log.error("forwarding to %s: %s", self.destination.name, exc)
                busy = False
            except Exception:  # the thread must outlive any one bad round
                log.exception("forwarding round for %s failed", self.destination.name)
                busy = False
            if not busy:
                self._stop.wait(self._settings.poll_seconds)


def _association_failure(assoc: Association, destination: Destination) -> str:
    where = f"{destination.ae_title} at {destination.host}:{destination.port}"
    if assoc.is_rejected:
        return f"{where} rejected the association"
    if assoc.is_aborted and assoc.rejected_contexts:
        return f"{where} accepted none of the proposed presentation contexts"
    return f"{where} cannot be reached"
