"""Two-stage loss corrections: train cross-entropy, estimate the noise matrix, train corrected.

Forward: Patrini, Rozza, Menon, Nock, Qu. "Making Deep Neural Networks Robust to Label Noise:
a Loss Correction Approach." CVPR 2017.
GLC: Hendrycks, Mazeika, Wilson, Gimpel. "Using Trusted Data to Train Deep Networks on Labels
Corrupted by Severe Noise." NeurIPS 2018.

Both train plain cross-entropy on the noisy labels for `estimate_epoch` epochs, then estimate
a K x K matrix T (row i = true class i, T[i, j] = p(noisy j | true i)) from that model, put the
model back to its initial weights with a fresh optimizer state (`retrain`, as both official
codes do), and train on the forward-corrected loss -log((softmax(logits) @ T)[y]) until
train.epochs: the model learns p(true | x), T carries it to the noisy labels. train.epochs
counts both stages, and the learning-rate schedule runs over all of them (the official codes
restart it for the second run; with a constant schedule and estimate_epoch = train.epochs / 2
the two agree).
- Forward estimates T from anchor points on the noisy training data: for each class i, the
  sample at the `anchor_percentile` percentile of p(i | x) (the official NoiseEstimator:
  values at or above the 97th percentile, numpy's "higher" interpolation, are dropped and the
  arg max of the rest is taken; 100 is the plain arg max of the paper's Eq. 9); row i is its
  prediction p(. | x_i), row-normalised. `oracle_t` uses the realized noise matrix instead.
- GLC estimates C_hat[i] = mean of p(. | x) over the trusted (clean meta) samples of class i.
  The second stage adds plain cross-entropy on a trusted batch each step. The official code
  draws trusted and noisy samples in one shuffled batch and averages both losses over it, so
  each side weighs its share of the data; raymeta draws them separately (the noisy batch and a
  meta batch) and weighs the two means by those shares, rho = |meta| / (|meta| + |labeled
  train|): loss = (1 - rho) * corrected + rho * trusted CE, the official step's expectation.
  A class without trusted samples gets an identity row (no correction; the official code
  would make it NaN).

Where raymeta differs from the official code, with no switch: the anchors are read from a copy
of each column (Patrini's and Hendrycks' loops zero the top 3% of each column in place, which
also changes the entries later rows read); the first stage ends at `estimate_epoch` rather
than at the checkpoint of best validation loss (Patrini); GLC's CIFAR code reloads the initial
weights but keeps the optimizer's momentum, its MNIST code draws new random weights with a
fresh Adam: raymeta reloads the initial weights and clears the optimizer state in both.
"""

from __future__ import annotations

import numpy as np
import torch

from raymeta.data.noise import realized_transition
from raymeta.errors import ConfigError
from raymeta.methods.base import (
    Method,
    StepOutput,
    mean_ce,
    predict_split,
    scalar_sum_count,
)
from raymeta.methods.mlc import Transition, corrected_ce, transition_metrics
from raymeta.parallel import batch_mean


def anchor_transition(probs: np.ndarray, percentile: float) -> np.ndarray:
    """T from anchor points (Patrini et al.'s NoiseEstimator): row i is the prediction on the
    sample whose p(i | x) is the largest below the `percentile` percentile of that column
    (100: the largest), row-normalised."""
    k = probs.shape[1]
    T = np.empty((k, k))
    for i in range(k):
        column = probs[:, i].copy()
        if percentile < 100:
            column[column >= np.percentile(column, percentile, method="higher")] = 0.0
        T[i] = probs[np.argmax(column)]
    return T / T.sum(axis=1, keepdims=True)


def class_mean_transition(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """C_hat (GLC): row i is the mean prediction over the samples labelled i; the identity row
    for a class without samples."""
    k = probs.shape[1]
    sums = np.zeros((k, k))
    np.add.at(sums, labels, probs)
    counts = np.bincount(labels, minlength=k)[:, None]
    return np.where(counts > 0, sums / np.maximum(counts, 1), np.eye(k))


class _Correction(Method):
    """Cross-entropy, then at `estimate_epoch` estimate T (`estimate`), optionally restart from
    the initial weights, then the forward-corrected loss."""

    def __init__(self, cfg, num_classes, model):
        super().__init__(cfg, num_classes, model)
        self.model = model
        self.meta_model = Transition(num_classes)  # T; identity until estimated
        self.meta_model.T.requires_grad_(False)
        self.estimated = False
        self.initial = ({k: v.detach().clone() for k, v in model.state_dict().items()}
                        if cfg.retrain else None)
        """the model's initial state (the trainer seeds the model just before the method);
        dropped once the model has been reset to it"""

    @property
    def T(self) -> torch.Tensor:
        return self.meta_model.T

    def estimate(self) -> np.ndarray:
        """T (K x K, rows = true classes) from the cross-entropy model."""
        raise NotImplementedError

    def on_epoch_start(self, epoch, engine):
        super().on_epoch_start(epoch, engine)
        if self.estimated or epoch < self.cfg.estimate_epoch:
            return
        with torch.no_grad():
            self.T.copy_(torch.as_tensor(self.estimate()))
        self.estimated = True
        if self.initial is not None:
            self.model.load_state_dict(self.initial)
            engine.optimizer.state.clear()
            self.initial = None

    def corrected_loss(self, logits, batch) -> torch.Tensor:
        return batch_mean(corrected_ce(logits, batch.y, self.T), batch.y >= 0)

    def train_loss(self, logits, batch):
        return self.corrected_loss(logits, batch) if self.estimated else mean_ce(logits, batch.y)

    def epoch_metrics(self, data):
        return transition_metrics(self.T, data.noise.transition)

    def state_dict(self):
        return {**super().state_dict(), "estimated": self.estimated, "initial": self.initial}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.estimated, self.initial = state["estimated"], state["initial"]


class Forward(_Correction):
    name = "forward"
    examples = ({"estimate_epoch": 1},)

    def on_epoch_start(self, epoch, engine):
        if self.cfg.oracle_t and epoch == 0:
            self.realized_transition()  # refuse at once, not after the first stage
        super().on_epoch_start(epoch, engine)

    def realized_transition(self) -> np.ndarray:
        """The noise matrix realized on the training split (needs every true label)."""
        train = self.splits["train"]
        labeled = train.y >= 0
        if (train.y_clean[labeled] < 0).any():
            raise ConfigError("method.oracle_t needs the true label of every training sample, "
                              "known only for synthetic noise; these labels (noise.type real) "
                              "have unknown true labels: set method.oracle_t false")
        return realized_transition(train.y_clean[labeled].cpu().numpy(),
                                   train.y[labeled].cpu().numpy(), self.num_classes)

    def estimate(self):
        if self.cfg.oracle_t:
            return self.realized_transition()
        train = self.splits["train"]
        probs = predict_split(self.model, train, self.num_classes)[train.y >= 0]
        return anchor_transition(probs.cpu().numpy(), self.cfg.anchor_percentile)


class GLC(_Correction):
    name = "glc"
    examples = ({"estimate_epoch": 3},)  # estimated after a resume from epoch 2
    uses_meta_batch = True

    def on_epoch_start(self, epoch, engine):
        super().on_epoch_start(epoch, engine)
        trusted = len(self.splits["meta"])  # (a pseudo meta set changes size each epoch)
        noisy = int((self.splits["train"].y >= 0).sum())
        self.trusted_share = trusted / max(trusted + noisy, 1)

    def estimate(self):
        meta = self.splits["meta"]
        probs = predict_split(self.model, meta, self.num_classes)
        return class_mean_transition(probs.cpu().numpy(), meta.y.cpu().numpy())

    def step(self, engine, batch, meta_batch):
        if not self.estimated:  # stage 1: cross-entropy on the noisy data only, as the code
            return super().step(engine, batch, meta_batch)
        logits = engine.plain_forward(batch.x)
        trusted = meta_batch()
        corrected = self.corrected_loss(logits, batch)
        trusted_ce = mean_ce(engine.plain_forward(trusted.x), trusted.y)
        loss = (1 - self.trusted_share) * corrected + self.trusted_share * trusted_ce
        engine.actual_step(loss)
        return StepOutput(loss.detach(), logits.detach(),
                          {"corrected_loss": scalar_sum_count(corrected),
                           "trusted_loss": scalar_sum_count(trusted_ce)})
