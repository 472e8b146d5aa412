"""The one preprocessing function, shared by training and serving.

The pipeline is :func:`workers.decode.decode_for_analysis` → :func:`preprocess` → model, for
training images and for images received from the PACS alike: a model sees at serving time
exactly the transform it was trained with. Decoding has already produced a grayscale image
in [0, 1] and cropped it (ultrasound regions, blank borders); what is left is what the
ImageNet-pretrained backbones expect: three identical channels, a square of ``size`` pixels
(stretched, not letterboxed, as the BUSI papers resized), and ImageNet normalisation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

MIN_SIZE = 16
MAX_SIZE = 2048


@dataclass(frozen=True)
class InputSpec:
    """What a model expects as input; stored with the model so serving cannot drift from training."""

    size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if not MIN_SIZE <= self.size <= MAX_SIZE:
            raise ValueError(f"input size must be between {MIN_SIZE} and {MAX_SIZE} pixels, not {self.size}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError("mean and std need one value per channel (3 each)")
        if not all(np.isfinite(v) for v in (*self.mean, *self.std)):
            raise ValueError("mean and std must be finite numbers")
        if min(self.std) <= 0:
            raise ValueError(f"every std value must be positive, not {self.std}")


def preprocess(pixels: np.ndarray, spec: InputSpec) -> torch.Tensor:
    """A (H, W) grayscale image in [0, 1] as the model's (3, size, size) float32 input.

    Gray is repeated into three channels, resized to a square with antialiased bilinear
    interpolation (antialiasing matters: mammograms are shrunk tenfold, and plain bilinear
    would alias fine calcifications into noise), then normalised per channel.
    """
    return _resized(pixels, spec.size)[0].sub_(_column(spec.mean)).div_(_column(spec.std))


def preprocess_batch(images: Sequence[np.ndarray], spec: InputSpec) -> torch.Tensor:
    """Several images as one (N, 3, size, size) batch, each as :func:`preprocess` makes it."""
    if not images:
        return torch.empty((0, 3, spec.size, spec.size), dtype=torch.float32)
    return torch.stack([preprocess(image, spec) for image in images])


def _resized(pixels: np.ndarray, size: int) -> torch.Tensor:
    """The image as a (1, 3, size, size) tensor of identical channels, values still in [0, 1]."""
    if pixels.ndim != 2 or min(pixels.shape) == 0:
        raise ValueError(f"expected a non-empty (H, W) grayscale image, got shape {pixels.shape}")
    gray = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))[None, None]
    resized = functional.interpolate(
        gray, size=(size, size), mode="bilinear", align_corners=False, antialias=True
    )
    return resized.expand(1, 3, size, size).clone()


def _column(values: tuple[float, float, float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).view(3, 1, 1)
