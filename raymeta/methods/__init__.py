"""Training methods by name: the bilevel engine and one small file per method.

Knows nothing of Ray or storage.
"""

from __future__ import annotations

from raymeta.methods.base import Engine, Method, StepOutput
from raymeta.methods.ce import CrossEntropy

METHOD_CLASSES: dict[str, type[Method]] = {"ce": CrossEntropy}


def build_method(cfg, num_classes: int) -> Method:
    return METHOD_CLASSES[cfg.name](cfg, num_classes)


__all__ = ["Engine", "Method", "StepOutput", "build_method", "METHOD_CLASSES"]
