"""The method interface. A method says what makes it different (its meta-model and losses);
the engine (`raymeta.methods.engine`) owns the mechanics, written once for every method.

Labels of -1 mark unlabeled training samples (`dataset.unlabeled_fraction`): every loss here
skips them, except methods that learn targets for them (MetaLabelNet).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from raymeta.data.loader import Batch
from raymeta.methods.engine import Engine
from raymeta.parallel import all_reduce_sum_, batch_mean, rank_world

MetaBatchFn = Callable[[], Batch]
"""returns a clean meta batch; called only on steps that update the meta-model"""


@dataclass
class StepOutput:
    loss: torch.Tensor
    """the training loss of the actual step (detached)"""
    logits: torch.Tensor
    """logits of the training batch (detached), for training accuracy"""
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    """diagnostics: name -> tensor([sum, count]); the epoch value is sum(sums) / sum(counts)"""


def per_sample_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per sample; 0 for unlabeled samples (label -1)."""
    return F.cross_entropy(logits, labels.clamp_min(0), reduction="none") * (labels >= 0)


def label_log_prob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(label | x) per sample (any value for unlabeled samples: mask them)."""
    return F.log_softmax(logits, dim=1).gather(1, labels.clamp_min(0)[:, None])[:, 0]


def mean_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged over the labeled samples (of the global batch)."""
    return batch_mean(per_sample_ce(logits, labels), labels >= 0)


@torch.no_grad()
def predict_split(model: nn.Module, split, num_classes: int, batch_size: int = 512) -> torch.Tensor:
    """softmax(model(x)) in eval mode for every sample of a whole split (a DeviceSplit), in the
    split's order, float64. Each worker computes its part and the parts are summed, so every
    worker ends with all of them (the same on each)."""
    training = model.training
    model.eval()
    rank, world = rank_world()
    probs = torch.zeros(len(split), num_classes, dtype=torch.float64, device=split.y.device)
    for batch in split.batches(batch_size, shuffle=False, rank=rank, world=world):
        probs[batch.index] = F.softmax(model(batch.x).double(), dim=1)
    all_reduce_sum_([probs])
    model.train(training)
    return probs


def split_accuracy(model: nn.Module, split, num_classes: int) -> float:
    """Accuracy of `model` (eval mode) on a whole split (a DeviceSplit): the same on every worker."""
    predicted = predict_split(model, split, num_classes).argmax(1)
    return (predicted == split.y).double().mean().item()


def frozen_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` that no gradient reaches (teachers, feature encoders)."""
    copy_ = copy.deepcopy(model)
    for p in copy_.parameters():
        p.requires_grad_(False)
    return copy_


def masked_sum_count(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """tensor([sum of values where mask, number of such values]) for StepOutput.extras."""
    mask = mask.to(values.dtype)
    return torch.stack([(values.detach() * mask).sum(), mask.sum()])


def scalar_sum_count(value: torch.Tensor) -> torch.Tensor:
    """tensor([value, 1 / workers]): a per-step scalar whose epoch value is its mean over steps.
    `value` is this worker's share of a global-batch quantity (a loss built with batch_mean),
    so the sums over workers give the global value once per step."""
    return torch.stack([value.detach(), torch.full_like(value, 1.0 / rank_world()[1])])


def clean_noisy_extras(prefix: str, values: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
    """A per-sample quantity averaged separately over clean and noisy labels (known from the
    synthetic noise; never used for training)."""
    known = (batch.y >= 0) & (batch.y_clean >= 0)
    clean = known & (batch.y == batch.y_clean)
    return {f"{prefix}_clean": masked_sum_count(values, clean),
            f"{prefix}_noisy": masked_sum_count(values, known & ~clean)}


class Method:
    """Plain cross-entropy training; every other method overrides only what differs."""

    name = "ce"
    """what configs call it; a built-in method's class says it (raymeta.methods.METHOD_CLASSES)"""
    packable = True
    """the seeds of a run can be packed into one model (raymeta.methods.packed); a class says
    it itself, it is not inherited"""
    examples: tuple[dict, ...] = ({},)
    """option sets the checks every method passes run it with (tests/test_conformance.py): a
    small instance first (warm-ups and estimates that fit a 2-4 epoch run), then the options
    whose code paths differ. A class says them itself (a subclass's options may differ), else
    its defaults are checked"""
    uses_meta_batch = False

    def __init__(self, cfg, num_classes: int, model: nn.Module):
        self.cfg = cfg
        self.name = cfg.name  # a plugin method's name is how its config calls it
        self.num_classes = num_classes
        self.meta_model: nn.Module | None = None
        self.epoch = 0
        self.generator: torch.Generator | None = None
        """the method's own random draws (seeded by the trainer, kept in checkpoints)"""
        self.splits: dict | None = None
        """the trainer's device splits by name (train, meta, test), for methods that look at a
        whole split at once (set by the trainer)"""

    def train_loss(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        return mean_ce(logits, batch.y)

    def step(self, engine: Engine, batch: Batch, meta_batch: MetaBatchFn) -> StepOutput:
        logits = engine.plain_forward(batch.x)
        loss = self.train_loss(logits, batch)
        engine.actual_step(loss)
        return StepOutput(loss.detach(), logits.detach())

    def on_epoch_start(self, epoch: int, engine: Engine) -> None:
        self.epoch = epoch

    def epoch_metrics(self, data) -> dict:
        """Per-epoch facts about what the meta-model learned (for the curves)."""
        return {}

    def to(self, device: torch.device, dtype: torch.dtype | None = None) -> Method:
        if self.meta_model is not None:
            self.meta_model.to(device, dtype)
        return self

    def state_dict(self) -> dict:
        """Everything of the method's own that a checkpoint must keep."""
        return {"meta_model": self.meta_model.state_dict()} if self.meta_model else {}

    def load_state_dict(self, state: dict) -> None:
        if self.meta_model is not None:
            self.meta_model.load_state_dict(state["meta_model"])


class MetaMethod(Method):
    """A bilevel method: the engine calls these hooks in its three stages."""

    uses_meta_batch = True
    meta_optimizer: torch.optim.Optimizer | None = None
    per_sample_meta_parameters = False
    """True when the meta parameters belong to this worker's samples (L2R's perturbations):
    their gradients are not summed across workers"""

    def meta_parameters(self, batch: Batch) -> list[torch.Tensor]:
        """The tensors the meta gradient is taken with respect to."""
        return list(self.meta_model.parameters())

    def virtual_loss(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        """The training loss of the virtual step, differentiable in the meta parameters."""
        raise NotImplementedError

    def meta_loss(self, logits: torch.Tensor, meta_batch: Batch) -> torch.Tensor:
        """Loss on the clean meta batch after the virtual step."""
        return batch_mean(F.cross_entropy(logits, meta_batch.y, reduction="none"))

    def apply_meta_gradient(self, grads: list[torch.Tensor]) -> None:
        """Update the meta-model with its meta gradient (default: its optimizer)."""
        for p, g in zip(self.meta_model.parameters(), grads):
            p.grad = g
        self.meta_optimizer.step()

    def actual_loss(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        """The real step's loss, with the updated meta-model (no gradient into it)."""
        raise NotImplementedError

    def step_extras(self, batch: Batch) -> dict[str, torch.Tensor]:
        return {}

    def takes_meta_step(self) -> bool:
        """Whether this step is bilevel (False: a plain cross-entropy step, e.g. a warm-up)."""
        return True

    def step(self, engine: Engine, batch: Batch, meta_batch: MetaBatchFn) -> StepOutput:
        if not self.takes_meta_step():
            return Method.step(self, engine, batch, meta_batch)
        return engine.bilevel_step(self, batch, meta_batch)

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.meta_optimizer is not None:
            state["meta_optimizer"] = self.meta_optimizer.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if self.meta_optimizer is not None:
            self.meta_optimizer.load_state_dict(state["meta_optimizer"])
