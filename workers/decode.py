"""Pixels from any stored DICOM file, as the models and the viewer need them.

The analysis pipeline is ``decode_for_analysis`` → :func:`workers.preprocess.preprocess` →
model, the same for training and serving. This module owns everything that depends on the
DICOM encoding: the transfer syntax (pylibjpeg first, then pydicom's other plugins, with
python-gdcm last and in a child process), the photometric interpretation (MONOCHROME1 / MONOCHROME2,
RGB, YBR_*, PALETTE COLOR), the Modality LUT and the VOI LUT or window, multi-frame
selection and the cropping of ultrasound regions and blank borders. What leaves it is a
plain grayscale float image in [0, 1], so nothing downstream needs to know about DICOM.

Stored files are hostile input as far as this module is concerned: every way a file can be
unusable ends in a :class:`PixelError` whose text is a short, PHI-free reason for the
operator, and image sizes are checked against a limit before any pixel is allocated.
"""

from __future__ import annotations

import logging
import os
import signal
import struct
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
from pydicom import dcmread
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.encaps import get_frame
from pydicom.filereader import read_file_meta_info
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.processing import apply_color_lut, apply_modality_lut, apply_voi
from pydicom.pixels.utils import pixel_array
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

logger = logging.getLogger(__name__)

FramePolicy = Literal["middle", "each", "most_suspicious"]

DEFAULT_MAX_PIXELS = 100_000_000
BLANK_THRESHOLD = 0.02
"""Rows and columns whose every value is below this (on the [0, 1] scale) count as blank
border: ultrasound frames are padded with black, as the BUSI images were before cropping."""

ROBUST_PERCENTILES = (0.5, 99.5)
"""Without a window, the output range spans these percentiles of the frame, not its
minimum and maximum: a few extreme pixels (burned-in annotations at full scale, dead
detector elements, CT padding at -2000) would otherwise squeeze all tissue into a few grey
levels."""

PREFERRED_PLUGINS = ("pylibjpeg", "pyjpegls", "pillow", "pydicom", "gdcm")
"""Decoding plugins in the order tried; any other installed pydicom plugin follows. pylibjpeg
(openjpeg, libjpeg) decodes every JPEG, JPEG-LS and JPEG 2000 file we know of; python-gdcm
is the last resort because it runs in a child process (see ISOLATED_PLUGINS)."""

ISOLATED_PLUGINS = frozenset({"gdcm"})
"""Plugins run in a child process: python-gdcm 3.2.6 aborts the whole process (an uncaught
C++ gdcm::Exception, SIGABRT) on some corrupt JPEG baseline streams, found by fuzzing. In a
child that costs one short-lived process instead of the worker."""

ISOLATED_TIMEOUT_S = 60

_MAX_REASON = 120
_ROOT = str(Path(__file__).resolve().parent.parent)  # where the child finds this package
_CHILD_ERROR = "precedent-decode-error: "
_PERCENTILE_SAMPLES = 1_000_000
_DEFER_SIZE = "1 MB"
_WHOLE_READ_LIMIT = 256 * 2**20  # bytes: the in-memory fallback is for small oddly encoded files
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601
_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT")
"""Colour spaces that reach us as RGB: pydicom converts YBR_FULL(_422) itself and the JPEG 2000
codecs undo the ICT / RCT transform."""
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_LUT_KEYWORDS = (
    "PhotometricInterpretation",
    "BitsAllocated",
    "BitsStored",
    "PixelRepresentation",
    "RescaleSlope",
    "RescaleIntercept",
    "ModalityLUTSequence",
    "WindowCenter",
    "WindowWidth",
    "VOILUTFunction",
    "VOILUTSequence",
    "PixelPresentation",
    *(
        f"{kind}{colour}PaletteColorLookupTable{part}"
        for kind, part in (("", "Descriptor"), ("", "Data"), ("Segmented", "Data"))
        for colour in ("Red", "Green", "Blue")
    ),
)
_FUNCTIONAL_GROUP_MACROS = ("PixelValueTransformationSequence", "FrameVOILUTSequence")
_LUT_ERRORS = (ValueError, TypeError, AttributeError, KeyError, IndexError, NotImplementedError, struct.error)
"""What pydicom's LUT functions raise on malformed descriptors and tables."""
_HEADER_KEYWORDS = (
    *_LUT_KEYWORDS,
    "SOPClassUID",
    "SOPInstanceUID",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "SamplesPerPixel",
    "SequenceOfUltrasoundRegions",
    "SharedFunctionalGroupsSequence",
    "PerFrameFunctionalGroupsSequence",
    "ExtendedOffsetTable",
    "ExtendedOffsetTableLengths",
)
"""Every attribute decoding reads, converted from its raw bytes while the file is read."""
_MISSING_FILE = (FileNotFoundError, IsADirectoryError, PermissionError)

Box = tuple[int, int, int, int]


class PixelError(Exception):
    """A file's pixels cannot be analysed; ``str(exc)`` is a short reason for the operator.

    The reason names attributes, transfer syntaxes and decoders, never patient data, and is
    cut to about 120 characters so it fits a status comment or a log line.
    """

    def __init__(self, reason: str) -> None:
        text = " ".join(reason.split()) or type(self).__name__
        if len(text) > _MAX_REASON:
            text = text[: _MAX_REASON - 1] + "…"
        super().__init__(text)


class NotAnImage(PixelError):
    """No Pixel Data (SR, PR, KO, ...): nothing to analyse, which is not a failure."""


class UndecodablePixels(PixelError):
    """Pixel data is present but no decoder can decode it, or it is truncated or corrupt."""


class UnsupportedImage(PixelError):
    """The pixels are decodable but not something we analyse (empty, too large, odd layout)."""


@dataclass(frozen=True)
class Frame:
    """One analysed frame: grayscale in [0, 1] after all display transforms and cropping."""

    index: int
    pixels: np.ndarray
    crop: Box
    """(top, left, bottom, right) of ``pixels`` in the full frame; bottom and right exclusive,
    so a heatmap computed on ``pixels`` can be placed back onto :func:`display_frame`."""


@dataclass(frozen=True)
class DecodedImage:
    """The frames of one file selected for analysis, with the file's own geometry."""

    rows: int
    columns: int
    number_of_frames: int
    frames: list[Frame]


@dataclass(frozen=True)
class _Geometry:
    """The Image Pixel attributes, checked once so later code can trust them."""

    rows: int
    columns: int
    frames: int
    samples: int
    photometric: str
    bits_stored: int
    signed: bool

    @property
    def frame_pixels(self) -> int:
        return self.rows * self.columns * self.samples


@dataclass
class _Source:
    """A readable image file: its header, where to decode from, and its geometry.

    ``pixels_from`` is the path (pydicom then reads only the requested frame from disk) or,
    for deflated files and files without file meta, the fully read data set.
    """

    path: Path
    header: Dataset
    pixels_from: Path | Dataset
    transfer_syntax: UID
    geometry: _Geometry
    max_pixels: int
    _whole: Dataset | None = None

    @property
    def uid(self) -> str:
        return str(self.header.get("SOPInstanceUID", "?"))

    def pixel_sources(self) -> Iterator[Path | Dataset]:
        """Where to decode from: the usual place, then the whole data set read into memory.

        Reading pixels from a path needs the data set encoded exactly as its transfer syntax
        says; pydicom's full reader also copes with files that are not (implicit VR under an
        explicit VR syntax, seen in real files), so it is the fallback, read once.
        """
        yield self.pixels_from
        if isinstance(self.pixels_from, Path) and self.path.stat().st_size <= _WHOLE_READ_LIMIT:
            if self._whole is None:
                self._whole = _read_dataset(self.path, defer_size=None)
            yield self._whole


def decode_for_analysis(
    path: Path,
    policy: FramePolicy = "middle",
    max_frames: int = 32,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> DecodedImage:
    """The frames of ``path`` that the model should see, each grayscale in [0, 1] and cropped.

    ``policy`` "middle" takes the middle frame (index n // 2); "each" and "most_suspicious"
    take every frame, at most ``max_frames`` of them evenly spaced including the first and
    the last (the caller picks the most suspicious one after inference). Only the selected
    frames are decoded, and ``max_pixels`` bounds rows x columns x samples x selected frames
    before any of them is.

    Raises :class:`NotAnImage`, :class:`UndecodablePixels` or :class:`UnsupportedImage`.
    """
    if policy not in get_args(FramePolicy):
        raise ValueError(f"unknown frame policy {policy!r}; expected one of {get_args(FramePolicy)}")
    if max_frames < 1:
        raise ValueError(f"max_frames must be at least 1, not {max_frames}")
    source = _open(path, max_pixels)
    geometry = source.geometry
    indices = select_frames(geometry.frames, policy, max_frames)
    _check_size(geometry, len(indices), max_pixels)
    frames = [_analysis_frame(source, index) for index in indices]
    logger.debug("decoded frames %s of %s (%s)", indices, source.uid, source.transfer_syntax.name)
    return DecodedImage(geometry.rows, geometry.columns, geometry.frames, frames)


def display_frame(path: Path, index: int) -> np.ndarray:
    """Frame ``index`` as a viewer would show it: uint8, (H, W) gray or (H, W, 3) RGB.

    The full frame, uncropped, with the Modality and VOI LUT or window applied and
    MONOCHROME1 inverted, so that a heatmap burnt over it looks like the image the
    radiologist knows. Raises the same :class:`PixelError` subclasses as
    :func:`decode_for_analysis`, and :class:`UnsupportedImage` for an index outside the file.
    """
    source = _open(path, DEFAULT_MAX_PIXELS)
    if not 0 <= index < source.geometry.frames:
        raise UnsupportedImage(f"frame {index} requested but the file has {source.geometry.frames}")
    _check_size(source.geometry, 1, DEFAULT_MAX_PIXELS)
    rendered = _rendered(source, index)
    return np.asarray(np.rint(rendered * 255.0), dtype=np.uint8)


def select_frames(number_of_frames: int, policy: FramePolicy, max_frames: int) -> list[int]:
    """The 0-based frame indices that ``policy`` analyses in a file of that many frames."""
    if policy == "middle":
        return [number_of_frames // 2]
    count = min(number_of_frames, max_frames)
    # With count <= number_of_frames the spacing is at least 1, so rounding keeps them distinct.
    return [int(i) for i in np.rint(np.linspace(0, number_of_frames - 1, num=count))]


def blank_border_box(pixels: np.ndarray, threshold: float = BLANK_THRESHOLD) -> Box:
    """The box left after trimming outer rows and columns whose values are all below ``threshold``.

    Never empty: an image that is blank everywhere keeps its full extent, because cropping to
    nothing would only move the failure somewhere less clear.
    """
    rows, columns = pixels.shape[:2]
    bright = np.asarray(pixels >= threshold)
    if bright.ndim == 3:
        bright = np.asarray(bright.any(axis=2))
    occupied_rows = np.flatnonzero(bright.any(axis=1))
    occupied_columns = np.flatnonzero(bright.any(axis=0))
    if occupied_rows.size == 0:
        return (0, 0, rows, columns)
    return (
        int(occupied_rows[0]),
        int(occupied_columns[0]),
        int(occupied_rows[-1]) + 1,
        int(occupied_columns[-1]) + 1,
    )


# --- reading the header ---------------------------------------------------------------------


def _open(path: Path, max_pixels: int) -> _Source:
    """Read the header, refuse non-images, and check the image attributes."""
    header, in_memory = _read_header(path)
    _require_pixel_data(header)
    value = header.file_meta.TransferSyntaxUID
    if not isinstance(value, str):
        raise UndecodablePixels("invalid Transfer Syntax UID")
    transfer_syntax = UID(value)
    geometry = _geometry(header)
    return _Source(path, header, header if in_memory else path, transfer_syntax, geometry, max_pixels)


def _read_header(path: Path) -> tuple[Dataset, bool]:
    """The data set with its Pixel Data left on disk, and whether it had to be read whole.

    Deflated files cannot be read by offset, and files without file meta give pydicom no
    transfer syntax for reading pixels from a path; both are decoded from the data set read
    into memory. Everything else is decoded from the path, one frame at a time.
    """
    transfer_syntax = _file_transfer_syntax(path)
    in_memory = not transfer_syntax or transfer_syntax == DeflatedExplicitVRLittleEndian
    header = _read_dataset(path, defer_size=None if in_memory else _DEFER_SIZE)
    if not header.file_meta.get("TransferSyntaxUID"):
        _guess_transfer_syntax(header)
    return header, in_memory


def _file_transfer_syntax(path: Path) -> str | None:
    """The Transfer Syntax UID of the file meta; None for files without it (or the DICM prefix)."""
    try:
        value = read_file_meta_info(path).get("TransferSyntaxUID")
    except _MISSING_FILE:
        raise
    except Exception:  # the parser boundary: no usable file meta; dcmread(force=True) may still cope
        return None
    return str(value) if value else None


def _read_dataset(path: Path, defer_size: str | None) -> FileDataset:
    """The whole data set, values over ``defer_size`` left on disk until used.

    Broad exceptions are caught here, at the parser boundary: pydicom raises many types on
    corrupt files, OSError included. A missing or unreadable file is the caller's business.
    """
    try:
        dataset = dcmread(path, defer_size=defer_size, force=True)
        _materialise(dataset)
    except _MISSING_FILE:
        raise
    except Exception as exc:  # parser boundary, see above
        logger.warning("unreadable DICOM data set: %r", exc)
        raise UndecodablePixels(f"unreadable DICOM file: {exc}") from exc
    return dataset


def _materialise(dataset: FileDataset) -> None:
    """Convert now every element that decoding reads, so that a corrupt one fails here.

    pydicom converts an element from its raw bytes on first access, and a bad value raises
    then (NotImplementedError for an unknown VR, OSError for a broken sequence, ...), wherever
    that access happens to be; here it is inside the parser boundary.
    """
    for _ in dataset.file_meta:
        pass
    for keyword in _HEADER_KEYWORDS:
        if keyword in dataset:
            _convert(dataset[keyword])


def _convert(element: DataElement) -> None:
    if element.VR == "SQ":
        for item in element.value:
            for child in item:
                _convert(child)


def _guess_transfer_syntax(header: Dataset) -> None:
    """Give a file without file meta the transfer syntax pydicom read its data set with."""
    element = header.get_item("PixelData", keep_deferred=True)
    if isinstance(element, RawDataElement):
        encapsulated = element.length == 0xFFFFFFFF
    else:
        encapsulated = element is not None and element.is_undefined_length
    if encapsulated:
        raise UndecodablePixels("encapsulated Pixel Data but no Transfer Syntax UID")
    implicit, little_endian = header.original_encoding[:2]
    if implicit:
        transfer_syntax = ImplicitVRLittleEndian
    else:
        transfer_syntax = ExplicitVRLittleEndian if little_endian else ExplicitVRBigEndian
    header.file_meta = getattr(header, "file_meta", None) or FileMetaDataset()
    header.file_meta.TransferSyntaxUID = transfer_syntax


def _require_pixel_data(header: Dataset) -> None:
    """Tell objects without pixels from images whose pixels were lost.

    An SR or a presentation state has no Pixel Data by design: :class:`NotAnImage`. An
    object of an image storage class without it was cut short (pydicom stops quietly at an
    unexpected end of file): :class:`UndecodablePixels`.
    """
    if any(keyword in header for keyword in _PIXEL_KEYWORDS):
        return
    sop_class = UID(str(header.get("SOPClassUID") or header.file_meta.get("MediaStorageSOPClassUID", "")))
    kind = sop_class.name if sop_class else "unknown SOP Class"
    if "Image Storage" in kind:
        raise UndecodablePixels(f"no Pixel Data in a {kind} object (truncated file?)")
    raise NotAnImage(f"no Pixel Data ({kind})")


def _geometry(header: Dataset) -> _Geometry:
    """The Image Pixel attributes, or the reason they cannot describe an image we analyse."""
    rows = _integer(header, "Rows")
    columns = _integer(header, "Columns")
    frames = _integer(header, "NumberOfFrames", default=1)
    samples = _integer(header, "SamplesPerPixel", default=1)
    bits_allocated = _integer(header, "BitsAllocated")
    bits_stored = _integer(header, "BitsStored", default=bits_allocated)
    photometric = str(header.get("PhotometricInterpretation", "")).strip().upper()
    if bits_allocated not in (1, 8, 16, 32, 64) or not 1 <= bits_stored <= bits_allocated:
        raise UndecodablePixels(f"invalid Bits Allocated / Bits Stored ({bits_allocated} / {bits_stored})")
    if not photometric:
        raise UndecodablePixels("missing Photometric Interpretation")
    if rows <= 0 or columns <= 0 or frames <= 0:
        raise UnsupportedImage(f"empty image: {rows} rows, {columns} columns, {frames} frames")
    _check_layout(photometric, samples)
    signed = _integer(header, "PixelRepresentation", default=0) == 1
    return _Geometry(rows, columns, frames, samples, photometric, bits_stored, signed)


def _check_layout(photometric: str, samples: int) -> None:
    expected = 3 if photometric in _COLOUR else 1 if photometric in (*_MONOCHROME, "PALETTE COLOR") else 0
    if not expected:
        raise UnsupportedImage(f"unsupported Photometric Interpretation {photometric}")
    if samples != expected:
        raise UnsupportedImage(f"{samples} samples per pixel with Photometric Interpretation {photometric}")


def _integer(header: Dataset, keyword: str, default: int | None = None) -> int:
    """An integer attribute, tolerating pydicom's leniency but not a missing or bogus value."""
    try:
        value = header.get(keyword)
        if value is None or value == "":
            if default is None:
                raise UndecodablePixels(f"missing {keyword}")
            return default
        return int(value)
    except (TypeError, ValueError) as exc:
        raise UndecodablePixels(f"invalid {keyword}") from exc


def _check_size(geometry: _Geometry, frame_count: int, max_pixels: int) -> None:
    """Refuse images whose selected frames exceed ``max_pixels`` before allocating anything."""
    total = geometry.frame_pixels * frame_count
    if total > max_pixels:
        raise UnsupportedImage(
            f"image too large: {geometry.rows} x {geometry.columns} x {geometry.samples} samples"
            f" x {frame_count} frames exceeds {max_pixels} pixels"
        )


# --- decoding stored values -----------------------------------------------------------------


def _stored_frame(source: _Source, index: int) -> np.ndarray:
    """Frame ``index`` as stored (colour converted to RGB), trying each decoder in turn.

    Broad exceptions are caught here, at the decoder boundary only: third-party codecs raise
    anything from ValueError to RuntimeError on corrupt input, and every one of them means
    the same to the caller.
    """
    name = source.transfer_syntax.name
    plugins = _plugins(source.transfer_syntax)
    _check_declared_size(source, index)
    failures: list[str] = []
    for pixels_from in source.pixel_sources():
        for plugin in plugins:
            try:
                arr = _decode(source, pixels_from, index, plugin)
            except Exception as exc:  # decoder boundary, see above
                failures.append(_failure(plugin, exc))
                logger.info("frame %d of %s (%s): %s", index, source.uid, name, failures[-1])
                continue
            return _checked_shape(np.asarray(arr), source.geometry)
    raise UndecodablePixels(f"cannot decode {name} frame {index}: {'; '.join(dict.fromkeys(failures))}")


def _decode(source: _Source, pixels_from: Path | Dataset, index: int, plugin: str) -> np.ndarray:
    if plugin not in ISOLATED_PLUGINS:
        return np.asarray(pixel_array(pixels_from, index=index, decoding_plugin=plugin))
    whole = not isinstance(pixels_from, Path)
    return _decode_in_child(source.path, index, plugin, whole)


def _decode_in_child(path: Path, index: int, plugin: str, whole: bool) -> np.ndarray:
    """Frame ``index`` decoded by ``plugin`` in a child process: a crash or hang stays there."""
    with tempfile.TemporaryDirectory(prefix="precedent-decode-") as scratch:
        output = Path(scratch) / "frame.npy"
        command = [sys.executable, "-m", __name__, str(path), str(index), plugin, str(output)]
        environment = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [_ROOT, os.environ.get("PYTHONPATH")])),
        }
        try:
            child = subprocess.run(
                [*command, "whole" if whole else "path"],
                capture_output=True,
                text=True,
                timeout=ISOLATED_TIMEOUT_S,
                env=environment,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"{plugin}: no result after {ISOLATED_TIMEOUT_S} s") from exc
        if child.returncode != 0:
            raise RuntimeError(f"{plugin}: {_child_failure(child.returncode, child.stderr)}")
        return np.asarray(np.load(output, allow_pickle=False))


def _child_failure(returncode: int, stderr: str) -> str:
    reported = [line[len(_CHILD_ERROR) :] for line in stderr.splitlines() if line.startswith(_CHILD_ERROR)]
    if reported:
        return reported[-1]
    if returncode < 0:
        return f"decoder crashed ({signal.Signals(-returncode).name})"
    return f"decoder exited with status {returncode}"


def _failure(plugin: str, exc: Exception) -> str:
    """The useful line of a decoder's error: pydicom puts "plugin: reason" on the last line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    reason = lines[-1] if lines else type(exc).__name__
    plugin = plugin or "pydicom"
    return reason if reason.startswith(f"{plugin}:") else f"{plugin}: {reason}"


def _check_declared_size(source: _Source, index: int) -> None:
    """Refuse a JPEG or JPEG 2000 frame whose own header declares more than ``max_pixels``.

    The DICOM header was checked already, but codecs allocate what the codestream says: a
    64 x 64 image whose codestream claims 60000 x 60000 made openjpeg take 7 GB and 20 s
    before failing. The codestream's header is a few bytes, so it is checked first.
    """
    codestream = _frame_bytes(source, index)
    declared = _declared_size(codestream) if codestream else None
    if declared is None:
        return
    width, height, components = declared
    if width * height * components > source.max_pixels:
        raise UndecodablePixels(
            f"{source.transfer_syntax.name} frame {index} declares {width} x {height} x {components}"
            f" pixels, the header {source.geometry.columns} x {source.geometry.rows}"
        )


def _frame_bytes(source: _Source, index: int) -> bytes | None:
    """The encoded bytes of frame ``index``, read from disk when the Pixel Data was left there."""
    if not source.transfer_syntax.is_encapsulated:
        return None
    element = source.header.get_item("PixelData", keep_deferred=True)
    if element is None:
        return None
    offsets = (source.header.get("ExtendedOffsetTable"), source.header.get("ExtendedOffsetTableLengths"))
    options: dict[str, Any] = {"number_of_frames": source.geometry.frames}
    if all(offsets):
        options["extended_offsets"] = offsets
    try:
        if not isinstance(element, RawDataElement) or element.value is not None:
            return get_frame(element.value, index, **options)
        with source.path.open("rb") as file:
            file.seek(element.value_tell)
            return get_frame(file, index, **options)
    except Exception as exc:  # parser boundary: the decoders will give the proper reason
        logger.info("cannot locate frame %d of %s before decoding: %s", index, source.uid, exc)
        return None


def _declared_size(codestream: bytes) -> tuple[int, int, int] | None:
    """(width, height, components) from a JPEG 2000 or JPEG header; None if not recognised."""
    try:
        if codestream.startswith(b"\xff\x4f\xff\x51"):  # J2K: SOC then SIZ
            x, y, x0, y0 = struct.unpack_from(">IIII", codestream, 8)
            return x - x0, y - y0, struct.unpack_from(">H", codestream, 40)[0]
        if codestream[4:12] == b"jP  \r\n\x87\n":  # JP2 file format
            at = codestream.find(b"ihdr")
            if at < 0:
                return None
            height, width, components = struct.unpack_from(">IIH", codestream, at + 4)
            return width, height, components
        if codestream.startswith(b"\xff\xd8"):
            return _jpeg_frame_header(codestream)
    except struct.error:
        return None
    return None


_JPEG_SOF = {*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC), *range(0xCD, 0xD0), 0xF7}


def _jpeg_frame_header(codestream: bytes) -> tuple[int, int, int] | None:
    """Walk the JPEG (or JPEG-LS) marker segments up to the start-of-frame header."""
    position = 2
    while position + 4 <= len(codestream):
        if codestream[position] != 0xFF:
            return None
        marker = codestream[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
        elif marker in _JPEG_SOF:
            height, width, components = struct.unpack_from(">HHB", codestream, position + 5)
            return width, height, components
        elif marker == 0xDA:  # start of scan before any frame header
            return None
        else:
            position += 2 + struct.unpack_from(">H", codestream, position + 2)[0]
    return None


def _plugins(transfer_syntax: UID) -> list[str]:
    """Decoding plugins in the order to try; [""] lets pydicom decode native data itself."""
    try:
        available = get_decoder(transfer_syntax).available_plugins
    except NotImplementedError as exc:
        raise UndecodablePixels(f"no decoder for transfer syntax {transfer_syntax.name}") from exc
    if not transfer_syntax.is_compressed:
        return [""]
    preferred = [plugin for plugin in PREFERRED_PLUGINS if plugin in available]
    others = [plugin for plugin in available if plugin not in PREFERRED_PLUGINS]
    isolated = [plugin for plugin in preferred + others if plugin in ISOLATED_PLUGINS]
    ordered = [plugin for plugin in preferred + others if plugin not in ISOLATED_PLUGINS] + isolated
    if not ordered:
        raise UndecodablePixels(f"no decoder installed for {transfer_syntax.name}")
    return ordered


def _checked_shape(arr: np.ndarray, geometry: _Geometry) -> np.ndarray:
    expected: tuple[int, ...] = (geometry.rows, geometry.columns)
    if geometry.samples > 1:
        expected += (geometry.samples,)
    if arr.shape != expected:
        raise UndecodablePixels(f"decoded frame has shape {arr.shape}, the header says {expected}")
    return arr


# --- from stored values to display values ---------------------------------------------------


def _analysis_frame(source: _Source, index: int) -> Frame:
    """Frame ``index`` in gray, cropped to its ultrasound regions and then its blank borders."""
    rendered = _rendered(source, index)
    gray = rendered @ _LUMA if rendered.ndim == 3 else rendered
    top, left, bottom, right = _region_box(source.header, source.geometry)
    inner = blank_border_box(gray[top:bottom, left:right])
    crop = (top + inner[0], left + inner[1], top + inner[2], left + inner[3])
    pixels = np.ascontiguousarray(gray[crop[0] : crop[2], crop[1] : crop[3]], dtype=np.float32)
    return Frame(index=index, pixels=pixels, crop=crop)


def _rendered(source: _Source, index: int) -> np.ndarray:
    """Frame ``index`` as displayed, float in [0, 1]: (H, W) for grayscale, (H, W, 3) for colour."""
    stored = _stored_frame(source, index)
    photometric = source.geometry.photometric
    view = _lut_view(source.header, index)
    if photometric == "PALETTE COLOR":
        rendered = _palette_rgb(stored, view, little_endian=source.header.original_encoding[1] is not False)
    elif photometric in _COLOUR:
        # float32: colour ultrasound is the bulk of the traffic, and 8 bits need no more.
        rendered = stored.astype(np.float32) * np.float32(1.0 / (2.0**source.geometry.bits_stored - 1))
    else:
        rendered = _grayscale(stored, view, source.geometry)
    return _unit_range(rendered)


def _unit_range(values: np.ndarray) -> np.ndarray:
    """Clipped to [0, 1], NaN (from a degenerate LUT or window) as 0; one pass when clean."""
    clipped: np.ndarray = np.clip(values, 0.0, 1.0)
    nan = np.isnan(clipped)
    if nan.any():
        clipped[nan] = 0.0
    return clipped


def _lut_view(header: Dataset, index: int) -> Dataset:
    """The display attributes that apply to frame ``index``, as one flat data set.

    Enhanced objects (breast tomosynthesis, enhanced US) keep rescale and window in the
    shared and per-frame functional groups rather than at the top level; the per-frame value
    wins, as PS3.3 C.7.6.16 says.
    """
    view = Dataset()
    view.file_meta = header.file_meta
    view.set_original_encoding(*header.original_encoding[:2])
    for keyword in _LUT_KEYWORDS:
        if keyword in header:
            view[keyword] = header[keyword]
    for group in _functional_groups(header, index):
        for macro in _FUNCTIONAL_GROUP_MACROS:
            items = group.get(macro)
            if items:
                for element in items[0]:
                    view[element.tag] = element
    return view


def _functional_groups(header: Dataset, index: int) -> Iterable[Dataset]:
    shared = header.get("SharedFunctionalGroupsSequence")
    if shared:
        yield shared[0]
    per_frame = header.get("PerFrameFunctionalGroupsSequence")
    if per_frame and index < len(per_frame):
        yield per_frame[index]


def _grayscale(stored: np.ndarray, view: Dataset, geometry: _Geometry) -> np.ndarray:
    """Modality LUT, then VOI LUT or window (or a fallback range), then MONOCHROME1 inversion."""
    try:
        values = apply_modality_lut(stored, view)
    except _LUT_ERRORS as exc:
        raise UndecodablePixels(f"unusable Modality LUT: {exc}") from exc
    voi = _voi_function(view) or _window_function(view) or _fallback_range(values, view, geometry)
    gray = voi(values)
    return 1.0 - gray if geometry.photometric == "MONOCHROME1" else gray


def _voi_function(view: Dataset) -> Callable[[np.ndarray], np.ndarray] | None:
    """The first VOI LUT of the VOI LUT Sequence, its output scaled by the LUT's own range.

    The LUT's range, not its nominal bit depth: LUTs declared 16-bit often hold 12-bit values.
    """
    items = view.get("VOILUTSequence")
    if not items or "LUTDescriptor" not in items[0] or "LUTData" not in items[0]:
        return None
    try:
        entries, first, _ = (int(v) for v in items[0].LUTDescriptor)
        table = apply_voi(np.arange(first, first + (entries or 65536), dtype=np.int64), view)
    except _LUT_ERRORS as exc:
        logger.warning("ignoring unusable VOI LUT: %s", exc)
        return None
    low, high = float(table.min()), float(table.max())

    def voi(values: np.ndarray) -> np.ndarray:
        mapped = apply_voi(np.rint(values).astype(np.int64), view).astype(np.float64)
        return _scaled(mapped, low, high)

    return voi


def _window_function(view: Dataset) -> Callable[[np.ndarray], np.ndarray] | None:
    """The first window of Window Center / Width with its VOI LUT Function (PS3.3 C.11.2.1.2)."""
    center, width = _first_number(view, "WindowCenter"), _first_number(view, "WindowWidth")
    function = str(view.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
    if center is None or width is None or width <= 0 or (function == "LINEAR" and width < 1):
        return None
    if function == "SIGMOID":
        return lambda values: 1.0 / (1.0 + np.exp(np.clip(-4.0 * (values - center) / width, -700, 700)))
    if function == "LINEAR_EXACT":
        return lambda values: np.clip((values - center) / width + 0.5, 0.0, 1.0)
    if width == 1:
        return lambda values: (values > center - 0.5).astype(np.float64)
    return lambda values: np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def _fallback_range(
    values: np.ndarray, view: Dataset, geometry: _Geometry
) -> Callable[[np.ndarray], np.ndarray]:
    """Without a VOI: 8-bit data as stored, anything deeper stretched between robust percentiles.

    Data of 8 bits or fewer with no rescale (ultrasound, secondary capture) is already meant
    for display, and BUSI-style training images are exactly those values; deeper data rarely
    uses its nominal range (12 bits in 16), so the frame's own range is the useful one.
    """
    if geometry.bits_stored <= 8 and _identity_modality(view):
        low = -(2.0 ** (geometry.bits_stored - 1)) if geometry.signed else 0.0
        high = low + 2.0**geometry.bits_stored - 1
    else:
        low, high = _robust_range(values)
    return lambda v: _scaled(v.astype(np.float64), low, high)


def _identity_modality(view: Dataset) -> bool:
    if view.get("ModalityLUTSequence"):
        return False
    slope, intercept = _first_number(view, "RescaleSlope"), _first_number(view, "RescaleIntercept")
    return slope in (None, 1.0) and intercept in (None, 0.0)


def _robust_range(values: np.ndarray) -> tuple[float, float]:
    finite = values[np.isfinite(values)] if values.dtype.kind == "f" else values.ravel()
    if finite.size == 0:
        return 0.0, 1.0
    sample = finite.ravel()[:: max(1, finite.size // _PERCENTILE_SAMPLES)]
    low, high = (float(v) for v in np.percentile(sample, ROBUST_PERCENTILES))
    if high <= low:
        low, high = float(sample.min()), float(sample.max())
    return low, high


def _scaled(values: np.ndarray, low: float, high: float) -> np.ndarray:
    if high <= low:
        return np.zeros(values.shape, dtype=np.float64)
    return np.clip((values - low) / (high - low), 0.0, 1.0)


def _first_number(view: Dataset, keyword: str) -> float | None:
    """The first value of a possibly multi-valued numeric attribute, None if absent or bogus."""
    try:
        value: Any = view.get(keyword)
        if value is None or value == "":
            return None
        if isinstance(value, Sequence) and not isinstance(value, str):
            value = value[0] if len(value) else None
        number = None if value is None else float(value)
    except (TypeError, ValueError):
        return None
    return number if number is not None and np.isfinite(number) else None


def _palette_rgb(stored: np.ndarray, view: Dataset, little_endian: bool) -> np.ndarray:
    """PALETTE COLOR indices looked up in the palette, as RGB in [0, 1]."""
    try:
        entries, first, _ = (int(v) for v in view.RedPaletteColorLookupTableDescriptor)
        table = _palette_table(view, entries or 65536, first, little_endian)
    except _LUT_ERRORS as exc:
        raise UndecodablePixels(f"unusable palette colour lookup table: {exc}") from exc
    indices = np.clip(stored.astype(np.int64) - first, 0, len(table) - 1)
    scale = 255.0 if table.max() <= 255 else 65535.0
    # Scaled before the lookup: one small table to convert instead of every pixel.
    return (table.astype(np.float32) * np.float32(1.0 / scale))[indices]


def _palette_table(view: Dataset, entries: int, first: int, little_endian: bool) -> np.ndarray:
    """The palette as an (entries, 3) array.

    Read here rather than by pydicom's apply_color_lut for the plain (non-segmented) tables:
    apply_color_lut reads OW table data in the machine's byte order, which scrambles the
    palettes of big-endian files; for segmented tables it gets the byte order right.
    """
    if "RedPaletteColorLookupTableData" not in view:
        probe = np.arange(first, first + entries, dtype=np.int64)
        return np.asarray(apply_color_lut(probe, view)[:, :3])
    channels = []
    for colour in ("Red", "Green", "Blue"):
        data = bytes(view[f"{colour}PaletteColorLookupTableData"].value)
        width = len(data) // entries
        if width not in (1, 2) or len(data) != width * entries:
            raise ValueError(f"{len(data)} bytes of palette data for {entries} entries")
        dtype = np.dtype("u1") if width == 1 else np.dtype("<u2" if little_endian else ">u2")
        channels.append(np.frombuffer(data, dtype=dtype).astype(np.uint16))
    return np.stack(channels, axis=1)


def _region_box(header: Dataset, geometry: _Geometry) -> Box:
    """The bounding box of the ultrasound regions, the full frame when there are none.

    Regions of 2-D tissue (Region Spatial Format 1) when any exist, so Doppler strips and
    M-mode panes do not widen the box; all regions otherwise. Region corners are inclusive.
    """
    full = (0, 0, geometry.rows, geometry.columns)
    boxes: list[tuple[Box, bool]] = []
    for region in header.get("SequenceOfUltrasoundRegions") or []:
        box = _one_region(region, geometry)
        if box is not None:
            boxes.append((box, _first_number(region, "RegionSpatialFormat") == 1))
    tissue = [box for box, is_tissue in boxes if is_tissue] or [box for box, _ in boxes]
    if not tissue:
        return full
    return (
        min(b[0] for b in tissue),
        min(b[1] for b in tissue),
        max(b[2] for b in tissue),
        max(b[3] for b in tissue),
    )


def _one_region(region: Dataset, geometry: _Geometry) -> Box | None:
    corners = [
        _first_number(region, keyword)
        for keyword in (
            "RegionLocationMinY0",
            "RegionLocationMinX0",
            "RegionLocationMaxY1",
            "RegionLocationMaxX1",
        )
    ]
    if any(corner is None for corner in corners):
        return None
    top, left, bottom, right = (int(c) for c in corners if c is not None)
    top, left = max(top, 0), max(left, 0)
    bottom, right = min(bottom + 1, geometry.rows), min(right + 1, geometry.columns)
    return (top, left, bottom, right) if bottom > top and right > left else None


# --- the child process for isolated decoders ------------------------------------------------


def _child_main(arguments: Sequence[str]) -> int:
    """Decode one frame with one plugin into a .npy file: ``PATH INDEX PLUGIN OUTPUT path|whole``."""
    path, index, plugin, output, mode = arguments
    try:
        arr = pixel_array(_child_source(Path(path), mode), index=int(index), decoding_plugin=plugin)
        np.save(output, np.asarray(arr), allow_pickle=False)
    except Exception as exc:  # reported to the parent, which treats it as a decoder failure
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        print(f"{_CHILD_ERROR}{lines[-1] if lines else type(exc).__name__}", file=sys.stderr)
        return 1
    return 0


def _child_source(path: Path, mode: str) -> Path | Dataset:
    if mode != "whole":
        return path
    dataset = _read_dataset(path, defer_size=None)
    if not dataset.file_meta.get("TransferSyntaxUID"):
        _guess_transfer_syntax(dataset)
    return dataset


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
