"""CIFAR-scale residual networks: PreAct ResNet-18, Wide ResNet and MW-Net's ResNet-32."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raymeta.models.base import Backbone, is_int, require


def _conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)


class PreActBlock(nn.Module):
    """Pre-activation basic block (also the Wide ResNet block): BN-ReLU-conv3x3-BN-ReLU-
    [dropout]-conv3x3, plus an identity or 1x1-conv shortcut on the pre-activated input."""

    def __init__(self, c_in: int, c_out: int, stride: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = _conv3x3(c_in, c_out, stride)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _conv3x3(c_out, c_out)
        self.shortcut = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        a = F.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(a)
        out = self.conv2(self.dropout(F.relu(self.bn2(self.conv1(a)))))
        return out + skip


class PreActResNet18(Backbone):
    """Pre-activation ResNet-18 (He et al. 2016, "Identity Mappings in Deep Residual Networks")."""

    name = "preact_resnet18"
    example = (3, 8, {})

    def __init__(self, num_classes: int, in_channels: int, image_size: int) -> None:
        super().__init__()
        require(image_size >= 8, f"preact_resnet18 needs image_size >= 8 (e.g. 32), got {image_size}")
        self.stem = _conv3x3(in_channels, 64)
        blocks: list[nn.Module] = []
        c_in = 64
        for c_out, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks += [PreActBlock(c_in, c_out, stride), PreActBlock(c_out, c_out, 1)]
            c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.last_stage = "blocks.6"  # layer4: the two 512-channel blocks
        self.bn = nn.BatchNorm2d(512)
        self.feature_dim = 512
        self.classifier = nn.Linear(512, num_classes)

    def features(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn(self.blocks(self.stem(x))))
        return torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)


class WideResNet(Backbone):
    """Wide ResNet WRN-depth-width (Zagoruyko & Komodakis 2016, "Wide Residual Networks")."""

    name = "wrn"
    example = (3, 8, {"depth": 10, "width": 1})

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        image_size: int,
        *,
        depth: int = 28,
        width: int = 10,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        require(
            is_int(depth) and depth >= 10 and (depth - 4) % 6 == 0,
            f"wrn option 'depth' must be 6*n+4 for n >= 1 (e.g. 10, 16, 28, 40), got {depth!r}",
        )
        require(is_int(width) and width >= 1, f"wrn option 'width' must be a positive integer, got {width!r}")
        require(
            isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0,
            f"wrn option 'dropout' must be in [0, 1), got {dropout!r}",
        )
        require(image_size >= 4, f"wrn needs image_size >= 4 (e.g. 32), got {image_size}")
        n = (depth - 4) // 6
        self.stem = _conv3x3(in_channels, 16)
        blocks: list[nn.Module] = []
        c_in = 16
        for c_out, stride in ((16 * width, 1), (32 * width, 2), (64 * width, 2)):
            for i in range(n):
                blocks.append(PreActBlock(c_in, c_out, stride if i == 0 else 1, float(dropout)))
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.last_stage = f"blocks.{2 * n}"  # the third group of blocks
        self.bn = nn.BatchNorm2d(c_in)
        self.feature_dim = c_in
        self.classifier = nn.Linear(c_in, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                k = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / k))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def features(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn(self.blocks(self.stem(x))))
        return torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)


class ShortcutA(nn.Module):
    """ResNet "option A" shortcut: subsample by 2 and zero-pad the new channels (no parameters)."""

    def __init__(self, pad: int) -> None:
        super().__init__()
        self.pad = pad

    def forward(self, x: Tensor) -> Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    """Post-activation basic block: conv-BN-ReLU-conv-BN plus shortcut, then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _conv3x3(c_in, c_out, stride)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = _conv3x3(c_out, c_out)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = ShortcutA(c_out // 4)

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + self.shortcut(x))


class ResNet32(Backbone):
    """CIFAR ResNet-32 (He et al. 2016) as used by MW-Net (Shu et al. 2019); depth = 6*blocks+2."""

    name = "resnet32"
    example = (3, 8, {"blocks": 1})

    def __init__(self, num_classes: int, in_channels: int, image_size: int, *, blocks: int = 5) -> None:
        super().__init__()
        require(is_int(blocks) and blocks >= 1, f"resnet32 option 'blocks' must be a positive integer, got {blocks!r}")
        require(image_size >= 4, f"resnet32 needs image_size >= 4 (e.g. 32), got {image_size}")
        self.stem = nn.Sequential(_conv3x3(in_channels, 16), nn.BatchNorm2d(16), nn.ReLU())
        layers: list[nn.Module] = []
        c_in = 16
        for c_out, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(blocks):
                layers.append(BasicBlock(c_in, c_out, stride if i == 0 else 1))
                c_in = c_out
        self.blocks = nn.Sequential(*layers)
        self.last_stage = f"blocks.{2 * blocks}"  # the 64-channel stage
        self.feature_dim = 64
        self.classifier = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def features(self, x: Tensor) -> Tensor:
        out = self.blocks(self.stem(x))
        return torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
