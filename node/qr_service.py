"""How C-MOVE and C-GET requests reach the node's handlers.

pynetdicom's own Query/Retrieve SCP runs C-MOVE and C-GET itself once a handler has named
the destination and counted the matches: it opens the destination's association, sends
the data sets a handler yields, and composes every response. That leaves no way to answer
a refused request (a permission, an identifier that does not fit) before it tries the
destination, to report an unreachable destination as a failure with its counts and an
Error Comment rather than as "destination unknown", or to send a file as stored without
decoding it. So for the Patient and Study Root MOVE and GET SOP classes the node puts
:class:`RetrieveServiceClass` in its place (:func:`install`): it triggers ``EVT_C_MOVE``
/ ``EVT_C_GET`` and sends each ``(status, identifier)`` pair the bound handler yields as
one response, exactly as given; the handler does everything else
(:func:`node.handlers.handle_move`, :func:`node.handlers.handle_get`). C-FIND, and every
other SOP class, is served by pynetdicom as before.

pynetdicom picks the service class of a request by SOP class, process-wide, so the
replacement is installed once per process, as :func:`node.acceptor.configure_pynetdicom`
sets pynetdicom's other switches; a handler bound to ``EVT_C_MOVE`` / ``EVT_C_GET`` in
this process must follow the protocol above.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from io import BytesIO
from typing import Any, cast

import pynetdicom.association
from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom.dimse_primitives import C_GET, C_MOVE
from pynetdicom.dsutils import encode
from pynetdicom.events import InterventionEvent
from pynetdicom.presentation import PresentationContext
from pynetdicom.service_class import QueryRetrieveServiceClass, ServiceClass
from pynetdicom.sop_class import uid_to_service_class

from node.query import PATIENT_ROOT_GET, PATIENT_ROOT_MOVE, STUDY_ROOT_GET, STUDY_ROOT_MOVE

log = logging.getLogger(__name__)

RETRIEVE_SOP_CLASSES = frozenset({PATIENT_ROOT_MOVE, STUDY_ROOT_MOVE, PATIENT_ROOT_GET, STUDY_ROOT_GET})
PENDING = 0xFF00
Response = tuple[int | Dataset, Dataset | None]
_HANDLER_FAILED = 0xC001  # as node.handlers.PROCESSING_FAILURE: a fault inside the node


class RetrieveServiceClass(QueryRetrieveServiceClass):
    """pynetdicom's Query/Retrieve service class, with C-MOVE and C-GET answered by what
    the node's handler yields."""

    def _move_scp(self, req: C_MOVE, context: PresentationContext) -> None:
        self._respond(req, context, evt.EVT_C_MOVE, C_MOVE)

    def _get_scp(self, req: C_GET, context: PresentationContext) -> None:
        self._respond(req, context, evt.EVT_C_GET, C_GET)

    def _respond(
        self,
        req: C_MOVE | C_GET,
        context: PresentationContext,
        event: InterventionEvent,
        primitive: type[C_MOVE] | type[C_GET],
    ) -> None:
        """Send each response the handler yields until a final (not Pending) one, or until
        the association ends; an exception in the handler ends the request with 0xC001."""
        attributes = {"request": req, "context": context.as_tuple, "_is_cancelled": self.is_cancelled}
        try:
            responses = cast(Iterable[Response], evt.trigger(self.assoc, event, attributes))
            for status, identifier in responses:
                if not self.assoc.is_established:
                    return
                rsp = self._response(req, context, primitive, status, identifier)
                self.dimse.send_msg(rsp, cast(int, context.context_id))
                if rsp.Status != PENDING:
                    return
        except Exception:
            log.exception("%s handler failed", event.name)
            if self.assoc.is_established:
                failed = self._response(req, context, primitive, _HANDLER_FAILED, None)
                self.dimse.send_msg(failed, cast(int, context.context_id))

    def _response(
        self,
        req: C_MOVE | C_GET,
        context: PresentationContext,
        primitive: type[C_MOVE] | type[C_GET],
        status: int | Dataset,
        identifier: Dataset | None,
    ) -> Any:
        rsp = primitive()
        rsp.MessageIDBeingRespondedTo = req.MessageID
        rsp.AffectedSOPClassUID = req.AffectedSOPClassUID
        rsp = self.validate_status(status, rsp)
        if identifier is not None:
            syntax = context.transfer_syntax[0]
            encoded = encode(identifier, syntax.is_implicit_VR, syntax.is_little_endian, syntax.is_deflated)
            if encoded is None:
                raise ValueError("the response identifier cannot be encoded")
            rsp.Identifier = BytesIO(encoded)
        return rsp


def _service_class(sop_class_uid: str) -> type[ServiceClass]:
    if sop_class_uid in RETRIEVE_SOP_CLASSES:
        return RetrieveServiceClass
    return uid_to_service_class(sop_class_uid)


def install() -> None:
    """Serve this process's Patient and Study Root C-MOVE and C-GET requests with
    :class:`RetrieveServiceClass` (idempotent)."""
    setattr(pynetdicom.association, "uid_to_service_class", _service_class)  # noqa: B010
