"""BatchEnsemble layers and networks (METHODS.md §4): members equal separate layers, collapse folds exactly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ensemble_kd.models import create, forward_with_taps, list_models, register_model, resolve_module
from ensemble_kd.models.batchensemble import (
    BatchEnsembleNet,
    BEConv2d,
    BELinear,
    collapse,
)

INITS = ("ones", "normal", "sign")
BIASES = ("shared", "member")
MODES = ("product_of_means", "mean_of_products")


def _randomise_member_biases(layer) -> None:
    """Member biases start as copies of b; make them differ so the test can tell them apart."""
    if layer.bias is not None and layer.bias_mode == "member":
        with torch.no_grad():
            layer.bias.add_(torch.randn_like(layer.bias))


def _member_bias(layer, i):
    if layer.bias is None:
        return None
    b = layer.bias if layer.bias_mode == "shared" else layer.bias[i]
    return b * layer.s[i]


# --------------------------------------------------------------------------- (a) the layers
@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("bias", BIASES)
def test_be_linear_equals_separate_member_layers(init, bias):
    torch.manual_seed(0)
    M, B = 3, 4
    be = BELinear(nn.Linear(5, 7, dtype=torch.float64), M, init=init, bias=bias)
    _randomise_member_biases(be)
    x = torch.randn(M * B, 2, 5, dtype=torch.float64)  # extra dim: Linear takes (N, *, in)
    y = be(x)
    assert y.shape == (M * B, 2, 7)
    for i in range(M):
        W_i = be.weight * torch.outer(be.s[i], be.r[i])
        torch.testing.assert_close(y[i * B:(i + 1) * B], F.linear(x[i * B:(i + 1) * B], W_i, _member_bias(be, i)))
        torch.testing.assert_close(be.member_weights()[i], W_i)
        torch.testing.assert_close(be.member_biases()[i], _member_bias(be, i))


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("bias", BIASES)
@pytest.mark.parametrize("conv_kw", [{"padding": 1}, {"stride": 2, "padding": 1, "padding_mode": "reflect"},
                                     {"kernel_size": 1, "bias": False}])
def test_be_conv2d_equals_separate_member_layers(init, bias, conv_kw):
    torch.manual_seed(1)
    M, B = 2, 3
    kw = {"kernel_size": 3, "dtype": torch.float64} | conv_kw
    conv = nn.Conv2d(4, 6, **kw)
    be = BEConv2d(conv, M, init=init, bias=bias)
    _randomise_member_biases(be)
    x = torch.randn(M * B, 4, 7, 7, dtype=torch.float64)
    y = be(x)
    for i in range(M):
        member = nn.Conv2d(4, 6, **kw)
        with torch.no_grad():
            member.weight.copy_(be.weight * be.s[i].view(-1, 1, 1, 1) * be.r[i].view(1, -1, 1, 1))
            if member.bias is not None:
                member.bias.copy_(_member_bias(be, i))
        torch.testing.assert_close(y[i * B:(i + 1) * B], member(x[i * B:(i + 1) * B]))


@pytest.mark.parametrize("bias", BIASES)
@pytest.mark.parametrize("channels,groups", [((4, 6), 2), ((6, 6), 6), ((3, 6), 3)])  # grouped, depthwise, x2
def test_be_grouped_conv_equals_separate_member_grouped_convs(bias, channels, groups):
    """As the LatentBE code: r scales every input channel before the grouped conv, s every output."""
    torch.manual_seed(11)
    M, B = 3, 2
    c_in, c_out = channels
    conv = nn.Conv2d(c_in, c_out, 3, padding=1, groups=groups, dtype=torch.float64)
    be = BEConv2d(conv, M, init="normal", bias=bias)
    _randomise_member_biases(be)
    x = torch.randn(M * B, c_in, 5, 5, dtype=torch.float64)
    y = be(x)
    per_group_in, per_group_out = c_in // groups, c_out // groups
    # the input channel that weight entry [o, j] reads: group(o)·in/groups + j
    reads = (torch.arange(c_out)[:, None] // per_group_out) * per_group_in + torch.arange(per_group_in)
    for i in range(M):
        member = nn.Conv2d(c_in, c_out, 3, padding=1, groups=groups, dtype=torch.float64)
        W_i = be.weight * be.s[i].view(-1, 1, 1, 1) * be.r[i][reads][..., None, None]
        with torch.no_grad():
            member.weight.copy_(W_i)
            member.bias.copy_(_member_bias(be, i))
        torch.testing.assert_close(y[i * B:(i + 1) * B], member(x[i * B:(i + 1) * B]))
        torch.testing.assert_close(be.member_weights()[i], W_i)
        # the same member as a plain conv on r_i-scaled inputs, then s_i: the factorisation itself
        plain = F.conv2d(x[i * B:(i + 1) * B] * be.r[i].view(1, -1, 1, 1), be.weight, None, 1, 1, 1, groups)
        expected = plain + (be.bias if bias == "shared" else be.bias[i]).view(1, -1, 1, 1)
        torch.testing.assert_close(y[i * B:(i + 1) * B], expected * be.s[i].view(1, -1, 1, 1))


def test_be_layers_take_over_the_plain_parameters_and_init_factors_as_asked():
    torch.manual_seed(2)
    lin = nn.Linear(40, 50)
    be = BELinear(lin, 8, init="ones", bias="shared")
    assert be.weight is lin.weight and be.bias is lin.bias
    assert torch.equal(be.r, torch.ones(8, 40)) and torch.equal(be.s, torch.ones(8, 50))
    sign = BELinear(nn.Linear(40, 50), 8, init="sign")
    assert set(sign.r.unique().tolist()) == {-1.0, 1.0}
    normal = BELinear(nn.Linear(400, 500), 8, init="normal")
    assert abs(normal.s.mean().item() - 1) < 0.05 and abs(normal.s.std().item() - 0.5) < 0.05
    member = BELinear(nn.Linear(40, 50), 8, bias="member")
    assert member.bias.shape == (8, 50) and torch.equal(member.bias[3], member.bias[0])
    bias_free = BELinear(nn.Linear(40, 50, bias=False), 8, bias="member")
    assert bias_free.bias is None and "bias" not in dict(bias_free.named_parameters())


def test_gradients_reach_shared_weights_member_biases_and_factors():
    torch.manual_seed(3)
    for be in (BELinear(nn.Linear(5, 3), 2, init="normal", bias="member"),
               BEConv2d(nn.Conv2d(3, 4, 3, bias=True), 2, init="normal", bias="shared")):
        x = torch.randn(4, *((5,) if isinstance(be, BELinear) else (3, 6, 6)))
        be(x).square().sum().backward()
        for name, p in be.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name


# --------------------------------------------------------------------------- (b) collapse folds the factors
def _hand_folded_state(be: BatchEnsembleNet, mode: str) -> dict:
    """The plain state dict, folding member by member (loops, not the module's vectorised code)."""
    state = {k: v.detach().clone() for k, v in be.net.state_dict().items() if not k.endswith((".r", ".s"))}
    for path, layer in be.be_layers():
        M = layer.members
        tail = [1] * (layer.weight.dim() - 2)
        out_ch, per_group_in = layer.weight.shape[:2]
        groups = getattr(layer, "groups", 1)
        reads = (torch.arange(out_ch)[:, None] // (out_ch // groups)) * per_group_in + torch.arange(per_group_in)
        ws = [layer.weight * layer.s[i].view(-1, 1, *tail) * layer.r[i][reads].view(out_ch, per_group_in, *tail)
              for i in range(M)]
        if mode == "mean_of_products":
            w = sum(ws) / M
        else:
            r_bar = layer.r.mean(0)[reads].view(out_ch, per_group_in, *tail)
            w = layer.weight * layer.s.mean(0).view(-1, 1, *tail) * r_bar
        state[f"{path}.weight"] = w.detach()
        if layer.bias is not None:
            if layer.bias_mode == "shared":
                b = layer.bias * layer.s.mean(0)
            elif mode == "mean_of_products":
                b = sum(layer.bias[i] * layer.s[i] for i in range(M)) / M
            else:
                b = layer.bias.mean(0) * layer.s.mean(0)
            state[f"{path}.bias"] = b.detach()
    return state


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bias", BIASES)
@pytest.mark.parametrize("base,base_kwargs", [("small_cnn", {"width": 0.25}), ("mobilenetv2", {"width_mult": 0.25})])
def test_collapse_equals_the_plain_architecture_with_hand_folded_weights(mode, bias, base, base_kwargs):
    torch.manual_seed(4)
    be = create("batchensemble", num_classes=5, in_channels=1, base=base, members=3, init="normal",
                bias=bias, base_kwargs=base_kwargs)
    if base == "mobilenetv2":
        assert any(layer.groups > 1 for _, layer in be.be_layers())  # depthwise convs folded too
    for _, layer in be.be_layers():
        _randomise_member_biases(layer)
    x = torch.randn(6, 1, 8, 8)
    be.train()
    be(x)  # BatchNorm running statistics away from their defaults, so copying them is checked
    be.eval()
    plain = create(**be.base_spec)
    plain.load_state_dict(_hand_folded_state(be, mode))
    plain.eval()
    collapsed = collapse(be, mode)
    assert not collapsed.training
    torch.testing.assert_close(collapsed(x), plain(x))
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(collapsed.state_dict()[k], v, msg=k)


# --------------------------------------------------------------------------- (c) the exact case
def test_bias_free_linear_collapse_is_the_member_mean_when_the_input_factor_is_shared():
    torch.manual_seed(5)
    be = create("batchensemble", num_classes=4, in_channels=2, base="mlp", members=4, init="normal",
                base_kwargs={"hidden_sizes": (), "image_size": 3}).double().eval()
    fc = be.net.fc
    with torch.no_grad():
        fc.bias.zero_()  # a zero shared bias: b ∘ s̄ = 0, the layer acts bias-free
    _assert_collapse_is_the_member_mean(be, fc, torch.randn(5, 2, 3, 3, dtype=torch.float64))
    assert all(collapse(be, mode).fc.weight.dtype == torch.float64 for mode in MODES)


def _assert_collapse_is_the_member_mean(be, layer, x):
    """For a network linear in the BE layer's weight: the mean of products is the mean of the member maps
    for any factors, the product of means differs, and both are exact once the input factor is shared."""
    differing = be.forward_members(x).mean(0)
    torch.testing.assert_close(collapse(be, "mean_of_products")(x), differing, rtol=0, atol=1e-12)
    assert not torch.allclose(collapse(be, "product_of_means")(x), differing, atol=1e-6)
    with torch.no_grad():
        layer.r.copy_(layer.r[:1].expand_as(layer.r))  # one shared input factor
    mean = be.forward_members(x).mean(0)
    for mode in MODES:
        torch.testing.assert_close(collapse(be, mode)(x), mean, rtol=0, atol=1e-12)


@register_model("test_grouped_conv")
def _grouped_conv(num_classes: int = 10, in_channels: int = 3, groups: int = 2) -> nn.Module:
    """One bias-free grouped conv: a network linear in its weight, so collapse can be exact."""
    return nn.Sequential(nn.Conv2d(in_channels, num_classes, 3, padding=1, groups=groups, bias=False))


@pytest.mark.parametrize("groups", [2, 6])  # grouped and depthwise
def test_grouped_conv_collapse_is_the_member_mean_when_the_input_factor_is_shared(groups):
    torch.manual_seed(12)
    be = create("batchensemble", num_classes=6, in_channels=6, base="test_grouped_conv", members=4,
                init="normal", base_kwargs={"groups": groups}).double().eval()
    (_, conv), = be.be_layers()
    _assert_collapse_is_the_member_mean(be, conv, torch.randn(3, 6, 5, 5, dtype=torch.float64))


# --------------------------------------------------------------------------- (d) networks
NETS = [("small_cnn", 1, {"width": 0.25}), ("resnet20", 3, {}), ("wrn16_1", 3, {}),
        ("mobilenetv2", 3, {"width_mult": 0.25})]


@pytest.mark.parametrize("base,in_channels,base_kwargs", NETS)
def test_batchensemble_net_shapes_mean_probability_and_collapse(base, in_channels, base_kwargs):
    torch.manual_seed(6)
    M, B, K = 3, 4, 7
    be = create("batchensemble", num_classes=K, in_channels=in_channels, base=base, members=M, init="normal",
                base_kwargs=base_kwargs)
    x = torch.randn(B, in_channels, 8, 8)
    out, taps = forward_with_taps(be, x, ["members_out", "net.layer1"])
    assert out.shape == (B, K) and taps["members_out"].shape == (M, B, K)
    assert taps["net.layer1"].shape[0] == M * B  # features are member-major tiled
    torch.testing.assert_close(out.softmax(-1), taps["members_out"].softmax(-1).mean(0))
    first = {"small_cnn": "net.layer1.0.0", "mobilenetv2": "net.layer1.0.conv.0.0"}.get(base, "net.layer1.0.conv1")
    assert isinstance(resolve_module(be, first), BEConv2d)  # module paths kept
    assert isinstance(be.net.fc, BELinear) and be.members == M
    n_layers = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in create(**be.base_spec).modules())
    assert len(be.be_layers()) == n_layers and len(be.factor_parameters()) == 2 * n_layers
    out.logsumexp(-1).sum().neg().backward()  # any loss on the ensemble output
    assert all(p.grad is not None for p in be.parameters())

    for mode in MODES:
        collapsed = collapse(be, mode)
        assert not any(isinstance(m, (BELinear, BEConv2d)) for m in collapsed.modules())
        assert collapsed.spec == be.base_spec
        plain = create(**be.base_spec)
        plain.load_state_dict(collapsed.state_dict())  # strict
        assert collapsed(x).shape == (B, K)


@pytest.mark.parametrize("base,in_channels,base_kwargs", NETS[:3])  # depthwise: test_library_resnets.py
@pytest.mark.parametrize("mode", MODES)
def test_collapse_of_a_fresh_ones_net_is_the_base_network(base, in_channels, base_kwargs, mode):
    torch.manual_seed(7)
    reference = create(base, num_classes=5, in_channels=in_channels, **base_kwargs)
    torch.manual_seed(7)  # the same draws: the BE builder creates the base first, "ones" draws nothing
    be = create("batchensemble", num_classes=5, in_channels=in_channels, base=base, members=2,
                base_kwargs=base_kwargs)
    x = torch.randn(3, in_channels, 8, 8)
    # Eval first: a training step updates BN's running variance with the unbiased correction over the
    # tiled batch (M·B·H·W values, not B·H·W), so the running statistics would part slightly.
    for train in (False, True):
        reference.train(train), be.train(train)
        collapsed = collapse(be, mode)
        assert torch.equal(collapsed(x), reference(x))
        # Every member is the base network (BN on the tiled batch sees the same statistics).
        torch.testing.assert_close(be.forward_members(x), reference(x).expand(2, -1, -1))


# --------------------------------------------------------------------------- (e) bad inputs
def test_bad_inputs_give_clear_errors():
    with pytest.raises(ValueError, match="not divisible by members=2"):
        BELinear(nn.Linear(3, 2), 2)(torch.randn(5, 3))
    with pytest.raises(ValueError, match="not divisible by members=3"):
        BEConv2d(nn.Conv2d(3, 2, 1), 3)(torch.randn(4, 3, 2, 2))
    with pytest.raises(ValueError, match="init must be one of ones, normal, sign"):
        BELinear(nn.Linear(3, 2), 2, init="uniform")
    with pytest.raises(ValueError, match="bias must be one of shared, member"):
        BEConv2d(nn.Conv2d(3, 2, 1), 2, bias="none")
    with pytest.raises(ValueError, match="members must be a positive integer"):
        BELinear(nn.Linear(3, 2), 0)
    with pytest.raises(TypeError, match="built from an nn.Linear"):
        BELinear(nn.Conv2d(3, 2, 1), 2)
    with pytest.raises(ValueError, match="init must be one of"):
        create("batchensemble", base="small_cnn", init="zeros")
    with pytest.raises(ValueError, match="members must be a positive integer"):
        create("batchensemble", base="small_cnn", members=0)
    with pytest.raises(ValueError, match="plain architecture"):
        create("batchensemble", base="batchensemble")
    with pytest.raises(ValueError, match="unknown model"):
        create("batchensemble", base="no_such_net")
    be = create("batchensemble", in_channels=1, base="small_cnn", members=2, base_kwargs={"width": 0.25})
    with pytest.raises(ValueError, match="collapse mode must be one of product_of_means, mean_of_products"):
        collapse(be, "median")
    with pytest.raises(TypeError, match="takes a BatchEnsembleNet"):
        collapse(create("small_cnn", in_channels=1, width=0.25))


class _SameConv(nn.Conv2d):
    """A conv with its own forward, like timm's Conv2dSame: converting it would drop that forward."""

    def forward(self, x):
        return super().forward(F.pad(x, (0, 1, 0, 1)))


@register_model("test_own_forward_conv")
def _own_forward_conv(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return nn.Sequential(nn.Sequential(_SameConv(in_channels, num_classes, 2)))


def test_a_layer_with_its_own_forward_is_named_and_refused():
    with pytest.raises(ValueError, match=r"cannot make layer '0.0' a BatchEnsemble layer: it is a _SameConv, .*"
                                         r"plain nn.Conv2d and nn.Linear"):
        create("batchensemble", base="test_own_forward_conv")
    with pytest.raises(ValueError, match=r"layer '0.out_proj' .* its MultiheadAttention reads its weight"):
        create("batchensemble", base="test_attention")  # attention reads out_proj.weight itself


@register_model("test_attention")
def _attention(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return nn.Sequential(nn.MultiheadAttention(in_channels * 2, 2))


# --------------------------------------------------------------------------- (f) registry round trip
def test_registry_round_trip_rebuilds_the_same_network():
    torch.manual_seed(8)
    assert "batchensemble" in list_models()
    be = create("batchensemble", num_classes=5, in_channels=1, base="small_cnn", members=3, init="sign",
                bias="member", base_kwargs={"width": 0.25}).eval()
    assert be.spec["name"] == "batchensemble" and be.spec["members"] == 3
    again = create(**be.spec).eval()
    again.load_state_dict(be.state_dict())
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(again(x), be(x))
    assert torch.equal(collapse(again)(x), collapse(be)(x))


# --------------------------------------------------------------------------- a pretrained base
@register_model("test_pretrained_cnn")
def _pretrained_cnn(num_classes: int = 10, in_channels: int = 3, widths=None, pretrained: bool = False) -> nn.Module:
    """small_cnn whose 'library weights' are a recognisable constant (no download in a test)."""
    net = create("small_cnn", num_classes=num_classes, in_channels=in_channels, width=0.25, widths=widths)
    if pretrained:
        with torch.no_grad():
            for p in net.parameters():
                p.fill_(0.01)
    return net


def test_a_pretrained_base_becomes_the_shared_weights_and_every_member():
    be = create("batchensemble", num_classes=3, in_channels=1, base="test_pretrained_cnn", members=2,
                pretrained=True).eval()
    assert all(torch.all(p == 0.01) for n, p in be.net.named_parameters() if not n.endswith((".r", ".s")))
    assert "pretrained" not in be.spec and "pretrained" not in be.base_spec  # the checkpoint carries them
    reference = create("test_pretrained_cnn", num_classes=3, in_channels=1, pretrained=True).eval()
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(be.forward_members(x), reference(x).expand(2, -1, -1))
    torch.testing.assert_close(collapse(be).eval()(x), reference(x))
    with pytest.raises(ValueError, match="'small_cnn' has no pretrained weights of its own"):
        create("batchensemble", base="small_cnn", pretrained=True)
