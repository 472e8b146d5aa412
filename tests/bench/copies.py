"""The benchmarks' load: N copies of one real image, each a new instance, cached across runs."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import generate_uid

_COMPLETE = ".complete"


def cached_copies(source: Path, n: int, cache_root: Path, per_study: int) -> list[Path]:
    """N copies of ``source`` with new UIDs, ``per_study`` instances to a study (one series
    each, as a modality sends them), made once and kept under ``cache_root``.

    A cache directory is complete or absent: copies are written into a staging
    directory that is renamed into place at the end, so two benchmarks preparing
    the same set at once cannot see each other's half-written files.
    """
    target = cache_root / f"{source.stem}-{n}"
    if not (target / _COMPLETE).exists():
        cache_root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=cache_root))
        _write_copies(source, n, per_study, staging)
        (staging / _COMPLETE).touch()
        try:
            staging.rename(target)
        except OSError:  # another process finished first, or a stale incomplete copy
            if (target / _COMPLETE).exists():
                shutil.rmtree(staging, ignore_errors=True)
            else:
                shutil.rmtree(target, ignore_errors=True)
                staging.rename(target)
    return sorted(target.glob("*.dcm"))


def _write_copies(source: Path, n: int, per_study: int, directory: Path) -> None:
    dataset = dcmread(source)
    for index in range(n):
        if index % per_study == 0:
            dataset.StudyInstanceUID = generate_uid()
            dataset.SeriesInstanceUID = generate_uid()
            dataset.AccessionNumber = f"BENCH{index // per_study:06d}"
            dataset.PatientID = f"BENCH-{index // per_study:06d}"
        dataset.SOPInstanceUID = generate_uid()
        dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
        dataset.InstanceNumber = index % per_study + 1
        dataset.save_as(directory / f"{index:06d}.dcm", enforce_file_format=True)
