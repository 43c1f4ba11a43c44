"""MW-Net: Meta-Weight-Net.

Shu, Xie, Yi, Zhao, Zhou, Xu, Meng. "Meta-Weight-Net: Learning an Explicit Mapping for Sample
Weighting." NeurIPS 2019.

A small net V maps each sample's (detached) training loss to a weight in (0, 1). Its meta
gradient asks: would a step on the V-weighted loss lower the loss on clean meta data?
Two official variants: sum-normalised weights with an SGD-trained V (the PGC script, our
default), or the mean of raw weights with Adam (`weights: mean, meta_optimizer: adam`).
"""

from __future__ import annotations

import torch
from torch import nn

from raymeta.methods.base import MetaMethod, clean_noisy_extras, per_sample_ce
from raymeta.parallel import batch_mean, global_sum


class WeightNet(nn.Module):
    """V(loss) = sigmoid(W2 relu(W1 loss + b1) + b2), 1 -> hidden -> 1."""

    def __init__(self, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, 1), nn.Sigmoid())

    def forward(self, losses: torch.Tensor) -> torch.Tensor:
        return self.net(losses.detach()[:, None]).squeeze(1)


class MWNet(MetaMethod):
    name = "mwnet"
    packable = True
    examples = ({}, {"weights": "mean", "meta_optimizer": "adam"}, {"virtual_step": "sgd"},
                {"meta_interval": 4, "meta_optimizer": "adam"})

    def __init__(self, cfg, num_classes, model):
        super().__init__(cfg, num_classes, model)
        self.meta_model = WeightNet(cfg.hidden)
        params = self.meta_model.parameters()
        if cfg.meta_optimizer == "sgd":
            self.meta_optimizer = torch.optim.SGD(params, lr=cfg.meta_lr, momentum=0.9,
                                                  nesterov=True, weight_decay=cfg.meta_weight_decay)
        else:
            self.meta_optimizer = torch.optim.Adam(params, lr=cfg.meta_lr,
                                                   weight_decay=cfg.meta_weight_decay)
        self.weights = None

    def weighted_loss(self, losses: torch.Tensor, weights: torch.Tensor, labeled: torch.Tensor):
        weights = weights * labeled
        if self.cfg.weights == "normalized":
            total = global_sum(weights.sum())  # over the global batch, differentiably
            return (weights * losses).sum() / torch.where(total > 0, total, 1.0)
        return batch_mean(weights * losses, labeled)

    # METHOD: the three hooks of the bilevel step
    def virtual_loss(self, logits, batch):
        losses = per_sample_ce(logits, batch.y)
        return self.weighted_loss(losses, self.meta_model(losses), batch.y >= 0)

    def actual_loss(self, logits, batch):
        losses = per_sample_ce(logits, batch.y)
        with torch.no_grad():
            self.weights = self.meta_model(losses)
        return self.weighted_loss(losses, self.weights, batch.y >= 0)

    def step_extras(self, batch):
        return clean_noisy_extras("weight", self.weights, batch)

    def epoch_metrics(self, data) -> dict:
        """The weighting function itself: V at the losses of WEIGHT_GRID (which losses it
        keeps, and where it cuts off)."""
        first = next(self.meta_model.parameters())
        grid = torch.tensor(WEIGHT_GRID, device=first.device, dtype=first.dtype)
        with torch.no_grad():
            return {"weight_at_loss": self.meta_model(grid).cpu().double().round(decimals=5).tolist()}


WEIGHT_GRID = (0.0, 0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
"""the training losses at which the curves record MW-Net's weight (`weight_at_loss`)"""
