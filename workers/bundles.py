"""Model bundles: one self-describing file per trained model.

A bundle is ``torch.save`` of a plain dict (tensors, strings, numbers, booleans, lists,
dicts): the architecture name, the labels in ascending severity, the input size and
normalisation, whether the model is cleared for clinical use, free-form training metadata and
the weights. Plain data lets :func:`load_bundle` read it with ``weights_only=True``, so a hostile
file can be refused but can never run code. A bundle's id is the sha256 of the file's bytes:
results name the exact model that produced them.

:func:`load_bundle` checks everything a model needs before the node accepts its first image,
including that the weights fit the architecture; a :class:`ModelBundle` therefore always
instantiates.
"""

from __future__ import annotations

import hashlib
import io
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from workers.files import write_atomically
from workers.models import (
    ARCHITECTURES,
    PrecedentModel,
    build_model,
    describe_load_failure,
    state_dict_mismatch,
)
from workers.preprocess import InputSpec

__all__ = [
    "BUNDLE_FORMAT",
    "BUNDLE_FORMAT_VERSION",
    "BundleError",
    "ModelBundle",
    "load_bundle",
    "save_bundle",
]

BUNDLE_FORMAT = "precedent-model-bundle"
BUNDLE_FORMAT_VERSION = 1
#: Every architecture pools adaptively, but below this the conv stacks run out of pixels.
MIN_INPUT_SIZE = 32


class BundleError(Exception):
    """A model bundle that cannot be used; the message names the file and what is wrong."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"model bundle {path}: {reason}")
        self.path = path
        self.reason = reason


@dataclass(frozen=True)
class ModelBundle:
    """A validated bundle: everything needed to rebuild, run and describe one model."""

    id: str
    path: Path
    architecture: str
    labels: tuple[str, ...]
    input: InputSpec
    clinical_use: bool
    description: dict[str, Any]
    state_dict: dict[str, Tensor]

    def instantiate(self, device: torch.device | str = "cpu") -> PrecedentModel:
        """A fresh model with the bundle's weights (loaded strictly), in eval mode on ``device``."""
        model = build_model(self.architecture, len(self.labels))
        model.load_state_dict(self.state_dict, strict=True)
        return model.to(device).eval()


def load_bundle(path: Path) -> ModelBundle:
    """Read, hash and validate a bundle file; raise :class:`BundleError` saying what is wrong."""
    data = _read_bytes(path)
    content = _unpickle(path, data)
    architecture = _architecture(path, content)
    labels = _labels(path, content.get("labels"))
    state_dict = _state_dict(path, content.get("state_dict"), architecture, len(labels))
    return ModelBundle(
        id=hashlib.sha256(data).hexdigest(),
        path=path,
        architecture=architecture,
        labels=labels,
        input=_input_spec(path, content.get("input")),
        clinical_use=_clinical_use(path, content.get("clinical_use")),
        description=_description(path, content.get("description")),
        state_dict=state_dict,
    )


def save_bundle(
    path: Path,
    model: PrecedentModel,
    *,
    architecture: str,
    labels: Sequence[str],
    input_spec: InputSpec,
    clinical_use: bool = False,
    description: Mapping[str, Any] | None = None,
) -> str:
    """Write ``model`` as a bundle at ``path`` and return its id (the file's sha256).

    Everything is validated as :func:`load_bundle` would, before anything is written, so a
    bundle that saves also loads. The file appears atomically (a temporary file in the same
    folder, then a rename): a reader never sees half a bundle.
    """
    weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    content: dict[str, Any] = {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_FORMAT_VERSION,
        "architecture": architecture,
        "labels": list(labels),
        "input": {"size": input_spec.size, "mean": list(input_spec.mean), "std": list(input_spec.std)},
        "clinical_use": clinical_use,
        "description": _plain(path, dict(description or {}), "description"),
        "state_dict": weights,
    }
    _validate_content(path, content)
    buffer = io.BytesIO()
    torch.save(content, buffer)
    data = buffer.getvalue()
    write_atomically(path, data)
    return hashlib.sha256(data).hexdigest()


def _validate_content(path: Path, content: dict[str, Any]) -> None:
    """The same checks :func:`load_bundle` makes, on a dict about to be written."""
    _format(path, content)
    architecture = _architecture(path, content)
    labels = _labels(path, content["labels"])
    _input_spec(path, content["input"])
    _clinical_use(path, content["clinical_use"])
    _state_dict(path, content["state_dict"], architecture, len(labels))


def _read_bytes(path: Path) -> bytes:
    if not path.exists():
        raise BundleError(path, "no such file")
    if path.is_dir():
        raise BundleError(path, "is a directory, not a bundle file")
    try:
        return path.read_bytes()
    except OSError as error:
        raise BundleError(path, f"cannot read it ({error.strerror or error})") from error


def _unpickle(path: Path, data: bytes) -> dict[str, Any]:
    """The bundle's top-level dict, read with ``weights_only=True`` (no code can run)."""
    try:
        content = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # hostile, truncated, not zip, bad magic...: torch raises many kinds
        raise BundleError(path, describe_load_failure(error)) from error
    if not isinstance(content, dict):
        raise BundleError(path, f"not a model bundle (holds a {type(content).__name__}, not a dict)")
    _format(path, content)
    return content


def _format(path: Path, content: Mapping[str, Any]) -> None:
    marker = content.get("format")
    if marker != BUNDLE_FORMAT:
        raise BundleError(
            path, f"not a Precedent model bundle (format marker {marker!r}, expected {BUNDLE_FORMAT!r})"
        )
    version = content.get("format_version")
    if type(version) is not int or version != BUNDLE_FORMAT_VERSION:
        raise BundleError(
            path, f"format version {version!r} is not supported (this version reads {BUNDLE_FORMAT_VERSION})"
        )


def _architecture(path: Path, content: Mapping[str, Any]) -> str:
    architecture = content.get("architecture")
    if not isinstance(architecture, str) or architecture not in ARCHITECTURES:
        known = ", ".join(ARCHITECTURES)
        raise BundleError(path, f"unknown architecture {architecture!r} (known: {known})")
    return architecture


def _labels(path: Path, labels: object) -> tuple[str, ...]:
    if not isinstance(labels, list | tuple) or not labels:
        raise BundleError(path, f"labels must be a non-empty list of names (got {labels!r})")
    for label in labels:
        if not isinstance(label, str) or not label.strip():
            raise BundleError(path, f"every label must be a non-empty string (got {label!r})")
    repeated = [label for label, count in Counter(labels).items() if count > 1]
    if repeated:
        counts = Counter(labels)
        raise BundleError(path, f"labels must be unique (got {repeated[0]!r} {_times(counts[repeated[0]])})")
    return tuple(labels)


def _times(count: int) -> str:
    return "twice" if count == 2 else f"{count} times"


def _input_spec(path: Path, spec: object) -> InputSpec:
    if not isinstance(spec, Mapping):
        raise BundleError(path, f"input must be a dict with size, mean and std (got {spec!r})")
    size = spec.get("size")
    if type(size) is not int or size < MIN_INPUT_SIZE:
        raise BundleError(path, f"input size must be an integer of at least {MIN_INPUT_SIZE} (got {size!r})")
    mean = _three_floats(path, "mean", spec.get("mean"))
    std = _three_floats(path, "std", spec.get("std"))
    if min(std) <= 0:
        raise BundleError(path, f"input std must be positive (got {list(std)})")
    try:
        return InputSpec(size=size, mean=mean, std=std)
    except ValueError as error:  # the spec's own limits, e.g. the largest size
        raise BundleError(path, f"input: {error}") from error


def _three_floats(path: Path, name: str, values: object) -> tuple[float, float, float]:
    numbers = values if isinstance(values, list | tuple) else ()
    if len(numbers) != 3 or not all(_is_finite_number(v) for v in numbers):
        raise BundleError(
            path, f"input {name} must be 3 finite numbers, one per RGB channel (got {values!r})"
        )
    return (float(numbers[0]), float(numbers[1]), float(numbers[2]))


def _is_finite_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _clinical_use(path: Path, value: object) -> bool:
    if not isinstance(value, bool):
        raise BundleError(path, f"clinical_use must be true or false (got {value!r})")
    return value


def _description(path: Path, value: object) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BundleError(path, f"description must be a dict (got {type(value).__name__})")
    return value


def _plain(path: Path, value: Any, where: str) -> Any:
    """``value`` as plain data that ``weights_only`` loading accepts; tuples become lists."""
    if value is None or isinstance(value, str | bool | int | float):
        return value
    if isinstance(value, list | tuple):
        return [_plain(path, item, f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, dict):
        if not all(isinstance(key, str) for key in value):
            raise BundleError(path, f"{where} keys must be strings")
        return {key: _plain(path, item, f"{where}.{key}") for key, item in value.items()}
    raise BundleError(
        path,
        f"{where} must hold only strings, numbers, booleans, lists and dicts (got {type(value).__name__})",
    )


def _state_dict(path: Path, weights: object, architecture: str, num_classes: int) -> dict[str, Tensor]:
    """The weights, checked to load strictly into ``architecture`` with ``num_classes`` outputs."""
    if not isinstance(weights, dict) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in weights.items()
    ):
        raise BundleError(path, "state_dict must be a dict of names to tensors")
    with torch.device("meta"):  # shapes only: no memory, no random initialisation
        expected = build_model(architecture, num_classes).state_dict()
    mismatch = state_dict_mismatch(expected, weights) or _missing_counters(expected, weights)
    if mismatch:
        raise BundleError(path, f"weights do not fit {architecture} with {num_classes} classes: {mismatch}")
    _check_values(path, expected, weights)
    return weights


def _missing_counters(expected: Mapping[str, Tensor], weights: Mapping[str, Tensor]) -> str | None:
    """A bundle is written from a whole model: unlike a checkpoint, it lacks no BatchNorm counter."""
    missing = [k for k in expected if k not in weights]
    return f"{len(missing)} missing keys ({', '.join(missing[:5])})" if missing else None


def _check_values(path: Path, expected: Mapping[str, Tensor], weights: Mapping[str, Tensor]) -> None:
    """Floating weights must be floating and finite; integer buffers must be integers."""
    for key, reference in expected.items():
        tensor = weights[key]
        if tensor.is_floating_point() != reference.is_floating_point():
            raise BundleError(path, f"weight {key} has dtype {tensor.dtype}, expected {reference.dtype}")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise BundleError(path, f"weight {key} contains NaN or infinite values")
