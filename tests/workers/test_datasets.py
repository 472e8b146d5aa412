"""Labelled data sets: each layout loads to the same examples and severity-ordered labels, broken
ones are refused with every problem named by file or line, and splits never put one patient on
both sides."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom import uid
from pydicom.dataset import Dataset, FileMetaDataset

from workers.datasets import (
    DataSetError,
    Example,
    ImageReadError,
    LabelledDataSet,
    fold_splits,
    holdout_split,
    load_data_set,
    order_labels,
    read_pixels,
)
from workers.decode import blank_border_box, decode_for_analysis

CLASSES = ("normal", "benign", "malignant")
DISC_LEVEL = {"normal": None, "benign": 0.9, "malignant": 0.08}


# --- synthetic images (the training tests use these too) -----------------------------------


def synthetic_image(label: str, rng: np.random.Generator, px: int = 40) -> np.ndarray:
    """A uint8 image whose class is visible: no disc (normal), a bright disc (benign) or a dark
    one (malignant) at a random place and size, on mid-gray tissue with noise."""
    image = np.full((px, px), 0.45)
    level = DISC_LEVEL[label]
    if level is not None:
        rows, columns = np.mgrid[:px, :px]
        centre_row, centre_column = rng.uniform(0.3, 0.7, 2) * px
        radius = rng.uniform(0.15, 0.25) * px
        image[(rows - centre_row) ** 2 + (columns - centre_column) ** 2 <= radius**2] = level
    noisy = np.clip(image + rng.normal(0.0, 0.08, image.shape), 0.03, 1.0)
    return np.asarray(np.rint(noisy * 255), dtype=np.uint8)


def write_png(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def write_manifest_set(
    root: Path, per_class: int = 30, px: int = 40, images_per_patient: int = 2, seed: int = 0
) -> Path:
    """``per_class`` PNGs per class under ``root/images/<label>/`` and ``root/manifest.csv``
    naming them with patient ids (``images_per_patient`` images each); returns the manifest."""
    rng = np.random.default_rng(seed)
    lines = ["path,label,patient_id"]
    for label in CLASSES:
        for i in range(per_class):
            name = f"images/{label}/{label}-{i:03d}.png"
            write_png(root / name, synthetic_image(label, rng, px))
            lines.append(f"{name},{label},{label[:3]}-{i // images_per_patient}")
    manifest = root / "manifest.csv"
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return manifest


def write_dicom(
    path: Path, pixels: np.ndarray, *, patient_id: str, sop_uid: str, accession: str = ""
) -> Path:
    """A minimal uncompressed 8-bit ultrasound image the node's decoder reads."""
    dataset = Dataset()
    dataset.SOPClassUID = uid.UltrasoundImageStorage
    dataset.SOPInstanceUID = sop_uid
    dataset.StudyInstanceUID = uid.generate_uid(entropy_srcs=[sop_uid, "study"])
    dataset.SeriesInstanceUID = uid.generate_uid(entropy_srcs=[sop_uid, "series"])
    dataset.PatientID = patient_id
    dataset.PatientName = "Phantom^Test"
    dataset.AccessionNumber = accession
    dataset.Modality = "US"
    dataset.Rows, dataset.Columns = pixels.shape
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = "MONOCHROME2"
    dataset.BitsAllocated = dataset.BitsStored = 8
    dataset.HighBit = 7
    dataset.PixelRepresentation = 0
    dataset.PixelData = np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.MediaStorageSOPClassUID = dataset.SOPClassUID
    dataset.file_meta.MediaStorageSOPInstanceUID = uid.UID(sop_uid)
    dataset.file_meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
    path.parent.mkdir(parents=True, exist_ok=True)
    dataset.save_as(path, enforce_file_format=True)
    return path


def sop_uid(n: int) -> str:
    return f"1.2.826.0.1.3680043.10.1234.{n}"


def refusal(path: Path, labels: list[str] | None = None) -> DataSetError:
    with pytest.raises(DataSetError) as raised:
        load_data_set(path, labels)
    return raised.value


# --- the four layouts -------------------------------------------------------------------------


def test_a_folder_per_class_loads_like_busi_without_its_masks(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    for label, count in (("benign", 3), ("malignant", 2), ("normal", 2)):
        for i in range(1, count + 1):
            write_png(tmp_path / label / f"{label} ({i}).png", synthetic_image(label, rng))
            write_png(tmp_path / label / f"{label} ({i})_mask.png", np.zeros((40, 40), np.uint8))
    write_png(tmp_path / "benign" / "benign (1)_mask_1.png", np.zeros((40, 40), np.uint8))
    (tmp_path / "benign" / "notes.txt").write_text("not an image")

    data = load_data_set(tmp_path)

    assert data.format == "folders"
    assert data.labels == ("normal", "benign", "malignant")  # ascending severity, not alphabetical
    assert data.counts() == {"normal": 2, "benign": 3, "malignant": 2}
    assert not any("_mask" in example.path.name for example in data.examples)
    assert data.ignored == 8  # the masks
    assert all(example.patient_id is None for example in data.examples)
    assert data.describe()["counts"] == {"normal": 2, "benign": 3, "malignant": 2}


def test_class_folders_of_dicom_files_carry_their_patient_ids(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    for n, label in enumerate(("Benign", "Malignant", "Benign")):
        pixels = synthetic_image(label.lower(), rng)
        write_dicom(tmp_path / label / f"{n}.dcm", pixels, patient_id=f"P{n % 2}", sop_uid=sop_uid(n))

    data = load_data_set(tmp_path)

    assert data.labels == ("benign", "malignant")  # folder names are matched without regard to case
    assert sorted(str(e.patient_id) for e in data.examples) == ["P0", "P0", "P1"]


def test_a_csv_manifest_loads_paths_relative_to_itself(tmp_path: Path) -> None:
    manifest = write_manifest_set(tmp_path / "set", per_class=4)

    from_file = load_data_set(manifest)
    from_folder = load_data_set(manifest.parent)  # a folder holding one table is that table

    assert from_file == from_folder
    assert from_file.format == "manifest"
    assert from_file.labels == CLASSES
    first = from_file.examples[0]
    assert first == Example(manifest.parent / "images/normal/normal-000.png", "normal", "nor-0")
    assert first.origin == "manifest.csv line 2"
    assert from_file.describe()["patients"] == 6


def test_dicom_files_are_labelled_by_sop_instance_uid(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    labels = {0: "benign", 1: "malignant", 2: "benign", 3: "malignant"}
    for n, label in labels.items():
        write_dicom(
            tmp_path / "studies" / f"s{n}" / f"IM{n}",
            synthetic_image(label, rng),
            patient_id=f"PAT{n}",
            sop_uid=sop_uid(n),
        )
    write_dicom(
        tmp_path / "studies" / "unlabelled.dcm",
        synthetic_image("normal", rng),
        patient_id="X",
        sop_uid=sop_uid(9),
    )
    (tmp_path / "studies" / "README.txt").write_text("exported from the PACS")
    rows = "".join(f"{sop_uid(n)},{label}\n" for n, label in labels.items())
    (tmp_path / "labels.csv").write_text("SOPInstanceUID,label\n" + rows)

    data = load_data_set(tmp_path)

    assert data.format == "dicom"
    assert data.labels == ("benign", "malignant")
    by_patient = {e.patient_id: (e.path.name, e.label) for e in data.examples}
    assert by_patient == {f"PAT{n}": (f"IM{n}", label) for n, label in labels.items()}
    assert data.ignored == 1  # the unlabelled image


def test_dicom_files_are_labelled_by_accession_number_study_by_study(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    for n in range(4):
        accession, label = ("ACC1", "normal") if n < 2 else ("ACC2", "malignant")
        write_dicom(
            tmp_path / f"{n}.dcm",
            synthetic_image(label, rng),
            patient_id=accession[-1],
            sop_uid=sop_uid(n),
            accession=accession,
        )
    (tmp_path / "labels.csv").write_text("AccessionNumber,Label\nACC1,Normal\nACC2,Malignant\n")

    data = load_data_set(tmp_path / "labels.csv")

    assert data.counts() == {"normal": 2, "malignant": 2}
    assert {(e.path.name, e.patient_id) for e in data.examples if e.label == "malignant"} == {
        ("2.dcm", "2"),
        ("3.dcm", "2"),
    }


def test_a_sheet_like_cdd_cesm_orders_bi_rads_by_number(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    rows = [
        ("P1", "P1_L_DM_MLO", "1"),
        ("P1", "P1_R_DM_MLO", "4"),
        ("P2", "P2_L_DM_CC.jpg", "2"),
        ("P3", "P3_R_DM_CC", "BI-RADS 5"),
    ]
    for _, name, _ in rows:
        write_png(
            tmp_path / "Low energy images" / f"{name.removesuffix('.jpg')}.jpg",
            synthetic_image("benign", rng),
        )
    sheet = "Patient_ID,Image_name,Side,BIRADS,Pathology Classification/ Follow up\n" + "".join(
        f"{patient},{name},L,{birads},Benign\n" for patient, name, birads in rows
    )
    (tmp_path / "Radiology manual annotations.csv").write_text(sheet)

    data = load_data_set(tmp_path)

    assert data.format == "spreadsheet"
    assert data.labels == ("BI-RADS 1", "BI-RADS 2", "BI-RADS 4", "BI-RADS 5")
    assert {e.path.stem: (e.label, e.patient_id) for e in data.examples}["P1_R_DM_MLO"] == ("BI-RADS 4", "P1")


def test_an_xlsx_sheet_without_openpyxl_asks_for_a_csv_export(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "openpyxl", None)  # importing it now raises ImportError
    sheet = tmp_path / "annotations.xlsx"
    sheet.write_bytes(b"PK\x03\x04 not really a workbook")

    error = refusal(sheet)

    assert "openpyxl" in str(error)
    assert "CSV" in str(error)


# --- refusals ---------------------------------------------------------------------------------


def test_what_is_not_a_data_set_is_refused_saying_what_is_expected(tmp_path: Path) -> None:
    (tmp_path / "image.txt").write_text("x")
    (tmp_path / "table.csv").write_text("name,size\na,1\n")
    (tmp_path / "empty").mkdir()
    (tmp_path / "two").mkdir()
    (tmp_path / "two" / "a.csv").write_text("path,label\n")
    (tmp_path / "two" / "b.csv").write_text("path,label\n")

    assert "not a data set" in str(refusal(tmp_path / "image.txt"))
    assert "cannot tell what this table is: its columns are name, size" in str(
        refusal(tmp_path / "table.csv")
    )
    assert "no sub-folders" in str(refusal(tmp_path / "empty"))
    assert "several tables (a.csv, b.csv)" in str(refusal(tmp_path / "two"))
    assert "no such file or folder" in str(refusal(tmp_path / "absent"))


def test_missing_files_are_all_found_and_the_first_few_named_by_line(tmp_path: Path) -> None:
    write_png(tmp_path / "there.png", synthetic_image("normal", np.random.default_rng(0)))
    rows = ["there.png,normal"] + [f"gone-{i}.png,benign" for i in range(7)]
    (tmp_path / "manifest.csv").write_text("path,label\n" + "\n".join(rows) + "\n")

    error = refusal(tmp_path / "manifest.csv")

    assert len(error.problems) == 7
    message = str(error)
    assert message.startswith(f"data set {tmp_path / 'manifest.csv'}: 7 problems:")
    assert "manifest.csv line 3: gone-0.png: no such file" in message
    assert "line 7: gone-4.png" in message
    assert "gone-5.png" not in message
    assert "... and 2 more" in message


def test_unknown_labels_are_listed_unless_their_order_is_given(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    for label in ("fibroadenoma", "cyst", "carcinoma"):
        write_png(tmp_path / label / "1.png", synthetic_image("benign", rng))

    message = str(refusal(tmp_path))
    assert "unknown label names: 'carcinoma', 'cyst', 'fibroadenoma'" in message
    assert "--labels" in message

    given = load_data_set(tmp_path, ["cyst", "fibroadenoma", "carcinoma"])
    assert given.labels == ("cyst", "fibroadenoma", "carcinoma")
    assert "not in the given order (cyst, carcinoma): 'fibroadenoma'" in str(
        refusal(tmp_path, ["cyst", "carcinoma"])
    )


def test_an_empty_class_is_refused(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    write_png(tmp_path / "benign" / "1.png", synthetic_image("benign", rng))
    write_png(tmp_path / "malignant" / "1.png", synthetic_image("malignant", rng))
    write_png(tmp_path / "normal" / "1_mask.png", np.zeros((8, 8), np.uint8))

    assert "normal/: no images" in str(refusal(tmp_path))
    (tmp_path / "normal" / "1_mask.png").unlink()
    (tmp_path / "normal").rmdir()
    # A class the caller names but the data lack is empty too.
    assert "class 'normal' has no images" in str(refusal(tmp_path, ["normal", "benign", "malignant"]))


def test_an_unreadable_image_is_named_with_the_reason(tmp_path: Path) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n truncated")

    with pytest.raises(ImageReadError) as raised:
        read_pixels(Example(broken, "benign"))

    assert str(raised.value).startswith(f"{broken}: not a readable image")


# --- pixels -----------------------------------------------------------------------------------


def test_pictures_are_read_gray_and_cropped_like_dicom(tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    inner = synthetic_image("benign", rng, px=30)
    framed = np.zeros((50, 60), np.uint8)
    framed[7:37, 11:41] = inner
    rgb = np.stack([framed, framed // 2, framed // 3], axis=-1)

    gray = read_pixels(Example(write_png(tmp_path / "gray.png", framed), "benign"))
    colour = read_pixels(Example(write_png(tmp_path / "colour.png", rgb), "benign"))

    assert gray.dtype == np.float32
    assert np.array_equal(gray, inner / np.float32(255.0))  # the black frame is cropped
    expected = (rgb[7:37, 11:41] / np.float32(255.0)) @ np.array([0.299, 0.587, 0.114], np.float32)
    assert np.allclose(colour, expected, atol=1e-6)
    assert blank_border_box(gray) == (0, 0, 30, 30)


def test_dicom_images_are_read_through_the_nodes_own_decoder(tmp_path: Path) -> None:
    framed = np.zeros((48, 48), np.uint8)
    framed[4:44, 4:44] = synthetic_image("malignant", np.random.default_rng(9))
    path = write_dicom(tmp_path / "a.dcm", framed, patient_id="P", sop_uid=sop_uid(1))

    pixels = read_pixels(Example(path, "malignant"))

    assert np.array_equal(pixels, decode_for_analysis(path).frames[0].pixels)
    assert pixels.shape == (40, 40)


# --- labels and splits ------------------------------------------------------------------------


def test_label_orders_known_without_being_told() -> None:
    assert order_labels(["malignant", "benign"]) == ("benign", "malignant")
    assert order_labels(["BI-RADS 4B", "BI-RADS 2", "BI-RADS 4A"]) == (
        "BI-RADS 2",
        "BI-RADS 4A",
        "BI-RADS 4B",
    )


def clinic(patients_per_class: int = 20, seed: int = 0) -> list[Example]:
    """Patients with one to four images each, all of one class."""
    rng = np.random.default_rng(seed)
    examples = []
    for label in CLASSES:
        for p in range(patients_per_class):
            for i in range(int(rng.integers(1, 5))):
                examples.append(Example(Path(f"/d/{label}/{p}-{i}.png"), label, f"{label}-{p}"))
    return examples


def test_a_holdout_split_keeps_each_patient_on_one_side_and_the_classes_in_proportion() -> None:
    examples = clinic()

    split = holdout_split(examples, 0.2, seed=3)

    train = {examples[i].patient_id for i in split.train}
    test = {examples[i].patient_id for i in split.test}
    assert not train & test
    assert sorted(split.train + split.test) == list(range(len(examples)))
    assert 0.17 <= len(split.test) / len(examples) <= 0.23
    for label in CLASSES:
        in_class = sum(e.label == label for e in examples)
        tested = sum(examples[i].label == label for i in split.test)
        assert abs(tested - 0.2 * in_class) <= 2.5, label


def test_splits_are_the_same_for_the_same_seed_and_differ_for_another() -> None:
    examples = clinic()

    assert holdout_split(examples, 0.2, seed=3) == holdout_split(examples, 0.2, seed=3)
    assert holdout_split(examples, 0.2, seed=3) != holdout_split(examples, 0.2, seed=4)
    assert fold_splits(examples, 5, seed=3) == fold_splits(examples, 5, seed=3)


def test_k_folds_test_every_image_once_and_no_patient_twice() -> None:
    examples = clinic(patients_per_class=10)

    splits = fold_splits(examples, 5, seed=1)

    tested = Counter(i for split in splits for i in split.test)
    assert sorted(tested) == list(range(len(examples)))
    assert set(tested.values()) == {1}
    for split in splits:
        assert not {examples[i].patient_id for i in split.train} & {
            examples[i].patient_id for i in split.test
        }
        assert {examples[i].label for i in split.test} == set(CLASSES)
    with pytest.raises(ValueError, match="cannot fill 40 folds"):
        fold_splits(examples, 40)


def test_images_without_a_patient_are_split_one_by_one() -> None:
    examples = [Example(Path(f"/d/{i}.png"), CLASSES[i % 3]) for i in range(30)]

    split = holdout_split(examples, 0.2, seed=0)

    assert len(split.test) == 6
    assert Counter(examples[i].label for i in split.test) == dict.fromkeys(CLASSES, 2)


def test_a_data_set_cannot_be_built_with_an_empty_class() -> None:
    with pytest.raises(DataSetError, match="class 'malignant' has no images"):
        LabelledDataSet(
            Path("/d"), Path("/d"), "folders", ("benign", "malignant"), (Example(Path("/d/a.png"), "benign"),)
        )
