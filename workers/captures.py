"""The Grad-CAM secondary capture: the heatmap in colour over the analysed frame, for any viewer.

A radiologist's viewer shows images, not heatmaps; so the heatmap goes back to the PACS burned
into a copy of the frame the model saw, as a Secondary Capture Image (highdicom ``SCImage``):

- same rows and columns as the source frame, RGB; the heatmap (resized bilinearly to the analysed
  crop) blended with a jet colour map over the crop only, the rest of the frame left as it was;
- burned in (Burned In Annotation YES): the explained label and its probability, "Grad-CAM,
  Precedent <architecture>", a colour scale (high at the top, low at the bottom) and, for a model
  not cleared for clinical use, "NOT FOR CLINICAL USE";
- the source's patient and study (copied verbatim, so the PACS files it beside the source), its own
  series per model, the source referenced in the Source Image Sequence (with the frame number for
  multi-frame sources), and the source's modality (see :func:`build_capture`).

The builder is pure: data in, dataset out, nothing read or written. UIDs come from
:mod:`workers.derived_uids` and every date and time from the input's ``made_at``, so the same
inputs give the same object byte for byte and a retried task never makes a duplicate in the PACS
(DESIGN.md, "work is idempotent"). :func:`write_png` writes the same picture for people and demos.
"""

from __future__ import annotations

import copy
import functools
import math
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import cv2
import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import UID

from workers import software_version
from workers.derived_uids import derived_uid

__all__ = [
    "DEFAULT_OPACITY",
    "MANUFACTURER",
    "NOT_FOR_CLINICAL_USE",
    "SERIES_NUMBER",
    "CaptureError",
    "CaptureInput",
    "Layout",
    "annotation_layout",
    "build_capture",
    "capture_uids",
    "heatmap_overlay",
    "jet",
    "overlay_image",
    "write_png",
]

MANUFACTURER = "Precedent"
#: Series Number of every Grad-CAM series (the Structured Reports use 9001): high enough to sort
#: after the modality's own series in a viewer's series list.
SERIES_NUMBER = 9002
#: How much of the colour map shows over the crop; enough to read the colours, little enough to
#: still see the lesion under them.
DEFAULT_OPACITY = 0.4
NOT_FOR_CLINICAL_USE = "NOT FOR CLINICAL USE"

# Font size in pixels: a fortieth of the frame's smaller side, never below what stays legible
# when a viewer magnifies a small image, never so large that the text hides the image.
_MIN_FONT = 10
_MAX_FONT = 48
_FONT_FRACTION = 1 / 40
_MIN_WORD_GAP = 4
_SCALE_FRACTION = 0.3  # of the rows: the colour scale's height
_WHITE = (255, 255, 255)
_BLACK = (0, 0, 0)
_YELLOW = (255, 220, 0)

_PRINTABLE_ASCII = re.compile(r"[ -~]+")
_CODE_STRING = re.compile(r"[A-Z0-9_ ]{1,16}")
_DERIVATION_MAX = 1024  # ST
_LOSSY_TRANSFER_SYNTAXES = frozenset(
    {
        "1.2.840.10008.1.2.4.50",  # JPEG Baseline
        "1.2.840.10008.1.2.4.51",  # JPEG Extended
        "1.2.840.10008.1.2.4.81",  # JPEG-LS near-lossless
        "1.2.840.10008.1.2.4.91",  # JPEG 2000
        "1.2.840.10008.1.2.4.93",  # JPEG 2000 Part 2 multi-component
        "1.2.840.10008.1.2.4.203",  # HTJ2K
        "1.2.840.10008.1.2.4.100",  # MPEG2 and later video syntaxes
        "1.2.840.10008.1.2.4.101",
        "1.2.840.10008.1.2.4.102",
        "1.2.840.10008.1.2.4.103",
        "1.2.840.10008.1.2.4.104",
        "1.2.840.10008.1.2.4.105",
        "1.2.840.10008.1.2.4.106",
        "1.2.840.10008.1.2.4.107",
        "1.2.840.10008.1.2.4.108",
    }
)

# Patient and study attributes copied verbatim from the source: a PACS files an object by them,
# and some PACS refuse or split an object whose patient data differs from the study's by a byte.
_PATIENT_STUDY = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "OtherPatientIDsSequence",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "IssuerOfAccessionNumberSequence",
    "StudyDescription",
)
_SOURCE_REQUIRED = ("StudyInstanceUID", "SOPInstanceUID", "SOPClassUID", "Rows", "Columns")

Box = tuple[int, int, int, int]
"""(top, left, bottom, right) in pixels; bottom and right exclusive."""
Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


class CaptureError(ValueError):
    """The inputs cannot make a truthful capture; the message says which input and why."""


@dataclass(frozen=True, eq=False)
class CaptureInput:
    """One analysed image's Grad-CAM, with everything burned into or written on its capture.

    ``source`` is the analysed image's header (pixels not needed); ``frame`` its frame
    ``frame_index`` (0-based) as :func:`workers.decode.display_frame` returns it; ``heatmap`` the
    Grad-CAM map over ``crop`` (:func:`workers.analysis.decode_heatmap`), values in [0, 1];
    ``label`` the class whose evidence the heatmap shows and ``probability`` the model's
    probability of it; ``made_at`` dates the object (never the clock). Construction refuses
    inconsistent inputs with a :class:`CaptureError`, so an instance can always be drawn.
    """

    source: Dataset
    frame: np.ndarray
    frame_index: int
    heatmap: np.ndarray
    crop: Box
    label: str
    probability: float
    model_id: str
    architecture: str
    clinical_use: bool
    made_at: datetime

    def __post_init__(self) -> None:
        _check_source(self.source, self.frame_index)
        _check_frame(self.frame, self.source)
        _check_heatmap(self.heatmap)
        _check_crop(self.crop, self.frame.shape[:2])
        _check_text("label", self.label)
        _check_text("architecture", self.architecture)
        _check_text("model id", self.model_id)
        if not (math.isfinite(self.probability) and 0.0 <= self.probability <= 1.0):
            raise CaptureError(f"probability must be in [0, 1], got {self.probability!r}")


@dataclass(frozen=True)
class Layout:
    """Where the annotations are burned in; boxes are (top, left, bottom, right), exclusive.

    ``caption`` (label and probability, then what made the heatmap) sits at the top left,
    ``scale_bar`` (the colour map from high at its top row to low at its bottom row; the box is
    its interior, without the frame drawn around it) at the top right, and ``warning`` ("NOT FOR
    CLINICAL USE", empty for clinical models) at the bottom left. No two overlap.
    """

    font_size: int
    line_height: int
    padding: int
    caption: tuple[str, ...]
    caption_box: Box
    scale_bar: Box
    high_box: Box
    low_box: Box
    warning: tuple[str, ...]
    warning_box: Box | None


# --- UIDs -------------------------------------------------------------------------------------------


def capture_uids(study_uid: str, source_sop_uid: str, model_id: str, frame_index: int) -> tuple[str, str]:
    """(Series Instance UID, SOP Instance UID) of the capture of one source frame by one model:
    one series per model and study, one instance per analysed frame, the same on every rerun."""
    return (
        derived_uid("gradcam-series", study_uid, model_id),
        derived_uid("gradcam", source_sop_uid, model_id, str(frame_index)),
    )


# --- The picture ------------------------------------------------------------------------------------


def jet(values: np.ndarray) -> np.ndarray:
    """The colour map for ``values`` in [0, 1], any shape: uint8 RGB (a last axis of 3), blue (low)
    through red (high).

    One function for the heatmap and the scale bar, so the legend shows the colours used."""
    levels = np.rint(np.clip(values, 0.0, 1.0) * 255.0).astype(np.uint8)
    bgr = cv2.applyColorMap(levels.reshape(-1, 1), cv2.COLORMAP_JET)
    return np.ascontiguousarray(bgr[..., ::-1]).reshape(*levels.shape, 3)


def heatmap_overlay(capture: CaptureInput, opacity: float = DEFAULT_OPACITY) -> np.ndarray:
    """The frame as RGB uint8 with the heatmap blended over the crop; outside the crop every pixel
    is the frame's own (gray stays gray). No annotations: see :func:`overlay_image`."""
    if not (math.isfinite(opacity) and 0.0 <= opacity <= 1.0):
        raise CaptureError(f"opacity must be in [0, 1], got {opacity!r}")
    image = _rgb(capture.frame)
    top, left, bottom, right = capture.crop
    heat = cv2.resize(
        np.asarray(capture.heatmap, dtype=np.float32),
        (right - left, bottom - top),
        interpolation=cv2.INTER_LINEAR,
    )
    region = image[top:bottom, left:right].astype(np.float32)
    blended = (1.0 - opacity) * region + opacity * jet(heat).astype(np.float32)
    image[top:bottom, left:right] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    return image


def overlay_image(capture: CaptureInput, opacity: float = DEFAULT_OPACITY) -> np.ndarray:
    """The capture's pixels: :func:`heatmap_overlay` with the annotations of
    :func:`annotation_layout` burned in; RGB uint8, the frame's rows and columns."""
    image = Image.fromarray(heatmap_overlay(capture, opacity))
    layout = annotation_layout(capture)
    draw = ImageDraw.Draw(image)
    _draw_lines(draw, layout, layout.caption_box, layout.caption, _WHITE)
    _draw_lines(draw, layout, layout.high_box, ("high",), _WHITE)
    _draw_lines(draw, layout, layout.low_box, ("low",), _WHITE)
    if layout.warning_box is not None:
        _draw_lines(draw, layout, layout.warning_box, layout.warning, _YELLOW)
    top, left, bottom, right = layout.scale_bar
    draw.rectangle((left - 1, top - 1, right, bottom), outline=_WHITE)
    pixels = np.array(image)
    pixels[top:bottom, left:right] = _scale_colours(bottom - top, right - left)
    return pixels


def annotation_layout(capture: CaptureInput) -> Layout:
    """Where :func:`overlay_image` puts its text and scale, at the largest legible font size that
    fits; raises :class:`CaptureError` when the frame is too small for legible annotations."""
    rows, columns = capture.frame.shape[:2]
    preferred = min(_MAX_FONT, max(_MIN_FONT, round(min(rows, columns) * _FONT_FRACTION)))
    for size in range(preferred, _MIN_FONT - 1, -1):
        layout = _layout(capture, rows, columns, size)
        if layout is not None:
            return layout
    raise CaptureError(
        f"a {rows} x {columns} frame is too small for legible burned-in annotations "
        f"(font {_MIN_FONT} px: label, scale and warning do not fit)"
    )


def write_png(overlay: np.ndarray, path: Path) -> None:
    """Write an :func:`overlay_image` result as a PNG (for people and demos), atomically: a reader
    never sees half a file, and a crash leaves the old file or none."""
    if overlay.dtype != np.uint8 or overlay.ndim != 3 or overlay.shape[2] != 3:
        raise CaptureError(f"a PNG overlay must be RGB uint8 (H, W, 3), got {overlay.dtype} {overlay.shape}")
    partial = path.with_name(f".{path.name}.partial")
    Image.fromarray(overlay).save(partial, format="PNG")
    partial.replace(path)


def _rgb(frame: np.ndarray) -> np.ndarray:
    return np.repeat(frame[:, :, None], 3, axis=2) if frame.ndim == 2 else frame.copy()


def _scale_colours(height: int, width: int) -> np.ndarray:
    """The scale bar's pixels: 1.0 in the top row down to 0.0 in the bottom row."""
    values = np.linspace(1.0, 0.0, height, dtype=np.float32)[:, None]
    return np.repeat(jet(values), width, axis=1)


# --- Layout -----------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _font(size: int) -> Font:
    """Pillow's own font (no font file to ship or find), scaled where FreeType is available."""
    return ImageFont.load_default(size=size)


def _word_gap(font: Font) -> int:
    """The space between words: the font's own, but never the 2 pixels its hinting leaves at small
    sizes, which run "NOT FOR CLINICAL" together."""
    return max(_MIN_WORD_GAP, math.ceil(font.getlength(" ")))


def _text_width(font: Font, text: str) -> int:
    words = text.split(" ")
    return sum(math.ceil(font.getlength(word)) for word in words) + _word_gap(font) * (len(words) - 1)


def _layout(capture: CaptureInput, rows: int, columns: int, size: int) -> Layout | None:
    """The layout at font ``size``, or None when it does not fit the frame."""
    font = _font(size)
    margin = max(2, size // 3)
    pad = max(1, size // 5)
    line = math.ceil(font.getbbox("Ag")[3]) + pad
    bar_width = max(6, size)
    column_width = max(bar_width, _text_width(font, "high"), _text_width(font, "low")) + 2 * pad
    scale_left = columns - margin - column_width
    bar_height = max(3 * size, round(rows * _SCALE_FRACTION))

    high_box = (margin, scale_left, margin + line + pad, columns - margin)
    bar_top = high_box[2] + 2
    bar_left = columns - margin - pad - bar_width
    scale_bar = (bar_top, bar_left, bar_top + bar_height, bar_left + bar_width)
    low_box = (scale_bar[2] + 2, scale_left, scale_bar[2] + 2 + line + pad, columns - margin)

    caption_width = scale_left - 2 * margin - 2 * pad
    caption = _wrapped(
        font,
        caption_width,
        f"{capture.label} {capture.probability:.2f}",
        f"Grad-CAM, Precedent {capture.architecture}",
    )
    caption_box = _text_box(font, margin, margin, caption, line, pad)

    warning: tuple[str, ...] = ()
    warning_box = None
    if not capture.clinical_use:
        warning = _wrapped(font, columns - 2 * margin - 2 * pad, NOT_FOR_CLINICAL_USE)
        height = len(warning) * line + pad
        warning_box = _text_box(font, rows - margin - height, margin, warning, line, pad)

    floor = warning_box[0] if warning_box is not None else rows - margin
    fits = (
        caption_width > 0
        and scale_left >= margin
        and max(caption_box[2], low_box[2]) <= floor
        and caption_box[3] <= scale_left - margin
        and (warning_box is None or warning_box[3] <= columns - margin)
    )
    if not fits:
        return None
    return Layout(size, line, pad, caption, caption_box, scale_bar, high_box, low_box, warning, warning_box)


def _text_box(font: Font, top: int, left: int, lines: tuple[str, ...], line: int, pad: int) -> Box:
    width = max(_text_width(font, text) for text in lines)
    return (top, left, top + len(lines) * line + pad, left + width + 2 * pad)


def _wrapped(font: Font, width: int, *paragraphs: str) -> tuple[str, ...]:
    """Each paragraph on as many lines as ``width`` needs, breaking between words, and inside a
    word only when the word alone is wider than the line."""
    lines: list[str] = []
    for paragraph in paragraphs:
        current = ""
        for word in paragraph.split():
            candidate = f"{current} {word}" if current else word
            if _text_width(font, candidate) <= width:
                current = candidate
                continue
            if current:
                lines.append(current)
            current = word
            while len(current) > 1 and _text_width(font, current) > width:
                cut = _longest_prefix(font, current, width)
                lines.append(current[:cut])
                current = current[cut:]
        if current:
            lines.append(current)
    return tuple(lines)


def _longest_prefix(font: Font, word: str, width: int) -> int:
    cut = len(word) - 1
    while cut > 1 and _text_width(font, word[:cut]) > width:
        cut -= 1
    return cut


def _draw_lines(
    draw: ImageDraw.ImageDraw, layout: Layout, box: Box, lines: tuple[str, ...], colour: tuple[int, int, int]
) -> None:
    """Text on an opaque black box: legible over any image, bright or dark."""
    top, left, bottom, right = box
    draw.rectangle((left, top, right - 1, bottom - 1), fill=_BLACK)
    font, pad = _font(layout.font_size), layout.padding
    for number, text in enumerate(lines):
        x, y = left + pad, top + pad + number * layout.line_height
        for word in text.split(" "):
            draw.text((x, y), word, font=font, fill=colour)
            x += math.ceil(font.getlength(word)) + _word_gap(font)


# --- The DICOM object -------------------------------------------------------------------------------


def build_capture(capture: CaptureInput, opacity: float = DEFAULT_OPACITY) -> hd.sc.SCImage:
    """The Grad-CAM Secondary Capture Image of ``capture``: pixels of :func:`overlay_image`.

    Modality is the source's (US, MG, ...), "OT" only when the source has none: the SC Equipment
    Module's Modality ("source equipment for the image") overrides the General Series one, and
    the source's keeps the capture in the worklists, study lists (Modalities in Study) and
    hanging protocols where the radiologist reads the source. Conversion Type is WSD
    (workstation). Patient and study attributes are the source's, byte for byte.
    """
    source = capture.source
    series_uid, sop_uid = capture_uids(
        str(source.StudyInstanceUID), str(source.SOPInstanceUID), capture.model_id, capture.frame_index
    )
    made_at = capture.made_at
    sc = hd.sc.SCImage(
        pixel_array=overlay_image(capture, opacity),
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        # A placeholder highdicom insists on; replaced by the source's own value just below.
        patient_orientation=("L", "F"),
        study_instance_uid=str(source.StudyInstanceUID),
        series_instance_uid=series_uid,
        series_number=SERIES_NUMBER,
        sop_instance_uid=sop_uid,
        instance_number=_instance_number(source),
        manufacturer=MANUFACTURER,
        manufacturer_model_name=capture.architecture[:64],
        software_versions=software_version(),
        series_description=_series_description(capture),
        content_date=made_at.date(),
        content_time=made_at.time(),
        series_date=made_at.date(),
        series_time=made_at.time(),
        contributing_equipment=_acquisition_equipment(source),
    )
    _copy_source_attributes(sc, source)
    sc.Modality = _modality(source)
    sc.ConversionType = "WSD"
    sc.BurnedInAnnotation = "YES"
    sc.DerivationDescription = _derivation_description(capture, opacity)
    sc.DerivationCodeSequence = [hd.sr.CodedConcept.from_code(codes.DCM.GradientWeightedClassActivation)]
    sc.SourceImageSequence = [_source_reference(capture)]
    _copy_lossy_compression(sc, source)
    _stamp(sc, made_at)
    return sc


def _instance_number(source: Dataset) -> int:
    """The source's Instance Number, so captures sort like their sources; 1 where it has none."""
    try:
        number = int(source.get("InstanceNumber") or 1)
    except (TypeError, ValueError):
        return 1
    return number if number >= 1 else 1


def _modality(source: Dataset) -> str:
    modality = str(source.get("Modality") or "")
    return modality if _CODE_STRING.fullmatch(modality) else "OT"


def _series_description(capture: CaptureInput) -> str:
    """Named like the Structured Report's series, with the same warning for research models."""
    suffix = "" if capture.clinical_use else " - NOT FOR CLINICAL USE"
    return f"Grad-CAM {capture.architecture}{suffix}"[:64]


def _acquisition_equipment(source: Dataset) -> list[hd.ContributingEquipment]:
    """The source's acquisition equipment, where its header names one, as highdicom's own
    ``from_ref_dataset`` would list it."""
    try:
        return [hd.ContributingEquipment.for_image_acquisition(source)]
    except (AttributeError, ValueError, TypeError, KeyError):
        return []


def _copy_source_attributes(sc: Dataset, source: Dataset) -> None:
    """Patient, study, orientation and laterality as the source has them (same pixel geometry,
    same body side), with the source's character set so its names decode the same."""
    for keyword in ("SpecificCharacterSet", *_PATIENT_STUDY):
        if keyword in source:
            sc[keyword] = copy.deepcopy(source[keyword])
    sc.PatientOrientation = copy.deepcopy(source.get("PatientOrientation"))
    laterality = source.get("Laterality") or source.get("ImageLaterality")
    # Type 2C: a breast is a paired structure, so the element is always sent, empty when the
    # source does not say which side (as a modality that does not know sends it).
    sc.Laterality = laterality if laterality in ("L", "R") else None
    if source.get("BodyPartExamined"):
        sc.BodyPartExamined = source.BodyPartExamined


def _source_reference(capture: CaptureInput) -> Dataset:
    source = capture.source
    item = Dataset()
    item.ReferencedSOPClassUID = UID(str(source.SOPClassUID))
    item.ReferencedSOPInstanceUID = UID(str(source.SOPInstanceUID))
    if "NumberOfFrames" in source:
        item.ReferencedFrameNumber = capture.frame_index + 1
    item.PurposeOfReferenceCodeSequence = [
        hd.sr.CodedConcept.from_code(codes.DCM.SourceImageForImageProcessingOperation)
    ]
    return item


def _derivation_description(capture: CaptureInput, opacity: float) -> str:
    top, left, bottom, right = capture.crop
    text = (
        f"Grad-CAM heatmap of class {capture.label} (probability {capture.probability:.2f}) by Precedent "
        f"model {capture.architecture} {capture.model_id}, blended with a jet colour map at opacity "
        f"{opacity:.2f} over rows {top}-{bottom - 1}, columns {left}-{right - 1} of frame "
        f"{capture.frame_index + 1} of the source image; label, probability and colour scale burned in."
    )
    if not capture.clinical_use:
        text += " Not for clinical use."
    return text[:_DERIVATION_MAX]


def _copy_lossy_compression(sc: Dataset, source: Dataset) -> None:
    """A derived image of a lossily compressed source stays flagged as lossy (PS3.3 C.7.6.1.1.5)."""
    transfer_syntax = str(getattr(getattr(source, "file_meta", None), "TransferSyntaxUID", "") or "")
    if source.get("LossyImageCompression") != "01" and transfer_syntax not in _LOSSY_TRANSFER_SYNTAXES:
        return
    sc.LossyImageCompression = "01"
    for keyword in ("LossyImageCompressionRatio", "LossyImageCompressionMethod"):
        if keyword in source:
            sc[keyword] = copy.deepcopy(source[keyword])


def _stamp(sc: Dataset, made_at: datetime) -> None:
    """Replace the clock readings highdicom takes by ``made_at``, so reruns are identical."""
    date, time = made_at.strftime("%Y%m%d"), made_at.strftime("%H%M%S.%f")
    sc.InstanceCreationDate, sc.InstanceCreationTime = date, time
    sc.DateOfSecondaryCapture, sc.TimeOfSecondaryCapture = date, time
    acquisition = codes.DCM.AcquisitionEquipment.value
    for item in sc.get("ContributingEquipmentSequence", []):
        purpose = item.get("PurposeOfReferenceCodeSequence") or [Dataset()]
        if purpose[0].get("CodeValue") != acquisition:
            item.ContributionDateTime = made_at.strftime("%Y%m%d%H%M%S.%f")


# --- Checks -----------------------------------------------------------------------------------------


def _check_source(source: Dataset, frame_index: int) -> None:
    missing = [keyword for keyword in _SOURCE_REQUIRED if not source.get(keyword)]
    if missing:
        raise CaptureError(f"source header lacks {', '.join(missing)}")
    frames = _number_of_frames(source)
    if not 0 <= frame_index < frames:
        raise CaptureError(
            f"frame index {frame_index} outside source {source.SOPInstanceUID}, which has {frames} frame(s)"
        )


def _number_of_frames(source: Dataset) -> int:
    try:
        return int(source.get("NumberOfFrames") or 1)
    except (TypeError, ValueError) as error:
        raise CaptureError(
            f"source Number of Frames {source.get('NumberOfFrames')!r} is not a number"
        ) from error


def _check_frame(frame: np.ndarray, source: Dataset) -> None:
    if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8:
        kind = frame.dtype if isinstance(frame, np.ndarray) else type(frame).__name__
        raise CaptureError(f"frame must be uint8 as display_frame returns it, got {kind}")
    if not (frame.ndim == 2 or (frame.ndim == 3 and frame.shape[2] == 3)):
        raise CaptureError(f"frame must be (rows, columns) gray or (rows, columns, 3) RGB, got {frame.shape}")
    expected = (int(source.Rows), int(source.Columns))
    if frame.shape[:2] != expected:
        raise CaptureError(
            f"frame is {frame.shape[0]} x {frame.shape[1]}, the source {expected[0]} x {expected[1]}"
        )


def _check_heatmap(heatmap: np.ndarray) -> None:
    if not isinstance(heatmap, np.ndarray) or heatmap.ndim != 2 or heatmap.size == 0:
        shape = heatmap.shape if isinstance(heatmap, np.ndarray) else type(heatmap).__name__
        raise CaptureError(f"heatmap must be a non-empty 2-D array, got {shape}")
    if not np.issubdtype(heatmap.dtype, np.floating):
        raise CaptureError(f"heatmap must be floating point in [0, 1], got {heatmap.dtype}")
    if not np.isfinite(heatmap).all():
        raise CaptureError(
            f"heatmap has {int(np.count_nonzero(~np.isfinite(heatmap)))} NaN or infinite value(s)"
        )
    low, high = float(heatmap.min()), float(heatmap.max())
    if low < 0.0 or high > 1.0:
        raise CaptureError(f"heatmap values must be in [0, 1], got [{low:.3g}, {high:.3g}]")


def _check_crop(crop: Box, shape: tuple[int, ...]) -> None:
    rows, columns = shape
    if len(crop) != 4 or not all(isinstance(v, int | np.integer) for v in crop):
        raise CaptureError(f"crop must be four integers (top, left, bottom, right), got {crop!r}")
    top, left, bottom, right = (int(v) for v in crop)
    if not (0 <= top < bottom <= rows and 0 <= left < right <= columns):
        raise CaptureError(
            f"crop {crop} (top, left, bottom, right) is not inside the {rows} x {columns} frame"
        )


def _check_text(name: str, value: str) -> None:
    """Printable ASCII: the default font draws it and every DICOM character set encodes it."""
    if not isinstance(value, str) or not _PRINTABLE_ASCII.fullmatch(value) or not value.strip():
        raise CaptureError(f"{name} must be non-empty printable ASCII, got {value!r}")
