"""``precedent demo``: the whole node at work in a few minutes, on synthetic phantoms only.

One command a new user runs to see what Precedent does, with no clinical data and no server:

1. phantoms (:mod:`workers.phantoms`): a training set, and a second set of other patients (another
   seed, never trained on) that plays the modality's studies;
2. a small model bundle (``cnn4``) trained on the first set by :mod:`workers.train`, its held-out
   accuracy shown;
3. the node on its embedded defaults, in this process (:class:`node.service.Node`: SQLite catalog,
   file-system broker, one ``precedent worker`` child), with its settings written to a TOML file
   the user can run again with ``precedent serve --config``;
4. the studies pushed over DICOM (C-STORE, pynetdicom);
5. the results awaited in the catalog: a study is done when its newest assessment is finished
   and no image arrived after it;
6. per study: the finding and its probability, Grad-CAM PNGs made from the stored secondary
   captures, the SR as text (DCMTK ``dsrdump`` when installed, else a plain rendering), and the
   similar studies the similarity AE title answers to a real C-FIND;
7. the node stopped.

Everything lives under one folder (``--dir``), marked as the demo's so that a rerun may replace
what it made there (the node's data, PNGs, report texts) and so that a folder of anything else is
refused. Reruns reuse the phantoms and the bundle made with the same options; an interrupted
training resumes from its last epoch. Results on phantoms are labelled as such wherever they
appear: on screen, in the saved texts, in the SR and on the captures.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from types import FrameType
from typing import TYPE_CHECKING, Any

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, UltrasoundImageStorage
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore[attr-defined]
from rich import box
from rich.console import Console, JustifyMethod
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text
from sqlalchemy import func, select

from node.catalog.models import ANALYSES, EMBEDDINGS, INSTANCES, RESULTS, STUDIES, STUDY_ASSESSMENTS
from node.catalog.recording import Catalog
from node.catalog.results import GRADCAM, REPORT
from node.catalog.work import UNFINISHED
from node.errors import StartupError
from node.logs import OneLineFormatter
from node.settings import ConfigError, Settings, load_settings
from node.similar import DISTANCE_OFFSET, FINDING_OFFSET, PRIVATE_CREATOR, PRIVATE_GROUP, RANK_OFFSET
from workers.phantoms import LABELS, MANIFEST, write_dicom_phantoms

if TYPE_CHECKING:
    from node.service import Node
    from workers.train import Progress as TrainingStep

__all__ = [
    "MARKER",
    "NOT_FOR_CLINICAL_USE",
    "DemoError",
    "DemoLayout",
    "DemoOptions",
    "DemoResult",
    "PushedImage",
    "SimilarCase",
    "StudyResult",
    "demo_settings",
    "plain_sr",
    "prepare_folder",
    "read_manifest",
    "render_sr",
    "run_demo",
    "similar_studies",
    "toml_text",
]

NOT_FOR_CLINICAL_USE = "synthetic phantoms — not for clinical use"
"""The words every demo result carries (the same the node's results use for a phantom model)."""

ARCHITECTURE = "cnn4"
"""Small enough to train in a minute on two CPU cores, and a real architecture of the registry."""
CALLING_AE_TITLE = "PRECEDENT_DEMO"
MARKER = ".precedent-demo"
"""A file in the demo folder: a rerun may replace what the demo made there, nothing else is touched."""
SIMILAR_K = 3
MAX_DEMO_SIZE = 512
LOCALHOST = "127.0.0.1"
TRAINING_THREADS = 1
"""The model is tiny: one thread is as fast on a big machine and much faster on a busy small one,
where the idle threads of torch's pool spin and take the core from the one that works."""

_POLL_SECONDS = 0.5
_INDEX_WAIT_SECONDS = 30.0
_PENDING_STATUSES = (0xFF00, 0xFF01)
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class DemoError(Exception):
    """The demo cannot go on; the message says why and what to do."""


@dataclass(frozen=True)
class DemoOptions:
    """What the demo makes and how long it may wait; invalid options raise ValueError."""

    directory: Path = Path("precedent-demo")
    n: int = 300
    """Phantom images to train the demo model on."""
    push: int = 30
    """Phantom images of other patients sent to the node as its studies."""
    epochs: int = 15
    size: int = 64
    seed: int = 0
    port: int | None = None
    """The node's DICOM port on 127.0.0.1; None: a free one."""
    timeout: float = 300.0
    """Seconds to wait for the results once the studies are sent."""

    def __post_init__(self) -> None:
        for name, least in (("n", 2), ("push", 1), ("epochs", 1), ("size", 32), ("seed", 0)):
            value = getattr(self, name)
            if type(value) is not int or value < least:
                raise ValueError(f"--{name} must be a whole number of at least {least}, not {value!r}")
        if self.size > MAX_DEMO_SIZE:
            raise ValueError(f"--size must be at most {MAX_DEMO_SIZE} pixels for the demo, not {self.size}")
        if self.port is not None and not 1 <= self.port <= 65535:
            raise ValueError(f"--port must be 1 to 65535, not {self.port}")
        if not self.timeout > 0:
            raise ValueError(f"--timeout must be a positive number of seconds, not {self.timeout}")


@dataclass(frozen=True)
class DemoLayout:
    """Where the demo keeps everything, under one folder; names carry the options that made
    them, so a rerun with other options makes new phantoms and a new model beside the old."""

    root: Path
    training_phantoms: Path
    study_phantoms: Path
    bundle: Path
    config: Path
    data: Path
    log: Path
    gradcam: Path
    reports: Path
    results: Path

    @classmethod
    def of(cls, options: DemoOptions) -> DemoLayout:
        root = options.directory.expanduser().absolute()
        phantoms = root / "phantoms"
        trained_with = f"{options.size}px-{options.epochs}ep-n{options.n}-seed{options.seed}"
        return cls(
            root=root,
            training_phantoms=phantoms / f"training-n{options.n}-seed{options.seed}",
            study_phantoms=phantoms / f"studies-n{options.push}-seed{options.seed}",
            bundle=root / "model" / f"demo-{ARCHITECTURE}-{trained_with}.bundle",
            config=root / "precedent-demo.toml",
            data=root / "data",
            log=root / "node.log",
            gradcam=root / "gradcam",
            reports=root / "reports",
            results=root / "results.txt",
        )


@dataclass(frozen=True)
class PushedImage:
    """One phantom sent to the node, as ``labels.csv`` lists it."""

    path: Path
    label: str
    patient_id: str
    study_instance_uid: str
    sop_instance_uid: str


@dataclass(frozen=True)
class SimilarCase:
    """One match of a similarity C-FIND: a stored study, its rank, distance and finding."""

    rank: int
    distance: float
    finding: str
    study_instance_uid: str
    accession_number: str
    patient_id: str


@dataclass
class StudyResult:
    """What the node made of one pushed study."""

    number: int
    study_instance_uid: str
    patient_id: str
    label: str
    """The phantom's true class (from ``labels.csv``), which the node never sees."""
    images: int
    accession_number: str = ""
    state: str = ""
    finding: str | None = None
    probability: float | None = None
    reason: str = ""
    report: Path | None = None
    """The stored SR file."""
    captures: list[Path] = field(default_factory=list)
    """The stored Grad-CAM secondary capture files, in image order."""
    pngs: list[Path] = field(default_factory=list)
    report_text: Path | None = None
    similar: list[SimilarCase] = field(default_factory=list)
    similar_error: str = ""

    @property
    def name(self) -> str:
        """The file-name stem of the study's outputs: its number (file names are never made of
        identifiers a peer sent)."""
        return f"study-{self.number:02d}"


@dataclass(frozen=True)
class DemoResult:
    layout: DemoLayout
    bundle_id: str
    trained: bool
    studies: list[StudyResult]
    seconds: float

    def nearest_same_finding(self) -> tuple[int, int]:
        """(studies whose most similar study has the same finding, studies with a match)."""
        matched = [s for s in self.studies if s.similar and s.finding]
        return sum(s.similar[0].finding == s.finding for s in matched), len(matched)

    def finding_is_label(self) -> tuple[int, int]:
        """(studies whose finding is the phantom's true class, studies with a finding)."""
        found = [s for s in self.studies if s.finding]
        return sum(s.finding == s.label for s in found), len(found)


# --- the whole run -----------------------------------------------------------------------------


def run_demo(options: DemoOptions, console: Console) -> DemoResult:
    """Run the demo, narrating on ``console``; raise :class:`DemoError` when it cannot go on.

    KeyboardInterrupt (Ctrl-C, and SIGTERM, which is turned into one) stops the node before it
    propagates; a rerun goes on from what was kept (phantoms, the model or its checkpoints).
    """
    started = time.monotonic()
    layout = DemoLayout.of(options)
    console.rule(f"Precedent demo — {NOT_FOR_CLINICAL_USE}")
    prepare_folder(layout.root)
    with _sigterm_as_interrupt(), _own_settings(console), _logging_to(layout.log, options):
        if options.port is not None:
            _check_port(options.port)
        studies = _phantoms(layout, options, console)
        bundle_id, trained = _model(layout, options, console)
        settings = _settings(layout, options.port or _free_port())
        _run_node(settings, layout, studies, options.timeout, console)
    _write_outputs(studies, layout)
    result = DemoResult(layout, bundle_id, trained, studies, time.monotonic() - started)
    _show(result, settings, console)
    return result


# --- the folder --------------------------------------------------------------------------------


def prepare_folder(root: Path) -> None:
    """Make ``root`` the demo's folder: new, empty, or one an earlier demo made (its marker)."""
    if root.exists() and not root.is_dir():
        raise DemoError(f"--dir {root} exists and is not a folder; name a new folder")
    try:
        if root.is_dir() and not (root / MARKER).exists() and any(root.iterdir()):
            raise DemoError(
                f"--dir {root} is not empty and not an earlier demo's folder; name a new or empty folder"
            )
        root.mkdir(parents=True, exist_ok=True)
        (root / MARKER).write_text(
            f"made by `precedent demo`: {NOT_FOR_CLINICAL_USE}; a rerun replaces what it made here\n",
            encoding="utf-8",
        )
    except OSError as exc:
        raise DemoError(f"cannot write to --dir {root}: {exc.strerror or exc}") from None


# --- step 1: phantoms --------------------------------------------------------------------------


def _phantoms(layout: DemoLayout, options: DemoOptions, console: Console) -> list[StudyResult]:
    """The training phantoms (unless the model is already trained) and the study phantoms.

    The sets are written with the seeds 2·seed and 2·seed + 1: phantoms of different seeds never
    share a patient, so the studies are of patients the model has not seen."""
    _step(console, "1/5 phantoms", "synthetic breast ultrasound images as DICOM files")
    if not layout.bundle.exists():
        written = _ensure_phantoms(layout.training_phantoms, options.n, 2 * options.seed)
        _say(console, f"  {options.n} training images {_made(written)} in {_shown(layout.training_phantoms)}")
    written = _ensure_phantoms(layout.study_phantoms, options.push, 2 * options.seed + 1)
    images = read_manifest(layout.study_phantoms)
    studies = _studies_of(images)
    patients = len({image.patient_id for image in images})
    _say(
        console,
        f"  {len(images)} images in {len(studies)} studies of {patients} other patients to push, "
        f"{_made(written)} in {_shown(layout.study_phantoms)}",
    )
    return studies


def _ensure_phantoms(folder: Path, n: int, seed: int) -> bool:
    """Write the phantoms unless an earlier run did (``labels.csv`` is written last); True if written."""
    if (folder / MANIFEST).exists():
        return False
    try:
        write_dicom_phantoms(folder, n, seed)
    except OSError as exc:
        raise DemoError(f"cannot write phantoms to {folder}: {exc.strerror or exc}") from None
    return True


def read_manifest(folder: Path) -> list[PushedImage]:
    """The phantoms ``labels.csv`` lists, in its order."""
    try:
        with (folder / MANIFEST).open(newline="", encoding="utf-8") as manifest:
            rows = list(csv.DictReader(manifest))
        return [
            PushedImage(
                folder / PurePosixPath(row["path"]),
                row["label"],
                row["patient_id"],
                row["study_instance_uid"],
                row["sop_instance_uid"],
            )
            for row in rows
        ]
    except (OSError, KeyError, csv.Error) as exc:
        raise DemoError(
            f"cannot read {folder / MANIFEST}: {exc}; delete the folder to write it again"
        ) from None


def _studies_of(images: Sequence[PushedImage]) -> list[StudyResult]:
    studies: dict[str, StudyResult] = {}
    for image in images:
        if image.study_instance_uid not in studies:
            studies[image.study_instance_uid] = StudyResult(
                len(studies) + 1, image.study_instance_uid, image.patient_id, image.label, 0
            )
        studies[image.study_instance_uid].images += 1
    return list(studies.values())


# --- step 2: the model ------------------------------------------------------------------------


def _model(layout: DemoLayout, options: DemoOptions, console: Console) -> tuple[str, bool]:
    """The demo bundle: the one an earlier run trained with the same options, or a new one."""
    from workers.bundles import BundleError, load_bundle
    from workers.train import metrics_lines

    _step(console, "2/5 model", f"{ARCHITECTURE}, trained on phantoms only")
    trained = not layout.bundle.exists()
    if trained:
        description, bundle_id = _train(layout, options, console)
    else:
        try:
            bundle = load_bundle(layout.bundle)
        except BundleError as exc:
            raise DemoError(f"{exc}; delete it to train it again") from None
        description, bundle_id = bundle.description, bundle.id
        _say(console, f"  reusing {_shown(layout.bundle)}, trained by an earlier run with the same options")
    for line in metrics_lines(description)[:2]:
        _say(console, f"  {line}")
    return bundle_id, trained


def _train(layout: DemoLayout, options: DemoOptions, console: Console) -> tuple[dict[str, Any], str]:
    from workers.datasets import DataSetError, load_data_set
    from workers.train import TrainingError, TrainingOptions, train

    training = TrainingOptions(
        architecture=ARCHITECTURE,
        epochs=options.epochs,
        size=options.size,
        seed=options.seed,
        device="cpu",
        threads=TRAINING_THREADS,
    )
    _say(
        console,
        f"  training at {options.size} px for up to {options.epochs} epochs on {options.n} images "
        "(80:20 split by patient; if interrupted, a rerun resumes)",
    )
    try:
        layout.bundle.parent.mkdir(parents=True, exist_ok=True)
        data = load_data_set(layout.training_phantoms / MANIFEST)
        with _bars(console) as bars:
            result = train(data, layout.bundle, training, _TrainingBars(bars, options.epochs))
    except (DataSetError, TrainingError, OSError) as exc:
        raise DemoError(f"training the demo model failed: {exc} (more phantoms may help: --n)") from None
    _say(console, f"  wrote {_shown(layout.bundle)} in {result.description['training']['duration_s']:.0f} s")
    return result.description, result.bundle_id


class _TrainingBars:
    """Training's progress as two bars: images decoded, then epochs (filled batch by batch)."""

    def __init__(self, bars: Progress, epochs: int) -> None:
        self._bars = bars
        self._epochs = epochs
        self._decode: TaskID | None = None
        self._train: TaskID | None = None
        self._done = 0
        self._accuracy = ""

    def __call__(self, step: TrainingStep) -> None:
        if step.task == "decode":
            if self._decode is None:
                self._decode = self._bars.add_task("decoding phantoms", total=step.total, status="")
            self._bars.update(self._decode, completed=step.completed)
            return
        if self._train is None:
            self._train = self._bars.add_task("epochs", total=self._epochs, status="")
        if step.task == "batch":
            self._bars.update(self._train, completed=self._done + step.completed / max(1, step.total))
            return
        self._done = step.completed
        self._accuracy = f"validation accuracy {step.values['val_accuracy']:.2f}"
        stopped = bool(step.values.get("stopped"))
        self._bars.update(
            self._train,
            completed=self._done,
            total=self._done if stopped else self._epochs,
            status=self._accuracy + (" (stopped early: no better)" if stopped else ""),
        )


# --- step 3: the node's settings ---------------------------------------------------------------


def demo_settings(layout: DemoLayout, port: int) -> dict[str, dict[str, Any]]:
    """The node's settings for the demo: the embedded defaults but for these."""
    return {
        "dicom": {"bind": LOCALHOST, "port": port, "shutdown_timeout": 10.0},
        "storage": {"data_dir": str(layout.data), "min_free_bytes": 64 * 1024**2},
        "queue": {"serve_workers": 1},
        "study": {"stable_seconds": 2.0},
        "model": {"bundle": str(layout.bundle), "threads": 1},
        "similarity": {"k": SIMILAR_K},
        "logging": {"level": "INFO"},
    }


def toml_text(sections: Mapping[str, Mapping[str, Any]]) -> str:
    """Sections of plain values as TOML (JSON's string escapes are TOML's)."""
    import json

    lines = [
        f"# The node `precedent demo` ran ({NOT_FOR_CLINICAL_USE}).",
        "# Run it again with: precedent serve --config <this file>",
    ]
    for section, values in sections.items():
        lines.append(f"\n[{section}]")
        for key, value in values.items():
            text = ("true" if value else "false") if isinstance(value, bool) else json.dumps(value)
            lines.append(f"{key} = {text}")
    return "\n".join(lines) + "\n"


def _settings(layout: DemoLayout, port: int) -> Settings:
    try:
        layout.config.write_text(toml_text(demo_settings(layout, port)), encoding="utf-8")
        return load_settings(layout.config)
    except OSError as exc:
        raise DemoError(f"cannot write {layout.config}: {exc.strerror or exc}") from None
    except ConfigError as exc:
        raise DemoError(str(exc)) from None


def _check_port(port: int) -> None:
    """Fail now, before minutes of training, if another program listens on ``port``."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((LOCALHOST, port))
        except OSError as exc:
            raise DemoError(
                f"port {port} on {LOCALHOST} is not free ({exc.strerror or exc}): "
                "name another with --port, or leave --port out to take a free one"
            ) from None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOCALHOST, 0))
        return int(probe.getsockname()[1])


# --- steps 3-6: the node at work --------------------------------------------------------------


def _run_node(
    settings: Settings, layout: DemoLayout, studies: list[StudyResult], timeout: float, console: Console
) -> None:
    """Start the node on a fresh data folder, push, wait, query, and always stop it."""
    from node.service import Node

    for made in (layout.data, layout.gradcam, layout.reports):
        shutil.rmtree(made, ignore_errors=True)
    dicom = settings.dicom
    _step(
        console,
        "3/5 node",
        f"{dicom.ae_title} (similar cases: {dicom.similar_ae_title}) on {dicom.bind}:{dicom.port}, "
        f"one analysis worker, files, catalog and queue in {_shown(layout.data)}, log {_shown(layout.log)}",
    )
    try:
        node = Node(settings, layout.config)
    except StartupError as exc:
        raise DemoError(f"the node cannot start: {exc}") from None
    try:
        try:
            with _children_output_to(layout.log):
                _, port = node.start()
        except StartupError as exc:
            raise DemoError(f"the node cannot start: {exc}") from None
        images = read_manifest(layout.study_phantoms)
        _push(images, port, dicom.ae_title, console)
        _wait(node, images, studies, timeout, layout.log, console)
        _collect(node, studies)
        _wait_for_index(node, images)
        _similar(port, dicom.similar_ae_title, studies)
    finally:
        with console.status("stopping the node"):
            node.stop()


def _push(images: Sequence[PushedImage], port: int, ae_title: str, console: Console) -> None:
    """C-STORE every phantom over one association, as a modality would."""
    _step(
        console, "4/5 push", f"C-STORE of {len(images)} images from {CALLING_AE_TITLE}, as a modality sends"
    )
    ae = AE(ae_title=CALLING_AE_TITLE)
    ae.add_requested_context(UltrasoundImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    association = ae.associate(LOCALHOST, port, ae_title=ae_title)
    if not association.is_established:
        raise DemoError(f"the node at {LOCALHOST}:{port} did not accept an association ({ae_title})")
    try:
        with _bars(console) as bars:
            task = bars.add_task("sending", total=len(images), status="")
            for image in images:
                status = association.send_c_store(image.path)
                code = int(status.get("Status", -1)) if status else -1
                if code != 0x0000:
                    comment = status.get("ErrorComment", "") if status else "no response"
                    raise DemoError(
                        f"the node refused {image.path} (status 0x{code & 0xFFFF:04X}: {comment})"
                    )
                bars.update(task, advance=1)
    finally:
        association.release()


def _wait(
    node: Node,
    images: Sequence[PushedImage],
    studies: list[StudyResult],
    timeout: float,
    log: Path,
    console: Console,
) -> None:
    """Until every study's results are in the catalog, with bars for images and studies."""
    _step(
        console,
        "5/5 results",
        "each image analysed (class, embedding, Grad-CAM); each study assessed and reported "
        f"once no image came for {node.settings.study.stable_seconds:g} s",
    )
    catalog, model_id = node.catalog, _model_id(node)
    uids = [image.sop_instance_uid for image in images]
    deadline = time.monotonic() + timeout
    with _bars(console) as bars:
        analysed = bars.add_task("images analysed", total=len(images), status="")
        reported = bars.add_task("studies reported", total=len(studies), status="")
        while True:
            finished_images = _finished_analyses(catalog, model_id, uids)
            done = _finished_studies(catalog, model_id, studies)
            bars.update(analysed, completed=finished_images)
            bars.update(reported, completed=done)
            if done == len(studies):
                return
            if time.monotonic() > deadline:
                raise DemoError(
                    f"results for {len(studies) - done} of {len(studies)} studies did not come within "
                    f"{timeout:.0f} s ({finished_images} of {len(images)} images analysed); "
                    f"see the node's log {log}, or wait longer with --timeout"
                )
            time.sleep(_POLL_SECONDS)


def _finished_analyses(catalog: Catalog, model_id: str, sop_uids: Sequence[str]) -> int:
    a, i = ANALYSES.c, INSTANCES.c
    with catalog.connection() as connection:
        states = connection.execute(
            select(a.state)
            .join(INSTANCES, i.id == a.instance_pk)
            .where(a.model_id == model_id, i.sop_instance_uid.in_(sop_uids))
        ).scalars()
        return sum(state not in UNFINISHED for state in states)


def _finished_studies(catalog: Catalog, model_id: str, studies: list[StudyResult]) -> int:
    """Update each study from its newest assessment; count those whose results are final: the
    assessment finished and no image arrived after it was requested."""
    sa, s = STUDY_ASSESSMENTS.c, STUDIES.c
    by_uid = {study.study_instance_uid: study for study in studies}
    with catalog.connection() as connection:
        rows = connection.execute(
            select(
                s.study_instance_uid,
                s.accession_number,
                s.assessment_due,
                sa.id,
                sa.revision,
                sa.state,
                sa.reason,
                sa.finding,
                sa.probability,
            )
            .join(STUDIES, s.id == sa.study_pk)
            .where(sa.model_id == model_id, s.study_instance_uid.in_(list(by_uid)))
            .order_by(sa.revision)
        ).all()
    newest = {row.study_instance_uid: row for row in rows}  # ordered by revision: the last wins
    done = 0
    for uid, row in newest.items():
        study = by_uid[uid]
        study.accession_number = row.accession_number
        study.state, study.reason = row.state, row.reason or ""
        study.finding, study.probability = row.finding, row.probability
        done += row.state not in UNFINISHED and not row.assessment_due
    return done


def _model_id(node: Node) -> str:
    if node.model_id is None:  # the demo always configures a bundle
        raise DemoError("the node runs without a model (model.bundle)")
    return node.model_id


def _collect(node: Node, studies: list[StudyResult]) -> None:
    """The stored SR of each study's newest assessment and its Grad-CAM captures."""
    catalog, model_id, data_dir = node.catalog, _model_id(node), node.store.data_dir
    r, i, s, sa = RESULTS.c, INSTANCES.c, STUDIES.c, STUDY_ASSESSMENTS.c
    source = INSTANCES.alias("source")
    by_uid = {study.study_instance_uid: study for study in studies}
    with catalog.connection() as connection:
        rows = connection.execute(
            select(s.study_instance_uid, r.kind, i.file_path, sa.revision, source.c.instance_number)
            .join(INSTANCES, i.id == r.instance_pk)
            .join(STUDIES, s.id == r.study_pk)
            .outerjoin(STUDY_ASSESSMENTS, sa.id == r.assessment_pk)
            .outerjoin(source, source.c.id == r.source_instance_pk)
            .where(r.model_id == model_id, s.study_instance_uid.in_(list(by_uid)))
            .order_by(s.study_instance_uid, sa.revision, source.c.instance_number, r.id)
        ).all()
    for row in rows:
        study = by_uid[row.study_instance_uid]
        path = data_dir / PurePosixPath(row.file_path)
        if row.kind == REPORT:
            study.report = path  # ordered by revision: the newest wins
        elif row.kind == GRADCAM:
            study.captures.append(path)


def _wait_for_index(node: Node, images: Sequence[PushedImage]) -> None:
    """The node's similarity index follows the catalog's embeddings within a second or so."""
    e, i = EMBEDDINGS.c, INSTANCES.c
    with node.catalog.connection() as connection:
        embedded = connection.execute(
            select(func.count())
            .select_from(EMBEDDINGS)
            .join(INSTANCES, i.id == e.instance_pk)
            .where(
                e.model_id == _model_id(node), i.sop_instance_uid.in_([m.sop_instance_uid for m in images])
            )
        ).scalar_one()
    deadline = time.monotonic() + _INDEX_WAIT_SECONDS
    while len(node.index or ()) < embedded and time.monotonic() < deadline:
        time.sleep(0.1)


def _similar(port: int, ae_title: str, studies: list[StudyResult]) -> None:
    """Ask the similarity AE title, with a Study Root C-FIND per study, for its nearest studies."""
    ae = AE(ae_title=CALLING_AE_TITLE)
    # Explicit VR first: the private block then comes back with its VRs, not as raw bytes.
    ae.add_requested_context(
        StudyRootQueryRetrieveInformationModelFind, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
    )
    association = ae.associate(LOCALHOST, port, ae_title=ae_title)
    if not association.is_established:
        for study in studies:
            study.similar_error = f"{ae_title} did not accept an association"
        return
    try:
        for study in studies:
            study.similar, study.similar_error = similar_studies(association, study.study_instance_uid)
    finally:
        association.release()


def similar_studies(association: Any, study_uid: str) -> tuple[list[SimilarCase], str]:
    """The matches of one similarity C-FIND, most similar first, and the error comment if it failed."""
    request = Dataset()
    request.QueryRetrieveLevel = "STUDY"
    request.StudyInstanceUID = study_uid
    request.AccessionNumber = ""
    request.PatientID = ""
    cases: list[SimilarCase] = []
    for status, identifier in association.send_c_find(request, StudyRootQueryRetrieveInformationModelFind):
        code = int(status.get("Status", -1)) if status else -1
        if code in _PENDING_STATUSES and identifier is not None:
            cases.append(_case(identifier))
        elif code != 0x0000:
            comment = str(status.get("ErrorComment", "")) if status else "no response"
            return cases, f"status 0x{code & 0xFFFF:04X}: {comment}"
    return sorted(cases, key=lambda case: case.rank), ""


def _case(identifier: Dataset) -> SimilarCase:
    return SimilarCase(
        rank=int(str(_private(identifier, RANK_OFFSET, "<H") or 0)),
        distance=float(str(_private(identifier, DISTANCE_OFFSET, "<d") or 0.0)),
        finding=str(_private(identifier, FINDING_OFFSET, None) or ""),
        study_instance_uid=str(identifier.get("StudyInstanceUID", "")),
        accession_number=str(identifier.get("AccessionNumber", "")),
        patient_id=str(identifier.get("PatientID", "")),
    )


def _private(identifier: Dataset, offset: int, binary: str | None) -> object:
    """A value of the similarity block; raw bytes (an implicit VR answer) decoded by ``binary``
    (a struct format) or as text."""
    try:
        value = identifier.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)[offset].value
    except KeyError:
        return None
    if isinstance(value, bytes):
        if binary is not None:
            return struct.unpack(binary, value[: struct.calcsize(binary)])[0]
        return value.decode("ascii", "replace").strip(" \x00")
    return value


# --- outputs -----------------------------------------------------------------------------------


def _write_outputs(studies: Sequence[StudyResult], layout: DemoLayout) -> None:
    """Grad-CAM PNGs from the captures' pixels, and each SR as text, under the demo folder."""
    from workers.captures import write_png

    layout.gradcam.mkdir(parents=True, exist_ok=True)
    layout.reports.mkdir(parents=True, exist_ok=True)
    for study in studies:
        for number, capture in enumerate(study.captures, start=1):
            png = layout.gradcam / f"{study.name}-image-{number}.png"
            write_png(_rgb(dcmread(capture).pixel_array), png)
            study.pngs.append(png)
        if study.report is not None:
            text = study.report_text = layout.reports / f"{study.name}.txt"
            header = (
                f"Structured Report of study {study.number} (accession {study.accession_number}, "
                f"phantom label {study.label}) — {NOT_FOR_CLINICAL_USE}\n"
                f"{study.report}\n\n"
            )
            text.write_text(header + render_sr(study.report), encoding="utf-8")


def _rgb(pixels: np.ndarray) -> np.ndarray:
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[:, :, None], 3, axis=2)
    return np.ascontiguousarray(pixels, dtype=np.uint8)


def render_sr(path: Path) -> str:
    """The SR as text: DCMTK's ``dsrdump +Pl`` where installed, else :func:`plain_sr`."""
    dsrdump = shutil.which("dsrdump")
    if dsrdump is not None:
        run = subprocess.run(
            [dsrdump, "+Pl", str(path)], capture_output=True, text=True, check=False, timeout=60
        )
        if run.returncode == 0 and run.stdout.strip():
            return run.stdout
    return plain_sr(dcmread(path))


def plain_sr(dataset: Dataset) -> str:
    """An SR's header and content tree, one item a line, indented by depth."""
    lines = [
        f"{_meaning(dataset)}",
        f"  patient {dataset.get('PatientID', '')}, study {dataset.get('StudyInstanceUID', '')}, "
        f"accession {dataset.get('AccessionNumber', '')}",
        f"  completion {dataset.get('CompletionFlag', '')}, "
        f"verification {dataset.get('VerificationFlag', '')}",
        "",
    ]
    lines += _content_lines(dataset, 0)
    return "\n".join(lines) + "\n"


def _content_lines(item: Dataset, depth: int) -> list[str]:
    lines = []
    for child in item.get("ContentSequence", []):
        relationship = str(child.get("RelationshipType", ""))
        value = _item_value(child)
        text = f"{'  ' * depth}<{relationship}:{child.get('ValueType', '')}:{_meaning(child)}>"
        lines.append(f"{text} = {value}" if value else text)
        lines += _content_lines(child, depth + 1)
    return lines


def _meaning(item: Dataset) -> str:
    codes = item.get("ConceptNameCodeSequence") or []
    return str(codes[0].get("CodeMeaning", "")) if codes else ""


def _item_value(item: Dataset) -> str:
    kind = str(item.get("ValueType", ""))
    if kind == "TEXT":
        return f'"{item.get("TextValue", "")}"'
    if kind == "CODE" and item.get("ConceptCodeSequence"):
        return str(item.ConceptCodeSequence[0].get("CodeMeaning", ""))
    if kind == "NUM" and item.get("MeasuredValueSequence"):
        measured = item.MeasuredValueSequence[0]
        units = measured.get("MeasurementUnitsCodeSequence") or []
        return f"{measured.get('NumericValue', '')} {units[0].get('CodeValue', '') if units else ''}".strip()
    if kind == "UIDREF":
        return str(item.get("UID", ""))
    if kind in ("IMAGE", "COMPOSITE") and item.get("ReferencedSOPSequence"):
        return str(item.ReferencedSOPSequence[0].get("ReferencedSOPInstanceUID", ""))
    for keyword in ("DateTime", "Date", "Time", "PersonName"):
        if keyword in item:
            return str(item.get(keyword))
    return ""


# --- what the user sees -----------------------------------------------------------------------


def _show(result: DemoResult, settings: Settings, console: Console) -> None:
    layout = result.layout
    console.record = True
    console.export_text(clear=True)  # results.txt holds the results, not the progress above
    console.print()
    console.print(_results_table(result))
    console.print(_similar_table(result, settings))
    for line in _summary(result):
        _say(console, line)
    shown = _featured(result.studies)
    if shown is not None and shown.report is not None:
        console.rule(f"Structured Report of study {shown.number} — {NOT_FOR_CLINICAL_USE}")
        console.print(render_sr(shown.report), markup=False, highlight=False, soft_wrap=True)
    console.rule(f"Where everything is — {NOT_FOR_CLINICAL_USE}")
    for what, where in (
        ("demo folder", layout.root),
        ("phantoms", layout.root / "phantoms"),
        ("model bundle", layout.bundle),
        ("node settings", layout.config),
        ("DICOM files and catalog", layout.data),
        ("node and worker log", layout.log),
        ("Grad-CAM PNGs", layout.gradcam),
        ("reports as text", layout.reports),
        ("these results", layout.results),
    ):
        _say(console, f"  {what:24} {where}")
    _say(console, f"  {'run this node yourself':24} precedent serve --config {layout.config}")
    _say(console, f"  {'and look at it':24} precedent status --config {layout.config}")
    with contextlib.suppress(OSError):
        console.save_text(str(layout.results))
    console.record = False


def _results_table(result: DemoResult) -> Table:
    table = _table(
        f"Studies — {NOT_FOR_CLINICAL_USE}",
        "finding and prob.: the node's, from the study's images; phantom: the true class, "
        "which the node never sees",
    )
    _columns(
        table,
        ("#", "right"),
        ("accession", "left"),
        ("images", "right"),
        ("phantom", "left"),
        ("finding", "left"),
        ("prob.", "right"),
        (f"Grad-CAM in {result.layout.gradcam.name}/", "left"),
    )
    for study in result.studies:
        png = study.pngs[0].name if len(study.pngs) == 1 else f"{study.name}-image-*.png"
        _row(
            table,
            str(study.number),
            study.accession_number,
            str(study.images),
            study.label,
            study.finding or f"({study.state or 'no result'})",
            f"{study.probability:.2f}" if study.probability is not None else "-",
            png if study.pngs else "-",
        )
    return table


def _similar_table(result: DemoResult, settings: Settings) -> Table:
    table = _table(
        f"Similar studies — {NOT_FOR_CLINICAL_USE}",
        f"the answers of a C-FIND to {settings.dicom.similar_ae_title}: other patients' studies, "
        f"most similar first ({settings.similarity.metric} distance of the model's embeddings)",
    )
    _columns(
        table,
        ("#", "right"),
        ("finding", "left"),
        ("rank", "right"),
        ("similar study", "left"),
        ("its finding", "left"),
        ("distance", "right"),
    )
    number_of = {study.study_instance_uid: study.number for study in result.studies}
    for study in result.studies:
        if study.similar_error or not study.similar:
            why = study.similar_error or "no other patient's study"
            _row(table, str(study.number), study.finding or "-", "", why, "", "", end_section=True)
        for case in study.similar:
            other = number_of.get(case.study_instance_uid)
            first = case is study.similar[0]
            _row(
                table,
                str(study.number) if first else "",
                (study.finding or "-") if first else "",
                str(case.rank),
                f"#{other} {case.accession_number}" if other else case.accession_number,
                case.finding or "-",
                f"{case.distance:.4f}",
                end_section=case is study.similar[-1],
            )
    return table


def _table(title: str, caption: str) -> Table:
    return Table(
        title=title,
        caption=caption,
        box=box.SIMPLE_HEAD,
        title_justify="left",
        caption_justify="left",
        show_edge=False,
        pad_edge=False,
        collapse_padding=True,
    )


def _columns(table: Table, *columns: tuple[str, JustifyMethod]) -> None:
    for name, justify in columns:
        table.add_column(name, justify=justify)


def _row(table: Table, *cells: str, end_section: bool = False) -> None:
    """Cells as plain text: values from the catalog or a peer are never read as markup."""
    table.add_row(*(Text(cell) for cell in cells), end_section=end_section)


def _summary(result: DemoResult) -> list[str]:
    same, matched = result.nearest_same_finding()
    right, found = result.finding_is_label()
    reported = sum(study.report is not None for study in result.studies)
    model = "trained now" if result.trained else "reused"
    lines = [
        f"Summary — {NOT_FOR_CLINICAL_USE}:",
        f"  {reported} of {len(result.studies)} studies reported by model {result.bundle_id[:12]} "
        f"({ARCHITECTURE}, {model}), in {result.seconds:.0f} s in all",
    ]
    if found:
        lines.append(
            f"  the finding is the phantom's true class for {right} of {found} studies ({right / found:.0%})"
        )
    if matched:
        lines.append(
            f"  the most similar study has the same finding for {same} of {matched} studies "
            f"({same / matched:.0%})"
        )
    for study in result.studies:
        if study.report is None:
            why = f": {study.reason}" if study.reason else ""
            lines.append(f"  study {study.number}: no report ({study.state or 'not assessed'}{why})")
    return lines


def _featured(studies: Sequence[StudyResult]) -> StudyResult | None:
    """The study whose SR is printed in full: one with a lesion found, and of those the one of
    fewest images (its SR is the shortest)."""
    reported = [study for study in studies if study.report is not None]
    with_lesion = [study for study in reported if study.finding not in (None, LABELS[0])]
    return min(with_lesion or reported, key=lambda study: study.images, default=None)


def _step(console: Console, title: str, text: str) -> None:
    """A step's heading: its title in bold, the rest as plain text (paths are not markup)."""
    console.print(Text.assemble((title, "bold"), ": ", text), soft_wrap=True)


def _say(console: Console, text: str) -> None:
    """A line of plain text, never wrapped here: a path stays whole for copying."""
    console.print(Text(text), soft_wrap=True)


def _bars(console: Console) -> Progress:
    return Progress(
        TextColumn("  {task.description:18}"),
        BarColumn(bar_width=30),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
        console=console,
    )


def _made(written: bool) -> str:
    return "written" if written else "kept from an earlier run"


def _shown(path: Path) -> str:
    with contextlib.suppress(ValueError):
        return str(path.relative_to(Path.cwd()))
    return str(path)


# --- the process around the demo ----------------------------------------------------------------


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM stops the demo as Ctrl-C does: the node and its worker are stopped on the way out."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(_signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _own_settings(console: Console) -> Iterator[None]:
    """The demo runs on its own settings file only: ``PRECEDENT_*`` variables (which would
    override it, in this process and in the worker it starts) are set aside while it runs, so
    that it can never write into a site's data folder or catalog."""
    aside = {name: value for name, value in os.environ.items() if name.startswith("PRECEDENT_")}
    for name in aside:
        del os.environ[name]
    if aside:
        _say(console, f"  (ignoring {', '.join(sorted(aside))}: the demo uses its own settings)")
    try:
        yield
    finally:
        os.environ.update(aside)


@contextlib.contextmanager
def _logging_to(log: Path, options: DemoOptions) -> Iterator[None]:
    """This process's log lines (the node's) into ``log``, so that the terminal shows the demo."""
    handler = logging.FileHandler(log, encoding="utf-8")
    handler.setFormatter(OneLineFormatter(_FORMAT))
    logger = logging.getLogger()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    quiet = logging.getLogger("pynetdicom")
    quiet_level = quiet.level
    quiet.setLevel(logging.WARNING)
    logging.getLogger(__name__).info("precedent demo: %s", options)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        quiet.setLevel(quiet_level)
        handler.close()


@contextlib.contextmanager
def _children_output_to(log: Path) -> Iterator[None]:
    """Processes started meanwhile (the node's worker) write their standard output and error
    into ``log``: they inherit file descriptors 1 and 2, which point there while this lasts."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    target = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.dup2(target, 1)
        os.dup2(target, 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, target):
            os.close(fd)
