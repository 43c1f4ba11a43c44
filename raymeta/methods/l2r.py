"""L2R: Learning to Reweight Examples.

Ren, Zeng, Yang, Urtasun. "Learning to Reweight Examples for Robust Deep Learning." ICML 2018.

Each step perturbs the per-sample loss weights eps at zero; a sample's weight is how much
up-weighting it would lower the clean meta loss after the virtual step (minus the meta
gradient), clamped at zero and normalised over the batch. Nothing persists between steps.
"""

from __future__ import annotations

import torch

from raymeta.methods.base import MetaMethod, clean_noisy_extras, per_sample_ce
from raymeta.parallel import global_sum


class L2R(MetaMethod):
    name = "l2r"
    packable = True
    per_sample_meta_parameters = True

    def __init__(self, cfg, num_classes, model):
        super().__init__(cfg, num_classes, model)
        self.eps = self.weights = None

    def meta_parameters(self, batch):
        self.eps = torch.zeros(len(batch.y), dtype=batch.x.dtype, device=batch.x.device,
                               requires_grad=True)
        return [self.eps]

    # METHOD: the three hooks of the bilevel step
    def virtual_loss(self, logits, batch):
        return (self.eps * per_sample_ce(logits, batch.y)).sum()

    def apply_meta_gradient(self, grads):
        weights = (-grads[0]).clamp_min(0)  # unlabeled samples have zero loss, so zero weight
        total = global_sum(weights.sum())  # normalised over the global batch
        self.weights = (weights / torch.where(total > 0, total, 1.0)).detach()

    def actual_loss(self, logits, batch):
        return (self.weights * per_sample_ce(logits, batch.y)).sum()

    def step_extras(self, batch):
        # relative weights: 1 is the weight every sample gets under plain cross-entropy
        return clean_noisy_extras("weight", self.weights * batch.global_size, batch)
