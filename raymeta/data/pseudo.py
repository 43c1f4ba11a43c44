"""Pseudo-clean meta sets: no clean labels, only the losses the model has on its training data.

Networks fit clean labels before they memorise noisy ones, so after a warm-up the per-sample
losses form two modes. A two-component Gaussian mixture on the losses (min-max normalised to
[0, 1]) gives each sample the posterior of the low-loss component; the samples above a
threshold are the epoch's meta set, with their given labels (FaMUS supplement section E, after
DivideMix). Settings as in the FaMUS code: max_iter 10, tol 1e-2, reg_covar 5e-4.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from sklearn.mixture import GaussianMixture

from raymeta.config import PseudoMetaConfig
from raymeta.data.bundle import seeded_rng
from raymeta.parallel import all_reduce_sum_


def clean_posterior(losses: np.ndarray, seed: int) -> np.ndarray:
    """Each sample's posterior probability of the lower-loss mixture component."""
    losses = np.asarray(losses, dtype=np.float64)
    span = losses.max() - losses.min()
    if len(losses) < 2 or span <= 0:  # nothing to separate: every sample looks the same
        return np.ones(len(losses))
    scaled = ((losses - losses.min()) / span).reshape(-1, 1)
    mixture = GaussianMixture(n_components=2, max_iter=10, tol=1e-2, reg_covar=5e-4,
                              random_state=seed).fit(scaled)
    return mixture.predict_proba(scaled)[:, int(np.argmin(mixture.means_.ravel()))]


def choose(posterior: np.ndarray, losses: np.ndarray,
           cfg: PseudoMetaConfig) -> tuple[np.ndarray, bool]:
    """(positions of the chosen samples, whether the fallback was used): those above the
    threshold, or, when that set is too small or too large, those above the median posterior
    (the lower-loss half where the posteriors tie)."""
    chosen = np.flatnonzero(posterior > cfg.threshold)
    if cfg.min_size <= len(chosen) <= cfg.max_fraction * len(posterior):
        return chosen, False
    chosen = np.flatnonzero(posterior > np.median(posterior))
    if len(chosen) == 0:
        chosen = np.argsort(losses, kind="stable")[: max(1, len(losses) // 2)]
    return np.sort(chosen), True


def choose_meta_set(losses: torch.Tensor, labels: torch.Tensor, settings: PseudoMetaConfig,
                    seed: int, epoch: int, rank: int) -> tuple[torch.Tensor, bool]:
    """The training positions of this epoch's pseudo-clean meta set, the same on every
    data-parallel worker, and whether the fallback chose them. `losses` (each sample's training
    loss) and `labels` (its given label; < 0 where it has none, and none to trust) are the
    whole split's, on every worker: the first worker fits the mixture, and a sum hands its
    choice to the others."""
    chosen = torch.zeros(len(losses) + 1, dtype=torch.float64, device=losses.device)
    if rank == 0:
        labeled = np.flatnonzero(labels.cpu().numpy() >= 0)
        values = losses.cpu().numpy()[labeled]
        fit_seed = int(seeded_rng(seed, "pseudo", epoch).integers(2**31))
        picked, fallback = choose(clean_posterior(values, fit_seed), values, settings)
        chosen[torch.as_tensor(labeled[picked], device=losses.device)] = 1.0
        chosen[-1] = float(fallback)
    all_reduce_sum_([chosen])
    return torch.nonzero(chosen[:-1] > 0).flatten(), bool(chosen[-1].item())


def quality(index: torch.Tensor, y: torch.Tensor, y_clean: torch.Tensor, fallback: bool) -> dict:
    """How large and how clean a chosen meta set is (`y`, `y_clean`: the training split's given
    and true labels; precision and recall are NaN without true labels). Measured, never used
    for training."""
    chosen_y, chosen_clean = y[index], y_clean[index]
    known = chosen_clean >= 0
    correct = (y == y_clean) & (y_clean >= 0)
    caught = correct[index].sum().item()
    return {"pseudo_meta_size": len(index),
            "pseudo_meta_precision": (chosen_y == chosen_clean)[known].double().mean().item(),
            "pseudo_meta_recall": caught / correct.sum().item() if correct.any() else math.nan,
            "pseudo_meta_classes": len(torch.unique(chosen_y)),
            "pseudo_meta_fallback": fallback}
