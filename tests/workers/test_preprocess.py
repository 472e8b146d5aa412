"""Preprocessing: decoded gray in [0, 1] to the tensor a pretrained backbone expects."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from workers.preprocess import IMAGENET_MEAN, IMAGENET_STD, InputSpec, preprocess, preprocess_batch

MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def unnormalised(tensor: torch.Tensor) -> torch.Tensor:
    return tensor * STD + MEAN


def test_gray_becomes_a_square_three_channel_float32_tensor() -> None:
    image = np.random.default_rng(0).random((300, 200), dtype=np.float32)
    tensor = preprocess(image, InputSpec())
    assert tensor.shape == (3, 224, 224)
    assert tensor.dtype == torch.float32


def test_the_three_channels_are_the_same_gray_before_normalisation() -> None:
    image = np.random.default_rng(1).random((90, 120))  # float64 is accepted too
    gray = unnormalised(preprocess(image, InputSpec(size=64)))
    torch.testing.assert_close(gray[1], gray[0])
    torch.testing.assert_close(gray[2], gray[0])


def test_a_constant_image_normalises_to_imagenet_values() -> None:
    tensor = preprocess(np.full((50, 70), 0.5, dtype=np.float32), InputSpec(size=32))
    for channel in range(3):
        expected = (0.5 - IMAGENET_MEAN[channel]) / IMAGENET_STD[channel]
        torch.testing.assert_close(tensor[channel], torch.full((32, 32), expected), atol=1e-5, rtol=0)


def test_the_spec_mean_and_std_are_used() -> None:
    spec = InputSpec(size=16, mean=(0.0, 0.5, 1.0), std=(1.0, 0.5, 0.25))
    tensor = preprocess(np.full((20, 20), 1.0, dtype=np.float32), spec)
    torch.testing.assert_close(tensor[:, 0, 0], torch.tensor([1.0, 1.0, 0.0]), atol=1e-5, rtol=0)


def test_a_wide_image_is_stretched_not_letterboxed() -> None:
    """As the papers resized: a letterbox would add rows of padding above and below."""
    gray = unnormalised(preprocess(np.ones((100, 300), dtype=np.float32), InputSpec(size=48)))
    torch.testing.assert_close(gray, torch.ones(3, 48, 48), atol=1e-5, rtol=0)


def test_downsizing_is_antialiased() -> None:
    """A one-pixel checkerboard shrunk ~16-fold is uniform grey; plain bilinear would alias it
    (off by up to 0.47 at this size, which is not a multiple of the output size)."""
    checkerboard = (np.indices((509, 509)).sum(axis=0) % 2).astype(np.float32)
    gray = unnormalised(preprocess(checkerboard, InputSpec(size=32)))
    assert (gray - 0.5).abs().max() < 0.05


def test_the_orientation_is_kept() -> None:
    image = np.zeros((64, 64), dtype=np.float32)
    image[:32, :] = 1.0  # top half white
    gray = unnormalised(preprocess(image, InputSpec(size=16)))[0]
    assert gray[0].min() > 0.99 and gray[-1].max() < 0.01


def test_the_input_is_not_modified() -> None:
    image = np.random.default_rng(2).random((40, 40), dtype=np.float32)
    before = image.copy()
    preprocess(image, InputSpec(size=16))
    np.testing.assert_array_equal(image, before)


def test_a_batch_stacks_images_of_any_shape() -> None:
    rng = np.random.default_rng(3)
    images = [rng.random((40, 60), dtype=np.float32), rng.random((300, 100), dtype=np.float32)]
    batch = preprocess_batch(images, InputSpec(size=32))
    assert batch.shape == (2, 3, 32, 32) and batch.dtype == torch.float32
    torch.testing.assert_close(batch[1], preprocess(images[1], InputSpec(size=32)))
    assert preprocess_batch([], InputSpec(size=32)).shape == (0, 3, 32, 32)


@pytest.mark.parametrize("shape", [(10, 10, 3), (10,), (0, 10)])
def test_anything_but_a_non_empty_gray_image_is_refused(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="grayscale"):
        preprocess(np.zeros(shape, dtype=np.float32), InputSpec())


@pytest.mark.parametrize(
    ("arguments", "reason"),
    [
        ({"size": 15}, "between 16 and 2048"),
        ({"size": 4096}, "between 16 and 2048"),
        ({"std": (0.2, 0.0, 0.2)}, "positive"),
        ({"std": (0.2, -0.1, 0.2)}, "positive"),
        ({"mean": (0.5, float("nan"), 0.5)}, "finite"),
        ({"mean": (0.5, 0.5)}, "3 each"),
    ],
)
def test_an_invalid_spec_cannot_be_made(arguments: dict[str, object], reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        InputSpec(**arguments)  # type: ignore[arg-type]


def test_the_default_spec_is_imagenet_at_224() -> None:
    assert InputSpec() == InputSpec(size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD)
