"""Training methods by name: the bilevel engine and one small file per method.

Knows nothing of Ray or storage.
"""

from __future__ import annotations

import importlib
import pkgutil

from raymeta import plugins
from raymeta.methods.base import Method, MetaMethod, StepOutput
from raymeta.methods.engine import Engine

for _module in pkgutil.iter_modules(__path__):  # every method's own file: adding one touches only it
    importlib.import_module(f"{__name__}.{_module.name}")


def _built_ins(cls: type[Method] = Method) -> dict[str, type[Method]]:
    """The classes here that say their own `name` (Method itself is ce), by that name."""
    found = {cls.name: cls} if "name" in vars(cls) and cls.__module__.startswith(__name__) else {}
    for sub in cls.__subclasses__():
        found.update(_built_ins(sub))
    return found


def _in_config_order() -> dict[str, type[Method]]:
    from raymeta.config import METHODS

    found = _built_ins()
    if set(found) != set(METHODS):  # a method's class and its config go together
        raise RuntimeError(f"methods with a class but no config: {sorted(set(found) - set(METHODS))}; "
                           f"with a config but no class: {sorted(set(METHODS) - set(found))}")
    return {name: found[name] for name in METHODS}


def packable(cls: type[Method]) -> bool:
    """Whether the class itself says `packable = True` (not inherited: Method.packable)."""
    return bool(vars(cls).get("packable"))


def examples(cls: type[Method]) -> tuple[dict, ...]:
    """The option sets the class itself names for the checks (not inherited: Method.examples)."""
    return vars(cls).get("examples", ({},))


METHOD_CLASSES: dict[str, type[Method]] = _in_config_order()
"""the built-in methods by name, in the order of their configs (raymeta.config.METHODS)"""
PACKABLE: tuple[str, ...] = tuple(n for n, c in METHOD_CLASSES.items() if packable(c))
"""the methods whose class says `packable = True` (raymeta.methods.packed): their steps depend
only on their own logits, batch and meta-model, or on their seed's model as it was at an
epoch's start"""


def build_method(cfg, num_classes: int, model) -> Method:
    cls = METHOD_CLASSES.get(cfg.name) or plugins.method_class(cfg.name)
    return cls(cfg, num_classes, model)


__all__ = ["Engine", "Method", "MetaMethod", "StepOutput", "build_method", "examples", "packable",
           "METHOD_CLASSES", "PACKABLE"]
