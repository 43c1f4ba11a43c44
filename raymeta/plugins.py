"""Methods from other packages: a plugin method is a `raymeta.methods.Method` (or `MetaMethod`)
subclass whose class attribute `options` is its config class, a `raymeta.config.MethodOptions`
(or `MetaMethodOptions`) subclass with that method's own fields. It is named in a config either

- by an entry point of the group `raymeta.methods` that its package declares
  (`[project.entry-points."raymeta.methods"]` `my_method = "my_pkg.module:MyMethod"`), or
- by its import path, `method: {name: "my_pkg.module:MyMethod", ...}`.

Its options are validated like a built-in method's (unknown keys get a did-you-mean), before
any data or Ray. The module is imported then, so a plugin's config check costs its imports.
Ray trials are handed the names resolved here (`resolved`) and import the same classes: the
package must be importable on every node (installed, or shipped with Ray's runtime_env).
This module itself imports neither torch nor Ray.
"""

from __future__ import annotations

import importlib
import importlib.metadata

from raymeta.errors import ConfigError

GROUP = "raymeta.methods"

_CLASSES: dict[str, type] = {}
"""plugin method name -> its class, for the methods loaded in this process"""
_TARGETS: dict[str, str] = {}
"""plugin method name -> "module:attribute" it was loaded from"""


def installed() -> dict[str, str]:
    """Plugin method names that installed packages declare -> "module:attribute"."""
    return {ep.name: ep.value for ep in importlib.metadata.entry_points(group=GROUP)}


def is_plugin_name(name: str) -> bool:
    return name in _CLASSES or ":" in name or name in installed()


def load_method(name: str, target: str | None = None) -> type | None:
    """Make the plugin method `name` known to configs and return its class; None when `name`
    names no plugin (neither an installed entry point nor an import path)."""
    from raymeta.config import register_method_config

    if name in _CLASSES:
        return _CLASSES[name]
    target = target or installed().get(name) or (name if ":" in name else None)
    if target is None:
        return None
    cls = _import(name, target)
    from raymeta.methods.base import Method  # a plugin method needs torch anyway

    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise ConfigError(f"method '{name}': {target} is not a raymeta.methods.Method subclass "
                          f"(a method's class, e.g. a subclass of raymeta.methods.MetaMethod)")
    register_method_config(name, getattr(cls, "options", None), where=f"{target}.options")
    _CLASSES[name], _TARGETS[name] = cls, target
    return cls


def _import(name: str, target: str):
    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute:
        raise ConfigError(f"method '{name}': '{target}' is not an import path; write it as "
                          f"'package.module:ClassName'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"method '{name}': cannot import {module_name} ({err}); install the "
                          f"package that provides it (pip install -e ...), or put it on "
                          f"PYTHONPATH") from None
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise ConfigError(f"method '{name}': {module_name} has no attribute '{attribute}'") from None


def method_class(name: str) -> type:
    """The class of a plugin method loaded in this process."""
    cls = load_method(name)
    if cls is None:
        raise ConfigError(f"unknown method '{name}'")
    return cls


def resolved() -> dict[str, str]:
    """The plugin methods loaded here, name -> "module:attribute": what a Ray trial needs to
    load them again (`restore`), entry-point metadata or not."""
    return dict(_TARGETS)


def restore(targets: dict[str, str] | None) -> None:
    """In a Ray trial: load the plugin methods the driver resolved."""
    for name, target in (targets or {}).items():
        load_method(name, target)
