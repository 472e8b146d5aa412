"""Real DICOM files the tests push: pydicom-data's set and pydicom's own test files."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import data_store
import pydicom
from pydicom import dcmread, uid
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.tag import BaseTag

PYDICOM_DATA_DIR = Path(data_store.__file__).parent / "data"
PYDICOM_TEST_DIR = Path(pydicom.__file__).parent / "data" / "test_files"


def pydicom_data_files() -> list[Path]:
    return sorted(PYDICOM_DATA_DIR.glob("*.dcm"))


def pydicom_test_files() -> list[Path]:
    """Every file under pydicom's test data that carries DICOM file meta (storescu needs it)."""
    return sorted(p for p in PYDICOM_TEST_DIR.rglob("*") if p.is_file() and transfer_syntax_of(p))


@cache
def transfer_syntax_of(path: Path) -> str | None:
    try:
        meta = dcmread(path, stop_before_pixels=True).file_meta
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, AttributeError):
        return None
    value = meta.get("TransferSyntaxUID")
    return str(value) if value else None


def ultrasound_file() -> Path:
    """A real uncompressed ultrasound image (923 KB, RGB), the tests' workhorse."""
    return PYDICOM_DATA_DIR / "US1_UNCR.dcm"


TRAILING_PADDING = 0xFFFCFFFC


def content(dataset: Dataset) -> dict[BaseTag, object]:
    """A data set's values by tag, as DCMTK may re-encode them in transit: without group
    lengths (retired; storescu recomputes them) and without VRs (it corrects OW to OB on
    encapsulated pixel data) and without Data Set Trailing Padding (it drops it)."""
    return {
        element.tag: element.value
        for element in dataset
        if element.tag.element != 0 and element.tag != TRAILING_PADDING
    }


def write_instance(path: Path, **attributes: object) -> Path:
    """A small header-only instance (no pixel data) with exactly the attributes given, as a
    file storescu can send: the tests' way to a catalog with controlled keys."""
    dataset = Dataset()
    if any(not str(value).isascii() for value in attributes.values()):
        dataset.SpecificCharacterSet = "ISO_IR 192"
    for keyword, value in attributes.items():
        setattr(dataset, keyword, value)
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.MediaStorageSOPClassUID = dataset.SOPClassUID
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    dataset.file_meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
    dataset.save_as(path, enforce_file_format=True)
    return path
