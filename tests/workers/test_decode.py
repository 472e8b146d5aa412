"""Decoding: every stored file gives analysable gray pixels or a clear reason why not.

Real files (pydicom-data and pydicom's own test files) cover the transfer syntaxes and the
quirks of real devices; synthetic files built here pin each display transform to numbers
computed independently from the DICOM definitions.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread, uid
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels.processing import convert_color_space
from pydicom.pixels.utils import pixel_array

import workers.decode as decode
from tests.support.data import (
    PYDICOM_DATA_DIR,
    PYDICOM_TEST_DIR,
    pydicom_data_files,
    pydicom_test_files,
    write_instance,
)
from workers.decode import (
    DecodedImage,
    NotAnImage,
    PixelError,
    UndecodablePixels,
    UnsupportedImage,
    blank_border_box,
    decode_for_analysis,
    display_frame,
    select_frames,
)

LUMA = np.array([0.299, 0.587, 0.114])
ULTRASOUND = uid.UltrasoundImageStorage
SECONDARY_CAPTURE = uid.SecondaryCaptureImageStorage


def _file_id(path: Path) -> str:
    return f"{path.parent.name}/{path.name}"


ALL_FILES = pydicom_data_files() + pydicom_test_files()

ULTRASOUND_FILES = [
    *(PYDICOM_DATA_DIR / name for name in ("US1_UNCR.dcm", "US1_UNCI.dcm", "US1_J2KR.dcm", "US1_J2KI.dcm")),
    *(PYDICOM_DATA_DIR / f"OBXXXX1A{suffix}.dcm" for suffix in ("", "_2frame", "_expb", "_expb_2frame")),
    *(PYDICOM_DATA_DIR / f"OBXXXX1A{suffix}.dcm" for suffix in ("_rle", "_rle_2frame")),
    PYDICOM_DATA_DIR / "gdcm-US-ALOKA-16.dcm",
    PYDICOM_DATA_DIR / "gdcm-US-ALOKA-16_big.dcm",
    PYDICOM_DATA_DIR / "JPGLosslessP14SV1_1s_1f_8b.dcm",
    PYDICOM_DATA_DIR / "color-pl.dcm",
    PYDICOM_DATA_DIR / "color-px.dcm",
    PYDICOM_DATA_DIR / "color3d_jpeg_baseline.dcm",
    *(PYDICOM_TEST_DIR / f"examples_{kind}.dcm" for kind in ("jpeg2k", "palette", "rgb_color", "ybr_color")),
    PYDICOM_TEST_DIR / "ExplVR_BigEnd.dcm",
]

# One instance in several lossless encodings each: decoding must not depend on the encoding.
LOSSLESS_VARIANTS = {
    "emri multi-frame: RLE, big endian, JPEG 2000, JPEG-LS": [
        PYDICOM_DATA_DIR / f"emri_small{suffix}.dcm"
        for suffix in ("", "_RLE", "_big_endian", "_jpeg_2k_lossless", "_jpeg_ls_lossless")
    ],
    "MR: RLE, big endian, implicit VR, JPEG 2000, JPEG-LS": [
        PYDICOM_TEST_DIR / f"MR_small{suffix}.dcm"
        for suffix in ("", "_RLE", "_bigendian", "_expb", "_implicit", "_jp2klossless", "_jpeg_ls_lossless")
    ],
    "ultrasound RGB: JPEG 2000 lossless": [
        PYDICOM_DATA_DIR / "US1_UNCR.dcm",
        PYDICOM_DATA_DIR / "US1_J2KR.dcm",
        PYDICOM_TEST_DIR / "examples_jpeg2k.dcm",
    ],
    "radiograph MONOCHROME1: JPEG 2000 lossless": [
        PYDICOM_DATA_DIR / "RG1_UNCR.dcm",
        PYDICOM_DATA_DIR / "RG1_J2KR.dcm",
    ],
    "CT signed with rescale: JPEG 2000 lossless": [
        PYDICOM_DATA_DIR / "693_UNCR.dcm",
        PYDICOM_DATA_DIR / "693_J2KR.dcm",
    ],
    "ultrasound palette: big endian, RLE": [
        PYDICOM_DATA_DIR / f"OBXXXX1A{suffix}.dcm" for suffix in ("", "_expb", "_rle")
    ],
    "ultrasound segmented 16-bit palette: big endian": [
        PYDICOM_DATA_DIR / "gdcm-US-ALOKA-16.dcm",
        PYDICOM_DATA_DIR / "gdcm-US-ALOKA-16_big.dcm",
    ],
    "RGB: big endian, RLE, JPEG lossless, 16 and 32 bits": [
        PYDICOM_DATA_DIR / "SC_rgb.dcm",
        PYDICOM_DATA_DIR / "SC_rgb_expb.dcm",
        PYDICOM_TEST_DIR / "SC_rgb_rle.dcm",
        PYDICOM_TEST_DIR / "SC_rgb_jpeg_gdcm.dcm",
        PYDICOM_DATA_DIR / "SC_rgb_16bit.dcm",
        PYDICOM_TEST_DIR / "SC_rgb_rle_16bit.dcm",
        PYDICOM_DATA_DIR / "SC_rgb_32bit.dcm",
    ],
    "1-bit segmentation: big endian": [PYDICOM_DATA_DIR / "liver.dcm", PYDICOM_DATA_DIR / "liver_expb.dcm"],
}

KNOWN_GOOD = sorted(
    {
        *ULTRASOUND_FILES,
        *(path for paths in LOSSLESS_VARIANTS.values() for path in paths),
        PYDICOM_TEST_DIR / "image_dfl.dcm",  # deflated
        PYDICOM_DATA_DIR / "JPEG-LL.dcm",  # JPEG lossless, 16 bits
        PYDICOM_TEST_DIR / "JPGExtended.dcm",  # JPEG extended, 12 bits
        PYDICOM_TEST_DIR / "JPEG2000.dcm",
        PYDICOM_TEST_DIR / "JPEGLSNearLossless_16.dcm",
        PYDICOM_TEST_DIR / "SC_rgb_jpeg.dcm",  # implicit VR data set under an explicit VR syntax
        PYDICOM_DATA_DIR / "OT-PAL-8-face.dcm",  # no file meta at all
        PYDICOM_DATA_DIR / "mlut_18.dcm",  # Modality LUT Sequence
        PYDICOM_DATA_DIR / "vlut_04.dcm",  # VOI LUT Sequence
        PYDICOM_DATA_DIR / "RG3_J2KI.dcm",  # lossy JPEG 2000, MONOCHROME1
    }
)

# Files broken on purpose, and what each must be reported as.
KNOWN_BAD: dict[str, type[PixelError]] = {
    "emri_small_jpeg_2k_lossless_too_short.dcm": UndecodablePixels,  # cut short: no Pixel Data left
    "MR_truncated.dcm": UndecodablePixels,  # native Pixel Data shorter than Rows x Columns
    "JPEG2000-embedded-sequence-delimiter.dcm": UndecodablePixels,  # codestream garbled
    "JPEG-lossy.dcm": UndecodablePixels,  # 12-bit JPEG with a misplaced marker: every codec refuses
    "badVR.dcm": UndecodablePixels,  # Number of Frames "1A"
    "nested_priv_SQ.dcm": UndecodablePixels,  # Pixel Data without Rows
    "reportsi.dcm": NotAnImage,
    "test-SR.dcm": NotAnImage,
    "rtplan.dcm": NotAnImage,
    "waveform_ecg.dcm": NotAnImage,
}


# --- helpers ----------------------------------------------------------------------------------


def write_image(
    path: Path,
    pixels: np.ndarray,
    photometric: str = "MONOCHROME2",
    *,
    bits_stored: int | None = None,
    sop_class: str = SECONDARY_CAPTURE,
    **attributes: Any,
) -> Path:
    """A small image file with exactly these pixels and attributes, Explicit VR Little Endian."""
    dataset = Dataset()
    dataset.SOPClassUID = sop_class
    dataset.set_pixel_data(pixels, photometric, bits_stored or pixels.dtype.itemsize * 8)
    for keyword, value in attributes.items():
        setattr(dataset, keyword, value)
    return _save(path, dataset, uid.ExplicitVRLittleEndian)


def _save(path: Path, dataset: Dataset, transfer_syntax: uid.UID) -> Path:
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.MediaStorageSOPClassUID = dataset.SOPClassUID
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    dataset.file_meta.TransferSyntaxUID = transfer_syntax
    dataset.save_as(path, enforce_file_format=True)
    return path


def only_frame(image: DecodedImage) -> decode.Frame:
    assert len(image.frames) == 1
    return image.frames[0]


def assert_frame_shows(frame: decode.Frame, expected_full: np.ndarray, atol: float = 1e-6) -> None:
    """The frame is ``expected_full`` cropped to its blank-border box, and says where it came from."""
    assert frame.crop == blank_border_box(expected_full)
    top, left, bottom, right = frame.crop
    np.testing.assert_allclose(frame.pixels, expected_full[top:bottom, left:right], atol=atol)


def ramp(rows: int, columns: int, low: int, high: int, dtype: type = np.uint16) -> np.ndarray:
    """Values rising row by row from low to high: every row differs, every column spans them all."""
    values = np.linspace(low, high, rows * columns).reshape(rows, columns)
    return np.rint(values).astype(dtype)


@pytest.fixture
def decoded_indices(monkeypatch: pytest.MonkeyPatch) -> list[int | None]:
    """The frame indices decode asks pydicom for, in order."""
    calls: list[int | None] = []

    def recording(source: Any, *, index: int | None = None, **kwargs: Any) -> np.ndarray:
        calls.append(index)
        return pixel_array(source, index=index, **kwargs)

    monkeypatch.setattr(decode, "pixel_array", recording)
    return calls


@pytest.fixture
def no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if anything reaches a pixel decoder."""

    def refuse(*args: Any, **kwargs: Any) -> np.ndarray:
        raise AssertionError("pixel data was decoded")

    monkeypatch.setattr(decode, "pixel_array", refuse)


# --- real files -------------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("path", ALL_FILES, ids=_file_id)
def test_every_real_file_decodes_to_unit_gray_or_gives_a_reason(path: Path) -> None:
    try:
        image = decode_for_analysis(path, policy="each")
    except PixelError as error:
        assert str(error).strip()
        assert len(str(error)) <= 120
        return
    assert image.number_of_frames >= 1
    assert image.frames
    for frame in image.frames:
        top, left, bottom, right = frame.crop
        assert 0 <= top < bottom <= image.rows and 0 <= left < right <= image.columns
        assert frame.pixels.dtype == np.float32
        assert frame.pixels.shape == (bottom - top, right - left)
        assert np.isfinite(frame.pixels).all()
        assert frame.pixels.min() >= 0.0 and frame.pixels.max() <= 1.0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("path", KNOWN_GOOD, ids=_file_id)
def test_known_good_files_decode(path: Path) -> None:
    image = decode_for_analysis(path, policy="each")
    assert image.frames
    assert all(frame.pixels.size > 0 for frame in image.frames)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("name", "error"), KNOWN_BAD.items())
def test_broken_and_non_image_files_are_reported_as_such(name: str, error: type[PixelError]) -> None:
    path = next(p for p in ALL_FILES if p.name == name)
    with pytest.raises(error) as raised:
        decode_for_analysis(path)
    assert type(raised.value) is error


@pytest.mark.timeout(120)
@pytest.mark.parametrize("paths", LOSSLESS_VARIANTS.values(), ids=LOSSLESS_VARIANTS.keys())
def test_one_instance_in_different_lossless_syntaxes_gives_the_same_pixels(paths: list[Path]) -> None:
    reference, *others = (decode_for_analysis(path, policy="each") for path in paths)
    for path, other in zip(paths[1:], others, strict=True):
        assert [f.index for f in other.frames] == [f.index for f in reference.frames], path.name
        for mine, theirs in zip(reference.frames, other.frames, strict=True):
            assert mine.crop == theirs.crop, path.name
            # Equal to float32 rounding (colour is scaled in float32): far below one step
            # of a 16-bit value (1.5e-5), so any decoding difference still shows.
            np.testing.assert_allclose(mine.pixels, theirs.pixels, rtol=0, atol=1e-6, err_msg=path.name)


@pytest.mark.parametrize(
    "name",
    [
        "SC_rgb_dcmtk_+eb+cy+np.dcm",  # JPEG baseline, YBR_FULL_422
        "SC_rgb_dcmtk_+eb+cy+n1.dcm",  # JPEG baseline, YBR_FULL
        "SC_rgb_dcmtk_+eb+cr.dcm",  # JPEG baseline, RGB
        "SC_rgb_jpeg_dcmtk.dcm",
        "SC_rgb_jpeg_lossy_gdcm.dcm",
        "SC_ybr_full_422_uncompressed.dcm",
        "SC_rgb_gdcm_KY.dcm",  # JPEG 2000
        "SC_rgb_jls_lossy_line.dcm",  # JPEG-LS near-lossless
    ],
)
def test_colour_encodings_end_up_as_the_same_rgb(name: str) -> None:
    """YBR is converted to RGB whichever codec decoded it: left as YBR, red would be off by ~180."""
    reference = display_frame(PYDICOM_DATA_DIR / "SC_rgb.dcm", 0).astype(int)
    other = display_frame(PYDICOM_TEST_DIR / name, 0).astype(int)
    assert other.shape == reference.shape == (100, 100, 3)
    assert np.abs(other - reference).mean() < 4


def test_only_the_middle_frame_of_a_cine_is_decoded(decoded_indices: list[int | None]) -> None:
    image = decode_for_analysis(PYDICOM_DATA_DIR / "color3d_jpeg_baseline.dcm")
    assert image.number_of_frames == 120
    assert only_frame(image).index == 60
    assert decoded_indices == [60]


def test_each_frame_of_a_cine_is_sampled_evenly(decoded_indices: list[int | None]) -> None:
    image = decode_for_analysis(PYDICOM_DATA_DIR / "color3d_jpeg_baseline.dcm", "each", max_frames=5)
    assert [frame.index for frame in image.frames] == [0, 30, 60, 89, 119]
    assert decoded_indices == [0, 30, 60, 89, 119]


def test_ultrasound_regions_crop_a_real_palette_image() -> None:
    """OBXXXX1A's one region spans x 120-799, y 63-517: nothing outside it is analysed."""
    frame = only_frame(decode_for_analysis(PYDICOM_DATA_DIR / "OBXXXX1A.dcm"))
    top, left, bottom, right = frame.crop
    assert top >= 63 and left >= 120 and bottom <= 518 and right <= 800


def test_a_missing_file_is_not_a_pixel_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        decode_for_analysis(tmp_path / "gone.dcm")


# --- display transforms, on synthetic files ----------------------------------------------------


def test_monochrome1_is_the_inverse_of_monochrome2(tmp_path: Path) -> None:
    data = np.random.default_rng(1).integers(1000, 3000, (40, 50)).astype(np.uint16)
    one = decode_for_analysis(write_image(tmp_path / "m1.dcm", data, "MONOCHROME1", bits_stored=12))
    two = decode_for_analysis(write_image(tmp_path / "m2.dcm", data, "MONOCHROME2", bits_stored=12))
    assert only_frame(one).crop == only_frame(two).crop == (0, 0, 40, 50)
    np.testing.assert_allclose(only_frame(one).pixels, 1.0 - only_frame(two).pixels, atol=1e-6)
    displayed_one, displayed_two = (
        display_frame(tmp_path / "m1.dcm", 0),
        display_frame(tmp_path / "m2.dcm", 0),
    )
    assert np.abs(displayed_one.astype(int) + displayed_two.astype(int) - 255).max() <= 1


def test_signed_pixels_are_rescaled_before_the_window(tmp_path: Path) -> None:
    """Stored -500 / 0 / 500 with slope 2, intercept -1000 are -2000 / -1000 / 0: under a window
    centred on -1000 they show black, mid-grey and white. Read as unsigned they would not."""
    stored = np.array([[-500, 0, 500]] * 3, dtype=np.int16)
    path = write_image(
        tmp_path / "ct.dcm",
        stored,
        RescaleSlope=2,
        RescaleIntercept=-1000,
        WindowCenter=-1000,
        WindowWidth=2000,
    )
    assert (display_frame(path, 0) == [0, 128, 255]).all()
    frame = only_frame(decode_for_analysis(path))
    assert_frame_shows(frame, np.array([[0.0, 0.5 + 0.5 / 1999, 1.0]] * 3))


@pytest.mark.parametrize(
    ("function", "expected"),
    [
        ("LINEAR", lambda v: np.clip((v - 2047.5) / 1023 + 0.5, 0, 1)),
        ("LINEAR_EXACT", lambda v: np.clip((v - 2048) / 1024 + 0.5, 0, 1)),
        ("SIGMOID", lambda v: 1 / (1 + np.exp(-4 * (v - 2048) / 1024))),
    ],
)
def test_the_window_maps_its_range_and_clips_outside_it(
    tmp_path: Path, function: str, expected: Callable[[np.ndarray], np.ndarray]
) -> None:
    data = ramp(64, 64, 0, 4095)
    path = write_image(
        tmp_path / "window.dcm",
        data,
        bits_stored=12,
        WindowCenter=[2048, 100],  # several windows: the first one counts
        WindowWidth=[1024, 50],
        VOILUTFunction=function,
    )
    frame = only_frame(decode_for_analysis(path))
    assert_frame_shows(frame, expected(data.astype(np.float64)))
    if function != "SIGMOID":
        shown = display_frame(path, 0)
        assert (shown[data < 1536] == 0).all() and (shown[data > 2560] == 255).all()
        assert frame.crop[0] > 0  # rows entirely below the window are blank border


def test_without_a_window_deep_data_spans_robust_percentiles(tmp_path: Path) -> None:
    """One hot pixel at 65535 must not crush 12-bit tissue into black: a min-max stretch would."""
    data = ramp(100, 100, 1000, 2000)
    data[50, 50] = 65535
    path = write_image(tmp_path / "hot.dcm", data, bits_stored=16)
    shown = display_frame(path, 0)
    assert 100 < shown[50, 49] < 155
    assert shown[50, 50] == 255 and shown[0, 0] == 0
    frame = only_frame(decode_for_analysis(path))
    top, left = frame.crop[:2]
    assert top <= 2  # only the rows under the 0.5th percentile are black border
    assert 0.4 < frame.pixels[50 - top, 49 - left] < 0.6


def test_without_a_window_8_bit_data_shows_as_stored(tmp_path: Path) -> None:
    """Ultrasound values are display values already, as in the BUSI training images."""
    data = ramp(20, 30, 40, 200, np.uint8)
    frame = only_frame(decode_for_analysis(write_image(tmp_path / "us.dcm", data, sop_class=ULTRASOUND)))
    assert_frame_shows(frame, data / 255.0)


def test_a_voi_lut_sequence_is_applied_and_scaled_by_its_own_range(tmp_path: Path) -> None:
    """The LUT maps v to 1000 + 10 * (255 - v): an inverted ramp, 12-bit values in a 16-bit table."""
    data = ramp(16, 16, 0, 255, np.uint8)
    item = Dataset()
    item.LUTDescriptor = [256, 0, 16]
    item.add_new("LUTData", "US", [1000 + 10 * (255 - v) for v in range(256)])
    path = write_image(tmp_path / "voi.dcm", data)
    _rewrite(path, VOILUTSequence=[item])
    frame = only_frame(decode_for_analysis(path))
    assert_frame_shows(frame, (255 - data) / 255.0)


def test_a_modality_lut_sequence_is_applied_before_the_window(tmp_path: Path) -> None:
    data = ramp(16, 16, 0, 255, np.uint8)
    item = Dataset()
    item.LUTDescriptor = [256, 0, 16]
    item.add_new("LUTData", "US", [4 * v for v in range(256)])
    path = write_image(
        tmp_path / "mlut.dcm", data, WindowCenter=512, WindowWidth=1024, VOILUTFunction="LINEAR_EXACT"
    )
    _rewrite(path, ModalityLUTSequence=[item])
    frame = only_frame(decode_for_analysis(path))
    assert_frame_shows(frame, np.clip((4.0 * data - 512) / 1024 + 0.5, 0, 1))


def test_enhanced_objects_take_the_window_from_their_functional_groups(tmp_path: Path) -> None:
    """Tomosynthesis and enhanced US keep the window per frame: the per-frame one wins."""
    data = np.stack([ramp(32, 32, 0, 4095)] * 2)
    shared, frame_1 = Dataset(), Dataset()
    shared.FrameVOILUTSequence = [_window(2048, 1024)]
    frame_1.FrameVOILUTSequence = [_window(1024, 512)]
    path = write_image(
        tmp_path / "enhanced.dcm",
        data,
        bits_stored=12,
        SharedFunctionalGroupsSequence=[shared],
        PerFrameFunctionalGroupsSequence=[Dataset(), frame_1],
    )
    first, second = decode_for_analysis(path, "each").frames
    values = data[0].astype(np.float64)
    assert_frame_shows(first, np.clip((values - 2048) / 1024 + 0.5, 0, 1))
    assert_frame_shows(second, np.clip((values - 1024) / 512 + 0.5, 0, 1))


def _window(center: float, width: float) -> Dataset:
    item = Dataset()
    item.WindowCenter, item.WindowWidth, item.VOILUTFunction = center, width, "LINEAR_EXACT"
    return item


def _rewrite(path: Path, **attributes: Any) -> None:
    dataset = dcmread(path)
    for keyword, value in attributes.items():
        setattr(dataset, keyword, value)
    dataset.save_as(path, enforce_file_format=True)


@pytest.mark.parametrize("first_mapped", [0, 16])
def test_palette_colour_becomes_the_luma_of_the_palette(tmp_path: Path, first_mapped: int) -> None:
    """Indices below the first mapped value take the first entry, as PS3.3 C.7.6.3.1.5 says."""
    indices = ramp(32, 32, 0, 255, np.uint8)
    entries = np.arange(256 - first_mapped)
    palette = np.stack([entries * 257, (255 - entries) * 257, (entries * 7 % 256) * 257], axis=1)
    dataset = Dataset()
    dataset.SOPClassUID = ULTRASOUND
    dataset.set_pixel_data(indices, "PALETTE COLOR", 8)
    for channel, colour in enumerate(("Red", "Green", "Blue")):
        setattr(dataset, f"{colour}PaletteColorLookupTableDescriptor", [len(entries), first_mapped, 16])
        setattr(dataset, f"{colour}PaletteColorLookupTableData", palette[:, channel].astype("<u2").tobytes())
    path = _save(tmp_path / "palette.dcm", dataset, uid.ExplicitVRLittleEndian)
    frame = only_frame(decode_for_analysis(path))
    looked_up = palette[np.clip(indices.astype(int) - first_mapped, 0, None)]
    assert_frame_shows(frame, (looked_up @ LUMA) / 65535.0)
    assert display_frame(path, 0).shape == (32, 32, 3)


def colour_patches() -> np.ndarray:
    """Red, green and blue thirds over a grey gradient: a channel mix-up changes every patch."""
    rgb = np.zeros((30, 36, 3), dtype=np.uint8)
    rgb[:10, :12, 0] = rgb[:10, 12:24, 1] = rgb[:10, 24:, 2] = 255
    rgb[10:] = ramp(20, 36, 30, 220, np.uint8)[..., None]
    return rgb


def test_rgb_becomes_bt601_luma(tmp_path: Path) -> None:
    rgb = colour_patches()
    frame = only_frame(decode_for_analysis(write_image(tmp_path / "rgb.dcm", rgb, "RGB")))
    assert_frame_shows(frame, (rgb @ LUMA) / 255.0)
    np.testing.assert_allclose(frame.pixels[0, [0, 12, 24]], [0.299, 0.587, 0.114], atol=1e-6)


def test_ybr_full_gives_the_same_gray_as_rgb(tmp_path: Path) -> None:
    rgb = colour_patches()
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    as_rgb = only_frame(decode_for_analysis(write_image(tmp_path / "rgb.dcm", rgb, "RGB")))
    as_ybr = only_frame(decode_for_analysis(write_image(tmp_path / "ybr.dcm", ybr, "YBR_FULL")))
    assert as_ybr.crop == as_rgb.crop
    np.testing.assert_allclose(as_ybr.pixels, as_rgb.pixels, atol=2 / 255)
    np.testing.assert_allclose(display_frame(tmp_path / "ybr.dcm", 0), rgb, atol=2)


# --- frames -----------------------------------------------------------------------------------


@pytest.fixture
def seven_frames(tmp_path: Path) -> Path:
    """Seven frames, frame k filled with 20 * (k + 1), so a frame's pixels say which it is."""
    frames = np.stack([np.full((8, 10), 20 * (k + 1), dtype=np.uint8) for k in range(7)])
    return write_image(tmp_path / "cine.dcm", frames, sop_class=ULTRASOUND)


@pytest.mark.parametrize(
    ("policy", "max_frames", "expected"),
    [
        ("middle", 32, [3]),
        ("each", 32, [0, 1, 2, 3, 4, 5, 6]),
        ("each", 3, [0, 3, 6]),
        ("most_suspicious", 4, [0, 2, 4, 6]),
        ("each", 1, [0]),
    ],
)
def test_frame_policies_select_and_decode_only_their_frames(
    seven_frames: Path,
    decoded_indices: list[int | None],
    policy: decode.FramePolicy,
    max_frames: int,
    expected: list[int],
) -> None:
    image = decode_for_analysis(seven_frames, policy, max_frames=max_frames)
    assert (image.rows, image.columns, image.number_of_frames) == (8, 10, 7)
    assert [frame.index for frame in image.frames] == expected
    assert decoded_indices == expected
    for frame in image.frames:
        np.testing.assert_allclose(frame.pixels, 20 * (frame.index + 1) / 255.0, atol=1e-6)


def test_evenly_spaced_frames_keep_the_first_and_the_last() -> None:
    chosen = select_frames(300, "each", 32)
    assert len(chosen) == 32 and chosen[0] == 0 and chosen[-1] == 299
    assert chosen == sorted(set(chosen))
    gaps = np.diff(chosen)
    assert gaps.max() - gaps.min() <= 1
    assert select_frames(1, "middle", 32) == [0] and select_frames(2, "middle", 32) == [1]


def test_an_unknown_policy_is_a_programming_error(seven_frames: Path) -> None:
    with pytest.raises(ValueError, match="policy"):
        decode_for_analysis(seven_frames, "first")  # type: ignore[arg-type]


# --- cropping ---------------------------------------------------------------------------------


def _region(x0: int, y0: int, x1: int, y1: int, spatial_format: int) -> Dataset:
    region = Dataset()
    region.RegionSpatialFormat = spatial_format
    region.RegionDataType = 1
    region.RegionFlags = 0
    region.RegionLocationMinX0, region.RegionLocationMinY0 = x0, y0
    region.RegionLocationMaxX1, region.RegionLocationMaxY1 = x1, y1
    return region


def test_ultrasound_regions_crop_to_the_tissue_regions(tmp_path: Path) -> None:
    """The 2-D tissue region (format 1) counts; the spectral Doppler strip (format 3) does not."""
    data = np.full((100, 120), 100, dtype=np.uint8)
    regions = [_region(20, 10, 79, 59, spatial_format=1), _region(0, 70, 119, 99, spatial_format=3)]
    path = write_image(tmp_path / "us.dcm", data, sop_class=ULTRASOUND, SequenceOfUltrasoundRegions=regions)
    frame = only_frame(decode_for_analysis(path))
    assert frame.crop == (10, 20, 60, 80)
    assert frame.pixels.shape == (50, 60)
    assert display_frame(path, 0).shape == (100, 120)  # the display is never cropped


def test_without_tissue_regions_the_union_of_all_regions_counts(tmp_path: Path) -> None:
    data = np.full((100, 120), 100, dtype=np.uint8)
    regions = [_region(20, 10, 39, 29, spatial_format=3), _region(60, 50, 99, 89, spatial_format=2)]
    path = write_image(tmp_path / "us.dcm", data, sop_class=ULTRASOUND, SequenceOfUltrasoundRegions=regions)
    assert only_frame(decode_for_analysis(path)).crop == (10, 20, 90, 100)


def test_blank_borders_inside_the_region_are_cropped_too(tmp_path: Path) -> None:
    data = np.full((100, 120), 100, dtype=np.uint8)
    data[10:60, 20:80] = 0
    data[20:40, 30:50] = 150
    regions = [_region(20, 10, 79, 59, spatial_format=1)]
    path = write_image(tmp_path / "us.dcm", data, sop_class=ULTRASOUND, SequenceOfUltrasoundRegions=regions)
    frame = only_frame(decode_for_analysis(path))
    assert frame.crop == (20, 30, 40, 50)
    np.testing.assert_allclose(frame.pixels, 150 / 255.0, atol=1e-6)


def test_blank_borders_are_cropped_without_regions(tmp_path: Path) -> None:
    data = np.zeros((60, 80), dtype=np.uint8)
    data[10:31, 5:51] = 90
    data[12, 60] = 3  # below the blank threshold (0.02 * 255 = 5.1): still border
    frame = only_frame(decode_for_analysis(write_image(tmp_path / "b.dcm", data, sop_class=ULTRASOUND)))
    assert frame.crop == (10, 5, 31, 51)


def test_an_all_black_frame_is_not_cropped_to_nothing(tmp_path: Path) -> None:
    data = np.zeros((50, 60), dtype=np.uint8)
    frame = only_frame(decode_for_analysis(write_image(tmp_path / "black.dcm", data)))
    assert frame.crop == (0, 0, 50, 60)
    assert frame.pixels.shape == (50, 60) and not frame.pixels.any()


# --- what cannot be analysed ------------------------------------------------------------------


def test_a_structured_report_is_not_an_image() -> None:
    with pytest.raises(NotAnImage, match="no Pixel Data"):
        decode_for_analysis(PYDICOM_TEST_DIR / "reportsi.dcm")


def test_a_key_object_without_pixel_data_is_not_an_image(tmp_path: Path) -> None:
    path = write_instance(
        tmp_path / "ko.dcm",
        SOPClassUID=uid.KeyObjectSelectionDocumentStorage,
        SOPInstanceUID=uid.generate_uid(),
        Modality="KO",
    )
    with pytest.raises(NotAnImage, match="Key Object Selection"):
        decode_for_analysis(path)


def test_truncated_pixel_data_is_undecodable(tmp_path: Path) -> None:
    path = write_image(tmp_path / "short.dcm", ramp(64, 64, 0, 4095), bits_stored=12)
    _rewrite(path, PixelData=ramp(64, 64, 0, 4095).tobytes()[:-1000])
    with pytest.raises(UndecodablePixels, match="Explicit VR Little Endian"):
        decode_for_analysis(path)


def test_a_file_cut_short_inside_its_pixel_data_is_undecodable(tmp_path: Path) -> None:
    path = write_image(tmp_path / "cut.dcm", ramp(64, 64, 0, 4095), bits_stored=12)
    path.write_bytes(path.read_bytes()[:-3000])
    with pytest.raises(UndecodablePixels):
        decode_for_analysis(path)


def _jpeg_file(path: Path, payload: bytes, rows: int = 64, columns: int = 64) -> Path:
    dataset = Dataset()
    dataset.SOPClassUID = ULTRASOUND
    dataset.SOPInstanceUID = uid.generate_uid()
    dataset.Rows, dataset.Columns = rows, columns
    dataset.SamplesPerPixel, dataset.PhotometricInterpretation = 1, "MONOCHROME2"
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 8, 8, 7, 0
    dataset.PixelData = encapsulate([payload])
    dataset["PixelData"].VR = "OB"
    dataset["PixelData"].is_undefined_length = True
    return _save(path, dataset, uid.JPEGBaseline8Bit)


def test_a_jpeg_file_with_garbage_data_is_undecodable(tmp_path: Path) -> None:
    garbage = b"\xff\xd8" + np.random.default_rng(7).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    path = _jpeg_file(tmp_path / "garbage.dcm", garbage)
    with pytest.raises(UndecodablePixels, match="JPEG Baseline") as raised:
        decode_for_analysis(path)
    assert len(str(raised.value)) <= 120


def test_a_codestream_larger_than_its_header_says_is_refused_before_decoding(
    tmp_path: Path, no_decoding: None
) -> None:
    """A JPEG frame header claiming 60000 x 60000 in a 64 x 64 image: codecs would allocate it."""
    frame_header = b"\xff\xc0\x00\x0b\x08" + (60000).to_bytes(2, "big") * 2 + b"\x01\x01\x11\x00"
    path = _jpeg_file(tmp_path / "bomb.dcm", b"\xff\xd8" + frame_header + b"\xff\xd9")
    with pytest.raises(UndecodablePixels, match="60000 x 60000"):
        decode_for_analysis(path)


def test_absurd_sizes_are_refused_before_any_decoding(tmp_path: Path, no_decoding: None) -> None:
    path = write_image(tmp_path / "huge.dcm", np.zeros((4, 4), dtype=np.uint8))
    _rewrite(path, Rows=65535, Columns=65535, NumberOfFrames=10000)
    policies: list[decode.FramePolicy] = ["middle", "each"]
    for policy in policies:
        with pytest.raises(UnsupportedImage, match="too large"):
            decode_for_analysis(path, policy)
    with pytest.raises(UnsupportedImage, match="too large"):
        display_frame(path, 0)


def test_max_pixels_counts_the_selected_frames(seven_frames: Path) -> None:
    assert decode_for_analysis(seven_frames, "middle", max_pixels=80).frames
    with pytest.raises(UnsupportedImage):
        decode_for_analysis(seven_frames, "each", max_pixels=80 * 6)


@pytest.mark.parametrize(
    ("attributes", "error", "reason"),
    [
        ({"Rows": 0}, UnsupportedImage, "empty"),
        ({"NumberOfFrames": 0}, UnsupportedImage, "empty"),
        ({"SamplesPerPixel": 4}, UnsupportedImage, "samples"),
        ({"PhotometricInterpretation": "HSV"}, UnsupportedImage, "HSV"),
        ({"BitsAllocated": 12}, UndecodablePixels, "Bits Allocated"),
        ({"BitsAllocated": 16}, UndecodablePixels, "Explicit VR"),  # data is half as long as declared
        ({"Rows": 40}, UndecodablePixels, "Explicit VR"),  # Rows x Columns larger than the data
        ({"Columns": None}, UndecodablePixels, "missing Columns"),
        ({"PhotometricInterpretation": None}, UndecodablePixels, "Photometric"),
    ],
)
def test_inconsistent_pixel_attributes_give_the_right_error(
    tmp_path: Path, attributes: dict[str, Any], error: type[PixelError], reason: str
) -> None:
    path = write_image(tmp_path / "bad.dcm", ramp(20, 30, 0, 255, np.uint8))
    dataset = dcmread(path)
    for keyword, value in attributes.items():
        if value is None:
            del dataset[keyword]
        else:
            setattr(dataset, keyword, value)
    dataset.save_as(path, enforce_file_format=True)
    with pytest.raises(error, match=reason):
        decode_for_analysis(path)


# --- display ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "shape"),
    [
        (PYDICOM_DATA_DIR / "US1_UNCR.dcm", (480, 640, 3)),
        (PYDICOM_DATA_DIR / "OBXXXX1A.dcm", (600, 800, 3)),
        (PYDICOM_DATA_DIR / "RG1_UNCR.dcm", (1955, 1841)),
        (PYDICOM_DATA_DIR / "emri_small_jpeg_ls_lossless.dcm", (64, 64)),
    ],
    ids=lambda value: value.name if isinstance(value, Path) else None,
)
def test_display_frame_is_uint8_with_the_files_full_shape(path: Path, shape: tuple[int, ...]) -> None:
    shown = display_frame(path, 0)
    assert shown.dtype == np.uint8
    assert shown.shape == shape
    assert shown.max() > shown.min()


def test_the_analysed_frame_is_the_display_frame_cropped() -> None:
    """So a heatmap computed on the analysed pixels lands where ``crop`` says on the display."""
    path = PYDICOM_DATA_DIR / "RG3_UNCR.dcm"  # MONOCHROME1 with a window
    frame = only_frame(decode_for_analysis(path))
    top, left, bottom, right = frame.crop
    shown = display_frame(path, 0)[top:bottom, left:right]
    assert np.abs(shown.astype(float) - frame.pixels * 255).max() <= 0.5 + 1e-3


def test_display_frame_of_a_later_frame_and_beyond_the_last(seven_frames: Path) -> None:
    assert (display_frame(seven_frames, 6) == 140).all()
    with pytest.raises(UnsupportedImage, match="frame 7"):
        display_frame(seven_frames, 7)


def test_blank_border_box_never_returns_an_empty_box() -> None:
    assert blank_border_box(np.zeros((5, 7))) == (0, 0, 5, 7)
    image = np.zeros((5, 7))
    image[2, 3] = 1.0
    assert blank_border_box(image) == (2, 3, 3, 4)


# --- hostile input ----------------------------------------------------------------------------


def test_a_decoder_that_aborts_the_process_is_contained(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One byte of this JPEG changed makes python-gdcm 3.2.6 abort() the whole process."""
    data = bytearray((PYDICOM_TEST_DIR / "SC_rgb_dcmtk_+eb+cy+np.dcm").read_bytes())
    data[1697] = 11
    path = tmp_path / "aborts-gdcm.dcm"
    path.write_bytes(data)
    monkeypatch.setattr(decode, "_plugins", lambda transfer_syntax: ["gdcm"])
    with pytest.raises(UndecodablePixels, match="gdcm: decoder crashed"):
        decode_for_analysis(path)


def test_the_isolated_decoder_gives_the_same_pixels(monkeypatch: pytest.MonkeyPatch) -> None:
    path = PYDICOM_DATA_DIR / "US1_J2KR.dcm"
    expected = only_frame(decode_for_analysis(path))
    monkeypatch.setattr(decode, "_plugins", lambda transfer_syntax: ["gdcm"])
    np.testing.assert_array_equal(only_frame(decode_for_analysis(path)).pixels, expected.pixels)


FUZZ_CI_CASES = 25
FUZZ_CASES = int(os.environ.get("PRECEDENT_FUZZ_CASES", FUZZ_CI_CASES))
FUZZ_SEEDS = [
    PYDICOM_DATA_DIR / "OBXXXX1A.dcm",  # palette, ultrasound regions
    PYDICOM_DATA_DIR / "gdcm-US-ALOKA-16.dcm",  # segmented palette, implicit VR
    PYDICOM_DATA_DIR / "vlut_04.dcm",  # VOI LUT
    PYDICOM_DATA_DIR / "mlut_18.dcm",  # Modality LUT
    PYDICOM_TEST_DIR / "image_dfl.dcm",  # deflated
    PYDICOM_TEST_DIR / "MR_small_RLE.dcm",
    PYDICOM_DATA_DIR / "emri_small_jpeg_ls_lossless.dcm",  # multi-frame JPEG-LS
    PYDICOM_TEST_DIR / "MR_small_jp2klossless.dcm",
    PYDICOM_TEST_DIR / "SC_rgb_dcmtk_+eb+cy+np.dcm",  # JPEG baseline, YBR_FULL_422
]


def _mutant(original: bytes, rng: np.random.Generator) -> bytes:
    """A few bytes changed, mostly in the header where the decoder's decisions are made."""
    data = bytearray(original)
    for _ in range(int(rng.integers(1, 9))):
        head = rng.random() < 0.7
        position = int(rng.integers(0, min(len(data), 2048) if head else len(data)))
        data[position] = int(rng.integers(0, 256))
    if rng.random() < 0.2:
        data = data[: int(rng.integers(0, len(data)))]
    return bytes(data)


@pytest.mark.timeout(120 + 3 * FUZZ_CASES)
@pytest.mark.parametrize(
    "seed",
    [
        pytest.param(path, marks=[pytest.mark.fuzz_long] if FUZZ_CASES > FUZZ_CI_CASES else [])
        for path in FUZZ_SEEDS
    ],
    ids=_file_id,
)
def test_mutated_files_give_pixels_or_a_pixel_error(seed: Path, tmp_path: Path) -> None:
    """Never another exception, never a dead process. ``PRECEDENT_FUZZ_CASES=10000`` for the long pass."""
    rng = np.random.default_rng(zlib.crc32(seed.name.encode()))
    original = seed.read_bytes()
    escaped: list[str] = []
    for case in range(FUZZ_CASES):
        path = tmp_path / f"{case}.dcm"
        path.write_bytes(_mutant(original, rng))
        try:
            image = decode_for_analysis(path, "each" if case % 2 else "middle")
            display_frame(path, image.frames[0].index)
        except PixelError as error:
            assert str(error)
        except Exception as error:
            escaped.append(f"case {case}: {type(error).__name__}: {error}")
        path.unlink()
    assert not escaped
