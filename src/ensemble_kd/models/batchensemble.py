"""BatchEnsemble networks (Wen et al. 2020; LatentBE, Nam et al. 2022) and their collapse to one network.

    net = create("batchensemble", base="resnet20", members=4)
    log_p = net(x)                 # log of the members' mean probability, one fused pass
    plain = collapse(net)          # an ordinary resnet20 with the factors folded into its weights

A BatchEnsemble layer keeps one shared weight W (and bias b) and, per member i, an input factor
r_i and an output factor s_i: member i computes ((x ∘ r_i) · W + b) ∘ s_i ("shared" bias, as in
the LatentBE code, where the shared bias is scaled by s_i) or ((x ∘ r_i) · W + b_i) ∘ s_i
("member" bias). So member i's layer is the plain layer with weight W ∘ (s_i r_iᵀ).

The batch is tiled member-major: rows [i·B, (i+1)·B) belong to member i. Each layer scales the
rows of block i by r_i, runs the shared layer once for all M·B rows and scales block i by s_i,
so M members cost one matmul/conv per layer instead of M (and BatchNorm, shared, sees the tiled
batch). `BatchEnsembleNet` converts every nn.Conv2d and nn.Linear of any registered model in
place, so module paths (`net.layer1.0.0`, `net.fc`) still address the same places.

`collapse` folds the factors into the plain architecture (LatentBE's weight averaging):
W' = W ∘ (s̄ r̄ᵀ) with the members' mean factors ("product_of_means", the authors' code) or
W' = mean_i W ∘ (s_i r_iᵀ) ("mean_of_products"); every other parameter and buffer is copied.
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F
from torch import nn

from .multihead import ensemble_logits
from .registry import create, register_model
from .taps import unwrap

INITS = ("ones", "normal", "sign")
BIASES = ("shared", "member")
COLLAPSE_MODES = ("product_of_means", "mean_of_products")
MEMBERS_TAP = "members_out"  # the module whose output is the (M, B, K) member logits: a tap for methods


def _check_choice(what: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"BatchEnsemble {what} must be one of {', '.join(choices)}, got {value!r}.")


def _factor(members: int, size: int, init: str, like: torch.Tensor) -> nn.Parameter:
    """(members, size) factors: all 1 (LatentBE), N(1, 0.5), or random ±1."""
    f = torch.empty(members, size, device=like.device, dtype=like.dtype)
    with torch.no_grad():
        if init == "ones":
            f.fill_(1.0)
        elif init == "normal":
            f.normal_(1.0, 0.5)
        else:
            f.bernoulli_(0.5).mul_(2).sub_(1)
    return nn.Parameter(f)


class _BELayer(nn.Module):
    """What both BatchEnsemble layers share: factors, bias handling, the member-major blocks."""

    weight: nn.Parameter
    bias: nn.Parameter | None

    def _setup(self, layer: nn.Module, members: int, in_size: int, out_size: int, init: str, bias: str) -> None:
        if isinstance(members, bool) or not isinstance(members, int) or members < 1:
            raise ValueError(f"BatchEnsemble members must be a positive integer, got {members!r}.")
        _check_choice("init", init, INITS)
        _check_choice("bias", bias, BIASES)
        self.members, self.init, self.bias_mode = members, init, bias
        self.groups = getattr(layer, "groups", 1)
        # The plain layer's parameters become the shared ones (same tensors: no copy).
        self.weight = layer.weight
        if layer.bias is None:
            self.register_parameter("bias", None)  # "member" on a bias-free layer: it stays bias-free
        elif bias == "shared":
            self.bias = layer.bias
        else:
            self.bias = nn.Parameter(layer.bias.detach().clone().unsqueeze(0).repeat(members, 1))
        self.r = _factor(members, in_size, init, layer.weight)
        self.s = _factor(members, out_size, init, layer.weight)

    def _blocks(self, x: torch.Tensor) -> torch.Tensor:
        """x (M·B, C, ...) viewed as (M, B, C, ...); a clear error when M does not divide the batch."""
        n = x.shape[0]
        if n % self.members:
            raise ValueError(
                f"{type(self).__name__}: a batch of {n} rows is not divisible by members={self.members}; "
                f"BatchEnsemble layers expect the input tiled member-major (M·B rows, member i's rows "
                f"[i·B, (i+1)·B)); BatchEnsembleNet's forward tiles it for you.")
        return x.unflatten(0, (self.members, n // self.members))

    def _shared_bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        """The bias the shared layer adds itself (fused into its matmul/conv): the shared one only."""
        return self.bias.to(dtype) if self.bias is not None and self.bias_mode == "shared" else None

    def _scale_out(self, y: torch.Tensor, channel_dim: int) -> torch.Tensor:
        """(M, B, ...) shared-layer output -> + b_i ("member" bias), ∘ s_i; flattened back to M·B rows."""
        shape = [self.members] + [1] * (y.dim() - 1)
        shape[channel_dim] = -1
        if self.bias is not None and self.bias_mode == "member":
            y = y + self.bias.to(y.dtype).view(shape)
        return (y * self.s.to(y.dtype).view(shape)).flatten(0, 1)

    def _scale_in(self, x: torch.Tensor, channel_dim: int) -> torch.Tensor:
        shape = [self.members] + [1] * (x.dim() - 1)
        shape[channel_dim] = -1
        return x * self.r.to(x.dtype).view(shape)

    def grouped_factors(self, s: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """W viewed as (G, out/G, in/G, *kernel), and (.., out) and (.., in) factors viewed to broadcast
        against it. A grouped conv's output channel o reads only the input channels of its group, so
        member i's weight is W[o, j] · s_i[o] · r_i[group(o)·in/G + j] (G = 1: W ∘ s_i r_iᵀ)."""
        G, tail = self.groups, [1] * (self.weight.dim() - 2)
        W = self.weight.unflatten(0, (G, -1))
        return W, s.reshape(*s.shape[:-1], G, -1, 1, *tail), r.reshape(*r.shape[:-1], G, 1, -1, *tail)

    def member_weights(self) -> torch.Tensor:
        """(M, *W.shape): member i's effective weight W ∘ (s_i r_iᵀ) (broadcast over a kernel and groups)."""
        W, s, r = self.grouped_factors(self.s, self.r)
        return (W * s * r).flatten(1, 2)

    def member_biases(self) -> torch.Tensor | None:
        """(M, out): member i's effective bias b ∘ s_i or b_i ∘ s_i; None for a bias-free layer."""
        if self.bias is None:
            return None
        return self.bias * self.s  # (out,) or (M, out), broadcast against (M, out)

    def extra_repr(self) -> str:
        return f"members={self.members}, init={self.init!r}, bias={self.bias_mode!r}"


class BELinear(_BELayer):
    """BatchEnsemble version of an nn.Linear: member i computes ((x ∘ r_i) W + b) ∘ s_i.

    r: (M, in_features), s: (M, out_features). Inputs (M·B, *, in_features), member-major.
    """

    def __init__(self, linear: nn.Linear, members: int, init: str = "ones", bias: str = "shared"):
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"BELinear is built from an nn.Linear, got {type(linear).__name__}.")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._setup(linear, members, linear.in_features, linear.out_features, init, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xb = self._scale_in(self._blocks(x), -1)
        return self._scale_out(F.linear(xb, self.weight.to(xb.dtype), self._shared_bias(xb.dtype)), -1)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " + super().extra_repr()


class BEConv2d(_BELayer):
    """BatchEnsemble version of an nn.Conv2d: r scales input channels, s output channels.

    r: (M, in_channels), s: (M, out_channels), broadcast over H, W. Inputs (M·B, C, H, W), member-major.
    Grouped and depthwise convs too, as the LatentBE code (giung2): r scales all in_channels before the
    grouped conv, so member i's weight is W[o, j] · s_i[o] · r_i[group(o)·in/groups + j].
    """

    def __init__(self, conv: nn.Conv2d, members: int, init: str = "ones", bias: str = "shared"):
        super().__init__()
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"BEConv2d is built from an nn.Conv2d, got {type(conv).__name__}.")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride, self.dilation = conv.kernel_size, conv.stride, conv.dilation
        self.padding, self.padding_mode = conv.padding, conv.padding_mode
        self._pad_twice = conv._reversed_padding_repeated_twice  # for non-"zeros" padding modes
        self._setup(conv, members, conv.in_channels, conv.out_channels, init, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        xb = self._scale_in(self._blocks(x), 2).flatten(0, 1)
        w, b = self.weight.to(xb.dtype), self._shared_bias(xb.dtype)
        if self.padding_mode != "zeros":
            y = F.conv2d(F.pad(xb, self._pad_twice, mode=self.padding_mode), w, b, self.stride, 0, self.dilation,
                         self.groups)
        else:
            y = F.conv2d(xb, w, b, self.stride, self.padding, self.dilation, self.groups)
        return self._scale_out(y.unflatten(0, (self.members, n // self.members)), 2)

    def extra_repr(self) -> str:
        groups = f"groups={self.groups}, " if self.groups != 1 else ""
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                + groups + super().extra_repr())


# Subclasses whose forward is the plain layer's outside TorchScript: timm's Linear only casts the
# weight to the input's dtype when scripted (timm's MobileNetV3, EfficientNet heads use it).
PLAIN_EQUIVALENTS = frozenset({"timm.layers.linear.Linear"})


def _own_forward(layer: nn.Module) -> bool:
    """A Conv2d/Linear subclass computing something else (timm's Conv2dSame, StdConv2d): no plain layer."""
    if f"{type(layer).__module__}.{type(layer).__qualname__}" in PLAIN_EQUIVALENTS:
        return False
    plain = nn.Conv2d if isinstance(layer, nn.Conv2d) else nn.Linear
    return type(layer).forward is not plain.forward or getattr(type(layer), "_conv_forward", None) not in (
        None, nn.Conv2d._conv_forward)


@functools.lru_cache(maxsize=None)
def _forward_source(cls: type) -> str:
    try:
        return inspect.getsource(cls.forward)
    except (OSError, TypeError):  # no source (compiled, built in): nothing to read
        return ""


def _reads_weight_directly(parent: nn.Module, name: str) -> bool:
    """The parent's forward takes `self.<name>.weight` itself (nn.MultiheadAttention's out_proj,
    torchvision's Swin attention passing qkv.weight to a function) instead of calling the layer."""
    return f"self.{name}.weight" in _forward_source(type(parent))


def _convert(model: nn.Module, members: int, init: str, bias: str) -> None:
    """Replace every nn.Conv2d / nn.Linear below `model` by its BatchEnsemble version, in place."""
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent._modules.items()):
            if isinstance(child, (nn.Conv2d, nn.Linear)):
                path = f"{parent_name}.{name}" if parent_name else name
                # Its own forward (or the parent's, reading child.weight) would skip the factors.
                why = (f"it is a {type(child).__name__}, with a forward of its own" if _own_forward(child) else
                       f"its {type(parent).__name__} reads its weight directly"
                       if _reads_weight_directly(parent, name) else None)
                if why:
                    raise ValueError(f"cannot make layer {path!r} a BatchEnsemble layer: {why}; BatchEnsemble "
                                     f"converts plain nn.Conv2d and nn.Linear layers.")
                try:
                    be = (BEConv2d if isinstance(child, nn.Conv2d) else BELinear)(child, members, init, bias)
                except ValueError as err:
                    raise ValueError(f"cannot make layer {path!r} a BatchEnsemble layer: {err}") from None
                setattr(parent, name, be)


class BatchEnsembleNet(nn.Module):
    """M BatchEnsemble members of a registered architecture, run as one tiled batch.

    forward(x) -> (B, K) log of the members' mean probability (softmax of it is p_ens);
    for a multi-label base, logit(p_ens) (sigmoid gives it back). The (M, B, K) member logits
    pass through the identity module `members_out`, a tap for distillation methods.
    """

    def __init__(self, base: str = "small_cnn", num_classes: int = 10, in_channels: int = 3, members: int = 4,
                 init: str = "ones", bias: str = "shared", base_kwargs: dict | None = None, pretrained: bool = False):
        super().__init__()
        if isinstance(members, bool) or not isinstance(members, int) or members < 1:
            raise ValueError(f"batchensemble members must be a positive integer, got {members!r}.")
        _check_choice("init", init, INITS)
        _check_choice("bias", bias, BIASES)
        if base == "batchensemble":
            raise ValueError("batchensemble base must be a plain architecture, not 'batchensemble'.")
        # pretrained: the library's weights become the shared ones (with factors 1, every member is that net)
        net = create(base, num_classes=num_classes, in_channels=in_channels, pretrained=pretrained,
                     **dict(base_kwargs or {}))
        self.base_spec: dict = dict(net.spec)  # create(**base_spec) rebuilds the plain architecture
        _convert(net, members, init, bias)
        self.net = net
        self.members, self.init, self.bias_mode = members, init, bias
        self.multilabel = bool(getattr(net, "multilabel", False))
        self.members_out = nn.Identity()  # its output is the (M, B, K) member logits: a tap for the method

    def plain_base(self) -> nn.Module:
        """The plain architecture on the meta device (shapes only): what a base's weights file must fit."""
        with torch.device("meta"):
            return create(**self.base_spec)

    @torch.no_grad()
    def load_base_state(self, state: dict[str, torch.Tensor]) -> None:
        """A plain base network's weights as the shared ones, as `pretrained: true` puts the library's
        there: the factors keep their initialisation (with init "ones" every member is that network)."""
        state = dict(state)
        for path, layer in self.be_layers():
            key = f"{path}.bias" if path else "bias"
            if layer.bias_mode == "member" and layer.bias is not None:
                state[key] = state[key].unsqueeze(0).expand_as(layer.bias)  # every member's bias starts as it
        factors = {k: v for k, v in self.net.state_dict().items() if k not in state}
        self.net.load_state_dict({**state, **factors}, strict=True)

    def be_layers(self) -> list[tuple[str, _BELayer]]:
        """(path below `net`, layer) of every BatchEnsemble layer."""
        return [(n, m) for n, m in self.net.named_modules() if isinstance(m, _BELayer)]

    def factor_parameters(self) -> list[nn.Parameter]:
        """Every r and s (the members' own parameters; LatentBE decays them towards 1)."""
        return [p for _, m in self.be_layers() for p in (m.r, m.s)]

    def no_weight_decay(self) -> list[nn.Parameter]:
        """What the optimizer's weight decay leaves alone: the factors (pulled towards 1, not 0)."""
        return self.factor_parameters()

    def forward_members(self, x: torch.Tensor) -> torch.Tensor:
        """(M, B, K) member logits from one pass over the M-times tiled batch."""
        B = x.shape[0]
        tiled = x.repeat(self.members, *([1] * (x.dim() - 1)))  # member-major: [x; x; ...; x]
        return self.members_out(self.net(tiled).unflatten(0, (self.members, B)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # logsumexp_i log_softmax(z_i) - log M = log mean_i p_i (multihead's mixture, equal weights).
        return ensemble_logits(self.forward_members(x), None, self.multilabel)


@torch.no_grad()
def _fold(layer: _BELayer, mode: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The plain layer's (weight, bias) with the factors folded in."""
    r, s = layer.r, layer.s
    if mode == "product_of_means":
        W, s_bar, r_bar = layer.grouped_factors(s.mean(0), r.mean(0))
        weight = (W * s_bar * r_bar).flatten(0, 1)
    else:
        W, s_g, r_g = layer.grouped_factors(s, r)
        weight = (W * (s_g * r_g).mean(0)).flatten(0, 1)  # (G, out/G, in/G, 1..) products, not M weights
    if layer.bias is None:
        bias = None
    elif layer.bias_mode == "shared":
        bias = layer.bias * s.mean(0)  # the same in both modes: mean_i (b ∘ s_i) = b ∘ s̄
    elif mode == "mean_of_products":
        bias = (layer.bias * s).mean(0)
    else:
        bias = layer.bias.mean(0) * s.mean(0)
    return weight, bias


@torch.no_grad()
def collapse(model: BatchEnsembleNet, mode: str = "product_of_means") -> nn.Module:
    """One plain network, `create(**model.base_spec)`, with each BE layer's factors folded in.

    "product_of_means" (LatentBE's code): W' = W ∘ (s̄ r̄ᵀ), bias b ∘ s̄ (shared) or mean_i(b_i) ∘ s̄;
    "mean_of_products": W' = mean_i W ∘ (s_i r_iᵀ), bias mean_i(b ∘ s_i) or mean_i(b_i ∘ s_i).
    BatchNorm and every other parameter and buffer are copied. The result lives on the BE model's
    device, in its train/eval mode, and has the original layer types (nn.Conv2d, nn.Linear).
    """
    _check_choice("collapse mode", mode, COLLAPSE_MODES)
    inner = unwrap(model)
    if not isinstance(inner, BatchEnsembleNet):
        raise TypeError(f"collapse takes a BatchEnsembleNet, got {type(inner).__name__}.")
    state = {k: v.detach().clone() for k, v in inner.net.state_dict().items()}
    for path, layer in inner.be_layers():
        prefix = f"{path}." if path else ""
        del state[prefix + "r"], state[prefix + "s"]
        weight, bias = _fold(layer, mode)
        state[prefix + "weight"] = weight
        if bias is not None:
            state[prefix + "bias"] = bias
    ref = next(inner.net.parameters())
    plain = create(**inner.base_spec).to(device=ref.device, dtype=ref.dtype)
    plain.load_state_dict(state)  # strict: the plain architecture must take every tensor
    return plain.train(inner.training)


@register_model("batchensemble")
def batchensemble(num_classes: int = 10, in_channels: int = 3, base: str = "small_cnn", members: int = 4,
                  init: str = "ones", bias: str = "shared", base_kwargs: dict | None = None,
                  pretrained: bool = False) -> BatchEnsembleNet:
    """BatchEnsemble version of `base` (any registered model): every Conv2d/Linear gets M members' factors."""
    return BatchEnsembleNet(base, num_classes, in_channels, members, init, bias, base_kwargs, pretrained)


__all__ = ["BEConv2d", "BELinear", "BatchEnsembleNet", "MEMBERS_TAP", "batchensemble", "collapse"]
