"""ImageNet-scale backbones from torchvision: ResNet-50."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from raymeta.errors import DataError
from raymeta.models.base import Backbone, require


def _load_state_dict(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise DataError(f"resnet50 weights file not found: {path} (give a local torchvision resnet50 state_dict)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise DataError(f"cannot read resnet50 weights file {path}: {exc}") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise DataError(f"resnet50 weights file {path} does not hold a state_dict of tensors")
    return state


class ResNet50(Backbone):
    """ResNet-50 (He et al. 2016, "Deep Residual Learning") from torchvision, with a new classifier."""

    name = "resnet50"
    example = (3, 32, {})

    def __init__(
        self, num_classes: int, in_channels: int, image_size: int, *, weights_path: str | None = None
    ) -> None:
        super().__init__()
        require(in_channels == 3, f"resnet50 takes RGB images (in_channels 3), got in_channels {in_channels}")
        require(image_size >= 32, f"resnet50 downsamples by 32, so image_size must be >= 32, got {image_size}")
        from torchvision.models import resnet50

        state = None
        if weights_path is not None:
            path = Path(weights_path).expanduser()
            state = {k: v for k, v in _load_state_dict(path).items() if not k.startswith("fc.")}
        net = resnet50(weights=None)
        if state is not None:
            missing, unexpected = net.load_state_dict(state, strict=False)
            missing = [k for k in missing if not k.startswith("fc.")]
            if missing or unexpected:
                raise DataError(
                    f"resnet50 weights file {path} does not match torchvision's resnet50: "
                    f"missing keys {missing[:5]}, unexpected keys {unexpected[:5]}"
                )
        for m in net.modules():  # in-place activations do not mix well with functional/meta gradients
            if isinstance(m, nn.ReLU):
                m.inplace = False
        # Same attribute names as torchvision (minus fc), so state_dict keys stay compatible.
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.avgpool = net.avgpool
        self.last_stage = "layer4"
        self.feature_dim = net.fc.in_features
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def features(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)
