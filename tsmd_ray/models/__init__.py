"""Backbones for teacher and student. Every model maps images to N-way logits and, with
``with_embedding=True``, also returns the penultimate embedding (for relational KD)."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from torch import nn

from .conv4 import Conv4
from .layers import TaskBatchNorm2d, replace_batchnorm, statistics_from_first, use_fused_batchnorm
from .resnet12 import ResNet12
from .torchvision_models import TorchvisionClassifier, load_state_dict

NATIVE_MODELS = {"conv4": Conv4, "resnet12": ResNet12}

__all__ = ["Conv4", "ResNet12", "TorchvisionClassifier", "TaskBatchNorm2d", "build_model",
           "load_state_dict", "replace_batchnorm", "statistics_from_first", "use_fused_batchnorm",
           "NATIVE_MODELS"]


def build_model(name: str, ways: int, in_channels: int, image_size: int,
                widths: Sequence[int] | None = None, weights: str | Path | None = None,
                adaptable: bool = True) -> nn.Module:
    """Build ``conv4``, ``resnet12`` or any torchvision classifier by name (e.g. ``resnet50``).

    ``weights`` is a local state-dict file for torchvision models (nothing is downloaded).
    """
    if name in NATIVE_MODELS:
        kwargs = {"widths": tuple(widths)} if widths else {}
        return NATIVE_MODELS[name](ways, in_channels, image_size, **kwargs)
    try:
        return TorchvisionClassifier(name, ways, in_channels, weights=weights, adaptable=adaptable)
    except ValueError as exc:
        if "Unknown model" in str(exc) or "unknown" in str(exc).lower():
            raise ValueError(f"unknown model {name!r}: use conv4, resnet12 or a torchvision "
                             "classification model name such as resnet18") from exc
        raise
