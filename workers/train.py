"""Training: a labelled data set in, a model bundle out, by the recipe of the ultrasound papers.

The recipe (Fawzy et al., Sci Rep 2026; Britto et al.): augmentation by rotation, horizontal
flip, zoom and contrast; Adam; cross-entropy weighted by inverse class frequency; the
learning rate halved when the validation loss stalls (ReduceLROnPlateau) and training stopped
when it has not improved for ``patience`` epochs, keeping the weights of the best epoch;
either an 80:20 split by patient or K-fold cross-validation.

Where the data go:

- every image is decoded once (:func:`workers.datasets.read_pixels`: the node's own decoding
  and crop) and cached in memory twice, small: as the exact ``size`` x ``size`` gray image
  that :func:`workers.preprocess.preprocess` makes of it (float32; evaluation feeds this back
  through ``preprocess``, which then leaves it unchanged, so held-out metrics are computed on
  bit-for-bit the input the node would give the model), and at 1.25 x ``size`` in 8 bits as
  the source of augmented training images (rotation and zoom need a margin);
- augmentation runs on those tensors (torchvision.transforms.v2) before the same
  ``preprocess`` (three channels, normalisation) that serving uses;
- the test side of a split is never seen during training: early stopping and the learning
  rate schedule watch a validation part carved, by patient, out of the training side.

With ``folds=K`` the K fold models give the metrics (mean and standard deviation over folds);
the bundle saved is then a model retrained on all images by the same recipe (early stopping
on a validation part of all images), because the best fold would be chosen on its own test
set (an optimistic pick) and would have seen only (K-1)/K of the data. Its description says
that the metrics are the cross-validation estimate, not a test of that model.

Training is resumable: after each epoch, a checkpoint (model, optimizer, scheduler, epoch,
early-stopping state and every random number generator) is written atomically into a folder
beside the output, ``<out>.training/``; running the same training again continues from the last
completed epoch, and ends with the same weights as a run never interrupted. The folder is
removed once the bundle is written. On the CPU a seed gives the same weights every time.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import json
import math
import random
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn
from torchvision import tv_tensors  # type: ignore[import-untyped]  # no type information shipped
from torchvision.transforms import v2  # type: ignore[import-untyped]

from workers.bundles import save_bundle
from workers.datasets import (
    DataSetError,
    ImageReadError,
    LabelledDataSet,
    Split,
    fold_splits,
    holdout_split,
    read_pixels,
)
from workers.files import write_atomically
from workers.models import (
    ARCHITECTURES,
    DEFAULT_ARCHITECTURE,
    PrecedentModel,
    build_model,
    load_backbone_weights,
)
from workers.preprocess import MAX_SIZE, InputSpec, preprocess, preprocess_batch

__all__ = [
    "ImageCache",
    "Progress",
    "TrainingError",
    "TrainingOptions",
    "TrainingResult",
    "cache_images",
    "checkpoint_folder",
    "classification_metrics",
    "code_version",
    "metrics_lines",
    "resolve_device",
    "summarise_folds",
    "train",
]

SOURCE_SCALE = 1.25
"""Augmentation sources are cached at this multiple of the input size: room to rotate and zoom."""
ROTATION_DEGREES = 15.0
ZOOM_AREA = (0.75, 1.0)
"""Random crops cover this fraction of the (rotated) image before being resized to the input."""
CONTRAST = 0.25
LR_FACTOR = 0.5
MIN_MODEL_SIZE = 32
"""The smallest input every architecture accepts (see workers.models)."""

Device = Literal["auto", "cpu", "cuda"]
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")
ProgressTask = Literal["decode", "epoch", "batch"]


class TrainingError(Exception):
    """Training cannot start or go on; the message says why and what to do."""


@dataclass(frozen=True)
class TrainingOptions:
    """How to train; invalid options cannot be constructed (ValueError says which and why)."""

    architecture: str = DEFAULT_ARCHITECTURE
    epochs: int = 30
    batch_size: int = 32
    size: int = 224
    learning_rate: float = 1e-3
    patience: int = 5
    """Epochs without a better validation loss before stopping; the LR halves after half as many."""
    folds: int | None = None
    """None: one hold-out split (``test_fraction``); K: K-fold cross-validation."""
    seed: int = 0
    backbone_weights: Path | None = None
    """A torchvision ImageNet checkpoint to start the backbone from (see load_backbone_weights)."""
    device: str = "auto"
    threads: int | None = None
    """CPU threads torch may use while training; None leaves torch's choice (one per core).
    On a busy shared machine 1 can be several times faster: idle threads of torch's pool spin
    and take the core from the one doing the small per-image work. The same seed gives the
    same weights for the same number of threads."""
    clinical_use: bool = False
    test_fraction: float = 0.2
    validation_fraction: float = 0.15
    """Of the training side, held out by patient for early stopping and the LR schedule."""

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            known = ", ".join(ARCHITECTURES)
            raise ValueError(f"unknown architecture {self.architecture!r} (known: {known})")
        for name in ("epochs", "batch_size", "patience"):
            if type(getattr(self, name)) is not int or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a whole number of at least 1, not {getattr(self, name)!r}")
        if not MIN_MODEL_SIZE <= self.size <= MAX_SIZE:
            raise ValueError(f"size must be between {MIN_MODEL_SIZE} and {MAX_SIZE} pixels, not {self.size}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"learning rate must be a positive number, not {self.learning_rate}")
        if self.folds is not None and self.folds < 2:
            raise ValueError(f"folds must be at least 2 (or none, for an 80:20 split), not {self.folds}")
        for name in ("test_fraction", "validation_fraction"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be between 0 and 1, not {getattr(self, name)}")
        if self.threads is not None and (type(self.threads) is not int or self.threads < 1):
            raise ValueError(f"threads must be a whole number of at least 1, not {self.threads!r}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}, not {self.device!r}")


@dataclass(frozen=True)
class Progress:
    """One step of training, for progress bars and logs.

    ``task`` is ``decode`` (one image decoded, ``run`` empty), ``batch`` (one batch of an
    epoch) or ``epoch`` (an epoch done and checkpointed, with ``values``: train_loss,
    val_loss, val_accuracy, lr). ``run`` names the model being trained: ``hold-out``,
    ``fold 2 of 5`` or ``all images``. ``completed`` counts from 1 to ``total``; an epoch run
    that stops early ends below its total, with ``values["stopped"]`` 1.
    """

    task: ProgressTask
    run: str
    completed: int
    total: int
    values: Mapping[str, float] = field(default_factory=dict)


ProgressCallback = Callable[[Progress], None]


@dataclass(frozen=True)
class TrainingResult:
    """What :func:`train` wrote."""

    bundle: Path
    bundle_id: str
    metrics: dict[str, Any]
    """Held-out metrics (hold-out split) or the cross-validation summary (folds)."""
    description: dict[str, Any]
    """Everything recorded in the bundle about the training."""
    resumed: bool


@dataclass(frozen=True)
class ImageCache:
    """Every image of a data set, decoded once, in the two small forms training needs.

    ``exact[i]`` is the (size, size) float32 gray image :func:`preprocess` computes before
    normalising, so ``preprocess(exact[i], spec)`` equals ``preprocess(read_pixels(...), spec)``;
    ``sources[i]`` is (1.25 size)² uint8 for augmentation.
    """

    size: int
    exact: tuple[np.ndarray, ...]
    sources: tuple[np.ndarray, ...]


# --- the public entry point -------------------------------------------------------------------


def train(
    data: LabelledDataSet,
    out: Path,
    options: TrainingOptions,
    progress: ProgressCallback | None = None,
) -> TrainingResult:
    """Train on ``data`` as ``options`` say and write the bundle ``out``.

    Checks everything that can be checked before the long part (device, backbone file, split,
    that ``out`` is writable, that a checkpoint folder beside it belongs to this same
    training), then decodes every image (unreadable ones are reported together in a
    :class:`DataSetError`), trains, writes the bundle atomically and removes the checkpoints.

    Raises TrainingError, DataSetError, or whatever ``progress`` raises: an exception from the
    callback stops training after the checkpoint it reports, which is how tests interrupt it.
    """
    report = progress or _ignore
    started, started_at = time.monotonic(), datetime.now(UTC)
    device = resolve_device(options.device)
    backbone = _backbone_record(options)
    runs = _plan(data, options)
    checkpoints = _Checkpoints.open(out, _fingerprint(data, options, backbone))
    with torch_threads(options.threads), _deterministic():
        cache = cache_images(data, options.size, report)
        outcomes = [_train_run(run, data, cache, options, device, checkpoints, report) for run in runs]
    final = outcomes[-1]
    model = build_model(options.architecture, len(data.labels))
    model.load_state_dict(final.best_state)
    description = _description(data, options, runs, outcomes, backbone, device, started_at)
    description["training"]["duration_s"] = round(time.monotonic() - started, 3)
    try:
        bundle_id = save_bundle(
            out,
            model,
            architecture=options.architecture,
            labels=data.labels,
            input_spec=InputSpec(size=options.size),
            clinical_use=options.clinical_use,
            description=description,
        )
    except OSError as error:
        raise TrainingError(f"cannot write the bundle {out}: {error.strerror or error}") from None
    checkpoints.remove()
    return TrainingResult(
        bundle=out,
        bundle_id=bundle_id,
        metrics=description["metrics"],
        description=description,
        resumed=any(outcome.resumed for outcome in outcomes),
    )


def resolve_device(device: str) -> torch.device:
    """``auto`` is CUDA when available, else the CPU; ``cuda`` without a GPU is an error."""
    if device not in DEVICES:
        raise TrainingError(f"device must be one of {', '.join(DEVICES)}, not {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise TrainingError("device cuda was asked for, but torch sees no CUDA GPU (use --device cpu)")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def checkpoint_folder(out: Path) -> Path:
    """Where the checkpoints of the training that writes ``out`` live while it runs."""
    return out.with_name(f"{out.name}.training")


def _ignore(_: Progress) -> None:
    return None


# --- images -----------------------------------------------------------------------------------


def cache_images(data: LabelledDataSet, size: int, progress: ProgressCallback | None = None) -> ImageCache:
    """Decode every image of ``data`` once; unreadable ones are reported together.

    Raises :class:`DataSetError` naming each unreadable file (and the table line that listed it).
    """
    report = progress or _ignore
    exact_spec = InputSpec(size=size, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    source_spec = InputSpec(
        size=min(MAX_SIZE, round(size * SOURCE_SCALE)), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)
    )
    exact: list[np.ndarray] = []
    sources: list[np.ndarray] = []
    problems: list[str] = []
    total = len(data.examples)
    for done, example in enumerate(data.examples, start=1):
        try:
            pixels = read_pixels(example)
        except ImageReadError as error:
            where = (
                f"{example.origin}: " if example.origin and example.origin != data.name_of(example) else ""
            )
            problems.append(f"{where}{data.name_of(example)}: {error.reason}")
        else:
            # preprocess with mean 0 and std 1 is the resize alone, exactly as serving resizes.
            exact.append(preprocess(pixels, exact_spec)[0].numpy())
            source = preprocess(pixels, source_spec)[0].mul_(255.0).round_().clamp_(0, 255)
            sources.append(source.to(torch.uint8).numpy())
        report(Progress("decode", "", done, total))
    if problems:
        raise DataSetError(data.source, problems)
    return ImageCache(size, tuple(exact), tuple(sources))


def _augmentation(size: int) -> Any:
    """Rotation, zoom (a random crop resized to the input), horizontal flip and contrast.

    Vertical flips are left out: an ultrasound image has a top (the skin), and an image upside
    down is one the model will never be shown.
    """
    return v2.Compose(
        [
            v2.RandomRotation(ROTATION_DEGREES, interpolation=v2.InterpolationMode.BILINEAR),
            v2.RandomResizedCrop(size, scale=ZOOM_AREA, ratio=(0.9, 1.1), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ColorJitter(contrast=CONTRAST),
        ]
    )


def _training_batch(cache: ImageCache, indices: Sequence[int], augment: Any, spec: InputSpec) -> Tensor:
    images = []
    for i in indices:
        source = torch.from_numpy(cache.sources[i]).to(torch.float32).div_(255.0)[None]
        augmented: Tensor = augment(tv_tensors.Image(source))
        gray = augmented.as_subclass(Tensor)[0].clamp_(0.0, 1.0).numpy()
        images.append(preprocess(gray, spec))
    return torch.stack(images)


def _exact_batch(cache: ImageCache, indices: Sequence[int], spec: InputSpec) -> Tensor:
    return preprocess_batch([cache.exact[i] for i in indices], spec)


# --- planning ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Run:
    """One model to train: its sides of the data (indices into the data set's examples)."""

    name: str
    key: str
    train: tuple[int, ...]
    validation: tuple[int, ...]
    test: tuple[int, ...]


def _plan(data: LabelledDataSet, options: TrainingOptions) -> list[_Run]:
    """The models to train: one on 80:20, or K folds and then one on all images."""
    examples = data.examples
    everything = tuple(range(len(examples)))
    try:
        if options.folds is None:
            split = holdout_split(examples, options.test_fraction, options.seed)
            return [_run("hold-out", "holdout", data, split, options)]
        splits = fold_splits(examples, options.folds, options.seed)
        runs = [
            _run(f"fold {k} of {options.folds}", f"fold-{k}", data, split, options)
            for k, split in enumerate(splits, start=1)
        ]
        return [*runs, _run("all images", "all", data, Split(everything, ()), options)]
    except ValueError as error:
        raise TrainingError(f"cannot split {data.source}: {error}") from None


def _run(name: str, key: str, data: LabelledDataSet, split: Split, options: TrainingOptions) -> _Run:
    """Carve the validation part out of the training side, by patient, stratified."""
    side = [data.examples[i] for i in split.train]
    inner = holdout_split(side, options.validation_fraction, options.seed + 1)
    train = tuple(split.train[i] for i in inner.train)
    validation = tuple(split.train[i] for i in inner.test)
    missing = [label for label in data.labels if not any(data.examples[i].label == label for i in train)]
    if missing:
        raise ValueError(f"{name}: no {', '.join(missing)} image left to train on; more data is needed")
    return _Run(name, key, train, validation, split.test)


def _backbone_record(options: TrainingOptions) -> dict[str, Any] | None:
    """The ImageNet checkpoint's path and hash, checked now to load into the architecture's
    backbone, so that a wrong file stops training before the images are decoded."""
    path = options.backbone_weights
    if path is None:
        return None
    if not path.is_file():
        raise TrainingError(f"backbone weights {path}: no such file")
    try:
        load_backbone_weights(build_model(options.architecture, 2), path)
    except ValueError as error:  # no backbone, not a state dict, keys or shapes that do not fit
        raise TrainingError(str(error)) from None
    except OSError as error:
        raise TrainingError(f"backbone weights {path}: cannot read it ({error.strerror or error})") from None
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return {"path": str(path), "sha256": digest.hexdigest()}


def _fingerprint(data: LabelledDataSet, options: TrainingOptions, backbone: Mapping[str, Any] | None) -> str:
    """What makes two trainings the same: their examples and every option that changes the weights."""
    recipe = {
        key: value
        for key, value in asdict(options).items()
        if key not in ("device", "threads", "clinical_use", "backbone_weights")
    }
    content = {
        "examples": [[str(e.path), e.label, e.patient_id, e.frame] for e in data.examples],
        "labels": list(data.labels),
        "options": recipe,
        "backbone_sha256": backbone["sha256"] if backbone else None,
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()


# --- checkpoints ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Checkpoints:
    """The checkpoint folder of one training: ``run.json`` names the training, a file per model."""

    folder: Path
    fingerprint: str

    @classmethod
    def open(cls, out: Path, fingerprint: str) -> _Checkpoints:
        if out.is_dir():
            raise TrainingError(f"{out} is a folder: the output is the bundle file to write")
        folder = checkpoint_folder(out)
        marker = folder / "run.json"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if any(folder.glob("*.pt")) and _recorded_fingerprint(marker) != fingerprint:
                raise TrainingError(
                    f"{folder} holds the checkpoints of a different training (other data or options): "
                    "remove it to start this one, or rerun the original command to finish that one"
                )
            write_atomically(marker, json.dumps({"fingerprint": fingerprint}).encode())
        except OSError as error:
            raise TrainingError(f"cannot write beside {out}: {error.strerror or error}") from None
        return cls(folder, fingerprint)

    def path(self, run: _Run) -> Path:
        return self.folder / f"{run.key}.pt"

    def load(self, run: _Run) -> dict[str, Any] | None:
        path = self.path(run)
        if not path.is_file():
            return None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # a truncated or foreign file: torch raises many kinds
            raise TrainingError(
                f"checkpoint {path} is unreadable ({error}); remove it to redo that part"
            ) from None
        if not isinstance(state, dict) or state.get("fingerprint") != self.fingerprint:
            raise TrainingError(f"checkpoint {path} belongs to another training; remove {self.folder}")
        return state

    def save(self, run: _Run, state: dict[str, Any]) -> None:
        buffer = _torch_bytes({**state, "fingerprint": self.fingerprint})
        try:
            write_atomically(self.path(run), buffer)
        except OSError as error:
            raise TrainingError(
                f"cannot write checkpoint {self.path(run)}: {error.strerror or error}"
            ) from None

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _recorded_fingerprint(marker: Path) -> str | None:
    try:
        recorded = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    value = recorded.get("fingerprint") if isinstance(recorded, dict) else None
    return value if isinstance(value, str) else None


def _torch_bytes(content: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(content, buffer)
    return buffer.getvalue()


def _rng_state() -> dict[str, Any]:
    """Every random number generator training draws from, as plain data and tensors."""
    kind, keys, position, has_gauss, cached = np.random.get_state(legacy=True)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
    }


def _restore_rng(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    saved = state["numpy"]
    keys = saved["keys"].numpy().astype(np.uint32)
    np.random.set_state(
        (saved["kind"], keys, saved["position"], saved["has_gauss"], saved["cached_gaussian"])
    )


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


@contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Torch's CPU thread count set for the training, then as before."""
    before = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def _deterministic() -> Iterator[None]:
    """Deterministic kernels while training (warning where an operation has none), then as before."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn


# --- one model --------------------------------------------------------------------------------


@dataclass
class _Outcome:
    best_state: dict[str, Tensor]
    best_epoch: int
    epochs: int
    history: list[dict[str, float]]
    test_metrics: dict[str, Any] | None
    resumed: bool


def _train_run(
    run: _Run,
    data: LabelledDataSet,
    cache: ImageCache,
    options: TrainingOptions,
    device: torch.device,
    checkpoints: _Checkpoints,
    report: ProgressCallback,
) -> _Outcome:
    """Train one model (or finish it, from its checkpoint) and test it on its test side."""
    targets = data.label_indices()
    saved = checkpoints.load(run)
    if saved is not None and saved["finished"]:
        return _outcome(saved, resumed=True)
    _seed_everything(options.seed)
    model = build_model(options.architecture, len(data.labels))
    if options.backbone_weights is not None:
        try:
            load_backbone_weights(model, options.backbone_weights)
        except ValueError as error:
            raise TrainingError(str(error)) from None
    model.to(device)
    weights = _class_weights([targets[i] for i in run.train], len(data.labels)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=options.learning_rate)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=LR_FACTOR, patience=max(1, options.patience // 2)
    )
    state: dict[str, Any] = {
        "epoch": 0,
        "finished": False,
        "best_loss": math.inf,
        "best_epoch": 0,
        "bad_epochs": 0,
        "best_state": _cpu_copy(model.state_dict()),
        "history": [],
        "test_metrics": None,
    }
    if saved is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        state = {key: saved[key] for key in state}
        _restore_rng(saved["rng"])
    spec = InputSpec(size=options.size)
    augment = _augmentation(options.size)
    for epoch in range(state["epoch"] + 1, options.epochs + 1):
        train_loss = _train_epoch(
            model, run, cache, targets, augment, spec, options, weights, optimizer, device, report
        )
        val_loss, val_accuracy = _validation(
            model, run.validation, cache, targets, spec, options, weights, device
        )
        scheduler.step(val_loss)
        if val_loss < state["best_loss"]:
            state.update(
                best_loss=val_loss, best_epoch=epoch, bad_epochs=0, best_state=_cpu_copy(model.state_dict())
            )
        else:
            state["bad_epochs"] += 1
        stopped = state["bad_epochs"] >= options.patience
        lr = float(optimizer.param_groups[0]["lr"])
        values = {"train_loss": train_loss, "val_loss": val_loss, "val_accuracy": val_accuracy, "lr": lr}
        state["history"].append({"epoch": epoch, **values})
        state.update(epoch=epoch, finished=stopped or epoch == options.epochs)
        if state["finished"]:
            state["test_metrics"] = _test(
                run, data, cache, targets, spec, options, state["best_state"], device
            )
        checkpoints.save(
            run,
            {
                **state,
                "model": _cpu_copy(model.state_dict()),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": _rng_state(),
            },
        )
        report(Progress("epoch", run.name, epoch, options.epochs, {**values, "stopped": float(stopped)}))
        if stopped:
            break
    return _outcome(state, resumed=saved is not None)


def _outcome(state: Mapping[str, Any], resumed: bool) -> _Outcome:
    return _Outcome(
        best_state=state["best_state"],
        best_epoch=int(state["best_epoch"]),
        epochs=int(state["epoch"]),
        history=list(state["history"]),
        test_metrics=state["test_metrics"],
        resumed=resumed,
    )


def _cpu_copy(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {key: value.detach().to("cpu", copy=True) for key, value in state.items()}


def _class_weights(targets: Sequence[int], classes: int) -> Tensor:
    """Inverse class frequency, scaled so a balanced set has every weight 1."""
    counts = Counter(targets)
    return torch.tensor(
        [len(targets) / (classes * counts[c]) if counts[c] else 0.0 for c in range(classes)],
        dtype=torch.float32,
    )


def _batches(indices: Sequence[int], batch_size: int) -> list[list[int]]:
    return [list(indices[start : start + batch_size]) for start in range(0, len(indices), batch_size)]


def _train_epoch(
    model: PrecedentModel,
    run: _Run,
    cache: ImageCache,
    targets: Sequence[int],
    augment: Any,
    spec: InputSpec,
    options: TrainingOptions,
    weights: Tensor,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    report: ProgressCallback,
) -> float:
    """One pass over the training side in a random order; the mean training loss."""
    model.train()
    order = [run.train[i] for i in torch.randperm(len(run.train)).tolist()]
    batches = _batches(order, options.batch_size)
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches.pop()  # a lone image breaks BatchNorm's batch statistics; it is drawn again next epoch
    total_loss, total_weight = 0.0, 0.0
    for done, batch in enumerate(batches, start=1):
        inputs = _training_batch(cache, batch, augment, spec).to(device)
        labels = torch.tensor([targets[i] for i in batch], device=device)
        optimizer.zero_grad(set_to_none=True)
        summed = nn.functional.cross_entropy(model(inputs), labels, weight=weights, reduction="sum")
        weight = float(weights[labels].sum())
        torch.autograd.backward(summed / weight)
        optimizer.step()
        total_loss += float(summed.detach())
        total_weight += weight
        report(Progress("batch", run.name, done, len(batches)))
    return total_loss / total_weight if total_weight else math.nan


@torch.no_grad()
def _predict(
    model: PrecedentModel,
    indices: Sequence[int],
    cache: ImageCache,
    spec: InputSpec,
    batch_size: int,
    device: torch.device,
) -> Tensor:
    """Logits for the exact (unaugmented) images, on the CPU."""
    model.eval()
    outputs = [
        model(_exact_batch(cache, batch, spec).to(device)).cpu() for batch in _batches(indices, batch_size)
    ]
    return torch.cat(outputs) if outputs else torch.empty((0, model.num_classes))


def _validation(
    model: PrecedentModel,
    indices: Sequence[int],
    cache: ImageCache,
    targets: Sequence[int],
    spec: InputSpec,
    options: TrainingOptions,
    weights: Tensor,
    device: torch.device,
) -> tuple[float, float]:
    """The class-weighted mean loss and the accuracy on the validation part."""
    logits = _predict(model, indices, cache, spec, options.batch_size, device)
    labels = torch.tensor([targets[i] for i in indices], dtype=torch.long)
    weight = weights.cpu()
    loss = nn.functional.cross_entropy(logits, labels, weight=weight, reduction="sum")
    total = float(weight[labels].sum())
    accuracy = float((logits.argmax(dim=1) == labels).float().mean()) if len(indices) else math.nan
    return (float(loss) / total if total else math.nan), accuracy


def _test(
    run: _Run,
    data: LabelledDataSet,
    cache: ImageCache,
    targets: Sequence[int],
    spec: InputSpec,
    options: TrainingOptions,
    best_state: Mapping[str, Tensor],
    device: torch.device,
) -> dict[str, Any] | None:
    """Metrics of the best weights on the run's test side (None for the model on all images)."""
    if not run.test:
        return None
    model = build_model(options.architecture, len(data.labels))
    model.load_state_dict(best_state)
    model.to(device)
    predicted = _predict(model, run.test, cache, spec, options.batch_size, device).argmax(dim=1).tolist()
    return classification_metrics([targets[i] for i in run.test], predicted, data.labels)


# --- metrics ----------------------------------------------------------------------------------


def classification_metrics(
    true: Sequence[int], predicted: Sequence[int], labels: Sequence[str]
) -> dict[str, Any]:
    """Accuracy, macro F1, per-class precision / recall / F1 / support and the confusion matrix.

    The confusion matrix has a row per true class and a column per predicted class, in label
    order. A class never predicted has precision 0; macro F1 averages the classes that occur
    in ``true`` or ``predicted`` (as scikit-learn does).
    """
    classes = len(labels)
    matrix = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(true, dtype=np.int64), np.asarray(predicted, dtype=np.int64)), 1)
    hits = np.diag(matrix).astype(np.float64)
    support, called = matrix.sum(axis=1), matrix.sum(axis=0)
    precision = np.divide(hits, called, out=np.zeros(classes), where=called > 0)
    recall = np.divide(hits, support, out=np.zeros(classes), where=support > 0)
    both = precision + recall
    f1 = np.divide(2 * precision * recall, both, out=np.zeros(classes), where=both > 0)
    present = (support > 0) | (called > 0)
    total = int(matrix.sum())
    return {
        "images": total,
        "accuracy": float(hits.sum() / total) if total else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "per_class": {
            label: {
                "precision": float(precision[c]),
                "recall": float(recall[c]),
                "f1": float(f1[c]),
                "support": int(support[c]),
            }
            for c, label in enumerate(labels)
        },
        "confusion_matrix": matrix.tolist(),
    }


def summarise_folds(folds: Sequence[Mapping[str, Any]], labels: Sequence[str]) -> dict[str, Any]:
    """Mean and sample standard deviation over folds of each metric, the summed confusion matrix,
    and every fold's own metrics."""

    def spread(values: Sequence[float]) -> dict[str, float]:
        array = np.asarray(values, dtype=np.float64)
        sd = float(array.std(ddof=1)) if len(array) > 1 else 0.0
        return {"mean": float(array.mean()), "sd": sd}

    matrix = np.sum([np.asarray(fold["confusion_matrix"]) for fold in folds], axis=0)
    return {
        "folds": len(folds),
        "images": int(matrix.sum()),
        "accuracy": spread([fold["accuracy"] for fold in folds]),
        "macro_f1": spread([fold["macro_f1"] for fold in folds]),
        "per_class": {
            label: {
                measure: spread([fold["per_class"][label][measure] for fold in folds])
                for measure in ("precision", "recall", "f1")
            }
            for label in labels
        },
        "confusion_matrix": matrix.tolist(),
        "per_fold": [dict(fold) for fold in folds],
    }


def metrics_lines(description: Mapping[str, Any]) -> list[str]:
    """A bundle's metrics as text for a terminal: accuracy, macro F1, each class, confusion matrix."""
    metrics = description["metrics"]
    labels = list(description["labels"])
    folds = "folds" in metrics

    def shown(value: Any) -> str:
        return f"{value['mean']:.3f} ± {value['sd']:.3f}" if folds else f"{value:.3f}"

    if folds:
        title = (
            f"{metrics['folds']}-fold cross-validation, mean ± sd over folds "
            f"({metrics['images']} test images in all)"
        )
    else:
        title = f"held-out test set: {metrics['images']} images, never seen in training"
    width = max(len(label) for label in labels)
    lines = [title, f"accuracy {shown(metrics['accuracy'])}   macro F1 {shown(metrics['macro_f1'])}"]
    for label in labels:
        cls = metrics["per_class"][label]
        lines.append(
            f"  {label:<{width}}  precision {shown(cls['precision'])}  recall {shown(cls['recall'])}"
        )
    lines.append(
        "confusion matrix (rows: true, columns: predicted" + (", summed over folds)" if folds else ")")
    )
    lines.append(" " * (width + 2) + "  ".join(f"{label:>{max(5, len(label))}}" for label in labels))
    for label, row in zip(labels, metrics["confusion_matrix"], strict=True):
        cells = "  ".join(f"{count:>{max(5, len(other))}}" for count, other in zip(row, labels, strict=True))
        lines.append(f"  {label:<{width}}{cells}")
    if folds:
        lines.append(
            "the saved model was retrained on all images; these metrics estimate it, they do not test it"
        )
    return lines


# --- what the bundle records ------------------------------------------------------------------


def code_version() -> dict[str, Any]:
    """The package version and, when the code runs from a git checkout, its commit (no network)."""
    try:
        version = importlib.metadata.version("precedent")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    root = Path(__file__).resolve().parent.parent
    commit = _git(root, "rev-parse", "HEAD")
    changes = _git(root, "status", "--porcelain", "--untracked-files=no") if commit else None
    return {
        "package": "precedent",
        "version": version,
        "git_commit": commit,
        "git_dirty": bool(changes) if commit else None,
    }


def _git(root: Path, *arguments: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", "--no-optional-locks", "-C", str(root), *arguments],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _side(data: LabelledDataSet, indices: Sequence[int]) -> dict[str, Any]:
    examples = [data.examples[i] for i in indices]
    return {
        "counts": dict(Counter(e.label for e in examples)),
        "patients": sorted({e.patient_id for e in examples if e.patient_id is not None}),
        "files": [data.name_of(e) for e in examples],
    }


def _grouping(data: LabelledDataSet) -> str:
    known = sum(e.patient_id is not None for e in data.examples)
    if known == len(data.examples):
        return "by patient: no patient on two sides"
    if known == 0:
        return "by image: the data set names no patients, so one patient's images may be on two sides"
    return "by patient where known, by image for the images without a patient id"


def _description(
    data: LabelledDataSet,
    options: TrainingOptions,
    runs: Sequence[_Run],
    outcomes: Sequence[_Outcome],
    backbone: Mapping[str, Any] | None,
    device: torch.device,
    started_at: datetime,
) -> dict[str, Any]:
    final_run, final = runs[-1], outcomes[-1]
    recipe = {
        "architecture": options.architecture,
        "input_size": options.size,
        "epochs_max": options.epochs,
        "epochs_trained": final.epochs,
        "best_epoch": final.best_epoch,
        "batch_size": options.batch_size,
        "optimizer": "Adam",
        "learning_rate": options.learning_rate,
        "loss": "cross-entropy weighted by inverse class frequency",
        "lr_schedule": (
            f"ReduceLROnPlateau on validation loss, factor {LR_FACTOR}, "
            f"patience {max(1, options.patience // 2)}"
        ),
        "early_stopping": f"validation loss, patience {options.patience}; weights of the best epoch kept",
        "augmentation": (
            f"rotation ±{ROTATION_DEGREES:g}°, zoom (crop of {ZOOM_AREA[0]:g}-{ZOOM_AREA[1]:g} of the area), "
            f"horizontal flip, contrast ±{CONTRAST:g}"
        ),
        "backbone_weights": dict(backbone) if backbone else None,
        "device": str(device),
        "cpu_threads": options.threads or torch.get_num_threads(),
        "history": final.history,
        "started": started_at.isoformat(timespec="seconds"),
    }
    split: dict[str, Any] = {
        "grouping": _grouping(data),
        "seed": options.seed,
        "validation_fraction": options.validation_fraction,
    }
    if options.folds is None:
        held_out = round(100 * options.test_fraction)
        split.update(
            method=f"hold-out {100 - held_out}:{held_out}",
            train=_side(data, final_run.train)["counts"],
            validation=_side(data, final_run.validation),
            test=_side(data, final_run.test),
        )
        metrics = final.test_metrics or {}
        selection = "the model of the hold-out split, at its best validation epoch"
    else:
        split.update(
            method=f"{options.folds}-fold cross-validation",
            folds=[
                {
                    "test": _side(data, run.test),
                    "epochs_trained": outcome.epochs,
                    "best_epoch": outcome.best_epoch,
                }
                for run, outcome in zip(runs[:-1], outcomes[:-1], strict=True)
            ],
            final_validation=_side(data, final_run.validation),
        )
        metrics = summarise_folds([o.test_metrics or {} for o in outcomes[:-1]], data.labels)
        selection = (
            f"retrained on all images after {options.folds}-fold cross-validation (early stopping on "
            "a validation part of them); the metrics are the cross-validation estimate, not a test of "
            "this model"
        )
    return {
        "data_set": data.describe(),
        "labels": list(data.labels),
        "split": split,
        "metrics": metrics,
        "model_selection": selection,
        "training": recipe,
        "seed": options.seed,
        "code": code_version(),
        "clinical_use": options.clinical_use,
        "trained_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
