"""Meta-learned loss threshold: the smallest meta-reweighting method there is.

Each training sample's weight is sigmoid((tau - loss) / temperature): samples whose loss is
above the threshold tau (likely mislabelled) count less. tau is the meta-model, one number,
learned by the meta gradient through the virtual step (like MW-Net's weighting net, without
the net). Everything else (the virtual step, the meta loss on the clean meta batch, data
parallelism, checkpoints, FaMUS, meta_interval) is raymeta's engine.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from raymeta.config import MetaMethodOptions
from raymeta.methods import MetaMethod
from raymeta.methods.base import clean_noisy_extras, per_sample_ce
from raymeta.parallel import batch_mean


class ThresholdOptions(MetaMethodOptions):
    """The method's own options: `method: {name: threshold, temperature: 0.5, ...}`."""

    init_threshold: float = 2.0
    """tau at the start, in units of the per-sample cross-entropy"""
    temperature: float = Field(0.5, gt=0.0)
    """how sharply the weight falls as a sample's loss passes tau"""
    meta_lr: float = Field(0.1, gt=0.0)
    """SGD learning rate of tau"""


class Threshold(nn.Module):
    def __init__(self, init: float):
        super().__init__()
        self.tau = nn.Parameter(torch.tensor(float(init)))


class MetaThreshold(MetaMethod):
    options = ThresholdOptions
    packable = True  # each step reads only its own logits, batch and tau

    def __init__(self, cfg, num_classes, model):
        super().__init__(cfg, num_classes, model)
        self.meta_model = Threshold(cfg.init_threshold)
        self.meta_optimizer = torch.optim.SGD(self.meta_model.parameters(), lr=cfg.meta_lr)
        self.weights = None

    def weighted_loss(self, logits, batch, weights_need_grad: bool):
        losses = per_sample_ce(logits, batch.y)
        with torch.set_grad_enabled(weights_need_grad):
            weights = torch.sigmoid((self.meta_model.tau - losses.detach()) / self.cfg.temperature)
        self.weights = weights.detach()
        return batch_mean(weights * losses, batch.y >= 0)

    # the two hooks of the bilevel step that make this method what it is
    def virtual_loss(self, logits, batch):
        return self.weighted_loss(logits, batch, weights_need_grad=True)

    def actual_loss(self, logits, batch):
        return self.weighted_loss(logits, batch, weights_need_grad=False)

    def step_extras(self, batch):
        return clean_noisy_extras("weight", self.weights, batch)

    def epoch_metrics(self, data) -> dict:
        return {"threshold": float(self.meta_model.tau.detach())}
