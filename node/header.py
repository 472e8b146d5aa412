"""Reading the attributes the catalog needs from a received file, and judging it sound.

The C-STORE hot path parses the header once, defers every large value (pixel data
is never read into memory here) and checks that the encoding is complete: pydicom
reads truncated files without complaint, so the check is ours. Identifiers are
validated here because they later name rows and, hashed, files.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from node.errors import DatasetMismatch, InvalidIdentifier, UnreadableDataset

_DEFER_BYTES = 4096
_UNDEFINED_LENGTH = 0xFFFFFFFF
_SEQUENCE_DELIMITERS = (b"\xfe\xff\xdd\xe0\x00\x00\x00\x00", b"\xff\xfe\xe0\xdd\x00\x00\x00\x00")
# Digits and dots (leading zeros tolerated, as seen in the field); length is checked apart.
UID_PATTERN = re.compile(r"[0-9]+(\.[0-9]+)*")


@dataclass(frozen=True)
class InstanceHeader:
    """The query keys of one instance, decoded to text; empty strings where absent."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    patient_id: str = ""
    issuer_of_patient_id: str = ""
    patient_name: str = ""
    patient_birth_date: str = ""
    patient_sex: str = ""
    study_date: str = ""
    study_time: str = ""
    accession_number: str = ""
    study_id: str = ""
    study_description: str = ""
    referring_physician_name: str = ""
    modality: str = ""
    series_number: int | None = None
    series_description: str = ""
    body_part_examined: str = ""
    laterality: str = ""
    instance_number: int | None = None
    image_laterality: str = ""
    view_position: str = ""
    rows: int | None = None
    columns: int | None = None
    number_of_frames: int | None = None


def clean_uid(value: object, keyword: str) -> str:
    """Return a UID stripped of its padding, or raise if it is not one.

    Tolerant of leading zeros in components (seen in real modality data), strict on
    everything that could matter for safety: digits and dots only, at most 64 characters.
    """
    text = str(value if value is not None else "").strip("\x00 ")
    if not text:
        raise InvalidIdentifier(f"{keyword} is missing or empty")
    if len(text) > 64 or not UID_PATTERN.fullmatch(text):
        raise InvalidIdentifier(f"{keyword} is not a valid UID: {text[:80]!r}")
    return text


def read_instance_header(path: Path) -> InstanceHeader:
    """Parse a received DICOM file (with file meta) and return its query keys.

    Raises :class:`UnreadableDataset` when the encoding is broken or truncated and
    :class:`InvalidIdentifier` when a required UID is missing or malformed.
    """
    size = path.stat().st_size
    with path.open("rb") as fp:
        dataset = _parse(fp)
        _require_complete(dataset, fp, size)
    return _header_from(dataset)


def check_matches_request(header: InstanceHeader, sop_class_uid: str, sop_instance_uid: str) -> None:
    """The dataset must be the instance the C-STORE request announced (PS3.4 B.2.3)."""
    if header.sop_instance_uid != sop_instance_uid.strip("\x00 "):
        raise DatasetMismatch(f"dataset SOPInstanceUID differs from the request's: {header.sop_instance_uid}")
    if header.sop_class_uid != sop_class_uid.strip("\x00 "):
        raise DatasetMismatch(f"dataset SOPClassUID differs from the request's: {header.sop_class_uid}")


def _parse(fp: BinaryIO) -> Dataset:
    try:
        dataset = dcmread(fp, defer_size=_DEFER_BYTES)
    except Exception as exc:  # pydicom raises many types for broken input
        raise UnreadableDataset(f"cannot parse the dataset: {type(exc).__name__}: {exc}") from exc
    return dataset


def _require_complete(dataset: Dataset, fp: BinaryIO, size: int) -> None:
    """The last element must end exactly where the file does.

    An element of undefined length (encapsulated pixel data, a sequence) must be
    closed by its Sequence Delimitation Item, which is then the file's last 8 bytes.
    A deflated data set is read from an inflated copy, to which element offsets refer.
    """
    position = fp.tell()
    inflated = getattr(dataset, "buffer", None)
    if inflated is not None:
        position = inflated.tell()
        fp, size = inflated, inflated.seek(0, 2)
    if position > size:
        raise UnreadableDataset(f"an element runs {position - size} bytes past the end of the data")
    if not len(dataset):
        raise UnreadableDataset("the data set is empty")
    last = dataset.get_item(list(dataset.keys())[-1], keep_deferred=True)
    if not isinstance(last, RawDataElement):
        return
    if last.length == _UNDEFINED_LENGTH:
        fp.seek(size - 8)
        if fp.read(8) not in _SEQUENCE_DELIMITERS:
            raise UnreadableDataset("an element of undefined length is not closed before the end")
        return
    end = int(last.value_tell) + int(last.length)
    if end != size:
        raise UnreadableDataset(f"the data set ends at byte {size}, its last element at {end}")


def _text(dataset: Dataset, keyword: str) -> str:
    value = dataset.get(keyword)
    if value is None:
        return ""
    if isinstance(value, (list, tuple, MultiValue)):
        text = "\\".join(str(v) for v in value)
    else:
        text = str(value).strip("\x00 ")
    return text.replace("\x00", "")  # PostgreSQL refuses NUL in text: it would fail the store


def _integer(dataset: Dataset, keyword: str) -> int | None:
    """The value as an int if it fits the catalog's INTEGER columns (32 bits), else None."""
    value: Any = dataset.get(keyword)
    try:
        number = int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None
    return number if number is not None and -(2**31) <= number < 2**31 else None


def _header_from(dataset: Dataset) -> InstanceHeader:
    meta = getattr(dataset, "file_meta", None)
    try:
        return InstanceHeader(
            sop_class_uid=clean_uid(dataset.get("SOPClassUID"), "SOPClassUID"),
            sop_instance_uid=clean_uid(dataset.get("SOPInstanceUID"), "SOPInstanceUID"),
            study_instance_uid=clean_uid(dataset.get("StudyInstanceUID"), "StudyInstanceUID"),
            series_instance_uid=clean_uid(dataset.get("SeriesInstanceUID"), "SeriesInstanceUID"),
            transfer_syntax_uid=clean_uid(
                meta.get("TransferSyntaxUID") if meta is not None else None, "TransferSyntaxUID"
            ),
            patient_id=_text(dataset, "PatientID"),
            issuer_of_patient_id=_text(dataset, "IssuerOfPatientID"),
            patient_name=_text(dataset, "PatientName"),
            patient_birth_date=_text(dataset, "PatientBirthDate"),
            patient_sex=_text(dataset, "PatientSex"),
            study_date=_text(dataset, "StudyDate"),
            study_time=_text(dataset, "StudyTime"),
            accession_number=_text(dataset, "AccessionNumber"),
            study_id=_text(dataset, "StudyID"),
            study_description=_text(dataset, "StudyDescription"),
            referring_physician_name=_text(dataset, "ReferringPhysicianName"),
            modality=_text(dataset, "Modality"),
            series_number=_integer(dataset, "SeriesNumber"),
            series_description=_text(dataset, "SeriesDescription"),
            body_part_examined=_text(dataset, "BodyPartExamined"),
            laterality=_text(dataset, "Laterality"),
            instance_number=_integer(dataset, "InstanceNumber"),
            image_laterality=_text(dataset, "ImageLaterality"),
            view_position=_text(dataset, "ViewPosition"),
            rows=_integer(dataset, "Rows"),
            columns=_integer(dataset, "Columns"),
            number_of_frames=_integer(dataset, "NumberOfFrames"),
        )
    except InvalidIdentifier:
        raise
    except Exception as exc:  # a value that cannot be decoded (bad charset, bad VR)
        raise UnreadableDataset(f"cannot decode a query key: {type(exc).__name__}: {exc}") from exc
