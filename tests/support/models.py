"""Tiny model bundles for tests: real architectures, random weights, small inputs."""

from __future__ import annotations

from pathlib import Path

import torch

from workers.bundles import save_bundle
from workers.models import build_model
from workers.preprocess import InputSpec

LABELS = ("normal", "benign", "malignant")


def tiny_bundle(path: Path, architecture: str = "cnn4", size: int = 64, seed: int = 0) -> Path:
    """A bundle of ``architecture`` with seeded random weights at ``size`` x ``size``:
    its answers mean nothing, but every stage of the pipeline runs for real."""
    torch.manual_seed(seed)
    model = build_model(architecture, len(LABELS))
    save_bundle(
        path,
        model,
        architecture=architecture,
        labels=LABELS,
        input_spec=InputSpec(size=size),
        description={"data": "none: random weights for tests"},
    )
    return path
