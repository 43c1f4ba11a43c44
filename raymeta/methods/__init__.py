"""Training methods by name: the bilevel engine and one small file per method.

Knows nothing of Ray or storage.
"""

from __future__ import annotations

from raymeta import plugins
from raymeta.methods.base import Method, MetaMethod, StepOutput
from raymeta.methods.coteaching import Coteaching
from raymeta.methods.correction import GLC, Forward
from raymeta.methods.engine import Engine
from raymeta.methods.gce import GCE
from raymeta.methods.l2r import L2R
from raymeta.methods.metalabelnet import MetaLabelNet
from raymeta.methods.mlc import MLC
from raymeta.methods.mlnt import MLNT
from raymeta.methods.mwnet import MWNet
from raymeta.methods.sce import SCE

METHOD_CLASSES: dict[str, type[Method]] = {
    "ce": Method, "mwnet": MWNet, "l2r": L2R, "mlc": MLC, "mlnt": MLNT,
    "metalabelnet": MetaLabelNet, "gce": GCE, "sce": SCE, "forward": Forward, "glc": GLC,
    "coteaching": Coteaching}


def build_method(cfg, num_classes: int, model) -> Method:
    cls = METHOD_CLASSES.get(cfg.name) or plugins.method_class(cfg.name)
    return cls(cfg, num_classes, model)


__all__ = ["Engine", "Method", "MetaMethod", "StepOutput", "build_method", "METHOD_CLASSES"]
