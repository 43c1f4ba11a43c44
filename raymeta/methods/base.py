"""The method interface and the engine that runs its steps.

A method says what makes it different (its meta-model and losses); the engine owns the
mechanics (forward, backward, optimizer step; later the virtual step, meta gradient and
cross-worker averaging), written once for every method.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from raymeta.data.loader import Batch


@dataclass
class StepOutput:
    loss: torch.Tensor
    """the training loss of the actual step (detached)"""
    logits: torch.Tensor
    """logits of the training batch (detached), for training accuracy"""
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    """method diagnostics as scalar tensors, averaged over the epoch into `train/<name>`"""


class Engine:
    """Runs the steps of a method on one model with one optimizer."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.model = model
        self.optimizer = optimizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def actual_step(self, loss: torch.Tensor) -> None:
        """The real update of the classifier."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


class Method:
    """Plain cross-entropy training; every other method overrides only what differs."""

    name = "ce"
    uses_meta_batch = False
    """whether `step` needs a clean meta batch"""

    def __init__(self, cfg, num_classes: int):
        self.cfg = cfg
        self.num_classes = num_classes
        self.meta_model: nn.Module | None = None

    def train_loss(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(logits, batch.y)

    def meta_loss(self, logits: torch.Tensor, meta_batch: Batch) -> torch.Tensor:
        return F.cross_entropy(logits, meta_batch.y)

    def step(self, engine: Engine, batch: Batch, meta_batch: Batch | None) -> StepOutput:
        logits = engine.forward(batch.x)
        loss = self.train_loss(logits, batch)
        engine.actual_step(loss)
        return StepOutput(loss.detach(), logits.detach())

    def state_dict(self) -> dict:
        """Everything of the method's own that a checkpoint must keep."""
        return {"meta_model": self.meta_model.state_dict()} if self.meta_model else {}

    def load_state_dict(self, state: dict) -> None:
        if self.meta_model is not None:
            self.meta_model.load_state_dict(state["meta_model"])
