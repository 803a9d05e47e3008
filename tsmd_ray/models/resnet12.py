"""ResNet-12 (Oreshkin et al. 2018; Lee et al. 2019), the usual few-shot teacher backbone."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .layers import TaskBatchNorm2d


class ResidualBlock(nn.Module):
    """Three 3x3 conv-BN layers, a 1x1 projection shortcut, leaky ReLU, 2x2 max-pool."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.bn1 = TaskBatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = TaskBatchNorm2d(out_channels)
        self.conv3 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn3 = TaskBatchNorm2d(out_channels)
        self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False),
                                      TaskBatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.leaky_relu(self.bn1(self.conv1(x)), 0.1)
        out = F.leaky_relu(self.bn2(self.conv2(out)), 0.1)
        out = self.bn3(self.conv3(out))
        out = F.leaky_relu(out + self.shortcut(x), 0.1)
        return F.max_pool2d(out, 2, ceil_mode=True)


class ResNet12(nn.Module):
    """Four residual blocks (widths 64-128-256-512 by default), global average pool, linear head."""

    def __init__(self, ways: int, in_channels: int, image_size: int,
                 widths: Sequence[int] = (64, 128, 256, 512)) -> None:
        super().__init__()
        del image_size  # global pooling makes the head independent of the input size
        channels = [in_channels, *widths]
        self.features = nn.Sequential(*(ResidualBlock(a, b) for a, b in zip(channels, channels[1:])))
        self.embedding_dim = widths[-1]
        self.head = nn.Linear(self.embedding_dim, ways)

    def forward(self, x: torch.Tensor, with_embedding: bool = False):
        embedding = self.features(x).mean(dim=(2, 3))
        logits = self.head(embedding)
        return (logits, embedding) if with_embedding else logits
