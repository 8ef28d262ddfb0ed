"""timm and torchvision ResNets (and ResNeXts) through the stage contract (models/stages.py).

    net = create("timm/resnet50")
    expose_stages(net)      # stem conv1/bn1/act/maxpool, stages layer1..layer4, head pool + fc
    branch = at_widths(net, "timm/resnet50", 1000, 3, {}, widths, at=3)  # layer4 and fc rebuilt narrower

A library ResNet has no `widths` argument, so the multi-head builder asks this module for a member
whose stages from `at` on are narrower, built with the library's own blocks: timm's ResNet takes
the per-stage planes as `channels`; torchvision's is rebuilt stage by stage with its `_make_layer`
and initialised as its constructor does. A width is a stage's output channels; the block's planes
are width / expansion (4 for bottlenecks), rounded. The width config (multihead's branch_widths,
the EnsembleNet paper's tables) counts planes: `width_unit` is the expansion. timm's SE-ResNets
(`timm/seresnet152`) are timm ResNets with SE blocks, rebuilt the same way (timm's SE module
sizes its reduction from the block's channels).
"""

from __future__ import annotations

import sys

from torch import nn

from .registry import create


def resnet_kind(model: nn.Module) -> str | None:
    """'timm' or 'torchvision' for the libraries' ResNet classes, else None (never imports them)."""
    for kind, module in (("timm", "timm.models.resnet"), ("torchvision", "torchvision.models.resnet")):
        lib = sys.modules.get(module)
        if lib is not None and isinstance(model, lib.ResNet):
            return kind
    return None


def _stage_out(stage: nn.Sequential) -> int:
    last = stage[-1]
    return (last.conv3 if hasattr(last, "conv3") else last.conv2).out_channels


def expose_stages(model: nn.Module) -> bool:
    """Give a library ResNet the stage contract's names in place; False (untouched) for anything else."""
    kind = resnet_kind(model)
    if kind is None:
        return False
    model.stem_points = ("conv1", "bn1", "act1" if kind == "timm" else "relu", "maxpool")
    model.tap_points = ("layer1", "layer2", "layer3", "layer4")
    model.head_points = ("global_pool", "fc") if kind == "timm" else ("avgpool", "fc")
    model.stage_channels = tuple(_stage_out(getattr(model, p)) for p in model.tap_points)
    model.width_unit = type(model.layer1[0]).expansion  # width config = planes (a paper's bottleneck widths)
    return True


def _planes(model: nn.Module, widths) -> list[int]:
    expansion = type(model.layer1[0]).expansion
    return [max(1, round(w / expansion)) for w in widths]


def at_widths(base_model: nn.Module, base: str, num_classes: int, in_channels: int, kwargs: dict, widths,
              at: int) -> nn.Module | None:
    """A new `create(base, ...)` like `base_model` (a library ResNet built from those arguments) with
    stages `at`.. at `widths[at:]` and its fc to match, or None when `base_model` is no library ResNet."""
    kind = resnet_kind(base_model)
    if kind is None:
        return None
    planes = _planes(base_model, widths)
    if kind == "timm":
        # timm's own constructor takes the planes per stage; the stages below `at` keep the base's.
        keep = _planes(base_model, [_stage_out(getattr(base_model, f"layer{i + 1}")) for i in range(4)])
        model = create(base, num_classes=num_classes, in_channels=in_channels,
                       **{**kwargs, **_se_ratio_kept(base_model), "channels": tuple(keep[:at] + planes[at:])})
    else:
        model = create(base, num_classes=num_classes, in_channels=in_channels, **kwargs)
        _rebuild_torchvision(model, planes, at, num_classes, kwargs)
    expose_stages(model)
    return model


def _se_ratio_kept(model: nn.Module) -> dict:
    """timm's block arguments that keep an SE-ResNet's reduction ratio exact in narrower stages: timm
    rounds the SE's reduced channels up to a multiple of 8 (704 / 16 = 44 -> 48), the SE-ResNet's
    ratio (16, as the EnsembleNet paper sets it) gives 44. Empty for blocks without timm's SEModule."""
    se = getattr(model.layer1[0], "se", None)
    if type(se).__name__ != "SEModule":
        return {}
    from functools import partial

    from timm.layers import SEModule

    ratio = se.fc1.out_channels / se.fc1.in_channels  # the base's own, e.g. 1/16
    return {"block_args": {"attn_layer": partial(SEModule, rd_ratio=ratio, rd_divisor=1)}}


def _rebuild_torchvision(model: nn.Module, planes: list[int], at: int, num_classes: int, kwargs: dict) -> None:
    if model.dilation != 1:  # _make_layer's dilation state would have to be replayed stage by stage
        raise ValueError("a torchvision ResNet with replace_stride_with_dilation cannot be rebuilt at other widths; "
                         "branch a ResNet without dilation.")
    block = type(model.layer1[0])
    model.inplanes = model.bn1.num_features if at == 0 else _stage_out(getattr(model, f"layer{at}"))
    for i in range(at, 4):
        old = getattr(model, f"layer{i + 1}")
        stage = model._make_layer(block, planes[i], len(old), stride=1 if i == 0 else 2)
        for m in stage.modules():  # torchvision's constructor's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight), nn.init.zeros_(m.bias)
            if kwargs.get("zero_init_residual") and isinstance(m, block):
                nn.init.zeros_((m.bn3 if hasattr(m, "bn3") else m.bn2).weight)
        setattr(model, f"layer{i + 1}", stage)
    model.fc = nn.Linear(model.inplanes, num_classes)
