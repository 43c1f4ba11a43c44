"""The 9-layer CNN of Co-teaching (Han et al., NeurIPS 2018; bhanML/Co-teaching, model.py),
its network on MNIST and CIFAR: three stages of 3x3 convolutions (128, 256, then 512-256-128
unpadded), each with batch norm and LeakyReLU 0.01, max pooling and 2-D dropout after the first
two, global average pooling, one linear classifier.

The official code calls `F.dropout2d(h, p)`, whose `training` defaults to True, so it drops
channels at test time too; here dropout is a module, off in evaluation as usual.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from raymeta.models.base import Backbone, require


def _conv(c_in: int, c_out: int, padding: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=padding), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.01)]


class CoteachingCNN(Backbone):
    """Co-teaching's 9-layer CNN (4.4 M parameters for 10 classes)."""

    name = "cnn9"
    example = (1, 28, {})

    def __init__(self, num_classes: int, in_channels: int, image_size: int, *,
                 dropout: float = 0.25) -> None:
        super().__init__()
        require(image_size >= 28, f"cnn9 pools twice by 2, then three unpadded 3x3 convolutions "
                                  f"take 6 pixels, so image_size must be at least 28, got {image_size}")
        require(0.0 <= dropout < 1.0, f"cnn9 option 'dropout' must be in [0, 1), got {dropout!r}")
        self.conv = nn.Sequential(
            *_conv(in_channels, 128, 1), *_conv(128, 128, 1), *_conv(128, 128, 1),
            nn.MaxPool2d(2), nn.Dropout2d(dropout),
            *_conv(128, 256, 1), *_conv(256, 256, 1), *_conv(256, 256, 1),
            nn.MaxPool2d(2), nn.Dropout2d(dropout),
            *_conv(256, 512, 0), *_conv(512, 256, 0), *_conv(256, 128, 0),
        )  # fmt: skip
        self.last_stage = "conv.22"  # the third stage: the unpadded 512-256-128 convolutions
        self.feature_dim = 128
        self.classifier = nn.Linear(128, num_classes)

    def features(self, x: Tensor) -> Tensor:
        return torch.flatten(nn.functional.adaptive_avg_pool2d(self.conv(x), 1), 1)
