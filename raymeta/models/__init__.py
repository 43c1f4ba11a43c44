"""Backbones by name: ``build_model("resnet32", num_classes=10, in_channels=3, image_size=32)``.

A built-in model is a `Backbone` subclass in a module of this package whose class body says
``name = "..."``; its options are its ``__init__``'s keyword-only parameters. Adding one touches
its own file only. They are found by reading this package's source (`ast`), not by importing
it, so a config's model and options are checked without importing torch; the class is
imported when a model is built. A model from another package is named by an entry point of
the group ``raymeta.models`` or by its import path (`raymeta.plugins`).
"""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
from pathlib import Path
from typing import NamedTuple

from raymeta import plugins
from raymeta.errors import ConfigError

__all__ = ["MODEL_NAMES", "Backbone", "build_model", "check_model", "model_class", "model_options",
           "rebuild_model"]


class _BuiltIn(NamedTuple):
    module: str
    """e.g. raymeta.models.simple"""
    cls: str
    options: dict[str, object]
    """keyword-only parameters of __init__ -> default"""


@functools.cache
def _builtins() -> dict[str, _BuiltIn]:
    found: dict[str, _BuiltIn] = {}
    for path in sorted(Path(__file__).parent.glob("*.py")):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.ClassDef) and (name := _declared_name(node)):
                if name in found:
                    raise RuntimeError(f"two built-in models are named {name!r}: {found[name].cls} "
                                       f"and {node.name}")
                found[name] = _BuiltIn(f"{__name__}.{path.stem}", node.name, _keyword_options(node))
    return found


def _declared_name(node: ast.ClassDef) -> str | None:
    """The `name = "..."` of a class that subclasses Backbone by that name."""
    if not any(isinstance(base, ast.Name) and base.id == "Backbone" for base in node.bases):
        return None
    for statement in node.body:
        if (isinstance(statement, ast.Assign) and len(statement.targets) == 1
                and isinstance(statement.targets[0], ast.Name) and statement.targets[0].id == "name"
                and isinstance(statement.value, ast.Constant) and isinstance(statement.value.value, str)):
            return statement.value.value
    return None


def _keyword_options(node: ast.ClassDef) -> dict[str, object]:
    init = next((s for s in node.body if isinstance(s, ast.FunctionDef) and s.name == "__init__"), None)
    if init is None:
        return {}
    return {arg.arg: inspect.Parameter.empty if default is None else ast.literal_eval(default)
            for arg, default in zip(init.args.kwonlyargs, init.args.kw_defaults)}


MODEL_NAMES: tuple[str, ...] = tuple(sorted(_builtins()))
"""the built-in models, in alphabetical order"""


def model_class(name: str) -> type:
    """The Backbone subclass called `name`: built-in or plugin (imported here: torch)."""
    if name in _builtins():
        entry = _builtins()[name]
        return getattr(importlib.import_module(entry.module), entry.cls)
    cls = plugins.load_model(name)
    if cls is None:
        raise ConfigError(_unknown(name))
    return cls


def model_options(name: str) -> dict[str, object]:
    """The options model `name` accepts, with their defaults (without torch for a built-in)."""
    if name in _builtins():
        return dict(_builtins()[name].options)
    return plugins.keyword_options(model_class(name).__init__)


def check_model(name: str, options: dict[str, object]) -> None:
    """ConfigError unless `name` is a model and `options` are among its options (their values
    are checked when it is built)."""
    plugins.check_options(f"model {name!r}", options, model_options(name))


def _unknown(name: str) -> str:
    return plugins.unknown("model", "model", name, MODEL_NAMES, "package.module:Class")


def build_model(name: str, num_classes: int, in_channels: int, image_size: int, **options: object):
    """Build backbone ``name`` for (in_channels, image_size, image_size) inputs and num_classes outputs.

    Raises ConfigError for an unknown name or option, or a size the model cannot take.
    """
    from raymeta.models.base import is_int

    check_model(name, options)
    for label, value in (("num_classes", num_classes), ("in_channels", in_channels), ("image_size", image_size)):
        if not is_int(value) or value < 1:
            raise ConfigError(f"model {name!r}: {label} must be a positive integer, got {value!r}")
    model = model_class(name)(num_classes, in_channels, image_size, **options)
    model.build_args = (name, num_classes, in_channels, image_size, dict(options))  # for rebuild_model
    return model


def rebuild_model(model):
    """Another model of `model`'s architecture and options, on its device and dtype: its own
    initialisation drawn from the global RNG (pretrained weights loaded again), as
    build_model gives it (e.g. Co-teaching's second network)."""
    name, num_classes, in_channels, image_size, options = model.build_args
    param = next(model.parameters())
    return build_model(name, num_classes, in_channels, image_size, **options).to(param.device, param.dtype)


def __getattr__(attribute: str):
    if attribute == "Backbone":  # imported on first use: this module stays free of torch
        from raymeta.models.base import Backbone

        return Backbone
    raise AttributeError(f"module {__name__!r} has no attribute {attribute!r}")
