"""The audit trail: who asked the node for what, from where, when, and how it was answered.

Every request a peer makes at the network edge (told by :mod:`node.observe`) and every
``precedent`` command that reads or changes the node's data becomes one row of
``audit_events`` in the catalog, where the nodes sharing a catalog keep one trail, and
``precedent audit`` exports it. Rows name AE titles, addresses, UIDs and the keys a
request named, never a patient's name: :mod:`node.observe` leaves matching keys out.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import pwd
import re
import socket
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime, timedelta
from itertools import islice
from pathlib import Path
from typing import Any, Literal, TextIO

from pynetdicom.status import STATUS_CANCEL, STATUS_SUCCESS, STATUS_WARNING, code_to_category
from sqlalchemy import insert, select
from sqlalchemy.engine import Row, make_url
from sqlalchemy.exc import ArgumentError

from node.catalog.models import AUDIT_EVENTS
from node.catalog.recording import Catalog
from node.errors import CatalogUnavailable
from node.observe import EdgeEvent
from node.settings import AuditSettings

log = logging.getLogger(__name__)

Actor = Literal["dicom", "admin"]
Outcome = Literal["success", "warning", "failure", "cancelled", "rejected"]
ACTORS: tuple[Actor, ...] = ("dicom", "admin")
# The action of the row that stands for requests served but not recorded (queue full).
DROPPED = "dropped"

# Events per transaction: a backlog left by an outage drains in few transactions, none of
# which holds SQLite's write lock (which every C-STORE needs) for long.
_BATCH = 1000
_MAX_RETRY_SECONDS = 10.0
_OUTCOMES: dict[str, Outcome] = {
    STATUS_SUCCESS: "success",
    STATUS_WARNING: "warning",
    STATUS_CANCEL: "cancelled",
}
_SECRET_ARGUMENT = re.compile(r"password|passwd|secret|token", re.IGNORECASE)
_URL_PASSWORD = re.compile(r"(://[^/@:\s]*:)[^@/\s]*@")
_AGE = re.compile(r"(\d{1,9})([smhdw])")
_AGE_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


@dataclass(frozen=True)
class AuditRecord:
    """One row of the trail as it is exported; the field order is the CSV's column order."""

    id: int
    at: datetime
    host: str
    actor: str
    action: str
    calling_ae: str
    called_ae: str
    address: str
    user: str
    status: int
    outcome: str
    subject: dict[str, Any]
    count: int
    size: int
    reason: str

    def exported(self) -> dict[str, Any]:
        """The record with its time in ISO 8601 (UTC), as JSON and CSV write it."""
        return {**asdict(self), "at": self.at.isoformat()}


COLUMNS = tuple(field.name for field in fields(AuditRecord))


class AuditTrail:
    """Keeps the trail: an :class:`~node.observe.EdgeObserver` whose events are written
    by one background thread, in batches (one transaction each, every
    ``audit.flush_seconds``), and the reader of what was written.

    :meth:`observe` runs on the association's thread, before the peer's next message is
    read, so it only puts the event in a queue in memory: a slow or unreachable catalog
    never holds up a peer. While the catalog is unreachable the events wait, in order, and
    the writer retries (backing off up to 10 s) until they are written; nothing is lost to
    an outage. The queue is bounded by ``audit.max_queued``: beyond it, further events are
    counted instead of kept, one WARNING says so, and once the catalog is back a
    ``dropped`` row records how many requests went unrecorded, and since when. That is the
    trade-off, chosen on purpose: blocking the edge instead would turn an audit outage into
    a DICOM outage (a modality's images refused because a log could not be written), and
    an unbounded queue would turn it into a node out of memory. The bound is reached only
    by a long outage under load; a C-STORE cannot be catalogued in such an outage either.
    A node stopped normally writes everything queued (:meth:`stop`); one killed outright (a
    power cut) loses what it had not written yet: normally its last ``audit.flush_seconds``.
    """

    def __init__(self, catalog: Catalog, settings: AuditSettings, host: str | None = None) -> None:
        self._catalog = catalog
        self._settings = settings
        self.host = host if host is not None else socket.gethostname()
        self._pending: deque[EdgeEvent] = deque()
        self._dropped = 0  # counted, not yet recorded as a "dropped" row
        self._dropped_since = 0.0
        self.dropped_total = 0
        self._lock = threading.Lock()  # the queue and its counts: held for microseconds only
        self._writing = threading.Lock()  # one writer at a time: the thread, or stop()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def queued(self) -> int:
        with self._lock:
            return len(self._pending)

    def observe(self, event: EdgeEvent) -> None:
        """Queue ``event`` for the writer; never waits for the catalog, never raises."""
        with self._lock:
            if len(self._pending) < self._settings.max_queued:
                self._pending.append(event)
                return
            first = self._dropped == 0
            if first:
                self._dropped_since = event.at
            self._dropped += 1
            self.dropped_total += 1
        if first:
            log.warning(
                "audit trail: %d events wait for the catalog (audit.max_queued); further requests "
                "are served but not recorded, only counted, until it catches up",
                self._settings.max_queued,
            )

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="audit", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> bool:
        """Stop the writer, then write everything still queued, retrying a catalog that is
        unreachable for up to ``timeout`` seconds. Returns whether everything was written;
        what could not be is named in an ERROR."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.flush()
                return True
            except Exception as exc:  # CatalogUnavailable, or a row the database will not take
                if time.monotonic() >= deadline:
                    with self._lock:
                        lost = len(self._pending) + self._dropped
                    log.error("audit trail: %d requests not recorded at shutdown: %s", lost, exc)
                    return False
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))

    def flush(self) -> int:
        """Write what is queued, one transaction per batch, and return how many events were
        written. Raises :class:`~node.errors.CatalogUnavailable` when the catalog cannot
        take them: they stay queued, in order, for the next try."""
        written = 0
        with self._writing:
            while True:
                with self._lock:
                    events = list(islice(self._pending, _BATCH))
                    dropped, dropped_since = self._dropped, self._dropped_since
                if not events and not dropped:
                    return written
                rows = [self._row(event) for event in events]
                if dropped:
                    rows.append(self._dropped_row(dropped, dropped_since))
                with self._catalog.transaction() as connection:
                    connection.execute(insert(AUDIT_EVENTS), rows)
                with self._lock:  # observers only append and count: the head is what was written
                    for _ in events:
                        self._pending.popleft()
                    self._dropped -= dropped
                written += len(events)
                if len(events) < _BATCH:
                    return written

    def record_command(
        self,
        action: str,
        subject: Mapping[str, Any],
        *,
        user: str,
        status: int,
        outcome: Outcome,
        reason: str = "",
    ) -> None:
        """Write the row of an administrator's command now, in its own transaction: a command
        is audited once it has ended, by the process that ran it. Raises
        :class:`~node.errors.CatalogUnavailable`."""
        row = {
            **_empty_row(),
            "at": datetime.now(UTC),
            "actor": "admin",
            "action": action,
            "user": _clean(user),
            "host": self.host,
            "status": status,
            "outcome": outcome,
            "subject": _clean_json(dict(subject)),
            "reason": _clean(reason),
        }
        with self._catalog.transaction() as connection:
            connection.execute(insert(AUDIT_EVENTS), [row])

    def events(
        self,
        since: datetime | None = None,
        until: datetime | None = None,
        *,
        actor: str | None = None,
        action: str | None = None,
        calling_ae: str | None = None,
        limit: int | None = None,
    ) -> Iterator[AuditRecord]:
        """The recorded events from ``since`` (inclusive) to ``until`` (exclusive), in id
        (commit) order, fetched as they are consumed. Naive times are taken as UTC."""
        columns = AUDIT_EVENTS.c
        statement = select(AUDIT_EVENTS).order_by(columns.id)
        if since is not None:
            statement = statement.where(columns.at >= _utc(since))
        if until is not None:
            statement = statement.where(columns.at < _utc(until))
        if actor is not None:
            statement = statement.where(columns.actor == actor)
        if action is not None:
            statement = statement.where(columns.action == action)
        if calling_ae is not None:
            statement = statement.where(columns.calling_ae == calling_ae)
        if limit is not None:
            statement = statement.limit(limit)
        for row in self._catalog.stream(statement):
            yield _record(row)

    def _run(self) -> None:
        delay = self._settings.flush_seconds
        failing_since: float | None = None
        while not self._stop.wait(delay):
            try:
                self.flush()
            except Exception as exc:  # the writer must outlive any outage and any bad round
                if failing_since is None:
                    failing_since = time.monotonic()
                    if isinstance(exc, CatalogUnavailable):
                        log.error("audit trail: %s; %d events wait and are retried", exc, self.queued)
                    else:
                        log.exception(
                            "audit trail: writing failed; %d events wait and are retried", self.queued
                        )
                delay = min(delay * 2, _MAX_RETRY_SECONDS)
                continue
            if failing_since is not None:
                log.info("audit trail written again after %.0f s", time.monotonic() - failing_since)
                failing_since = None
            delay = self._settings.flush_seconds

    def _row(self, event: EdgeEvent) -> dict[str, Any]:
        return {
            **_empty_row(),
            "at": datetime.fromtimestamp(event.at, UTC),
            "actor": "dicom",
            "action": event.service,
            "calling_ae": _clean(event.calling_ae),
            "called_ae": _clean(event.called_ae),
            "address": _clean(event.address),
            "host": self.host,
            "status": event.status,
            "outcome": dimse_outcome(event.service, event.status),
            "subject": _clean_json(dict(event.subject)),
            "count": event.count,
            "size": event.size,
            "reason": _clean(event.reason),
        }

    def _dropped_row(self, dropped: int, since: float) -> dict[str, Any]:
        return {
            **_empty_row(),
            "at": datetime.fromtimestamp(since, UTC),
            "actor": "dicom",
            "action": DROPPED,
            "host": self.host,
            "outcome": "failure",
            "count": dropped,
            "reason": f"{dropped} requests from this time on were served but not recorded: more than "
            f"audit.max_queued ({self._settings.max_queued}) waited for the catalog",
        }


def dimse_outcome(action: str, status: int) -> Outcome:
    """The outcome of a request by the class of its final DIMSE status (PS3.7 C); an
    association the node refused is ``rejected``."""
    if action == "associate":
        return "rejected"
    return _OUTCOMES.get(code_to_category(status), "failure")


def moment(text: str, now: datetime | None = None) -> datetime:
    """A point in time as an operator writes it, in UTC: an ISO 8601 date or date and time
    (UTC unless it carries an offset), or an age such as ``30m``, ``12h``, ``7d``, ``2w``
    (that long before ``now``). Raises ValueError saying what is accepted."""
    value = text.strip()
    age = _AGE.fullmatch(value)
    try:
        if age is not None:
            since = timedelta(**{_AGE_UNITS[age.group(2)]: int(age.group(1))})
            return (now or datetime.now(UTC)) - since
        return _utc(datetime.fromisoformat(value))
    except (ValueError, OverflowError):
        raise ValueError(
            f"{text!r} is neither an ISO 8601 date or time (2026-11-01, 2026-11-01T08:30:00+01:00) "
            "nor an age (30m, 12h, 7d, 2w)"
        ) from None


def write_csv(records: Iterable[AuditRecord], out: TextIO) -> int:
    """Write a header and one line per record (``subject`` as JSON text); return the count."""
    writer = csv.writer(out)
    writer.writerow(COLUMNS)
    count = 0
    for record in records:
        exported = record.exported()
        exported["subject"] = json.dumps(record.subject, sort_keys=True)
        writer.writerow([_inert(exported[column]) for column in COLUMNS])
        count += 1
    return count


_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _inert(value: Any) -> Any:
    """A peer chooses its AE title and the keys it queries with, and auditors open the CSV in
    a spreadsheet: text a spreadsheet would run as a formula gets a leading quote (OWASP's
    CSV injection advice)."""
    if isinstance(value, str) and value.startswith(_FORMULA_STARTS):
        return "'" + value
    return value


def write_json_lines(records: Iterable[AuditRecord], out: TextIO) -> int:
    """Write one JSON object per line (JSON Lines); return the count."""
    count = 0
    for record in records:
        out.write(json.dumps(record.exported()) + "\n")
        count += 1
    return count


def command_subject(arguments: Mapping[str, Any], catalog_url: str) -> dict[str, Any]:
    """What an administrator's command was asked: its arguments (paths made absolute, as
    the trail is read far from where the command ran; anything secret hidden) and the
    catalog it ran against, its password hidden."""
    subject = {name: _argument(name, value) for name, value in arguments.items() if value is not None}
    subject["catalog"] = hide_password(catalog_url)
    return subject


def hide_password(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):  # not a URL SQLAlchemy reads: hide what looks like one
        return _URL_PASSWORD.sub(r"\1***@", url)


def os_user() -> str:
    """The account the command runs as, from the process's user id rather than from
    ``$USER``, which any caller may set to another name."""
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:  # an id without a name (a container): the number
        return str(os.getuid())


def _argument(name: str, value: Any) -> Any:
    if _SECRET_ARGUMENT.search(name):
        return "***"
    if isinstance(value, Path):
        return str(value.absolute())
    if isinstance(value, bool | int | float):
        return value
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, list | tuple):
        return [_argument(name, item) for item in value]
    return _URL_PASSWORD.sub(r"\1***@", str(value))


def _empty_row() -> dict[str, Any]:
    return {
        "calling_ae": "",
        "called_ae": "",
        "address": "",
        "user": "",
        "status": 0,
        "subject": {},
        "count": 0,
        "size": 0,
        "reason": "",
    }


def _clean(text: str) -> str:
    """Text any database takes: a peer's bytes may hold a NUL (PostgreSQL refuses it in text)
    or undecodable characters (escaped)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")


def _clean_json(value: Any) -> Any:
    if isinstance(value, str):
        return _clean(value)
    if isinstance(value, dict):
        return {_clean(str(key)): _clean_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_clean_json(item) for item in value]
    return value


def _utc(value: datetime) -> datetime:
    """Aware and in UTC: SQLite keeps times as text without their offset."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _record(row: Row[Any]) -> AuditRecord:
    values = row._asdict()
    values["at"] = _utc(values["at"])
    return AuditRecord(**{column: values[column] for column in COLUMNS})
