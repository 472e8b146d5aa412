"""The node's side of the outbox: publish recorded work, recover stale work, and request
the assessment of studies that have become stable.

One thread per node. It never decides *whether* work is done (the catalog rows do); it
only keeps the broker told. A broker that is down delays publication, it loses nothing:
the rows stay pending and the next round tries again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

from node.catalog.analyses import AnalysisRecords
from node.catalog.work import WorkTable
from node.errors import CatalogUnavailable
from node.settings import QueueSettings, StudySettings

log = logging.getLogger(__name__)

Publish = Callable[[str, Sequence[int]], None]

_RECOVERY_EVERY_ROUNDS = 10


class Dispatcher:
    def __init__(
        self,
        records: AnalysisRecords,
        publish: Publish,
        *,
        model_id: str,
        analyze_task: str,
        assess_task: str,
        queue: QueueSettings,
        study: StudySettings,
    ) -> None:
        self._records = records
        self._publish = publish
        self._model_id = model_id
        self._tables: list[tuple[WorkTable, str]] = [
            (records.analyses, analyze_task),
            (records.assessments, assess_task),
        ]
        self._queue = queue
        self._study = study
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._broker_down_since: float | None = None

    def run_once(self, *, recover: bool = True) -> int:
        """One round: recover stale rows, request due assessments, publish. Returns how
        many messages were published."""
        if recover:
            for table, _ in self._tables:
                requeued = table.requeue_stale(self._queue.republish_seconds)
                if requeued:
                    log.warning("%d stale %s requests requeued", requeued, table.table.name)
        self._records.request_due_assessments(self._model_id, self._study.stable_seconds)
        return sum(self._publish_table(table, task) for table, task in self._tables)

    def _publish_table(self, table: WorkTable, task: str) -> int:
        ids = table.take_unpublished(self._queue.max_in_flight)
        if not ids:
            return 0
        try:
            self._publish(task, ids)
        except Exception as exc:  # kombu raises several types for one thing: broker unreachable
            table.unpublish(ids, f"broker unreachable: {exc}"[:500])
            self._note_broker_down(exc)
            return 0
        if self._broker_down_since is not None:
            log.info("broker reachable again after %.0f s", time.monotonic() - self._broker_down_since)
            self._broker_down_since = None
        return len(ids)

    def _note_broker_down(self, exc: Exception) -> None:
        if self._broker_down_since is None:
            self._broker_down_since = time.monotonic()
            log.error(
                "cannot publish analysis requests, broker unreachable (%s); they wait in the catalog", exc
            )

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="dispatcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        rounds = 0
        while not self._stop.is_set():
            try:
                self.run_once(recover=rounds % _RECOVERY_EVERY_ROUNDS == 0)
            except CatalogUnavailable as exc:
                log.error("dispatcher: %s", exc)
            except Exception:  # the thread must outlive any one bad round
                log.exception("dispatcher round failed")
            rounds += 1
            delay = self._queue.poll_seconds if self._broker_down_since is None else 2.0
            self._stop.wait(delay)
