"""Backbones by name: ``build_model("resnet32", num_classes=10, in_channels=3, image_size=32)``."""

from __future__ import annotations

import inspect

from raymeta.errors import ConfigError, did_you_mean
from raymeta.models.base import Backbone, is_int
from raymeta.models.imagenet import ResNet50
from raymeta.models.resnets import PreActResNet18, ResNet32, WideResNet
from raymeta.models.simple import CNN8, MLP, LeNet

_REGISTRY: dict[str, type[Backbone]] = {
    "mlp": MLP,
    "lenet": LeNet,
    "cnn8": CNN8,
    "preact_resnet18": PreActResNet18,
    "wrn": WideResNet,
    "resnet32": ResNet32,
    "resnet50": ResNet50,
}
MODEL_NAMES: tuple[str, ...] = tuple(_REGISTRY)

__all__ = ["MODEL_NAMES", "Backbone", "build_model", "model_options"]


def model_options(name: str) -> dict[str, object]:
    """The options a model accepts, with their defaults."""
    cls = _lookup(name)
    params = inspect.signature(cls.__init__).parameters.values()
    return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


def _lookup(name: str) -> type[Backbone]:
    if name not in _REGISTRY:
        raise ConfigError(
            f"unknown model {name!r}; choose one of: {', '.join(MODEL_NAMES)}{did_you_mean(str(name).lower(), MODEL_NAMES)}"
        )
    return _REGISTRY[name]


def build_model(name: str, num_classes: int, in_channels: int, image_size: int, **options: object) -> Backbone:
    """Build backbone ``name`` for (in_channels, image_size, image_size) inputs and num_classes outputs.

    Raises ConfigError for an unknown name or option, or a size the model cannot take.
    """
    cls = _lookup(name)
    allowed = model_options(name)
    for key in options:
        if key not in allowed:
            listed = ", ".join(allowed) if allowed else "none"
            raise ConfigError(
                f"model {name!r} has no option {key!r}; allowed options: {listed}{did_you_mean(key, list(allowed))}"
            )
    for label, value in (("num_classes", num_classes), ("in_channels", in_channels), ("image_size", image_size)):
        if not is_int(value) or value < 1:
            raise ConfigError(f"model {name!r}: {label} must be a positive integer, got {value!r}")
    model = cls(num_classes, in_channels, image_size, **options)
    model.build_args = (name, num_classes, in_channels, image_size, dict(options))  # for rebuild_model
    return model


def rebuild_model(model: Backbone) -> Backbone:
    """Another model of `model`'s architecture and options, on its device and dtype: its own
    initialisation drawn from the global RNG (pretrained weights loaded again), as
    build_model gives it (e.g. Co-teaching's second network)."""
    name, num_classes, in_channels, image_size, options = model.build_args
    param = next(model.parameters())
    return build_model(name, num_classes, in_channels, image_size, **options).to(param.device, param.dtype)
