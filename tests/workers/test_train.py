"""Training: a small synthetic task is learnt; a seed fixes the result; an interrupted training
resumes to the same end; the bundle says how it was made; bad input stops it early and clearly.

The images are simple synthetic ones (a bright disc, a dark disc, or none), not phantoms and
not patients: the tests check the machinery, not the medicine.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torchvision  # type: ignore[import-untyped]
from sklearn.metrics import f1_score  # type: ignore[import-untyped]
from typer.testing import CliRunner

from node.cli import app
from tests.workers.test_datasets import write_manifest_set
from workers.bundles import load_bundle
from workers.datasets import DataSetError, LabelledDataSet, load_data_set, read_pixels
from workers.preprocess import InputSpec, preprocess
from workers.train import (
    Progress,
    TrainingError,
    TrainingOptions,
    TrainingResult,
    cache_images,
    checkpoint_folder,
    classification_metrics,
    train,
)

EASY = TrainingOptions(architecture="cnn4", epochs=6, batch_size=16, size=32, seed=1, patience=6)


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """The test machine is shared: one core for torch."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def easy_set(tmp_path_factory: pytest.TempPathFactory) -> LabelledDataSet:
    """90 images of 40 pixels, 30 per class, two per patient."""
    return load_data_set(write_manifest_set(tmp_path_factory.mktemp("easy"), per_class=30, px=40))


@pytest.fixture(scope="module")
def small_set(tmp_path_factory: pytest.TempPathFactory) -> LabelledDataSet:
    """15 images of 40 pixels, 5 per class, one per patient."""
    root = tmp_path_factory.mktemp("small")
    return load_data_set(write_manifest_set(root, per_class=5, px=40, images_per_patient=1))


@dataclass(frozen=True)
class Trained:
    result: TrainingResult
    seconds: float
    events: list[Progress]


def trained(data: LabelledDataSet, out: Path, options: TrainingOptions) -> Trained:
    events: list[Progress] = []
    started = time.monotonic()
    result = train(data, out, options, events.append)
    return Trained(result, time.monotonic() - started, events)


@pytest.fixture(scope="module")
def reference(easy_set: LabelledDataSet, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    return trained(easy_set, tmp_path_factory.mktemp("reference") / "easy.pt", EASY)


def weights_of(bundle: Path) -> dict[str, torch.Tensor]:
    return load_bundle(bundle).state_dict


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def test_an_easy_synthetic_task_is_learnt_quickly(reference: Trained) -> None:
    metrics = reference.result.metrics
    assert metrics["images"] == 18  # 20 % of 90, held out by patient
    assert metrics["accuracy"] >= 0.8, metrics
    assert reference.seconds < 30
    assert [e.completed for e in reference.events if e.task == "epoch"] == list(range(1, 7))
    assert sum(e.task == "decode" for e in reference.events) == 90


def test_the_same_seed_trains_the_same_model(
    reference: Trained, easy_set: LabelledDataSet, tmp_path: Path
) -> None:
    again = trained(easy_set, tmp_path / "again.pt", EASY)

    assert same_weights(weights_of(again.result.bundle), weights_of(reference.result.bundle))
    assert again.result.metrics == reference.result.metrics
    other = trained(easy_set, tmp_path / "other.pt", replace(EASY, seed=2, epochs=1))
    assert not same_weights(weights_of(other.result.bundle), weights_of(reference.result.bundle))


class Interrupted(Exception):
    pass


def test_an_interrupted_training_resumes_after_its_last_epoch_and_ends_the_same(
    reference: Trained, easy_set: LabelledDataSet, tmp_path: Path
) -> None:
    out = tmp_path / "resumed.pt"

    def stop_after_first_epoch(step: Progress) -> None:
        if step.task == "epoch" and step.completed == 1:
            raise Interrupted

    with pytest.raises(Interrupted):
        train(easy_set, out, EASY, stop_after_first_epoch)
    assert not out.exists()
    assert (checkpoint_folder(out) / "holdout.pt").is_file()

    resumed = trained(easy_set, out, EASY)

    assert [e.completed for e in resumed.events if e.task == "epoch"] == list(range(2, 7))
    assert resumed.result.resumed
    assert same_weights(weights_of(out), weights_of(reference.result.bundle))
    assert resumed.result.metrics == reference.result.metrics
    assert not checkpoint_folder(out).exists()  # removed once the bundle is written


def test_the_bundle_records_the_data_the_split_the_metrics_and_the_code(reference: Trained) -> None:
    bundle = load_bundle(reference.result.bundle)
    description = bundle.description

    assert bundle.architecture == "cnn4"
    assert bundle.labels == ("normal", "benign", "malignant")
    assert bundle.input == InputSpec(size=32)
    assert bundle.clinical_use is False
    data = description["data_set"]
    assert data["format"] == "manifest"
    assert data["path"].endswith("manifest.csv")
    assert data["counts"] == {"normal": 30, "benign": 30, "malignant": 30}
    split = description["split"]
    assert split["method"] == "hold-out 80:20"
    assert split["grouping"].startswith("by patient")
    assert len(split["test"]["files"]) == 18
    assert len(split["test"]["patients"]) == 9
    assert split["validation"]["files"]
    metrics = description["metrics"]
    assert set(metrics) >= {"accuracy", "macro_f1", "per_class", "confusion_matrix"}
    assert set(metrics["per_class"]["malignant"]) >= {"precision", "recall"}
    assert np.asarray(metrics["confusion_matrix"]).sum() == 18
    assert description["seed"] == 1
    assert description["code"]["version"] == "0.1.0"
    commit = description["code"]["git_commit"]
    assert commit is None or re.fullmatch(r"[0-9a-f]{40}", commit)
    training = description["training"]
    assert training["epochs_trained"] == 6
    assert training["duration_s"] > 0
    assert training["optimizer"] == "Adam"
    assert len(training["history"]) == 6


def test_no_patient_of_the_test_side_is_trained_on(reference: Trained, easy_set: LabelledDataSet) -> None:
    split = reference.result.description["split"]
    tested = set(split["test"]["files"])
    test_patients = {e.patient_id for e in easy_set.examples if easy_set.name_of(e) in tested}
    train_patients = {e.patient_id for e in easy_set.examples if easy_set.name_of(e) not in tested}

    assert test_patients == set(split["test"]["patients"])
    assert not test_patients & train_patients


def test_cross_validation_reports_mean_and_sd_and_keeps_a_model_retrained_on_all(
    small_set: LabelledDataSet, tmp_path: Path
) -> None:
    run = trained(small_set, tmp_path / "cv.pt", replace(EASY, folds=3, epochs=2))

    metrics = run.result.metrics
    assert metrics["folds"] == 3
    assert len(metrics["per_fold"]) == 3
    assert set(metrics["accuracy"]) == {"mean", "sd"}
    assert metrics["images"] == 15
    description = run.result.description
    tested = [file for fold in description["split"]["folds"] for file in fold["test"]["files"]]
    assert sorted(tested) == sorted(small_set.name_of(e) for e in small_set.examples)
    assert description["model_selection"].startswith("retrained on all images")
    assert {e.run for e in run.events if e.task == "epoch"} == {
        "fold 1 of 3",
        "fold 2 of 3",
        "fold 3 of 3",
        "all images",
    }
    assert load_bundle(run.result.bundle).architecture == "cnn4"


def test_imagenet_weights_start_the_backbone_from_a_local_file(
    small_set: LabelledDataSet, tmp_path: Path
) -> None:
    torch.manual_seed(11)
    checkpoint = tmp_path / "mobilenet_v2-imagenet.pth"
    torch.save(torchvision.models.mobilenet_v2(weights=None).state_dict(), checkpoint)
    options = replace(
        EASY, architecture="mobilenet_v2", epochs=1, learning_rate=1e-9, backbone_weights=checkpoint
    )

    run = trained(small_set, tmp_path / "mobilenet.pt", options)

    expected = torch.load(checkpoint, weights_only=True)
    weights = weights_of(run.result.bundle)
    first_conv = "net.features.0.0.weight"
    assert torch.allclose(weights[first_conv], expected["features.0.0.weight"], atol=1e-6)
    recorded = run.result.description["training"]["backbone_weights"]
    assert recorded["path"] == str(checkpoint)
    assert len(recorded["sha256"]) == 64
    with pytest.raises(TrainingError, match="cnn4 is trained from scratch"):
        train(small_set, tmp_path / "cnn4.pt", replace(EASY, backbone_weights=checkpoint))
    with pytest.raises(TrainingError, match="does not fit resnet50's backbone"):
        train(small_set, tmp_path / "resnet.pt", replace(options, architecture="resnet50"))


def test_clinical_use_is_false_unless_asked_for(small_set: LabelledDataSet, tmp_path: Path) -> None:
    run = trained(small_set, tmp_path / "clinical.pt", replace(EASY, epochs=1, clinical_use=True))

    assert load_bundle(run.result.bundle).clinical_use is True
    assert TrainingOptions().clinical_use is False


def test_unreadable_images_are_reported_together_before_training(tmp_path: Path) -> None:
    manifest = write_manifest_set(tmp_path, per_class=10)
    for name in ("images/benign/benign-001.png", "images/malignant/malignant-002.png"):
        (tmp_path / name).write_bytes(b"not a picture")
    events: list[Progress] = []

    with pytest.raises(DataSetError) as raised:
        train(load_data_set(manifest), tmp_path / "out.pt", EASY, events.append)

    assert len(raised.value.problems) == 2
    assert "manifest.csv line 13: images/benign/benign-001.png: not a readable image" in str(raised.value)
    assert "line 24: images/malignant/malignant-002.png" in str(raised.value)
    assert not any(e.task == "epoch" for e in events)


def test_evaluation_sees_exactly_the_input_the_node_computes(small_set: LabelledDataSet) -> None:
    cache = cache_images(small_set, 32)
    spec = InputSpec(size=32)

    for example, exact in zip(small_set.examples, cache.exact, strict=True):
        assert torch.equal(preprocess(exact, spec), preprocess(read_pixels(example), spec))
    assert cache.sources[0].shape == (40, 40)  # 1.25 x the input size, for augmentation
    assert cache.sources[0].dtype == np.uint8


def test_a_checkpoint_of_another_training_is_not_resumed(small_set: LabelledDataSet, tmp_path: Path) -> None:
    out = tmp_path / "model.pt"

    def interrupt(step: Progress) -> None:
        if step.task == "epoch":
            raise Interrupted

    with pytest.raises(Interrupted):
        train(small_set, out, EASY, interrupt)

    with pytest.raises(TrainingError, match="checkpoints of a different training"):
        train(small_set, out, replace(EASY, learning_rate=0.01))


def test_an_unwritable_output_is_refused_before_any_work(small_set: LabelledDataSet, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    events: list[Progress] = []

    with pytest.raises(TrainingError, match="cannot write beside"):
        train(small_set, blocker / "model.pt", EASY, events.append)
    with pytest.raises(TrainingError, match="is a folder"):
        train(small_set, tmp_path, EASY, events.append)
    assert events == []


def test_options_are_checked_when_made() -> None:
    with pytest.raises(ValueError, match=r"unknown architecture 'vgg99' \(known: densenet121, .*cnn4"):
        TrainingOptions(architecture="vgg99")
    with pytest.raises(ValueError, match="device"):
        TrainingOptions(device="tpu")
    with pytest.raises(ValueError, match="folds must be at least 2"):
        TrainingOptions(folds=1)
    with pytest.raises(ValueError, match="threads must be a whole number"):
        TrainingOptions(threads=0)


def test_metrics_match_their_textbook_definitions() -> None:
    true, predicted = [0, 0, 1, 1, 2, 2, 2], [0, 1, 1, 1, 2, 0, 2]

    metrics = classification_metrics(true, predicted, ["normal", "benign", "malignant"])

    assert metrics["accuracy"] == pytest.approx(5 / 7)
    assert metrics["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 2]]
    assert metrics["per_class"]["normal"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert metrics["per_class"]["benign"]["precision"] == pytest.approx(2 / 3)
    assert metrics["per_class"]["malignant"]["recall"] == pytest.approx(2 / 3)
    assert metrics["macro_f1"] == pytest.approx(f1_score(true, predicted, average="macro"))


# --- the command line -------------------------------------------------------------------------


def invoke(*arguments: str) -> Any:
    return CliRunner().invoke(app, ["train", *arguments])


def test_the_command_trains_a_bundle_and_prints_its_held_out_metrics(
    small_set: LabelledDataSet, tmp_path: Path
) -> None:
    out = tmp_path / "cli.pt"
    done = invoke(
        "--data", str(small_set.source), "--arch", "cnn4", "--out", str(out),
        "--epochs", "2", "--size", "32", "--batch-size", "8", "--seed", "3", "--clinical-use",
    )  # fmt: skip

    assert done.exit_code == 0, done.output
    assert "held-out test set" in done.stdout
    assert re.search(r"accuracy \d\.\d{3}", done.stdout)
    assert "confusion matrix" in done.stdout
    assert "warning" in done.stderr and "clinical use" in done.stderr
    bundle = load_bundle(out)
    assert bundle.clinical_use is True
    assert bundle.description["seed"] == 3


def test_the_command_names_the_known_architectures_for_an_unknown_one(tmp_path: Path) -> None:
    done = invoke("--data", str(tmp_path), "--arch", "resnet9000", "--out", str(tmp_path / "x.pt"))

    assert done.exit_code != 0
    assert "unknown architecture 'resnet9000'" in done.stderr
    assert "cnn4" in done.stderr and "densenet121" in done.stderr
    assert "Traceback" not in done.output


def test_the_command_explains_bad_data_and_an_unwritable_output(
    small_set: LabelledDataSet, tmp_path: Path
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")

    bad_data = invoke("--data", str(tmp_path / "missing"), "--arch", "cnn4", "--out", str(tmp_path / "m.pt"))
    unwritable = invoke("--data", str(small_set.source), "--arch", "cnn4", "--out", str(blocker / "m.pt"))

    assert bad_data.exit_code != 0
    assert f"data set {tmp_path / 'missing'}: no such file or folder" in bad_data.stderr
    assert unwritable.exit_code != 0
    assert "cannot write beside" in unwritable.stderr
