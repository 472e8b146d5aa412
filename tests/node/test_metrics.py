"""Metrics, health and ``precedent status``: what a site's monitoring reads of a node.

Nodes run with ``metrics.port`` on a free port and are pushed to and queried by DCMTK;
``/metrics`` is read with prometheus-client's own parser, ``/healthz`` as the JSON it is.
The analysing node is a real site (``precedent serve`` with its worker, the tiny bundle,
a destination that is down); the broker that goes away is a private Redis, killed and
started again; the dependencies that hang are sockets that accept and never answer.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from pynetdicom import AE
from sqlalchemy import func, insert, select

from node.catalog.database import connect
from node.catalog.deliveries import DeliveryQueue
from node.catalog.models import ANALYSES, DELIVERIES, INSTANCES, STUDIES, STUDY_ASSESSMENTS
from node.catalog.recording import Catalog
from node.errors import StartupError
from node.header import read_instance_header
from node.health import CHECK_SECONDS, Check, HealthChecks
from node.metrics import ANALYSIS_BUCKETS, CatalogCollector, store_failure_reason
from node.service import Node
from node.settings import ConfigError, load_settings
from node.storage import StoredFile
from tests.support.data import ultrasound_file, write_instance
from tests.support.dcmtk import echoscu, findscu, storescu
from tests.support.endpoint import get, health
from tests.support.models import tiny_bundle
from tests.support.nodes import (
    RunningNode,
    free_port,
    node_settings,
    run_precedent,
    running_node,
    write_config,
)
from tests.support.sites import PrivateRedis, Site, ultrasound_studies, unique_queue
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(300)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
MODEL = "0123456789ab" + "c" * 52


# --- reading the endpoint --------------------------------------------------------------------


def parse(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def scrape(port: int) -> Samples:
    status, body = get(port, "/metrics")
    assert status == 200
    return parse(body.decode())


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def metrics_port(node: RunningNode) -> int:
    return node.node.settings.metrics.port


# --- counted at the edge ---------------------------------------------------------------------


def test_stored_instances_and_their_bytes_are_counted_and_each_request_timed(
    start_node: Any, tmp_path: Path
) -> None:
    node = start_node(metrics={"port": free_port()})
    files = ultrasound_studies(tmp_path / "in", studies=1, images=3)
    run = storescu(node.port, files)
    assert len(run.acknowledged) == 3, run.output[-2000:]
    found = findscu(node.port, ["QueryRetrieveLevel=STUDY", "StudyInstanceUID"], tmp_path / "rsp")
    assert len(found.responses) == 1, found.output[-2000:]

    samples = scrape(metrics_port(node))
    with node.node.catalog.connection() as connection:
        stored_bytes = connection.execute(select(func.sum(INSTANCES.c.file_size))).scalar_one()
    assert value(samples, "precedent_instances_received_total") == 3
    assert value(samples, "precedent_received_bytes_total") == stored_bytes > 3 * 900_000
    assert value(samples, "precedent_dimse_seconds_count", service="store") == 3
    assert value(samples, "precedent_dimse_seconds_count", service="find") == 1
    assert value(samples, "precedent_dimse_seconds_count", service="similar") == 0
    assert value(samples, "precedent_dimse_seconds_bucket", service="store", le="+Inf") == 3
    assert 0 < value(samples, "precedent_dimse_seconds_sum", service="store") < 30
    assert all(
        value(samples, "precedent_stores_failed_total", reason=reason) == 0
        for reason in ("out_of_resources", "not_authorized", "other")
    )


def test_refused_stores_and_rejected_associations_are_counted_by_reason(
    start_node: Any, tmp_path: Path
) -> None:
    node = start_node(
        metrics={"port": free_port()},
        dicom={"allowed_calling_aets": ["VIEWER"], "permissions": {"VIEWER": ["query"]}},
    )
    run = storescu(node.port, [ultrasound_file()], calling="VIEWER")
    assert len(run.refused) == 1, run.output[-2000:]
    assert echoscu(node.port, calling="INTRUDER").returncode != 0

    samples = scrape(metrics_port(node))
    assert value(samples, "precedent_stores_failed_total", reason="not_authorized") == 1
    assert value(samples, "precedent_stores_failed_total", reason="out_of_resources") == 0
    assert value(samples, "precedent_instances_received_total") == 0
    assert value(samples, "precedent_received_bytes_total") == 0
    assert value(samples, "precedent_dimse_seconds_count", service="store") == 1
    # Told once the association's thread has seen the peer close, maybe after echoscu exits.
    wait_until(
        lambda: (
            value(
                scrape(metrics_port(node)),
                "precedent_associations_rejected_total",
                reason="calling_ae_not_recognized",
            )
            == 1
        ),
        10,
        "the rejection is counted",
    )


@pytest.mark.parametrize(
    ("status", "reason"),
    [
        (0xA700, "out_of_resources"),
        (0xA7FF, "out_of_resources"),
        (0xA900, "dataset_mismatch"),
        (0xC000, "cannot_understand"),
        (0xCFFF, "cannot_understand"),
        (0xC001, "processing_failure"),
        (0x0110, "processing_failure"),
        (0x0124, "not_authorized"),
        (0x0122, "other"),  # SOP class not supported
        (0xFFFF, "other"),
        (-1, "other"),
    ],
)
def test_a_store_failure_is_named_by_its_status(status: int, reason: str) -> None:
    assert store_failure_reason(status) == reason


# --- the endpoint itself ---------------------------------------------------------------------


def test_the_endpoint_serves_its_three_paths_and_nothing_else(start_node: Any) -> None:
    node = start_node(metrics={"port": free_port()})
    port = metrics_port(node)
    assert get(port, "/nothing-here")[0] == 404
    assert get(port, "/")[0] == 404
    assert get(port, "/metrics/")[0] == 404
    assert get(port, "/metrics", "POST")[0] == 501
    assert get(port, "/healthz", "DELETE")[0] == 501
    assert get(port, "/metrics", "HEAD") == (200, b"")
    assert get(port, "/metrics?name[]=x")[0] == 200
    status, body = health(port)
    assert status == 200 and body["ok"] is True
    assert set(body["checks"]) == {"catalog", "broker", "index", "disk"}
    assert body["checks"]["broker"] == {"ok": True, "detail": "not used: analysis is off"}
    assert body["checks"]["index"] == {"ok": True, "detail": "not used: analysis is off"}
    status, body = get(port, "/status.json")
    assert status == 200
    assert json.loads(body) == {"associations": {"active": 0, "max": 16}, "index": {}}


def test_without_metrics_port_there_is_no_endpoint(start_node: Any) -> None:
    node = start_node()
    assert node.node.endpoint is None
    assert node.node.settings.metrics.port == 0


def test_a_taken_metrics_port_stops_the_start_up_naming_the_key(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = node_settings(tmp_path / "data", free_port(), metrics={"port": port})
        node = Node(settings)
        try:
            with pytest.raises(StartupError, match=r"metrics\.port") as caught:
                node.start()
            assert f"127.0.0.1:{port}" in str(caught.value)
            with pytest.raises(ConnectionRefusedError):  # the DICOM port was never opened
                socket.create_connection(("127.0.0.1", settings.dicom.port), timeout=2).close()
        finally:
            node.stop()
        config = write_config(
            tmp_path / "precedent.toml",
            f'[storage]\ndata_dir = "{tmp_path / "data"}"\nmin_free_bytes = 0\n'
            f'[dicom]\nbind = "127.0.0.1"\nport = {free_port()}\n[metrics]\nport = {port}\n',
        )
        served = run_precedent("serve", "--config", str(config), timeout=60)
    assert served.returncode == 1, served.stderr  # as for a taken dicom.port
    assert f"cannot start: cannot listen on 127.0.0.1:{port} (metrics.bind, metrics.port)" in served.stderr


def test_a_metrics_port_out_of_range_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"metrics\.port"):
        load_settings(write_config(tmp_path / "bad.toml", "[metrics]\nport = 70000\n"))
    with pytest.raises(ConfigError, match=r"metrics\.bound: unknown key"):
        load_settings(write_config(tmp_path / "bad.toml", '[metrics]\nbound = "x"\n'))


# --- health ----------------------------------------------------------------------------------


def test_the_disk_check_fails_below_min_free_bytes_and_stores_are_refused(start_node: Any) -> None:
    node = start_node(metrics={"port": free_port()}, storage={"min_free_bytes": 2**60})
    status, body = health(metrics_port(node))
    assert status == 503 and body["ok"] is False
    assert body["checks"]["disk"]["ok"] is False
    assert "below storage.min_free_bytes" in body["checks"]["disk"]["detail"]
    assert all(body["checks"][name]["ok"] for name in ("catalog", "broker", "index"))

    run = storescu(node.port, [ultrasound_file()])
    assert len(run.refused) == 1, run.output[-2000:]
    samples = scrape(metrics_port(node))
    assert value(samples, "precedent_stores_failed_total", reason="out_of_resources") == 1
    assert value(samples, "precedent_disk_free_bytes") > 0


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_bundle(tmp_path_factory.mktemp("model") / "cnn4.bundle")


def test_healthz_fails_naming_the_broker_while_redis_is_down_and_recovers(
    tmp_path: Path, bundle: Path
) -> None:
    redis = PrivateRedis(tmp_path)
    redis.start()
    port = free_port()
    settings = node_settings(
        tmp_path / "data",
        free_port(),
        model={"bundle": str(bundle)},
        queue={"broker_url": redis.url, "name": unique_queue(), "serve_workers": 0},
        similarity={"sync_seconds": 0.1},
        metrics={"port": port},
    )
    try:
        with running_node(settings):
            wait_until(lambda: health(port)[0] == 200, 30, "the node is healthy")
            assert f"127.0.0.1:{redis.port}/0 answers PING" in health(port)[1]["checks"]["broker"]["detail"]
            redis.kill()
            started = time.monotonic()
            status, body = health(port)
            assert time.monotonic() - started < CHECK_SECONDS + 1
            assert status == 503 and body["ok"] is False
            assert body["checks"]["broker"]["ok"] is False
            assert "does not answer PING" in body["checks"]["broker"]["detail"]
            assert all(body["checks"][name]["ok"] for name in ("catalog", "index", "disk")), body
            redis.start()
            status, body = health(port)
            assert status == 200 and body["checks"]["broker"]["ok"] is True, body
    finally:
        redis.kill()


@pytest.fixture
def hung_peer() -> Iterator[int]:
    """A port that accepts connections (the kernel's backlog) and never answers on them."""
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen(16)
        yield listening.getsockname()[1]


def test_a_hung_catalog_or_broker_fails_its_check_in_bounded_time(tmp_path: Path, hung_peer: int) -> None:
    from workers.index_keeper import IndexKeeper

    settings = node_settings(
        tmp_path / "data",
        free_port(),
        f"postgresql+psycopg://postgres@127.0.0.1:{hung_peer}/none",
        queue={"broker_url": f"redis://127.0.0.1:{hung_peer}/0"},
    )
    (tmp_path / "data").mkdir()
    catalog = Catalog(connect(settings.catalog_url()))  # not opened: that would hang too
    checks = HealthChecks(settings, catalog, IndexKeeper(settings, catalog, MODEL))
    try:
        started = time.monotonic()
        first = checks.run()
        assert time.monotonic() - started < CHECK_SECONDS + 0.5
        assert first.ok is False
        assert first.checks["catalog"].ok is False
        assert first.checks["catalog"].detail.startswith("no answer after 2.")
        assert first.checks["broker"].ok is False
        assert "does not answer PING" in first.checks["broker"].detail
        assert first.checks["index"] == Check(False, "the index thread has stopped (see the node's log)")
        assert first.checks["disk"].ok is True

        started = time.monotonic()
        second = checks.run()
        assert time.monotonic() - started < CHECK_SECONDS + 0.5
        assert second.checks["catalog"].detail.startswith("no answer after 4.")  # the same wait
        hung = [t for t in threading.enumerate() if t.name == "health-catalog"]
        assert len(hung) == 1
    finally:
        catalog.close()


def test_an_unreachable_catalog_is_a_metric_not_a_failed_scrape() -> None:
    catalog = Catalog(connect(f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/none"))
    registry = CollectorRegistry()
    registry.register(CatalogCollector(catalog, ["pacs"]))
    try:
        samples = parse(generate_latest(registry).decode())
    finally:
        catalog.close()
    assert value(samples, "precedent_catalog_up") == 0
    assert not [name for name, _ in samples if name.startswith("precedent_analys")]


# --- read from the catalog -------------------------------------------------------------------

LATENCIES = (0.2, 0.7, 3.0, 45.0, 4000.0)


def _instances(catalog: Catalog, tmp_path: Path, n: int) -> list[int]:
    for i in range(n):
        path = write_instance(
            tmp_path / f"i{i}.dcm",
            SOPClassUID="1.2.840.10008.5.1.4.1.1.6.1",
            SOPInstanceUID=f"1.2.826.0.1.3680043.10.5433.61.{i}",
            StudyInstanceUID="1.2.826.0.1.3680043.10.5433.61",
            SeriesInstanceUID="1.2.826.0.1.3680043.10.5433.62",
            PatientID="METRICS",
            Modality="US",
        )
        catalog.add_instance(read_instance_header(path), StoredFile(PurePosixPath(f"x/{i}.dcm"), 1), "TEST")
    with catalog.connection() as connection:
        return list(connection.execute(select(INSTANCES.c.id).order_by(INSTANCES.c.id)).scalars())


def test_the_catalog_is_read_at_scrape_time_analyses_latency_queue_and_deliveries(
    catalog_url: str, tmp_path: Path
) -> None:
    catalog = Catalog.open(catalog_url)
    try:
        pks = _instances(catalog, tmp_path, 8)
        now = datetime.now(UTC)
        rows = [
            {"state": "done", "requested_at": now, "finished_at": now + timedelta(seconds=seconds)}
            for seconds in LATENCIES
        ]
        rows += [
            {"state": "failed", "requested_at": now, "finished_at": now},
            {"state": "pending", "requested_at": now, "finished_at": None},
            {"state": "running", "requested_at": now, "finished_at": None},
        ]
        with catalog.transaction() as connection:
            connection.execute(
                insert(ANALYSES),
                [
                    {"instance_pk": pk, "model_id": MODEL, "reason": "", "attempts": 1, **row}
                    for pk, row in zip(pks, rows, strict=True)
                ],
            )
            study_pk = connection.execute(select(STUDIES.c.id)).scalar_one()
            connection.execute(
                insert(STUDY_ASSESSMENTS).values(
                    study_pk=study_pk, model_id=MODEL, revision=1, state="queued", reason="", requested_at=now
                )
            )
            DeliveryQueue(catalog).request(connection, pks[:3], ["pacs"])
            for pk, (state, attempts) in zip(pks, [("done", 1), ("pending", 3), ("failed", 2)], strict=False):
                connection.execute(
                    DELIVERIES.update()
                    .where(DELIVERIES.c.instance_pk == pk)
                    .values(state=state, attempts=attempts)
                )
        registry = CollectorRegistry()
        registry.register(CatalogCollector(catalog, ["pacs", "archive"]))
        samples = parse(generate_latest(registry).decode())
    finally:
        catalog.close()

    model = MODEL[:12]
    expected_analyses = {"done": 5, "failed": 1, "pending": 1, "running": 1, "queued": 0, "skipped": 0}
    for state, n in expected_analyses.items():
        assert value(samples, "precedent_analyses", model=model, state=state) == n, state
    assert value(samples, "precedent_study_assessments", model=model, state="queued") == 1
    assert value(samples, "precedent_queue_depth", kind="images") == 2
    assert value(samples, "precedent_queue_depth", kind="studies") == 1

    buckets = {
        bound: value(samples, "precedent_analysis_seconds_bucket", model=model, le=str(float(bound)))
        for bound in ANALYSIS_BUCKETS
    }
    assert buckets == {bound: sum(s <= bound for s in LATENCIES) for bound in ANALYSIS_BUCKETS}
    assert value(samples, "precedent_analysis_seconds_bucket", model=model, le="+Inf") == 5
    assert value(samples, "precedent_analysis_seconds_count", model=model) == 5
    assert value(samples, "precedent_analysis_seconds_sum", model=model) == pytest.approx(
        sum(LATENCIES), abs=0.01
    )

    for state, n in {"done": 1, "pending": 1, "failed": 1, "running": 0}.items():
        assert value(samples, "precedent_deliveries", destination="pacs", state=state) == n
        assert value(samples, "precedent_deliveries", destination="archive", state=state) == 0
    assert value(samples, "precedent_delivery_retries_total", destination="pacs") == 0 + 2 + 1
    assert value(samples, "precedent_delivery_retries_total", destination="archive") == 0
    assert value(samples, "precedent_catalog_up") == 1


# --- an analysing site -----------------------------------------------------------------------


class AnalysingSite:
    """``precedent serve`` with its worker and the tiny bundle, having analysed two studies
    of two images, its results queued for a destination that is down."""

    def __init__(self, site: Site, files: list[Path], model_id: str, metrics_port: int) -> None:
        self.site = site
        self.files = files
        self.model_id = model_id
        self.metrics_port = metrics_port
        self.catalog = Catalog.open(site.catalog_url)  # once the node has made it

    def retries(self) -> int:
        with self.catalog.connection() as connection:
            attempts = connection.execute(select(DELIVERIES.c.attempts)).scalars().all()
        return sum(max(a - 1, 0) for a in attempts)

    def deliveries(self) -> int:
        with self.catalog.connection() as connection:
            return int(connection.execute(select(func.count()).select_from(DELIVERIES)).scalar_one())

    def latencies(self) -> list[float]:
        with self.catalog.connection() as connection:
            rows = connection.execute(select(ANALYSES.c.requested_at, ANALYSES.c.finished_at)).all()
        return [(finished - requested).total_seconds() for requested, finished in rows]


@pytest.fixture(scope="module")
def analysing(tmp_path_factory: pytest.TempPathFactory, bundle: Path) -> Iterator[AnalysingSite]:
    from workers.bundles import load_bundle

    root = tmp_path_factory.mktemp("site")
    port = free_port()
    site = Site(
        root,
        f"sqlite:///{root / 'data' / 'catalog.sqlite3'}",
        {
            "dicom": {"bind": "127.0.0.1"},
            "storage": {"data_dir": root / "data", "min_free_bytes": 0},
            "queue": {"poll_seconds": 0.1},
            "study": {"stable_seconds": 1.0},
            "model": {"bundle": bundle, "batch_size": 4, "batch_wait_seconds": 0.02},
            "similarity": {"sync_seconds": 0.1},
            "forwarding": {"poll_seconds": 0.1, "retry_backoff_seconds": 0.2, "max_backoff_seconds": 0.4},
            "metrics": {"port": port},
        },
    )
    site.sections["dicom"]["port"] = site.port
    site.destinations = [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": free_port()}]
    files = ultrasound_studies(root / "in", studies=2, images=2)
    try:
        site.start_node()
        made = AnalysingSite(site, files, load_bundle(bundle).id, port)
        run = storescu(site.port, files)
        assert len(run.acknowledged) == len(files), run.output[-2000:]
        site.wait_for_analyses(len(files))
        wait_until(lambda: site.assessment_states() == {"done": 2}, 120, "both studies assessed")
        wait_until(lambda: made.deliveries() > 0 and made.retries() >= made.deliveries(), 60, "retries")
        yield made
        made.catalog.close()
    finally:
        site.stop()


def test_analyses_and_their_latency_are_read_from_the_catalog(analysing: AnalysingSite) -> None:
    samples = scrape(analysing.metrics_port)
    model = analysing.model_id[:12]
    assert value(samples, "precedent_analyses", model=model, state="done") == 4
    assert value(samples, "precedent_analyses", model=model, state="failed") == 0
    assert value(samples, "precedent_study_assessments", model=model, state="done") == 2
    assert value(samples, "precedent_queue_depth", kind="images") == 0
    latencies = analysing.latencies()
    assert value(samples, "precedent_analysis_seconds_count", model=model) == 4
    assert value(samples, "precedent_analysis_seconds_sum", model=model) == pytest.approx(
        sum(latencies), abs=0.01
    )
    counts = [
        value(samples, "precedent_analysis_seconds_bucket", model=model, le=str(float(bound)))
        for bound in ANALYSIS_BUCKETS
    ]
    assert counts == [sum(s <= bound for s in latencies) for bound in ANALYSIS_BUCKETS]
    assert value(samples, "precedent_analysis_seconds_bucket", model=model, le="+Inf") == 4
    wait_until(
        lambda: value(scrape(analysing.metrics_port), "precedent_index_vectors", model=model) == 4,
        30,
        "the node's index holds the 4 embeddings",
    )


def test_deliveries_to_a_down_destination_count_their_retries(analysing: AnalysingSite) -> None:
    before = analysing.retries()
    samples = scrape(analysing.metrics_port)
    after = analysing.retries()
    retries = value(samples, "precedent_delivery_retries_total", destination="pacs")
    assert 1 <= before <= retries <= after
    waiting = sum(
        value(samples, "precedent_deliveries", destination="pacs", state=s) for s in ("pending", "running")
    )
    assert waiting == analysing.deliveries()
    assert value(samples, "precedent_deliveries", destination="pacs", state="done") == 0


def test_a_similarity_search_is_timed_apart_from_queries(analysing: AnalysingSite, tmp_path: Path) -> None:
    before = scrape(analysing.metrics_port)
    study_uid = read_instance_header(analysing.files[0]).study_instance_uid
    found = findscu(
        analysing.site.port,
        ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study_uid}"],
        tmp_path / "rsp",
        called="PRECEDENT_SIM",
    )
    assert found.returncode == 0 and len(found.responses) == 1, found.output[-2000:]
    after = scrape(analysing.metrics_port)
    for service, more in (("similar", 1), ("find", 0)):
        count = "precedent_dimse_seconds_count"
        assert value(after, count, service=service) - value(before, count, service=service) == more


def test_an_analysing_node_with_its_embedded_broker_is_healthy(analysing: AnalysingSite) -> None:
    status, body = health(analysing.metrics_port)
    assert status == 200, body
    assert body["checks"]["broker"]["detail"].startswith("embedded (file system)")
    assert body["checks"]["index"]["detail"].startswith("4 vectors, synced")


def test_status_reads_the_node_and_the_catalog(analysing: AnalysingSite) -> None:
    config = str(analysing.site.config)
    done = run_precedent("status", "--json", "--config", config)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["node"]["answering"] is True
    assert report["associations"] == {
        "active": 0,
        "max": 16,
        "detail": f"from the node at http://127.0.0.1:{analysing.metrics_port}",
    }
    assert report["index"] == {analysing.model_id: {"catalog_embeddings": 4, "node_vectors": 4}}
    assert report["queue_depth"] == {"images": 0, "studies": 0}
    assert report["disk"]["below_min_free"] is False and report["disk"]["free_bytes"] > 0
    screen = run_precedent("status", "--config", config).stdout
    assert "0 of 16 associations active" in screen
    assert f"{analysing.model_id[:12]}: 4 vectors in the node's index, 4 embeddings in the catalog" in screen
    assert len(screen.splitlines()) < 40


# --- precedent status ------------------------------------------------------------------------


def _config(tmp_path: Path, dicom_port: int, metrics: str = "") -> Path:
    return write_config(
        tmp_path / "precedent.toml",
        f'[storage]\ndata_dir = "{tmp_path / "data"}"\nmin_free_bytes = 0\n'
        f'[dicom]\nbind = "127.0.0.1"\nport = {dicom_port}\n{metrics}',
    )


def test_status_says_why_it_cannot_tell_the_associations(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    off = _config(tmp_path, free_port())
    done = run_precedent("status", "--json", "--config", str(off))
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["associations"] == {"active": None, "max": 16, "detail": "unknown (metrics.port is off)"}
    assert report["node"] == {"url": None, "answering": False, "detail": "unknown (metrics.port is off)"}
    assert report["queue_depth"] == {"images": 0, "studies": 0}
    assert report["index"] == {}
    assert report["disk"]["path"] == str((tmp_path / "data").resolve())
    assert report["disk"]["min_free_bytes"] == 0 and report["disk"]["below_min_free"] is False
    assert (
        "associations unknown (metrics.port is off)" in run_precedent("status", "--config", str(off)).stdout
    )

    port = free_port()
    down = _config(tmp_path, free_port(), f"[metrics]\nport = {port}\n")
    report = json.loads(run_precedent("status", "--json", "--config", str(down)).stdout)
    assert report["associations"]["active"] is None
    assert (
        report["associations"]["detail"]
        == f"node not answering at http://127.0.0.1:{port}: Connection refused"
    )


def test_status_counts_the_associations_open_on_the_node(tmp_path: Path) -> None:
    port = free_port()
    config = _config(tmp_path, free_port(), f"[metrics]\nport = {port}\n")
    with running_node(load_settings(config)) as node:
        ae = AE(ae_title="HOLDER")
        ae.add_requested_context("1.2.840.10008.1.1")
        association = ae.associate("127.0.0.1", node.port, ae_title="PRECEDENT")
        assert association.is_established
        try:
            done = run_precedent("status", "--json", "--config", str(config))
            assert json.loads(done.stdout)["associations"]["active"] == 1, done.stdout
            assert value(scrape(port), "precedent_associations_active") == 1
        finally:
            association.release()
        wait_until(lambda: value(scrape(port), "precedent_associations_active") == 0, 10, "released")
