"""timm and torchvision architectures by name: `timm/<name>`, `torchvision/<name>`.

The libraries are imported only when such a name is built or listed, so the package works
without them. Each builder maps our two dataset arguments to the library's (timm: num_classes,
in_chans; torchvision: num_classes, and a new stem convolution for in_channels != 3), passes
every other keyword through, and names the model's stage ends as `tap_points` (timm's
feature_info; torchvision's layer1..layer4, or the blocks before each stride-2 block of
`features`), so MEAL and AE-KD tap them by module path like our own models.
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any, Callable

import torch
from torch import nn

INSTALL = "install the vision extra: pip install 'ensemble-kd[vision]'"
NO_HUB = ("its pretrained weights are not in the local cache and cannot be downloaded ({why}); "
          "download them elsewhere and point `weights:` at the .safetensors/.pth file instead")


class PretrainedUnavailable(ValueError):
    """pretrained: true, but the library's cache is empty and its download failed."""


def _library(name: str):
    try:
        return importlib.import_module(name)
    except ImportError:
        raise ValueError(f"model names 'timm/...' and 'torchvision/...' need {name}; {INSTALL}.") from None


def _unknown(source: str, arch: str, names: list[str]) -> ValueError:
    close = difflib.get_close_matches(arch, names, n=3)
    hint = f" (did you mean {', '.join(f'{source}/{c}' for c in close)}?)" if close else ""
    return ValueError(f"{source} has no model {arch!r}{hint}; `ensemble-kd models '{source}/*'` lists them.")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# ---------------------------------------------------------------------------- timm

def build_timm(arch: str, num_classes: int, in_channels: int, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    timm = _library("timm")
    if not timm.is_model(arch):
        raise _unknown("timm", arch, timm.list_models())
    try:
        model = timm.create_model(arch, pretrained=pretrained, num_classes=num_classes, in_chans=in_channels,
                                  **kwargs)
    except OSError as err:  # hub cache empty and no network (huggingface_hub, urllib errors are OSErrors)
        if not pretrained:
            raise
        raise PretrainedUnavailable(f"timm/{arch}: " + NO_HUB.format(why=_first_line(err))) from None
    model.tap_points = timm_stage_ends(model)
    model.input_config = timm_input(model)
    return model


def timm_stage_ends(model: nn.Module) -> tuple[str, ...]:
    """The last module at each resolution (reduction >= 4, the stem left out) of timm's feature_info,
    the four deepest (a ResNet's layer1..layer4)."""
    info = getattr(model, "feature_info", None) or []
    last: dict[int, str] = {}
    for entry in info:
        if entry.get("reduction", 0) >= 4 and entry.get("module"):
            last[entry["reduction"]] = entry["module"]
    return tuple(last[r] for r in sorted(last))[-4:]


def timm_input(model: nn.Module) -> dict | None:
    """{mean, std, size} the model's timm weights were trained with (its pretrained_cfg)."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    if "mean" not in cfg or "std" not in cfg:
        return None
    size = cfg.get("input_size")
    return {"mean": list(cfg["mean"]), "std": list(cfg["std"]), "size": list(size[-2:]) if size else None}


# ---------------------------------------------------------------------------- torchvision

def build_torchvision(arch: str, num_classes: int, in_channels: int, pretrained: bool = False,
                      **kwargs: Any) -> nn.Module:
    models = _library("torchvision.models")
    if arch not in models.list_models():
        raise _unknown("torchvision", arch, models.list_models())
    if not pretrained:
        model = models.get_model(arch, num_classes=num_classes, **kwargs)
    else:
        weights = models.get_model_weights(arch).DEFAULT
        try:
            model = models.get_model(arch, weights=weights, **kwargs)
        except OSError as err:  # torch.hub's download: URLError and friends
            raise PretrainedUnavailable(f"torchvision/{arch}: " + NO_HUB.format(why=_first_line(err))) from None
        if len(weights.meta.get("categories") or ()) != num_classes:
            _replace_classifier(model, num_classes)  # the pretrained body, a new head for this dataset
    if in_channels != 3:
        _replace_stem(model, arch, in_channels)
    model.tap_points = torchvision_stage_ends(model)
    model.input_config = torchvision_input(models, arch)
    return model


def torchvision_input(models, arch: str) -> dict | None:
    """{mean, std, size} of the architecture's default torchvision weights (their eval transforms)."""
    try:
        transforms = models.get_model_weights(arch).DEFAULT.transforms()
    except (ValueError, KeyError, AttributeError):  # an architecture without published weights
        return None
    if not hasattr(transforms, "mean"):
        return None
    size = list(getattr(transforms, "crop_size", None) or [])
    return {"mean": list(transforms.mean), "std": list(transforms.std),
            "size": (size * 2 if len(size) == 1 else size) or None}


def _last_of(model: nn.Module, kind: type) -> tuple[str, nn.Module] | None:
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, kind)]
    return found[-1] if found else None


def _set(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


def _replace_classifier(model: nn.Module, num_classes: int) -> None:
    path, linear = _last_of(model, nn.Linear)
    _set(model, path, nn.Linear(linear.in_features, num_classes, bias=linear.bias is not None))


def _replace_stem(model: nn.Module, arch: str, in_channels: int) -> None:
    """A first convolution taking `in_channels`; pretrained RGB filters are summed (one channel) or
    tiled and rescaled (more), as timm adapts its stems, so the pretrained features survive."""
    first = next(((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)
    if first is None or first[1].in_channels != 3 or first[1].groups != 1:
        raise ValueError(f"torchvision/{arch} takes 3 input channels and has no plain first convolution to "
                         f"replace; use 3-channel data or a timm/ model (in_chans).")
    path, conv = first
    new = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    bias=conv.bias is not None, padding_mode=conv.padding_mode)
    with torch.no_grad():
        w = conv.weight
        if in_channels == 1:
            new.weight.copy_(w.sum(1, keepdim=True))
        else:
            new.weight.copy_(w.repeat(1, -(-in_channels // 3), 1, 1)[:, :in_channels] * (3 / in_channels))
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    _set(model, path, new)


def torchvision_stage_ends(model: nn.Module) -> tuple[str, ...]:
    """ResNets' layer1..layer4; for a `features` Sequential (MobileNet, EfficientNet, ConvNeXt, VGG, ...)
    the block before each block that downsamples, and the last one (the four deepest); ViT's last
    encoder layer."""
    if all(hasattr(model, f"layer{i}") for i in range(1, 5)):
        return ("layer1", "layer2", "layer3", "layer4")
    features = getattr(model, "features", None)
    if isinstance(features, nn.Sequential) and len(features) > 1:
        names = list(features._modules)

        def downsamples(block: nn.Module) -> bool:
            return any(isinstance(m, (nn.Conv2d, nn.MaxPool2d)) and _stride(m) > 1 for m in block.modules())

        ends = [f"features.{names[i - 1]}" for i in range(2, len(names)) if downsamples(features[i])]
        return tuple(dict.fromkeys(ends + [f"features.{names[-1]}"]))[-4:]  # the four deepest, as ResNets
    layers = getattr(getattr(model, "encoder", None), "layers", None)
    if isinstance(layers, nn.Sequential) and len(layers):
        return (f"encoder.layers.{list(layers._modules)[-1]}",)
    return ()


def _stride(m: nn.Module) -> int:
    s = m.stride
    return max(s) if isinstance(s, tuple) else int(s)


# ---------------------------------------------------------------------------- listing

def library_models(source: str) -> list[str]:
    """All names the library can build, prefixed (`timm/resnet18`); [] when it is not installed."""
    try:
        if source == "timm":
            return [f"timm/{n}" for n in importlib.import_module("timm").list_models()]
        if source == "torchvision":
            return [f"torchvision/{n}" for n in importlib.import_module("torchvision.models").list_models()]
    except ImportError:
        return []
    raise ValueError(f"unknown model source {source!r}")


BUILDERS: dict[str, Callable[..., nn.Module]] = {"timm": build_timm, "torchvision": build_torchvision}
