"""Tests for ensemble_kd.models: registry, architectures, parameter counts, taps."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ensemble_kd.models import (
    create,
    default_taps,
    forward_with_taps,
    list_models,
    register_model,
    resolve_module,
)
from ensemble_kd.models import registry

from _zoo import zoo_models  # noqa: E402

# Too slow to run at every input size on a CPU: checked at one size only. The generic "wrn"
# (default WRN-28-10) is covered by its aliases and the spec round-trip.
ONE_SIZE = {
    "wrn28_10": (3, 32), "resnet110": (3, 32), "vgg19_bn": (3, 32), "wrn16_8": (3, 8), "wrn40_4": (3, 8),
}
# (channels, side): digits, Fashion-MNIST, CIFAR, and 3-channel 8x8 for the smallest-input path.
SHAPES = [(1, 8), (3, 8), (1, 28), (3, 32)]


HALVED_FIRST_TAP = {"vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn", "mobilenetv2_aekd"}

# Built from another registered model, or not for images: each has its own test file.
OWN_TESTS = {"multihead", "batchensemble", "dbof"}


def _cases():
    for name in zoo_models():
        if name != "wrn" and name not in OWN_TESTS:
            for c, h in [ONE_SIZE[name]] if name in ONE_SIZE else SHAPES:
                yield name, c, h


def _build(name: str, num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    kwargs = {"image_size": image_size} if name == "mlp" else {}
    return create(name, num_classes=num_classes, in_channels=in_channels, **kwargs)


def _no_hooks(model: nn.Module) -> bool:
    return all(len(m._forward_hooks) == 0 for m in model.modules())


def test_interface_models_are_registered():
    expected = {
        "resnet20", "resnet32", "resnet56", "resnet110", "wrn", "wrn16_2", "wrn28_10", "wrn40_2",
        "vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn", "mobilenetv2", "small_cnn", "mlp",
    }
    assert expected <= set(list_models())
    assert list_models() == sorted(list_models())
    assert list_models("wrn40*") == ["wrn40_1", "wrn40_2", "wrn40_4"]


@pytest.mark.parametrize("name,channels,size", list(_cases()))
def test_output_and_tap_shapes(name, channels, size):
    torch.manual_seed(0)
    model = _build(name, num_classes=7, in_channels=channels, image_size=size).eval()
    x = torch.randn(2, channels, size, size)
    with torch.no_grad():
        out, taps = forward_with_taps(model, x)
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()
    assert list(taps) == list(model.tap_points) + ["logits"]
    assert taps["logits"] is out
    assert len(model.stage_channels) == len(model.tap_points)
    for path, ch in zip(model.tap_points, model.stage_channels):
        assert taps[path].shape[:2] == (2, ch), path
    if name != "mlp":
        assert 3 <= len(model.tap_points) <= 5
        sides = [taps[p].shape[-1] for p in model.tap_points]
        assert sides == sorted(sides, reverse=True)  # stages never upsample
        # a stem keeps full resolution but AE-KD's MobileNetV2's (stride 2); our VGGs' taps are their
        # pools' outputs (where MEAL's authors tap)
        assert sides[0] == (-(-size // 2) if name in HALVED_FIRST_TAP else size)
    assert _no_hooks(model)


# Literature counts at 10 classes: He et al. 2016 (CIFAR ResNets), Zagoruyko & Komodakis 2016 (WRN),
# the common CIFAR VGG-BN with one linear layer, MobileNetV2's body (torchvision) with a 10-way fc.
LITERATURE = {
    "resnet20": 0.27e6,
    "resnet32": 0.46e6,
    "resnet44": 0.66e6,
    "resnet56": 0.853e6,
    "resnet110": 1.7e6,
    "wrn16_2": 0.69e6,
    "wrn40_2": 2.2e6,
    "wrn28_10": 36.5e6,
    "vgg11_bn": 9.23e6,
    "vgg13_bn": 9.42e6,
    "vgg16_bn": 14.73e6,
    "vgg19_bn": 20.04e6,
    "mobilenetv2": 2.24e6,
}


@pytest.mark.parametrize("name,expected", sorted(LITERATURE.items()))
def test_parameter_counts_match_literature(name, expected):
    count = sum(p.numel() for p in create(name, num_classes=10).parameters())
    assert abs(count - expected) / expected < 0.02, count


def test_small_model_parameter_counts():
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(create("small_cnn", in_channels=1)) == 288_170
    assert count(create("small_cnn", in_channels=1, width=0.5)) < 80_000
    # 64 inputs -> 256 -> 10 and 784 -> 128 -> 64 -> 10
    assert count(create("mlp", in_channels=1)) == 64 * 256 + 256 + 256 * 10 + 10
    m = create("mlp", in_channels=1, image_size=28, hidden_sizes=(128, 64))
    assert count(m) == 784 * 128 + 128 + 128 * 64 + 64 + 64 * 10 + 10
    assert m.tap_points == ("hidden.0", "hidden.1")


def test_wrn_alias_equals_generic():
    a = create("wrn40_2").state_dict()
    b = create("wrn", depth=40, width=2).state_dict()
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}


def test_unknown_model_name_lists_available():
    with pytest.raises(ValueError, match="unknown model 'resnet21'") as info:
        create("resnet21")
    assert "resnet20" in str(info.value) and "small_cnn" in str(info.value)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"width": 2}, "has no argument 'width'"),
        ({"num_classes": 0}, "num_classes must be a positive integer"),
        ({"in_channels": 2.0}, "in_channels must be a positive integer"),
    ],
)
def test_bad_create_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        create("resnet20", **kwargs)


@pytest.mark.parametrize(
    "name,kwargs,match",
    [
        ("wrn", {"depth": 20}, "depth must be 6n\\+4"),
        ("mobilenetv2", {"width_mult": 0}, "width_mult must be positive"),
        ("mlp", {"hidden_sizes": (0,)}, "hidden_sizes"),
        ("mlp", {"image_size": (8,)}, "image_size"),
    ],
)
def test_bad_model_arguments(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        create(name, **kwargs)


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("resnet20", {}),
        ("wrn", {"depth": 16, "width": 2, "dropout": 0.1}),
        ("vgg11_bn", {}),
        ("mobilenetv2", {"width_mult": 0.5}),
        ("small_cnn", {"width": 0.5}),
        ("mlp", {"hidden_sizes": [32, 16], "image_size": 28}),
    ],
)
def test_spec_rebuilds_identical_architecture(name, kwargs):
    torch.manual_seed(0)
    model = create(name, num_classes=5, in_channels=1, **kwargs).eval()
    assert model.spec == {"name": name, "num_classes": 5, "in_channels": 1, **kwargs}
    torch.manual_seed(1)
    clone = create(**model.spec).eval()
    ref, new = model.state_dict(), clone.state_dict()
    assert {k: v.shape for k, v in ref.items()} == {k: v.shape for k, v in new.items()}
    clone.load_state_dict(ref)
    x = torch.randn(2, 1, 28 if name == "mlp" else 8, 28 if name == "mlp" else 8)
    with torch.no_grad():
        assert torch.equal(model(x), clone(x))


def test_register_model_and_duplicate(monkeypatch):
    monkeypatch.setattr(registry, "_MODELS", dict(registry._MODELS))

    @register_model("tiny_test_net")
    def tiny(num_classes: int = 10, in_channels: int = 3, hidden: int = 4) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.LazyLinear(hidden), nn.Linear(hidden, num_classes))

    assert "tiny_test_net" in list_models()
    model = create("tiny_test_net", num_classes=3, hidden=5)
    assert model.spec == {"name": "tiny_test_net", "num_classes": 3, "in_channels": 3, "hidden": 5}
    with pytest.raises(ValueError, match="already registered"):
        register_model("tiny_test_net")(lambda num_classes=10, in_channels=3: nn.Identity())


@pytest.mark.parametrize("name", ["resnet20", "wrn16_2", "vgg11_bn", "mobilenetv2", "small_cnn", "mlp"])
def test_gradients_reach_every_parameter(name):
    torch.manual_seed(0)
    # Eval mode: in train mode a bias followed only by 1x1 conv + BN gets an exactly zero
    # gradient (BN removes per-channel shifts), which says nothing about connectivity.
    model = _build(name, in_channels=1, image_size=8).eval()
    out, taps = forward_with_taps(model, torch.randn(2, 1, 8, 8))
    loss = out.square().mean() + sum(taps[p].mean() for p in model.tap_points)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_taps_on_user_sequential_by_path():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 6, 3, padding=1)
            self.act = nn.Tanh()

        def forward(self, x):
            return self.act(self.conv(x))

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), Block(), nn.Flatten())
    x = torch.randn(2, 1, 5, 5)
    out, taps = forward_with_taps(model, x, ["2.conv", "0", "logits"])
    assert list(taps) == ["2.conv", "0", "logits"]
    first = model[0](x)
    assert torch.allclose(taps["0"], first)
    assert torch.allclose(taps["2.conv"], model[2].conv(torch.relu(first)))
    assert torch.equal(taps["logits"], out) and out.shape == (2, 6 * 25)
    assert resolve_module(model, "2.conv") is model[2].conv
    assert _no_hooks(model)
    with pytest.raises(ValueError, match="has no tap_points"):
        default_taps(model)


def test_taps_through_dataparallel_wrapper():
    model = create("resnet20", in_channels=1).eval()
    wrapped = nn.DataParallel(model)  # on a CPU-only machine it just calls the module
    with torch.no_grad():
        _, taps = forward_with_taps(wrapped, torch.randn(2, 1, 8, 8), ["layer2"])
    assert taps["layer2"].shape == (2, 32, 4, 4)
    assert default_taps(wrapped) == ("layer1", "layer2", "layer3", "logits")
    assert _no_hooks(model)


def test_bad_tap_path_names_it_and_lists_valid_paths():
    model = create("resnet20")
    with pytest.raises(ValueError, match="'layer4'") as info:
        forward_with_taps(model, torch.randn(2, 3, 8, 8), ["layer1", "layer4"])
    assert "layer1" in str(info.value) and "layer3" in str(info.value)
    with pytest.raises(ValueError, match="'features.99'"):
        resolve_module(create("vgg11_bn"), "features.99")
    assert _no_hooks(model)


def test_hooks_removed_after_forward_error():
    model = create("resnet20", in_channels=3)
    with pytest.raises(RuntimeError):
        forward_with_taps(model, torch.randn(2, 1, 8, 8), ["layer1", "layer3.2.conv2", "logits"])
    assert _no_hooks(model)
    mlp = create("mlp", in_channels=1, image_size=8)
    with pytest.raises(ValueError, match="image_size"):
        forward_with_taps(mlp, torch.randn(2, 1, 28, 28), ["hidden.0"])
    assert _no_hooks(mlp)


def test_tap_on_module_not_called_is_an_error():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(3, 3)
            self.unused = nn.Linear(3, 3)

        def forward(self, x):
            return self.used(x)

    model = Net()
    with pytest.raises(ValueError, match="'unused'.*never called"):
        forward_with_taps(model, torch.randn(2, 3), ["unused"])
    assert _no_hooks(model)


def test_taps_are_not_clobbered_by_later_ops():
    # A BN output feeds a ReLU: in-place ReLUs would clamp the tapped tensor to >= 0.
    torch.manual_seed(0)
    model = create("vgg11_bn").eval()
    with torch.no_grad():
        _, taps = forward_with_taps(model, torch.randn(2, 3, 8, 8), ["features.1", "features.2"])
    assert taps["features.1"].min() < 0
    assert torch.equal(taps["features.2"], torch.relu(taps["features.1"]))
    resnet = create("resnet20").eval()
    with torch.no_grad():
        _, taps = forward_with_taps(resnet, torch.randn(2, 3, 8, 8), ["layer1.0.bn2", "layer1.0"])
    # The block output is relu(bn2 + shortcut); the bn2 tap must not include the shortcut.
    assert not torch.equal(torch.relu(taps["layer1.0.bn2"]), taps["layer1.0"])
    assert taps["layer1.0.bn2"].min() < 0
