"""The analysis side as a site runs it: `precedent serve` with its embedded broker, and a
node with Redis, PostgreSQL and separate `precedent worker` processes; a worker killed
mid-task and a broker restarted mid-run lose nothing and do nothing twice."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.dcmtk import storescu
from tests.support.models import tiny_bundle
from tests.support.nodes import run_precedent
from tests.support.postgres import scratch_database
from tests.support.sites import PrivateRedis, Site, ultrasound_studies, unique_queue
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(300)


def sections(tmp_path: Path, bundle: Path, **overrides: dict[str, Any]) -> dict[str, dict[str, Any]]:
    values: dict[str, dict[str, Any]] = {
        "dicom": {"bind": "127.0.0.1"},
        "storage": {"data_dir": tmp_path / "data", "min_free_bytes": 0},
        "catalog": {"url": ""},
        "queue": {"poll_seconds": 0.1, "republish_seconds": 5.0, "lease_seconds": 5.0},
        "study": {"stable_seconds": 1.0},
        "model": {"bundle": bundle, "batch_size": 4, "batch_wait_seconds": 0.02},
    }
    for section, extra in overrides.items():
        values.setdefault(section, {}).update(extra)
    return values


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_bundle(tmp_path_factory.mktemp("model") / "cnn4.bundle")


@pytest.fixture(scope="module")
def slow_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real densenet121 at 224 px: about a second per image with Grad-CAM on this CPU,
    long enough to be caught mid-task."""
    return tiny_bundle(tmp_path_factory.mktemp("model") / "densenet.bundle", "densenet121", 224)


@pytest.fixture
def site(tmp_path: Path, bundle: Path) -> Iterator[Site]:
    made = Site(tmp_path, f"sqlite:///{tmp_path / 'data' / 'catalog.sqlite3'}", sections(tmp_path, bundle))
    yield made
    made.stop()


def push(site: Site, files: list[Path]) -> None:
    run = storescu(site.port, files)
    assert run.returncode == 0, run.output


def test_serve_alone_analyses_every_image_once_and_assesses_each_study(site: Site, tmp_path: Path) -> None:
    site.sections["dicom"]["port"] = site.port
    site.start_node()
    files = ultrasound_studies(tmp_path / "in", studies=2, images=3)
    push(site, files)
    site.wait_for_analyses(len(files))
    wait_until(lambda: site.assessment_states().get("done", 0) == 2, 60, "both studies assessed")
    assert site.analysis_states() == {"done": len(files)}
    assert site.attempts() == [1] * len(files)
    assert site.embeddings() == len(files)
    status = run_precedent("status", "--json", "--config", str(site.config))
    assert status.returncode == 0, status.stderr
    assert '"on": true' in status.stdout and f'"done": {len(files)}' in status.stdout


def test_redis_and_two_separate_workers_analyse_everything_once(tmp_path: Path, bundle: Path) -> None:
    with scratch_database() as url:
        site = Site(
            tmp_path,
            url,
            sections(
                tmp_path,
                bundle,
                catalog={"url": url},
                queue={"broker_url": "redis://127.0.0.1:6379/0", "name": unique_queue(), "serve_workers": 0},
                model={"batch_size": 2},
            ),
        )
        site.sections["dicom"]["port"] = site.port
        try:
            site.start_node()
            site.start_worker("a")
            site.start_celery_worker("b")
            files = ultrasound_studies(tmp_path / "in", studies=3, images=4)
            push(site, files)
            site.wait_for_analyses(len(files))
            assert site.analysis_states() == {"done": len(files)}
            assert site.embeddings() == len(files)
            time.sleep(1)  # let the workers drain duplicate messages, if any
            logged = site.worker_log("a") + site.worker_log("b")
            for path in files:
                uid = path_uid(path)
                assert logged.count(f"analysis of {uid}:") == 1, uid
        finally:
            site.stop()


def path_uid(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def test_a_worker_killed_mid_task_has_its_task_finished_once_by_another(
    tmp_path: Path, slow_bundle: Path
) -> None:
    site = Site(
        tmp_path,
        f"sqlite:///{tmp_path / 'data' / 'catalog.sqlite3'}",
        sections(
            tmp_path,
            slow_bundle,
            queue={"broker_url": "redis://127.0.0.1:6379/0", "name": unique_queue(), "serve_workers": 0},
            model={"batch_size": 1},
        ),
    )
    site.sections["dicom"]["port"] = site.port
    try:
        site.start_node()
        doomed = site.start_worker("doomed")
        files = ultrasound_studies(tmp_path / "in", studies=1, images=3)
        push(site, files)
        wait_until(lambda: site.analysis_states().get("running", 0) > 0, 120, "the worker is mid-task")
        doomed.send_signal(signal.SIGKILL)
        doomed.wait()
        at_kill = site.states_and_attempts()
        site.start_worker("survivor")
        site.wait_for_analyses(len(files), timeout=240)
        assert site.analysis_states() == {"done": len(files)}
        assert site.embeddings() == len(files)
        # Each row the killed worker held was taken over once, each row it had not reached
        # was done once, what it had finished was left alone: nothing ran twice.
        expected = [attempts if state == "done" else attempts + 1 for state, attempts in at_kill]
        assert site.attempts() == expected, (at_kill, site.attempts())
        assert any(state == "running" for state, _ in at_kill)
    finally:
        site.stop()


def test_a_broker_restarted_mid_run_loses_nothing(tmp_path: Path, bundle: Path) -> None:
    redis = PrivateRedis(tmp_path)
    redis.start()
    site = Site(
        tmp_path,
        f"sqlite:///{tmp_path / 'data' / 'catalog.sqlite3'}",
        sections(
            tmp_path,
            bundle,
            queue={"broker_url": redis.url, "republish_seconds": 2.0, "max_in_flight": 4},
            model={"batch_size": 1, "batch_wait_seconds": 0},
        ),
    )
    site.sections["dicom"]["port"] = site.port
    try:
        site.start_node()
        files = ultrasound_studies(tmp_path / "in", studies=2, images=6)
        push(site, files)
        redis.kill()  # with queued messages in it, and analyses still pending in the catalog
        time.sleep(2)
        redis.start()
        site.wait_for_analyses(len(files), timeout=240)
        assert site.analysis_states() == {"done": len(files)}
        assert site.embeddings() == len(files)
    finally:
        site.stop()
        redis.kill()


def test_a_broken_bundle_stops_serve_and_worker_at_start_up_with_the_key_named(
    tmp_path: Path, bundle: Path
) -> None:
    broken = tmp_path / "broken.bundle"
    broken.write_bytes(bundle.read_bytes()[: len(bundle.read_bytes()) // 2])
    site = Site(tmp_path, "", sections(tmp_path, broken))
    for command in ("serve", "worker"):
        done = run_precedent(command, "--config", str(site.config), timeout=120)
        assert done.returncode == 2, (command, done.stderr)
        assert "model.bundle" in done.stderr and str(broken) in done.stderr


def test_without_a_bundle_serve_stores_and_says_analysis_is_off(tmp_path: Path) -> None:
    site = Site(tmp_path, "", sections(tmp_path, Path("unused")))
    del site.sections["model"]
    site.sections["dicom"]["port"] = site.port
    try:
        site.start_node()
        push(site, ultrasound_studies(tmp_path / "in", studies=1, images=1))
        status = run_precedent("status", "--config", str(site.config))
        assert "analysis off" in status.stdout and "model.bundle is not set" in status.stdout
        assert "1 instances" in status.stdout
        assert "analysis is off" in (tmp_path / "node.log").read_text()
        worker = run_precedent("worker", "--config", str(site.config))
        assert worker.returncode == 2 and "model.bundle is not set" in worker.stderr
    finally:
        site.stop()


def test_reanalyze_failed_tries_again_what_failed(site: Site, tmp_path: Path) -> None:
    site.sections["dicom"]["port"] = site.port
    site.start_node()
    good = ultrasound_studies(tmp_path / "in", studies=1, images=1)
    broken = tmp_path / "in" / "broken.dcm"
    import pydicom

    dataset = pydicom.dcmread(good[0])
    dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.10.9.1"
    dataset.PixelData = dataset.PixelData[:1000]  # truncated: cannot be decoded
    dataset.save_as(broken)
    push(site, [*good, broken])
    site.wait_for_analyses(2)
    assert site.analysis_states() == {"done": 1, "failed": 1}
    status = run_precedent("status", "--config", str(site.config))
    assert "failed analyses" in status.stdout and "1.2.826.0.1.3680043.10.9.1" in status.stdout
    first = site.finished_at()
    again = run_precedent("reanalyze", "--failed", "--config", str(site.config))
    assert again.returncode == 0 and again.stdout.startswith("1 analyses requested"), again.stdout
    wait_until(
        lambda: (now := site.finished_at())[0] == first[0] and now[1] not in (None, first[1]),
        60,
        "the failed one tried again, the good one left alone",
    )
    assert site.analysis_states() == {"done": 1, "failed": 1}
