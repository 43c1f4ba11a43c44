"""Methods, models, datasets and noise models from other packages.

- A plugin method is a `raymeta.methods.Method` (or `MetaMethod`) subclass whose class
  attribute `options` is its config class, a `raymeta.config.MethodOptions` (or
  `MetaMethodOptions`) subclass with that method's own fields.
- A plugin model is a `raymeta.models.Backbone` subclass whose options are its `__init__`'s
  keyword-only parameters.
- A plugin dataset is a function `(root, *, options...) -> raymeta.data.datasets.RawData`
  (the clean training and test splits as arrays), whose options are its keyword-only
  parameters.
- A plugin noise model is a function `(clean, num_classes, rate, rng, *, options...) ->
  noisy labels` of NumPy arrays, whose options are its keyword-only parameters.

Each is named in a config

- by an entry point of the group `raymeta.methods`, `raymeta.models`, `raymeta.datasets` or
  `raymeta.noise` that its package declares (`[project.entry-points."raymeta.methods"]`
  `my_method = "my_pkg.module:MyMethod"`), or
- by its import path, `method: {name: "my_pkg.module:MyMethod", ...}`.

Its options are validated like a built-in's (unknown keys get a did-you-mean), before any data
or Ray. The module is imported then, so a plugin's config check costs its imports. Ray trials
are handed the names resolved here (`resolved`) and import the same objects: the package must
be importable on every node (installed, or shipped with Ray's runtime_env).
This module itself imports neither torch nor Ray.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect

from raymeta.errors import ConfigError, did_you_mean

GROUPS = {"method": "raymeta.methods", "model": "raymeta.models", "dataset": "raymeta.datasets",
          "noise": "raymeta.noise"}
"""kind -> the entry-point group its plugins declare"""

_CLASSES: dict[str, dict[str, type]] = {kind: {} for kind in GROUPS}
"""kind -> plugin name -> its class (a dataset or noise model: its function), for the plugins
loaded in this process"""
_TARGETS: dict[str, dict[str, str]] = {kind: {} for kind in GROUPS}
"""kind -> plugin name -> "module:attribute" it was loaded from"""


def installed(kind: str = "method") -> dict[str, str]:
    """Plugin names of `kind` that installed packages declare -> "module:attribute"."""
    return {ep.name: ep.value for ep in importlib.metadata.entry_points(group=GROUPS[kind])}


def is_plugin_name(name: str, kind: str = "method") -> bool:
    return name in _CLASSES[kind] or ":" in name or name in installed(kind)


def load_method(name: str, target: str | None = None) -> type | None:
    """Make the plugin method `name` known to configs and return its class; None when `name`
    names no plugin (neither an installed entry point nor an import path)."""
    from raymeta.config import register_method_config

    def register(cls: type, target: str) -> None:
        from raymeta.methods.base import Method  # a plugin method needs torch anyway

        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise ConfigError(f"method '{name}': {target} is not a raymeta.methods.Method subclass "
                              f"(a method's class, e.g. a subclass of raymeta.methods.MetaMethod)")
        register_method_config(name, getattr(cls, "options", None), where=f"{target}.options")

    return _load("method", name, target, register)


def load_model(name: str, target: str | None = None) -> type | None:
    """The class of the plugin model `name`; None when `name` names no plugin."""
    def check(cls: type, target: str) -> None:
        from raymeta.models.base import Backbone

        if not (isinstance(cls, type) and issubclass(cls, Backbone)):
            raise ConfigError(f"model '{name}': {target} is not a raymeta.models.Backbone subclass "
                              f"(a model's class: features(x) plus a linear classifier)")

    return _load("model", name, target, check)


def load_noise(name: str, target: str | None = None):
    """The function of the plugin noise model `name`; None when `name` names no plugin."""
    return _load("noise", name, target, _a_function(
        f"noise model '{name}'", "(clean, num_classes, rate, rng, *, options...) -> noisy labels"))


def load_dataset(name: str, target: str | None = None):
    """The function of the plugin dataset `name`; None when `name` names no plugin."""
    return _load("dataset", name, target, _a_function(
        f"dataset '{name}'", "(root, *, options...) -> raymeta.data.datasets.RawData"))


def _a_function(what: str, signature: str):
    def check(function, target: str) -> None:
        if not callable(function) or isinstance(function, type):
            raise ConfigError(f"{what}: {target} is not a function (it must be a function "
                              f"{signature})")
    return check


def keyword_options(function) -> dict[str, object]:
    """The keyword-only parameters of `function` -> their defaults (a plugin's options)."""
    params = inspect.signature(function).parameters.values()
    return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


def check_options(what: str, options: dict, allowed: dict[str, object]) -> None:
    """ConfigError unless every key of `options` is one of `allowed` (name -> default, as
    `keyword_options` gives them) and every option without a default is given. `what`: e.g.
    "model 'mlp'"."""
    for key in options:
        if key not in allowed:
            listed = ", ".join(allowed) if allowed else "none"
            raise ConfigError(f"{what} has no option {key!r}; its options: "
                              f"{listed}{did_you_mean(key, list(allowed))}")
    missing = [key for key, default in allowed.items()
               if default is inspect.Parameter.empty and key not in options]
    if missing:
        raise ConfigError(f"{what} needs the option(s) {', '.join(missing)}")


def _load(kind: str, name: str, target: str | None, check) -> type | None:
    if name in _CLASSES[kind]:
        return _CLASSES[kind][name]
    target = target or installed(kind).get(name) or (name if ":" in name else None)
    if target is None:
        return None
    cls = _import(kind, name, target)
    check(cls, target)
    _CLASSES[kind][name], _TARGETS[kind][name] = cls, target
    return cls


def _import(kind: str, name: str, target: str):
    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute:
        raise ConfigError(f"{kind} '{name}': '{target}' is not an import path; write it as "
                          f"'package.module:ClassName'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"{kind} '{name}': cannot import {module_name} ({err}); install the "
                          f"package that provides it (pip install -e ...), or put it on "
                          f"PYTHONPATH") from None
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise ConfigError(f"{kind} '{name}': {module_name} has no attribute '{attribute}'") from None


def method_class(name: str) -> type:
    """The class of a plugin method loaded in this process."""
    cls = load_method(name)
    if cls is None:
        raise ConfigError(f"unknown method '{name}'")
    return cls


def resolved() -> dict[str, dict[str, str]]:
    """The plugins loaded here, kind -> name -> "module:attribute": what a Ray trial needs to
    load them again (`restore`), entry-point metadata or not."""
    return {kind: dict(targets) for kind, targets in _TARGETS.items() if targets}


def restore(targets: dict[str, dict[str, str]] | None) -> None:
    """In a Ray trial: load the plugins the driver resolved."""
    for kind, named in (targets or {}).items():
        for name, target in named.items():
            LOADERS[kind](name, target)


LOADERS = {"method": load_method, "model": load_model, "dataset": load_dataset, "noise": load_noise}


def unknown(kind: str, what: str, name: str, builtins: tuple[str, ...], form: str,
            called: str | None = None) -> str:
    """The message for a `name` that is neither a built-in nor a plugin of `kind`: the
    built-ins, the installed plugins, the closest name, and how to name one by import path.
    `called`: what the name is, when not `what` (a noise type names a noise model)."""
    more = sorted(set(installed(kind)) - set(builtins))
    return (f"unknown {called or what} {name!r}; choose one of {', '.join(builtins)}"
            f"{did_you_mean(str(name), [*builtins, *more])}, or a plugin {what}: "
            + (f"one installed here ({', '.join(more)}), or one " if more else "")
            + f"named by its import path ({form})")
