"""Label-noise generators (methods.md "Decisions"): pure functions of the clean labels and an
explicit NumPy generator, so a seed fixes the noise on any machine.

Semantics of `rate` per type (K classes, n_c samples of class c):
- uniform:       each sample, with probability rate, gets a label drawn uniformly from all K
                 classes, its own included (MW-Net `unif`); wrong-label rate = rate*(K-1)/K.
- symmetric:     exactly round(n_c*rate) (halves up) samples of each class get another class, spread as
                 evenly as possible over the K-1 others (MetaLabelNet); wrong rate = rate.
- flip_random:   exactly round(n_c*rate) per class, each to an independent uniform other class (MLC).
- flip_to_one:   exactly round(n_c*rate) per class, all to one seeded random other class (MLC).
- pair:          exactly round(n_c*rate) per class, to class (c+1) mod K.
- asymmetric:    exactly round(n_c*rate) of each mapped source class to its target (default the
                 CIFAR-10 map 9->1, 2->0, 4->7, 3<->5); other classes untouched.
- feature_dependent: exactly round(N*rate) samples chosen by the ranking of MetaLabelNet/MSLG
                 on a clean-trained model's softmax; flipped to its top (or second) class.
- real:          labels given (a label file, or the dataset's own noisy labels).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from raymeta import plugins
from raymeta.config import NOISE_TYPES
from raymeta.errors import ConfigError

CIFAR10_ASYMMETRIC = {9: 1, 2: 0, 4: 7, 3: 5, 5: 3}
"""truck->automobile, bird->airplane, deer->horse, cat<->dog"""


@dataclass(frozen=True)
class NoisyLabels:
    labels: np.ndarray
    """the noisy labels (int64)"""
    transition: np.ndarray
    """realized K x K matrix: row i is the distribution of noisy labels over samples of clean class i"""
    realized_rate: float
    """share of samples (with a known clean label) whose noisy label differs from the clean one"""

    @property
    def sha(self) -> str:
        return hashlib.sha256(np.ascontiguousarray(self.labels, dtype=np.int64)).hexdigest()[:16]


def make_noisy_labels(clean: np.ndarray, num_classes: int, noise_type: str, rate: float,
                      rng: np.random.Generator, *, given: np.ndarray | None = None,
                      probs: np.ndarray | None = None,
                      mapping: dict[int, int] | None = None,
                      options: dict | None = None) -> NoisyLabels:
    """Corrupt `clean` labels; see the module docstring for what `rate` means per type.

    Args:
        clean: clean labels, int, shape (N,); -1 marks an unknown clean label (real noise only).
        noise_type: a built-in type, or a plugin noise model's name (raymeta.plugins).
        rng: the only source of randomness.
        given: real: the noisy labels to use.
        probs: feature_dependent: (N, K) softmax of a model trained on clean data.
        mapping: asymmetric: source class -> target class.
        options: a plugin noise model's options.
    """
    clean = np.asarray(clean, dtype=np.int64)
    if noise_type not in NOISE_TYPES:
        noisy = _plugin_noise(noise_type, clean, num_classes, rate, rng, options or {})
    elif noise_type == "real":
        if given is None:
            raise ConfigError("noise.type real needs labels: set noise.file (or use a dataset "
                              "that ships noisy labels, like clothing1m)")
        noisy = np.asarray(given, dtype=np.int64).copy()
    elif noise_type == "none" or rate == 0.0:
        noisy = clean.copy()
    elif noise_type == "uniform":
        noisy = clean.copy()
        hit = rng.random(len(clean)) < rate
        noisy[hit] = rng.integers(0, num_classes, size=int(hit.sum()))
    elif noise_type == "feature_dependent":
        if probs is None:
            raise ConfigError("noise.type feature_dependent needs class probabilities")
        noisy = _feature_dependent(clean, probs, rate, rng)
    else:
        noisy = _per_class(clean, num_classes, noise_type, rate, rng, mapping)
    return NoisyLabels(noisy, realized_transition(clean, noisy, num_classes),
                       _wrong_rate(clean, noisy))


def _plugin_noise(name: str, clean, num_classes, rate, rng, options) -> np.ndarray:
    function = plugins.load_noise(name)
    if function is None:
        raise ConfigError(f"unknown noise type '{name}'")
    noisy = np.asarray(function(clean.copy(), num_classes, rate, rng, **options))
    if noisy.shape != clean.shape or not np.issubdtype(noisy.dtype, np.integer) \
            or (len(noisy) and (noisy.min() < 0 or noisy.max() >= num_classes)):
        raise ConfigError(f"noise model '{name}' returned labels of shape {noisy.shape} and "
                          f"dtype {noisy.dtype}; it must return integer labels in "
                          f"0..{num_classes - 1}, one per clean label (shape {clean.shape})")
    return noisy.astype(np.int64)


def exact_count(n: int, rate: float) -> int:
    """round(n * rate), halves rounded up (Python's round() would round 2.5 to 2)."""
    return int(np.floor(n * rate + 0.5))


def _per_class(clean, num_classes, noise_type, rate, rng, mapping) -> np.ndarray:
    """The exact-count types: corrupt round(n_c * rate) samples of each (source) class c."""
    classes = np.arange(num_classes)
    # drawn up front for every class, so the targets do not depend on class sizes
    one_target = np.array([rng.choice(classes[classes != c]) for c in classes])
    if noise_type == "asymmetric":
        mapping = CIFAR10_ASYMMETRIC if mapping is None else mapping
        if mapping is CIFAR10_ASYMMETRIC and num_classes != 10:
            raise ConfigError(f"noise.type asymmetric defaults to the CIFAR-10 class map, but this "
                              f"dataset has {num_classes} classes; set noise.mapping "
                              f"(source class: target class)")
        bad = [k for kv in mapping.items() for k in kv if not 0 <= k < num_classes]
        if bad or any(s == t for s, t in mapping.items()):
            raise ConfigError(f"noise.mapping {mapping}: classes must be distinct and in "
                              f"0..{num_classes - 1}")
    noisy = clean.copy()
    for c in classes:
        if noise_type == "asymmetric" and c not in mapping:
            continue
        members = np.flatnonzero(clean == c)
        chosen = rng.permutation(members)[: exact_count(len(members), rate)]
        others = classes[classes != c]
        if noise_type == "symmetric":  # as even as possible over the other classes
            counts = np.full(len(others), len(chosen) // len(others))
            counts[rng.permutation(len(others))[: len(chosen) % len(others)]] += 1
            noisy[chosen] = rng.permutation(np.repeat(others, counts))
        elif noise_type == "flip_random":
            noisy[chosen] = others[rng.integers(0, len(others), size=len(chosen))]
        elif noise_type == "flip_to_one":
            noisy[chosen] = one_target[c]
        elif noise_type == "pair":
            noisy[chosen] = (c + 1) % num_classes
        elif noise_type == "asymmetric":
            noisy[chosen] = mapping[c]
        else:
            raise ConfigError(f"unknown noise type '{noise_type}'")
    return noisy


def _feature_dependent(clean, probs, rate, rng) -> np.ndarray:
    """MetaLabelNet/MSLG ranking: flip the samples closest to a decision boundary."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.shape != (len(clean), probs.shape[1] if probs.ndim == 2 else -1):
        raise ConfigError(f"feature_dependent probabilities have shape {probs.shape}; expected "
                          f"({len(clean)}, num_classes)")
    n_noisy = exact_count(len(clean), rate)
    order = np.argsort(-probs, axis=1, kind="stable")
    top1, top2 = order[:, 0], order[:, 1]
    noisy = clean.copy()
    wrong = np.flatnonzero(top1 != clean)
    if len(wrong) >= n_noisy:  # the model's most confident mistakes become the noisy labels
        pick = wrong[np.argsort(-probs[wrong, top1[wrong]], kind="stable")[:n_noisy]]
        noisy[pick] = top1[pick]
        return noisy
    noisy[wrong] = top1[wrong]
    right = np.flatnonzero(top1 == clean)
    pick = right[np.argsort(-probs[right, top2[right]], kind="stable")[: n_noisy - len(wrong)]]
    noisy[pick] = top2[pick]
    zero = pick[probs[pick, top2[pick]] == 0.0]  # no second opinion: any other class
    num_classes = probs.shape[1]
    noisy[zero] = (clean[zero] + rng.integers(1, num_classes, size=len(zero))) % num_classes
    return noisy


def realized_transition(clean: np.ndarray, noisy: np.ndarray, num_classes: int) -> np.ndarray:
    """Row-stochastic K x K matrix of p(noisy = j | clean = i) measured on the data."""
    known = clean >= 0
    counts = np.zeros((num_classes, num_classes))
    np.add.at(counts, (clean[known], noisy[known]), 1.0)
    totals = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)


def _wrong_rate(clean: np.ndarray, noisy: np.ndarray) -> float:
    known = clean >= 0
    return float(np.mean(noisy[known] != clean[known])) if known.any() else float("nan")


def clean_model_probs(x: np.ndarray, y: np.ndarray, num_classes: int, seed: int) -> np.ndarray:
    """Out-of-fold softmax of a logistic regression trained on the clean data (2 folds, PCA-64
    features): the default "model trained on clean data" for feature_dependent noise."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    flat = x.reshape(len(x), -1).astype(np.float32)
    probs = np.zeros((len(x), num_classes))
    folds = StratifiedKFold(n_splits=2, shuffle=True, random_state=seed)
    for fit_idx, pred_idx in folds.split(flat, y):
        model = make_pipeline(
            StandardScaler(),
            PCA(n_components=min(64, flat.shape[1], len(fit_idx) - 1), random_state=seed),
            LogisticRegression(max_iter=500))
        model.fit(flat[fit_idx], y[fit_idx])
        probs[np.ix_(pred_idx, model.classes_)] = model.predict_proba(flat[pred_idx])
    return probs
