"""FaMUS: the virtual step's values stay exact, the default window is the released code's, the
samplers learn, and the count loss pulls the active tensors toward k. Every bilevel method's
FaMUS meta gradients (gates on, classifier only, window only) are checked in test_conformance."""

import pytest
import torch

from raymeta.config import FamusConfig, parse_experiment
from raymeta.methods import Engine, build_method
from raymeta.methods.famus import Famus
from raymeta.models import build_model
from raymeta.train import Trainer
from test_engine import D, K, batch, setup


def famus_setup(method_cfg, **famus):
    method, engine = setup(method_cfg)
    engine.meta_gradient = Famus(FamusConfig(**famus), engine.model)
    engine.meta_gradient.generator = torch.Generator().manual_seed(0)
    return method, engine


def famus_meta_gradient(method, engine, train, meta, params):
    meta_loss, _ = engine.meta_gradient.gated_objective(engine, method, engine.forward(train.x),
                                                        train, meta)
    return torch.autograd.grad(meta_loss, params, allow_unused=True)


def test_virtual_step_values_are_exact_whatever_the_gates():
    method, engine = famus_setup({"name": "mwnet", "famus": True})
    train = batch(8, 1)
    loss = method.virtual_loss(engine.forward(train.x), train)
    grads = engine.gradients(loss)
    exact = engine.step_params(grads)
    gated, gates = engine.meta_gradient.gate_gradients(grads)
    assert 0 < gates.sum() < len(gates)  # some on, some off
    for name, value in engine.step_params(gated).items():
        torch.testing.assert_close(value, exact[name], rtol=0, atol=0)


def test_default_window_is_the_released_codes_setup():
    """famus.window last_stage (the default): samplers over the model's last stage and above,
    the classifier always on, the meta forward detached below the stage; on preact_resnet18
    that is the released code's layer4 window (17 tensors)."""
    famus = Famus(FamusConfig(), build_model("preact_resnet18", 10, 3, 8))
    assert len(famus.candidates) == 15 and famus.candidates[0] == "blocks.6.bn1.weight"
    assert famus.always_on == {"classifier.weight", "classifier.bias"}
    # the meta gradient equals that of the same window written out by hand (mlp: body.3 is its
    # last hidden layer, body.2 the ReLU below it)
    torch.manual_seed(0)
    model = build_model("mlp", K, D, 1, hidden=[6, 5]).double()
    method = build_method(parse_experiment({"method": {"name": "mwnet"}}).method, K, model)
    method.meta_model.double()
    engine = Engine(model, torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9))
    train, meta = batch(8, 1), batch(6, 2)
    params = method.meta_parameters(train)
    gradients = []
    for cfg in (FamusConfig(), FamusConfig(window="all", candidates=4, classifier_always_on=True,
                                           detach_at="body.2"), FamusConfig(window="all")):
        engine.meta_gradient = Famus(cfg, model)
        engine.meta_gradient.force = True
        gradients.append(famus_meta_gradient(method, engine, train, meta, params))
    default, by_hand, every_tensor = gradients
    assert engine.meta_gradient.candidates != [] and len(Famus(FamusConfig(), model).candidates) == 2
    for d, h, e in zip(default, by_hand, every_tensor):
        torch.testing.assert_close(d, h, rtol=1e-12, atol=1e-14)
    assert any(not torch.allclose(d, e) for d, e in zip(default, every_tensor))  # truncated


def test_samplers_receive_gradients_and_learn():
    method, engine = famus_setup({"name": "mwnet", "famus": True})
    before = [p.detach().clone() for p in engine.meta_gradient.parameters()]
    train, meta = batch(8, 1), batch(6, 2)
    out = method.step(engine, train, lambda: meta)
    assert torch.isfinite(out.loss)
    changed = [not torch.equal(b, p) for b, p in zip(before, engine.meta_gradient.parameters())]
    assert all(changed)


def test_count_loss_pulls_active_tensors_toward_k():
    def run(k):
        cfg = parse_experiment({
            "dataset": {"name": "digits"}, "model": {"name": "mlp", "options": {"hidden": [32, 32, 32]}},
            "train": {"epochs": 4, "batch_size": 64}, "method": {"name": "mwnet", "famus": True},
            "famus": {"window": "all", "k": k, "lambda_count": 1.0, "lambda_grad": 0.0,
                      "cosine_every": 0}, "seed": 0})
        return [c["famus_active_tensors"] for c in Trainer(cfg).fit().curves]

    low, high = run(1), run(7)  # 8 tensors: 4 weights, 4 biases
    assert low[-1] < 2.0 and high[-1] > 6.0, (low, high)


def test_cosine_to_the_full_meta_gradient_is_recorded():
    cfg = parse_experiment({
        "dataset": {"name": "digits"}, "model": {"name": "mlp", "options": {"hidden": [32]}},
        "train": {"epochs": 2, "batch_size": 128}, "method": {"name": "mlc", "famus": True},
        "famus": {"window": "all", "cosine_every": 3}, "seed": 0})
    curves = Trainer(cfg).fit().curves
    cosine = [c["famus_meta_cosine"] for c in curves]
    assert all(-1.0 <= c <= 1.0 for c in cosine)
    assert len(curves[0]["famus_gate_frequency"]) == 4


def test_famus_config_errors():
    from raymeta.errors import ConfigError

    with pytest.raises(ConfigError, match="famus does not apply to mlnt"):
        parse_experiment({"method": {"name": "mlnt", "famus": True}})
    with pytest.raises(ConfigError, match="unknown key 'method.famus'"):
        parse_experiment({"method": {"name": "ce", "famus": True}})
    cfg = parse_experiment({"method": {"name": "mwnet", "famus": True}, "famus": {"detach_at": "nope"},
                            "train": {"epochs": 1}, "meta_set": {"per_class": 5}})
    with pytest.raises(ConfigError, match="famus.detach_at 'nope' is not a module"):
        Trainer(cfg)
    with pytest.raises(ConfigError, match="famus.exact_below_window false needs a window"):
        parse_experiment({"method": {"name": "mwnet", "famus": True},
                          "famus": {"window": "all", "exact_below_window": False}})


def test_only_the_classifier_is_a_valid_baseline():
    """No gated candidates: FaMUS reduces to last-layer meta gradients and still trains."""
    cfg = parse_experiment({
        "dataset": {"name": "digits"}, "model": {"name": "mlp", "options": {"hidden": [32]}},
        "train": {"epochs": 2, "batch_size": 128}, "method": {"name": "mwnet", "famus": True},
        "famus": {"candidates": 2, "classifier_always_on": True, "cosine_every": 1}, "seed": 0})
    curves = Trainer(cfg).fit().curves
    assert curves[-1]["famus_gate_frequency"] == [] and curves[-1]["famus_active_tensors"] == 2
    assert 0.0 < curves[-1]["famus_meta_cosine"] < 1.0  # the last layer only, not the full gradient
