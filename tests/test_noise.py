"""Noise generators: realized rates, transition-matrix support, determinism (methods.md Decisions)."""

import numpy as np
import pytest

from raymeta.data.noise import (CIFAR10_ASYMMETRIC, make_noisy_labels, realized_transition)
from raymeta.errors import ConfigError

K, N = 10, 50_000
CLEAN = np.arange(N) % K  # 5,000 per class


def noisy(noise_type, rate, seed=0, **kw):
    return make_noisy_labels(CLEAN, K, noise_type, rate, np.random.default_rng(seed), **kw)


@pytest.mark.parametrize("noise_type", ["symmetric", "flip_random", "flip_to_one", "pair"])
@pytest.mark.parametrize("rate", [0.2, 0.4, 0.8])
def test_exact_types_hit_the_requested_rate(noise_type, rate):
    result = noisy(noise_type, rate)
    assert abs(result.realized_rate - rate) < 0.01
    # exact per class: every row keeps exactly 1 - rate on its diagonal
    np.testing.assert_allclose(np.diag(result.transition), 1 - rate, atol=1e-3)


@pytest.mark.parametrize("rate", [0.2, 0.4, 0.6])
def test_uniform_includes_the_true_class(rate):
    result = noisy("uniform", rate)
    # each sample is redrawn with probability `rate` from all K classes, its own included
    assert abs(result.realized_rate - rate * (K - 1) / K) < 0.01
    expected = np.full((K, K), rate / K) + np.eye(K) * (1 - rate)
    # 5 binomial standard deviations of a class of 5,000 samples
    diag, off = np.eye(K, dtype=bool), ~np.eye(K, dtype=bool)
    sd = np.sqrt(expected * (1 - expected) / (N / K))
    assert (np.abs(result.transition - expected)[diag] < 5 * sd[diag]).all()
    assert (np.abs(result.transition - expected)[off] < 5 * sd[off]).all()


def test_symmetric_spreads_evenly_and_never_to_the_true_class():
    t = noisy("symmetric", 0.4).transition
    off = t[~np.eye(K, dtype=bool)]
    # 2,000 flips per class over 9 others: 222 or 223 each
    assert off.min() >= 222 / 5000 - 1e-9 and off.max() <= 223 / 5000 + 1e-9


def test_flip_random_spreads_over_all_other_classes():
    t = noisy("flip_random", 0.4).transition
    np.testing.assert_allclose(t[~np.eye(K, dtype=bool)], 0.4 / 9, atol=0.01)


def test_flip_to_one_has_one_target_per_class():
    t = noisy("flip_to_one", 0.3).transition
    off = t * (1 - np.eye(K))
    assert ((off > 0).sum(axis=1) == 1).all()
    np.testing.assert_allclose(off.max(axis=1), 0.3, atol=1e-3)


def test_pair_flips_to_the_next_class():
    t = noisy("pair", 0.3).transition
    expected = 0.7 * np.eye(K) + 0.3 * np.roll(np.eye(K), 1, axis=1)
    np.testing.assert_allclose(t, expected, atol=1e-3)


@pytest.mark.parametrize("rate", [0.2, 0.4])
def test_asymmetric_uses_the_cifar10_map(rate):
    result = noisy("asymmetric", rate)
    expected = np.eye(K)
    for source, target in CIFAR10_ASYMMETRIC.items():
        expected[source, source] = 1 - rate
        expected[source, target] = rate
    np.testing.assert_allclose(result.transition, expected, atol=1e-3)
    assert abs(result.realized_rate - rate * 5 / K) < 0.01  # only 5 of 10 classes can flip


def test_asymmetric_custom_mapping_and_errors():
    result = noisy("asymmetric", 0.5, mapping={0: 1})
    assert result.transition[0, 1] == pytest.approx(0.5)
    assert np.allclose(np.diag(result.transition)[1:], 1.0)
    with pytest.raises(ConfigError, match="classes must be distinct and in 0..9"):
        noisy("asymmetric", 0.5, mapping={0: 10})
    with pytest.raises(ConfigError, match="set noise.mapping"):
        make_noisy_labels(np.arange(100) % 5, 5, "asymmetric", 0.2, np.random.default_rng(0))


def test_feature_dependent_flips_the_least_confident_samples():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(K), size=N)
    probs[np.arange(N), CLEAN] += 1.0  # the model is right on every sample ...
    probs /= probs.sum(1, keepdims=True)
    result = noisy("feature_dependent", 0.3, probs=probs)
    assert result.realized_rate == pytest.approx(0.3, abs=1e-4)
    flipped = result.labels != CLEAN
    second = np.argsort(-probs, axis=1, kind="stable")[:, 1]
    # ... so every flip goes to the second most likely class,
    assert (result.labels[flipped] == second[flipped]).all()
    # and the flipped samples are the ones whose second class is most likely
    p2 = probs[np.arange(N), second]
    assert p2[flipped].min() >= p2[~flipped].max()


def test_feature_dependent_takes_confident_mistakes_first():
    probs = np.full((N, K), 0.01)
    wrong_class = (CLEAN + 1) % K
    probs[np.arange(N), wrong_class] = np.linspace(0.2, 0.9, N)  # the model is wrong everywhere
    result = noisy("feature_dependent", 0.1, probs=probs)
    flipped = np.flatnonzero(result.labels != CLEAN)
    assert len(flipped) == N // 10
    assert flipped.min() == N - N // 10  # the most confident mistakes
    assert (result.labels[flipped] == wrong_class[flipped]).all()


@pytest.mark.parametrize("noise_type", ["uniform", "symmetric", "flip_random", "flip_to_one",
                                        "pair", "asymmetric"])
def test_noise_is_deterministic_by_seed(noise_type):
    first, again, other = noisy(noise_type, 0.4, 7), noisy(noise_type, 0.4, 7), noisy(noise_type, 0.4, 8)
    assert np.array_equal(first.labels, again.labels) and first.sha == again.sha
    assert not np.array_equal(first.labels, other.labels)


def test_exact_counts_round_half_up():
    # 5 samples per class at rate 0.5: 2.5 rounds up to 3 per class (not to even)
    result = make_noisy_labels(np.arange(20) % 4, 4, "symmetric", 0.5, np.random.default_rng(3))
    assert (result.labels != np.arange(20) % 4).sum() == 12


def test_none_and_zero_rate_keep_labels():
    assert np.array_equal(noisy("none", 0.0).labels, CLEAN)
    assert noisy("flip_to_one", 0.0).realized_rate == 0.0


def test_real_labels_and_unknown_clean_labels():
    clean = np.array([0, 1, 2, -1, -1])
    given = np.array([0, 2, 2, 1, 0])
    result = make_noisy_labels(clean, 3, "real", 0.0, np.random.default_rng(0), given=given)
    assert result.labels.tolist() == given.tolist()
    assert result.realized_rate == pytest.approx(1 / 3)  # measured on the known clean labels only
    with pytest.raises(ConfigError, match="noise.file"):
        make_noisy_labels(clean, 3, "real", 0.0, np.random.default_rng(0))


def test_realized_transition_formula():
    clean = np.array([0, 0, 0, 0, 1, 1])
    noisy_labels = np.array([0, 1, 1, 2, 1, 1])
    t = realized_transition(clean, noisy_labels, 3)
    np.testing.assert_allclose(t, [[0.25, 0.5, 0.25], [0, 1, 0], [0, 0, 0]])
