"""Generalized Cross Entropy: the Lq loss, and the truncated Lq loss with pruning.

Zhang, Sabuncu. "Generalized Cross Entropy Loss for Training Deep Neural Networks with Noisy
Labels." NeurIPS 2018 (arXiv:1805.07836).

L_q(p_y) = (1 - p_y^q) / q is cross-entropy as q -> 0 and MAE at q = 1: its gradient is
cross-entropy's weighted by p_y^q, so samples the model disagrees with (often the mislabelled
ones) pull less. The truncated loss caps L_q at L_q(k) and is minimised alternately over the
model and per-sample weights w_i in {0, 1}: at each pruning, w_i = [p_y(x_i) > k] for every
training sample with the current model; between prunings the loss of sample i is
w_i (L_q(p_y) - L_q(k)) (all w_i = 1 before the first pruning).

Paper and code: the paper prunes with the model of the best epoch on a validation set, the
widely used reimplementation (AlanChou/Truncated-Loss) with the best test epoch's model; here
the current model prunes (a baseline sees no clean data). The paper sums the loss over the
samples, the reimplementation averages it over the batch, pruned samples counted; so does
raymeta. The reimplementation's `--start_prune 40` prunes after 39 epochs, every 10:
`prune_start: 38`.
"""

from __future__ import annotations

import torch

from raymeta.methods.base import Method, label_log_prob, predict_split
from raymeta.parallel import batch_mean


class GCE(Method):
    name = "gce"
    packable = True
    examples = ({"prune_start": 0, "prune_every": 2},)  # prunes after epochs 0 and 2

    def __init__(self, cfg, num_classes, model):
        super().__init__(cfg, num_classes, model)
        self.model = model  # the pruning passes predict with it
        self.kept: torch.Tensor | None = None
        """per training sample (its position in the train split), whether its weight is 1;
        None before the first pruning (every sample is kept)"""

    def lq(self, p_y_power_q: torch.Tensor | float) -> torch.Tensor | float:
        """L_q from p_y^q."""
        return (1 - p_y_power_q) / self.cfg.q

    def on_epoch_start(self, epoch, engine):
        super().on_epoch_start(epoch, engine)
        cfg = self.cfg
        since = epoch - 1 - cfg.prune_start  # a pruning epoch prunes at its end
        if cfg.truncate_k and since >= 0 and since % cfg.prune_every == 0:
            train = self.splits["train"]
            probs = predict_split(self.model, train, self.num_classes)
            p_y = probs.gather(1, train.y.clamp_min(0)[:, None])[:, 0]
            self.kept = (p_y > cfg.truncate_k) & (train.y >= 0)

    def train_loss(self, logits, batch):
        labeled = batch.y >= 0
        loss = self.lq(torch.exp(self.cfg.q * label_log_prob(logits, batch.y)))
        if self.cfg.truncate_k:
            loss = loss - self.lq(self.cfg.truncate_k ** self.cfg.q)
            if self.kept is not None:
                loss = loss * self.kept[batch.index]
        return batch_mean(loss, labeled)

    def epoch_metrics(self, data):
        """The share of clean- and of noisy-labelled training samples kept this epoch."""
        if not self.cfg.truncate_k:
            return {}
        train = self.splits["train"]
        kept = self.kept if self.kept is not None else train.y >= 0
        known = (train.y >= 0) & (train.y_clean >= 0)
        clean = known & (train.y == train.y_clean)
        return {f"kept_{name}": kept[mask].double().mean().item() if mask.any() else float("nan")
                for name, mask in (("clean", clean), ("noisy", known & ~clean))}

    def state_dict(self):
        return {"kept": self.kept}

    def load_state_dict(self, state):
        self.kept = state["kept"]
