"""`precedent demo` as a new user runs it: one command, no clinical data, no server. At a small
size it writes phantoms, trains a model, runs the node, pushes the studies over DICOM and shows
every study's finding, Grad-CAM PNGs, its SR as text and the similar studies a C-FIND finds, all
labelled as results on synthetic phantoms; Ctrl-C and bad arguments stop it cleanly."""

from __future__ import annotations

import csv
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from PIL import Image
from sqlalchemy import select

from node.catalog.models import INSTANCES, RESULTS, STUDIES, STUDY_ASSESSMENTS
from node.catalog.recording import Catalog
from tests.support.nodes import precedent_executable, run_precedent, site_environment
from workers.demo import MARKER, NOT_FOR_CLINICAL_USE, plain_sr, toml_text

pytestmark = pytest.mark.timeout(300)

SMALL = ("--n", "24", "--push", "12", "--epochs", "2", "--size", "48")
STUDY_PHANTOMS = "phantoms/studies-n12-seed0"
LABEL = r"(normal|benign|malignant)"
# A row of the studies table: number, accession, images, phantom label, finding, probability.
STUDY_ROW = re.compile(rf"^\s*(\d+)\s+(PH\w+)\s+(\d+)\s+{LABEL}\s+{LABEL}\s+([01]\.\d\d)\s", re.MULTILINE)
# A row of the similar-studies table: rank, similar study, its finding, distance.
SIMILAR_ROW = re.compile(rf"\s(\d)\s+#\d+ PH\w+\s+{LABEL}\s+(\d+\.\d{{4}})\s*$", re.MULTILINE)


@dataclass(frozen=True)
class DemoRun:
    directory: Path
    run: subprocess.CompletedProcess[str]

    @property
    def output(self) -> str:
        return self.run.stdout

    def pushed(self) -> dict[str, str]:
        """StudyInstanceUID → the phantom's label, for every study the demo sent."""
        with (self.directory / STUDY_PHANTOMS / "labels.csv").open(encoding="utf-8") as manifest:
            return {row["study_instance_uid"]: row["label"] for row in csv.DictReader(manifest)}

    def catalog(self) -> Catalog:
        return Catalog.open(f"sqlite:///{self.directory / 'data' / 'catalog.sqlite3'}")


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoRun:
    directory = tmp_path_factory.mktemp("demo") / "precedent-demo"
    run = run_precedent("demo", "--dir", str(directory), *SMALL, timeout=240)
    assert run.returncode == 0, f"stdout:\n{run.stdout}\nstderr:\n{run.stderr}"
    return DemoRun(directory, run)


def test_every_pushed_study_gets_a_report_for_its_newest_assessment(demo: DemoRun) -> None:
    pushed = demo.pushed()
    catalog = demo.catalog()
    try:
        with catalog.connection() as connection:
            reported = connection.execute(
                select(STUDIES.c.study_instance_uid, STUDY_ASSESSMENTS.c.revision)
                .join(RESULTS, RESULTS.c.study_pk == STUDIES.c.id)
                .join(STUDY_ASSESSMENTS, STUDY_ASSESSMENTS.c.id == RESULTS.c.assessment_pk)
                .where(RESULTS.c.kind == "report")
            ).all()
            newest = dict(
                connection.execute(
                    select(STUDIES.c.study_instance_uid, STUDY_ASSESSMENTS.c.revision)
                    .join(STUDY_ASSESSMENTS, STUDY_ASSESSMENTS.c.study_pk == STUDIES.c.id)
                    .order_by(STUDY_ASSESSMENTS.c.revision)
                ).all()
            )
    finally:
        catalog.close()
    assert len(pushed) >= 3
    assert {uid for uid, _ in reported} == set(pushed)
    assert all((uid, newest[uid]) in reported for uid in pushed)


def test_each_study_is_shown_with_the_finding_the_catalog_holds(demo: DemoRun) -> None:
    catalog = demo.catalog()
    try:
        with catalog.connection() as connection:
            findings = dict(
                connection.execute(
                    select(STUDIES.c.accession_number, STUDY_ASSESSMENTS.c.finding)
                    .join(STUDY_ASSESSMENTS, STUDY_ASSESSMENTS.c.study_pk == STUDIES.c.id)
                    .order_by(STUDY_ASSESSMENTS.c.revision)
                ).all()
            )
    finally:
        catalog.close()
    shown = {row[1]: row[4] for row in STUDY_ROW.findall(demo.output)}
    assert len(shown) == len(demo.pushed())
    assert shown == findings


def test_grad_cam_pngs_are_written_for_every_image_and_open(demo: DemoRun) -> None:
    pngs = sorted((demo.directory / "gradcam").glob("*.png"))
    images = sum(1 for _ in (demo.directory / STUDY_PHANTOMS).rglob("*.dcm"))
    assert len(pngs) == images
    for png in pngs:
        with Image.open(png) as opened:
            opened.verify()
        with Image.open(png) as opened:
            assert opened.mode == "RGB" and opened.size[0] > 100


def test_similar_studies_found_by_c_find_are_shown_with_finding_and_distance(demo: DemoRun) -> None:
    rows = SIMILAR_ROW.findall(demo.output)
    assert rows, demo.output
    assert all(0.0 <= float(distance) <= 2.0 for _, _, distance in rows)
    assert "C-FIND to PRECEDENT_SIM" in demo.output
    assert re.search(r"the most similar study has the same finding for \d+ of \d+ studies", demo.output)


def test_every_report_is_saved_as_text_and_one_printed_in_full(demo: DemoRun) -> None:
    texts = sorted((demo.directory / "reports").glob("*.txt"))
    assert len(texts) == len(demo.pushed())
    for text in texts:
        content = text.read_text(encoding="utf-8")
        assert NOT_FOR_CLINICAL_USE in content.splitlines()[0]
        assert "Imaging Measurement Report" in content
    assert "Structured Report of study" in demo.output
    assert "Not for clinical use: synthetic phantoms" in demo.output


def test_results_are_labelled_as_phantoms_wherever_they_appear(demo: DemoRun) -> None:
    output = demo.output
    for heading in ("Studies —", "Similar studies —", "Summary —", "Where everything is —"):
        line = next(line for line in output.splitlines() if heading in line)
        assert NOT_FOR_CLINICAL_USE in line, line
    assert NOT_FOR_CLINICAL_USE in (demo.directory / "results.txt").read_text(encoding="utf-8")
    assert NOT_FOR_CLINICAL_USE in (demo.directory / "precedent-demo.toml").read_text(encoding="utf-8")


def test_the_plain_rendering_of_an_sr_shows_its_content_tree(demo: DemoRun) -> None:
    """What the demo prints where DCMTK's dsrdump is not installed."""
    catalog = demo.catalog()
    try:
        with catalog.connection() as connection:
            path = connection.execute(
                select(INSTANCES.c.file_path)
                .join(RESULTS, RESULTS.c.instance_pk == INSTANCES.c.id)
                .where(RESULTS.c.kind == "report")
            ).first()
    finally:
        catalog.close()
    assert path is not None
    text = plain_sr(pydicom.dcmread(demo.directory / "data" / path[0]))
    assert text.splitlines()[0] == "Imaging Measurement Report"
    assert '<CONTAINS:TEXT:Comment> = "Not for clinical use: synthetic phantoms' in text
    assert re.search(r"<CONTAINS:CODE:Finding> = (Normal|Benign|Malignant)", text)


def test_ctrl_c_stops_the_node_and_its_worker(demo: DemoRun, tmp_path: Path) -> None:
    directory = tmp_path / "again"
    directory.mkdir()
    for kept in ("phantoms", "model", MARKER):  # the rerun reuses the model: no training
        source = demo.directory / kept
        (shutil.copytree if source.is_dir() else shutil.copy)(source, directory / kept)
    process = subprocess.Popen(
        [str(precedent_executable()), "demo", "--dir", str(directory), *SMALL],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=site_environment(),
        start_new_session=True,  # Ctrl-C reaches the whole process group, the worker too
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as a terminal leaves it
    )
    try:
        assert process.stdout is not None
        seen = ""
        while "5/5 results" not in seen:
            line = process.stdout.readline()
            assert line, f"the demo ended early:\n{seen}"
            seen += line
        workers = _worker_pids(directory / "node.log")
        assert workers and all(_alive(pid) for pid in workers)
        os.killpg(process.pid, signal.SIGINT)
        _, error = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130
    assert "interrupted" in error and "Traceback" not in error
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in workers)


def test_a_dir_that_is_a_file_is_refused_naming_it(tmp_path: Path) -> None:
    file = tmp_path / "notes.txt"
    file.write_text("not a folder")
    run = run_precedent("demo", "--dir", str(file), *SMALL, timeout=60)
    assert run.returncode == 1
    assert f"--dir {file} exists and is not a folder" in run.stderr
    assert "Traceback" not in run.stderr
    assert file.read_text() == "not a folder"


def test_a_folder_that_is_not_a_demo_s_is_left_alone(tmp_path: Path) -> None:
    (tmp_path / "study.dcm").write_bytes(b"someone's data")
    run = run_precedent("demo", "--dir", str(tmp_path), *SMALL, timeout=60)
    assert run.returncode == 1
    assert f"--dir {tmp_path} is not empty and not an earlier demo's folder" in run.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study.dcm"]


def test_a_port_in_use_is_refused_before_any_work(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = run_precedent("demo", "--dir", str(tmp_path / "d"), "--port", str(port), *SMALL, timeout=60)
    assert run.returncode == 1
    assert f"port {port} on 127.0.0.1 is not free" in run.stderr
    assert not (tmp_path / "d" / "phantoms").exists()


def test_the_settings_file_keeps_any_path_exactly() -> None:
    odd = 'C:\\data "quoted" — ünïcode'
    text = toml_text({"storage": {"data_dir": odd, "fsync": True, "min_free_bytes": 5}})
    assert tomllib.loads(text) == {"storage": {"data_dir": odd, "fsync": True, "min_free_bytes": 5}}


def _worker_pids(log: Path) -> list[int]:
    return [int(pid) for pid in re.findall(r"analysis worker started \(pid (\d+)\)", log.read_text())]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"
