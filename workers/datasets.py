"""Labelled image data sets, in the layouts breast-imaging data come in, and their splits.

:func:`load_data_set` tells the layout from what it is pointed at:

``folders``
    A folder with one sub-folder per class holding ``.png``, ``.jpg``, ``.jpeg`` or ``.dcm``
    files (searched recursively), the BUSI layout. Files whose name contains ``_mask`` are
    BUSI's segmentation masks, not images, and are skipped.
``manifest``
    A CSV with the columns ``path,label`` and optionally ``patient_id`` and ``frame``; paths
    are relative to the CSV's folder.
``dicom``
    DICOM files anywhere under a folder, labelled by a CSV with a ``label`` column and a
    ``SOPInstanceUID`` column (one image per row) or an ``AccessionNumber`` column (every
    image of the study). The patient is the files' own PatientID.
``spreadsheet``
    A sheet like CDD-CESM's annotations: an image-name column (``Image_name``) and a BI-RADS
    column, optionally ``Patient_ID``; images are found under the sheet's folder by name,
    with or without extension. ``.csv`` always; ``.xlsx`` only when openpyxl is installed
    (it is not a dependency: save the sheet as CSV otherwise).

A folder holding exactly one table (``.csv`` / ``.xlsx``) is read as that table; without one,
as class folders. Every layout yields the same :class:`LabelledDataSet`: examples (path,
label, patient id where known, frame) and the labels in ascending severity, which the bundle
keeps as its class order. Problems (missing files, unknown labels, empty classes, unreadable
headers) are collected over the whole data set and reported together in one
:class:`DataSetError`, each naming its file or line, so one run finds them all.

Images are read by :func:`read_pixels`: DICOM through :func:`workers.decode.decode_for_analysis`
and PNG / JPEG through Pillow with the same blank-border crop, so a model trains on the very
pixels the node will give it.

Splits (:func:`holdout_split`, :func:`fold_splits`) keep all images of one patient on one side
and keep the class proportions of each side as close to the whole as whole patients allow.
"""

from __future__ import annotations

import csv
import importlib
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image
from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from workers.decode import PixelError, blank_border_box, decode_for_analysis

__all__ = [
    "SEVERITY_ORDER",
    "DataSetError",
    "DataSetFormat",
    "Example",
    "ImageReadError",
    "LabelOrderError",
    "LabelledDataSet",
    "Split",
    "canonical_label",
    "fold_splits",
    "holdout_split",
    "load_data_set",
    "load_folders",
    "load_table",
    "order_labels",
    "read_pixels",
]

DataSetFormat = Literal["folders", "manifest", "dicom", "spreadsheet"]

SEVERITY_ORDER = ("normal", "benign", "malignant")
"""The three-class labels of the ultrasound papers, in ascending severity."""

PICTURE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})
IMAGE_SUFFIXES = PICTURE_SUFFIXES | DICOM_SUFFIXES
TABLE_SUFFIXES = frozenset({".csv", ".xlsx"})
MASK_MARKER = "_mask"
"""BUSI names its masks ``benign (1)_mask.png``, ``benign (1)_mask_1.png``."""

SHOWN_PROBLEMS = 5
"""How many problems a :class:`DataSetError` spells out; the rest are counted."""

_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # as workers.decode converts colour
_BIRADS_TEXT = re.compile(r"^bi-?rads[\s:_-]*([0-6])([abc])?$", re.IGNORECASE)
_BIRADS_VALUE = re.compile(r"^(?:bi-?rads[\s:_-]*)?([0-6])([abc])?$", re.IGNORECASE)
_DICOM_KEYS = ("SOPInstanceUID", "AccessionNumber", "PatientID")
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")

# Column names, compared after lower-casing and dropping everything but letters and digits.
_PATH_COLUMNS = ("path", "file", "filepath")
_LABEL_COLUMNS = ("label", "class")
_BIRADS_COLUMNS = ("birads", "biradscategory", "biradsscore")
_NAME_COLUMNS = ("imagename", "image", "filename", "imagefile", "name")
_PATIENT_COLUMNS = ("patientid", "patient")
_FRAME_COLUMNS = ("frame",)
_UID_COLUMN = "sopinstanceuid"
_ACCESSION_COLUMN = "accessionnumber"


class DataSetError(Exception):
    """A data set that cannot be used as given.

    The message names the data set and its first few problems, each with its file or line,
    then how many more there are; ``problems`` holds them all.
    """

    def __init__(self, source: Path, problems: Sequence[str]) -> None:
        self.source = source
        self.problems = tuple(problems) or ("unusable",)
        if len(self.problems) == 1:
            text = f"data set {source}: {self.problems[0]}"
        else:
            shown = "".join(f"\n  {problem}" for problem in self.problems[:SHOWN_PROBLEMS])
            hidden = len(self.problems) - SHOWN_PROBLEMS
            more = f"\n  ... and {hidden} more" if hidden > 0 else ""
            text = f"data set {source}: {len(self.problems)} problems:{shown}{more}"
        super().__init__(text)


class LabelOrderError(ValueError):
    """Label names whose severity order cannot be known without being told."""


class ImageReadError(Exception):
    """An image of a data set that cannot be read; the message names the file and why."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


@dataclass(frozen=True)
class Example:
    """One labelled image: a file, its class, its patient where known, and its frame.

    ``frame`` None means the frame the node analyses by default (the middle one of a
    multi-frame file); ``origin`` says where the example came from (a table line) for messages.
    """

    path: Path
    label: str
    patient_id: str | None = None
    frame: int | None = None
    origin: str | None = field(default=None, compare=False)

    @property
    def group(self) -> str:
        """What a split keeps on one side: the patient, or the file when the patient is unknown."""
        return f"patient:{self.patient_id}" if self.patient_id is not None else f"file:{self.path}"


@dataclass(frozen=True)
class LabelledDataSet:
    """Examples and their labels in ascending severity; every label has at least one example."""

    source: Path
    """What the data set was loaded from (a folder or a table)."""
    root: Path
    """The folder the examples' paths are reported relative to."""
    format: DataSetFormat
    labels: tuple[str, ...]
    examples: tuple[Example, ...]
    ignored: int = 0
    """Files seen but not used: masks, unlabelled DICOM files, non-image DICOM objects."""

    def __post_init__(self) -> None:
        problems: list[str] = []
        if not self.labels:
            problems.append("no labels")
        repeated = [label for label, count in Counter(self.labels).items() if count > 1]
        problems += [f"label {label!r} is listed twice" for label in repeated]
        counts = Counter(example.label for example in self.examples)
        problems += [
            f"class {label!r} has no images (an empty class)" for label in self.labels if not counts[label]
        ]
        problems += [
            f"label {label!r} is not one of {list(self.labels)}"
            for label in counts
            if label not in self.labels
        ]
        if len(self.labels) == 1 and not problems:
            problems.append(f"only one class ({self.labels[0]!r}): a classifier needs at least two")
        if problems:
            raise DataSetError(self.source, problems)

    def counts(self) -> dict[str, int]:
        """Images per class, in label order."""
        counts = Counter(example.label for example in self.examples)
        return {label: counts[label] for label in self.labels}

    def label_indices(self) -> list[int]:
        """Each example's class as an index into :attr:`labels`."""
        index = {label: i for i, label in enumerate(self.labels)}
        return [index[example.label] for example in self.examples]

    def name_of(self, example: Example) -> str:
        """The example's path relative to :attr:`root` (with ``#frame`` when one is set)."""
        try:
            name = example.path.relative_to(self.root).as_posix()
        except ValueError:
            name = str(example.path)
        return name if example.frame is None else f"{name}#{example.frame}"

    def describe(self) -> dict[str, Any]:
        """What a model bundle records about the data it was trained on (plain data)."""
        patients = {example.patient_id for example in self.examples if example.patient_id is not None}
        without = sum(example.patient_id is None for example in self.examples)
        return {
            "path": str(self.source),
            "format": self.format,
            "labels": list(self.labels),
            "counts": self.counts(),
            "images": len(self.examples),
            "patients": len(patients) if patients else None,
            "images_without_patient_id": without,
            "ignored_files": self.ignored,
        }


@dataclass(frozen=True)
class Split:
    """Indices into a list of examples: what a model learns from, and what it is tested on."""

    train: tuple[int, ...]
    test: tuple[int, ...]

    def __post_init__(self) -> None:
        if set(self.train) & set(self.test):
            raise ValueError("a split cannot hold an example on both sides")


# --- labels ---------------------------------------------------------------------------------


def canonical_label(name: str, birads: bool = False) -> str:
    """The spelling a label is compared and stored in.

    ``normal`` / ``benign`` / ``malignant`` in lower case and BI-RADS categories as
    ``BI-RADS 4`` / ``BI-RADS 4A`` whatever their original spelling; other names as given.
    With ``birads`` (a value from a BI-RADS column) a bare ``4`` or ``4.0`` is BI-RADS 4 too.
    """
    text = " ".join(str(name).split())
    if text.lower() in SEVERITY_ORDER:
        return text.lower()
    match = (_BIRADS_VALUE if birads else _BIRADS_TEXT).match(_without_float_zero(text) if birads else text)
    if match:
        return f"BI-RADS {match.group(1)}{(match.group(2) or '').upper()}"
    return text


def _without_float_zero(text: str) -> str:
    """``4.0`` (a spreadsheet's number) as ``4``."""
    return text[:-2] if re.fullmatch(r"\d\.0", text) else text


def _birads_key(label: str) -> tuple[int, str] | None:
    match = _BIRADS_TEXT.match(label)
    return (int(match.group(1)), (match.group(2) or "").upper()) if match else None


def order_labels(names: Iterable[str], given: Sequence[str] | None = None) -> tuple[str, ...]:
    """The labels in ascending severity.

    With ``given`` (the caller's order, ascending severity), that order, which must include
    every name. Without it, the order is known for ``normal < benign < malignant`` (or a
    subset, e.g. benign / malignant) and for BI-RADS categories (by number, 4A < 4B < 4C);
    other names raise :class:`LabelOrderError` listing them.
    """
    found = list(dict.fromkeys(names))
    if given is not None:
        order = [canonical_label(name) for name in given]
        if not order or any(not name for name in order):
            raise LabelOrderError("the given label order is empty or has an empty name")
        if len(set(order)) != len(order):
            raise LabelOrderError(f"the given label order names a label twice: {order}")
        missing = [name for name in found if name not in order]
        if missing:
            raise LabelOrderError(f"labels not in the given order ({', '.join(order)}): {_quoted(missing)}")
        return tuple(order)
    if all(name in SEVERITY_ORDER for name in found):
        return tuple(sorted(found, key=SEVERITY_ORDER.index))
    keys = {name: _birads_key(name) for name in found}
    if all(key is not None for key in keys.values()):
        return tuple(sorted(found, key=lambda name: keys[name] or (0, "")))
    unknown = [name for name in found if name not in SEVERITY_ORDER and keys[name] is None]
    what = (
        f"unknown label names: {_quoted(unknown)}"
        if unknown
        else "labels mix normal/benign/malignant with BI-RADS"
    )
    raise LabelOrderError(
        f"{what}; the severity order is known only for {' < '.join(SEVERITY_ORDER)} and for "
        "BI-RADS 0-6: give the labels in ascending severity (precedent train --labels a,b,c)"
    )


def _quoted(names: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(repr(name) for name in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


# --- loading ----------------------------------------------------------------------------------


def load_data_set(path: Path, labels: Sequence[str] | None = None) -> LabelledDataSet:
    """The labelled data set at ``path``, its layout told from what ``path`` is (see the module).

    ``labels`` gives the label order (ascending severity) for label names whose order is not
    known (see :func:`order_labels`). Raises :class:`DataSetError` listing what is wrong.
    """
    path = path.expanduser().absolute()
    if not path.exists():
        raise DataSetError(path, ["no such file or folder"])
    if path.is_dir():
        tables = sorted(p for p in path.iterdir() if p.is_file() and _is_table(p))
        if len(tables) == 1:
            return load_table(tables[0], labels)
        if tables:
            names = ", ".join(p.name for p in tables)
            raise DataSetError(
                path, [f"holds several tables ({names}): point at the one that labels the images"]
            )
        return load_folders(path, labels)
    if _is_table(path):
        return load_table(path, labels)
    raise DataSetError(
        path,
        [
            "not a data set: expected a folder with one sub-folder per class, a CSV manifest "
            "(path,label[,patient_id]), a CSV labelling DICOM files (SOPInstanceUID or "
            "AccessionNumber, label) or a sheet of image names and BI-RADS (.csv, or .xlsx "
            "with openpyxl installed)"
        ],
    )


def _is_table(path: Path) -> bool:
    return path.suffix.lower() in TABLE_SUFFIXES and not path.name.startswith((".", "~$"))


def _visible(path: Path, root: Path) -> bool:
    return not any(part.startswith(".") for part in path.relative_to(root).parts)


def load_folders(root: Path, labels: Sequence[str] | None = None) -> LabelledDataSet:
    """A folder per class (the BUSI layout): the class is the folder's name."""
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DataSetError(
            root, ["no sub-folders (one per class) and no table (.csv / .xlsx) labelling the images"]
        )
    problems: list[str] = []
    examples: list[Example] = []
    found: dict[str, Path] = {}
    masks = 0
    for folder in folders:
        label = canonical_label(folder.name)
        if label in found:
            problems.append(f"{folder.name}/ and {found[label].name}/ are the same class {label!r}")
            continue
        found[label] = folder
        files = sorted(p for p in folder.rglob("*") if p.is_file() and _visible(p, root))
        images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
        masks += sum(MASK_MARKER in p.stem.lower() for p in images)
        images = [p for p in images if MASK_MARKER not in p.stem.lower()]
        if not images:
            problems.append(f"{folder.name}/: no images (.png, .jpg, .dcm): an empty class")
        for image in images:
            patient = _dicom_patient(image, problems) if image.suffix.lower() in DICOM_SUFFIXES else None
            examples.append(Example(image, label, patient, origin=image.relative_to(root).as_posix()))
    order = _ordered(found, labels, problems)
    _raise_if_any(root, problems)
    return LabelledDataSet(root, root, "folders", order, tuple(examples), ignored=masks)


def load_table(path: Path, labels: Sequence[str] | None = None) -> LabelledDataSet:
    """A table (``.csv``, or ``.xlsx`` with openpyxl): a manifest, DICOM labels or a BI-RADS sheet,
    told apart by its columns."""
    header, rows = _read_table(path)
    columns = {_column_key(name): name for name in header if name}
    if _first(columns, _PATH_COLUMNS) and _first(columns, (*_LABEL_COLUMNS, *_BIRADS_COLUMNS)):
        return _load_manifest(path, columns, rows, labels)
    if (_UID_COLUMN in columns or _ACCESSION_COLUMN in columns) and _first(
        columns, (*_LABEL_COLUMNS, *_BIRADS_COLUMNS)
    ):
        return _load_dicom_labels(path, columns, rows, labels)
    if _first(columns, _NAME_COLUMNS) and _first(columns, _BIRADS_COLUMNS):
        return _load_spreadsheet(path, columns, rows, labels)
    raise DataSetError(
        path,
        [
            f"cannot tell what this table is: its columns are {', '.join(header) or 'none'}; expected "
            "path,label[,patient_id] (a manifest), SOPInstanceUID or AccessionNumber with label "
            "(DICOM labels), or an image name and BI-RADS (a sheet like CDD-CESM's)"
        ],
    )


Row = tuple[int, dict[str, str]]
"""A table row: its line (or sheet row) number and its cells by column name."""


def _column_key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _first(columns: Mapping[str, str], candidates: Sequence[str]) -> str | None:
    return next((columns[key] for key in candidates if key in columns), None)


def _read_table(path: Path) -> tuple[list[str], list[Row]]:
    return _read_xlsx(path) if path.suffix.lower() == ".xlsx" else _read_csv(path)


def _read_csv(path: Path) -> tuple[list[str], list[Row]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise DataSetError(path, ["not UTF-8 text: save the table as CSV UTF-8"]) from None
    except OSError as error:
        raise DataSetError(path, [f"cannot read it ({error.strerror or error})"]) from None
    lines = text.splitlines(keepends=True)
    if not lines:
        raise DataSetError(path, ["empty table: no header row"])
    reader = csv.reader(lines, dialect=_dialect(text))
    try:
        header = [name.strip() for name in next(reader)]
        rows: list[Row] = []
        for cells in reader:
            if any(cell.strip() for cell in cells):
                values = [cell.strip() for cell in cells] + [""] * (len(header) - len(cells))
                rows.append((reader.line_num, dict(zip(header, values, strict=False))))
    except csv.Error as error:
        raise DataSetError(path, [f"line {reader.line_num}: not valid CSV ({error})"]) from None
    return header, rows


def _dialect(text: str) -> type[csv.Dialect]:
    """Comma-separated, unless the header says semicolons or tabs (European spreadsheet exports)."""
    first = text.splitlines()[0] if text else ""
    try:
        return csv.Sniffer().sniff(first, delimiters=",;\t")
    except csv.Error:
        return csv.excel


def _read_xlsx(path: Path) -> tuple[list[str], list[Row]]:
    """The first sheet of a workbook; openpyxl is optional, so its absence is a clear error."""
    try:
        openpyxl = importlib.import_module("openpyxl")
    except ImportError:
        raise DataSetError(
            path,
            [
                "reading .xlsx needs the openpyxl package, which is not installed: save the "
                "sheet as CSV and use that, or pip install openpyxl"
            ],
        ) from None
    try:
        book = openpyxl.load_workbook(path, read_only=True, data_only=True)
        cells = [list(row) for row in book.worksheets[0].iter_rows(values_only=True)]
        book.close()
    except Exception as error:  # the parser boundary: openpyxl raises many kinds on bad files
        raise DataSetError(
            path, [f"not a readable .xlsx workbook ({type(error).__name__}: {error})"]
        ) from None
    if not cells:
        raise DataSetError(path, ["empty sheet: no header row"])
    header = [_cell_text(value) for value in cells[0]]
    rows = [
        (number, dict(zip(header, (_cell_text(value) for value in row), strict=False)))
        for number, row in enumerate(cells[1:], start=2)
        if any(_cell_text(value) for value in row)
    ]
    return header, rows


def _cell_text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _origin(table: Path, line: int) -> str:
    return f"{table.name} line {line}"


def _frame(cells: Mapping[str, str], column: str | None, where: str, problems: list[str]) -> int | None:
    text = cells.get(column, "") if column else ""
    if not text:
        return None
    if not text.isdigit():
        problems.append(f"{where}: frame {text!r} is not a frame number (0, 1, ...)")
        return None
    return int(text)


def _load_manifest(
    table: Path, columns: Mapping[str, str], rows: list[Row], labels: Sequence[str] | None
) -> LabelledDataSet:
    root = table.parent
    path_column = _first(columns, _PATH_COLUMNS) or ""
    label_column = _first(columns, _LABEL_COLUMNS)
    birads = label_column is None
    label_column = label_column or _first(columns, _BIRADS_COLUMNS) or ""
    patient_column = _first(columns, _PATIENT_COLUMNS)
    frame_column = _first(columns, _FRAME_COLUMNS)
    problems: list[str] = []
    examples: list[Example] = []
    found: dict[str, str] = {}
    seen: dict[tuple[Path, int | None], int] = {}
    for line, cells in rows:
        where = _origin(table, line)
        name, label = cells.get(path_column, ""), canonical_label(cells.get(label_column, ""), birads)
        if not name:
            problems.append(f"{where}: no path")
            continue
        if not label:
            problems.append(f"{where}: {name}: no label")
            continue
        path = root / name
        frame = _frame(cells, frame_column, where, problems)
        if not path.is_file():
            problems.append(f"{where}: {name}: {'is a folder' if path.is_dir() else 'no such file'}")
            continue
        if (path, frame) in seen:
            problems.append(f"{where}: {name} is listed again (first on line {seen[path, frame]})")
            continue
        seen[path, frame] = line
        patient = cells.get(patient_column, "") if patient_column else ""
        if not patient and path.suffix.lower() not in PICTURE_SUFFIXES:
            patient = _dicom_patient(path, problems, where) or ""
        found.setdefault(label, where)
        examples.append(Example(path, label, patient or None, frame, origin=where))
    order = _ordered(found, labels, problems)
    _raise_if_any(table, problems)
    return LabelledDataSet(table, root, "manifest", order, tuple(examples))


@dataclass
class _DicomIndex:
    """The DICOM images under a folder, by SOP Instance UID and by Accession Number."""

    by_uid: dict[str, list[Path]] = field(default_factory=dict)
    by_accession: dict[str, list[Path]] = field(default_factory=dict)
    patient: dict[Path, str | None] = field(default_factory=dict)
    not_images: dict[str, Path] = field(default_factory=dict)


def _index_dicom(root: Path, skip: Path, problems: list[str]) -> _DicomIndex:
    index = _DicomIndex()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and _visible(p, root) and p != skip):
        if path.suffix.lower() in PICTURE_SUFFIXES | TABLE_SUFFIXES:
            continue
        try:
            header = dcmread(path, defer_size="1 KB", specific_tags=[*_DICOM_KEYS, *_PIXEL_KEYWORDS])
        except InvalidDicomError:
            if path.suffix.lower() in DICOM_SUFFIXES:
                problems.append(f"{path.relative_to(root)}: not a DICOM file")
            continue  # other files (notes, exports) may sit beside the images
        except Exception as error:  # the parser boundary: pydicom raises many kinds on broken files
            problems.append(f"{path.relative_to(root)}: unreadable DICOM file ({error})")
            continue
        uid = str(header.get("SOPInstanceUID", "") or "")
        if not any(keyword in header for keyword in _PIXEL_KEYWORDS):
            index.not_images[uid] = path
            continue
        index.by_uid.setdefault(uid, []).append(path)
        accession = str(header.get("AccessionNumber", "") or "")
        if accession:
            index.by_accession.setdefault(accession, []).append(path)
        index.patient[path] = str(header.get("PatientID", "") or "") or None
    return index


def _load_dicom_labels(
    table: Path, columns: Mapping[str, str], rows: list[Row], labels: Sequence[str] | None
) -> LabelledDataSet:
    root = table.parent
    by_uid = _UID_COLUMN in columns
    key_column = columns[_UID_COLUMN if by_uid else _ACCESSION_COLUMN]
    label_column = _first(columns, _LABEL_COLUMNS)
    birads = label_column is None
    label_column = label_column or _first(columns, _BIRADS_COLUMNS) or ""
    frame_column = _first(columns, _FRAME_COLUMNS)
    problems: list[str] = []
    index = _index_dicom(root, table, problems)
    examples: list[Example] = []
    found: dict[str, str] = {}
    labelled: dict[tuple[Path, int | None], int] = {}
    for line, cells in rows:
        where = _origin(table, line)
        key, label = cells.get(key_column, ""), canonical_label(cells.get(label_column, ""), birads)
        frame = _frame(cells, frame_column, where, problems)
        if not key or not label:
            problems.append(f"{where}: no {key_column if not key else 'label'}")
            continue
        # The same instance saved twice is one image.
        paths = index.by_uid.get(key, [])[:1] if by_uid else index.by_accession.get(key, [])
        if not paths:
            reason = "is not an image (no pixel data)" if key in index.not_images else "matches no DICOM file"
            problems.append(f"{where}: {key_column} {key} {reason} under {root}")
            continue
        for path in paths:
            if (path, frame) in labelled:
                first = labelled[path, frame]
                problems.append(
                    f"{where}: {path.relative_to(root)} is labelled again (first on line {first})"
                )
                continue
            labelled[path, frame] = line
            found.setdefault(label, where)
            examples.append(Example(path, label, index.patient[path], frame, origin=where))
    order = _ordered(found, labels, problems)
    _raise_if_any(table, problems)
    unused = sum(len(paths) for paths in index.by_uid.values()) - len({path for path, _ in labelled})
    ignored = unused + len(index.not_images)
    return LabelledDataSet(table, root, "dicom", order, tuple(examples), ignored=ignored)


def _load_spreadsheet(
    table: Path, columns: Mapping[str, str], rows: list[Row], labels: Sequence[str] | None
) -> LabelledDataSet:
    root = table.parent
    name_column = _first(columns, _NAME_COLUMNS) or ""
    birads_column = _first(columns, _BIRADS_COLUMNS) or ""
    patient_column = _first(columns, _PATIENT_COLUMNS)
    images = [
        p for p in root.rglob("*") if p.is_file() and _visible(p, root) and p.suffix.lower() in IMAGE_SUFFIXES
    ]
    by_name: dict[str, list[Path]] = {}
    for image in sorted(images):
        by_name.setdefault(image.name.lower(), []).append(image)
        by_name.setdefault(image.stem.lower(), []).append(image)
    problems: list[str] = []
    examples: list[Example] = []
    found: dict[str, str] = {}
    seen: dict[Path, int] = {}
    for line, cells in rows:
        where = _origin(table, line)
        name, category = cells.get(name_column, ""), cells.get(birads_column, "")
        if not name:
            problems.append(f"{where}: no image name")
            continue
        if not category:
            problems.append(f"{where}: {name}: no BI-RADS category")
            continue
        matches = by_name.get(name.lower(), [])
        if len(matches) != 1:
            if matches:
                names = ", ".join(str(p.relative_to(root)) for p in matches)
                problems.append(f"{where}: {name} matches several files ({names})")
            else:
                problems.append(f"{where}: no image file named {name} under {root}")
            continue
        path = matches[0]
        if path in seen:
            problems.append(f"{where}: {name} is listed again (first on line {seen[path]})")
            continue
        seen[path] = line
        label = canonical_label(category, birads=True)
        patient = cells.get(patient_column, "") if patient_column else ""
        if not patient and path.suffix.lower() in DICOM_SUFFIXES:
            patient = _dicom_patient(path, problems, where) or ""
        found.setdefault(label, where)
        examples.append(Example(path, label, patient or None, origin=where))
    order = _ordered(found, labels, problems)
    _raise_if_any(table, problems)
    return LabelledDataSet(
        table, root, "spreadsheet", order, tuple(examples), ignored=len(images) - len(seen)
    )


def _dicom_patient(path: Path, problems: list[str], where: str | None = None) -> str | None:
    """The file's PatientID, None when empty; an unreadable header is a problem."""
    try:
        header = dcmread(path, specific_tags=["PatientID"], stop_before_pixels=True)
    except Exception as error:  # the parser boundary: pydicom raises many kinds on broken files
        problems.append(f"{where or path}: unreadable DICOM file ({type(error).__name__}: {error})")
        return None
    return str(header.get("PatientID", "") or "") or None


def _ordered(
    found: Mapping[str, object], given: Sequence[str] | None, problems: list[str]
) -> tuple[str, ...]:
    try:
        return order_labels(found, given)
    except LabelOrderError as error:
        problems.append(str(error))
        return tuple(found)


def _raise_if_any(source: Path, problems: Sequence[str]) -> None:
    if problems:
        raise DataSetError(source, problems)


# --- pixels -----------------------------------------------------------------------------------


def read_pixels(example: Example) -> np.ndarray:
    """The example's image as the model pipeline sees it: (H, W) float32 in [0, 1], cropped.

    DICOM goes through :func:`workers.decode.decode_for_analysis` (ultrasound regions and
    blank borders cropped, the LUTs applied); PNG and JPEG are read with Pillow, colour
    turned to gray with the same weights, and cropped of blank borders the same way.
    Raises :class:`ImageReadError` naming the file and the reason.
    """
    path = example.path
    if path.suffix.lower() in PICTURE_SUFFIXES:
        if example.frame is not None:
            raise ImageReadError(path, f"frame {example.frame} given, but the file is not DICOM")
        gray = _picture(path)
        top, left, bottom, right = blank_border_box(gray)
        return np.ascontiguousarray(gray[top:bottom, left:right])
    return _dicom_frame(path, example.frame)


def _picture(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            image.load()
            return _gray(image)
    except FileNotFoundError:
        raise ImageReadError(path, "no such file") from None
    except Exception as error:  # the parser boundary: Pillow raises many kinds on broken files
        raise ImageReadError(path, f"not a readable image ({type(error).__name__}: {error})") from None


def _gray(image: Image.Image) -> np.ndarray:
    """Grayscale in [0, 1]: 8 bits over 255, 16 bits over 65535, colour by ITU-R BT.601 luma."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        gray = np.asarray(image, dtype=np.float32) / np.float32(65535.0)
    elif image.mode == "F":
        gray = np.asarray(image, dtype=np.float32)
    elif image.mode == "L":
        gray = np.asarray(image, dtype=np.float32) / np.float32(255.0)
    else:
        gray = (np.asarray(image.convert("RGB"), dtype=np.float32) / np.float32(255.0)) @ _LUMA
    return np.asarray(np.clip(gray, 0.0, 1.0), dtype=np.float32)


def _dicom_frame(path: Path, frame: int | None) -> np.ndarray:
    try:
        if frame is None:
            return decode_for_analysis(path).frames[0].pixels
        # A chosen frame: decode them all and take it (decode_for_analysis selects by policy).
        decoded = decode_for_analysis(path, policy="each", max_frames=2**31 - 1)
    except FileNotFoundError:
        raise ImageReadError(path, "no such file") from None
    except OSError as error:
        raise ImageReadError(path, f"cannot read it ({error.strerror or error})") from None
    except PixelError as error:
        raise ImageReadError(path, str(error)) from None
    if frame >= decoded.number_of_frames:
        raise ImageReadError(path, f"frame {frame} requested but the file has {decoded.number_of_frames}")
    return next(f.pixels for f in decoded.frames if f.index == frame)


# --- splits -----------------------------------------------------------------------------------


def holdout_split(examples: Sequence[Example], test_fraction: float = 0.2, seed: int = 0) -> Split:
    """Train and test sides (e.g. 80:20) with no patient on both, stratified by class.

    Images without a patient id are their own group: nothing better is known. The same
    examples and seed always give the same split. Raises ValueError when there are fewer than
    two groups to divide.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be between 0 and 1, not {test_fraction}")
    groups, assigned = _assign(examples, (1.0 - test_fraction, test_fraction), seed)
    if not any(side == 1 for side in assigned):  # tiny data: the smallest group is tested
        assigned[min(range(len(groups)), key=lambda g: (len(groups[g]), g))] = 1
    if all(side == 1 for side in assigned):
        raise ValueError("too few patients (or images) to hold some out and train on the rest")
    train = sorted(i for g, members in enumerate(groups) if assigned[g] == 0 for i in members)
    test = sorted(i for g, members in enumerate(groups) if assigned[g] == 1 for i in members)
    return Split(tuple(train), tuple(test))


def fold_splits(examples: Sequence[Example], folds: int, seed: int = 0) -> tuple[Split, ...]:
    """K splits for cross-validation: each example is tested in exactly one, by patient, stratified."""
    if folds < 2:
        raise ValueError(f"cross-validation needs at least 2 folds, not {folds}")
    groups, assigned = _assign(examples, (1.0 / folds,) * folds, seed)
    if len(groups) < folds or len(set(assigned)) < folds:
        raise ValueError(f"{len(groups)} patients (or images without one) cannot fill {folds} folds")
    splits = []
    for fold in range(folds):
        test = sorted(i for g, members in enumerate(groups) if assigned[g] == fold for i in members)
        train = sorted(i for g, members in enumerate(groups) if assigned[g] != fold for i in members)
        splits.append(Split(tuple(train), tuple(test)))
    return tuple(splits)


def _assign(
    examples: Sequence[Example], weights: Sequence[float], seed: int
) -> tuple[list[list[int]], list[int]]:
    """Groups of example indices (one per patient) and the side each group goes to.

    Greedy: groups in random order (from ``seed``), largest first, each to the side where it
    least increases the squared distance of the per-class counts from their targets (each
    class's total times the side's weight).
    """
    by_group: dict[str, list[int]] = {}
    for i, example in enumerate(examples):
        by_group.setdefault(example.group, []).append(i)
    if len(by_group) < 2:
        raise ValueError(f"{len(by_group)} patient(s) or image(s): too few to split")
    groups = [by_group[key] for key in sorted(by_group)]
    classes = sorted({example.label for example in examples})
    vectors = np.zeros((len(groups), len(classes)))
    for g, members in enumerate(groups):
        for i in members:
            vectors[g, classes.index(examples[i].label)] += 1
    targets = np.outer(np.asarray(weights), vectors.sum(axis=0))
    counts = np.zeros_like(targets)
    shuffled = np.random.default_rng(seed).permutation(len(groups))
    order = sorted(shuffled.tolist(), key=lambda g: -len(groups[g]))  # stable: ties stay shuffled
    assigned = [0] * len(groups)
    for g in order:
        vector = vectors[g]
        cost = (vector * (2.0 * (counts - targets) + vector)).sum(axis=1)
        room = (targets - counts).sum(axis=1)
        side = min(range(len(weights)), key=lambda s: (cost[s], -room[s], s))
        assigned[g] = side
        counts[side] += vector
    return groups, assigned
