"""Conv-4 (Finn et al. 2017): four 3x3 conv-BN-ReLU-maxpool blocks and a linear head."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .layers import TaskBatchNorm2d


def conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1),
        TaskBatchNorm2d(out_channels),
        nn.ReLU(),
        nn.MaxPool2d(2, ceil_mode=False),
    )


class Conv4(nn.Module):
    """The paper's student: widths 32-32-32-32 by default."""

    def __init__(self, ways: int, in_channels: int, image_size: int,
                 widths: Sequence[int] = (32, 32, 32, 32)) -> None:
        super().__init__()
        channels = [in_channels, *widths]
        self.features = nn.Sequential(*(conv_block(a, b) for a, b in zip(channels, channels[1:])))
        side = image_size
        for _ in widths:
            side //= 2
        if side < 1:
            raise ValueError(f"Conv4 with {len(widths)} blocks needs images of at least "
                             f"{2 ** len(widths)} px, got {image_size}")
        self.embedding_dim = widths[-1] * side * side
        self.head = nn.Linear(self.embedding_dim, ways)

    def forward(self, x: torch.Tensor, with_embedding: bool = False):
        embedding = self.features(x).flatten(1)
        logits = self.head(embedding)
        return (logits, embedding) if with_embedding else logits
