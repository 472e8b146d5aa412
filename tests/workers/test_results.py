"""Results as a site gets them: a study pushed to `precedent serve` comes back to the PACS
(a real Orthanc) as a Structured Report and Grad-CAM secondary captures in the same study,
validated by dicom3tools and DCMTK; a PACS that is down gets everything once it is back;
a study that grows gets a new report naming the earlier one."""

from __future__ import annotations

import io
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom
import pytest
from pydicom.dataset import Dataset
from sqlalchemy import select

from node.catalog.models import DELIVERIES, INSTANCES, RESULTS
from node.catalog.recording import Catalog
from tests.support.dcmtk import dcmtk, storescu
from tests.support.models import LABELS, tiny_bundle
from tests.support.nodes import free_port, run_precedent
from tests.support.peers import Orthanc, orthanc
from tests.support.sites import Site, ultrasound_studies
from tests.support.waiting import wait_until
from workers.reports import CODES_USED

pytestmark = pytest.mark.timeout(300)

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_bundle(tmp_path_factory.mktemp("model") / "cnn4.bundle")


def _site(tmp_path: Path, bundle: Path, destinations: list[dict[str, Any]]) -> Site:
    site = Site(
        tmp_path,
        f"sqlite:///{tmp_path / 'data' / 'catalog.sqlite3'}",
        {
            "dicom": {"bind": "127.0.0.1"},
            "storage": {"data_dir": tmp_path / "data", "min_free_bytes": 0},
            "queue": {"poll_seconds": 0.1},
            "study": {"stable_seconds": 1.0},
            "model": {"bundle": bundle, "batch_size": 4, "batch_wait_seconds": 0.02},
            "forwarding": {"poll_seconds": 0.1, "retry_backoff_seconds": 0.3, "max_backoff_seconds": 1.0},
        },
        destinations=destinations,
    )
    site.sections["dicom"]["port"] = site.port
    return site


@pytest.fixture
def pacs_ports() -> tuple[int, int]:
    return free_port(), free_port()


@pytest.fixture
def site(tmp_path: Path, bundle: Path, pacs_ports: tuple[int, int]) -> Iterator[Site]:
    destination = {"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs_ports[0]}
    made = _site(tmp_path, bundle, [destination])
    yield made
    made.stop()


def _results(site: Site) -> list[tuple[str, str, str]]:
    """(kind, SOP Instance UID, file path) of every result the node recorded."""
    catalog = Catalog.open(site.catalog_url)
    try:
        with catalog.connection() as connection:
            rows = connection.execute(
                select(RESULTS.c.kind, INSTANCES.c.sop_instance_uid, INSTANCES.c.file_path)
                .join(INSTANCES, INSTANCES.c.id == RESULTS.c.instance_pk)
                .order_by(RESULTS.c.id)
            ).all()
    finally:
        catalog.close()
    return [(kind, uid, path) for kind, uid, path in rows]


def _deliveries(site: Site) -> list[tuple[str, int, int | None]]:
    catalog = Catalog.open(site.catalog_url)
    try:
        with catalog.connection() as connection:
            rows = connection.execute(
                select(DELIVERIES.c.state, DELIVERIES.c.attempts, DELIVERIES.c.status).order_by(
                    DELIVERIES.c.id
                )
            ).all()
    finally:
        catalog.close()
    return [(state, attempts, status) for state, attempts, status in rows]


def _held_by(pacs: Orthanc, study_uid: str) -> dict[str, Dataset]:
    """SOP Instance UID → data set of what Orthanc holds in the study."""
    found = pacs.post("/tools/find", {"Level": "Instance", "Query": {"StudyInstanceUID": study_uid}})
    held = {}
    for instance_id in found:
        dataset = pydicom.dcmread(io.BytesIO(pacs.file(instance_id)))
        held[str(dataset.SOPInstanceUID)] = dataset
    return held


def _content_items(dataset: Dataset) -> Iterator[Dataset]:
    for item in dataset.get("ContentSequence", []):
        yield item
        yield from _content_items(item)


def _meaning(item: Dataset) -> str:
    return str(item.ConceptNameCodeSequence[0].CodeMeaning) if "ConceptNameCodeSequence" in item else ""


def _assert_valid(path: Path) -> None:
    done = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False)
    errors = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("Error")]
    assert not errors, "\n".join(errors)


def test_a_pushed_study_reaches_the_pacs_with_its_report_and_gradcam_images(
    site: Site, tmp_path: Path, pacs_ports: tuple[int, int]
) -> None:
    files = ultrasound_studies(tmp_path / "in", studies=1, images=2)
    sources = {str(pydicom.dcmread(f).SOPInstanceUID): pydicom.dcmread(f) for f in files}
    study_uid = str(next(iter(sources.values())).StudyInstanceUID)
    with orthanc(tmp_path / "orthanc", *pacs_ports, modalities={}) as pacs:
        site.start_node()
        run = storescu(site.port, files)
        assert run.returncode == 0, run.output
        pushed = time.monotonic()
        wait_until(lambda: len(_held_by(pacs, study_uid)) == 3, 120, "SR and two captures in Orthanc")
        print(f"\nlast instance pushed → results in Orthanc: {time.monotonic() - pushed:.1f} s")
        held = _held_by(pacs, study_uid)
    reports = [ds for ds in held.values() if ds.SOPClassUID == SR_CLASS]
    captures = [ds for ds in held.values() if ds.SOPClassUID == SC_CLASS]
    assert len(reports) == 1 and len(captures) == 2
    for capture in captures:
        source = sources[str(capture.SourceImageSequence[0].ReferencedSOPInstanceUID)]
        assert (capture.Rows, capture.Columns) == (source.Rows, source.Columns)
        assert capture.PatientID == source.PatientID and capture.StudyInstanceUID == study_uid
        assert capture.BurnedInAnnotation == "YES"
        assert capture.SeriesInstanceUID != source.SeriesInstanceUID
    for n, dataset in enumerate(held.values()):
        path = tmp_path / f"from-orthanc-{n}.dcm"
        dataset.save_as(path)
        _assert_valid(path)
    report_path = tmp_path / "report.dcm"
    reports[0].save_as(report_path)
    rendered = subprocess.run(
        [dcmtk("dsrdump"), str(report_path)], capture_output=True, text=True, check=False
    )
    assert rendered.returncode == 0, rendered.stderr
    assert "not for clinical use" in rendered.stdout.lower()
    sr = hd.sr.Comprehensive3DSR.from_dataset(reports[0])
    referenced = {
        str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        for item in hd.sr.utils.find_content_items(sr, value_type=hd.sr.ValueTypeValues.IMAGE, recursive=True)
    }
    assert set(sources) | {str(c.SOPInstanceUID) for c in captures} <= referenced
    assert any(label in rendered.stdout.lower() for label in LABELS)
    # The node keeps what it made, and says it was delivered once.
    assert sorted(kind for kind, _, _ in _results(site)) == ["gradcam", "gradcam", "report"]
    assert [(state, status) for state, _, status in _deliveries(site)] == [("done", 0)] * 3


def test_a_pacs_that_was_down_receives_everything_once_it_is_back(
    site: Site, tmp_path: Path, pacs_ports: tuple[int, int]
) -> None:
    files = ultrasound_studies(tmp_path / "in", studies=2, images=1)
    site.start_node()
    run = storescu(site.port, files)
    assert run.returncode == 0, run.output
    wait_until(lambda: len(_deliveries(site)) == 4, 120, "results of both studies queued")
    wait_until(
        lambda: all(attempts >= 2 for _, attempts, _ in _deliveries(site)), 30, "delivery retried while down"
    )
    status = run_precedent("status", "--json", "--config", str(site.config))
    [pacs_queue] = json.loads(status.stdout)["destinations"]
    assert pacs_queue["pending"] + pacs_queue["running"] == 4 and pacs_queue["done"] == 0
    assert "cannot be reached" in pacs_queue["last_failure"]
    with orthanc(tmp_path / "orthanc", *pacs_ports, modalities={}) as pacs:
        wait_until(lambda: {s for s, _, _ in _deliveries(site)} == {"done"}, 60, "all delivered")
        held = set(pacs.instances())
    assert held == {uid for _, uid, _ in _results(site)}
    assert len(held) == 4
    # Each report lists the other study, the only other one stored, as its most similar.
    study_uids = {str(pydicom.dcmread(f).StudyInstanceUID) for f in files}
    for kind, _, path in _results(site):
        if kind != "report":
            continue
        report = pydicom.dcmread(site.root / "data" / path)
        similar = [str(item.UID) for item in _content_items(report) if _meaning(item) == "Study Instance UID"]
        assert similar == sorted(study_uids - {str(report.StudyInstanceUID)})


def test_a_study_that_grows_gets_a_new_report_naming_the_earlier_one(tmp_path: Path, bundle: Path) -> None:
    site = _site(tmp_path, bundle, [])
    files = ultrasound_studies(tmp_path / "in", studies=1, images=2)
    try:
        site.start_node()
        assert storescu(site.port, files[:1]).returncode == 0
        wait_until(lambda: [k for k, _, _ in _results(site)].count("report") == 1, 120, "first report")
        assert storescu(site.port, files[1:]).returncode == 0
        wait_until(lambda: [k for k, _, _ in _results(site)].count("report") == 2, 120, "second report")
        reports = [(uid, path) for kind, uid, path in _results(site) if kind == "report"]
    finally:
        site.stop()
    first_uid, _ = reports[0]
    second = pydicom.dcmread(site.root / "data" / reports[1][1])
    assert second.SOPInstanceUID != first_uid
    predecessors = [
        str(sop.ReferencedSOPInstanceUID)
        for study in second.PredecessorDocumentsSequence
        for series in study.ReferencedSeriesSequence
        for sop in series.ReferencedSOPSequence
    ]
    assert predecessors == [first_uid]


def test_every_code_the_report_uses_is_in_the_conformance_statement() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    for use in CODES_USED:
        row = f"| {use.code.scheme_designator} | {use.code.value} | {use.code.meaning} |"
        assert row in readme, f"README's code table lacks {use.purpose}: {row}"
