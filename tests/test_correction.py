"""Forward and GLC: the corrected loss, the two estimates of T, the restart, and that the
correction beats cross-entropy under class-conditional noise (digits, a small MLP)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_experiment

from raymeta.config import parse_experiment
from raymeta.data.loader import Batch
from raymeta.errors import ConfigError
from raymeta.methods.base import predict_split
from raymeta.methods.correction import anchor_transition, class_mean_transition
from raymeta.results import query
from raymeta.results.store import write_trial
from raymeta.train import Trainer


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and are not slowed down by a busy second core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def trainer(method, **sections):
    return Trainer(parse_experiment(tiny_experiment(
        method=method, noise={"type": "flip_to_one", "rate": 0.4}, **sections)))


def train_epochs(t: Trainer, epochs: int) -> None:
    for _ in range(epochs):
        t.train_epoch()
        t.epoch += 1


def test_corrected_loss_is_the_log_of_the_noisy_class_probability():
    t = trainer({"name": "forward", "estimate_epoch": 1})
    method = t.method
    with torch.no_grad():
        method.T.copy_(torch.eye(10))
        method.T[:2, :2] = torch.tensor([[0.8, 0.2], [0.3, 0.7]])
    method.estimated = True
    # softmax [0.25, 0.75] -> @ T = [0.425, 0.575]; [0.8, 0.2] -> [0.70, 0.30]; the last sample
    # is unlabeled and counts for nothing
    logits = torch.full((3, 10), -torch.inf)
    logits[0, :2] = torch.tensor([0.0, math.log(3.0)])
    logits[1, :2] = torch.tensor([math.log(4.0), 0.0])
    logits[2, :2] = 0.0
    y = torch.tensor([0, 1, -1])
    loss = method.train_loss(logits, Batch(logits, y, y, torch.arange(3)))
    assert loss.item() == pytest.approx((-math.log(0.425) - math.log(0.30)) / 2, rel=1e-6)


def test_anchor_points_give_the_rows_of_t():
    """Per class, the 3 samples at the top of p(i | x) (at or above the 97th percentile of 100)
    are outliers; the next one is the anchor and its prediction is row i."""
    rng = np.random.default_rng(0)
    k, n = 3, 100
    true_T = np.array([[0.6, 0.4, 0.0], [0.1, 0.7, 0.2], [0.0, 0.3, 0.7]])
    probs = 0.25 + 0.25 * rng.dirichlet(np.ones(k), size=n)  # ordinary: every p(i | x) < 0.5
    outlier = np.full(k, 0.005)
    for i in range(k):
        probs[10 * i] = true_T[i]  # the anchor of class i: p(i | x) >= 0.6
        probs[10 * i + 1: 10 * i + 4] = np.where(np.arange(k) == i, 0.99, outlier)
    np.testing.assert_allclose(anchor_transition(probs, 97.0), true_T, atol=1e-12)
    argmax_rows = anchor_transition(probs, 100.0)  # the paper's arg max takes the outliers
    np.testing.assert_allclose(np.diag(argmax_rows), 0.99)


def test_anchors_are_chosen_among_labeled_samples_only():
    t = trainer({"name": "forward", "estimate_epoch": 1}, train={"epochs": 2},
                dataset={"unlabeled_fraction": 0.5})
    train_epochs(t, 1)
    probs = predict_split(t.model, t.splits["train"], 10).numpy()
    labeled = t.splits["train"].y.numpy() >= 0
    t.method.on_epoch_start(1, t.engine)
    T = t.method.T.double().numpy()
    np.testing.assert_allclose(T, anchor_transition(probs[labeled], 97.0), atol=1e-6)
    assert np.abs(T - anchor_transition(probs, 97.0)).max() > 1e-3


def test_glc_matrix_is_the_class_mean_of_predictions_on_the_trusted_set():
    t = trainer({"name": "glc", "estimate_epoch": 1}, train={"epochs": 2})
    train_epochs(t, 1)
    meta = t.splits["meta"]
    t.model.eval()
    with torch.no_grad():
        probs = F.softmax(t.model(meta.batch(torch.arange(len(meta))).x), dim=1).double()
    expected = torch.stack([probs[meta.y == c].mean(dim=0) for c in range(10)])
    t.model.train()
    t.method.on_epoch_start(1, t.engine)
    torch.testing.assert_close(t.method.T.double(), expected, rtol=0, atol=1e-6)
    # a class without trusted samples is left uncorrected (identity row)
    C = class_mean_transition(np.array([[0.9, 0.1, 0.0], [0.7, 0.3, 0.0]]), np.array([0, 0]))
    np.testing.assert_allclose(C, [[0.8, 0.2, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])


@pytest.mark.parametrize("retrain", [True, False])
def test_estimation_restarts_from_the_initial_weights(retrain):
    t = trainer({"name": "forward", "estimate_epoch": 1, "retrain": retrain},
                train={"epochs": 2}, optimizer={"momentum": 0.9})
    initial = {k: v.clone() for k, v in t.model.state_dict().items()}
    train_epochs(t, 1)
    trained = {k: v.clone() for k, v in t.model.state_dict().items()}
    assert not torch.equal(trained["classifier.weight"], initial["classifier.weight"])
    assert t.optimizer.state  # momentum buffers
    t.method.on_epoch_start(1, t.engine)
    assert not torch.equal(t.method.T, torch.eye(10))  # estimated from the trained model
    after = t.model.state_dict()
    expected = initial if retrain else trained
    assert all(torch.equal(after[k], expected[k]) for k in after)
    assert bool(t.optimizer.state) is not retrain
    assert t.method.initial is None  # the copy is dropped once used


def test_corrections_beat_ce_under_flip_noise(seed=0):
    """40% flip_to_one on digits, 20 epochs (the estimate after 10): measured on seeds 0-5,
    CE 0.61-0.68, Forward +0.10 to +0.29, GLC +0.28 to +0.35 over CE on the same seed."""
    def run(method):
        cfg = parse_experiment({
            "dataset": {"name": "digits"}, "model": {"name": "mlp", "options": {"hidden": [128]}},
            "train": {"epochs": 20, "batch_size": 64}, "optimizer": {"lr": 0.1, "weight_decay": 1e-4},
            "noise": {"type": "flip_to_one", "rate": 0.4}, "method": method, "seed": seed})
        return Trainer(cfg).fit()

    ce = run({"name": "ce"}).outcome["final_test_acc"]
    forward, glc = (run({"name": name, "estimate_epoch": 10}) for name in ("forward", "glc"))
    accs = {m: r.outcome["final_test_acc"] for m, r in (("forward", forward), ("glc", glc))}
    assert accs["forward"] > ce + 0.05 and accs["glc"] > ce + 0.2, (ce, accs)
    assert accs["glc"] > accs["forward"], accs  # the trusted data helps (the GLC paper's claim)
    for result in (forward, glc):  # epoch 0 still has T = identity: its distance is 0.4
        identity, estimated = (result.curves[e]["T_total_variation"] for e in (0, -1))
        assert identity == pytest.approx(0.4, abs=0.01) and estimated < 0.75 * identity


def test_oracle_uses_the_realized_matrix():
    t = trainer({"name": "forward", "estimate_epoch": 1, "oracle_t": True}, train={"epochs": 2})
    train_epochs(t, 1)
    t.method.on_epoch_start(1, t.engine)
    np.testing.assert_allclose(t.method.T.double().numpy(), t.data.noise.transition, atol=1e-6)


def test_oracle_refuses_without_true_labels():
    t = trainer({"name": "forward", "estimate_epoch": 1, "oracle_t": True})
    t.splits["train"].y_clean[::2] = -1  # as for real noise: some true labels unknown
    with pytest.raises(ConfigError, match="oracle_t needs the true label"):
        t.fit()  # at once, not after the cross-entropy stage
    assert t.engine.steps == 0


def test_oracle_rows_are_labelled_apart_in_summaries(tmp_path):
    for i, oracle in enumerate([False, True, None]):
        row = {"method.name": "forward", "method.oracle_t": oracle, "noise.type": "uniform",
               "noise.rate": 0.4, "seed": i, "final_test_acc": 0.8, "status": "completed"}
        write_trial(str(tmp_path), "s", f"t{i}", row, [{"epoch": 0, "test_acc": 0.8}])
    trials = query.load(str(tmp_path), "trials", "s")
    assert sorted(trials["method"]) == ["forward", "forward", "forward-oracle"]
