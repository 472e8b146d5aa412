"""Grad-CAM heatmaps: where in the image the evidence for a class lies.

pytorch-grad-cam does the work. Its ``BaseCAM`` runs its own forward and backward pass and,
along the way, puts the model in eval mode, clears (sets to None) every parameter's ``.grad``
and accumulates new ones, and its context manager swallows IndexError. This module wraps it so
the caller's model comes back exactly as it went in (training flags, ``requires_grad``,
gradients), errors propagate, and the backward pass computes only the activation gradients
Grad-CAM needs rather than every weight gradient.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext

import numpy as np
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from workers.models import PrecedentModel

__all__ = ["gradcam_heatmaps"]


def gradcam_heatmaps(model: PrecedentModel, batch: torch.Tensor, target_classes: Sequence[int]) -> np.ndarray:
    """One Grad-CAM heatmap per image for the given class, in one forward and backward pass.

    ``batch`` is ``(N, 3, H, W)`` as the model takes it; ``target_classes[i]`` is the class
    explained for image ``i``. Returns ``(N, H, W)`` float32 in ``[0, 1]``, never NaN, each
    map scaled as pytorch-grad-cam does, ``(cam - min) / (max - min + 1e-7)``: 1 where the
    evidence is strongest, and a map with no positive evidence (constant) is all zeros. A map
    whose evidence is negligible in absolute terms (an untrained model's, ~1e-15) stays near 0
    instead of being stretched to 1.

    The model's state is left as it was found, and gradients are computed even inside
    ``torch.no_grad()`` or ``torch.inference_mode()``. While it runs, the model is in eval mode
    with frozen parameters: do not use the same model from another thread meanwhile.
    """
    _check_request(model, batch, target_classes)
    if batch.shape[0] == 0:
        return np.zeros((0, *batch.shape[2:]), dtype=np.float32)
    targets = [ClassifierOutputTarget(int(c)) for c in target_classes]
    device = next(model.parameters()).device
    with (
        torch.inference_mode(False),
        torch.enable_grad(),
        _model_preserved(model),
        _rnn_backward_allowed(model, device),
    ):
        inputs = batch.detach().to(device).clone().requires_grad_(True)
        cam = GradCAM(model=model, target_layers=[model.gradcam_layer])
        try:
            heatmaps = cam(input_tensor=inputs, targets=targets)
        finally:
            cam.activations_and_grads.release()
    return _clean(heatmaps)


def _check_request(model: PrecedentModel, batch: torch.Tensor, target_classes: Sequence[int]) -> None:
    """Refuse requests pytorch-grad-cam would mishandle or answer with a silent wrong result."""
    if batch.ndim != 4:
        raise ValueError(f"batch must be (N, C, H, W), got shape {tuple(batch.shape)}")
    if len(target_classes) != batch.shape[0]:
        raise ValueError(f"{len(target_classes)} target classes for {batch.shape[0]} images")
    for target in target_classes:
        if not 0 <= target < model.num_classes:
            raise ValueError(f"target class {target} out of range for {model.num_classes} classes")


@contextmanager
def _model_preserved(model: nn.Module) -> Iterator[None]:
    """Restore training flags, ``requires_grad`` and ``.grad`` of every module and parameter.

    Inside, parameters are frozen: the input requires grad instead, so the backward pass
    reaches the target layer's activations without computing (or disturbing) weight gradients.
    """
    training = [(m, m.training) for m in model.modules()]
    parameters = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    try:
        for parameter, _, _ in parameters:
            parameter.requires_grad_(False)
        yield
    finally:
        for module, was_training in training:
            module.training = was_training
        for parameter, required_grad, grad in parameters:
            parameter.requires_grad_(required_grad)
            parameter.grad = grad


def _rnn_backward_allowed(model: nn.Module, device: torch.device) -> AbstractContextManager[object]:
    """Disable cuDNN for models with an RNN on CUDA: cuDNN's RNN backward refuses eval mode."""
    has_rnn = any(isinstance(m, nn.RNNBase) for m in model.modules())
    if device.type == "cuda" and has_rnn:
        return torch.backends.cudnn.flags(enabled=False)
    return nullcontext()


def _clean(heatmaps: np.ndarray) -> np.ndarray:
    """float32 in [0, 1] with no NaN, whatever the numerics upstream did."""
    cleaned = np.nan_to_num(np.asarray(heatmaps, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    return np.clip(cleaned, 0.0, 1.0)
