"""Work items that are their own outbox: published, claimed, finished and recovered in SQL.

A row of a :class:`~node.catalog.models.WorkItem` table is the truth about one unit of
work; the broker's message is only a wake-up call naming the row. So a message lost by
the broker, or delivered twice, or a worker killed mid-task, costs time but never work:

* the node takes ``pending`` rows, marks them ``queued`` and publishes their ids;
* a worker *claims* a row (``running``, a fresh token, a lease) before working on it; a
  second message for the same row finds it claimed or finished and does nothing;
* only the holder of the token may finish the row; a lease that runs out, or a row
  published long ago and never claimed, goes back to ``pending`` to be published again.

Every state change is one conditional ``UPDATE``, safe with any number of nodes and
workers on PostgreSQL, and serialised by SQLite's single writer on one machine.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Table, and_, func, or_, select, update
from sqlalchemy.engine import Connection

from node.catalog.recording import Catalog

PENDING = "pending"
QUEUED = "queued"
RUNNING = "running"
DONE = "done"
FAILED = "failed"
SKIPPED = "skipped"
UNFINISHED = (PENDING, QUEUED, RUNNING)
STATES = (PENDING, QUEUED, RUNNING, DONE, FAILED, SKIPPED)


@dataclass(frozen=True)
class Claim:
    """The rows one worker holds, and the token that proves it."""

    token: str
    ids: tuple[int, ...]


def new_claim_token() -> str:
    """Unique per claim, and readable in ``status``: which worker holds what."""
    return f"{uuid.uuid4().hex[:12]}:{os.getpid()}@{socket.gethostname()}"[:64]


class WorkTable:
    """The outbox operations on one work table (analyses, study assessments)."""

    def __init__(self, catalog: Catalog, table: Table) -> None:
        self.catalog = catalog
        self.table = table
        self._c = table.c

    def take_unpublished(self, max_in_flight: int) -> list[int]:
        """Mark pending rows queued, as many as keep ``max_in_flight`` published at once,
        and return their ids for the caller to publish. Rows the caller then fails to
        publish must be handed back with :meth:`unpublish`."""
        c = self._c
        with self.catalog.transaction() as connection:
            in_flight = connection.execute(
                select(func.count()).select_from(self.table).where(c.state == QUEUED)
            ).scalar_one()
            room = max_in_flight - int(in_flight)
            if room <= 0:
                return []
            # Chosen first, then updated: PostgreSQL may run a LIMIT subquery inside an
            # UPDATE more than once, taking more rows than asked for.
            chosen = connection.execute(
                select(c.id)
                .where(c.state == PENDING)
                .order_by(c.id)
                .limit(room)
                .with_for_update(skip_locked=True)
            ).scalars()
            taken = connection.execute(
                update(self.table)
                .where(c.id.in_(list(chosen)), c.state == PENDING)
                .values(state=QUEUED, published_at=_now())
                .returning(c.id)
            )
            return sorted(taken.scalars())

    def unpublish(self, ids: Sequence[int], reason: str) -> None:
        """Hand back rows whose publication failed, so the next round tries again."""
        c = self._c
        with self.catalog.transaction() as connection:
            connection.execute(
                update(self.table)
                .where(c.id.in_(ids), c.state == QUEUED)
                .values(state=PENDING, published_at=None, reason=reason)
            )

    def requeue_stale(self, republish_after: float) -> int:
        """Turn rows that no worker will finish back to pending: published long ago and
        never claimed (a broker that lost its message), or claimed under a lease that
        ran out (a worker that died). Returns how many."""
        c = self._c
        now = _now()
        lost = and_(c.state == QUEUED, c.published_at < now - timedelta(seconds=republish_after))
        abandoned = and_(c.state == RUNNING, c.lease_until < now)
        with self.catalog.transaction() as connection:
            result = connection.execute(
                update(self.table)
                .where(or_(lost, abandoned))
                .values(state=PENDING, claim_token=None, lease_until=None, published_at=None)
            )
            return int(result.rowcount)

    def claim(
        self,
        ids: Iterable[int],
        lease_seconds: float,
        *criteria: ColumnElement[bool],
        token: str | None = None,
    ) -> Claim:
        """Claim those of ``ids`` (matching ``criteria``) that nobody holds or has finished;
        the rest are left alone. Passing the ``token`` of an earlier claim extends it."""
        c = self._c
        token = token or new_claim_token()
        now = _now()
        wanted = list(ids)
        if not wanted:
            return Claim(token, ())
        claimable = or_(c.state.in_((PENDING, QUEUED)), and_(c.state == RUNNING, c.lease_until < now))
        with self.catalog.transaction() as connection:
            claimed = connection.execute(
                update(self.table)
                .where(c.id.in_(wanted), claimable, *criteria)
                .values(
                    state=RUNNING,
                    claim_token=token,
                    lease_until=now + timedelta(seconds=lease_seconds),
                    attempts=c.attempts + 1,
                    reason="",
                )
                .returning(c.id)
            )
            return Claim(token, tuple(sorted(claimed.scalars())))

    def queued_ids(self, limit: int, *criteria: ColumnElement[bool]) -> list[int]:
        """Published rows nobody has claimed yet, oldest first: the batch a worker may fill
        up with beyond the row its own message named."""
        c = self._c
        with self.catalog.connection() as connection:
            found = connection.execute(
                select(c.id).where(c.state == QUEUED, *criteria).order_by(c.id).limit(limit)
            )
            return list(found.scalars())

    def finish(
        self, connection: Connection, item_id: int, claim: Claim, state: str, values: Mapping[str, Any]
    ) -> bool:
        """Close a claimed row as ``state`` with its results, inside the caller's transaction.

        Returns False, writing nothing, when the claim was lost (the lease ran out and
        another worker took the row): that worker's result is the one that counts.
        """
        c = self._c
        result = connection.execute(
            update(self.table)
            .where(c.id == item_id, c.claim_token == claim.token, c.state == RUNNING)
            .values(state=state, claim_token=None, lease_until=None, finished_at=_now(), **values)
        )
        return bool(result.rowcount)

    def release(self, ids: Sequence[int], claim: Claim, state: str, reason: str) -> int:
        """Give claimed rows back unfinished (``queued`` for a retry already scheduled,
        ``pending`` to be published again)."""
        c = self._c
        with self.catalog.transaction() as connection:
            result = connection.execute(
                update(self.table)
                .where(c.id.in_(ids), c.claim_token == claim.token, c.state == RUNNING)
                .values(state=state, claim_token=None, lease_until=None, reason=reason, published_at=_now())
            )
            return int(result.rowcount)

    def request_again(self, *criteria: ColumnElement[bool]) -> int:
        """Make finished rows matching ``criteria`` pending again (an administrator's
        reanalysis); rows still in progress are left to finish."""
        c = self._c
        with self.catalog.transaction() as connection:
            result = connection.execute(
                update(self.table)
                .where(c.state.in_((DONE, FAILED, SKIPPED)), *criteria)
                .values(state=PENDING, reason="", attempts=0, published_at=None, finished_at=None)
            )
            return int(result.rowcount)

    def attempts(self, item_id: int) -> int:
        """How many times the row has been claimed (its current claim included)."""
        with self.catalog.connection() as connection:
            found = connection.execute(select(self._c.attempts).where(self._c.id == item_id)).scalar_one()
        return int(found)

    def count_by_state(self, *criteria: ColumnElement[bool]) -> dict[str, int]:
        c = self._c
        with self.catalog.connection() as connection:
            rows = connection.execute(select(c.state, func.count()).where(*criteria).group_by(c.state)).all()
        counts = dict.fromkeys(STATES, 0)
        counts.update({state: int(n) for state, n in rows})
        return counts


def _now() -> datetime:
    return datetime.now(UTC)
