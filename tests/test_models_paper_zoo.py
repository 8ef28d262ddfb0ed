"""The papers' CIFAR networks: parameter counts from the reference definitions, shapes, taps, Shake-Shake's noise.

Each reference count below is written from the authors' code, layer by layer (conv = in*out*k*k
plus a bias where that code has one, BN = 2 per channel, fc = in*K + K), independently of our
modules: MEAL's models/ (kuangliu's pytorch-cifar), AE-KD's models/ (RepDistiller),
xgastaldi/shake-shake (cudnn convs, with biases), Huang et al.'s DenseNet-BC, giung2-jax's PreResNet.
Full-size networks are built on the meta device (no memory, no initialisation).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ensemble_kd.models import create, forward_with_taps
from ensemble_kd.models.shake_shake import ShakeBlock, ShiftedSkip, _Shake
from ensemble_kd.models.wrn import WideBlock


def conv(i: int, o: int, k: int, bias: bool = False, groups: int = 1) -> int:
    return i // groups * o * k * k + (o if bias else 0)


def bn(c: int) -> int:
    return 2 * c


def fc(i: int, k: int) -> int:
    return i * k + k


def ref_meal_mobilenet(k: int) -> int:
    cfg = [64, (128, 2), 128, (256, 2), 256, (512, 2), 512, 512, 512, 512, 512, (1024, 2), 1024]
    total, c = conv(3, 32, 3) + bn(32), 32
    for item in cfg:
        out = item if isinstance(item, int) else item[0]
        total += conv(c, c, 3, groups=c) + bn(c) + conv(c, out, 1) + bn(out)
        c = out
    return total + fc(1024, k)


def ref_googlenet(k: int) -> int:
    def inception(i, n1, n3r, n3, n5r, n5, pp):
        return (conv(i, n1, 1, True) + bn(n1) + conv(i, n3r, 1, True) + bn(n3r) + conv(n3r, n3, 3, True) + bn(n3)
                + conv(i, n5r, 1, True) + bn(n5r) + conv(n5r, n5, 3, True) + bn(n5) + conv(n5, n5, 3, True) + bn(n5)
                + conv(i, pp, 1, True) + bn(pp))

    modules = [(192, 64, 96, 128, 16, 32, 32), (256, 128, 128, 192, 32, 96, 64),
               (480, 192, 96, 208, 16, 48, 64), (512, 160, 112, 224, 24, 64, 64), (512, 128, 128, 256, 24, 64, 64),
               (512, 112, 144, 288, 32, 64, 64), (528, 256, 160, 320, 32, 128, 128),
               (832, 256, 160, 320, 32, 128, 128), (832, 384, 192, 384, 48, 128, 128)]
    return conv(3, 192, 3, True) + bn(192) + sum(inception(*m) for m in modules) + fc(1024, k)


def basic_block(i: int, o: int, stride: int, projection: bool) -> int:
    short = conv(i, o, 1) + bn(o) if projection and (stride != 1 or i != o) else 0
    return conv(i, o, 3) + bn(o) + conv(o, o, 3) + bn(o) + short


def ref_resnet(k: int, blocks: list[int], widths: list[int], projection: bool) -> int:
    total, c = conv(3, widths[0], 3) + bn(widths[0]), widths[0]
    for s, (n, w) in enumerate(zip(blocks, widths)):
        for j in range(n):
            total += basic_block(c, w, 2 if s and not j else 1, projection)
            c = w
    return total + fc(c, k)


def ref_densenet_bc(k: int, depth: int, growth: int) -> int:
    n = (depth - 4) // 6
    total, c = conv(3, 2 * growth, 3), 2 * growth
    for block in range(3):
        if block:
            total += bn(c) + conv(c, c // 2, 1)
            c //= 2
        for _ in range(n):
            total += bn(c) + conv(c, 4 * growth, 1) + bn(4 * growth) + conv(4 * growth, growth, 3)
            c += growth
    return total + bn(c) + fc(c, k)


def ref_shake_shake(k: int, depth: int, base: int) -> int:
    total, c = conv(3, 16, 3, True) + bn(16), 16
    for w in (base, 2 * base, 4 * base):
        for _ in range((depth - 2) // 6):
            total += 2 * (conv(c, w, 3, True) + bn(w) + conv(w, w, 3, True) + bn(w))
            if c != w:
                total += 2 * conv(c, w // 2, 1, True) + bn(w)
            c = w
    return total + fc(c, k)


def ref_mobile_half(k: int) -> int:
    rows = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]
    total, c = conv(3, 16, 3) + bn(16), 16
    for t, out, n, _ in rows:
        for _ in range(n):
            h = c * t
            total += conv(c, h, 1) + bn(h) + conv(h, h, 3, groups=h) + bn(h) + conv(h, int(out * 0.5), 1) + bn(int(out * 0.5))
            c = int(out * 0.5)
    return total + conv(c, 1280, 1) + bn(1280) + fc(1280, k)


def ref_wrn(k: int, depth: int, width: int) -> int:
    total, c = conv(3, 16, 3), 16
    for w in (16 * width, 32 * width, 64 * width):
        for _ in range((depth - 4) // 6):
            total += bn(c) + conv(c, w, 3) + bn(w) + conv(w, w, 3) + (conv(c, w, 1) if c != w else 0)
            c = w
    return total + bn(c) + fc(c, k)


def ref_vgg_bn(k: int, widths: tuple[int, ...]) -> int:
    """AE-KD's (RepDistiller's) and MEAL's (kuangliu's) VGG-BN: convs with biases, BN, one fc on 512."""
    total, c = 0, 3
    for w in widths:
        total += conv(c, w, 3, True) + bn(w)
        c = w
    return total + fc(512, k)


VGG13 = (64, 64, 128, 128, 256, 256, 512, 512, 512, 512)
VGG19 = (64, 64, 128, 128, 256, 256, 256, 256, 512, 512, 512, 512, 512, 512, 512, 512)


REFERENCE = {  # (name, kwargs): count at K classes, from the authors' code
    ("meal_mobilenet", ()): ref_meal_mobilenet,
    ("googlenet", ()): ref_googlenet,
    ("resnet18_cifar", ()): lambda k: ref_resnet(k, [2, 2, 2, 2], [64, 128, 256, 512], True),
    ("densenet_bc", ()): lambda k: ref_densenet_bc(k, 100, 24),
    ("densenet_bc", (("depth", 250),)): lambda k: ref_densenet_bc(k, 250, 24),
    ("densenet_bc", (("depth", 100), ("growth_rate", 12))): lambda k: ref_densenet_bc(k, 100, 12),
    ("shake_shake26_2x96d", ()): lambda k: ref_shake_shake(k, 26, 96),
    ("mobilenetv2_aekd", ()): ref_mobile_half,
    # AE-KD (RepDistiller) ResNets: 1x1-conv + BN projections where the shape changes
    ("resnet20", (("shortcut", "B"),)): lambda k: ref_resnet(k, [3] * 3, [16, 32, 64], True),
    ("resnet56", (("shortcut", "B"),)): lambda k: ref_resnet(k, [9] * 3, [16, 32, 64], True),
    ("resnet110", (("shortcut", "B"),)): lambda k: ref_resnet(k, [18] * 3, [16, 32, 64], True),
    # He et al.'s option A (our default): no shortcut parameters
    ("resnet56", ()): lambda k: ref_resnet(k, [9] * 3, [16, 32, 64], False),
    ("wrn40_2", ()): lambda k: ref_wrn(k, 40, 2),
    ("vgg13_bn_aekd", ()): lambda k: ref_vgg_bn(k, VGG13),
    ("wrn_latentbe", ()): lambda k: ref_wrn(k, 28, 4),
}


def n_params(name: str, num_classes: int = 10, **kwargs) -> int:
    with torch.device("meta"):
        model = create(name, num_classes=num_classes, **kwargs)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("key", list(REFERENCE), ids=lambda key: key[0] + "".join(f"-{k}={v}" for k, v in key[1]))
@pytest.mark.parametrize("num_classes", [10, 100])
def test_parameter_count_equals_the_reference_definition(key, num_classes):
    name, kwargs = key
    assert n_params(name, num_classes, **dict(kwargs)) == REFERENCE[key](num_classes)


@pytest.mark.parametrize("name,kwargs,published", [
    ("densenet_bc", {"depth": 250, "growth_rate": 24}, 15.3),  # Huang et al. 2017, Table 2
    ("densenet_bc", {"depth": 100, "growth_rate": 12}, 0.8),
    ("shake_shake26_2x96d", {}, 26.2),  # Gastaldi 2017
    ("googlenet", {}, 6.2),
    ("resnet18_cifar", {}, 11.2),
])
def test_parameter_count_rounds_to_the_published_figure(name, kwargs, published):
    assert round(n_params(name, 10, **kwargs) / 1e6, 1) == published


def test_our_vggs_lack_only_the_conv_biases_batch_norm_cancels():
    """The authors' VGGs have conv biases before their BNs; ours have none (vgg13: 2*64 + 2*128 + 2*256 + 4*512)."""
    assert n_params("vgg13_bn", 100) == ref_vgg_bn(100, VGG13) - 2944
    assert n_params("vgg19_bn", 10) == ref_vgg_bn(10, VGG19) - 5504  # MEAL's VGG-19-BN


def test_vgg13_bn_aekd_pools_three_times_on_cifar():
    model = create("vgg13_bn_aekd", num_classes=100).eval()
    with torch.no_grad():
        _, taps = forward_with_taps(model, torch.randn(1, 3, 32, 32))
    assert [taps[p].shape[-1] for p in model.tap_points] == [32, 16, 8, 4, 4]
    assert model.stage_channels == (64, 128, 256, 512, 512)


def test_mobilenetv2_aekd_is_a_different_variant_from_ours():
    # Ours at the same width rounds channels to multiples of 8 and skips the expansion-1 block's 1x1 conv.
    assert n_params("mobilenetv2", 100, width_mult=0.5) != ref_mobile_half(100)
    model = create("mobilenetv2_aekd", num_classes=100)
    assert model.stem[0].stride == (2, 2) and model.layer1[0].conv[0][0].kernel_size == (1, 1)
    acts = {type(m) for m in model.modules() if isinstance(m, (nn.ReLU, nn.ReLU6))}
    assert acts == {nn.ReLU}


# Cheap builds of each new network (small kwargs where the default is large): forward and taps.
SMALL = [
    ("meal_mobilenet", {}),
    ("googlenet", {}),
    ("resnet18_cifar", {"widths": [8, 16, 32, 64]}),
    ("densenet_bc", {"depth": 22, "growth_rate": 6}),
    ("shake_shake26_2x96d", {"widths": [8, 16, 32]}),
    ("mobilenetv2_aekd", {}),
    ("wrn_latentbe", {"depth": 10, "width": 1}),
    ("resnet20", {"shortcut": "B"}),
]


@pytest.mark.parametrize("name,kwargs", SMALL)
def test_forward_and_taps_on_cifar_inputs(name, kwargs):
    torch.manual_seed(0)
    model = create(name, num_classes=7, **kwargs).eval()
    with torch.no_grad():
        out, taps = forward_with_taps(model, torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    assert list(taps) == [*model.tap_points, "logits"]
    for path, channels in zip(model.tap_points, model.stage_channels):
        assert taps[path].shape[:2] == (2, channels), path


def test_stage_tap_resolutions_follow_the_reference_strides():
    sides = {}
    for name, kwargs in SMALL:
        model = create(name, num_classes=3, **kwargs).eval()
        with torch.no_grad():
            _, taps = forward_with_taps(model, torch.randn(1, 3, 32, 32))
        sides[name] = [taps[p].shape[-1] for p in model.tap_points]
    assert sides["meal_mobilenet"] == [32, 16, 8, 4, 2]
    assert sides["googlenet"] == [32, 16, 8]
    assert sides["resnet18_cifar"] == [32, 16, 8, 4]
    assert sides["densenet_bc"] == [32, 16, 8]
    assert sides["shake_shake26_2x96d"] == [32, 16, 8]
    assert sides["mobilenetv2_aekd"] == [16, 8, 4, 2]  # its stride-2 stem


@pytest.mark.parametrize("base,base_kwargs,fork", [
    ("resnet18_cifar", {"widths": [8, 16, 32, 64]}, "layer4"),
    ("shake_shake26_2x96d", {"widths": [8, 16, 32]}, "layer3"),
])
def test_stage_contract_lets_multihead_branch_them(base, base_kwargs, fork):
    torch.manual_seed(0)
    net = create("multihead", num_classes=5, base=base, base_kwargs=base_kwargs, branches=2, fork=fork).eval()
    with torch.no_grad():
        assert net(torch.randn(2, 3, 16, 16)).shape == (2, 5)


def test_resnet_option_b_shortcut_is_a_projection_and_a_bad_option_is_named():
    model = create("resnet20", shortcut="B")
    short = model.layer2[0].shortcut
    assert isinstance(short[0], nn.Conv2d) and short[0].stride == (2, 2) and isinstance(short[1], nn.BatchNorm2d)
    assert isinstance(model.layer1[0].shortcut, nn.Identity)
    assert not list(create("resnet20").layer2[0].shortcut.parameters())  # option A
    with pytest.raises(ValueError, match="resnet20 shortcut must be one of A, B"):
        create("resnet20", shortcut="C")


def test_densenet_bc_channels_and_bad_depth():
    model = create("densenet_bc", depth=100, growth_rate=24)
    # 48 + 16*24 = 432 -> 216 + 384 = 600 -> 300 + 384 = 684
    assert model.stage_channels == (432, 600, 684)
    with pytest.raises(ValueError, match="densenet_bc depth must be 6n\\+4"):
        create("densenet_bc", depth=99)


# ------------------------------------------------------------------- LatentBE's WRN


def test_wrn_latentbe_projects_the_raw_input_where_ours_projects_the_activated_one():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8)
    for preact in (True, False):
        block = WideBlock(4, 6, 2, 0.0, preact_shortcut=preact).eval()
        with torch.no_grad():
            act = torch.relu(block.bn1(x))
            residual = block.conv2(torch.relu(block.bn2(block.conv1(act))))
            expected = residual + block.shortcut(act if preact else x)
            assert torch.allclose(block(x), expected, atol=1e-6)
    ours, theirs = create("wrn", depth=28, width=4, num_classes=100), create("wrn_latentbe", num_classes=100)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}


# ------------------------------------------------------------------- Shake-Shake


def test_shake_mixes_forward_by_alpha_and_splits_the_gradient_by_beta():
    a, b = torch.randn(3, 2, 4, 4, requires_grad=True), torch.randn(3, 2, 4, 4, requires_grad=True)
    alpha, beta = torch.tensor([0.1, 0.5, 0.9]).view(3, 1, 1, 1), torch.tensor([0.7, 0.2, 0.4]).view(3, 1, 1, 1)
    out = _Shake.apply(a, b, alpha, beta)
    assert torch.allclose(out, alpha * a + (1 - alpha) * b)
    g = torch.randn_like(out)
    out.backward(g)
    assert torch.allclose(a.grad, beta * g) and torch.allclose(b.grad, (1 - beta) * g)


def test_shifted_skip_sees_the_input_and_the_input_shifted_right_and_down():
    skip = ShiftedSkip(1, 2, stride=1).eval()
    with torch.no_grad():
        for c in (skip.conv1, skip.conv2):
            c.weight.fill_(1.0), c.bias.zero_()
        x = torch.arange(16.0).view(1, 1, 4, 4)
        out = skip(x) * (1 + skip.bn.eps) ** 0.5  # undo eval BN's 1/sqrt(1 + eps)
    assert torch.allclose(out[0, 0], x[0, 0])
    shifted = torch.zeros(4, 4)
    shifted[1:, 1:] = x[0, 0, :-1, :-1]
    assert torch.allclose(out[0, 1], shifted)
    strided = ShiftedSkip(1, 2, stride=2).eval()
    assert strided(x).shape == (1, 2, 2, 2)


def test_shake_block_eval_is_the_half_mix_and_draws_nothing():
    torch.manual_seed(0)
    block = ShakeBlock(4, 4, 1).eval()
    x = torch.randn(2, 4, 6, 6)
    state = torch.get_rng_state()
    with torch.no_grad():
        out = block(x)
        assert torch.equal(out, block(x))
        assert torch.allclose(out, x + 0.5 * (block.branch1(x) + block.branch2(x)), atol=1e-6)
    assert torch.equal(torch.get_rng_state(), state)


def test_shake_shake_training_noise_is_per_image_and_replays_under_a_seed():
    torch.manual_seed(0)
    model = create("shake_shake26_2x96d", num_classes=5, widths=[8, 16, 32]).train()
    x = torch.randn(1, 3, 16, 16).expand(4, 3, 16, 16).contiguous()  # four copies of one image

    def run(seed):
        torch.manual_seed(seed)
        out = model(x)
        out.square().sum().backward()
        grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        return out.detach(), grads

    out, grads = run(1)
    again, grads_again = run(1)
    assert torch.equal(out, again) and all(torch.equal(g, h) for g, h in zip(grads, grads_again))
    other, _ = run(2)
    assert not torch.equal(out, other)
    # Per-image alpha: identical images get different outputs (BN in training mixes them only through statistics).
    assert not torch.allclose(out[0], out[1])
    model.eval()
    with torch.no_grad():
        ev = model(x)
    assert torch.allclose(ev[0], ev[1]) and torch.equal(ev, model(x).detach())
