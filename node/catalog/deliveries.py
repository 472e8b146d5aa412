"""The per-destination delivery queues, kept in the catalog so that nothing is lost.

Each (object, destination) pair is one row (:class:`~node.catalog.models.Delivery`). A
forwarder claims the rows that are due for one destination under a token and a lease,
sends them, and writes what the destination answered; only the token holder may. A
destination that cannot be reached puts its rows back with a later due time (exponential
backoff, capped): they wait for as long as it takes, and go once it is back. A row is
sent once more only if the forwarder died between sending and writing the answer (its
lease runs out): the object's UID is unchanged, and a PACS keeps one copy.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from node.catalog.models import DELIVERIES, INSTANCES
from node.catalog.recording import Catalog
from node.catalog.work import Claim, new_claim_token

PENDING = "pending"
RUNNING = "running"
DONE = "done"
FAILED = "failed"


@dataclass(frozen=True)
class DueDelivery:
    """One object to send, with what sending needs."""

    delivery_id: int
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    file_path: str
    attempts: int


@dataclass(frozen=True)
class DestinationState:
    """How one destination's queue stands, for ``precedent status``."""

    destination: str
    counts: dict[str, int]
    last_delivered_at: datetime | None
    last_failure: str
    next_attempt_at: datetime | None


class DeliveryQueue:
    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        dialect = postgresql if catalog.engine.dialect.name == "postgresql" else sqlite
        self._insert = dialect.insert(DELIVERIES).on_conflict_do_nothing(
            index_elements=["instance_pk", "destination"]
        )

    def request(
        self, connection: Connection, instance_pks: Iterable[int], destinations: Sequence[str]
    ) -> None:
        """Queue each object for each destination, in the caller's transaction (the one
        that records the objects): an object is never stored without its deliveries. An
        object already queued for a destination is not queued again."""
        now = _now()
        rows = [
            {
                "instance_pk": pk,
                "destination": name,
                "state": PENDING,
                "attempts": 0,
                "reason": "",
                "next_attempt_at": now,
                "requested_at": now,
            }
            for pk in instance_pks
            for name in destinations
        ]
        if rows:
            connection.execute(self._insert, rows)

    def claim_due(
        self, destination: str, limit: int, lease_seconds: float
    ) -> tuple[Claim, list[DueDelivery]]:
        """Claim up to ``limit`` due rows of ``destination``, oldest first, including rows
        whose earlier claim's lease ran out (a forwarder that died)."""
        d, i = DELIVERIES.c, INSTANCES.c
        now = _now()
        token = new_claim_token()
        due = and_(d.destination == destination, d.state == PENDING, d.next_attempt_at <= now)
        abandoned = and_(d.destination == destination, d.state == RUNNING, d.lease_until < now)
        with self.catalog.transaction() as connection:
            chosen = list(
                connection.execute(
                    select(d.id)
                    .where(due | abandoned)
                    .order_by(d.id)
                    .limit(limit)
                    .with_for_update(skip_locked=True)
                ).scalars()
            )
            if not chosen:
                return Claim(token, ()), []
            claimed = connection.execute(
                update(DELIVERIES)
                .where(d.id.in_(chosen), due | abandoned)
                .values(
                    state=RUNNING,
                    claim_token=token,
                    lease_until=now + timedelta(seconds=lease_seconds),
                    attempts=d.attempts + 1,
                )
                .returning(d.id)
            ).scalars()
            ids = sorted(claimed)
            rows = connection.execute(
                select(
                    d.id, i.sop_instance_uid, i.sop_class_uid, i.transfer_syntax_uid, i.file_path, d.attempts
                )
                .join(INSTANCES, i.id == d.instance_pk)
                .where(d.id.in_(ids))
                .order_by(d.id)
            ).all()
        return Claim(token, tuple(ids)), [DueDelivery(*row) for row in rows]

    def delivered(self, claim: Claim, delivery_id: int, status: int) -> None:
        """The destination took it (Success, or a Warning it stored it with)."""
        self._finish(claim, delivery_id, DONE, status=status, reason="")

    def refused(self, claim: Claim, delivery_id: int, status: int | None, reason: str) -> None:
        """The destination refused it, or it cannot be sent to it: trying again would get
        the same answer, so it is recorded with the status given."""
        self._finish(claim, delivery_id, FAILED, status=status, reason=reason)

    def retry_later(self, claim: Claim, ids: Sequence[int], reason: str, delay_seconds: float) -> None:
        """The destination could not be reached: the rows are due again after ``delay_seconds``."""
        d = DELIVERIES.c
        with self.catalog.transaction() as connection:
            connection.execute(
                update(DELIVERIES)
                .where(d.id.in_(ids), d.claim_token == claim.token, d.state == RUNNING)
                .values(
                    state=PENDING,
                    claim_token=None,
                    lease_until=None,
                    reason=reason[:500],
                    next_attempt_at=_now() + timedelta(seconds=delay_seconds),
                )
            )

    def _finish(self, claim: Claim, delivery_id: int, state: str, **values: Any) -> None:
        d = DELIVERIES.c
        with self.catalog.transaction() as connection:
            connection.execute(
                update(DELIVERIES)
                .where(d.id == delivery_id, d.claim_token == claim.token, d.state == RUNNING)
                .values(state=state, claim_token=None, lease_until=None, finished_at=_now(), **values)
            )

    def states(self, destinations: Sequence[str]) -> list[DestinationState]:
        """The queue of each configured destination (rows of destinations no longer
        configured are left alone and not shown)."""
        d = DELIVERIES.c
        with self.catalog.connection() as connection:
            counts: dict[str, dict[str, int]] = {name: {} for name in destinations}
            for name, state, n in connection.execute(
                select(d.destination, d.state, func.count()).group_by(d.destination, d.state)
            ):
                if name in counts:
                    counts[name][state] = int(n)
            return [self._state_of(connection, name, counts[name]) for name in destinations]

    def _state_of(self, connection: Connection, name: str, counts: dict[str, int]) -> DestinationState:
        d = DELIVERIES.c
        last_delivered = connection.execute(
            select(func.max(d.finished_at)).where(d.destination == name, d.state == DONE)
        ).scalar_one()
        failure = connection.execute(
            select(d.reason).where(d.destination == name, d.reason != "").order_by(d.id.desc()).limit(1)
        ).scalar_one_or_none()
        next_attempt = connection.execute(
            select(func.min(d.next_attempt_at)).where(d.destination == name, d.state == PENDING)
        ).scalar_one()
        return DestinationState(name, counts, last_delivered, failure or "", next_attempt)


def _now() -> datetime:
    return datetime.now(UTC)
