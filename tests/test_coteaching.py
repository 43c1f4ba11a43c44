"""Co-teaching: each network learns from the small-loss samples its peer chose."""

import copy

import pytest
import torch
from conftest import tiny_experiment

from raymeta.config import parse_experiment
from raymeta.data.loader import Batch
from raymeta.errors import ConfigError
from raymeta.methods import Engine, build_method
from raymeta.methods.base import per_sample_ce
from raymeta.models import build_model
from raymeta.parallel import batch_mean
from raymeta.train import Trainer


def cfg(**sections):
    return parse_experiment(tiny_experiment(**sections))


def coteaching(**options):
    config = cfg(method={"name": "coteaching", **options}, noise={"type": "uniform", "rate": 0.4})
    torch.manual_seed(0)
    model = build_model("mlp", 3, 1, 2, hidden=[4])
    return build_method(config.method, 3, model), model


def batch_of(labels, clean=None):
    y = torch.tensor(labels)
    return Batch(x=torch.randn(len(y), 1, 2, 2, generator=torch.Generator().manual_seed(1)), y=y,
                 y_clean=torch.tensor(clean) if clean is not None else y.clone(),
                 index=torch.arange(len(y)))


def test_each_network_keeps_its_smallest_losses_and_never_an_unlabeled_sample():
    method, _ = coteaching(num_gradual=10)  # forget rate 0.4, reached at epoch index 9
    batch = batch_of([0, 1, 2, -1, 0, 1, 2, 0, 1])  # 8 labeled samples
    losses = torch.tensor([0.5, 0.1, 0.9, 0.0, 0.3, 0.2, 0.7, 0.4, 0.8])  # sample 3: unlabeled
    peer_losses = torch.tensor([0.1, 0.9, 0.2, 0.0, 0.8, 0.3, 0.4, 0.7, 0.6])
    labeled = batch.y >= 0

    def kept(epoch):
        method.epoch = epoch
        chosen, peer_chosen = method.choose(losses, peer_losses, labeled, batch)
        return chosen.nonzero().flatten().tolist(), peer_chosen.nonzero().flatten().tolist()

    # epoch 9: R = 0.4, int(0.6 * 8) = 4 kept of the 8 labeled samples
    assert kept(9) == ([1, 4, 5, 7], [0, 2, 5, 6])
    assert kept(30) == kept(9)
    # epoch 4 (T = 5): R = 0.2, int(0.8 * 8) = 6 kept; epoch 0: R = 0.04, 7 kept
    assert kept(4) == ([0, 1, 4, 5, 6, 7], [0, 2, 5, 6, 7, 8])
    assert len(kept(0)[0]) == len(kept(0)[1]) == 7
    assert 3 not in kept(0)[0] + kept(0)[1]  # the smallest loss, but no label to trust
    tied = torch.tensor([0.2, 0.2, 0.2, 0.0, 0.2, 0.2, 0.2, 0.2, 0.2])
    method.epoch = 9
    assert method.choose(tied, tied, labeled, batch)[0].nonzero().flatten().tolist() == [0, 1, 2, 4]


@pytest.mark.parametrize("ramp,exponent,expected", [
    ("paper", 1.0, [0.04, 0.2, 0.36, 0.4, 0.4]),
    ("code", 1.0, [0.4 / 9, 0.4 * 5 / 9, 0.4, 0.4, 0.4]),  # linspace(0, 0.4, 10)[T], T = epoch + 1
    ("paper", 2.0, [0.004, 0.1, 0.324, 0.4, 0.4]),
    ("code", 2.0, [0.16 / 9, 0.16 * 5 / 9, 0.16, 0.4, 0.4]),  # the code's jump at T_k
])
def test_forget_rate_ramps_up_over_num_gradual_epochs(ramp, exponent, expected):
    method, _ = coteaching(num_gradual=10, ramp=ramp, exponent=exponent)
    assert [method.forget_rate(e) for e in (0, 4, 8, 9, 50)] == pytest.approx(expected)
    assert coteaching(num_gradual=0)[0].forget_rate(0) == 0.4


def test_each_network_is_trained_on_the_samples_its_peer_chose():
    """The real step: the model's gradient is that of its mean loss over the peer's choice,
    the peer's that of its mean loss over the model's choice."""
    method, model = coteaching(num_gradual=10)
    method.epoch = 9
    batch = batch_of([0, 1, 2, 0, 1, 2, 0, 1, -1, 2], clean=[0, 1, 2, 0, 1, 0, 0, 2, 1, 2])
    peer = method.peer
    assert any((a != b).any() for a, b in zip(model.parameters(), peer.parameters()))
    with torch.no_grad():
        losses, peer_losses = per_sample_ce(model(batch.x), batch.y), per_sample_ce(peer(batch.x), batch.y)
    chosen, peer_chosen = method.choose(losses, peer_losses, batch.y >= 0, batch)
    assert chosen.sum() == peer_chosen.sum() == 5 and not torch.equal(chosen, peer_chosen)

    def gradient(net, mask):
        net = copy.deepcopy(net)
        batch_mean(per_sample_ce(net(batch.x), batch.y), mask).backward()
        return [p.grad for p in net.parameters()]

    expected, peer_expected = gradient(model, peer_chosen), gradient(peer, chosen)
    engine = Engine(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    out = method.step(engine, batch, None)
    for got, want in zip(model.parameters(), expected):
        torch.testing.assert_close(got.grad, want)
    for got, want in zip(peer.parameters(), peer_expected):
        torch.testing.assert_close(got.grad, want)
    assert type(method.peer_optimizer) is torch.optim.SGD
    assert method.peer_optimizer.param_groups[0]["momentum"] == 0.9
    assert out.extras["forget_rate"].tolist() == [4.0, 9.0]  # 4 of the 9 labeled left out
    clean = (batch.y == batch.y_clean) & (batch.y >= 0)
    assert out.extras["chosen_clean"].tolist() == [(clean & chosen).sum().item(), 5.0]
    # the peer's learning rate follows the model's (the trainer schedules the model's)
    engine.optimizer.param_groups[0]["lr"] = 0.01
    method.step(engine, batch, None)
    assert method.peer_optimizer.param_groups[0]["lr"] == 0.01


def test_forget_rate_defaults_to_the_noise_rate():
    for noise, rate in (({"type": "uniform", "rate": 0.3}, 0.3), ({"type": "none"}, 0.0)):
        assert cfg(method={"name": "coteaching"}, noise=noise).method.forget_rate == rate
    explicit = {"name": "coteaching", "forget_rate": 0.2}
    assert cfg(method=explicit, noise={"type": "uniform", "rate": 0.4}).method.forget_rate == 0.2
    assert cfg(method=explicit, noise={"type": "real", "file": "labels.npy"}).method.forget_rate == 0.2
    with pytest.raises(ConfigError, match="needs method.forget_rate with noise.type real"):
        cfg(method={"name": "coteaching"}, noise={"type": "real", "file": "labels.npy"})


def test_the_same_seed_gives_the_same_two_networks_and_another_seed_others():
    def networks(seed):
        trainer = Trainer(cfg(method={"name": "coteaching"}, seed=seed))
        return [p.detach().clone() for p in (*trainer.model.parameters(), *trainer.method.peer.parameters())]

    a, b, c = networks(0), networks(0), networks(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not any(torch.equal(x, y) for x, y in zip(a, c))


def test_evaluate_second_evaluates_the_other_network():
    """The method is symmetric: evaluating network 2 gives the run whose peer is network 1."""
    runs = {which: Trainer(cfg(method={"name": "coteaching", "num_gradual": 2, "evaluate": which},
                               noise={"type": "uniform", "rate": 0.4}, train={"epochs": 3})).fit()
            for which in ("first", "second")}
    for first, second in zip(runs["first"].curves, runs["second"].curves):
        assert second["train_loss"] == pytest.approx(first["train_peer_loss"], rel=1e-6)
        assert second["train_peer_loss"] == pytest.approx(first["train_loss"], rel=1e-6)
        assert second["test_acc"] == pytest.approx(first["peer_test_acc"], abs=1e-9)
        assert second["peer_test_acc"] == pytest.approx(first["test_acc"], abs=1e-9)
    assert all(c["train_loss"] != c["train_peer_loss"] for c in runs["first"].curves)  # two networks


def test_checkpoint_restores_the_peer_and_its_optimizer(tmp_path):
    config = cfg(method={"name": "coteaching", "num_gradual": 2}, noise={"type": "uniform", "rate": 0.4},
                 optimizer={"name": "adam", "lr": 1e-3}, train={"epochs": 2})
    trainer = Trainer(config, checkpoint_dir=tmp_path)
    trainer.fit()
    resumed = Trainer(config, resume_from=tmp_path)
    for (name, a), b in zip(trainer.method.peer.state_dict().items(), resumed.method.peer.state_dict().values()):
        assert torch.equal(a, b), name
    saved = trainer.method.peer_optimizer.state_dict()
    restored = resumed.method.peer_optimizer_like(resumed.optimizer).state_dict()
    assert type(resumed.method.peer_optimizer) is torch.optim.Adam
    assert saved["state"].keys() == restored["state"].keys() and saved["state"]
    for key, state in saved["state"].items():
        for field, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(restored["state"][key][field])), field


@pytest.mark.parametrize("seed", [0, 1])
def test_coteaching_beats_ce_on_noisy_digits(seed):
    """40% uniform noise on digits, 20 epochs: CE memorises the wrong labels (0.88-0.90 test
    accuracy on seeds 0-4), Co-teaching keeps ~99% clean samples and reaches 0.95-0.96."""
    def train(method):
        return Trainer(parse_experiment({
            "dataset": {"name": "digits"}, "model": {"name": "mlp", "options": {"hidden": [128]}},
            "train": {"epochs": 20, "batch_size": 64}, "optimizer": {"lr": 0.1, "weight_decay": 1e-4},
            "noise": {"type": "uniform", "rate": 0.4}, "method": method, "seed": seed})).fit()

    ce, co = train({"name": "ce"}), train({"name": "coteaching", "num_gradual": 5})
    assert co.outcome["final_test_acc"] > ce.outcome["final_test_acc"] + 0.03
    last = co.curves[-1]
    assert last["train_chosen_clean"] > 0.9 and last["train_peer_chosen_clean"] > 0.9  # of 0.6
    assert last["train_forget_rate"] == pytest.approx(0.4, abs=0.01)
