"""Pseudo-clean meta sets (meta_set.source pseudo): no clean labels; each epoch a loss mixture
chooses the meta set among the training samples."""

import math

import fixtures_formats as fx
import numpy as np
import pytest

from raymeta.config import PseudoMetaConfig, parse_experiment
from raymeta.data import pseudo
from raymeta.data.bundle import build_data
from raymeta.train import Trainer

DIGITS_40 = {"dataset": {"name": "digits"}, "model": {"name": "mlp", "options": {"hidden": [256, 256]}},
             "noise": {"type": "uniform", "rate": 0.4},
             "meta_set": {"source": "pseudo", "pseudo": {"warmup_epochs": 5}},
             "train": {"epochs": 10, "batch_size": 64, "meta_batch_size": 100},
             "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4},
             "schedule": {"name": "cosine"}}


def two_modes(clean: int, noisy: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.gamma(2.0, 0.05, clean), rng.normal(2.5, 0.4, noisy)])


def test_the_mixture_picks_the_low_loss_mode():
    losses = two_modes(300, 200)
    posterior = pseudo.clean_posterior(losses, seed=0)
    chosen, fallback = pseudo.choose(posterior, losses, PseudoMetaConfig())
    assert not fallback
    assert np.array_equal(chosen, np.arange(300))
    # the scale of the losses does not matter: they are normalised to [0, 1] first
    assert np.allclose(pseudo.clean_posterior(losses * 40 + 3, seed=0), posterior, atol=1e-6)


@pytest.mark.parametrize("settings", [{"min_size": 400},      # 300 pass the threshold: too few
                                      {"max_fraction": 0.5}],  # 300 of 500 pass: too many
                         ids=["too few", "too many"])
def test_too_small_or_too_large_sets_fall_back_to_the_median(settings):
    losses = two_modes(300, 200)
    posterior = pseudo.clean_posterior(losses, seed=0)
    chosen, fallback = pseudo.choose(posterior, losses, PseudoMetaConfig(**settings))
    assert fallback
    assert np.array_equal(chosen, np.flatnonzero(posterior > np.median(posterior)))


def test_equal_losses_give_the_lower_half():
    losses = np.full(10, 0.3)
    chosen, fallback = pseudo.choose(pseudo.clean_posterior(losses, seed=0), losses,
                                     PseudoMetaConfig(min_size=8))
    assert fallback and len(chosen) == 5


def test_pseudo_meta_set_is_clean_after_warmup_on_digits():
    """40% uniform noise: after the cross-entropy warm-up the sets the mixture picks are at least
    90% clean (the issue's criterion), every epoch records them, and no sample is set aside."""
    cfg = parse_experiment(DIGITS_40 | {"method": {"name": "mwnet", "meta_lr": 0.1}})
    result = Trainer(cfg).fit()
    curves, warmup = result.curves, cfg.meta_set.pseudo.warmup_epochs
    carved = parse_experiment({**DIGITS_40, "meta_set": {"per_class": 5}})
    full = len(build_data(carved).train) + 5 * 10
    assert result.outcome["train_size"] == full  # nothing is set aside as a meta set
    for c in curves[warmup - 1:]:  # the sets the meta method trains with
        assert c["pseudo_meta_precision"] >= 0.9, c
        assert c["pseudo_meta_classes"] == 10 and not c["pseudo_meta_fallback"]
        assert 0.5 * full < c["pseudo_meta_size"] < 0.9 * full
    assert all(c["meta_step_share"] == 0 for c in curves[:warmup])  # warm-up: plain CE
    assert all(c["meta_step_share"] > 0 for c in curves[warmup:])
    assert result.outcome["final_pseudo_meta_precision"] == curves[-1]["pseudo_meta_precision"]
    assert result.outcome["final_pseudo_meta_size"] == curves[-1]["pseudo_meta_size"]


def test_unlabeled_samples_never_join_the_pseudo_meta_set():
    cfg = parse_experiment({**DIGITS_40, "dataset": {"name": "digits", "unlabeled_fraction": 0.5},
                            "train": {**DIGITS_40["train"], "epochs": 3},
                            "meta_set": {"source": "pseudo", "pseudo": {"warmup_epochs": 2}},
                            "method": {"name": "mwnet"}})
    trainer = Trainer(cfg)
    trainer.fit()
    assert len(trainer.pseudo_index) > 64
    assert (trainer.splits["train"].y[trainer.pseudo_index] >= 0).all()
    assert (trainer.splits["meta"].y >= 0).all()


def test_real_noise_and_lazily_decoded_images(tmp_path):
    """Clothing1M's layout (images decoded per batch, no true training labels): the pseudo
    meta set is a lazy subset of the files, and its precision and recall are unknown (NaN)."""
    root = fx.write_clothing1m(tmp_path)
    cfg = parse_experiment({
        "dataset": {"name": "clothing1m", "root": str(root), "image_size": 16},
        "noise": {"type": "real"}, "model": {"name": "lenet"}, "method": {"name": "mwnet"},
        "meta_set": {"source": "pseudo", "pseudo": {"warmup_epochs": 1, "min_size": 2}},
        "train": {"epochs": 2, "batch_size": 4, "meta_batch_size": 4}})
    trainer = Trainer(cfg)
    last = trainer.fit().curves[-1]
    meta = trainer.splits["meta"]
    assert meta.lazy and len(meta) == last["pseudo_meta_size"] >= 2
    assert list(meta.files.paths) == list(trainer.splits["train"].files.paths[trainer.pseudo_index])
    assert math.isnan(last["pseudo_meta_precision"]) and math.isnan(last["pseudo_meta_recall"])

