"""The model registry: every architecture's shapes, its embedding, and backbone checkpoints."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision  # type: ignore[import-untyped]
from torch import nn

from workers.models import ARCHITECTURES, PrecedentModel, build_model, load_backbone_weights

EMBEDDING_DIMS = {
    "densenet121": 1024,
    "vgg16_lstm": 512,
    "mobilenet_v2": 1280,
    "resnet50": 2048,
    "efficientnet_b0": 1280,
    "cnn4": 256,
    "cnn_lstm": 128,
}
FROM_SCRATCH = {"cnn4", "cnn_lstm"}
NUM_CLASSES = 3


@pytest.fixture(scope="module")
def models() -> dict[str, PrecedentModel]:
    """Each architecture built once for the module: the big ones take a while."""
    torch.manual_seed(0)
    return {name: build_model(name, NUM_CLASSES).eval() for name in ARCHITECTURES}


@pytest.fixture
def images() -> torch.Tensor:
    return torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def test_the_registry_lists_every_architecture_default_first() -> None:
    assert tuple(EMBEDDING_DIMS) == ARCHITECTURES
    assert ARCHITECTURES[0] == "densenet121"


def test_an_unknown_architecture_is_refused_naming_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown architecture 'alexnet'") as raised:
        build_model("alexnet", 2)
    assert all(name in str(raised.value) for name in ARCHITECTURES)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_forward_gives_logits_and_embed_the_declared_dimension(
    models: dict[str, PrecedentModel], images: torch.Tensor, architecture: str
) -> None:
    model = models[architecture]
    with torch.no_grad():
        logits = model(images)
        embedding = model.embed(images)
    assert logits.shape == (2, NUM_CLASSES)
    assert model.embedding_dim == EMBEDDING_DIMS[architecture]
    assert embedding.shape == (2, EMBEDDING_DIMS[architecture])
    assert torch.isfinite(embedding).all()


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_forward_is_classify_of_embed_in_eval_mode(
    models: dict[str, PrecedentModel], images: torch.Tensor, architecture: str
) -> None:
    model = models[architecture]
    with torch.no_grad():
        assert torch.allclose(model(images), model.classify(model.embed(images)), atol=1e-6)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_the_smallest_and_non_square_inputs_work(
    models: dict[str, PrecedentModel], architecture: str
) -> None:
    with torch.no_grad():
        assert models[architecture](torch.rand(1, 3, 32, 48)).shape == (1, NUM_CLASSES)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_the_gradcam_layer_is_part_of_the_model(models: dict[str, PrecedentModel], architecture: str) -> None:
    model = models[architecture]
    assert any(module is model.gradcam_layer for module in model.modules())


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_pretrained_architectures_have_a_backbone_inside_the_model(
    models: dict[str, PrecedentModel], architecture: str
) -> None:
    model = models[architecture]
    if architecture in FROM_SCRATCH:
        assert model.backbone is None
    else:
        assert model.backbone is not None
        assert any(module is model.backbone for module in model.modules())
        assert not any(module is model.head for module in model.backbone.modules())


def test_vgg16_lstm_backbone_has_exactly_torchvision_vgg16s_feature_keys() -> None:
    with torch.device("meta"):
        reference = torchvision.models.vgg16(weights=None).state_dict()
        backbone = build_model("vgg16_lstm", 2).backbone
    assert backbone is not None
    expected = {k: v.shape for k, v in reference.items() if not k.startswith("classifier.")}
    assert {k: v.shape for k, v in backbone.state_dict().items()} == expected


def save_checkpoint(model: nn.Module, path: Path) -> Path:
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def mobilenet_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A file shaped like torchvision's mobilenet_v2-b0353104.pth, with recognisable weights."""
    torch.manual_seed(7)
    reference = torchvision.models.mobilenet_v2(weights=None)
    return save_checkpoint(reference, tmp_path_factory.mktemp("checkpoints") / "mobilenet_v2.pth")


def test_a_torchvision_checkpoint_loads_into_the_backbone(mobilenet_checkpoint: Path) -> None:
    model = build_model("mobilenet_v2", 3)
    head_before = model.get_parameter("head.weight").clone()
    load_backbone_weights(model, mobilenet_checkpoint)
    checkpoint = torch.load(mobilenet_checkpoint, weights_only=True)
    assert model.backbone is not None
    loaded = model.backbone.state_dict()
    backbone_keys = [k for k in checkpoint if not k.startswith("classifier.")]
    assert set(loaded) == set(backbone_keys)
    assert all(torch.equal(loaded[k], checkpoint[k]) for k in backbone_keys)
    assert torch.equal(model.get_parameter("head.weight"), head_before)


def test_the_checkpoint_hash_is_checked_against_the_given_prefix(mobilenet_checkpoint: Path) -> None:
    digest = hashlib.sha256(mobilenet_checkpoint.read_bytes()).hexdigest()
    model = build_model("mobilenet_v2", 3)
    load_backbone_weights(model, mobilenet_checkpoint, sha256_prefix=digest[:8].upper())
    wrong = "0" * 8 if not digest.startswith("0" * 8) else "f" * 8
    with pytest.raises(ValueError, match=f"sha256 {digest[:16]}.*does not start with '{wrong}'"):
        load_backbone_weights(model, mobilenet_checkpoint, sha256_prefix=wrong)


def test_a_checkpoint_of_another_architecture_is_refused_and_nothing_loaded(tmp_path: Path) -> None:
    resnet = save_checkpoint(torchvision.models.resnet50(weights=None), tmp_path / "resnet50.pth")
    model = build_model("mobilenet_v2", 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="does not fit mobilenet_v2's backbone") as raised:
        load_backbone_weights(model, resnet)
    message = str(raised.value)
    assert re.search(r"\d+ missing keys \(features\.0\.0\.weight", message)
    assert re.search(r"\d+ unexpected keys \(conv1\.weight", message)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_same_named_key_of_the_wrong_shape_is_named(mobilenet_checkpoint: Path, tmp_path: Path) -> None:
    weights = torch.load(mobilenet_checkpoint, weights_only=True)
    weights["features.0.0.weight"] = torch.zeros(1, 1, 1, 1)
    path = tmp_path / "reshaped.pth"
    torch.save(weights, path)
    with pytest.raises(ValueError, match=r"1 shape mismatches \(features\.0\.0\.weight \(1, 1, 1, 1\)"):
        load_backbone_weights(build_model("mobilenet_v2", 3), path)


def test_old_checkpoints_without_batchnorm_counters_still_load(
    mobilenet_checkpoint: Path, tmp_path: Path
) -> None:
    weights = torch.load(mobilenet_checkpoint, weights_only=True)
    old = {k: v for k, v in weights.items() if not k.endswith("num_batches_tracked")}
    torch.save(old, tmp_path / "old.pth")
    load_backbone_weights(build_model("mobilenet_v2", 3), tmp_path / "old.pth")


def test_densenet_checkpoints_with_legacy_key_names_load(tmp_path: Path) -> None:
    """torchvision's published DenseNet files spell ``norm1`` as ``norm.1`` and predate
    BatchNorm's counters; torchvision renames the keys when it loads them, and so must we."""
    reference = torchvision.models.densenet121(weights=None).state_dict()
    legacy = {
        re.sub(r"(denselayer\d+\.(?:norm|conv))([12])\.", r"\1.\2.", k): v
        for k, v in reference.items()
        if not k.endswith("num_batches_tracked")
    }
    assert "features.denseblock1.denselayer1.norm.1.weight" in legacy
    torch.save(legacy, tmp_path / "densenet121-legacy.pth")
    model = build_model("densenet121", 3)
    load_backbone_weights(model, tmp_path / "densenet121-legacy.pth")
    assert model.backbone is not None
    loaded = model.backbone.state_dict()
    assert torch.equal(
        loaded["features.denseblock1.denselayer1.norm1.weight"],
        legacy["features.denseblock1.denselayer1.norm.1.weight"],
    )


def test_a_from_scratch_model_has_no_backbone_to_load(mobilenet_checkpoint: Path) -> None:
    with pytest.raises(ValueError, match="cnn4 is trained from scratch"):
        load_backbone_weights(build_model("cnn4", 3), mobilenet_checkpoint)


@pytest.mark.parametrize("content", [b"not a checkpoint at all", b""])
def test_a_file_that_is_not_a_checkpoint_is_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "junk.pth"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=f"checkpoint {path}: not a torch file"):
        load_backbone_weights(build_model("mobilenet_v2", 3), path)


def test_a_checkpoint_that_would_run_code_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "hostile.pth"
    torch.save({"features.0.0.weight": Payload(marker)}, path)
    with pytest.raises(ValueError, match=r"refused: it asks to load Python code \((posix|os)\.system\)"):
        load_backbone_weights(build_model("mobilenet_v2", 3), path)
    assert not marker.exists()


class Payload:
    """Unpickling this runs a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_that_is_not_a_state_dict_is_refused(tmp_path: Path) -> None:
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="not a state dict"):
        load_backbone_weights(build_model("mobilenet_v2", 3), tmp_path / "list.pth")
