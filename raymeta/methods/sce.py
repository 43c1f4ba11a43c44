"""Symmetric Cross Entropy: cross-entropy plus reverse cross-entropy.

Wang, Ma, Chen, Luo, Yi, Bailey. "Symmetric Cross Entropy for Robust Learning with Noisy
Labels." ICCV 2019 (arXiv:1908.06112).

Loss = alpha CE(y, p) + beta RCE(y, p), with the reverse cross-entropy
RCE = -sum_k p_k log y_k of the prediction p against the one-hot label, whose log 0 is taken as
a constant A < 0: RCE = -A (1 - p_y), a bounded (MAE-like) term that is robust to noisy labels,
while the CE term keeps the model learning the hard classes.

Paper and code: the paper sets A = -4 (`log_zero: -4`, the default). The official code (Keras,
YisenWang/symmetric_cross_entropy_for_noisy_labels, and its PyTorch reproduction
HanxunH/SCELoss-Reproduce) clips the one-hot label at 1e-4, so its A = ln 1e-4 = -9.21: its
reverse term is 2.3 times the paper's (`log_zero: -9.2103` reproduces it). The code also
clips p at 1e-7 inside the logs (no gradient from a CE term above 16.1); raymeta computes CE
from log-softmax, unclipped.
"""

from __future__ import annotations

from raymeta.methods.base import Method, label_log_prob, per_sample_ce
from raymeta.parallel import batch_mean


class SCE(Method):
    name = "sce"
    packable = True

    def train_loss(self, logits, batch):
        p_y = label_log_prob(logits, batch.y).exp()
        reverse_ce = -self.cfg.log_zero * (1 - p_y)
        loss = self.cfg.alpha * per_sample_ce(logits, batch.y) + self.cfg.beta * reverse_ce
        return batch_mean(loss, batch.y >= 0)
