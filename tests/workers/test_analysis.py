"""The analysis pipeline on real files: every pydicom-data file ends analysed, failed
with a reason, or skipped; frame policies; Grad-CAM kept; settings checked."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from node.catalog.analyses import AnalysisOutcome, AnalysisResult, AnalysisTarget
from node.errors import ModelConfigError
from node.settings import ModelSettings
from tests.support.data import pydicom_data_files, ultrasound_file
from tests.support.models import LABELS, tiny_bundle
from workers.analysis import Analyzer, decode_heatmap
from workers.bundles import load_bundle


@pytest.fixture(scope="module")
def bundle_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_bundle(tmp_path_factory.mktemp("model") / "cnn4.bundle")


def analyzer(bundle_path: Path, **settings: object) -> Analyzer:
    return Analyzer(load_bundle(bundle_path), ModelSettings.model_validate(settings))


def targets(files: list[Path]) -> list[AnalysisTarget]:
    return [AnalysisTarget(n + 1, n + 1, f"1.2.{n}", str(path), 1) for n, path in enumerate(files)]


@pytest.mark.timeout(300)
def test_every_pydicom_data_file_is_analysed_or_closed_with_a_reason(bundle_path: Path) -> None:
    files = pydicom_data_files()
    results = analyzer(bundle_path, batch_size=8).analyse(targets(files), Path("/"))
    assert len(results) == len(files)
    analysed = [r for r in results if isinstance(r, AnalysisResult)]
    closed = [r for r in results if isinstance(r, AnalysisOutcome)]
    assert all(r.reason for r in closed)
    assert all(r.state in ("failed", "skipped") for r in closed)
    assert len(analysed) >= 0.8 * len(files), [r.reason for r in closed]
    for r in analysed:
        assert r.predicted_label in LABELS
        assert sum(r.probabilities.values()) == pytest.approx(1.0, abs=1e-4)
        assert r.embedding.shape == (256,) and np.isfinite(r.embedding).all()
        assert r.heatmap is not None and r.heatmap_size == 64
        assert r.timings["decode"] > 0
    # Ids follow their targets, whatever the order decoding finished in.
    assert [r.analysis_id for r in results] == list(range(1, len(files) + 1))


def test_results_do_not_depend_on_the_batch_they_came_in(bundle_path: Path) -> None:
    files = [ultrasound_file(), *[p for p in pydicom_data_files() if p.name.startswith("US1_")][:3]]
    model = analyzer(bundle_path, batch_size=3, gradcam=False)
    together = model.analyse(targets(files), Path("/"))
    alone = [model.analyse(targets([f]), Path("/"))[0] for f in files]
    for a, b in zip(together, alone, strict=True):
        assert isinstance(a, AnalysisResult) and isinstance(b, AnalysisResult)
        assert a.probabilities == pytest.approx(b.probabilities, abs=1e-5)
        assert np.allclose(a.embedding, b.embedding, atol=1e-5)
        assert a.heatmap is None


def multiframe_file() -> Path:
    return next(p for p in pydicom_data_files() if p.name.startswith("emri_small"))


def test_frame_policies(bundle_path: Path) -> None:
    path = multiframe_file()
    middle = analyzer(bundle_path, frame_policy="middle").analyse(targets([path]), Path("/"))[0]
    each = analyzer(bundle_path, frame_policy="each", max_frames=5).analyse(targets([path]), Path("/"))[0]
    worst = analyzer(bundle_path, frame_policy="most_suspicious", max_frames=5).analyse(
        targets([path]), Path("/")
    )[0]
    assert isinstance(middle, AnalysisResult) and isinstance(each, AnalysisResult)
    assert isinstance(worst, AnalysisResult)
    assert middle.frames is None and middle.frame_index > 0
    assert each.frames is not None and len(each.frames) == 5
    assert worst.frames is None
    severity = {label: n for n, label in enumerate(LABELS)}

    def expected(probabilities: dict[str, float]) -> float:
        return sum(p * severity[label] for label, p in probabilities.items())

    reported = max(each.frames, key=lambda f: expected(f["probabilities"]))
    assert each.frame_index == worst.frame_index == reported["frame"]


def test_the_heatmap_is_kept_for_the_explained_label(bundle_path: Path) -> None:
    result = analyzer(bundle_path, gradcam_label="malignant").analyse(
        targets([ultrasound_file()]), Path("/")
    )[0]
    assert isinstance(result, AnalysisResult)
    assert result.heatmap_label == "malignant"
    assert result.heatmap is not None and result.heatmap_size is not None
    heatmap = decode_heatmap(result.heatmap, result.heatmap_size)
    assert heatmap.shape == (64, 64) and 0 <= heatmap.min() <= heatmap.max() <= 1


def test_an_unknown_gradcam_label_is_a_setup_error_naming_the_key(bundle_path: Path) -> None:
    with pytest.raises(ModelConfigError, match=r"model\.gradcam_label"):
        analyzer(bundle_path, gradcam_label="BI-RADS 5")


def test_a_missing_file_fails_its_analysis_not_the_batch(bundle_path: Path, tmp_path: Path) -> None:
    files = [tmp_path / "gone.dcm", ultrasound_file()]
    gone, fine = analyzer(bundle_path).analyse(targets(files), Path("/"))
    assert isinstance(gone, AnalysisOutcome) and gone.state == "failed" and "unreadable" in gone.reason
    assert isinstance(fine, AnalysisResult)


def test_non_image_objects_are_skipped(bundle_path: Path, tmp_path: Path) -> None:
    import pydicom

    sr = pydicom.dcmread(ultrasound_file())
    del sr.PixelData
    sr.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.22"
    sr.save_as(tmp_path / "sr.dcm")
    [outcome] = analyzer(bundle_path).analyse(targets([tmp_path / "sr.dcm"]), Path("/"))
    assert isinstance(outcome, AnalysisOutcome) and outcome.state == "skipped"
