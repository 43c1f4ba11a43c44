"""The classifier's optimizer and learning-rate schedule, built from their configs.

They live in the methods layer because the bilevel engine's virtual step must mirror the real
optimizer; the trainer builds them through these functions too.
"""

from __future__ import annotations

import math

import torch

from raymeta.config import OptimizerConfig, ScheduleConfig


def build_optimizer(cfg: OptimizerConfig, params) -> torch.optim.Optimizer:
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                               nesterov=cfg.nesterov and cfg.momentum > 0,
                               weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_factor(cfg: ScheduleConfig, epoch: int, epochs: int) -> float:
    """Multiplier of the initial learning rate during `epoch` (0-based) of `epochs`."""
    if cfg.name == "step":
        return cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
    if cfg.name == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
    return 1.0


def set_lr(optimizer: torch.optim.Optimizer, base_lr: float, factor: float) -> float:
    lr = base_lr * factor
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr
