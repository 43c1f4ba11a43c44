"""MetaLabelNet: soft labels generated from features.

Algan, Ulusoy. "MetaLabelNet: Learning to Generate Soft-Labels from Noisy-Labels." IEEE TNNLS
2021 (arXiv:2103.10869).

After a cross-entropy warm-up, the model is frozen as a feature encoder E. A single-layer
label net g turns E(x) into a soft label; the classifier trains on KL(prediction || soft label)
plus the prediction entropy, and g is trained through the virtual step by the clean meta loss.
The given labels are not used after the warm-up, so unlabeled samples train like the rest.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from raymeta.methods.base import MetaMethod, frozen_copy, masked_sum_count
from raymeta.parallel import batch_mean


def kl_to_soft_labels(logits: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    """KL(softmax(logits) || soft), averaged over samples and classes as in the official code."""
    log_p = F.log_softmax(logits, dim=1)
    return batch_mean((log_p.exp() * (log_p - (soft + 1e-10).log())).mean(dim=1))


def prediction_entropy(logits: torch.Tensor) -> torch.Tensor:
    log_p = F.log_softmax(logits, dim=1)
    return -batch_mean((log_p.exp() * log_p).mean(dim=1))


class MetaLabelNet(MetaMethod):
    name = "metalabelnet"
    packable = True
    examples = ({"warmup_epochs": 1},)  # the meta step from the second epoch on

    def __init__(self, cfg, num_classes, model):
        super().__init__(cfg, num_classes, model)
        self.meta_model = nn.Linear(model.feature_dim, num_classes)
        self.meta_optimizer = torch.optim.Adam(self.meta_model.parameters(), lr=cfg.meta_lr,
                                               weight_decay=cfg.meta_weight_decay)
        self.model = model  # the encoder is frozen from it after the warm-up
        self.encoder: nn.Module | None = None
        self._features = (None, None)  # (batch, E(x)): the encoder runs once per batch
        self._soft = None

    def on_epoch_start(self, epoch, engine):
        super().on_epoch_start(epoch, engine)
        if epoch >= self.cfg.warmup_epochs and self.encoder is None:
            self.encoder = frozen_copy(self.model).eval()
            if self.cfg.init_from_classifier:
                self.meta_model.load_state_dict(self.model.classifier.state_dict())

    def features(self, batch) -> torch.Tensor:
        if self._features[0] is not batch:
            with torch.no_grad():
                self._features = (batch, self.encoder.features(batch.x))
        return self._features[1]

    def takes_meta_step(self) -> bool:
        return self.encoder is not None  # warm-up: plain cross-entropy on the given labels

    # METHOD: the three hooks of the bilevel step
    def virtual_loss(self, logits, batch):
        soft = F.softmax(self.meta_model(self.features(batch)), dim=1)
        return kl_to_soft_labels(logits, soft)

    def actual_loss(self, logits, batch):
        with torch.no_grad():
            self._soft = F.softmax(self.meta_model(self.features(batch)), dim=1)
        return kl_to_soft_labels(logits, self._soft) + self.cfg.entropy_weight * prediction_entropy(logits)

    def step_extras(self, batch):
        """How often the soft label's top class is the true label, and the given (noisy) one."""
        top = self._soft.argmax(dim=1)
        return {"soft_agrees_true": masked_sum_count((top == batch.y_clean).float(), batch.y_clean >= 0),
                "soft_agrees_given": masked_sum_count((top == batch.y).float(), batch.y >= 0)}

    def state_dict(self):
        state = super().state_dict()
        state["encoder"] = self.encoder.state_dict() if self.encoder is not None else None
        return state

    def load_state_dict(self, state):
        super().load_state_dict(state)
        if state.get("encoder") is not None:
            self.encoder = frozen_copy(self.model).eval()
            self.encoder.load_state_dict(state["encoder"])
