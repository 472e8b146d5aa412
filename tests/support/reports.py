"""Structured Reports in tests: small source images to report on, and the independent tools
that judge the result (dicom3tools' ``dciodvfy`` for the IOD, DCMTK's ``dsrdump`` for the
content tree and its relationship constraints).

Both tools are required: a missing one raises, so a test that depends on it fails instead of
passing without having checked anything.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from tests.support.dcmtk import dcmtk

US_IMAGE = "1.2.840.10008.5.1.4.1.1.6.1"
US_MULTIFRAME_IMAGE = "1.2.840.10008.5.1.4.1.1.3.1"
MG_IMAGE_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"

_ROOT = "1.2.826.0.1.3680043.8.498.77"  # test UIDs: pydicom's root plus a fixed branch


def fixed_uid(*parts: int) -> str:
    """A fixed, valid UID for test objects, e.g. ``fixed_uid(1, 2)``."""
    return ".".join([_ROOT, *(str(p) for p in parts)])


def source_image(
    study: int,
    number: int,
    *,
    modality: str = "US",
    frames: int | None = None,
    patient_id: str = "PHANTOM-1",
) -> Dataset:
    """A small but complete image (16 x 16 pixels, ``frames`` frames if multi-frame) of study
    ``study``, as a modality would send it: patient, study, series and image attributes."""
    ds = Dataset()
    ds.SOPClassUID = _sop_class(modality, frames)
    ds.SOPInstanceUID = fixed_uid(study, 1, number)
    ds.StudyInstanceUID = fixed_uid(study)
    ds.SeriesInstanceUID = fixed_uid(study, 1)
    ds.PatientName = "Phantom^Alice"
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F"
    ds.AccessionNumber = f"ACC{study}"
    ds.StudyID = str(study)
    ds.StudyDate = "20240102"
    ds.StudyTime = "101500"
    ds.ReferringPhysicianName = ""
    ds.Modality = modality
    ds.SeriesNumber = 1
    ds.InstanceNumber = number
    if modality == "MG":
        ds.PatientOrientation = ["A", "R"]
        ds.ImagerPixelSpacing = [0.1, 0.1]
    _add_pixels(ds, frames)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def _sop_class(modality: str, frames: int | None) -> str:
    if modality == "MG":
        return MG_IMAGE_FOR_PRESENTATION
    return US_IMAGE if frames is None else US_MULTIFRAME_IMAGE


def _add_pixels(ds: Dataset, frames: int | None) -> None:
    """16 x 16 monochrome 8-bit pixels (a gradient), one block per frame."""
    ds.Rows = 16
    ds.Columns = 16
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    pixels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    if frames is not None:
        ds.NumberOfFrames = frames
        ds.FrameIncrementPointer = 0x00181063
        ds.FrameTime = 33.3
        pixels = np.stack([pixels] * frames)
    ds.PixelData = pixels.tobytes()


@dataclass(frozen=True)
class Validation:
    """What dciodvfy said about one file."""

    returncode: int
    errors: list[str]
    warnings: list[str]
    output: str


def dciodvfy(path: Path) -> Validation:
    """Validate ``path`` against its IOD with dicom3tools' dciodvfy ('Error -' lines are errors)."""
    tool = shutil.which("dciodvfy")
    if tool is None:
        raise RuntimeError("dicom3tools' dciodvfy is not installed (Debian package dicom3tools)")
    run = subprocess.run([tool, str(path)], capture_output=True, text=True, check=False, timeout=60)
    output = run.stdout + run.stderr
    lines = output.splitlines()
    return Validation(
        returncode=run.returncode,
        errors=[line for line in lines if line.startswith("Error")],
        warnings=[line for line in lines if line.startswith("Warning")],
        output=output,
    )


def dsrdump(path: Path, *options: str) -> subprocess.CompletedProcess[str]:
    """DCMTK's rendering of the SR at ``path``; DCMTK refuses (exit status 1, 'E:' lines) a
    content tree that breaks the IOD's relationship constraints."""
    return subprocess.run(
        [dcmtk("dsrdump"), *options, str(path)], capture_output=True, text=True, check=False, timeout=60
    )
