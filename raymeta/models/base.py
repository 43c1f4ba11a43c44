"""The base class every backbone subclasses: penultimate features plus one linear classifier."""

from __future__ import annotations

from torch import Tensor, nn

from raymeta.errors import ConfigError


class Backbone(nn.Module):
    """A classifier split as ``forward(x) == classifier(features(x))``.

    Subclasses set ``feature_dim``, build ``self.classifier = nn.Linear(feature_dim, num_classes)``
    and implement ``features(x) -> (B, feature_dim)``. Inputs are normalised float tensors (B, C, H, W).
    """

    name: str
    """what configs call it (`model: {name: ...}`); a built-in model's class body says it"""
    feature_dim: int
    classifier: nn.Linear
    example: tuple[int, int, dict] = (3, 32, {})
    """(in_channels, image_size, options) of a small instance that builds and runs fast: the
    checks every model passes (tests/test_models.py) build it so"""
    last_stage: str | None = None
    """the module where the last stage of the network begins (preact_resnet18: layer4,
    `blocks.6`): FaMUS's default window is it and everything above it"""

    def features(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


def require(condition: bool, message: str) -> None:
    """Raise ConfigError(message) unless condition holds (for option and shape checks)."""
    if not condition:
        raise ConfigError(message)


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
