"""The bilevel engine: the virtual step equals the real optimizer's step, and every method's
meta gradient equals central finite differences of its meta loss (float64, tiny model)."""

import pytest
import torch

from raymeta.config import parse_experiment
from raymeta.data.loader import Batch
from raymeta.methods import Engine, build_method
from raymeta.models import build_model

K, D = 3, 4


def tiny_model():
    torch.manual_seed(0)
    return build_model("mlp", K, D, 1, hidden=[5]).double()


def batch(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, 1, 1, generator=g, dtype=torch.float64)
    y_clean = torch.randint(0, K, (n,), generator=g)
    y = torch.where(torch.rand(n, generator=g) < 0.3, (y_clean + 1) % K, y_clean)
    return Batch(x, y, y_clean, torch.arange(n))


@pytest.mark.parametrize("opt", [
    {"name": "sgd", "momentum": 0.0, "weight_decay": 0.0},
    {"name": "sgd", "momentum": 0.9, "weight_decay": 1e-3},
    {"name": "sgd", "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4},
    {"name": "adam", "lr": 0.01, "weight_decay": 1e-4},
])
def test_virtual_step_equals_the_real_optimizer_step(opt):
    from raymeta.methods.optim import build_optimizer

    cfg = parse_experiment({"optimizer": {"lr": 0.1, **opt}})
    model = tiny_model()
    optimizer = build_optimizer(cfg.optimizer, model.parameters())
    engine = Engine(model, optimizer)
    for step in range(5):
        b = batch(8, step)
        loss = torch.nn.functional.cross_entropy(model(b.x), b.y)
        virtual = {k: v.detach() for k, v in engine.virtual_params(loss, create_graph=False).items()}
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(b.x), b.y).backward()
        optimizer.step()
        for name, p in model.named_parameters():
            torch.testing.assert_close(virtual[name], p.detach(), rtol=1e-12, atol=1e-12)


def test_plain_sgd_virtual_step():
    model = tiny_model()
    engine = Engine(model, torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9))
    b = batch(8, 0)
    loss = torch.nn.functional.cross_entropy(model(b.x), b.y)
    grads = torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)
    virtual = engine.virtual_params(loss, lr=0.5, mode="sgd", create_graph=False)
    for (name, p), g in zip(model.named_parameters(), grads):
        torch.testing.assert_close(virtual[name], p - 0.5 * g)


@pytest.mark.parametrize("method", ["metalabelnet", "mlnt"])
def test_fixed_size_virtual_steps_are_plain_gradient_steps_under_momentum(method):
    """MetaLabelNet's step of 1 and MLNT's of 0.2 are their official code's plain gradient steps:
    mirroring an optimizer with momentum at that size would step about ten times further."""
    cfg = parse_experiment({"optimizer": {"lr": 0.01, "momentum": 0.9}, "train": {"epochs": 50},
                            "method": {"name": method}})
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    engine = Engine(model, optimizer)
    for step in range(3):  # fill the momentum buffer
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(batch(8, step).x), batch(8, step).y).backward()
        optimizer.step()
    b = batch(8, 9)
    loss = torch.nn.functional.cross_entropy(model(b.x), b.y)
    grads = torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)
    virtual = engine.virtual_params(loss, cfg.method.virtual_lr, cfg.method.virtual_step,
                                    create_graph=False)
    for (name, p), g in zip(model.named_parameters(), grads):
        torch.testing.assert_close(virtual[name], p - cfg.method.virtual_lr * g)


def central_difference(f, flat: torch.Tensor, i: int, h: float = 1e-6) -> float:
    """(f(x + h e_i) - f(x - h e_i)) / 2h, perturbing entry i of `flat` in place and restoring it."""
    saved = flat[i].item()
    flat[i] = saved + h
    plus = f().item()
    flat[i] = saved - h
    minus = f().item()
    flat[i] = saved
    return (plus - minus) / (2 * h)


def setup(method_cfg):
    cfg = parse_experiment({"method": method_cfg, "optimizer": {"lr": 0.5, "momentum": 0.9,
                                                                "weight_decay": 1e-3}})
    model = tiny_model()
    method = build_method(cfg.method, K, model)
    if method.meta_model is not None:
        method.meta_model.double()
        with torch.no_grad():  # move off the initial identity/zero point, into a generic one
            for p in method.meta_model.parameters():
                p.add_(0.1 * torch.randn_like(p)) if p.dim() > 1 else p.add_(0.05)
    from raymeta.methods.optim import build_optimizer

    optimizer = build_optimizer(cfg.optimizer, model.parameters())
    engine = Engine(model, optimizer)
    warm = batch(8, 99)  # one real step, so the momentum buffers are not empty
    engine.actual_step(torch.nn.functional.cross_entropy(model(warm.x), warm.y))
    method.on_epoch_start(1, engine)
    return method, engine


def test_mlnt_fast_weight_gradient_matches_finite_differences():
    cfg = parse_experiment({"method": {"name": "mlnt", "start_epoch": 0, "ramp_epochs": 0},
                            "optimizer": {"lr": 0.5, "momentum": 0.9}})
    model = tiny_model()
    method = build_method(cfg.method, K, model)
    engine = Engine(model, torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9))
    train = batch(8, 3)
    synthetic = torch.roll(train.y, 1)
    teacher = torch.softmax(torch.randn(8, K, dtype=torch.float64,
                                        generator=torch.Generator().manual_seed(4)), dim=1)

    def consistency():
        return method.consistency(engine, engine.forward(train.x), train, synthetic, teacher)

    params = list(model.parameters())
    analytic = torch.autograd.grad(consistency(), params)
    for p, a in zip(params, analytic):
        flat = p.data.view(-1)
        for i in range(0, flat.numel(), 3):  # every third entry of every tensor
            numeric = central_difference(consistency, flat, i)
            assert abs(a.view(-1)[i].item() - numeric) <= 1e-6 + 1e-4 * abs(numeric)


def test_meta_forwards_leave_batchnorm_statistics_alone():
    model = build_model("cnn8", K, 3, 8)
    engine = Engine(model, torch.optim.SGD(model.parameters(), lr=0.1))
    x = torch.randn(4, 3, 8, 8)
    before = {n: b.clone() for n, b in model.named_buffers()}
    params = engine.virtual_params(model(x).sum(), create_graph=True)
    after_real_forward = {n: b.clone() for n, b in model.named_buffers()}
    engine.functional_forward(params, torch.randn(4, 3, 8, 8))
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, after_real_forward[name]), name
    assert any(not torch.equal(before[n], after_real_forward[n]) for n in before)
