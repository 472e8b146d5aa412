"""The Grad-CAM secondary capture: its picture, its burned-in text and its DICOM attributes."""

from __future__ import annotations

import io
import shutil
import subprocess
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import JPEGBaseline8Bit, SecondaryCaptureImageStorage

from workers.captures import (
    NOT_FOR_CLINICAL_USE,
    SERIES_NUMBER,
    CaptureError,
    CaptureInput,
    Layout,
    annotation_layout,
    build_capture,
    capture_uids,
    heatmap_overlay,
    jet,
    overlay_image,
    write_png,
)

US_IMAGE = "1.2.840.10008.5.1.4.1.1.6.1"
US_MULTIFRAME = "1.2.840.10008.5.1.4.1.1.3.1"
STUDY_UID = "1.2.826.0.1.3680043.8.498.10"
SOURCE_UID = "1.2.826.0.1.3680043.8.498.11"
GRAY = 100
CROP = (20, 30, 110, 130)  # (top, left, bottom, right) in a 120 x 160 frame
MADE_AT = datetime(2025, 3, 4, 5, 6, 7, 890000)


def _source(rows: int = 120, columns: int = 160, **attributes: Any) -> Dataset:
    source = Dataset()
    source.SOPClassUID = US_IMAGE
    source.SOPInstanceUID = SOURCE_UID
    source.StudyInstanceUID = STUDY_UID
    source.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.12"
    source.PatientName = "Doe^Jane"
    source.PatientID = "PAT-1"
    source.PatientBirthDate = "19700101"
    source.PatientSex = "F"
    source.StudyDate = "20250301"
    source.StudyTime = "101500"
    source.AccessionNumber = "ACC-1"
    source.StudyID = "S1"
    source.ReferringPhysicianName = ""
    source.Modality = "US"
    source.Manufacturer = "Phantom Works"
    source.Laterality = "L"
    source.InstanceNumber = 7
    source.Rows, source.Columns = rows, columns
    source.SamplesPerPixel = 1
    source.PhotometricInterpretation = "MONOCHROME2"
    for keyword, value in attributes.items():
        setattr(source, keyword, value)
    return source


def _heatmap(size: int = 56) -> np.ndarray:
    """1.0 in the middle, falling to 0 at the edges: hot centre, cold border."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    centre = (size - 1) / 2
    distance = np.sqrt((yy - centre) ** 2 + (xx - centre) ** 2) / centre
    heatmap: np.ndarray = np.clip(1.0 - distance, 0.0, 1.0).astype(np.float32)
    return heatmap


def _capture(**changes: Any) -> CaptureInput:
    fields: dict[str, Any] = {
        "source": _source(),
        "frame": np.full((120, 160), GRAY, np.uint8),
        "frame_index": 0,
        "heatmap": _heatmap(),
        "crop": CROP,
        "label": "malignant",
        "probability": 0.87,
        "model_id": "model-a",
        "architecture": "densenet121",
        "clinical_use": False,
        "made_at": MADE_AT,
    }
    fields.update(changes)
    return CaptureInput(**fields)


def _multiframe() -> CaptureInput:
    source = _source(SOPClassUID=US_MULTIFRAME, NumberOfFrames=3)
    return _capture(source=source, frame_index=1)


def _rgb() -> CaptureInput:
    source = _source(SamplesPerPixel=3, PhotometricInterpretation="RGB", PlanarConfiguration=0)
    frame = np.zeros((120, 160, 3), np.uint8)
    frame[..., 0], frame[..., 1], frame[..., 2] = 90, 110, 130
    return _capture(source=source, frame=frame)


def _boxes(layout: Layout) -> list[tuple[int, int, int, int]]:
    top, left, bottom, right = layout.scale_bar
    framed = (top - 1, left - 1, bottom + 1, right + 1)  # the bar's white frame
    boxes = [layout.caption_box, framed, layout.high_box, layout.low_box]
    return boxes + ([layout.warning_box] if layout.warning_box else [])


def _outside(shape: tuple[int, ...], *boxes: tuple[int, int, int, int]) -> np.ndarray:
    """A mask of the pixels outside every box."""
    mask = np.ones(shape[:2], bool)
    for top, left, bottom, right in boxes:
        mask[top:bottom, left:right] = False
    return mask


def _yellow(pixels: np.ndarray) -> np.ndarray:
    """The pixels of (anti-aliased) yellow text."""
    red, green, blue = (pixels[..., channel].astype(int) for channel in range(3))
    mask: np.ndarray = (red >= 200) & (green >= 170) & (blue <= 40)
    return mask


def _dciodvfy(path: Path) -> list[str]:
    executable = shutil.which("dciodvfy")
    assert executable, "dciodvfy (dicom3tools) is required to check the capture against the standard"
    result = subprocess.run([executable, str(path)], capture_output=True, text=True, check=False, timeout=60)
    return (result.stdout + result.stderr).splitlines()


def _saved(dataset: Dataset) -> bytes:
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


# --- The picture ----------------------------------------------------------------------------------


def test_the_heatmap_colours_the_crop_and_leaves_the_rest_of_the_frame_gray() -> None:
    capture = _capture()
    overlay = heatmap_overlay(capture)
    top, left, bottom, right = CROP

    assert overlay.shape == (120, 160, 3) and overlay.dtype == np.uint8
    outside = _outside(overlay.shape, CROP)
    assert (overlay[outside] == GRAY).all()
    hot = overlay[(top + bottom) // 2, (left + right) // 2].astype(int)
    assert hot[0] > hot[2] + 40, f"the heatmap's peak should be red, is {hot}"
    cold = overlay[top + 1, left + 1].astype(int)
    assert cold[2] > cold[0] + 40, f"the crop's cold corner should be blue, is {cold}"


def test_opacity_weighs_the_colour_map_against_the_frame() -> None:
    capture = _capture()
    centre = ((CROP[0] + CROP[2]) // 2, (CROP[1] + CROP[3]) // 2)
    assert (heatmap_overlay(capture, opacity=0.0)[centre] == GRAY).all()
    full = heatmap_overlay(capture, opacity=1.0)[CROP[0] : CROP[2], CROP[1] : CROP[3]]
    assert {tuple(pixel) for pixel in full.reshape(-1, 3)} <= {
        tuple(colour) for colour in jet(np.linspace(0, 1, 256))
    }


def test_an_rgb_frame_keeps_its_colours_outside_the_crop() -> None:
    capture = _rgb()
    overlay = overlay_image(capture)
    outside = _outside(overlay.shape, CROP, *_boxes(annotation_layout(capture)))
    assert (overlay[outside] == capture.frame[outside]).all()


def test_the_label_probability_and_model_are_burned_in() -> None:
    capture = _capture()
    layout = annotation_layout(capture)
    bare, annotated = heatmap_overlay(capture), overlay_image(capture)
    top, left, bottom, right = layout.caption_box

    assert " ".join(layout.caption) == "malignant 0.87 Grad-CAM, Precedent densenet121"
    region = annotated[top:bottom, left:right]
    assert (region != bare[top:bottom, left:right]).any()
    assert (region.min(axis=2) >= 200).sum() > 30, "white text on the caption's black box"
    assert (region == 0).all(axis=2).sum() > region.shape[0] * region.shape[1] // 3
    outside = _outside(annotated.shape, *_boxes(layout))
    assert (annotated[outside] == bare[outside]).all(), "nothing drawn outside the annotation boxes"


def test_a_research_model_is_marked_not_for_clinical_use() -> None:
    layout = annotation_layout(_capture(clinical_use=False))
    annotated = overlay_image(_capture(clinical_use=False))
    assert layout.warning_box is not None
    assert " ".join(layout.warning) == NOT_FOR_CLINICAL_USE
    top, left, bottom, right = layout.warning_box
    assert top > layout.caption_box[2], "the warning sits below the caption"
    assert _yellow(annotated[top:bottom, left:right]).sum() > 30


def test_a_clinical_model_has_no_warning() -> None:
    capture = _capture(clinical_use=True)
    layout = annotation_layout(capture)
    assert layout.warning_box is None and layout.warning == ()
    research_box = annotation_layout(_capture(clinical_use=False)).warning_box
    assert research_box is not None
    top, left, bottom, right = research_box
    annotated = overlay_image(capture)[top:bottom, left:right]
    assert (annotated == heatmap_overlay(capture)[top:bottom, left:right]).all()
    assert _yellow(annotated).sum() == 0


def test_the_scale_bar_runs_from_high_at_the_top_to_low_at_the_bottom() -> None:
    capture = _capture()
    top, left, bottom, right = annotation_layout(capture).scale_bar
    column = overlay_image(capture)[top:bottom, (left + right) // 2].astype(int)
    palette = jet(np.linspace(0.0, 1.0, 256)).astype(int)
    levels = np.array([np.abs(palette - pixel).sum(axis=1).argmin() for pixel in column])

    assert bottom - top >= 30
    assert levels[0] >= 250 and levels[-1] <= 5
    assert (np.diff(levels) <= 0).all(), "each row no higher than the one above"


@pytest.mark.parametrize(
    ("rows", "columns", "smallest_font"), [(128, 128, 10), (1024, 1024, 20), (480, 640, 12)]
)
def test_text_stays_legible_and_inside_the_frame_at_any_size(
    rows: int, columns: int, smallest_font: int
) -> None:
    capture = _capture(
        source=_source(rows, columns),
        frame=np.full((rows, columns), GRAY, np.uint8),
        crop=(0, 0, rows, columns),
        architecture="efficientnet_b0",
    )
    layout = annotation_layout(capture)
    boxes = _boxes(layout)

    assert layout.font_size >= smallest_font
    for top, left, bottom, right in boxes:
        assert 0 <= top < bottom <= rows and 0 <= left < right <= columns
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], f"{a} overlaps {b}"
    assert overlay_image(capture).shape == (rows, columns, 3)


def test_a_frame_too_small_for_legible_text_is_refused() -> None:
    capture = _capture(source=_source(48, 48), frame=np.full((48, 48), GRAY, np.uint8), crop=(0, 0, 48, 48))
    with pytest.raises(CaptureError, match="too small"):
        overlay_image(capture)


def test_write_png_writes_the_overlay(tmp_path: Path) -> None:
    overlay = overlay_image(_capture())
    path = tmp_path / "gradcam.png"
    write_png(overlay, path)
    with Image.open(path) as png:
        assert png.mode == "RGB"
        assert (np.asarray(png) == overlay).all()
    assert [p.name for p in tmp_path.iterdir()] == ["gradcam.png"]
    with pytest.raises(CaptureError, match="RGB uint8"):
        write_png(overlay[..., 0], path)


# --- The DICOM object -----------------------------------------------------------------------------


@pytest.mark.parametrize("make", [_capture, _multiframe, _rgb], ids=["us", "us-multiframe", "us-rgb"])
def test_the_capture_is_a_valid_secondary_capture_of_the_source(make: Any, tmp_path: Path) -> None:
    capture = make()
    path = tmp_path / "capture.dcm"
    build_capture(capture).save_as(path, enforce_file_format=True)

    errors = [line for line in _dciodvfy(path) if line.startswith("Error")]
    assert errors == []
    sc, source = pydicom.dcmread(path), capture.source
    assert sc.SOPClassUID == SecondaryCaptureImageStorage
    assert (sc.Rows, sc.Columns) == (source.Rows, source.Columns)
    assert (sc.PhotometricInterpretation, sc.SamplesPerPixel, sc.BitsAllocated) == ("RGB", 3, 8)
    assert (sc.pixel_array == overlay_image(capture)).all()
    assert sc.BurnedInAnnotation == "YES"
    assert (sc.PatientID, sc.PatientName, sc.PatientBirthDate, sc.PatientSex) == (
        "PAT-1",
        "Doe^Jane",
        "19700101",
        "F",
    )
    assert (sc.StudyInstanceUID, sc.AccessionNumber, sc.StudyDate) == (STUDY_UID, "ACC-1", "20250301")
    assert sc.SeriesInstanceUID != source.SeriesInstanceUID
    assert (sc.SeriesNumber, sc.InstanceNumber) == (SERIES_NUMBER, 7)
    assert sc.SeriesDescription == "Grad-CAM densenet121 - NOT FOR CLINICAL USE"
    assert (sc.Modality, sc.ConversionType, sc.Laterality) == ("US", "WSD", "L")
    assert "Grad-CAM" in sc.DerivationDescription and "malignant" in sc.DerivationDescription


@pytest.mark.parametrize(("make", "frame_number"), [(_capture, None), (_multiframe, 2)])
def test_the_source_image_is_referenced_with_its_frame_when_multiframe(
    make: Any, frame_number: int | None
) -> None:
    capture = make()
    (reference,) = build_capture(capture).SourceImageSequence
    assert reference.ReferencedSOPClassUID == capture.source.SOPClassUID
    assert reference.ReferencedSOPInstanceUID == SOURCE_UID
    assert reference.get("ReferencedFrameNumber") == frame_number


def test_uids_come_from_study_source_model_and_frame() -> None:
    sc = build_capture(_multiframe())
    series, instance = capture_uids(STUDY_UID, SOURCE_UID, "model-a", 1)
    assert (sc.SeriesInstanceUID, sc.SOPInstanceUID) == (series, instance)
    assert sc.file_meta.MediaStorageSOPInstanceUID == instance
    other_model = capture_uids(STUDY_UID, SOURCE_UID, "model-b", 1)
    assert other_model[0] != series and other_model[1] != instance
    other_frame = capture_uids(STUDY_UID, SOURCE_UID, "model-a", 2)
    assert other_frame[0] == series and other_frame[1] != instance


def test_a_different_model_makes_its_own_series() -> None:
    first, second = build_capture(_capture(model_id="model-a")), build_capture(_capture(model_id="model-b"))
    assert first.SeriesInstanceUID != second.SeriesInstanceUID
    assert first.SOPInstanceUID != second.SOPInstanceUID
    assert first.StudyInstanceUID == second.StudyInstanceUID


def test_the_same_inputs_make_the_same_object_byte_for_byte() -> None:
    first, second = build_capture(_capture()), build_capture(_capture())
    assert first.SOPInstanceUID == second.SOPInstanceUID
    assert first.PixelData == second.PixelData
    assert _saved(first) == _saved(second)


def test_dates_and_times_come_from_made_at() -> None:
    sc = build_capture(_capture())
    dates = {sc.ContentDate, sc.SeriesDate, sc.InstanceCreationDate, sc.DateOfSecondaryCapture}
    assert {str(d) for d in dates} == {"20250304"}
    times = {str(sc.ContentTime), str(sc.InstanceCreationTime), str(sc.TimeOfSecondaryCapture)}
    assert {t[:6] for t in times} == {"050607"}
    contributions = {item.get("ContributionDateTime") for item in sc.ContributingEquipmentSequence}
    assert all(value is None or value.startswith("20250304050607") for value in contributions)


def test_a_clinical_model_series_has_no_warning() -> None:
    sc = build_capture(_capture(clinical_use=True))
    assert sc.SeriesDescription == "Grad-CAM densenet121"
    assert "Not for clinical use" not in sc.DerivationDescription


def test_modality_is_the_source_modality_or_ot() -> None:
    assert build_capture(_capture(source=_source(Modality="MG"))).Modality == "MG"
    without = _source()
    del without.Modality
    assert build_capture(_capture(source=without)).Modality == "OT"


def test_patient_names_in_other_character_sets_are_copied_verbatim(tmp_path: Path) -> None:
    source = _source(SpecificCharacterSet="ISO_IR 192", PatientName="Müller^Zoë")
    path = tmp_path / "capture.dcm"
    build_capture(_capture(source=source)).save_as(path, enforce_file_format=True)
    sc = pydicom.dcmread(path)
    assert (sc.SpecificCharacterSet, str(sc.PatientName)) == ("ISO_IR 192", "Müller^Zoë")


def test_a_lossily_compressed_source_makes_a_capture_flagged_lossy() -> None:
    source = _source()
    source.file_meta = FileMetaDataset()
    source.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    assert build_capture(_capture(source=source)).LossyImageCompression == "01"
    assert "LossyImageCompression" not in build_capture(_capture())


# --- Hostile inputs -------------------------------------------------------------------------------


def _nan_heatmap() -> np.ndarray:
    heatmap = _heatmap()
    heatmap[3, 4] = np.nan
    return heatmap


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"heatmap": _nan_heatmap()}, "NaN"),
        ({"heatmap": _heatmap() * 2}, r"\[0, 1\]"),
        ({"heatmap": np.zeros((4, 4, 3), np.float32)}, "2-D"),
        ({"heatmap": np.ones((8, 8), np.uint8)}, "floating point"),
        ({"crop": (20, 30, 130, 130)}, "not inside"),
        ({"crop": (-1, 30, 110, 130)}, "not inside"),
        ({"crop": (50, 30, 50, 130)}, "not inside"),
        ({"crop": (20.5, 30, 110, 130)}, "four integers"),
        ({"frame": np.full((120, 160), 0.5, np.float64)}, "uint8"),
        ({"frame": np.full((120, 160, 4), GRAY, np.uint8)}, "RGB"),
        ({"frame": np.full((100, 160), GRAY, np.uint8)}, "100 x 160"),
        ({"frame_index": 1}, "frame index 1"),
        ({"probability": float("nan")}, "probability"),
        ({"label": "maligne\u0301"}, "label"),
        ({"source": Dataset()}, "lacks StudyInstanceUID"),
    ],
    ids=lambda value: None if isinstance(value, dict) else str(value),
)
def test_hostile_inputs_are_refused_with_a_reason(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _capture(**changes)


def test_an_absurd_opacity_is_refused() -> None:
    with pytest.raises(ValueError, match="opacity"):
        build_capture(_capture(), opacity=1.5)
