"""A small convolutional backbone of the plugin's own: two 3x3 convolutions with batch norm,
one max pooling, and the flattened map as its features.

A model is a `raymeta.models.Backbone`: `features(x)` gives (B, feature_dim) and
`self.classifier` is the linear layer on top (the meta methods and FaMUS rely on that split).
Its options are the keyword-only parameters of `__init__`: `model: {name: smallcnn, options:
{width: 16}}`, and a typo in one is refused before any data is read or Ray starts.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from raymeta.models.base import Backbone, require


class SmallCNN(Backbone):
    example = (1, 8, {"width": 4})  # a small instance for the checks every model passes

    def __init__(self, num_classes: int, in_channels: int, image_size: int, *, width: int = 16) -> None:
        super().__init__()
        require(isinstance(width, int) and width > 0,  # a ConfigError: the user's to fix
                f"smallcnn option 'width' must be a positive integer, got {width!r}")
        require(image_size % 2 == 0, f"smallcnn pools once by 2: image_size must be even, got {image_size}")
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.last_stage = "conv.3"  # FaMUS's default window: the second convolution and above
        self.feature_dim = width * (image_size // 2) ** 2
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def features(self, x: Tensor) -> Tensor:
        return torch.flatten(self.conv(x), 1)
