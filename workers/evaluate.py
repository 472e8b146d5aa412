"""Evaluation of model bundles on a labelled data set, with the numbers the papers report.

:func:`evaluate` runs each bundle's model over the images (batched, no gradients, CPU or CUDA)
and computes:

- **classification** (the ultrasound papers): accuracy; precision, recall and F1 per class and
  macro; sensitivity and specificity per class, one class against the rest; ROC AUC per class
  (one against the rest, scikit-learn) and macro; the confusion matrix (rows true, columns
  predicted). Precision, recall and F1 come from :func:`workers.train.classification_metrics`,
  so training and evaluation cannot disagree on them.
- **what training recorded**: a bundle trained with K folds carries each fold's confusion
  matrix; every measure above except AUC is computed per fold and given as mean ± sd.
- **retrieval** (the retrieval paper's Table 1): leave-one-out P@k, R@k, NDCG@k and mAP from
  :func:`workers.retrieval_metrics.evaluate_retrieval` (the one implementation of them), with
  L2 and cosine side by side, and the mean search time of one query for each k.
- **the embedding space**: PCA and t-SNE (at most :data:`TSNE_MAX_POINTS` points, seeded)
  coordinates for the plots.

Which images: by default, the bundle's recorded held-out test set when the data set is the one
it was trained on (same classes and counts, and every recorded test file present), else all
images; :class:`Evaluation` says which and why, and how the images relate to each model's
training (``relation``). With several bundles the held-out set is the images held out by all
of them, so that no model is scored on images it learnt from.

Images are read as training and serving read them: :func:`workers.datasets.read_pixels` (the
node's decoding and crop) and :func:`workers.preprocess.preprocess` with the bundle's input
spec, one image at a time, so memory holds a batch of model inputs, never a batch of
full-size mammograms.

Results on synthetic phantoms (DICOM phantoms are recognised by their Image Comments and
Manufacturer; the PNG ones carry no marker, so the caller says so) are flagged as such
(``Evaluation.synthetic``), and every report built from an :class:`Evaluation` labels them.
"""

from __future__ import annotations

import math
import re
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydicom import dcmread
from sklearn.decomposition import PCA  # type: ignore[import-untyped]  # no type information shipped
from sklearn.manifold import TSNE  # type: ignore[import-untyped]
from sklearn.metrics import roc_auc_score, roc_curve  # type: ignore[import-untyped]

from workers.bundles import BundleError, ModelBundle, load_bundle
from workers.datasets import (
    PICTURE_SUFFIXES,
    DataSetError,
    Example,
    ImageReadError,
    LabelledDataSet,
    load_data_set,
    read_pixels,
)
from workers.index import IndexOptions, Metric, VectorIndex
from workers.models import ARCHITECTURES, PrecedentModel
from workers.phantoms import MANUFACTURER as PHANTOM_MANUFACTURER
from workers.phantoms import SYNTHETIC_MARKER
from workers.preprocess import InputSpec, preprocess
from workers.retrieval_metrics import PAPER_KS, RetrievalReport, evaluate_retrieval
from workers.train import (
    DEVICES,
    TrainingError,
    TrainingOptions,
    classification_metrics,
    code_version,
    resolve_device,
    torch_threads,
    train,
)
from workers.train import Progress as TrainingProgress

__all__ = [
    "METRICS",
    "SPLITS",
    "TSNE_MAX_POINTS",
    "Evaluation",
    "EvaluationError",
    "EvaluationOptions",
    "ModelEvaluation",
    "Progress",
    "Projections",
    "classification_report",
    "confusion_metrics",
    "embedding_projections",
    "evaluate",
    "evaluation_json",
    "fold_summary",
    "prepare_folder",
    "retrieval_summary",
    "roc_metrics",
]

SPLITS: tuple[str, ...] = ("auto", "test", "all")
METRICS: tuple[Metric, ...] = ("l2", "cosine")
"""Side by side, as the retrieval paper's Table 1."""
TSNE_MAX_POINTS = 2000
TIMED_QUERIES = 200
"""Queries timed per k and metric: enough for a stable mean, few enough to stay quick."""
PHANTOM_CHECKS = 200
"""DICOM headers read (spread over the images) to tell whether the images are phantoms."""


class EvaluationError(Exception):
    """An evaluation that cannot be made as asked; the message says why and what to do."""


@dataclass(frozen=True)
class EvaluationOptions:
    """How to evaluate; invalid options cannot be constructed (ValueError says which and why)."""

    split: str = "auto"
    """``auto``: the recorded held-out test set when there is one for this data set, else all
    images; ``test``: the held-out set or an error; ``all``: every image."""
    ks: tuple[int, ...] = PAPER_KS
    device: str = "auto"
    batch_size: int = 32
    threads: int | None = None
    """CPU threads for torch while evaluating; None leaves torch's choice."""
    synthetic: bool = False
    """The caller knows the images are phantoms (PNG phantoms carry no marker)."""
    seed: int = 0
    """For the t-SNE layout and its sample of points."""

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}, not {self.device!r}")
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, not {self.split!r}")
        if not self.ks or any(type(k) is not int or k < 1 for k in self.ks):
            raise ValueError(f"ks must be positive whole numbers, at least one (got {list(self.ks)})")
        if len(set(self.ks)) != len(self.ks):
            raise ValueError(f"ks names a k twice: {list(self.ks)}")
        if type(self.batch_size) is not int or self.batch_size < 1:
            raise ValueError(f"batch size must be a whole number of at least 1, not {self.batch_size!r}")
        if self.threads is not None and (type(self.threads) is not int or self.threads < 1):
            raise ValueError(f"threads must be a whole number of at least 1, not {self.threads!r}")


@dataclass(frozen=True)
class Progress:
    """One step, for progress bars: ``task`` is ``train`` (an epoch of a comparison model
    trained here), ``infer`` (images run through a model) or ``analyse`` (metrics, retrieval,
    PCA and t-SNE of a model's outputs: 0 of 1 when it starts, 1 of 1 when done; t-SNE of
    2000 points takes about a minute on one core); ``model`` names the model."""

    task: Literal["train", "infer", "analyse"]
    model: str
    completed: int
    total: int


ProgressCallback = Callable[[Progress], None]


@dataclass(frozen=True)
class Projections:
    """2-D views of an embedding space: PCA of every point, t-SNE of at most
    :data:`TSNE_MAX_POINTS` of them (``tsne_indices`` says which); None where too few points."""

    pca: np.ndarray | None
    pca_variance: tuple[float, ...]
    tsne: np.ndarray | None
    tsne_indices: np.ndarray
    note: str | None = None


@dataclass(frozen=True)
class ModelEvaluation:
    """One model's results on the evaluated images (in :attr:`Evaluation.examples` order)."""

    name: str
    bundle: ModelBundle
    relation: str
    """How the evaluated images relate to this model's training, in words."""
    trained_here: bool
    classification: dict[str, Any]
    recorded: dict[str, Any] | None
    """Metrics recorded in the bundle at training (folds: mean ± sd), or None."""
    retrieval: dict[str, Any]
    true: np.ndarray
    probabilities: np.ndarray
    embeddings: np.ndarray
    roc_curves: dict[str, tuple[np.ndarray, np.ndarray]]
    projections: Projections
    device: str
    inference_seconds: float


@dataclass(frozen=True)
class Evaluation:
    """Everything a report shows; :func:`evaluation_json` is its plain-data form."""

    data: LabelledDataSet
    split: Literal["test", "all"]
    split_reason: str
    examples: tuple[Example, ...]
    synthetic: bool
    models: tuple[ModelEvaluation, ...]
    ks: tuple[int, ...]
    created: datetime
    banners: tuple[str, ...] = field(default=())
    """What every view of the results must show first: "synthetic phantoms — not for clinical
    use", "research model — not for clinical use"."""
    warnings: tuple[str, ...] = field(default=())
    """What else the reader must know, e.g. classes the data set lacks."""

    @property
    def files(self) -> list[str]:
        return [self.data.name_of(example) for example in self.examples]


# --- the entry point --------------------------------------------------------------------------


def evaluate(
    data_path: Path,
    bundles: Sequence[Path | str],
    options: EvaluationOptions,
    out: Path | None = None,
    progress: ProgressCallback | None = None,
) -> Evaluation:
    """Evaluate each of ``bundles`` (the first is the reference) on the data set at ``data_path``.

    Each entry is a bundle file, or an architecture name: that architecture is then trained
    here (:func:`workers.train.train`) on the same data set with the reference bundle's
    recorded recipe and split, into ``out/models/<architecture>.bundle`` (reused on a later
    run when it is there and was trained on this data set), so the papers' comparison of
    architectures can be repeated in one command.

    ``out`` is the report folder: created and checked writable once the bundles and the data
    set are known to be good, before any long work. Everything that can be checked is checked
    before images are decoded. Raises :class:`EvaluationError` naming the bundle, data set,
    labels, split or folder that is wrong.
    """
    report = progress or _ignore
    if not bundles:
        raise EvaluationError("no bundle to evaluate")
    first = _load(Path(bundles[0]))
    data = _matching_data_set(data_path, first)
    device = _device(options.device)
    comparisons = [(entry, _comparison_bundle(entry)) for entry in bundles[1:]]
    if out is not None:
        prepare_folder(out)
    loaded: list[tuple[str, ModelBundle, bool]] = [(_name(Path(bundles[0])), first, False)]
    for entry, bundle in comparisons:
        if bundle is not None:
            loaded.append((_name(Path(entry)), bundle, False))
        else:
            loaded.append(_trained(str(entry), first, data, options, out, report))
    for _, bundle, _ in loaded[1:]:
        _check_labels(data, bundle)
    names = _unique_names([name for name, _, _ in loaded])
    indices, split, reason, relations = _choose_split(data, [b for _, b, _ in loaded], options.split)
    examples = tuple(data.examples[i] for i in indices)
    if not examples:
        raise EvaluationError(f"the split to evaluate ({split}) is empty: {reason}")
    synthetic = options.synthetic or _are_phantoms(examples)
    with torch_threads(options.threads):
        models = tuple(
            _evaluate_model(name, bundle, here, relation, examples, options, device, report)
            for name, (_, bundle, here), relation in zip(names, loaded, relations, strict=True)
        )
    return Evaluation(
        data=data,
        split=split,
        split_reason=reason,
        examples=examples,
        synthetic=synthetic,
        models=models,
        ks=tuple(sorted(options.ks)),
        created=datetime.now(UTC),
        banners=_banners(synthetic, models),
        warnings=_warnings(data, models),
    )


def _ignore(_: Progress) -> None:
    return None


def _load(path: Path) -> ModelBundle:
    try:
        return load_bundle(path)
    except BundleError as error:
        raise EvaluationError(str(error)) from None


def _name(path: Path) -> str:
    return path.name


def _unique_names(names: Sequence[str]) -> list[str]:
    """The names as given, numbered where two are the same (``a.bundle``, ``a.bundle (2)``)."""
    seen: dict[str, int] = {}
    unique = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        unique.append(name if seen[name] == 1 else f"{name} ({seen[name]})")
    return unique


def _device(device: str) -> torch.device:
    try:
        return resolve_device(device)
    except TrainingError as error:
        raise EvaluationError(str(error)) from None


def prepare_folder(out: Path) -> None:
    """Create the report folder ``out`` and prove it writable; EvaluationError says why not."""
    if out.exists() and not out.is_dir():
        raise EvaluationError(f"cannot write the report to {out}: it exists and is not a folder")
    probe = out / f".write-test-{secrets.token_hex(4)}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise EvaluationError(f"cannot write the report to {out}: {error.strerror or error}") from None


# --- data set and labels ----------------------------------------------------------------------


def _matching_data_set(path: Path, bundle: ModelBundle) -> LabelledDataSet:
    """The data set, its labels checked against the bundle's.

    Label names whose severity order is not known (e.g. ``cyst``) are ordered by the bundle's
    labels; the data set may lack some of the bundle's classes, but a class the model does not
    know cannot be scored.
    """
    try:
        data = load_data_set(path)
    except DataSetError:
        try:
            data = load_data_set(path, bundle.labels)
        except DataSetError as error:
            # The one problem that ordering by the bundle's labels adds: a name it does not list.
            unknown = [problem for problem in error.problems if "not in the given order" in problem]
            if unknown:
                _refuse_unknown_labels(path, bundle, unknown[0])
            raise EvaluationError(
                f"{error}\n(the bundle {bundle.path.name} has the labels {', '.join(bundle.labels)})"
            ) from None
    _check_labels(data, bundle)
    return data


def _refuse_unknown_labels(path: Path, bundle: ModelBundle, problem: str) -> None:
    """Raise the label mismatch, naming the data set's labels where they can be read in full:
    ordered after the bundle's (``problem`` quotes the names the bundle lacks), less the
    bundle's labels the data set has no images of."""
    names = [name for name in re.findall(r"'([^']*)'", problem.rsplit(": ", 1)[-1]) if name]
    order = [*bundle.labels, *names]
    for _ in range(2):
        try:
            data = load_data_set(path, order)
        except DataSetError as error:
            empty = {m.group(1) for p in error.problems if (m := re.match(r"class '(.*)' has no images", p))}
            order = [label for label in order if label not in empty]
            if not empty:
                break
        else:
            _check_labels(data, bundle)
    raise EvaluationError(
        f"the labels of the data set {path} do not match the labels of the bundle {bundle.path} "
        f"({', '.join(bundle.labels)}): the model does not know {', '.join(map(repr, names))}"
    )


def _check_labels(data: LabelledDataSet, bundle: ModelBundle) -> None:
    unknown = [label for label in data.labels if label not in bundle.labels]
    if unknown:
        raise EvaluationError(
            f"the labels of the data set {data.source} ({', '.join(data.labels)}) do not match the labels "
            f"of the bundle {bundle.path} ({', '.join(bundle.labels)}): the model does not know "
            f"{', '.join(repr(label) for label in unknown)}"
        )


# --- comparison models ------------------------------------------------------------------------


def _comparison_bundle(entry: Path | str) -> ModelBundle | None:
    """The bundle a comparison entry names, or None for an architecture name to train here."""
    path = Path(entry)
    if path.exists() or str(entry) not in ARCHITECTURES:
        if not path.exists():
            known = ", ".join(ARCHITECTURES)
            raise EvaluationError(
                f"--compare {entry}: no such bundle file, and not an architecture name (known: {known})"
            )
        return _load(path)
    return None


def _trained(
    architecture: str,
    reference: ModelBundle,
    data: LabelledDataSet,
    options: EvaluationOptions,
    out: Path | None,
    report: ProgressCallback,
) -> tuple[str, ModelBundle, bool]:
    """``architecture`` trained on ``data`` with the reference's recipe, or the bundle a
    previous run trained (when it is there, and was trained on this data set by that recipe)."""
    if out is None:
        raise EvaluationError(f"--compare {architecture}: training it needs a folder to write the bundle")
    target = out / "models" / f"{architecture}.bundle"
    recipe = _recipe(reference, architecture, options)
    if target.is_file():
        try:
            existing = load_bundle(target)
        except BundleError:
            existing = None
        if (
            existing is not None
            and existing.architecture == architecture
            and _same_data(existing.description, data)
            and _recipe(existing, architecture, options) == recipe
        ):
            return architecture, existing, True

    def epochs(step: TrainingProgress) -> None:
        if step.task == "epoch":
            report(Progress("train", architecture, step.completed, step.total))

    try:
        train(data, target, recipe, epochs)
    except (TrainingError, DataSetError) as error:
        raise EvaluationError(f"--compare {architecture}: training failed: {error}") from None
    return architecture, _load(target), True


def _recipe(reference: ModelBundle, architecture: str, options: EvaluationOptions) -> TrainingOptions:
    """The reference bundle's recorded training recipe for another architecture.

    What the description records as numbers is taken as is; the early-stopping patience and
    the hold-out fraction are recorded only in words and are read from them; anything not
    recorded keeps :class:`TrainingOptions`' default. The input size is the reference's.
    """
    description = reference.description
    training = _mapping(description.get("training"))
    split = _mapping(description.get("split"))
    defaults = TrainingOptions()
    method = str(split.get("method", ""))
    held_out = re.fullmatch(r"hold-out (\d+):(\d+)", method)
    patience = re.search(r"patience (\d+)", str(training.get("early_stopping", "")))
    folds = split.get("folds")
    try:
        return TrainingOptions(
            architecture=architecture,
            epochs=_whole(training.get("epochs_max"), defaults.epochs),
            batch_size=_whole(training.get("batch_size"), defaults.batch_size),
            size=reference.input.size,
            learning_rate=float(training.get("learning_rate", defaults.learning_rate)),
            patience=int(patience.group(1)) if patience else defaults.patience,
            folds=len(folds) if isinstance(folds, list) and folds else None,
            seed=_whole(split.get("seed", description.get("seed")), defaults.seed),
            device=options.device,
            threads=options.threads,
            test_fraction=int(held_out.group(2)) / 100 if held_out else defaults.test_fraction,
            validation_fraction=float(split.get("validation_fraction", defaults.validation_fraction)),
        )
    except (TypeError, ValueError) as error:
        raise EvaluationError(
            f"--compare {architecture}: the recipe recorded in {reference.path} is not usable ({error})"
        ) from None


def _whole(value: object, default: int) -> int:
    return value if type(value) is int else default


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


# --- which images -----------------------------------------------------------------------------


def _recorded_files(description: Mapping[str, Any]) -> tuple[list[str] | None, list[str]]:
    """The held-out test files a bundle records (None without a hold-out split), and every
    test file it names (hold-out or folds), each relative to the data set's folder."""
    split = _mapping(description.get("split"))
    test = _mapping(split.get("test"))
    held_out = [str(name) for name in test["files"]] if isinstance(test.get("files"), list) else None
    named = list(held_out or [])
    for fold in split.get("folds", []) if isinstance(split.get("folds"), list) else []:
        files = _mapping(_mapping(fold).get("test")).get("files")
        named += [str(name) for name in files] if isinstance(files, list) else []
    return held_out, named


def _same_data(description: Mapping[str, Any], data: LabelledDataSet) -> bool:
    """Whether a bundle was trained on this data set: the same classes with the same counts,
    and every file its split names is here (so a moved folder is still recognised)."""
    recorded = _mapping(description.get("data_set"))
    if recorded.get("counts") != data.counts() or list(recorded.get("labels", [])) != list(data.labels):
        return False
    _, named = _recorded_files(description)
    present = {data.name_of(example) for example in data.examples}
    return bool(named) and all(name in present for name in named)


def _choose_split(
    data: LabelledDataSet, bundles: Sequence[ModelBundle], choice: str
) -> tuple[list[int], Literal["test", "all"], str, list[str]]:
    """The images to evaluate on, ``test`` or ``all``, why, and per bundle how they relate to
    its training."""
    names = [data.name_of(example) for example in data.examples]
    held: list[frozenset[str] | None] = []
    for bundle in bundles:
        files, _ = _recorded_files(bundle.description)
        held.append(frozenset(files) if files is not None and _same_data(bundle.description, data) else None)
    known = [files for files in held if files is not None]
    common = frozenset.intersection(*known) if known and len(known) == len(held) else frozenset()
    several = " of every compared bundle" if len(bundles) > 1 else ""
    if choice == "test":
        missing = [b.path.name for b, files in zip(bundles, held, strict=True) if files is None]
        if missing:
            raise EvaluationError(
                f"--split test: {', '.join(missing)} records no held-out test set of this data set "
                f"({data.source}): it was trained with cross-validation, or on other data (use --split all)"
            )
    if choice != "all" and common:
        indices = [i for i, name in enumerate(names) if name in common]
        reason = (
            f"the held-out test set{several} recorded at training ({len(indices)} of {len(names)} "
            "images, never seen in training)"
        )
        relations = ["held out at training: never seen by this model"] * len(bundles)
        return indices, "test", reason, relations
    if choice == "test":
        raise EvaluationError(
            "--split test: the held-out test sets of the compared bundles share no image: the split "
            "is empty (use --split all)"
        )
    if choice == "all":
        reason = "all images (--split all)"
    elif known and len(known) == len(held):
        reason = "all images: the compared bundles' held-out test sets share no image"
    else:
        reason = "all images: no bundle records a held-out test set of this data set"
        if any(files is not None for files in held):
            reason = "all images: not every compared bundle records a held-out test set of this data set"
    relations = [_relation(bundle, data) for bundle in bundles]
    return list(range(len(names))), "all", reason, relations


def _relation(bundle: ModelBundle, data: LabelledDataSet) -> str:
    """How all images of ``data`` relate to the training of ``bundle``, for the report."""
    description = bundle.description
    held_out, _ = _recorded_files(description)
    if _same_data(description, data):
        if held_out is not None:
            return (
                f"trained on this data set: {len(data.examples) - len(held_out)} of these images were "
                "used in training or validation, so these metrics are optimistic"
            )
        return (
            "trained on all of these images (cross-validation bundle): these metrics are optimistic; "
            "the recorded cross-validation estimate is the honest one"
        )
    recorded = _mapping(description.get("data_set"))
    if recorded.get("path"):
        return (
            f"trained on another data set ({recorded['path']}, {recorded.get('images', '?')} images): "
            "these images are unseen unless the two data sets share images"
        )
    return "the bundle records no training data set: whether it has seen these images is unknown"


# --- phantoms ---------------------------------------------------------------------------------


def _are_phantoms(examples: Sequence[Example]) -> bool:
    """Whether the DICOM images among ``examples`` are Precedent phantoms (a sample of them)."""
    dicom = [example.path for example in examples if example.path.suffix.lower() not in PICTURE_SUFFIXES]
    if not dicom:
        return False
    picks = np.unique(np.linspace(0, len(dicom) - 1, min(len(dicom), PHANTOM_CHECKS)).astype(np.int64))
    return any(_is_phantom(dicom[i]) for i in picks.tolist())


def _is_phantom(path: Path) -> bool:
    try:
        header = dcmread(path, stop_before_pixels=True, specific_tags=["ImageComments", "Manufacturer"])
    except Exception:  # the parser boundary; an unreadable file is reported when it is decoded
        return False
    comments = str(header.get("ImageComments", "") or "")
    return SYNTHETIC_MARKER in comments or str(header.get("Manufacturer", "")) == PHANTOM_MANUFACTURER


def _banners(synthetic: bool, models: Sequence[ModelEvaluation]) -> tuple[str, ...]:
    banners = []
    if synthetic:
        banners.append(
            "synthetic phantoms — not for clinical use: these are results on phantoms, not patients"
        )
    research = [m.name for m in models if not m.bundle.clinical_use]
    if research:
        banners.append(f"research model — not for clinical use ({', '.join(research)})")
    return tuple(banners)


def _warnings(data: LabelledDataSet, models: Sequence[ModelEvaluation]) -> tuple[str, ...]:
    warnings = []
    for model in models:
        absent = [label for label in model.bundle.labels if label not in data.labels]
        if absent:
            warnings.append(
                f"{model.name}: the data set has no {', '.join(absent)} images; "
                "those classes have no sensitivity and no AUC"
            )
    return tuple(warnings)


# --- one model --------------------------------------------------------------------------------


def _evaluate_model(
    name: str,
    bundle: ModelBundle,
    trained_here: bool,
    relation: str,
    examples: Sequence[Example],
    options: EvaluationOptions,
    device: torch.device,
    report: ProgressCallback,
) -> ModelEvaluation:
    model = bundle.instantiate(device)
    started = time.perf_counter()
    probabilities, embeddings = _infer(
        name, model, examples, bundle.input, options.batch_size, device, report
    )
    seconds = time.perf_counter() - started
    report(Progress("analyse", name, 0, 1))
    position = {label: i for i, label in enumerate(bundle.labels)}
    true = np.asarray([position[example.label] for example in examples], dtype=np.int64)
    classification = classification_report(true, probabilities, bundle.labels)
    curves = classification.pop("roc_curves")
    retrieval = retrieval_summary(embeddings, [example.label for example in examples], options.ks)
    projections = embedding_projections(embeddings, options.seed)
    report(Progress("analyse", name, 1, 1))
    return ModelEvaluation(
        name=name,
        bundle=bundle,
        relation=relation,
        trained_here=trained_here,
        classification=classification,
        recorded=fold_summary(bundle.description.get("metrics"), bundle.labels),
        retrieval=retrieval,
        true=true,
        probabilities=probabilities,
        embeddings=embeddings,
        roc_curves=curves,
        projections=projections,
        device=str(device),
        inference_seconds=seconds,
    )


@torch.inference_mode()
def _infer(
    name: str,
    model: PrecedentModel,
    examples: Sequence[Example],
    spec: InputSpec,
    batch_size: int,
    device: torch.device,
    report: ProgressCallback,
) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities and embeddings of every example, as float64 and float32 arrays.

    Unreadable images are collected over the whole set and reported together.
    """
    probabilities: list[np.ndarray] = []
    embeddings: list[np.ndarray] = []
    problems: list[str] = []
    for start in range(0, len(examples), batch_size):
        inputs = []
        for example in examples[start : start + batch_size]:
            try:
                inputs.append(preprocess(read_pixels(example), spec))
            except ImageReadError as error:
                problems.append(f"{example.origin + ': ' if example.origin else ''}{error}")
        if inputs and not problems:
            embedding = model.embed(torch.stack(inputs).to(device))
            logits = model.classify(embedding)
            probabilities.append(torch.softmax(logits.double(), dim=1).cpu().numpy())
            embeddings.append(embedding.float().cpu().numpy())
        report(Progress("infer", name, min(start + batch_size, len(examples)), len(examples)))
    if problems:
        raise EvaluationError(_problems_text("unreadable images", problems))
    return np.concatenate(probabilities), np.concatenate(embeddings)


def _problems_text(what: str, problems: Sequence[str], shown: int = 5) -> str:
    lines = "".join(f"\n  {problem}" for problem in problems[:shown])
    more = f"\n  ... and {len(problems) - shown} more" if len(problems) > shown else ""
    return f"{len(problems)} {what}:{lines}{more}"


# --- classification metrics -------------------------------------------------------------------


def confusion_metrics(true: Sequence[int], predicted: Sequence[int], labels: Sequence[str]) -> dict[str, Any]:
    """Accuracy; precision, recall, F1, sensitivity, specificity and support per class; their
    macro means; the confusion matrix (rows true, columns predicted, in label order).

    Precision, recall, F1, accuracy and macro F1 are :func:`workers.train.classification_metrics`'
    (a class never predicted has precision 0; macro means average the classes that occur in
    ``true`` or ``predicted``, as scikit-learn does). Sensitivity is the class's recall and
    specificity TN / (TN + FP), one class against the rest; either is None when undefined (no
    positives, no negatives), and the macro means average the defined ones.
    """
    base = classification_metrics(true, predicted, labels)
    matrix = np.asarray(base["confusion_matrix"], dtype=np.int64).reshape(len(labels), len(labels))
    hits = np.diag(matrix)
    support, called, total = matrix.sum(axis=1), matrix.sum(axis=0), int(matrix.sum())
    negatives = total - support
    true_negatives = total - support - called + hits
    present = (support > 0) | (called > 0)
    per_class: dict[str, dict[str, Any]] = {}
    for c, label in enumerate(labels):
        per_class[label] = {
            **base["per_class"][label],
            "sensitivity": float(hits[c] / support[c]) if support[c] else None,
            "specificity": float(true_negatives[c] / negatives[c]) if negatives[c] else None,
        }

    def macro(measure: str, classes: Sequence[int]) -> float | None:
        values = [per_class[labels[c]][measure] for c in classes]
        defined = [value for value in values if value is not None]
        return float(np.mean(defined)) if defined else None

    present_classes = [c for c in range(len(labels)) if present[c]]
    every_class = list(range(len(labels)))
    return {
        "images": base["images"],
        "accuracy": base["accuracy"],
        "macro": {
            "precision": macro("precision", present_classes) or 0.0,
            "recall": macro("recall", present_classes) or 0.0,
            "f1": base["macro_f1"],
            "sensitivity": macro("sensitivity", every_class),
            "specificity": macro("specificity", every_class),
        },
        "per_class": per_class,
        "confusion_matrix": matrix.tolist(),
    }


def roc_metrics(
    true: np.ndarray, probabilities: np.ndarray, labels: Sequence[str]
) -> tuple[dict[str, float | None], float | None, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Per class ROC AUC (one against the rest; None when the images hold only one side), their
    macro mean over the defined ones, and each defined class's ROC curve (FPR, TPR)."""
    aucs: dict[str, float | None] = {}
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for c, label in enumerate(labels):
        positive = np.asarray(true) == c
        if positive.all() or not positive.any():
            aucs[label] = None
            continue
        aucs[label] = float(roc_auc_score(positive, probabilities[:, c]))
        fpr, tpr, _ = roc_curve(positive, probabilities[:, c])
        curves[label] = (np.asarray(fpr), np.asarray(tpr))
    defined = [auc for auc in aucs.values() if auc is not None]
    return aucs, (float(np.mean(defined)) if defined else None), curves


def classification_report(
    true: np.ndarray, probabilities: np.ndarray, labels: Sequence[str]
) -> dict[str, Any]:
    """:func:`confusion_metrics` of the most probable class, with each class's ROC AUC and the
    macro AUC added, and the ROC curves under ``roc_curves`` (arrays, not plain data)."""
    predicted = np.asarray(probabilities).argmax(axis=1)
    metrics = confusion_metrics(np.asarray(true).tolist(), predicted.tolist(), labels)
    aucs, macro_auc, curves = roc_metrics(np.asarray(true), np.asarray(probabilities), labels)
    for label in labels:
        metrics["per_class"][label]["auc"] = aucs[label]
    metrics["macro"]["auc"] = macro_auc
    metrics["roc_curves"] = curves
    return metrics


def _matrix_pairs(matrix: np.ndarray) -> tuple[list[int], list[int]]:
    """The (true, predicted) pairs a confusion matrix counts."""
    classes = matrix.shape[0]
    cells = np.repeat(np.arange(classes * classes), matrix.reshape(-1))
    return (cells // classes).tolist(), (cells % classes).tolist()


def fold_summary(metrics: object, labels: Sequence[str]) -> dict[str, Any] | None:
    """What the bundle recorded at training, in the shape of :func:`confusion_metrics`.

    Cross-validation (``per_fold`` confusion matrices): every measure per fold, then mean and
    sample standard deviation over the folds as ``{"mean", "sd"}``. A hold-out split: its
    measures from its confusion matrix. None when nothing usable is recorded.
    """
    recorded = _mapping(metrics)
    folds = recorded.get("per_fold")
    try:
        if isinstance(folds, list) and folds:
            matrices = [np.asarray(fold["confusion_matrix"], dtype=np.int64) for fold in folds]
            per_fold = [confusion_metrics(*_matrix_pairs(matrix), labels) for matrix in matrices]
            return {"source": f"{len(per_fold)}-fold cross-validation at training", **_spread(per_fold)}
        if "confusion_matrix" in recorded:
            matrix = np.asarray(recorded["confusion_matrix"], dtype=np.int64)
            return {
                "source": "held-out test set at training",
                **confusion_metrics(*_matrix_pairs(matrix), labels),
            }
    except (KeyError, TypeError, ValueError, IndexError):
        return None
    return None


def _spread(folds: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean and sample sd over folds of every number in :func:`confusion_metrics`' shape."""

    def spread(values: Sequence[Any]) -> dict[str, float] | None:
        defined = [float(v) for v in values if v is not None]
        if not defined:
            return None
        array = np.asarray(defined)
        return {"mean": float(array.mean()), "sd": float(array.std(ddof=1)) if len(array) > 1 else 0.0}

    first = folds[0]
    return {
        "folds": len(folds),
        "images": int(sum(fold["images"] for fold in folds)),
        "accuracy": spread([fold["accuracy"] for fold in folds]),
        "macro": {key: spread([fold["macro"][key] for fold in folds]) for key in first["macro"]},
        "per_class": {
            label: {
                key: spread([fold["per_class"][label][key] for fold in folds])
                for key in first["per_class"][label]
                if key != "support"
            }
            for label in first["per_class"]
        },
        "confusion_matrix": np.sum([fold["confusion_matrix"] for fold in folds], axis=0).tolist(),
    }


# --- retrieval --------------------------------------------------------------------------------


def retrieval_summary(embeddings: np.ndarray, labels: Sequence[str], ks: Sequence[int]) -> dict[str, Any]:
    """The retrieval paper's Table 1 for these embeddings: per metric (L2, cosine) P@k, R@k,
    NDCG@k and the mean search time per query (ms) for each k, and mAP; leave-one-out, relevant
    = same label (:func:`workers.retrieval_metrics.evaluate_retrieval`). ``error`` says why
    there is none (fewer than two images, no label shared by two)."""
    ks = sorted(ks)
    summary: dict[str, Any] = {
        "ks": ks,
        "candidates": max(len(labels) - 1, 0),
        "protocol": "leave-one-out over the evaluated images; relevant = same label; exact (flat) index",
    }
    try:
        reports = {metric: evaluate_retrieval(embeddings, list(labels), ks, metric) for metric in METRICS}
    except ValueError as error:
        return {**summary, "error": str(error)}
    first = reports[METRICS[0]]
    summary.update(items=first.items, queries=first.queries, skipped=first.skipped)
    for metric, result in reports.items():
        summary[metric] = _retrieval_numbers(result, _search_times(embeddings, metric, ks))
    return summary


def _retrieval_numbers(result: RetrievalReport, milliseconds: Mapping[int, float]) -> dict[str, Any]:
    return {
        "precision": {str(k): v for k, v in result.precision.items()},
        "recall": {str(k): v for k, v in result.recall.items()},
        "ndcg": {str(k): v for k, v in result.ndcg.items()},
        "map": result.mean_average_precision,
        "search_ms": {str(k): v for k, v in milliseconds.items()},
    }


def _search_times(embeddings: np.ndarray, metric: Metric, ks: Sequence[int]) -> dict[int, float]:
    """Mean wall time (ms) of one query's search for k results, for each k, on the same exact
    index :func:`evaluate_retrieval` searches (which times only the largest k)."""
    vectors = np.asarray(embeddings, dtype=np.float32)
    ids = np.arange(len(vectors))
    index = VectorIndex.build("flat", metric, IndexOptions(kind="flat", metric=metric), ids, vectors)
    queries = np.unique(np.linspace(0, len(vectors) - 1, min(len(vectors), TIMED_QUERIES)).astype(np.int64))
    times: dict[int, float] = {}
    for k in ks:
        started = time.perf_counter()
        for query in queries.tolist():
            index.search(vectors[query], k, exclude={query})
        times[k] = (time.perf_counter() - started) / len(queries) * 1e3
    return times


# --- embedding space --------------------------------------------------------------------------


def embedding_projections(embeddings: np.ndarray, seed: int = 0) -> Projections:
    """PCA of every embedding and t-SNE of at most :data:`TSNE_MAX_POINTS` (an even random
    sample from ``seed``), both to 2-D; the same embeddings and seed give the same layout."""
    vectors = np.asarray(embeddings, dtype=np.float64)
    count = len(vectors)
    if count < 3:
        return Projections(None, (), None, np.arange(0), "too few images for a 2-D view")
    components = min(2, vectors.shape[1])
    pca_model = PCA(n_components=components, random_state=seed)
    pca = np.asarray(pca_model.fit_transform(vectors))
    if components < 2:
        pca = np.column_stack([pca, np.zeros(count)])
    variance = tuple(float(v) for v in pca_model.explained_variance_ratio_)
    if count < 6:
        return Projections(pca, variance, None, np.arange(0), "too few images for t-SNE")
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(count, size=min(count, TSNE_MAX_POINTS), replace=False))
    perplexity = float(min(30.0, (len(chosen) - 1) / 3))
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed, n_jobs=1)
    layout = np.asarray(tsne.fit_transform(vectors[chosen]))
    note = (
        f"t-SNE of {len(chosen)} of {count} images (a seeded random sample)" if len(chosen) < count else None
    )
    return Projections(pca, variance, layout, chosen, note)


# --- plain data -------------------------------------------------------------------------------


def evaluation_json(evaluation: Evaluation) -> dict[str, Any]:
    """Every number of the evaluation as plain data (``metrics.json``); undefined values are None."""
    data = evaluation.data
    counts = dict.fromkeys(data.labels, 0)
    for example in evaluation.examples:
        counts[example.label] += 1
    plain: dict[str, Any] = _finite(
        {
            "created": evaluation.created.isoformat(timespec="seconds"),
            "synthetic_data": evaluation.synthetic,
            "banners": list(evaluation.banners),
            "warnings": list(evaluation.warnings),
            "data_set": data.describe(),
            "split": {
                "name": evaluation.split,
                "reason": evaluation.split_reason,
                "images": len(evaluation.examples),
                "counts": counts,
            },
            "ks": list(evaluation.ks),
            "models": [_model_json(model) for model in evaluation.models],
            "code": code_version(),
        }
    )
    return plain


def _model_json(model: ModelEvaluation) -> dict[str, Any]:
    bundle = model.bundle
    projections = model.projections
    return {
        "name": model.name,
        "bundle": {
            "path": str(bundle.path),
            "id": bundle.id,
            "architecture": bundle.architecture,
            "labels": list(bundle.labels),
            "input_size": bundle.input.size,
            "clinical_use": bundle.clinical_use,
            "trained_at": bundle.description.get("trained_at"),
            "trained_here": model.trained_here,
        },
        "relation": model.relation,
        "classification": model.classification,
        "recorded_at_training": model.recorded,
        "retrieval": model.retrieval,
        "embedding": {
            "dimension": int(model.embeddings.shape[1]) if model.embeddings.ndim == 2 else None,
            "pca_explained_variance": list(projections.pca_variance),
            "tsne_points": len(projections.tsne_indices),
            "note": projections.note,
        },
        "inference": {
            "device": model.device,
            "images": len(model.true),
            "seconds": model.inference_seconds,
            "ms_per_image": model.inference_seconds / len(model.true) * 1e3 if len(model.true) else None,
        },
    }


def _finite(value: Any) -> Any:
    """NaN and infinities as None: JSON has no such numbers."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value
