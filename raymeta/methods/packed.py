"""The methods of K packed seeds (`raymeta.models.packed`) as one method for the engine.

Each seed keeps its own method object (its meta-model, meta optimizer, weights, random draws);
every loss the engine asks for is the sum of the seeds' losses, each computed by that seed's
method on its own rows of the logits and its own batch. Since seed k's rows depend only on
seed k's slice of the packed model, every gradient (virtual, meta, actual) is, seed by seed,
the gradient that seed would get training alone.
"""

from __future__ import annotations

import torch

from raymeta import plugins
from raymeta.data.loader import PackedBatch
from raymeta.methods.base import MetaMethod, Method, StepOutput

def packing_problem(cfg) -> str | None:
    """Why the seeds of this experiment cannot be packed into one process (None: they can).
    A method packs when its class (built-in or plugin) says `packable = True`: its steps depend
    only on its own logits, batch and meta-model, or on its seed's model as it was at an
    epoch's start (MetaLabelNet's encoder, GCE's pruning pass: the seeds' own models are
    updated at each epoch's end). MLNT steps a teacher copy of the model inside every step."""
    from raymeta.methods import METHOD_CLASSES, PACKABLE, packable

    name = cfg.method.name
    what = "packed seeds (resources.seeds_per_trial > 1, raymeta run --seeds)"
    cls = METHOD_CLASSES.get(name) or plugins.method_class(name)
    if not packable(cls):
        return (f"{what} work for methods whose class says `packable = True` "
                f"({', '.join(PACKABLE)} among the built-ins); {name}'s does not: its steps "
                f"read more than its own logits, batch and meta-model (MLNT, for one, steps a "
                f"teacher copy of the model inside every step): train {name} one seed per trial")
    if getattr(cfg.method, "famus", False):
        return (f"{what} do not combine with method.famus: FaMUS gates whole parameter "
                f"tensors, and packing stacks each tensor over the seeds; train FaMUS one seed "
                f"per trial")
    if cfg.train.compile:
        return (f"{what} do not combine with train.compile (a compiled vmap of the seeds' "
                f"models is not supported here); train compiled runs one seed per trial")
    if cfg.meta_set.source == "pseudo":
        return (f"{what} do not combine with meta_set.source pseudo (each seed would choose "
                f"a meta set of another size); train it one seed per trial")
    return None


class PackedMethod(MetaMethod):
    """K seeds' methods of one kind, whose losses the engine sees summed."""

    def __init__(self, members: list[Method]):
        first = members[0]
        super().__init__(first.cfg, first.num_classes, model=None)  # every attribute a method has
        self.members = members
        self.uses_meta_batch = first.uses_meta_batch
        self.per_sample_meta_parameters = getattr(first, "per_sample_meta_parameters", False)
        self.outputs: list[StepOutput] = []
        """each seed's loss, logits and extras of the latest step"""
        self._losses: list[torch.Tensor] = []
        self._meta_counts: list[int] = []

    def _each(self, hook: str, logits: torch.Tensor, batch: PackedBatch) -> list[torch.Tensor]:
        return [getattr(m, hook)(rows, part)
                for m, rows, part in zip(self.members, logits.chunk(len(self.members)), batch.parts)]

    def takes_meta_step(self) -> bool:
        first = self.members[0]  # the seeds are at the same step: they agree on its kind
        return isinstance(first, MetaMethod) and first.takes_meta_step()

    def step(self, engine, batch: PackedBatch, meta_batch) -> StepOutput:
        bilevel = self.takes_meta_step()
        out = super().step(engine, batch, meta_batch)  # a bilevel step, or Method's plain one
        self.outputs = [StepOutput(loss, rows, m.step_extras(part) if bilevel else {})
                        for m, loss, rows, part in zip(self.members, self._losses,
                                                       out.logits.chunk(len(self.members)),
                                                       batch.parts)]
        return out

    # the engine's hooks, each the sum over seeds
    def meta_parameters(self, batch):
        params = [m.meta_parameters(part) for m, part in zip(self.members, batch.parts)]
        self._meta_counts = [len(p) for p in params]
        return [t for p in params for t in p]

    def virtual_loss(self, logits, batch):
        return sum(self._each("virtual_loss", logits, batch))

    def meta_loss(self, logits, meta_batch):
        return sum(self._each("meta_loss", logits, meta_batch))

    def apply_meta_gradient(self, grads):
        start = 0
        for m, count in zip(self.members, self._meta_counts):
            m.apply_meta_gradient(grads[start:start + count])
            start += count

    def actual_loss(self, logits, batch):
        return self._summed_losses("actual_loss", logits, batch)

    def train_loss(self, logits, batch):  # the loss of Method's plain step
        return self._summed_losses("train_loss", logits, batch)

    def _summed_losses(self, hook: str, logits, batch) -> torch.Tensor:
        losses = self._each(hook, logits, batch)
        self._losses = [loss.detach() for loss in losses]
        return sum(losses)

    def step_extras(self, batch):
        return {}  # each seed's are in self.outputs

    def on_epoch_start(self, epoch, engine) -> None:
        self.epoch = epoch
        for m in self.members:
            m.on_epoch_start(epoch, engine)

    def to(self, device, dtype=None) -> PackedMethod:
        for m in self.members:
            m.to(device, dtype)
        return self

    def state_dict(self) -> dict:
        return {"members": [m.state_dict() for m in self.members]}

    def load_state_dict(self, state: dict) -> None:
        for m, s in zip(self.members, state["members"]):
            m.load_state_dict(s)
