"""Tests for raymeta.models: shapes, the features/classifier split, functional calls, counts, errors.

The checks every model passes run on every built-in model and on the example plugin's, each
built as its class's `example` says: a new model is checked by being there."""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import EXAMPLE_PLUGIN
from torch.func import functional_call

from raymeta.errors import ConfigError, DataError
from raymeta.models import MODEL_NAMES, Backbone, build_model, model_class, model_options

K = 5
sys.path.insert(0, str(EXAMPLE_PLUGIN))  # the example plugin's model, by its import path
EVERY_MODEL = (*MODEL_NAMES, "raymeta_example.smallcnn:SmallCNN")


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def tiny(name: str) -> tuple[Backbone, torch.Tensor]:
    torch.manual_seed(0)
    c, s, opts = model_class(name).example
    return build_model(name, K, c, s, **opts), torch.randn(2, c, s, s)


@pytest.mark.parametrize("name", EVERY_MODEL)
def test_shapes_split_and_gradients(name):
    model, x = tiny(name)
    assert isinstance(model, Backbone)
    assert isinstance(model.classifier, torch.nn.Linear)
    assert model.classifier.in_features == model.feature_dim
    out = model(x)
    assert out.shape == (2, K)
    out.square().mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, f"parameters without gradient: {no_grad}"

    model.eval()
    with torch.no_grad():
        feats = model.features(x)
        assert feats.shape == (2, model.feature_dim)
        torch.testing.assert_close(model(x), model.classifier(feats))


@pytest.mark.parametrize("name", EVERY_MODEL)
def test_functional_call_and_channels_last(name):
    model, x = tiny(name)
    model.eval()
    params = dict(model.named_parameters())
    state = {**params, **dict(model.named_buffers())}
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(functional_call(model, state, (x,)), expected)
        # The call really uses the given tensors: shifting the classifier bias shifts the logits.
        shifted = {**state, "classifier.bias": state["classifier.bias"] + 1.0}
        torch.testing.assert_close(functional_call(model, shifted, (x,)), expected + 1.0)
        cl = model.to(memory_format=torch.channels_last)
        torch.testing.assert_close(cl(x.to(memory_format=torch.channels_last)), expected, rtol=1e-4, atol=1e-5)

    # Gradients flow to the tensors passed in, as the meta-learning engine needs (train mode).
    model.train()
    fast = {n: p.detach().clone().requires_grad_(True) for n, p in params.items()}
    loss = functional_call(model, {**fast, **dict(model.named_buffers())}, (x,)).square().mean()
    grads = torch.autograd.grad(loss, list(fast.values()), allow_unused=True)
    assert all(g is not None for g in grads)


def test_second_order_gradient_through_functional_call():
    model, x = tiny("cnn8")
    params = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    buffers = dict(model.named_buffers())
    loss = functional_call(model, {**params, **buffers}, (x,)).logsumexp(1).mean()
    grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
    fast = {n: p - 0.1 * g for (n, p), g in zip(params.items(), grads)}
    meta_loss = functional_call(model, {**fast, **buffers}, (x,)).logsumexp(1).mean()
    (meta_grad,) = torch.autograd.grad(meta_loss, [params["classifier.weight"]])
    assert torch.isfinite(meta_grad).all()


@pytest.mark.parametrize("size", [8, 28, 32])
def test_lenet_image_sizes(size):
    model = build_model("lenet", 10, 3, size)
    assert model(torch.randn(2, 3, size, size)).shape == (2, 10)


def test_mlp_takes_any_input_shape():
    model = build_model("mlp", 7, 2, 5)
    assert model.feature_dim == 256
    assert model(torch.randn(3, 2, 5, 5)).shape == (3, 7)


def test_cnn9_parameter_count_is_coteachings():
    # convs 3x3 (weights + bias): 3*128*9+128 = 3,584; 2 x (128*128*9+128) = 295,168;
    #   128*256*9+256 = 295,168; 2 x (256*256*9+256) = 1,180,160; 256*512*9+512 = 1,180,160;
    #   512*256*9+256 = 1,179,904; 256*128*9+128 = 295,040
    # BatchNorm2d (2 per channel): 2*(3*128 + 3*256 + 512 + 256 + 128) = 4,096
    # classifier 128*10+10 = 1,290; total 4,434,570
    model = build_model("cnn9", 10, 3, 32)
    assert n_params(model) == 4_434_570 and model.feature_dim == 128
    with pytest.raises(ConfigError, match="at least 28"):
        build_model("cnn9", 10, 3, 16)


def test_preact_resnet18_parameter_count():
    # stem 3*64*9 = 1,728
    # stage 64:  2 * (bn 128 + conv 36,864 + bn 128 + conv 36,864)                          =   147,968
    # stage 128: (bn 128 + 73,728 + bn 256 + 147,456 + 1x1 8,192) + (256 + 147,456)*2          =   525,184
    # stage 256: (bn 256 + 294,912 + bn 512 + 589,824 + 1x1 32,768) + (512 + 589,824)*2        = 2,098,944
    # stage 512: (bn 512 + 1,179,648 + bn 1,024 + 2,359,296 + 1x1 131,072) + (1,024 + 2,359,296)*2 = 8,392,192
    # final BN 1,024; classifier 512*10 + 10 = 5,130
    # total 11,172,170 = the often quoted 11,171,146 (same net without the final BN) + 1,024.
    model = build_model("preact_resnet18", 10, 3, 32)
    assert n_params(model) == 11_172_170
    assert model.feature_dim == 512


def test_resnet32_parameter_count():
    model = build_model("resnet32", 10, 3, 32)
    assert n_params(model) == 464_154
    assert model.feature_dim == 64
    assert len(model.blocks) == 15


def test_wrn_28_10_parameter_count():
    model = build_model("wrn", 10, 3, 32)
    assert n_params(model) == 36_479_194
    assert model.feature_dim == 640


def test_cnn8_parameter_count():
    # convs (weights + bias): 3*64*9+64 = 1,792; 64*64*9+64 = 36,928; 64*128*9+128 = 73,856;
    #   128*128*9+128 = 147,584; 128*196*9+196 = 225,988; 196*196*9+196 = 345,940  -> 832,088
    # BatchNorm2d (2 per channel): 2*(64+64+128+128+196+196) = 1,552
    # fc1 196*4*4*256+256 = 803,072; BatchNorm1d 512; classifier 256*10+10 = 2,570
    # total 832,088 + 1,552 + 803,072 + 512 + 2,570 = 1,639,794
    model = build_model("cnn8", 10, 3, 32)
    assert n_params(model) == 1_639_794
    assert model.feature_dim == 256


def test_unknown_model_suggests_close_name():
    with pytest.raises(ConfigError, match="unknown model 'resnet33'") as err:
        build_model("resnet33", 10, 3, 32)
    assert "did you mean 'resnet32'" in str(err.value)
    assert "cnn8, cnn9, lenet, mlp, preact_resnet18" in str(err.value)


def test_unknown_option_is_named_with_allowed_ones():
    with pytest.raises(ConfigError, match="no option 'widht'") as err:
        build_model("wrn", 10, 3, 32, widht=2)
    assert "depth, width, dropout" in str(err.value)
    with pytest.raises(ConfigError, match="its options: none"):
        build_model("lenet", 10, 3, 32, hidden=[3])


def test_bad_wrn_depth():
    with pytest.raises(ConfigError, match="depth"):
        build_model("wrn", 10, 3, 32, depth=27)


def test_cnn8_rejects_size_not_multiple_of_8():
    with pytest.raises(ConfigError, match="multiple of 8.*got 28"):
        build_model("cnn8", 10, 3, 28)


def test_resnet50_needs_rgb():
    with pytest.raises(ConfigError, match="in_channels"):
        build_model("resnet50", 10, 1, 32)


def test_model_options_defaults():
    assert model_options("wrn") == {"depth": 28, "width": 10, "dropout": 0.0}
    assert model_options("cnn8") == {}


def test_the_models_read_from_source_are_the_classes_with_their_options():
    """Configs learn the built-in models by reading raymeta/models (no torch): that reading
    finds every Backbone subclass there, under the name its class says, with the keyword-only
    options and defaults of its real __init__."""
    import importlib
    import inspect
    import pkgutil

    import raymeta.models as models

    for module in pkgutil.iter_modules(models.__path__):
        importlib.import_module(f"raymeta.models.{module.name}")

    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    builtin = {cls for cls in subclasses(Backbone) if cls.__module__.startswith("raymeta.models.")}
    assert {cls.name for cls in builtin} == set(MODEL_NAMES)
    for cls in builtin:
        assert models.model_class(cls.name) is cls
        params = inspect.signature(cls.__init__).parameters.values()
        real = {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}
        assert model_options(cls.name) == real, cls.name


def test_resnet50_loads_local_weights(tmp_path):
    from torchvision.models import resnet50

    reference = resnet50(weights=None)
    with torch.no_grad():
        reference.layer1[0].conv1.weight.fill_(0.125)
        reference.bn1.running_mean.fill_(3.0)
    path = tmp_path / "r50.pt"
    torch.save(reference.state_dict(), path)

    model = build_model("resnet50", 4, 3, 32, weights_path=str(path))
    assert model.feature_dim == 2048
    assert torch.all(model.layer1[0].conv1.weight == 0.125)
    assert torch.all(model.bn1.running_mean == 3.0)
    assert model.classifier.out_features == 4


def test_resnet50_missing_weights_file(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(DataError, match="nope.pt"):
        build_model("resnet50", 4, 3, 32, weights_path=str(missing))
