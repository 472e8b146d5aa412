"""Delivery benchmark: from the last instance of a study pushed to Precedent to its
Structured Report (and Grad-CAM captures) held by the PACS.

Run on demand (CI runs it only at a tiny size, see ``test_bench_delivery_smoke.py``)::

    python -m tests.bench.bench_delivery --studies 5 --images 3 [--arch cnn4 --size 64]

A site as it runs: `precedent serve` (embedded broker, one local worker, SQLite) with a real
Orthanc as its one destination, both on loopback. A warm-up study is pushed first and
waited for, so that the worker has loaded its model. Then each study is pushed with
storescu, one at a time; the clock starts when storescu returns (every instance
acknowledged) and stops when Orthanc's REST API lists the SR in that study (polled every
20 ms), and again when it holds every capture too. ``study.stable_seconds`` is part of the
figure by design (the node waits that long for more instances); the table also shows the
figure minus it: what analysis, results and forwarding add.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import pydicom

from tests.support.dcmtk import storescu
from tests.support.models import tiny_bundle
from tests.support.nodes import free_port
from tests.support.peers import Orthanc, orthanc
from tests.support.sites import Site, ultrasound_studies


def held(pacs: Orthanc, study_uid: str) -> tuple[bool, int]:
    """(the SR is there, how many instances Orthanc holds in the study)."""
    reports = pacs.post(
        "/tools/find", {"Level": "Series", "Query": {"StudyInstanceUID": study_uid, "Modality": "SR"}}
    )
    found = pacs.post("/tools/find", {"Level": "Instance", "Query": {"StudyInstanceUID": study_uid}})
    return bool(reports), len(found)


def measure(studies: int, images: int, architecture: str, size: int, stable: float) -> dict[str, list[float]]:
    with tempfile.TemporaryDirectory(prefix="bench-delivery-") as scratch:
        root = Path(scratch)
        bundle = tiny_bundle(root / "model.bundle", architecture, size)
        dicom_port, http_port = free_port(), free_port()
        site = Site(
            root,
            f"sqlite:///{root / 'data' / 'catalog.sqlite3'}",
            {
                "dicom": {"bind": "127.0.0.1"},
                "storage": {"data_dir": root / "data", "min_free_bytes": 0},
                "queue": {"poll_seconds": 0.05},
                "study": {"stable_seconds": stable},
                "model": {"bundle": bundle, "batch_wait_seconds": 0.01},
                "forwarding": {"poll_seconds": 0.05},
                "similarity": {"sync_seconds": 0.2},
            },
            destinations=[{"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": dicom_port}],
        )
        site.sections["dicom"]["port"] = site.port
        files = ultrasound_studies(root / "in", studies=studies + 1, images=images)
        by_study = [files[i * images : (i + 1) * images] for i in range(studies + 1)]
        figures: dict[str, list[float]] = {"sr": [], "all": []}
        with orthanc(root / "orthanc", dicom_port, http_port, modalities={}) as pacs:
            try:
                site.start_node()
                for n, study_files in enumerate(by_study):
                    study_uid = _study_uid(study_files[0])
                    run = storescu(site.port, study_files)
                    assert run.returncode == 0, run.output
                    pushed = time.monotonic()
                    sr_at = _wait(pacs, study_uid, images + 1, pushed, figures if n else None)
                    if n:
                        figures["sr"].append(sr_at)
            finally:
                site.stop()
        return figures


def _study_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def _wait(
    pacs: Orthanc, study_uid: str, expected: int, pushed: float, figures: dict[str, list[float]] | None
) -> float:
    deadline = pushed + 300
    sr_at = 0.0
    while time.monotonic() < deadline:
        has_sr, count = held(pacs, study_uid)
        if has_sr and not sr_at:
            sr_at = time.monotonic() - pushed
        if has_sr and count >= expected:
            if figures is not None:
                figures["all"].append(time.monotonic() - pushed)
            return sr_at
        time.sleep(0.02)
    raise TimeoutError(f"study {study_uid} did not reach Orthanc in 300 s")


def report(figures: dict[str, list[float]], stable: float) -> str:
    lines = [
        f"{'':32} {'median s':>9} {'max s':>7} {'minus stable_seconds':>21}",
    ]
    for key, name in (("sr", "last instance -> SR in PACS"), ("all", "last instance -> SR + captures")):
        values = figures[key]
        median = statistics.median(values)
        lines.append(f"{name:32} {median:9.2f} {max(values):7.2f} {median - stable:21.2f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=5)
    parser.add_argument("--images", type=int, default=3)
    parser.add_argument("--arch", default="cnn4")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--stable", type=float, default=1.0, help="study.stable_seconds")
    args = parser.parse_args()
    figures = measure(args.studies, args.images, args.arch, args.size, args.stable)
    print(
        f"{args.studies} studies of {args.images} images, {args.arch} at {args.size} px, "
        f"stable_seconds {args.stable}"
    )
    print(report(figures, args.stable))


if __name__ == "__main__":
    main()
