"""Grad-CAM: one heatmap per image, in [0, 1], pointing at the evidence, leaving the model as it was."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from workers.explain import gradcam_heatmaps
from workers.models import ARCHITECTURES, PrecedentModel, build_model

NUM_CLASSES = 3


def with_batchnorm_statistics(model: PrecedentModel) -> PrecedentModel:
    """Give BatchNorm layers the statistics of real inputs, as any trained model has.

    Freshly built torchvision MobileNet and EfficientNet have running statistics that do not
    fit their activations, so their features are almost constant (logits identical for any
    image, CAMs of 1e-15) and nothing meaningful can be explained.
    """
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # a cumulative average: one batch sets the statistics
    model.train()
    with torch.no_grad():
        model(torch.rand(8, 3, 64, 64, generator=torch.Generator().manual_seed(2)))
    return model.eval()


@pytest.fixture(scope="module")
def models() -> dict[str, PrecedentModel]:
    torch.manual_seed(0)
    return {name: with_batchnorm_statistics(build_model(name, NUM_CLASSES)) for name in ARCHITECTURES}


@pytest.fixture
def images() -> torch.Tensor:
    return torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def predicted(model: PrecedentModel, images: torch.Tensor) -> list[int]:
    with torch.no_grad():
        return [int(c) for c in model(images).argmax(dim=1)]


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_each_architecture_gets_one_heatmap_per_image_in_the_unit_range(
    models: dict[str, PrecedentModel], images: torch.Tensor, architecture: str
) -> None:
    model = models[architecture]
    heatmaps = gradcam_heatmaps(model, images, predicted(model, images))
    assert heatmaps.shape == (2, 64, 64)
    assert heatmaps.dtype == np.float32
    assert np.isfinite(heatmaps).all()
    assert heatmaps.min() >= 0.0
    assert heatmaps.max() <= 1.0
    assert np.ptp(heatmaps) > 0.5, "a non-degenerate input gives a map that varies"


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_the_model_is_left_exactly_as_it_was(models: dict[str, PrecedentModel], architecture: str) -> None:
    """pytorch-grad-cam sets eval mode and clears gradients; a model being trained must not notice."""
    model = models[architecture]
    model.train()
    first, *_, last = model.parameters()
    first.requires_grad_(False)
    last.grad = torch.ones_like(last)  # a gradient the caller accumulated, mid-training
    modes = [m.training for m in model.modules()]
    required = [p.requires_grad for p in model.parameters()]
    grads = [p.grad for p in model.parameters()]
    try:
        gradcam_heatmaps(model, torch.rand(1, 3, 64, 64), [1])
        assert [m.training for m in model.modules()] == modes
        assert [p.requires_grad for p in model.parameters()] == required
        assert all(p.grad is g for p, g in zip(model.parameters(), grads, strict=True))
    finally:
        first.requires_grad_(True)
        last.grad = None
        model.eval()


def test_a_model_in_eval_mode_and_fully_frozen_still_explains(models: dict[str, PrecedentModel]) -> None:
    model = models["cnn4"]
    model.requires_grad_(False)
    try:
        with torch.no_grad():
            heatmaps = gradcam_heatmaps(model, torch.rand(1, 3, 64, 64), [0])
        assert heatmaps.shape == (1, 64, 64)
        assert not model.training
        assert not any(p.requires_grad for p in model.parameters())
    finally:
        model.requires_grad_(True)


def test_inside_inference_mode_it_still_explains(models: dict[str, PrecedentModel]) -> None:
    with torch.inference_mode():
        batch = torch.rand(1, 3, 64, 64)
        assert gradcam_heatmaps(models["cnn4"], batch, [2]).shape == (1, 64, 64)


def test_a_constant_map_becomes_zeros_not_nan() -> None:
    model = build_model("cnn4", 2).eval()
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.zeros_(module.weight)
            assert module.bias is not None
            nn.init.zeros_(module.bias)
    heatmaps = gradcam_heatmaps(model, torch.rand(2, 3, 64, 64), [0, 1])
    assert np.array_equal(heatmaps, np.zeros((2, 64, 64), dtype=np.float32))


def test_a_nan_input_gives_zeros_not_nan(models: dict[str, PrecedentModel]) -> None:
    batch = torch.rand(1, 3, 64, 64)
    batch[0, 0, 10, 10] = float("nan")
    heatmaps = gradcam_heatmaps(models["cnn4"], batch, [0])
    assert np.isfinite(heatmaps).all()


@pytest.mark.parametrize(
    ("targets", "reason"),
    [
        ([0], "1 target classes for 2 images"),
        ([0, 3], "target class 3 out of range for 3 classes"),
        ([-1, 0], "-1"),
    ],
)
def test_bad_targets_are_refused_rather_than_silently_ignored(
    models: dict[str, PrecedentModel], images: torch.Tensor, targets: list[int], reason: str
) -> None:
    with pytest.raises(ValueError, match=reason):
        gradcam_heatmaps(models["cnn4"], images, targets)


def test_an_empty_batch_gives_no_heatmaps(models: dict[str, PrecedentModel]) -> None:
    heatmaps = gradcam_heatmaps(models["cnn4"], torch.rand(0, 3, 64, 48), [])
    assert heatmaps.shape == (0, 64, 48)


def test_a_batch_that_is_not_four_dimensional_is_refused(models: dict[str, PrecedentModel]) -> None:
    with pytest.raises(ValueError, match=r"batch must be \(N, C, H, W\)"):
        gradcam_heatmaps(models["cnn4"], torch.rand(3, 64, 64), [0])


# --- Does the map point at the evidence? -------------------------------------------------------

SIZE = 64
BLOB_SIGMA = 3.0
MARGIN = 10
SQUARE = 6


def blob_images(count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Noisy images, each with an equally bright square somewhere as a distractor; the
    odd-numbered ones (class 1) also carry a round blob, away from the square.

    Returns the images ``(N, 3, SIZE, SIZE)``, the labels and the blob centres ``(N, 2)`` as
    (row, column); a class-0 image's centre is meaningless. A map that merely finds bright
    things points at the square as often as at the blob.
    """
    labels = torch.arange(count) % 2
    centres = torch.randint(MARGIN, SIZE - MARGIN, (count, 2), generator=generator)
    rows, columns = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    squared = (rows[None] - centres[:, 0, None, None]) ** 2 + (columns[None] - centres[:, 1, None, None]) ** 2
    blobs = torch.exp(-squared / (2 * BLOB_SIGMA**2)) * labels[:, None, None]
    corners = distractor_corners(centres, generator)
    in_square = ((rows[None] - corners[:, 0, None, None]) % SIZE < SQUARE) & (
        (columns[None] - corners[:, 1, None, None]) % SIZE < SQUARE
    )
    gray = 0.4 * torch.rand(count, SIZE, SIZE, generator=generator) + 0.6 * blobs + 0.6 * in_square
    return gray.clamp(0, 1)[:, None].expand(-1, 3, -1, -1).contiguous(), labels, centres


def distractor_corners(centres: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Per image, a random square corner whose square is more than 12 pixels from the blob centre
    along some axis (the first fitting one of 32 tries; one always fits in practice)."""
    tries = torch.randint(4, SIZE - SQUARE - 4, (len(centres), 32, 2), generator=generator)
    far = (tries + SQUARE // 2 - centres[:, None, :]).abs().amax(dim=2) > 12
    assert far.any(dim=1).all()
    return tries[torch.arange(len(centres)), far.int().argmax(dim=1)]


def trained_blob_detector() -> PrecedentModel:
    """A cnn4 taught to find the blob: 150 steps of 16 images, about 8 s on two idle CPU cores
    (60 steps sat on the edge: with this torch build the loss had not yet left its plateau)."""
    torch.manual_seed(11)
    generator = torch.Generator().manual_seed(12)
    model = build_model("cnn4", 2)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(150):
        images, labels, _ = blob_images(16, generator)
        optimiser.zero_grad()
        loss = nn.functional.cross_entropy(model(images), labels)
        loss.backward()  # type: ignore[no-untyped-call]
        optimiser.step()
    return model.eval()


def test_the_heatmap_peaks_on_the_blob_that_makes_the_class_not_on_the_distractor() -> None:
    model = trained_blob_detector()
    images, labels, centres = blob_images(40, torch.Generator().manual_seed(13))
    with torch.no_grad():
        accuracy = (model(images).argmax(dim=1) == labels).float().mean().item()
    assert accuracy >= 0.9, "the detector must have learnt the task for the test to mean anything"
    positives = labels == 1
    heatmaps = gradcam_heatmaps(model, images[positives], [1] * int(positives.sum()))
    peaks = np.array([np.unravel_index(np.argmax(h), h.shape) for h in heatmaps])
    distances = np.linalg.norm(peaks - centres[positives].numpy(), axis=1)
    assert (distances <= 10).mean() >= 0.7, f"peak-to-blob distances: {np.round(distances, 1)}"
