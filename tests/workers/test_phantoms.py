"""Phantoms: B-mode-like images whose class shows the way the BI-RADS lexicon says, as real files.

The image properties are measured over a few dozen phantoms per class with simple, independent
measures (bounding boxes, convex hulls, means below the mask), the way one would check a data
set, not by reading the generator's parameters back.
"""

from __future__ import annotations

import csv
import dataclasses
import re
import shutil
import subprocess
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread, uid
from typer.testing import CliRunner

from node.cli import app
from workers.decode import decode_for_analysis
from workers.phantoms import (
    LABELS,
    MANIFEST,
    SYNTHETIC_MARKER,
    DicomPhantom,
    Label,
    Phantom,
    make_phantom,
    render_phantom,
    sample_lesion,
    write_dicom_phantoms,
    write_png_phantoms,
)

PER_CLASS = 60
Sample = tuple[np.ndarray, np.ndarray]


@pytest.fixture(scope="module")
def samples() -> dict[Label, list[Sample]]:
    """``PER_CLASS`` (image, mask) pairs of each class, from one generator."""
    rng = np.random.default_rng(20240607)
    return {label: [make_phantom(label, rng) for _ in range(PER_CLASS)] for label in LABELS}


@pytest.fixture(scope="module")
def dicom_set(tmp_path_factory: pytest.TempPathFactory) -> list[DicomPhantom]:
    return write_dicom_phantoms(tmp_path_factory.mktemp("dicom"), 16, seed=5)


# --- measures -------------------------------------------------------------------------------


def height_over_width(mask: np.ndarray) -> float:
    rows, columns = np.nonzero(mask)
    return float(np.ptp(rows) + 1) / float(np.ptp(columns) + 1)


def solidity(mask: np.ndarray) -> float:
    """Area over convex hull area: 1 for an oval, less for angular or spiculated margins."""
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    outline = max(contours, key=cv2.contourArea)
    return float(cv2.contourArea(outline) / max(cv2.contourArea(cv2.convexHull(outline)), 1.0))


def posterior(image: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """Mean grey level just below the lesion's middle half, raw and relative to the same depths
    beside the lesion (which cancels the image's gain)."""
    rows, columns = np.nonzero(mask)
    height, width = np.ptp(rows) + 1, np.ptp(columns) + 1
    left, right = columns.min(), columns.max()
    top, bottom = rows.max() + 3, min(rows.max() + 3 + max(height // 2, 8), image.shape[0])
    below = image[top:bottom, left + width // 4 : right + 1 - width // 4].astype(float)
    beside = np.concatenate(
        [
            image[top:bottom, max(left - width, 0) : max(left - 3, 0)].ravel(),
            image[top:bottom, right + 4 : right + width].ravel(),
        ]
    ).astype(float)
    return float(below.mean()), float(below.mean() / beside.mean())


def interior_variation(image: np.ndarray, mask: np.ndarray) -> float:
    """Standard deviation of grey levels inside the lesion once the speckle is smoothed away."""
    inner = cv2.erode(mask, np.ones((9, 9), np.uint8)) > 0
    return float(cv2.GaussianBlur(image.astype(np.float32), (0, 0), 3.0)[inner].std())


def lesion_features(image: np.ndarray, mask: np.ndarray) -> list[float]:
    """What a radiologist would note first: a mass or not, its orientation, margin, posterior."""
    if not mask.any():
        return [0.0, 0.0, 0.0, 0.0]
    return [1.0, height_over_width(mask), solidity(mask), posterior(image, mask)[1]]


def nearest_centroid_accuracy(
    samples: dict[Label, list[Sample]], features: Callable[[np.ndarray, np.ndarray], Sequence[float]]
) -> float:
    """Train on the first half of each class, test on the second, features standardised."""
    half = PER_CLASS // 2
    train = {label: np.array([features(*s) for s in samples[label][:half]]) for label in LABELS}
    pooled = np.concatenate(list(train.values()))
    mean, scale = pooled.mean(axis=0), pooled.std(axis=0) + 1e-9
    centroids = {label: ((train[label] - mean) / scale).mean(axis=0) for label in LABELS}
    hits = 0
    for label in LABELS:
        for sample in samples[label][half:]:
            z = (np.array(features(*sample)) - mean) / scale
            hits += min(LABELS, key=lambda c: float(np.sum((z - centroids[c]) ** 2))) == label
    return hits / (len(LABELS) * (PER_CLASS - half))


def files_under(root: Path) -> dict[str, bytes]:
    return {
        path.relative_to(root).as_posix(): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


# --- images ---------------------------------------------------------------------------------


def test_the_same_seed_gives_the_same_image_and_another_seed_another() -> None:
    first = make_phantom("malignant", np.random.default_rng(7))
    again = make_phantom("malignant", np.random.default_rng(7))
    other = make_phantom("malignant", np.random.default_rng(8))
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not np.array_equal(first[0], other[0])


def test_images_and_masks_are_uint8_of_the_requested_size() -> None:
    image, mask = make_phantom("benign", np.random.default_rng(1), size=(200, 300))
    assert image.shape == mask.shape == (200, 300)
    assert image.dtype == mask.dtype == np.uint8
    assert set(np.unique(mask)) == {0, 255}


@pytest.mark.parametrize(
    ("label", "size", "message"),
    [
        ("suspicious", (256, 256), "unknown label 'suspicious'"),
        ("normal", (16, 256), "phantom size (16, 256) too small"),
    ],
)
def test_impossible_requests_are_refused(label: str, size: tuple[int, int], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        make_phantom(label, np.random.default_rng(0), size=size)  # type: ignore[arg-type]


def test_normal_images_have_no_lesion_and_the_others_one(samples: dict[Label, list[Sample]]) -> None:
    assert not any(mask.any() for _, mask in samples["normal"])
    for label in ("benign", "malignant"):
        for _, mask in samples[label]:
            count, _ = cv2.connectedComponents(mask)
            assert count - 1 >= 1, f"a {label} phantom without a lesion"


def test_benign_lesions_are_wider_than_tall_and_malignant_ones_taller(
    samples: dict[Label, list[Sample]],
) -> None:
    benign = [height_over_width(mask) for _, mask in samples["benign"]]
    malignant = [height_over_width(mask) for _, mask in samples["malignant"]]
    assert np.mean(benign) < 0.85 < 1.05 < np.mean(malignant)
    # Not a rule that separates them: some cancers are parallel, as in patients.
    assert 0.1 <= np.mean(np.array(malignant) < 1.0) <= 0.5


def test_malignant_margins_are_irregular_and_benign_ones_circumscribed(
    samples: dict[Label, list[Sample]],
) -> None:
    benign = [solidity(mask) for _, mask in samples["benign"]]
    malignant = [solidity(mask) for _, mask in samples["malignant"]]
    assert np.mean(benign) > 0.95
    assert np.mean(malignant) < 0.9


def same_lesion_without(feature: str) -> tuple[Phantom, Phantom]:
    """One spiculated, haloed malignant lesion rendered with and without ``feature``, all else equal."""
    drawn = sample_lesion("malignant", np.random.default_rng(2))
    assert drawn is not None
    lesion = dataclasses.replace(drawn, spicules=12, halo_db=8.0)
    off: dict[str, Any] = {feature: 0}
    without = dataclasses.replace(lesion, **off)
    return (
        render_phantom(lesion, np.random.default_rng(5)),
        render_phantom(without, np.random.default_rng(5)),
    )


def test_spicules_radiate_from_the_margin() -> None:
    spiculated, smooth = same_lesion_without("spicules")
    assert np.array_equal(spiculated.mask, smooth.mask)
    changed = np.abs(spiculated.image.astype(int) - smooth.image.astype(int)) > 4
    outside = changed & (spiculated.mask == 0)
    assert outside.sum() > 300, "no spicules beyond the margin"
    rows, columns = np.nonzero(spiculated.mask)
    size = max(np.ptp(rows), np.ptp(columns))
    reach = np.hypot(*(np.array(np.nonzero(outside)).T - [rows.mean(), columns.mean()]).T)
    assert reach.max() > 0.6 * size, "spicules do not reach out from the lesion"
    assert reach.max() < 2.0 * size, "changes far from the lesion"


def test_an_echogenic_halo_surrounds_the_mass() -> None:
    haloed, plain = same_lesion_without("halo_db")
    mask = haloed.mask
    ring = (cv2.dilate(mask, np.ones((7, 7), np.uint8)) > 0) & (mask == 0)
    brighter = haloed.image[ring].astype(float) - plain.image[ring].astype(float)
    assert brighter.mean() > 10


def test_malignant_lesions_shadow_and_benign_ones_enhance(samples: dict[Label, list[Sample]]) -> None:
    benign = np.array([posterior(*sample) for sample in samples["benign"]])
    malignant = np.array([posterior(*sample) for sample in samples["malignant"]])
    assert malignant[:, 0].mean() < benign[:, 0].mean() - 20  # darker, in grey levels
    assert malignant[:, 1].mean() < 0.9 < 1.05 < benign[:, 1].mean()  # and relative to beside


def test_malignant_lesions_are_more_heterogeneous(samples: dict[Label, list[Sample]]) -> None:
    benign = [interior_variation(*sample) for sample in samples["benign"]]
    malignant = [interior_variation(*sample) for sample in samples["malignant"]]
    assert np.mean(malignant) > 1.3 * np.mean(benign)


def test_lesions_are_hypoechoic(samples: dict[Label, list[Sample]]) -> None:
    """Darker than the tissue around them: nearly all, clearly on average (a few cancers are
    nearly isoechoic, in patients too)."""
    for label in ("benign", "malignant"):
        contrasts = []
        for image, mask in samples[label]:
            around = (cv2.dilate(mask, np.ones((15, 15), np.uint8)) > 0) & (mask == 0)
            contrasts.append(image[mask > 0].mean() / image[around].mean())
        assert np.mean(np.array(contrasts) < 1.0) >= 0.95, label
        assert np.mean(contrasts) < 0.8, label


def test_speckle_has_the_contrast_and_grain_of_b_mode(samples: dict[Label, list[Sample]]) -> None:
    """Log-compressed fully developed speckle: a local coefficient of variation of 0.1-0.35,
    and grains longer along the skin (the beam's width) than down (the pulse's length)."""
    contrasts, lateral, axial = [], [], []
    for image, _ in samples["normal"]:
        pixels = image.astype(np.float32)
        mean = cv2.blur(pixels, (9, 9))
        spread = np.sqrt(np.maximum(cv2.blur(pixels * pixels, (9, 9)) - mean * mean, 0.0))
        tissue = (mean > 60) & (mean < 200)
        tissue[:40] = False
        contrasts.append(float(np.median(spread[tissue] / mean[tissue])))
        detail = (pixels - cv2.GaussianBlur(pixels, (0, 0), 6.0))[60:200, 20:236]
        lateral.append(np.corrcoef(detail[:, :-1].ravel(), detail[:, 1:].ravel())[0, 1])
        axial.append(np.corrcoef(detail[:-1].ravel(), detail[1:].ravel())[0, 1])
    assert 0.1 < np.median(contrasts) < 0.35
    assert np.mean(lateral) > 0.6
    assert 0.2 < np.mean(axial) < np.mean(lateral) - 0.2


def test_the_skin_line_is_the_bright_band_at_the_top(samples: dict[Label, list[Sample]]) -> None:
    for image, _ in samples["normal"]:
        rows = image.mean(axis=1)
        assert rows[:20].max() > np.percentile(rows, 90), "no bright skin line near the surface"


def test_gain_varies_more_between_images_than_between_classes(samples: dict[Label, list[Sample]]) -> None:
    means = {label: np.array([image.mean() for image, _ in samples[label]]) for label in LABELS}
    spread_within = np.mean([values.std() for values in means.values()])
    assert spread_within > 10
    assert np.ptp([values.mean() for values in means.values()]) < spread_within


def test_a_simple_classifier_learns_the_classes_but_brightness_alone_does_not(
    samples: dict[Label, list[Sample]],
) -> None:
    assert nearest_centroid_accuracy(samples, lesion_features) > 0.8
    assert nearest_centroid_accuracy(samples, lambda image, _: [float(image.mean())]) < 0.6


# --- DICOM ----------------------------------------------------------------------------------


def test_dicom_phantoms_are_ultrasound_images_marked_as_synthetic(dicom_set: list[DicomPhantom]) -> None:
    for record in dicom_set:
        dataset = dcmread(record.path)
        assert dataset.file_meta.TransferSyntaxUID == uid.ExplicitVRLittleEndian
        assert (
            dataset.file_meta.MediaStorageSOPInstanceUID == dataset.SOPInstanceUID == record.sop_instance_uid
        )
        assert dataset.SOPClassUID == uid.UltrasoundImageStorage == "1.2.840.10008.5.1.4.1.1.6.1"
        assert (dataset.Modality, dataset.BodyPartExamined) == ("US", "BREAST")
        assert (dataset.PhotometricInterpretation, dataset.SamplesPerPixel) == ("MONOCHROME2", 1)
        assert (dataset.BitsAllocated, dataset.BitsStored, dataset.PixelRepresentation) == (8, 8, 0)
        assert str(dataset.PatientName) == record.patient_name and record.patient_name.startswith("PHANTOM^")
        assert dataset.PatientID == record.patient_id
        assert dataset.PatientSex == "F"
        assert re.fullmatch(r"\d{8}", dataset.PatientBirthDate)
        assert dataset.PatientBirthDate < dataset.StudyDate == record.study_date
        assert re.fullmatch(r"\d{6}", dataset.StudyTime)
        assert dataset.AccessionNumber == record.accession_number
        assert dataset.StudyDescription == "US BREAST"
        assert dataset.ImageLaterality == record.laterality in ("L", "R")
        assert dataset.Manufacturer == "Precedent phantom"
        assert dataset.SeriesDescription
        assert dataset.ImageComments == SYNTHETIC_MARKER
        assert dataset.PatientIdentityRemoved == "YES"
        assert dataset.StudyInstanceUID == record.study_instance_uid
        assert dataset.SeriesInstanceUID == record.series_instance_uid
        assert len(dataset.SequenceOfUltrasoundRegions) == 1


def test_dicom_phantoms_group_into_patients_studies_and_series(dicom_set: list[DicomPhantom]) -> None:
    studies: dict[str, list[DicomPhantom]] = defaultdict(list)
    for record in dicom_set:
        studies[record.study_instance_uid].append(record)
    patients: dict[str, set[str]] = defaultdict(set)
    for study_uid, images in studies.items():
        assert 1 <= len(images) <= 4
        assert (
            len({(r.patient_id, r.label, r.laterality, r.study_date, r.series_instance_uid) for r in images})
            == 1
        )
        assert [int(dcmread(r.path).InstanceNumber) for r in images] == list(range(1, len(images) + 1))
        patients[images[0].patient_id].add(study_uid)
    assert all(1 <= len(uids) <= 3 for uids in patients.values())
    assert any(len(uids) > 1 for uids in patients.values()), "no patient with prior studies"
    assert len({r.sop_instance_uid for r in dicom_set}) == len(dicom_set)
    assert len({r.series_instance_uid for r in dicom_set}) == len(studies)
    assert len({r.accession_number for r in dicom_set}) == len(studies)
    assert len({(r.patient_id, r.patient_name) for r in dicom_set}) == len(patients)
    for uids in patients.values():
        dates = {next(r.study_date for r in studies[study_uid]) for study_uid in uids}
        assert len(dates) == len(uids), "two studies of one patient on one day"
    assert len({record.label for record in dicom_set}) == 3
    assert len({record.study_date[:4] for record in dicom_set}) >= 2, "studies not spread over years"


def test_dicom_phantoms_pass_dciodvfy(dicom_set: list[DicomPhantom]) -> None:
    dciodvfy = shutil.which("dciodvfy")
    if dciodvfy is None:
        pytest.fail("dciodvfy (dicom3tools) is not installed; it is required to validate the phantoms")
    for record in dicom_set:
        done = subprocess.run([dciodvfy, str(record.path)], capture_output=True, text=True, check=False)
        errors = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("Error")]
        assert not errors, f"{record.path.name}: {errors}"


def test_dicom_phantoms_decode_to_their_ultrasound_region(dicom_set: list[DicomPhantom]) -> None:
    for record in dicom_set:
        dataset = dcmread(record.path)
        region = dataset.SequenceOfUltrasoundRegions[0]
        box = (
            region.RegionLocationMinY0,
            region.RegionLocationMinX0,
            region.RegionLocationMaxY1 + 1,
            region.RegionLocationMaxX1 + 1,
        )
        frame = decode_for_analysis(record.path).frames[0]
        assert frame.crop == box
        expected = dataset.pixel_array[box[0] : box[2], box[1] : box[3]].astype(np.float32) / 255.0
        np.testing.assert_allclose(frame.pixels, expected, atol=1e-6)
        assert dataset.pixel_array[: box[0]].any(), "no burned-in graphics in the surround"


def test_the_manifest_lists_every_image_with_its_label(dicom_set: list[DicomPhantom]) -> None:
    root = dicom_set[0].path.parents[2]
    with (root / MANIFEST).open(newline="") as manifest:
        rows = list(csv.DictReader(manifest))
    assert [
        (row["path"], row["label"], row["patient_id"], row["study_instance_uid"], row["sop_instance_uid"])
        for row in rows
    ] == [
        (r.path.relative_to(root).as_posix(), r.label, r.patient_id, r.study_instance_uid, r.sop_instance_uid)
        for r in dicom_set
    ]
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*.dcm")) == sorted(
        row["path"] for row in rows
    )


def test_the_same_seed_writes_the_same_bytes(tmp_path: Path) -> None:
    for write in (write_dicom_phantoms, write_png_phantoms):
        first, again, other = (tmp_path / write.__name__ / name for name in ("first", "again", "other"))
        write(first, 7, seed=11)
        write(again, 7, seed=11)
        write(other, 7, seed=12)
        assert files_under(first) == files_under(again)
        assert files_under(first) != files_under(other)


def test_different_seeds_give_different_patients(tmp_path: Path) -> None:
    one = write_dicom_phantoms(tmp_path / "one", 3, seed=1)
    two = write_dicom_phantoms(tmp_path / "two", 3, seed=2)
    assert not {r.patient_id for r in one} & {r.patient_id for r in two}
    assert not {r.study_instance_uid for r in one} & {r.study_instance_uid for r in two}


# --- PNG ------------------------------------------------------------------------------------


def test_png_phantoms_follow_the_busi_layout(tmp_path: Path) -> None:
    records = write_png_phantoms(tmp_path, 12, seed=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(LABELS)
    for label in LABELS:
        mine = [r for r in records if r.label == label]
        assert len(mine) == 4
        names = sorted(p.name for p in (tmp_path / label).iterdir())
        indices = range(1, len(mine) + 1)
        assert names == sorted(
            [f"{label} ({i}).png" for i in indices] + [f"{label} ({i})_mask.png" for i in indices]
        )
        for record in mine:
            assert record.mask_path == record.path.with_name(record.path.stem + "_mask.png")
            with Image.open(record.path) as image, Image.open(record.mask_path) as mask:
                assert image.mode == mask.mode == "L" and image.size == mask.size == (256, 256)
                assert bool(np.asarray(mask).any()) == (label != "normal")


def test_proportions_set_the_class_balance(tmp_path: Path) -> None:
    records = write_png_phantoms(tmp_path, 20, seed=4, proportions={"benign": 1, "malignant": 3})
    labels = [r.label for r in records]
    assert labels.count("normal") == 0
    assert labels.count("malignant") == 15


@pytest.mark.parametrize(
    ("n", "seed", "proportions", "message"),
    [
        (0, 1, None, "at least 1, not 0"),
        (5, -1, None, "non-negative integer, not -1"),
        (5, 1, {"cyst": 1.0}, "unknown labels ['cyst']"),
        (5, 1, {"benign": 0.0}, "not all zero"),
        (5, 1, {"benign": -1.0, "normal": 2.0}, "non-negative"),
    ],
)
def test_impossible_sets_are_refused(
    tmp_path: Path, n: int, seed: int, proportions: dict[Label, float] | None, message: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        write_png_phantoms(tmp_path, n, seed, proportions)
    assert not any(tmp_path.iterdir())


# --- the command line -----------------------------------------------------------------------


def precedent(*arguments: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["phantoms", *arguments], env={"COLUMNS": "200"})
    return result.exit_code, result.output


def test_the_command_writes_dicom_phantoms(tmp_path: Path) -> None:
    code, output = precedent("--out", str(tmp_path / "set"), "--n", "6", "--seed", "2")
    assert code == 0, output
    assert len(list((tmp_path / "set").rglob("*.dcm"))) == 6
    assert (tmp_path / "set" / MANIFEST).is_file()
    assert re.search(
        r"wrote 6 synthetic dicom phantoms \(\d normal, \d benign, \d malignant\) in \d patients", output
    )
    assert "not for clinical use" in output


def test_the_command_writes_the_busi_layout(tmp_path: Path) -> None:
    code, output = precedent("--out", str(tmp_path), "--n", "3", "--format", "png")
    assert code == 0, output
    assert len(list(tmp_path.rglob("*_mask.png"))) == 3


def test_the_command_refuses_a_folder_that_is_not_empty_unless_forced(tmp_path: Path) -> None:
    (tmp_path / "report.txt").write_text("someone's work")
    code, output = precedent("--out", str(tmp_path), "--n", "2")
    assert code == 2
    assert "is not empty" in output and "--force" in output
    assert [p.name for p in tmp_path.iterdir()] == ["report.txt"]
    code, output = precedent("--out", str(tmp_path), "--n", "2", "--force")
    assert code == 0, output
    assert (tmp_path / "report.txt").read_text() == "someone's work"


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--n", "0"], "--n"),
        (["--n", "lots"], "--n"),
        (["--seed", "-3"], "--seed"),
        (["--format", "jpeg"], "'jpeg' is not one of 'dicom', 'png'"),
    ],
)
def test_bad_arguments_are_named(tmp_path: Path, arguments: list[str], message: str) -> None:
    code, output = precedent("--out", str(tmp_path / "set"), *arguments)
    assert code == 2
    assert message in output
    assert not (tmp_path / "set").exists()


def test_an_unwritable_destination_is_reported(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, output = precedent("--out", str(blocker), "--n", "1")
    assert code == 2 and "is not a folder" in output
    code, output = precedent("--out", str(blocker / "set"), "--n", "1")
    assert code == 1
    assert f"cannot write phantoms to {blocker / 'set'}" in output
    assert "Traceback" not in output
