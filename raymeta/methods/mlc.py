"""MLC: Meta Loss Correction.

Wang, Hu, Hu. "Training Noise-Robust Deep Neural Networks via Meta-Learning." CVPR 2020.

A transition matrix T (K x K, T[i, j] ~ how clean class i shows up as noisy label j) corrects
the loss: the noisy label is predicted as softmax(logits) @ T. T's meta gradient asks which
correction makes the virtual step best for clean data; after each meta step T is clamped at 0
and each column (everything flowing into noisy class j) is normalised to sum to 1, as in the
paper (Eq. 9-10) and the official code. Defaults follow the paper; `t_on_logits`,
`reset_t_each_step` and `loss_reduction: sum` reproduce the official code.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from raymeta.methods.base import MetaMethod
from raymeta.parallel import batch_mean


def corrected_ce(logits: torch.Tensor, labels: torch.Tensor, T: torch.Tensor,
                 on_logits: bool = False) -> torch.Tensor:
    """Cross-entropy of the noisy labels under the noise matrix T, per sample: -log of
    (softmax(logits) @ T)[y], or with `on_logits` (MLC's code) of softmax(logits @ T)[y];
    0 for unlabeled samples (label -1)."""
    if on_logits:
        log_noisy = F.log_softmax(logits @ T, dim=1)
    else:
        log_noisy = (F.softmax(logits, dim=1) @ T).clamp_min(1e-12).log()
    return F.nll_loss(log_noisy, labels.clamp_min(0), reduction="none") * (labels >= 0)


class Transition(nn.Module):
    def __init__(self, num_classes: int):
        super().__init__()
        self.T = nn.Parameter(torch.eye(num_classes))


class MLC(MetaMethod):
    name = "mlc"
    packable = True
    examples = ({}, {"t_on_logits": True, "reset_t_each_step": True},  # the official code's form
                {"warmup_epochs": 1})

    def __init__(self, cfg, num_classes, model):
        super().__init__(cfg, num_classes, model)
        self.meta_model = Transition(num_classes)

    def corrected_loss(self, logits: torch.Tensor, labels: torch.Tensor, T: torch.Tensor):
        losses = corrected_ce(logits, labels, T, on_logits=self.cfg.t_on_logits)
        if self.cfg.loss_reduction == "sum":
            return losses.sum()
        return batch_mean(losses, labels >= 0)

    def takes_meta_step(self) -> bool:
        return self.epoch >= self.cfg.warmup_epochs  # warm-up: plain cross-entropy, T = I

    # METHOD: the three hooks of the bilevel step
    def meta_parameters(self, batch):
        if self.cfg.reset_t_each_step:
            with torch.no_grad():
                self.meta_model.T.copy_(torch.eye(self.num_classes))
        return [self.meta_model.T]

    def virtual_loss(self, logits, batch):
        return self.corrected_loss(logits, batch.y, self.meta_model.T)

    def apply_meta_gradient(self, grads):
        with torch.no_grad():
            grad = grads[0]
            if self.cfg.meta_grad_clip is not None:
                grad = grad.clamp(-self.cfg.meta_grad_clip, self.cfg.meta_grad_clip)
            T = (self.meta_model.T - self.cfg.meta_lr * grad).clamp_min(0)
            columns = T.sum(dim=0, keepdim=True)
            self.meta_model.T.copy_(T / torch.where(columns > 0, columns, 1.0))

    def actual_loss(self, logits, batch):
        return self.corrected_loss(logits, batch.y, self.meta_model.T.detach())

    def epoch_metrics(self, data) -> dict:
        return transition_metrics(self.meta_model.T, data.noise.transition)


def transition_metrics(T: torch.Tensor, realized: np.ndarray) -> dict:
    """A learned or estimated T and how well it finds the realized noise: per source class,
    whether its largest off-diagonal entry is the class its labels really flip to most, and
    the total variation of its rows to the realized matrix's."""
    T = T.detach().cpu().double().numpy()
    off = ~np.eye(len(T), dtype=bool)
    noisy_rows = (realized * off).sum(axis=1) > 0
    learned_target = np.where(off, T, -np.inf).argmax(axis=1)
    true_target = np.where(off, realized, -np.inf).argmax(axis=1)
    rows = T / np.maximum(T.sum(axis=1, keepdims=True), 1e-12)
    return {"T": T.round(5).ravel().tolist(),
            "T_target_agreement": float((learned_target == true_target)[noisy_rows].mean())
            if noisy_rows.any() else float("nan"),
            "T_total_variation": float(0.5 * np.abs(rows - realized).sum(axis=1).mean())}
