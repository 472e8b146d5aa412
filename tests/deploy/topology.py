"""The site of ``deploy/compose.yaml`` as processes on loopback, and the single-process
default beside it: what the topology test and the topology benchmark run.

* multi-process: PostgreSQL (a scratch database), a private Redis, one `precedent serve`
  with ``queue.serve_workers = 0`` and its metrics port, separate `precedent worker`
  processes, and an Orthanc as the PACS every result is forwarded to;
* embedded: `precedent serve` alone, as ``bash deploy/run.sh`` runs it (its own worker, the
  embedded broker, SQLite), with the same Orthanc and the same settings otherwise.

Both read their catalog directly, as an administrator's SQL would, to tell what was stored,
analysed, assessed and delivered.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import psycopg
from sqlalchemy import func, select

from node.catalog.models import ANALYSES, DELIVERIES, INSTANCES, RESULTS, SERIES, STUDY_ASSESSMENTS
from node.local_workers import worker_environment
from tests.bench.copies import cached_copies
from tests.support.dcmtk import StoreRun, storescu
from tests.support.nodes import free_port
from tests.support.peers import Orthanc, orthanc
from tests.support.postgres import scratch_database
from tests.support.sites import PrivateRedis, Site, open_catalog
from workers.phantoms import write_dicom_phantoms

Kind = Literal["multi-process", "embedded"]
PACS_AE_TITLE = "ORTHANC"


@dataclass
class RunningSite:
    """A started site: the node and its workers (``site``), its PACS and, for the
    multi-process kind, the Redis it may kill and restart."""

    kind: Kind
    site: Site
    pacs: Orthanc
    metrics_port: int
    redis: PrivateRedis | None = None

    def processes(self) -> dict[str, int]:
        """Role → process id of every process of the site that is running now (the node's
        own analysis worker, for the embedded kind, is a child of the node)."""
        assert self.site.node is not None and self.site.node.process is not None
        node = self.site.node.process.pid
        found = {"node": node}
        workers = [p.pid for p in self.site.workers if p.poll() is None] or _children(node)
        found |= {f"worker {n + 1}": pid for n, pid in enumerate(workers)}
        if self.redis is not None and self.redis.process is not None and self.redis.process.poll() is None:
            found["redis"] = self.redis.process.pid
        return found


def _sections(root: Path, bundle: Path, metrics_port: int) -> dict[str, dict[str, Any]]:
    """The settings both kinds share: quick to notice work and stable studies, so that a
    run measures the pipeline, not its waits."""
    return {
        "dicom": {"bind": "127.0.0.1"},
        "storage": {"data_dir": root / "data", "min_free_bytes": 0},
        "catalog": {"url": ""},
        "queue": {"poll_seconds": 0.1, "republish_seconds": 5.0, "lease_seconds": 10.0},
        "study": {"stable_seconds": 1.0},
        "model": {"bundle": bundle, "batch_size": 8, "batch_wait_seconds": 0.02},
        "forwarding": {"poll_seconds": 0.1, "retry_backoff_seconds": 0.3, "max_backoff_seconds": 1.0},
        "metrics": {"port": metrics_port, "bind": "127.0.0.1"},
    }


@contextlib.contextmanager
def _with_pacs(root: Path, site: Site) -> Iterator[Orthanc]:
    """An Orthanc that knows the node as a modality, set as the node's one destination."""
    dicom_port, http_port = free_port(), free_port()
    site.sections["dicom"]["port"] = site.port
    site.destinations = [{"name": "pacs", "ae_title": PACS_AE_TITLE, "host": "127.0.0.1", "port": dicom_port}]
    node = [str(site.sections["dicom"].get("ae_title", "PRECEDENT")), "127.0.0.1", site.port]
    with orthanc(root / "orthanc", dicom_port, http_port, modalities={"precedent": node}) as pacs:
        yield pacs


@contextlib.contextmanager
def multi_process_site(root: Path, bundle: Path, workers: int = 2) -> Iterator[RunningSite]:
    """The compose file's topology: node, ``workers`` separate worker processes, Redis,
    PostgreSQL and Orthanc. The CPU cores are shared among the workers (``model.threads``),
    as on a host running several of them."""
    metrics_port = free_port()
    root.mkdir(parents=True, exist_ok=True)
    redis = PrivateRedis(root)
    redis.start()
    try:
        with scratch_database() as url:
            sections = _sections(root, bundle, metrics_port)
            sections["catalog"]["url"] = url
            sections["queue"] |= {"broker_url": redis.url, "serve_workers": 0}
            sections["model"]["threads"] = max(1, (os.cpu_count() or 1) // max(1, workers))
            site = Site(root, url, sections)
            with _with_pacs(root, site) as pacs:
                try:
                    site.start_node()
                    for n in range(workers):
                        start_worker(site, f"{n + 1}")
                    yield RunningSite("multi-process", site, pacs, metrics_port, redis)
                finally:
                    site.stop()
    finally:
        redis.kill()


def start_worker(site: Site, name: str) -> None:
    """A `precedent worker` as the systemd unit and the compose file run it: with tcmalloc
    preloaded where the system has it, as `precedent serve` does for its own workers."""
    site.start_worker(name, **worker_environment({}))


@contextlib.contextmanager
def embedded_site(root: Path, bundle: Path) -> Iterator[RunningSite]:
    """`precedent serve` on its defaults: one local worker, the embedded broker, SQLite."""
    metrics_port = free_port()
    root.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{root / 'data' / 'catalog.sqlite3'}"
    site = Site(root, url, _sections(root, bundle, metrics_port))
    with _with_pacs(root, site) as pacs:
        try:
            site.start_node()
            yield RunningSite("embedded", site, pacs, metrics_port)
        finally:
            site.stop()


# --- the load ---------------------------------------------------------------------------------


def phantom_copies(directory: Path, n: int, per_study: int) -> list[Path]:
    """``n`` small breast ultrasound phantoms (128 x 192, 8-bit, 26 KB), ``per_study`` to a
    study: copies of one rendered phantom with new UIDs, which costs a millisecond each
    where rendering costs seven."""
    [source] = write_dicom_phantoms(directory / "source", 1, seed=0, size=(64, 64))
    return cached_copies(source.path, n, directory / "copies", per_study)


def push(port: int, files: Sequence[Path], senders: int, per_study: int) -> list[StoreRun]:
    """Push ``files`` (whole studies of ``per_study`` consecutive files) with up to
    ``senders`` concurrent storescu processes, each sending whole studies as a modality does."""
    studies = [files[i : i + per_study] for i in range(0, len(files), per_study)]
    loads = [[path for study in studies[k::senders] for path in study] for k in range(senders)]
    loads = [load for load in loads if load]  # fewer studies than senders
    with ThreadPoolExecutor(senders) as pool:
        return list(pool.map(lambda load: storescu(port, load, timeout=600), loads))


# --- the node's HTTP endpoint -----------------------------------------------------------------


# --- the catalog ------------------------------------------------------------------------------


_DERIVED = select(RESULTS.c.instance_pk)


def received_uids(url: str) -> set[str]:
    """SOP Instance UIDs of what peers sent (the node's own results left out)."""
    with open_catalog(url) as catalog, catalog.connection() as connection:
        statement = select(INSTANCES.c.sop_instance_uid).where(INSTANCES.c.id.not_in(_DERIVED))
        return set(connection.execute(statement).scalars())


def results(url: str) -> list[tuple[str, str]]:
    """(kind, SOP Instance UID) of every result the node made: ``report`` or ``gradcam``."""
    with open_catalog(url) as catalog, catalog.connection() as connection:
        rows = connection.execute(
            select(RESULTS.c.kind, INSTANCES.c.sop_instance_uid).join(
                INSTANCES, INSTANCES.c.id == RESULTS.c.instance_pk
            )
        ).all()
    return [(str(kind), str(uid)) for kind, uid in rows]


def delivery_states(url: str) -> dict[str, int]:
    with open_catalog(url) as catalog, catalog.connection() as connection:
        rows = connection.execute(select(DELIVERIES.c.state, func.count()).group_by(DELIVERIES.c.state)).all()
    return {str(state): int(n) for state, n in rows}


@dataclass(frozen=True)
class Assessment:
    study_pk: int
    revision: int
    state: str
    analysed_instances: int | None


def assessments(url: str) -> list[Assessment]:
    with open_catalog(url) as catalog, catalog.connection() as connection:
        c = STUDY_ASSESSMENTS.c
        rows = connection.execute(select(c.study_pk, c.revision, c.state, c.analysed_instances)).all()
    return [Assessment(int(s), int(r), str(state), n) for s, r, state, n in rows]


def study_latencies(url: str) -> dict[int, float]:
    """Per study (by its key in the catalog, which grows in order of arrival), seconds from
    its last instance received to its last result delivered (the PACS's Success to the
    C-STORE), both as the catalog recorded them; studies not yet delivered are left out."""
    with open_catalog(url) as catalog, catalog.connection() as connection:
        received = connection.execute(
            select(INSTANCES.c.received_at, SERIES.c.study_pk)
            .join(SERIES, SERIES.c.id == INSTANCES.c.series_pk)
            .where(INSTANCES.c.id.not_in(_DERIVED))
        ).all()
        delivered = connection.execute(
            select(DELIVERIES.c.finished_at, RESULTS.c.study_pk)
            .join(RESULTS, RESULTS.c.instance_pk == DELIVERIES.c.instance_pk)
            .where(DELIVERIES.c.state == "done")
        ).all()
    last_in: dict[int, datetime] = {}
    for at, study in received:
        last_in[study] = max(at, last_in.get(study, at))
    last_out: dict[int, datetime] = {}
    for at, study in delivered:
        last_out[study] = max(at, last_out.get(study, at))
    return {s: (last_out[s] - last_in[s]).total_seconds() for s in last_in if s in last_out}


def complete_studies(url: str, per_study: int) -> int:
    """Studies whose latest assessment is done and covers all ``per_study`` images."""
    latest: dict[int, Assessment] = {}
    for a in assessments(url):
        if a.study_pk not in latest or a.revision > latest[a.study_pk].revision:
            latest[a.study_pk] = a
    return sum(1 for a in latest.values() if a.state == "done" and a.analysed_instances == per_study)


def everything_delivered(running: RunningSite, studies: int, per_study: int) -> bool:
    """Every study assessed with all its images, and every result the node made held by
    the PACS. Polled: it sleeps half a second first, so that the looking (four queries)
    does not take the busy machine's time from the work."""
    time.sleep(0.5)
    url = running.site.catalog_url
    if complete_studies(url, per_study) < studies:
        return False
    made = len(results(url))
    return delivery_states(url) == {"done": made} and held_by_pacs(running.pacs) == made


def held_by_pacs(pacs: Orthanc) -> int:
    return int(pacs.get("/statistics")["CountInstances"])


def analysis_span(url: str, after_id: int = 0) -> tuple[int, float, int]:
    """Of the done analyses with ids above ``after_id`` (requests are numbered in order of
    arrival): how many, the seconds from the first of them finished to the last, and the
    highest id."""
    with open_catalog(url) as catalog, catalog.connection() as connection:
        c = ANALYSES.c
        n, first, last, top = connection.execute(
            select(func.count(), func.min(c.finished_at), func.max(c.finished_at), func.max(c.id)).where(
                c.state == "done", c.id > after_id
            )
        ).one()
    if not n:
        return 0, 0.0, after_id
    return int(n), _as_datetime(last).timestamp() - _as_datetime(first).timestamp(), int(top)


def _as_datetime(value: datetime | str) -> datetime:
    """SQLite hands aggregates of timestamps back as text."""
    return value if isinstance(value, datetime) else datetime.fromisoformat(value)


# --- memory -----------------------------------------------------------------------------------


def peak_rss(pid: int) -> int | None:
    """The process's peak resident set (VmHWM) in bytes; None once it has exited."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return None


def postgres_backends(url: str) -> list[int]:
    """Process ids of the PostgreSQL backends serving ``url``'s database now."""
    database = url.rsplit("/", 1)[1]
    with psycopg.connect(f"host=127.0.0.1 port=5432 user=postgres dbname={database}") as connection:
        rows = connection.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()", (database,)
        ).fetchall()
    return [int(pid) for (pid,) in rows]


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            found += [int(child) for child in (task / "children").read_text().split()]
    return sorted(found)
