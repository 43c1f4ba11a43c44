"""Small backbones: an MLP, LeNet-5 and the 8-layer CNN of MetaLabelNet."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from raymeta.models.base import Backbone, is_int, require


class MLP(Backbone):
    """Multi-layer perceptron on the flattened image, ReLU between layers (a plain baseline);
    `batchnorm: true` puts a BatchNorm1d before each ReLU."""

    name = "mlp"
    example = (3, 8, {"hidden": [16, 12]})

    def __init__(
        self, num_classes: int, in_channels: int, image_size: int, *, hidden: Sequence[int] = (256, 256),
        batchnorm: bool = False,
    ) -> None:
        super().__init__()
        hidden = list(hidden)
        require(
            len(hidden) > 0 and all(is_int(h) and h > 0 for h in hidden),
            f"mlp option 'hidden' must be a non-empty list of positive integers, got {hidden!r}",
        )
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_channels * image_size * image_size
        for h in hidden:
            layers += [nn.Linear(width, h), *([nn.BatchNorm1d(h)] if batchnorm else []), nn.ReLU()]
            width = h
        self.body = nn.Sequential(*layers)
        self.last_stage = f"body.{len(layers) - (3 if batchnorm else 2)}"  # the last hidden layer
        self.feature_dim = width
        self.classifier = nn.Linear(width, num_classes)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)


class LeNet(Backbone):
    """LeNet-5 (LeCun et al. 1998) with padded 5x5 convolutions, max pooling and ReLU."""

    name = "lenet"
    example = (1, 28, {})

    def __init__(self, num_classes: int, in_channels: int, image_size: int) -> None:
        super().__init__()
        require(
            image_size >= 4,
            f"lenet pools twice by 2, so image_size must be at least 4 (e.g. 8, 28, 32), got {image_size}",
        )
        side = image_size // 4
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        )  # fmt: skip
        self.fc = nn.Sequential(
            nn.Linear(16 * side * side, 120), nn.ReLU(),
            nn.Linear(120, 84), nn.ReLU(),
        )  # fmt: skip
        self.last_stage = "fc"  # the fully connected layers above the convolutions
        self.feature_dim = 84
        self.classifier = nn.Linear(84, num_classes)

    def features(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.conv(x), 1))


def _conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]


class CNN8(Backbone):
    """The 8-layer CNN (6 conv + 2 fc) of MetaLabelNet (Algan & Ulusoy 2021)."""

    name = "cnn8"
    example = (3, 16, {})

    def __init__(self, num_classes: int, in_channels: int, image_size: int) -> None:
        super().__init__()
        require(
            image_size >= 8 and image_size % 8 == 0,
            f"cnn8 max-pools three times by 2, so image_size must be a positive multiple of 8 "
            f"(e.g. 8, 16, 32), got {image_size}",
        )
        self.conv = nn.Sequential(
            *_conv_bn_relu(in_channels, 64), *_conv_bn_relu(64, 64), nn.MaxPool2d(2),
            *_conv_bn_relu(64, 128), *_conv_bn_relu(128, 128), nn.MaxPool2d(2),
            *_conv_bn_relu(128, 196), *_conv_bn_relu(196, 196), nn.MaxPool2d(2),
        )  # fmt: skip
        side = image_size // 8
        self.fc = nn.Sequential(nn.Linear(196 * side * side, 256), nn.BatchNorm1d(256), nn.ReLU())
        self.last_stage = "conv.14"  # the third pair of convolutions (196 channels)
        self.feature_dim = 256
        self.classifier = nn.Linear(256, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def features(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.conv(x), 1))
