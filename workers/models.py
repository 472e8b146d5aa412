"""The model registry: every architecture Precedent can train, run, explain and search with.

Each architecture is a :class:`PrecedentModel`: ``embed`` gives the penultimate representation
(the vector the similar-case index stores), ``classify`` turns an embedding into logits, and
``forward`` is their composition and returns logits only, so Grad-CAM libraries can drive the
model directly. ``gradcam_layer`` names the feature map Grad-CAM explains, and ``backbone`` the
part a torchvision ImageNet checkpoint fits (:func:`load_backbone_weights`); nothing is ever
downloaded.

Every architecture accepts any square or rectangular input of at least 32 pixels a side: the
adaptive pools before the heads make the head sizes independent of the input size.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torchvision  # type: ignore[import-untyped]  # no type information shipped
from torch import Tensor, nn

__all__ = [
    "ARCHITECTURES",
    "DEFAULT_ARCHITECTURE",
    "PrecedentModel",
    "build_model",
    "describe_load_failure",
    "load_backbone_weights",
    "state_dict_mismatch",
]

DEFAULT_ARCHITECTURE = "densenet121"


class PrecedentModel(nn.Module, ABC):
    """An image classifier whose penultimate layer is the similar-case embedding.

    Subclasses build their layers in ``__init__`` and implement :meth:`embed` and
    :attr:`gradcam_layer`; the classification head is always ``self.head`` so that
    ``forward(x) == classify(embed(x))`` holds by construction.
    """

    architecture: str
    embedding_dim: int
    num_classes: int
    head: nn.Module
    #: State-dict key prefixes of the torchvision checkpoint's ImageNet classifier, which
    #: :func:`load_backbone_weights` skips (our head has a different number of classes).
    checkpoint_head_prefixes: tuple[str, ...] = ()

    def __init__(self, embedding_dim: int, num_classes: int) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        self.embedding_dim = embedding_dim
        self.num_classes = num_classes

    @abstractmethod
    def embed(self, x: Tensor) -> Tensor:
        """Map images ``(N, 3, H, W)`` to embeddings ``(N, embedding_dim)``."""

    def classify(self, embedding: Tensor) -> Tensor:
        """Map embeddings ``(N, embedding_dim)`` to logits ``(N, num_classes)``."""
        logits: Tensor = self.head(embedding)
        return logits

    def forward(self, x: Tensor) -> Tensor:
        """Logits only, so that Grad-CAM and loss functions can use the model as is."""
        return self.classify(self.embed(x))

    @property
    @abstractmethod
    def gradcam_layer(self) -> nn.Module:
        """The module whose output feature map Grad-CAM weighs by its gradients."""

    @property
    def backbone(self) -> nn.Module | None:
        """The sub-module a torchvision ImageNet checkpoint loads into; None if from scratch."""
        return None


def _last(module: nn.Module, kind: type[nn.Module]) -> nn.Module:
    """The last sub-module of ``kind`` in ``module``'s registration order."""
    found = [m for m in module.modules() if isinstance(m, kind)]
    if not found:
        raise LookupError(f"no {kind.__name__} in {type(module).__name__}")
    return found[-1]


def _pooled(features: Tensor) -> Tensor:
    """Global average pool ``(N, C, H, W)`` to ``(N, C)``."""
    return torch.flatten(nn.functional.adaptive_avg_pool2d(features, 1), 1)


def _rows_as_sequence(features: Tensor) -> Tensor:
    """Read a feature map top to bottom: ``(N, C, H, W)`` to ``(N, H, C * W)``.

    Each step of the sequence is one row of the map with all its channels, the way the
    CNN-LSTM hybrids of the breast-imaging literature feed spatial context to the LSTM.
    """
    n, c, h, w = features.shape
    return features.permute(0, 2, 1, 3).reshape(n, h, c * w)


class _TorchvisionBackbone(PrecedentModel):
    """An architecture built around a torchvision network held as ``net``: the part an
    ImageNet checkpoint of torchvision loads into."""

    net: Any  # torchvision ships no types

    @property
    def backbone(self) -> nn.Module:
        backbone: nn.Module = self.net
        return backbone


class DenseNet121(_TorchvisionBackbone):
    """torchvision DenseNet-121 features, ReLU, global average pool: a 1024-d embedding.

    The ReLU that torchvision applies functionally (and in place) is a module here so that
    Grad-CAM can target the rectified final feature map, the tensor the pool and the head
    actually see. Measured against the other candidates on a DenseNet trained to find a blob
    beside an equally bright distractor (200 images, 128 and 224 pixels), ``features.denseblock4``,
    ``features[-1]`` (norm5) and this ReLU gave maps correlated at 0.99 and the same hit rates;
    the ReLU is chosen for being the exact input of the pooling, and because hooking norm5 is
    only safe while nothing after it works in place.
    """

    architecture = "densenet121"
    checkpoint_head_prefixes = ("classifier.",)

    def __init__(self, num_classes: int) -> None:
        super().__init__(1024, num_classes)
        self.net = torchvision.models.densenet121(weights=None)
        self.net.classifier = nn.Identity()
        self.relu = nn.ReLU(inplace=False)
        self.head = nn.Linear(self.embedding_dim, num_classes)

    def embed(self, x: Tensor) -> Tensor:
        return _pooled(self.relu(self.net.features(x)))

    @property
    def gradcam_layer(self) -> nn.Module:
        return self.relu


class MobileNetV2(_TorchvisionBackbone):
    """torchvision MobileNetV2 features and global average pool: a 1280-d embedding."""

    architecture = "mobilenet_v2"
    checkpoint_head_prefixes = ("classifier.",)

    def __init__(self, num_classes: int) -> None:
        super().__init__(1280, num_classes)
        self.net = torchvision.models.mobilenet_v2(weights=None)
        self.net.classifier = nn.Identity()
        self.head = nn.Linear(self.embedding_dim, num_classes)

    def embed(self, x: Tensor) -> Tensor:
        return _pooled(self.net.features(x))

    @property
    def gradcam_layer(self) -> nn.Module:
        layer: nn.Module = self.net.features[-1]
        return layer


class EfficientNetB0(_TorchvisionBackbone):
    """torchvision EfficientNet-B0 features and average pool: a 1280-d embedding."""

    architecture = "efficientnet_b0"
    checkpoint_head_prefixes = ("classifier.",)

    def __init__(self, num_classes: int) -> None:
        super().__init__(1280, num_classes)
        self.net = torchvision.models.efficientnet_b0(weights=None)
        self.net.classifier = nn.Identity()
        self.head = nn.Linear(self.embedding_dim, num_classes)

    def embed(self, x: Tensor) -> Tensor:
        return torch.flatten(self.net.avgpool(self.net.features(x)), 1)

    @property
    def gradcam_layer(self) -> nn.Module:
        layer: nn.Module = self.net.features[-1]
        return layer


class ResNet50(_TorchvisionBackbone):
    """torchvision ResNet-50 up to and including its average pool: a 2048-d embedding."""

    architecture = "resnet50"
    checkpoint_head_prefixes = ("fc.",)

    def __init__(self, num_classes: int) -> None:
        super().__init__(2048, num_classes)
        self.net = torchvision.models.resnet50(weights=None)
        self.net.fc = nn.Identity()
        self.head = nn.Linear(self.embedding_dim, num_classes)

    def embed(self, x: Tensor) -> Tensor:
        embedding: Tensor = self.net(x)  # fc is the identity: avgpool, flatten
        return embedding

    @property
    def gradcam_layer(self) -> nn.Module:
        layer: nn.Module = self.net.layer4[-1]
        return layer


class _VGG16Features(nn.Module):
    """torchvision's VGG16 without its classifier: same ``features`` keys, same initialisation.

    ``torchvision.models.vgg16(weights=None)`` would first build and initialise the
    120-million-parameter ImageNet classifier only for us to drop it (2.3 s and 500 MB here);
    this builds the identical ``features`` from torchvision's own layer list instead.
    """

    def __init__(self) -> None:
        super().__init__()
        self.features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        for module in self.features.modules():
            if isinstance(module, nn.Conv2d):  # as torchvision's VGG.__init__ does
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)


class VGG16LSTM(_TorchvisionBackbone):
    """VGG16 conv features, pooled to 7x7, read row by row by a bidirectional LSTM.

    The hybrid of the Scientific Reports breast-ultrasound paper: each of the 7 rows
    (512 channels x 7 columns) is one step; the embedding is the concatenation of the final
    forward and backward hidden states (2 x 256). VGG16's ImageNet classifier is not built;
    only ``features`` loads from a checkpoint.
    """

    architecture = "vgg16_lstm"
    checkpoint_head_prefixes = ("classifier.",)
    hidden_size = 256

    def __init__(self, num_classes: int) -> None:
        super().__init__(2 * self.hidden_size, num_classes)
        self.net = _VGG16Features()
        self.lstm = nn.LSTM(512 * 7, self.hidden_size, batch_first=True, bidirectional=True)
        self.head = nn.Sequential(nn.Dropout(0.5), nn.Linear(self.embedding_dim, num_classes))

    def embed(self, x: Tensor) -> Tensor:
        rows = _rows_as_sequence(self.net.avgpool(self.net.features(x)))
        _, (hidden, _) = self.lstm(rows)
        return torch.cat([hidden[0], hidden[1]], dim=1)

    @property
    def gradcam_layer(self) -> nn.Module:
        return _last(self.net.features, nn.ReLU)


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """3x3 convolution (same padding), ReLU, 2x2 max-pool: halves the spatial size."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
        nn.ReLU(inplace=False),
        nn.MaxPool2d(2),
    )


def _conv_stack(widths: tuple[int, ...]) -> nn.Sequential:
    """Conv blocks from RGB through ``widths`` filters."""
    channels = (3, *widths)
    return nn.Sequential(*(_conv_block(a, b) for a, b in itertools.pairwise(channels)))


class CNN4(PrecedentModel):
    """Four conv blocks (32, 64, 128, 256 filters), a 4x4 pool and a 256-d dense embedding.

    Small enough to train from scratch on a CPU; the baseline of the ultrasound literature.
    """

    architecture = "cnn4"

    def __init__(self, num_classes: int) -> None:
        super().__init__(256, num_classes)
        self.features = _conv_stack((32, 64, 128, 256))
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.dense = nn.Sequential(
            nn.Flatten(), nn.Linear(256 * 4 * 4, 256), nn.ReLU(inplace=False), nn.Dropout(0.5)
        )
        self.head = nn.Linear(self.embedding_dim, num_classes)

    def embed(self, x: Tensor) -> Tensor:
        embedding: Tensor = self.dense(self.pool(self.features(x)))
        return embedding

    @property
    def gradcam_layer(self) -> nn.Module:
        return _last(self.features, nn.ReLU)


class CNNLSTM(PrecedentModel):
    """Three conv blocks (32, 64, 128), pooled to 8x8, rows read by an LSTM: 128-d embedding.

    After Britto et al.: the LSTM's final hidden state summarises the image top to bottom.
    """

    architecture = "cnn_lstm"
    hidden_size = 128

    def __init__(self, num_classes: int) -> None:
        super().__init__(self.hidden_size, num_classes)
        self.features = _conv_stack((32, 64, 128))
        self.pool = nn.AdaptiveAvgPool2d(8)
        self.lstm = nn.LSTM(128 * 8, self.hidden_size, batch_first=True)
        self.head = nn.Linear(self.embedding_dim, num_classes)

    def embed(self, x: Tensor) -> Tensor:
        _, (hidden, _) = self.lstm(_rows_as_sequence(self.pool(self.features(x))))
        embedding: Tensor = hidden[-1]
        return embedding

    @property
    def gradcam_layer(self) -> nn.Module:
        return _last(self.features, nn.ReLU)


_BUILDERS: dict[str, Callable[[int], PrecedentModel]] = {
    "densenet121": DenseNet121,
    "vgg16_lstm": VGG16LSTM,
    "mobilenet_v2": MobileNetV2,
    "resnet50": ResNet50,
    "efficientnet_b0": EfficientNetB0,
    "cnn4": CNN4,
    "cnn_lstm": CNNLSTM,
}

#: Every architecture name :func:`build_model` accepts, the default first.
ARCHITECTURES: tuple[str, ...] = tuple(_BUILDERS)


def build_model(architecture: str, num_classes: int) -> PrecedentModel:
    """A freshly initialised model (random weights, training mode) of a named architecture.

    Raises ValueError naming the known architectures when ``architecture`` is not one of them.
    """
    try:
        builder = _BUILDERS[architecture]
    except KeyError:
        known = ", ".join(ARCHITECTURES)
        raise ValueError(f"unknown architecture {architecture!r} (known: {known})") from None
    return builder(num_classes)


# Old torchvision DenseNet checkpoints (all of the published ones) spell ``norm1`` as
# ``norm.1``; torchvision renames them the same way when it loads its own weights.
_LEGACY_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


def _modern_key(key: str) -> str:
    match = _LEGACY_DENSENET_KEY.match(key)
    return match.group(1) + match.group(2) if match else key


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read_checkpoint(path: Path) -> dict[str, Tensor]:
    """The state dict in a torchvision checkpoint file, read without unpickling any code."""
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as error:  # a hostile or broken file can fail in any of torch's layers
        raise ValueError(f"checkpoint {path}: {describe_load_failure(error)}") from error
    if not isinstance(loaded, Mapping) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in loaded.items()
    ):
        raise ValueError(f"checkpoint {path}: not a state dict (a mapping of names to tensors)")
    return {_modern_key(k): v for k, v in loaded.items()}


# torch.load(weights_only=True) names the first callable a pickle asks for, e.g.
# "Trying to load unsupported GLOBAL posix.system ..." or "Unsupported global: GLOBAL x.y".
_GLOBAL_IN_PICKLE = re.compile(r"GLOBAL\s+([\w.]+)")


def describe_load_failure(error: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` failed on a file, in one line.

    torch words a pickle that asks to run code and a file that is merely not a torch file
    alike ("Weights only load failed ..."), over a dozen lines; only the first names a GLOBAL.
    """
    wanted = _GLOBAL_IN_PICKLE.search(str(error))
    if wanted:
        return (
            f"refused: it asks to load Python code ({wanted.group(1)}); it was read with "
            "weights_only=True, so nothing in it ran"
        )
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    detail = next((line for line in lines if line.startswith("Unsupported")), lines[0] if lines else "")
    return f"not a torch file, or a truncated or corrupt one ({type(error).__name__}: {detail})"


def _few(names: list[str], limit: int = 5) -> str:
    """A short, readable sample of key names for an error message."""
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def state_dict_mismatch(expected: Mapping[str, Tensor], given: Mapping[str, Tensor]) -> str | None:
    """Why ``given`` would not load strictly in place of ``expected``, or None if it would.

    Missing ``num_batches_tracked`` counters are forgiven: BatchNorm fills them in when an old
    checkpoint lacks them. Shapes must match exactly.
    """
    missing = [k for k in expected if k not in given and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in given if k not in expected]
    reshaped = [
        f"{k} {tuple(given[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in given and given[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys ({_few(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys ({_few(unexpected)})")
    if reshaped:
        problems.append(f"{len(reshaped)} shape mismatches ({_few(reshaped, 3)})")
    return "; ".join(problems) or None


def load_backbone_weights(model: PrecedentModel, path: Path, sha256_prefix: str | None = None) -> None:
    """Load a torchvision ImageNet checkpoint file (e.g. ``mobilenet_v2-b0353104.pth``).

    The checkpoint's own classifier is skipped; every other key must fit the model's
    backbone exactly, or ValueError says how many keys differ and names a few, and the model
    is left untouched. With ``sha256_prefix`` (torchvision publishes one in each file name)
    the file's hash is checked first, so a swapped or corrupted file is refused before it is
    parsed. The file is read with ``weights_only=True``: it cannot run code.
    """
    backbone = model.backbone
    if backbone is None:
        raise ValueError(f"{model.architecture} is trained from scratch and has no backbone to load")
    if sha256_prefix is not None:
        actual = _file_sha256(path)
        if not actual.startswith(sha256_prefix.lower()):
            raise ValueError(
                f"checkpoint {path}: sha256 {actual[:16]}... does not start with {sha256_prefix!r}"
            )
    checkpoint = _read_checkpoint(path)
    weights = {k: v for k, v in checkpoint.items() if not k.startswith(model.checkpoint_head_prefixes)}
    mismatch = state_dict_mismatch(backbone.state_dict(), weights)
    if mismatch:
        raise ValueError(f"checkpoint {path} does not fit {model.architecture}'s backbone: {mismatch}")
    backbone.load_state_dict(weights, strict=True)
