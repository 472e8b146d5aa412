"""Evaluation: the classification numbers equal those worked out by hand, retrieval numbers are
the shared implementation's, a bundle's recorded held-out set is what gets evaluated, the report
holds every number, plot and banner, and bad input stops with a message that says what is wrong.

The images are simple synthetic ones drawn here (a bright disc, a dark disc, or none), not
phantoms and not patients: the tests check the machinery, not the medicine.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydicom import uid
from pydicom.dataset import Dataset, FileMetaDataset
from typer.testing import CliRunner

from node.cli import app
from tests.support.models import tiny_bundle
from workers.datasets import load_data_set
from workers.evaluate import (
    Evaluation,
    EvaluationError,
    EvaluationOptions,
    classification_report,
    confusion_metrics,
    evaluate,
    fold_summary,
)
from workers.evaluation_report import write_report
from workers.phantoms import SYNTHETIC_MARKER
from workers.retrieval_metrics import evaluate_retrieval
from workers.train import TrainingOptions, train

LABELS = ("normal", "benign", "malignant")
QUICK = EvaluationOptions(device="cpu", threads=1)


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """The test machine is shared: one core for torch."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def disc_image(label: str, rng: np.random.Generator, px: int = 40) -> np.ndarray:
    """Mid-gray noise with no disc (normal), a bright disc (benign) or a dark one (malignant)."""
    image = rng.normal(0.45, 0.08, (px, px))
    if label != "normal":
        rows, columns = np.mgrid[:px, :px]
        centre = rng.uniform(0.35, 0.65, 2) * px
        radius = rng.uniform(0.15, 0.25) * px
        inside = (rows - centre[0]) ** 2 + (columns - centre[1]) ** 2 <= radius**2
        image[inside] = 0.9 if label == "benign" else 0.08
    return np.asarray(np.rint(np.clip(image, 0.03, 1.0) * 255), dtype=np.uint8)


def write_folders(root: Path, per_class: int = 8, labels: tuple[str, ...] = LABELS, seed: int = 0) -> Path:
    """BUSI's layout: ``root/<label>/<label>-<i>.png``."""
    rng = np.random.default_rng(seed)
    for label in labels:
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(disc_image(label if label in LABELS else "normal", rng)).save(
                root / label / f"{label}-{i}.png"
            )
    return root


def write_manifest(root: Path, per_class: int = 10, seed: int = 0) -> Path:
    """PNGs with a ``path,label,patient_id`` manifest, two images per patient."""
    rng = np.random.default_rng(seed)
    lines = ["path,label,patient_id"]
    for label in LABELS:
        for i in range(per_class):
            name = f"images/{label}-{i}.png"
            (root / "images").mkdir(parents=True, exist_ok=True)
            Image.fromarray(disc_image(label, rng)).save(root / name)
            lines.append(f"{name},{label},{label}-{i // 2}")
    (root / "manifest.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root / "manifest.csv"


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 images, 8 per class."""
    return write_folders(tmp_path_factory.mktemp("folders"))


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two cnn4 bundles of random weights at 32 px, not cleared for clinical use."""
    folder = tmp_path_factory.mktemp("bundles")
    return tiny_bundle(folder / "a.bundle", size=32, seed=0), tiny_bundle(
        folder / "b.bundle", size=32, seed=1
    )


@pytest.fixture(scope="module")
def evaluated(folders: Path, bundles: tuple[Path, Path]) -> Evaluation:
    return evaluate(folders, [bundles[0]], QUICK)


@pytest.fixture(scope="module")
def report(evaluated: Evaluation, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("report")
    write_report(evaluated, folder)
    return folder


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """30 images of 15 patients."""
    return write_manifest(tmp_path_factory.mktemp("manifest"))


@pytest.fixture(scope="module")
def trained(manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cnn4 bundle trained briefly on ``manifest`` with an 80:20 split by patient."""
    out = tmp_path_factory.mktemp("trained") / "trained.bundle"
    options = TrainingOptions(architecture="cnn4", epochs=1, batch_size=8, size=32, device="cpu", threads=1)
    train(load_data_set(manifest), out, options)
    return out


# --- classification metrics against hand-computed values ------------------------------------

# Ten images of three classes. Rows true, columns predicted:
#              normal benign malignant
#   normal        2      1      1
#   benign        1      2      0
#   malignant     0      1      2
TRUE = [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
PREDICTED = [0, 0, 1, 2, 1, 1, 0, 2, 2, 1]


def test_the_confusion_matrix_counts_true_rows_and_predicted_columns() -> None:
    metrics = confusion_metrics(TRUE, PREDICTED, LABELS)
    assert metrics["confusion_matrix"] == [[2, 1, 1], [1, 2, 0], [0, 1, 2]]
    assert metrics["images"] == 10
    assert metrics["accuracy"] == pytest.approx(6 / 10)


def test_per_class_measures_are_one_class_against_the_rest() -> None:
    per_class = confusion_metrics(TRUE, PREDICTED, LABELS)["per_class"]
    # normal: TP 2, FN 2, FP 1, TN 5; benign: TP 2, FN 1, FP 2, TN 5; malignant: TP 2, FN 1, FP 1, TN 6
    expected = {
        "normal": {
            "precision": 2 / 3,
            "recall": 2 / 4,
            "f1": 4 / 7,
            "sensitivity": 2 / 4,
            "specificity": 5 / 6,
        },
        "benign": {
            "precision": 2 / 4,
            "recall": 2 / 3,
            "f1": 4 / 7,
            "sensitivity": 2 / 3,
            "specificity": 5 / 7,
        },
        "malignant": {
            "precision": 2 / 3,
            "recall": 2 / 3,
            "f1": 2 / 3,
            "sensitivity": 2 / 3,
            "specificity": 6 / 7,
        },
    }
    for label, values in expected.items():
        for measure, value in values.items():
            assert per_class[label][measure] == pytest.approx(value), (label, measure)
    assert [per_class[label]["support"] for label in LABELS] == [4, 3, 3]


def test_macro_means_are_unweighted_means_over_classes() -> None:
    macro = confusion_metrics(TRUE, PREDICTED, LABELS)["macro"]
    assert macro["precision"] == pytest.approx((2 / 3 + 1 / 2 + 2 / 3) / 3)  # 11/18
    assert macro["recall"] == pytest.approx((1 / 2 + 2 / 3 + 2 / 3) / 3)  # 11/18
    assert macro["f1"] == pytest.approx((4 / 7 + 4 / 7 + 2 / 3) / 3)  # 38/63
    assert macro["specificity"] == pytest.approx((5 / 6 + 5 / 7 + 6 / 7) / 3)  # 101/126


def test_a_class_without_images_has_no_sensitivity_and_no_auc() -> None:
    true = np.array([0, 0, 1, 1])
    probabilities = np.array([[0.8, 0.1, 0.1], [0.4, 0.5, 0.1], [0.3, 0.6, 0.1], [0.6, 0.3, 0.1]])
    metrics = classification_report(true, probabilities, LABELS)
    assert metrics["per_class"]["malignant"]["sensitivity"] is None
    assert metrics["per_class"]["malignant"]["auc"] is None
    assert metrics["per_class"]["malignant"]["specificity"] == 1.0  # never predicted, 4 negatives
    assert set(metrics["roc_curves"]) == {"normal", "benign"}


def test_roc_auc_is_one_class_against_the_rest_from_its_probability() -> None:
    probabilities = np.array(
        [
            [0.9, 0.05, 0.05],  # normal
            [0.4, 0.3, 0.3],  # normal
            [0.2, 0.5, 0.3],  # benign
            [0.6, 0.4, 0.0],  # benign
            [0.1, 0.05, 0.85],  # malignant
        ]
    )
    true = np.array([0, 0, 1, 1, 2])
    metrics = classification_report(true, probabilities, LABELS)
    # normal: positives 0.9, 0.4 against negatives 0.2, 0.6, 0.1; a positive ranks above a
    # negative in 5 of the 6 pairs (0.4 < 0.6): AUC 5/6.
    assert metrics["per_class"]["normal"]["auc"] == pytest.approx(5 / 6)
    # benign: 0.5, 0.4 against 0.05, 0.3, 0.05; malignant: 0.85 against 0.05, 0.3, 0.3, 0.0.
    assert metrics["per_class"]["benign"]["auc"] == pytest.approx(1.0)
    assert metrics["per_class"]["malignant"]["auc"] == pytest.approx(1.0)
    assert metrics["macro"]["auc"] == pytest.approx((5 / 6 + 1 + 1) / 3)
    assert metrics["accuracy"] == pytest.approx(4 / 5)  # the second benign one is called normal


def test_recorded_folds_are_summarised_as_mean_and_sample_sd() -> None:
    # Fold 1 is perfect (accuracy 1); fold 2 gets one of each class wrong out of 2 (accuracy 0.5).
    recorded = {
        "per_fold": [
            {"confusion_matrix": [[2, 0], [0, 2]]},
            {"confusion_matrix": [[1, 1], [1, 1]]},
        ]
    }
    summary = fold_summary(recorded, ("benign", "malignant"))
    assert summary is not None
    assert summary["folds"] == 2
    assert summary["accuracy"]["mean"] == pytest.approx(0.75)
    assert summary["accuracy"]["sd"] == pytest.approx(np.std([1.0, 0.5], ddof=1))
    assert summary["per_class"]["malignant"]["specificity"]["mean"] == pytest.approx(0.75)
    assert summary["confusion_matrix"] == [[3, 1], [1, 3]]
    assert fold_summary({"data": "none"}, LABELS) is None


# --- one bundle on a folder data set ----------------------------------------------------------


def test_every_image_is_evaluated_when_the_bundle_records_no_split(evaluated: Evaluation) -> None:
    assert evaluated.split == "all"
    assert len(evaluated.examples) == 24
    model = evaluated.models[0]
    assert model.probabilities.shape == (24, 3)
    assert np.allclose(model.probabilities.sum(axis=1), 1.0)
    assert model.embeddings.shape == (24, 256)  # cnn4's penultimate layer
    assert "no training data set" in model.relation


def test_retrieval_numbers_are_the_shared_implementations(evaluated: Evaluation) -> None:
    model = evaluated.models[0]
    labels = [example.label for example in evaluated.examples]
    for metric in ("l2", "cosine"):
        direct = evaluate_retrieval(model.embeddings, labels, evaluated.ks, metric)
        numbers = model.retrieval[metric]
        for k in evaluated.ks:
            assert numbers["precision"][str(k)] == pytest.approx(direct.precision[k])
            assert numbers["recall"][str(k)] == pytest.approx(direct.recall[k])
            assert numbers["ndcg"][str(k)] == pytest.approx(direct.ndcg[k])
            assert numbers["search_ms"][str(k)] > 0
        assert numbers["map"] == pytest.approx(direct.mean_average_precision)


def test_metrics_json_holds_every_number(report: Path) -> None:
    metrics = json.loads((report / "metrics.json").read_text(encoding="utf-8"))
    assert {"created", "synthetic_data", "banners", "data_set", "split", "ks", "models", "code"} <= set(
        metrics
    )
    assert metrics["ks"] == [1, 5, 10, 20, 50, 100]
    assert metrics["split"]["name"] == "all" and metrics["split"]["images"] == 24
    (model,) = metrics["models"]
    assert model["bundle"]["architecture"] == "cnn4" and len(model["bundle"]["id"]) == 64
    classification = model["classification"]
    assert set(classification["macro"]) == {"precision", "recall", "f1", "sensitivity", "specificity", "auc"}
    for label in LABELS:
        assert set(classification["per_class"][label]) == {
            "precision",
            "recall",
            "f1",
            "support",
            "sensitivity",
            "specificity",
            "auc",
        }
    assert np.asarray(classification["confusion_matrix"]).sum() == 24
    for metric in ("l2", "cosine"):
        numbers = model["retrieval"][metric]
        for measure in ("precision", "recall", "ndcg", "search_ms"):
            assert set(numbers[measure]) == {"1", "5", "10", "20", "50", "100"}
        assert 0.0 <= numbers["map"] <= 1.0
    assert model["embedding"]["dimension"] == 256
    assert model["embedding"]["tsne_points"] == 24
    assert len(model["embedding"]["pca_explained_variance"]) == 2
    assert model["inference"]["images"] == 24


def test_the_html_report_embeds_its_plots_and_the_banner(report: Path) -> None:
    page = (report / "report.html").read_text(encoding="utf-8")
    # confusion matrix, ROC curves, P@k / NDCG@k against k, PCA, t-SNE
    assert page.count("data:image/png;base64,") >= 5
    for alt in ("confusion matrix", "ROC curves", "P@k and NDCG@k against k", "PCA", "t-SNE"):
        assert f'alt="{alt}"' in page
    assert "research model — not for clinical use" in page
    assert "synthetic phantoms — not for clinical use" not in page
    assert "<script" not in page and "http" not in page.replace("http-equiv", "")  # self-contained
    assert "cnn4" in page and "normal" in page


def test_predictions_csv_has_a_row_per_image(report: Path) -> None:
    lines = (report / "predictions.csv").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "model,file,label,predicted,p_normal,p_benign,p_malignant"
    assert len(lines) == 1 + 24


def test_results_on_phantoms_are_labelled_as_such(
    folders: Path, bundles: tuple[Path, Path], tmp_path: Path
) -> None:
    evaluation = evaluate(
        folders, [bundles[0]], EvaluationOptions(device="cpu", threads=1, synthetic=True, ks=(1, 5))
    )
    write_report(evaluation, tmp_path)
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "synthetic phantoms — not for clinical use" in page
    assert json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))["synthetic_data"] is True


def write_dicom(path: Path, pixels: np.ndarray, sop: str, comments: str) -> None:
    dataset = Dataset()
    dataset.SOPClassUID = uid.UltrasoundImageStorage
    dataset.SOPInstanceUID = sop
    dataset.PatientID = f"P{sop[-1]}"
    dataset.Modality = "US"
    dataset.ImageComments = comments
    dataset.Rows, dataset.Columns = pixels.shape
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = "MONOCHROME2"
    dataset.BitsAllocated = dataset.BitsStored = 8
    dataset.HighBit = 7
    dataset.PixelRepresentation = 0
    dataset.PixelData = pixels.tobytes()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.MediaStorageSOPClassUID = dataset.SOPClassUID
    dataset.file_meta.MediaStorageSOPInstanceUID = uid.UID(sop)
    dataset.file_meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
    dataset.save_as(path, enforce_file_format=True)


def test_dicom_phantoms_are_recognised_by_their_image_comments(
    bundles: tuple[Path, Path], tmp_path: Path
) -> None:
    rng = np.random.default_rng(3)
    lines = ["SOPInstanceUID,label"]
    for i, label in enumerate(LABELS * 2):
        sop = f"1.2.826.0.1.3680043.10.4321.{i}"
        write_dicom(tmp_path / f"{i}.dcm", disc_image(label, rng), sop, SYNTHETIC_MARKER)
        lines.append(f"{sop},{label}")
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    evaluation = evaluate(tmp_path, [bundles[0]], EvaluationOptions(device="cpu", threads=1, ks=(1, 5)))
    assert evaluation.synthetic
    assert any("synthetic phantoms — not for clinical use" in banner for banner in evaluation.banners)


# --- which images -----------------------------------------------------------------------------


def test_the_recorded_held_out_set_is_evaluated_on_the_training_data_set(
    trained: Path, manifest: Path
) -> None:
    recorded = torch.load(trained, weights_only=True)["description"]["split"]["test"]["files"]
    evaluation = evaluate(manifest, [trained], QUICK)
    assert evaluation.split == "test"
    assert sorted(evaluation.files) == sorted(recorded)
    assert "never seen" in evaluation.models[0].relation
    assert evaluation.models[0].recorded is not None  # the training's own hold-out metrics


def test_split_all_says_the_metrics_are_optimistic(trained: Path, manifest: Path) -> None:
    evaluation = evaluate(
        manifest, [trained], EvaluationOptions(device="cpu", threads=1, split="all", ks=(1, 5))
    )
    assert evaluation.split == "all" and len(evaluation.examples) == 30
    assert "optimistic" in evaluation.models[0].relation


def test_split_test_without_a_recorded_held_out_set_is_refused(
    folders: Path, bundles: tuple[Path, Path]
) -> None:
    with pytest.raises(EvaluationError, match="records no held-out test set"):
        evaluate(folders, [bundles[0]], EvaluationOptions(device="cpu", split="test"))


def test_an_architecture_name_is_trained_with_the_bundles_recipe_and_compared(
    trained: Path, manifest: Path, tmp_path: Path
) -> None:
    evaluation = evaluate(
        manifest, [trained, "cnn_lstm"], EvaluationOptions(device="cpu", threads=1, ks=(1, 5)), tmp_path
    )
    assert [model.name for model in evaluation.models] == ["trained.bundle", "cnn_lstm"]
    assert (tmp_path / "models" / "cnn_lstm.bundle").is_file()
    compared = evaluation.models[1]
    assert compared.trained_here and compared.bundle.architecture == "cnn_lstm"
    assert compared.bundle.input.size == 32  # the reference's input size
    assert evaluation.split == "test"  # the same seed and fraction hold out the same patients


# --- refusals ---------------------------------------------------------------------------------


def test_labels_that_do_not_match_the_bundle_are_refused_naming_both(
    bundles: tuple[Path, Path], tmp_path: Path
) -> None:
    data = write_folders(tmp_path / "data", per_class=2, labels=("normal", "benign", "cancer"))
    with pytest.raises(EvaluationError) as raised:
        evaluate(data, [bundles[0]], QUICK)
    message = str(raised.value)
    assert "normal, benign, malignant" in message  # the bundle's labels
    assert "cancer" in message  # the data set's


def test_a_data_set_lacking_a_class_of_the_model_is_evaluated_with_a_warning(
    bundles: tuple[Path, Path], tmp_path: Path
) -> None:
    data = write_folders(tmp_path / "data", per_class=4, labels=("benign", "malignant"))
    evaluation = evaluate(data, [bundles[0]], EvaluationOptions(device="cpu", threads=1, ks=(1, 5)))
    per_class = evaluation.models[0].classification["per_class"]
    assert per_class["normal"]["sensitivity"] is None and per_class["normal"]["auc"] is None
    assert per_class["benign"]["support"] == 4
    assert any("no normal images" in warning for warning in evaluation.warnings)


def test_a_missing_bundle_is_refused(folders: Path, tmp_path: Path) -> None:
    with pytest.raises(EvaluationError, match="no such file"):
        evaluate(folders, [tmp_path / "nothing.bundle"], QUICK)


def test_invalid_options_are_refused() -> None:
    for wrong in ({"split": "train"}, {"ks": (0, 5)}, {"ks": (5, 5)}, {"batch_size": 0}, {"device": "tpu"}):
        with pytest.raises(ValueError):
            EvaluationOptions(**wrong)


# --- the command line -------------------------------------------------------------------------


def run(*arguments: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["evaluate", *arguments])
    return result.exit_code, result.output


def test_the_command_compares_two_bundles_side_by_side(
    folders: Path, bundles: tuple[Path, Path], tmp_path: Path
) -> None:
    out = tmp_path / "report"
    code, output = run(
        "--data", str(folders), "--bundle", str(bundles[0]), "--compare", str(bundles[1]),
        "--out", str(out), "--ks", "1,5,10", "--device", "cpu", "--threads", "1",
    )  # fmt: skip
    assert code == 0, output
    assert str(out / "report.html") in output
    assert "a.bundle" in output and "b.bundle" in output
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert [model["name"] for model in metrics["models"]] == ["a.bundle", "b.bundle"]
    page = (out / "report.html").read_text(encoding="utf-8")
    assert re.search(r"<th>a\.bundle</th><th>b\.bundle</th>", page)  # the summary's two columns


def test_the_command_fails_clearly_on_a_missing_bundle(folders: Path, tmp_path: Path) -> None:
    code, output = run(
        "--data", str(folders), "--bundle", str(tmp_path / "gone.bundle"), "--out", str(tmp_path / "r")
    )
    assert code != 0
    assert "gone.bundle: no such file" in output
    assert not (tmp_path / "r").exists()  # nothing written for a run that could not start


def test_the_command_fails_clearly_on_mismatched_labels(bundles: tuple[Path, Path], tmp_path: Path) -> None:
    data = write_folders(tmp_path / "data", per_class=2, labels=("normal", "benign", "cancer"))
    code, output = run("--data", str(data), "--bundle", str(bundles[0]), "--out", str(tmp_path / "r"))
    assert code != 0
    assert "do not match" in output and "cancer" in output and "malignant" in output


def test_the_command_fails_clearly_on_an_unwritable_report_folder(
    folders: Path, bundles: tuple[Path, Path], tmp_path: Path
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder", encoding="utf-8")
    code, output = run("--data", str(folders), "--bundle", str(bundles[0]), "--out", str(blocker))
    assert code != 0
    assert "cannot write the report" in output


def test_the_command_fails_clearly_on_an_unreadable_data_set(
    bundles: tuple[Path, Path], tmp_path: Path
) -> None:
    code, output = run(
        "--data", str(tmp_path / "missing"), "--bundle", str(bundles[0]), "--out", str(tmp_path / "r")
    )
    assert code != 0
    assert "no such file or folder" in output
