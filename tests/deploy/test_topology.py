"""The compose file's topology, run as processes on loopback (no container engine here):
`precedent serve` with ``queue.serve_workers = 0``, two separate `precedent worker`
processes, Redis, PostgreSQL and Orthanc as the PACS. A thousand instances pushed by
four storescu processes at once are each stored, analysed exactly once, and their
results delivered, although a worker is killed and then Redis is killed in the middle;
``/healthz`` and ``/metrics`` say how things stand before, during and after."""

from __future__ import annotations

import hashlib
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from node.metrics import model_label
from tests.deploy.topology import (
    RunningSite,
    assessments,
    everything_delivered,
    multi_process_site,
    phantom_copies,
    push,
    received_uids,
    results,
    start_worker,
)
from tests.support.endpoint import health, metric
from tests.support.models import tiny_bundle
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(480)

INSTANCES = 1000
PER_STUDY = 10
SENDERS = 4


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_bundle(tmp_path_factory.mktemp("model") / "cnn4.bundle")


def healthy(port: int) -> Callable[[], bool]:
    return lambda: health(port)[0] == 200


def test_a_thousand_instances_are_stored_analysed_once_and_delivered_through_a_worker_and_a_redis_restart(
    tmp_path: Path, bundle: Path
) -> None:
    started = time.monotonic()
    files = phantom_copies(tmp_path / "in", INSTANCES, PER_STUDY)
    studies = INSTANCES // PER_STUDY
    with multi_process_site(tmp_path / "site", bundle) as running:
        site, port = running.site, running.metrics_port

        # Before: every check passes (the index is loaded, Redis and PostgreSQL answer).
        wait_until(healthy(port), 60, "/healthz answers 200 before the load")
        status, before = health(port)
        assert status == 200, before
        assert {name: check["ok"] for name, check in before["checks"].items()} == dict.fromkeys(
            ("catalog", "broker", "index", "disk"), True
        ), before

        def analysed() -> int:
            return site.analysis_states().get("done", 0)

        with ThreadPoolExecutor(1) as pool:
            pushing = pool.submit(push, site.port, files, SENDERS, PER_STUDY)

            # A worker dies mid-run, without a chance to give anything back.
            wait_until(lambda: analysed() >= INSTANCES * 3 // 10, 240, "30 % analysed")
            doomed = site.workers[0]
            doomed.send_signal(signal.SIGKILL)
            doomed.wait()
            start_worker(site, "1-restarted")

            # Then the broker dies, with its queue: /healthz names it, /metrics still answers.
            wait_until(lambda: analysed() >= INSTANCES * 6 // 10, 240, "60 % analysed")
            assert running.redis is not None
            running.redis.kill()
            wait_until(lambda: health(port)[0] == 503, 15, "/healthz answers 503 while Redis is down")
            _, during = health(port)
            assert during["ok"] is False
            assert during["checks"]["broker"]["ok"] is False, during
            assert during["checks"]["catalog"]["ok"] is True, during
            assert metric(port, "precedent_catalog_up") == 1
            time.sleep(2)
            running.redis.start()
            wait_until(healthy(port), 30, "/healthz answers 200 again once Redis is back")

            runs = pushing.result()

        # Every instance acknowledged, and in the catalog.
        for run in runs:
            assert run.returncode == 0, run.output[-2000:]
            assert len(run.acknowledged) == len(run.sent) and not run.refused
        assert sum(len(run.acknowledged) for run in runs) == INSTANCES
        assert len(received_uids(site.catalog_url)) == INSTANCES

        # Analysed exactly once: one done analysis and one embedding per instance; a batch
        # cut off by the kill was taken over (a second attempt), never done twice.
        site.wait_for_analyses(INSTANCES, timeout=240)
        assert site.analysis_states() == {"done": INSTANCES}
        assert site.embeddings() == INSTANCES
        attempts = site.attempts()
        assert set(attempts) <= {1, 2}, sorted(set(attempts))

        # Every study assessed, with all its images, and every result delivered once.
        wait_until(
            lambda: everything_delivered(running, studies, PER_STUDY),
            180,
            "every study assessed and its results delivered",
        )
        made = results(site.catalog_url)
        kinds = [kind for kind, _ in made]
        done_assessments = [a for a in assessments(site.catalog_url) if a.state == "done"]
        assert kinds.count("gradcam") == INSTANCES
        assert kinds.count("report") == len(done_assessments) >= studies
        assert {a.state for a in assessments(site.catalog_url)} == {"done"}
        assert set(running.pacs.instances()) == {uid for _, uid in made}
        assert running.pacs.get("/statistics")["CountStudies"] == studies

        # After: healthy, and the node counted every instance it received (not its results).
        wait_until(healthy(port), 30, "/healthz answers 200 after the run")
        assert metric(port, "precedent_instances_received_total") == INSTANCES
        assert metric(port, "precedent_analyses", model=_model_label(running), state="done") == INSTANCES
        assert metric(port, "precedent_deliveries", destination="pacs", state="done") == len(made)
    print(
        f"\n{INSTANCES} instances, {studies} studies, {len(made)} results delivered, "
        f"{attempts.count(2)} analyses taken over after the kill, "
        f"{len(done_assessments) - studies} extra report revisions; {time.monotonic() - started:.0f} s"
    )


def _model_label(running: RunningSite) -> str:
    """The model label of the metrics: the bundle's id (the sha256 of its file), shortened."""
    bundle = Path(running.site.sections["model"]["bundle"])
    return model_label(hashlib.sha256(bundle.read_bytes()).hexdigest())
