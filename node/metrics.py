"""The node's Prometheus metrics, in a registry of its own.

Two kinds of facts. What happens at this node's network edge is counted as it happens
(:class:`EdgeMetrics`, an :class:`~node.observe.EdgeObserver`). What the catalog knows —
analyses finished by workers in other processes or on other hosts, delivery queues — is
read from the catalog at each scrape (:class:`CatalogCollector`, four grouped SELECTs),
so every node sharing a catalog reports the same catalog-wide figures. What only the
running node knows (associations, its index, its disk) is read from it at each scrape
(:class:`LiveCollector`). The names are listed in ``config/precedent.toml``.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from sqlalchemy import ColumnElement, Select, Table, case, func, select
from sqlalchemy.engine import Connection

from node.access import Refusal
from node.catalog.models import ANALYSES, DELIVERIES, STUDY_ASSESSMENTS
from node.catalog.recording import Catalog
from node.catalog.work import DONE, STATES, UNFINISHED
from node.errors import CatalogUnavailable
from node.observe import EdgeEvent
from node.storage import disk_space

if TYPE_CHECKING:
    from workers.index_keeper import IndexKeeper

log = logging.getLogger(__name__)

DIMSE_SERVICES = ("store", "find", "similar", "move", "get")
STORE_FAILURE_REASONS = (
    "out_of_resources",
    "cannot_understand",
    "dataset_mismatch",
    "not_authorized",
    "processing_failure",
    "other",
)
# A C-STORE takes milliseconds, a similarity search tens of them, a C-MOVE of a study minutes.
DIMSE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
# From the request (on receipt) to the result: queueing included, so up to hours in a backlog.
ANALYSIS_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 14400.0)
DELIVERY_STATES = ("pending", "running", "done", "failed")
# The work tables, as `precedent status` names their kinds.
WORK_KINDS = (("images", ANALYSES), ("studies", STUDY_ASSESSMENTS))


def model_label(model_id: str) -> str:
    """The first 12 hex digits of a model id, as logs and ``precedent status`` show it."""
    return model_id[:12]


def store_failure_reason(status: int) -> str:
    """One short word for a C-STORE failure status (PS3.4 B.2.3, and the node's own)."""
    if status in (0x0124, 0xC124):
        return "not_authorized"
    if status in (0x0110, 0xC001):  # 0xC001: the node's sub-code for its own fault
        return "processing_failure"
    if status >> 8 == 0xA7:
        return "out_of_resources"
    if status >> 8 == 0xA9:
        return "dataset_mismatch"
    if status >> 12 == 0xC:
        return "cannot_understand"
    return "other"


def _stored(status: int) -> bool:
    """Success, or a Warning under which the instance was stored all the same."""
    return status == 0 or status >> 12 == 0xB or status in (0x0107, 0x0116)


def _rejection_reason(refusal: str) -> str:
    try:
        return Refusal(refusal).name.lower()
    except ValueError:
        return "other"


class EdgeMetrics:
    """Counts what peers ask of this node, as the acceptor tells it (:mod:`node.observe`)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._received = Counter(
            "precedent_instances_received", "Instances stored on C-STORE.", registry=registry
        )
        self._bytes = Counter(
            "precedent_received_bytes", "Bytes of the instances stored on C-STORE.", registry=registry
        )
        self._failed = Counter(
            "precedent_stores_failed", "C-STOREs refused, by reason.", ["reason"], registry=registry
        )
        self._seconds = Histogram(
            "precedent_dimse_seconds",
            "Time to answer a DIMSE request, by service (similar: a similarity C-FIND).",
            ["service"],
            buckets=DIMSE_BUCKETS,
            registry=registry,
        )
        self._rejected = Counter(
            "precedent_associations_rejected",
            "Associations rejected, by reason.",
            ["reason"],
            registry=registry,
        )
        for reason in STORE_FAILURE_REASONS:
            self._failed.labels(reason)
        for service in DIMSE_SERVICES:
            self._seconds.labels(service)
        for refusal in Refusal:
            self._rejected.labels(refusal.name.lower())

    def observe(self, event: EdgeEvent) -> None:
        if event.service == "associate":
            self._rejected.labels(_rejection_reason(event.reason)).inc()
            return
        self._seconds.labels(event.service).observe(event.seconds)
        if event.service != "store":
            return
        if _stored(event.status):
            self._received.inc()
            self._bytes.inc(event.size)
        else:
            self._failed.labels(store_failure_reason(event.status)).inc()


@dataclass(frozen=True)
class CatalogReading:
    """The rows one scrape read from the catalog."""

    work: dict[str, list[tuple[str, str, int]]]  # kind: (model id, state, count)
    latency: list[tuple[str, int, int, float]]  # model id, bucket index, done, seconds summed
    deliveries: list[tuple[str, str, int, int]]  # destination, state, count, retries


class CatalogCollector(Collector):
    """What the catalog knows, read at scrape time: cheap grouped statements, no state here."""

    def __init__(self, catalog: Catalog, destinations: Sequence[str] = ()) -> None:
        self._catalog = catalog
        self._destinations = list(destinations)
        self._latency = _latency_statement(catalog.engine.dialect.name)
        self._work = {kind: _by_model_and_state(table) for kind, table in WORK_KINDS}
        d = DELIVERIES.c
        retries = func.sum(case((d.attempts > 1, d.attempts - 1), else_=0))
        self._deliveries = select(d.destination, d.state, func.count(), retries).group_by(
            d.destination, d.state
        )

    def read(self) -> CatalogReading:
        """Raises :class:`CatalogUnavailable`."""
        with self._catalog.connection() as connection:
            work = {kind: _rows(connection, statement) for kind, statement in self._work.items()}
            latency = [
                (str(model), int(bucket), int(n), float(total or 0))
                for model, bucket, n, total in connection.execute(self._latency)
            ]
            deliveries = [
                (str(name), str(state), int(n), int(retries or 0))
                for name, state, n, retries in connection.execute(self._deliveries)
            ]
        return CatalogReading(work, latency, deliveries)

    def collect(self) -> Iterable[Metric]:
        started = time.perf_counter()
        try:
            reading = self.read()
        except CatalogUnavailable as exc:
            log.warning("metrics: %s", exc)
            yield _gauge("precedent_catalog_up", "Whether the catalog answered this scrape.", 0)
            return
        yield from _work_families(reading.work)
        yield _latency_family(reading.latency)
        yield from _delivery_families(reading.deliveries, self._destinations)
        yield _gauge("precedent_catalog_up", "Whether the catalog answered this scrape.", 1)
        yield _gauge(
            "precedent_catalog_read_seconds",
            "Time this scrape took to read the catalog.",
            time.perf_counter() - started,
        )


class LiveCollector(Collector):
    """What only the running node knows, read at scrape time."""

    def __init__(
        self,
        associations: Callable[[], int],
        index: IndexKeeper | None,
        data_dir: Path,
    ) -> None:
        self._associations = associations
        self._index = index
        self._data_dir = data_dir

    def collect(self) -> Iterable[Metric]:
        yield _gauge("precedent_associations_active", "Associations open now.", self._associations())
        if self._index is not None:
            state = self._index.state()
            vectors = GaugeMetricFamily(
                "precedent_index_vectors", "Vectors in the node's similarity index.", labels=["model"]
            )
            vectors.add_metric([model_label(state.model_id)], state.vectors)
            yield vectors
            if state.since_sync is not None:
                since = GaugeMetricFamily(
                    "precedent_index_sync_age_seconds",
                    "Seconds since the index last synced with the catalog.",
                    labels=["model"],
                )
                since.add_metric([model_label(state.model_id)], state.since_sync)
                yield since
        try:
            space = disk_space(self._data_dir, 0)
        except OSError as exc:
            log.warning("metrics: data directory %s: %s", self._data_dir, exc)
            return
        yield _gauge(
            "precedent_disk_free_bytes", "Free bytes of storage.data_dir's file system.", space.free_bytes
        )
        yield _gauge(
            "precedent_disk_total_bytes", "Size of storage.data_dir's file system.", space.total_bytes
        )


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _by_model_and_state(table: Table) -> Select[Any]:
    c = table.c
    return select(c.model_id, c.state, func.count()).group_by(c.model_id, c.state)


def _rows(connection: Connection, statement: Select[Any]) -> list[tuple[str, str, int]]:
    return [(str(model), str(state), int(n)) for model, state, n in connection.execute(statement)]


def _seconds_between(dialect: str, start: Any, end: Any) -> ColumnElement[Any]:
    """``end - start`` in seconds, in SQL: to the millisecond on SQLite, which holds the
    times as ISO text (``julianday`` counts whole milliseconds); ``date_part``, a double,
    on PostgreSQL (``EXTRACT`` gives a numeric, several times slower to sum)."""
    if dialect == "sqlite":
        return (func.julianday(end) - func.julianday(start)) * 86400.0
    return func.date_part("epoch", end - start)


def _latency_statement(dialect: str) -> Select[Any]:
    """Per model and bucket (the index of the first bound a latency is within, or the
    number of bounds): how many done analyses, and their latencies summed. One CASE a row
    and a GROUP BY cost a third of a SUM(CASE) per bound (measured at 100k rows).

    Done rows stay done (only a re-analysis starts one again), so the figures only grow,
    as a Prometheus histogram's must."""
    a = ANALYSES.c
    seconds = _seconds_between(dialect, a.requested_at, a.finished_at).label("seconds")
    done = select(a.model_id, seconds).where(a.state == DONE, a.finished_at.is_not(None)).subquery()
    bucket = case(
        *((done.c.seconds <= bound, n) for n, bound in enumerate(ANALYSIS_BUCKETS)),
        else_=len(ANALYSIS_BUCKETS),
    )
    return select(done.c.model_id, bucket, func.count(), func.sum(done.c.seconds)).group_by(
        done.c.model_id, bucket
    )


def _work_families(work: dict[str, list[tuple[str, str, int]]]) -> Iterable[Metric]:
    analyses = GaugeMetricFamily(
        "precedent_analyses",
        "Analyses of images in the catalog, by model and state.",
        labels=["model", "state"],
    )
    assessments = GaugeMetricFamily(
        "precedent_study_assessments",
        "Assessments of studies in the catalog, by model and state.",
        labels=["model", "state"],
    )
    depth = GaugeMetricFamily(
        "precedent_queue_depth",
        "Work requested and not yet finished (pending, queued or running), by kind.",
        labels=["kind"],
    )
    for (kind, _), family in zip(WORK_KINDS, (analyses, assessments), strict=True):
        counts: dict[str, dict[str, int]] = {}
        for model, state, n in work[kind]:
            counts.setdefault(model, dict.fromkeys(STATES, 0))[state] = n
        for model, states in counts.items():
            for state, n in states.items():
                family.add_metric([model_label(model), state], n)
        depth.add_metric([kind], sum(n for _, state, n in work[kind] if state in UNFINISHED))
    return (analyses, assessments, depth)


def _latency_family(latency: list[tuple[str, int, int, float]]) -> HistogramMetricFamily:
    family = HistogramMetricFamily(
        "precedent_analysis_seconds",
        "Time from an image's receipt to its analysis result, of done analyses, by model.",
        labels=["model"],
    )
    per_bucket: dict[str, list[int]] = {}
    totals: dict[str, float] = {}
    for model, bucket, n, seconds in latency:
        per_bucket.setdefault(model, [0] * (len(ANALYSIS_BUCKETS) + 1))[bucket] += n
        totals[model] = totals.get(model, 0.0) + seconds
    bounds = [str(float(bound)) for bound in ANALYSIS_BUCKETS] + ["+Inf"]
    for model, counts in per_bucket.items():
        cumulative = list(itertools.accumulate(counts))
        buckets: list[tuple[str, float]] = list(zip(bounds, cumulative, strict=True))
        family.add_metric([model_label(model)], buckets, sum_value=totals[model])
    return family


def _delivery_families(rows: list[tuple[str, str, int, int]], configured: Sequence[str]) -> Iterable[Metric]:
    deliveries = GaugeMetricFamily(
        "precedent_deliveries",
        "Results queued for each destination, by state.",
        labels=["destination", "state"],
    )
    retries = CounterMetricFamily(
        "precedent_delivery_retries",
        "Delivery attempts after the first, by destination (a destination down, or slow).",
        labels=["destination"],
    )
    counts = {name: dict.fromkeys(DELIVERY_STATES, 0) for name in configured}
    retried = dict.fromkeys(configured, 0)
    for name, state, n, again in rows:
        counts.setdefault(name, dict.fromkeys(DELIVERY_STATES, 0))[state] = n
        retried[name] = retried.get(name, 0) + again
    for name, states in counts.items():
        for state, n in states.items():
            deliveries.add_metric([name, state], n)
        retries.add_metric([name], retried[name])
    return (deliveries, retries)
