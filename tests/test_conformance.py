"""The checks every method passes, built-in or plugin: a method is tested by being registered.

Each runs with every option set its class names in `examples` (raymeta.methods.base.Method):
- a bilevel method's meta gradient equals central finite differences of its meta loss (float64,
  tiny model); under FaMUS, all gates on is that meta gradient, gates off but the classifier is
  the last-layer one, and the window-only virtual step is the meta gradient with the tensors
  below the window frozen;
- stopping after 2 of 4 epochs and resuming from the checkpoint gives the uninterrupted run;
- a packable method's packed seeds train exactly as separate runs;
- a typo in one of its options is refused, with a did-you-mean, when the config is read;
- another method's option is refused, naming the methods that read it.
Two Ray Train workers against one worker with the global batch: test_distributed, for the same
methods in one Ray Train job.
"""

import re
import sys

import pytest
import torch
from conftest import EXAMPLE_PLUGIN
from test_engine import batch, central_difference, setup
from test_famus import famus_meta_gradient, famus_setup
from test_packed import experiment
from test_trainer import assert_resumes_exactly

from raymeta import plugins
from raymeta.config import METHOD_CONFIGS, methods_reading, parse_experiment
from raymeta.errors import ConfigError
from raymeta.methods import METHOD_CLASSES, MetaMethod, examples, packable
from raymeta.train import Trainer
from raymeta.train.packed import PackedTrainer

sys.path.insert(0, str(EXAMPLE_PLUGIN))  # the example plugin's method, by its import path
PLUGINS = ("raymeta_example.threshold:MetaThreshold",)
"""plugin methods checked beside the built-ins (add yours to check it)"""
CLASSES = {**METHOD_CLASSES, **{path: plugins.method_class(path) for path in PLUGINS}}


def cases(which=lambda cls: True) -> list:
    """(method config, test id) for every example option set of every method `which` keeps."""
    found = []
    for name, cls in CLASSES.items():
        if not which(cls):
            continue
        for options in examples(cls):
            shown = ",".join(f"{k}={v}" for k, v in options.items())
            found.append(pytest.param({"name": name, **options}, id=name + (f"[{shown}]" if shown else "")))
    return found


def bilevel(cls) -> bool:
    """The method's step is the engine's bilevel step (MLNT's own step is checked in test_engine)."""
    return issubclass(cls, MetaMethod) and cls.step is MetaMethod.step


def test_every_method_is_checked():
    """A method with no example option set would escape every check below."""
    assert {c.values[0]["name"] for c in cases()} == set(CLASSES)
    assert {c.values[0]["name"] for c in cases(bilevel)} >= {"mwnet", "l2r", "mlc", "metalabelnet", *PLUGINS}


@pytest.mark.parametrize("method_cfg", cases(bilevel))
def test_meta_gradient_matches_finite_differences(method_cfg):
    method, engine = setup(method_cfg)
    train, meta = batch(8, 1), batch(6, 2)
    meta_params = method.meta_parameters(train)

    def meta_loss():
        return engine.meta_objective(method, engine.forward(train.x), train, meta)

    analytic = torch.autograd.grad(meta_loss(), meta_params)
    for p, a in zip(meta_params, analytic):
        flat = p.data.view(-1)
        numeric = torch.tensor([central_difference(meta_loss, flat, i) for i in range(flat.numel())],
                               dtype=flat.dtype)
        error = (a.view(-1) - numeric).norm() / numeric.norm().clamp_min(1e-12)
        assert numeric.norm() > 1e-8, "the meta loss does not depend on this meta parameter"
        assert error < 1e-4, f"relative error {error:.2e}"


def full_meta_gradient(method, engine, train, meta, params):
    return torch.autograd.grad(engine.meta_objective(method, engine.forward(train.x), train, meta), params)


@pytest.mark.parametrize("method_cfg", cases(bilevel))
def test_famus_with_all_gates_on_is_the_full_meta_gradient(method_cfg):
    method, engine = famus_setup({**method_cfg, "famus": True})
    train, meta = batch(8, 1), batch(6, 2)
    params = method.meta_parameters(train)
    full = full_meta_gradient(method, engine, train, meta, params)
    engine.meta_gradient.force = True
    gated = famus_meta_gradient(method, engine, train, meta, params)
    for f, g in zip(full, gated):
        torch.testing.assert_close(g, f, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method_cfg", cases(bilevel))
def test_famus_gates_off_but_the_classifier_is_the_last_layer_meta_gradient(method_cfg):
    method, engine = famus_setup({**method_cfg, "famus": True}, classifier_always_on=True)
    train, meta = batch(8, 1), batch(6, 2)
    params = method.meta_parameters(train)
    # reference, by hand: only the classifier's gradient keeps its graph
    grads = engine.gradients(method.virtual_loss(engine.forward(train.x), train))
    grads = {n: g if n.startswith("classifier.") else g.detach() for n, g in grads.items()}
    theta = engine.step_params(grads, method.cfg.virtual_lr, method.cfg.virtual_step)
    reference = torch.autograd.grad(method.meta_loss(engine.functional_forward(theta, meta.x), meta),
                                    params, allow_unused=True)
    engine.meta_gradient.force = False
    gated = famus_meta_gradient(method, engine, train, meta, params)
    full = full_meta_gradient(method, engine, train, meta, params)
    for r, g, f in zip(reference, gated, full):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)
        assert not torch.allclose(g, f)  # pruning really changed the meta gradient


@pytest.mark.parametrize("method_cfg", cases(bilevel))
def test_famus_window_only_virtual_step_is_the_meta_gradient_with_lower_layers_frozen(method_cfg):
    """exact_below_window false, all gates on: the meta gradient of a model whose tensors below
    the window take no virtual step (there, the full meta gradient with them frozen)."""
    method, engine = famus_setup({**method_cfg, "famus": True}, candidates=2, exact_below_window=False)
    train, meta = batch(8, 1), batch(6, 2)
    params = method.meta_parameters(train)
    full = full_meta_gradient(method, engine, train, meta, params)
    engine.meta_gradient.force = True
    windowed = famus_meta_gradient(method, engine, train, meta, params)
    window = engine.meta_gradient.scope
    assert window == list(engine.named_params())[-2:]
    for name, p in engine.model.named_parameters():
        p.requires_grad_(name in window)  # the reference: the rest frozen
    frozen = full_meta_gradient(method, engine, train, meta, params)
    for f, w, r in zip(full, windowed, frozen):
        torch.testing.assert_close(w, r, rtol=1e-10, atol=1e-12)
    assert any(not torch.allclose(w, f) for w, f in zip(windowed, full))  # an approximation


@pytest.mark.parametrize("method_cfg", cases())
def test_resume_from_checkpoint_equals_an_uninterrupted_run(tmp_path, method_cfg):
    assert_resumes_exactly(tmp_path, {"method": method_cfg})


@pytest.mark.parametrize("method_cfg", cases(packable))
def test_packed_seeds_train_exactly_as_separate_runs(method_cfg):
    cfg = experiment(method_cfg, epochs=3)
    seeds = [0, 3]
    packed = PackedTrainer(cfg, seeds)
    results = packed.fit()
    for seed, result, member in zip(seeds, results, packed.members):
        alone = Trainer(cfg.model_copy(update={"seed": seed}))
        expected = alone.fit()
        for (name, a), b in zip(alone.model.state_dict().items(), member.model.state_dict().values()):
            torch.testing.assert_close(b, a, rtol=0, atol=1e-12, msg=f"{method_cfg} seed {seed} {name}")
        for got, want in zip(result.curves, expected.curves):
            for key in ("train_loss", "train_acc", "test_acc", "meta_acc", "meta_loss"):
                assert got[key] == pytest.approx(want[key], abs=1e-12), (method_cfg, seed, key)
        assert result.outcome["final_test_acc"] == expected.outcome["final_test_acc"]
        assert result.outcome["packed_seeds"] == 2
        assert result.outcome["noisy_labels_sha"] == expected.outcome["noisy_labels_sha"]
    # the seeds really differ: their own labels, splits and initialisations
    assert results[0].outcome["noisy_labels_sha"] != results[1].outcome["noisy_labels_sha"]


@pytest.mark.parametrize("method_cfg", cases(lambda cls: not packable(cls)))
def test_what_cannot_be_packed_is_refused_with_the_reason(method_cfg):
    with pytest.raises(ConfigError, match=r"train \S+ one seed per trial"):
        PackedTrainer(experiment(method_cfg, epochs=4), [0, 1])


@pytest.mark.parametrize("method_cfg", cases())
def test_a_typo_in_an_option_is_refused_with_a_did_you_mean(method_cfg):
    options = [k for k in type(parse_experiment({"method": method_cfg}).method).model_fields
               if k != "name" and len(k) > 3]
    if not options:  # no option of its own: the unknown key is named with what is allowed
        with pytest.raises(ConfigError, match=r"unknown key 'method\.hidden'.*; allowed here: name$"):
            parse_experiment({"method": {**method_cfg, "hidden": 1}})
        return
    typo = options[0][:-2] + options[0][-1] + options[0][-2]  # the last two letters swapped
    with pytest.raises(ConfigError, match=rf"unknown key 'method\.{typo}' \(did you mean "
                                          rf"'method\.{options[0]}'\?\)"):
        parse_experiment({"method": {**method_cfg, typo: 1}})


def _set_away_from_default(field):
    """A valid value other than the field's default (None: no simple one)."""
    default = field.default
    if isinstance(default, bool):
        return not default
    if isinstance(default, int | float):
        return default * 2 + 1
    return None


@pytest.mark.parametrize("method_cfg", cases())
def test_another_methods_option_is_refused_naming_the_methods_that_read_it(method_cfg):
    """Every option of a built-in method that this method does not read (absent from its
    config, or there but never read, like l2r's meta_lr) is refused with the methods that
    read it."""
    own = type(parse_experiment({"method": method_cfg}).method)
    name = method_cfg["name"]
    options = {key: field for cfg in METHOD_CONFIGS.values() for key, field in cfg.model_fields.items()
               if key != "name"}
    checked = 0
    for key, field in sorted(options.items()):
        if key in own.model_fields and key not in own.unread_fields:
            continue  # its own
        value = _set_away_from_default(own.model_fields.get(key, field))
        if value is None or not methods_reading(key):
            continue
        readers = re.escape(", ".join(methods_reading(key)))
        with pytest.raises(ConfigError, match=rf"method {re.escape(name)} does not (take|read) it "
                                              rf"\(the methods that do: {readers}\)"):
            parse_experiment({"method": {**method_cfg, key: value}})
        checked += 1
    assert checked >= 3

