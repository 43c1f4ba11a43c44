"""Pseudo-clean meta sets: no clean labels, only the losses the model has on its training data.

Networks fit clean labels before they memorise noisy ones, so after a warm-up the per-sample
losses form two modes. A two-component Gaussian mixture on the losses (min-max normalised to
[0, 1]) gives each sample the posterior of the low-loss component; the samples above a
threshold are the epoch's meta set, with their given labels (FaMUS supplement section E, after
DivideMix). Settings as in the FaMUS code: max_iter 10, tol 1e-2, reg_covar 5e-4.
"""

from __future__ import annotations

import numpy as np
from sklearn.mixture import GaussianMixture

from raymeta.config import PseudoMetaConfig


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
