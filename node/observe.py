"""What happened at the network edge, told to whoever keeps count of it.

The metrics and the audit trail both need the same facts about every request a peer
makes (who, from where, what, with which outcome, how long it took), and neither should
be threaded through each handler. So the acceptor wraps its handlers here: each wrapper
times the handler, reads the final status it answered with, and gives every observer one
:class:`EdgeEvent`. An observer must not raise and must not block: it is called on the
association's own thread, before the next message of that peer is read.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, cast

from pydicom.dataset import Dataset
from pynetdicom.dimse_primitives import C_FIND, C_GET, C_MOVE, C_STORE
from pynetdicom.events import Event

log = logging.getLogger(__name__)

EdgeService = Literal["associate", "store", "find", "similar", "move", "get"]

# The identifier keys an audit names a query or retrieval by; matching keys such as the
# patient's name stay out (they are in the catalog, and the audit is not a second index).
_QUERY_KEYS = (
    "QueryRetrieveLevel",
    "PatientID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "AccessionNumber",
    "StudyDate",
    "ModalitiesInStudy",
    "Modality",
)
_SUBJECT_VALUE_MAX = 256


@dataclass(frozen=True)
class EdgeEvent:
    """One request a peer made, as answered.

    ``status`` is the DIMSE status of the final response (0 Success), or for ``associate``
    the A-ASSOCIATE-RJ diagnostic of a rejection. ``subject`` names what was asked for: the
    SOP Class and Instance UIDs of a C-STORE, the identifier's keys of a query or retrieval
    (and the move destination). ``count`` is the matches of a C-FIND, the completed
    sub-operations of a C-MOVE or C-GET.
    """

    service: EdgeService
    calling_ae: str
    called_ae: str
    address: str
    status: int
    seconds: float
    subject: dict[str, str] = field(default_factory=dict)
    size: int = 0
    count: int = 0
    reason: str = ""
    at: float = field(default_factory=time.time)


class EdgeObserver(Protocol):
    def observe(self, event: EdgeEvent) -> None: ...


class EdgeObservers:
    """The observers of one acceptor, told in turn; one that raises is logged and skipped,
    so counting can never cost a peer its answer."""

    def __init__(self, observers: Sequence[EdgeObserver] = (), *, similar_ae_title: str = "") -> None:
        self._observers = list(observers)
        self._similar_ae_title = similar_ae_title

    def __bool__(self) -> bool:
        return bool(self._observers)

    def tell(self, event: EdgeEvent) -> None:
        for observer in self._observers:
            try:
                observer.observe(event)
            except Exception:
                log.exception("%s failed to observe a %s", type(observer).__name__, event.service)

    def store(self, handler: Callable[..., int | Dataset]) -> Callable[..., int | Dataset]:
        """Wrap a C-STORE handler; the received size is read before the handler moves the file."""

        def observed(event: Event, *args: Any) -> int | Dataset:
            started = time.perf_counter()
            size = _file_size(event)
            answer = handler(event, *args)
            request = cast(C_STORE, event.request)
            self.tell(
                _edge_event(
                    event,
                    "store",
                    status=_status_of(answer),
                    seconds=time.perf_counter() - started,
                    subject={
                        "SOPClassUID": str(request.AffectedSOPClassUID or ""),
                        "SOPInstanceUID": str(request.AffectedSOPInstanceUID or ""),
                    },
                    size=size,
                    reason=_comment_of(answer),
                )
            )
            return answer

        return observed

    def responses(
        self, handler: Callable[..., Iterator[tuple[Any, Dataset | None]]], service: EdgeService
    ) -> Callable[..., Iterator[tuple[Any, Dataset | None]]]:
        """Wrap a C-FIND, C-MOVE or C-GET handler (a generator of responses): the event is
        told when the handler is exhausted or closed (a peer gone mid-answer)."""

        def observed(event: Event, *args: Any) -> Iterator[tuple[Any, Dataset | None]]:
            started = time.perf_counter()
            status, matches, last = 0, 0, None
            try:
                for response in handler(event, *args):
                    status = _status_of(response[0])
                    if status in (0xFF00, 0xFF01):
                        matches += 1
                    last = response[0]
                    yield response
            finally:
                kind = self._service_of(event, service)
                count = matches if kind in ("find", "similar") else _completed(last)
                self.tell(
                    _edge_event(
                        event,
                        kind,
                        status=0 if status in (0xFF00, 0xFF01) else status,
                        seconds=time.perf_counter() - started,
                        subject=_query_subject(event),
                        count=count,
                        reason=_comment_of(last),
                    )
                )

        return observed

    def requested(self, handler: Callable[..., str | None]) -> Callable[..., None]:
        """Wrap the association-request handler: a rejection (it returns the reason) is told."""

        def observed(event: Event, *args: Any) -> None:
            started = time.perf_counter()
            refusal = handler(event, *args)
            if refusal is not None:
                self.tell(
                    _edge_event(
                        event, "associate", status=1, seconds=time.perf_counter() - started, reason=refusal
                    )
                )

        return observed

    def _service_of(self, event: Event, service: EdgeService) -> EdgeService:
        """A C-FIND to the similarity AE title is a similarity search."""
        if service == "find" and self._similar_ae_title and _called_ae(event) == self._similar_ae_title:
            return "similar"
        return service


def _called_ae(event: Event) -> str:
    primitive = event.assoc.requestor.primitive
    return str(primitive.called_ae_title).strip() if primitive is not None else ""


def _calling_ae(event: Event) -> str:
    """From the A-ASSOCIATE-RQ: pynetdicom sets the requestor's AE title only as it
    negotiates, after a rejection has been decided."""
    requestor = event.assoc.requestor
    primitive = requestor.primitive
    return str(primitive.calling_ae_title if primitive is not None else requestor.ae_title).strip()


def _edge_event(event: Event, service: EdgeService, **values: Any) -> EdgeEvent:
    requestor = event.assoc.requestor
    return EdgeEvent(
        service=service,
        calling_ae=_calling_ae(event),
        called_ae=_called_ae(event),
        address=str(requestor.address),
        **values,
    )


def _status_of(answer: object) -> int:
    if isinstance(answer, int):
        return answer
    if isinstance(answer, Dataset):
        return int(answer.get("Status", 0))
    return 0


def _comment_of(answer: object) -> str:
    return str(answer.get("ErrorComment", "")) if isinstance(answer, Dataset) else ""


def _completed(answer: object) -> int:
    if isinstance(answer, Dataset):
        return int(answer.get("NumberOfCompletedSuboperations", 0) or 0)
    return 0


def _file_size(event: Event) -> int:
    try:
        return Path(event.dataset_path).stat().st_size
    except (OSError, AttributeError, ValueError):
        return 0


def _identifier(event: Event) -> Dataset | None:
    try:
        return event.identifier
    except Exception:  # a malformed identifier raises many types; the handler has refused it
        return None


def _query_subject(event: Event) -> dict[str, str]:
    """The identifier's naming keys, as sent; an unreadable identifier is said to be one."""
    subject: dict[str, str] = {}
    request = cast(C_FIND | C_MOVE | C_GET, event.request)
    subject["SOPClassUID"] = str(request.AffectedSOPClassUID or "")
    if isinstance(request, C_MOVE):
        subject["MoveDestination"] = str(request.MoveDestination or "").strip()
    identifier = _identifier(event)
    if identifier is None:
        subject["identifier"] = "unreadable"
        return subject
    for keyword in _QUERY_KEYS:
        try:
            value = identifier.get(keyword)
        except Exception:
            subject[keyword] = "unreadable"
            continue
        if value is not None and str(value) != "":
            subject[keyword] = str(value)[:_SUBJECT_VALUE_MAX]
    return subject
