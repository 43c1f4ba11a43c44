"""What each meta-model learns on noisy digits (a few epochs, a small MLP)."""

import numpy as np
import pytest
import torch

from raymeta.config import parse_experiment
from raymeta.train import Trainer


def trainer(method, noise_type, rate=0.4, epochs=10, **train) -> Trainer:
    return Trainer(parse_experiment({
        "dataset": {"name": "digits"}, "model": {"name": "mlp", "options": {"hidden": [128]}},
        "train": {"epochs": epochs, "batch_size": 64, **train},
        "optimizer": {"lr": 0.1, "weight_decay": 1e-4},
        "noise": {"type": noise_type, "rate": rate}, "method": method, "seed": 0}))


def train(method, noise_type, rate=0.4, epochs=10, **train):
    return trainer(method, noise_type, rate, epochs, **train).fit()


def mean_over_epochs(result, key):
    return float(np.mean([c[key] for c in result.curves]))


@pytest.mark.parametrize("method", [{"name": "mwnet", "meta_lr": 0.01}, {"name": "l2r"}],
                         ids=["mwnet", "l2r"])
def test_weighting_methods_weigh_clean_samples_higher(method):
    result = train(method, "uniform")
    clean, noisy = (mean_over_epochs(result, f"train_weight_{k}") for k in ("clean", "noisy"))
    assert clean > 2 * noisy, (clean, noisy)
    if method["name"] == "mwnet":  # its weighting function, recorded: it falls with the loss
        curve = result.curves[-1]["weight_at_loss"]
        assert len(curve) == 11 and all(0 < w < 1 for w in curve) and curve[0] > curve[-1], curve


def test_mlc_finds_the_flip_targets():
    result = train({"name": "mlc"}, "flip_to_one")
    assert result.curves[-1]["T_target_agreement"] >= 0.8
    T = np.array(result.curves[-1]["T"]).reshape(10, 10)
    assert np.allclose(T.sum(axis=0), 1.0, atol=1e-5) and (T >= 0).all()  # the projection holds


def test_mlc_warm_up_trains_plain_ce_with_t_at_the_identity_then_learns_t():
    result = train({"name": "mlc", "warmup_epochs": 2}, "flip_to_one", epochs=4)
    for curve in result.curves[:2]:  # warm-up: T untouched, no meta step timed
        assert np.array_equal(np.array(curve["T"]).reshape(10, 10), np.eye(10))
        assert curve["meta_step_share"] == 0
    assert not np.allclose(np.array(result.curves[-1]["T"]).reshape(10, 10), np.eye(10))
    assert result.curves[-1]["meta_step_share"] > 0


def test_mlc_meta_grad_clip_keeps_one_spike_from_throwing_t_off_its_diagonal():
    """A training label that the corrected model finds nearly impossible gives T a meta gradient
    of 1e4 and more (1/(pT)_y); unclipped, one such step moves a column's mass off the diagonal."""
    spike = torch.zeros(10, 10)
    spike[3, 7] = -1e4  # more of clean class 3 read as label 7

    def T_after(clip):
        mlc = trainer({"name": "mlc", "meta_lr": 0.01, "meta_grad_clip": clip}, "uniform").method
        mlc.apply_meta_gradient([spike])
        T = mlc.meta_model.T.detach()
        assert torch.allclose(T.sum(dim=0), torch.ones(10)) and (T >= 0).all()
        return T

    assert T_after(None)[7, 7] < 0.01  # 1 / (1 + 0.01 * 1e4)
    assert T_after(1.0)[7, 7] > 0.99  # 1 / (1 + 0.01 * 1)


def test_metalabelnet_soft_labels_recover_true_labels():
    result = train({"name": "metalabelnet", "warmup_epochs": 4}, "flip_to_one")
    after = [c for c in result.curves if c["epoch"] >= 4]
    agree_true = np.mean([c["train_soft_agrees_true"] for c in after])
    agree_given = np.mean([c["train_soft_agrees_given"] for c in after])
    assert agree_true > agree_given, (agree_true, agree_given)
    assert "train_soft_agrees_true" not in result.curves[0]  # warm-up epochs are plain CE


def test_metalabelnet_trains_on_unlabeled_samples():
    cfg = parse_experiment({
        "dataset": {"name": "digits", "unlabeled_fraction": 0.5},
        "model": {"name": "mlp", "options": {"hidden": [64]}}, "train": {"epochs": 4},
        "method": {"name": "metalabelnet", "warmup_epochs": 2}, "seed": 0})
    trainer = Trainer(cfg)
    assert (trainer.data.train.y == -1).mean() == pytest.approx(0.5, abs=0.01)
    result = trainer.fit()
    assert result.outcome["final_test_acc"] > 0.5


def test_mlnt_runs_its_consistency_phase_and_reports_its_teacher():
    mlnt = trainer({"name": "mlnt", "start_epoch": 1, "ramp_epochs": 1, "num_fast": 2}, "uniform",
                   epochs=3)
    result = mlnt.fit()
    assert "train_consistency" not in result.curves[0] and "teacher_test_acc" not in result.curves[0]
    assert result.curves[-1]["train_consistency"] > 0
    assert result.outcome["meta_step_share"] > 0
    # the reported teacher accuracy is the teacher's: evaluate the teacher as the model
    last = result.curves[-1]
    assert last["teacher_test_acc"] != last["test_acc"]
    mlnt.model.load_state_dict(mlnt.method.teacher.state_dict())
    teacher = mlnt.evaluate()
    assert teacher["test_acc"] == pytest.approx(last["teacher_test_acc"], abs=1e-9)
    assert teacher["meta_acc"] == pytest.approx(last["teacher_meta_acc"], abs=1e-9)
