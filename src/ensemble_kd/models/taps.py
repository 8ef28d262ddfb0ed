"""Taps: named intermediate outputs of any nn.Module, addressed by module path, via forward hooks."""

from __future__ import annotations

import difflib
from typing import Any, Sequence

import torch
from torch import nn

LOGITS = "logits"  # the tap name meaning the model's output, whatever the module names are


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside DistributedDataParallel/DataParallel and torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def _walk(model: nn.Module, path: str) -> nn.Module | None:
    """The submodule at dotted `path`, or None when some part of it does not exist."""
    module = model
    for part in path.split("."):
        module = module._modules.get(part)
        if module is None:
            return None
    return module


def resolve_module(model: nn.Module, path: str) -> nn.Module:
    """The submodule of `model` at dotted `path` (e.g. "layer2", "features.12", "0.conv").

    Paths may be given relative to the model inside a DDP or torch.compile wrapper.
    """
    if not isinstance(path, str) or not path:
        raise ValueError(f"a tap path must be a non-empty module path string, got {path!r}.")
    found = _walk(model, path)
    inner = unwrap(model)
    if found is None and inner is not model:
        found = _walk(inner, path)
    if found is not None:
        return found
    names = [n for n, _ in inner.named_modules(remove_duplicate=False) if n]
    close = difflib.get_close_matches(path, names, n=5, cutoff=0.5)
    shown = close or names[:10]
    more = "close paths" if close else "some valid paths"
    raise ValueError(
        f"no module at path {path!r} in {type(inner).__name__}; {more}: {', '.join(shown) or 'none'}."
    )


def default_taps(model: nn.Module) -> tuple[str, ...]:
    """The model's stage-end paths plus "logits"; only models that define `tap_points` have them."""
    points = getattr(unwrap(model), "tap_points", None)
    if points is None:
        raise ValueError(
            f"{type(unwrap(model)).__name__} has no tap_points; pass module paths explicitly "
            f"(e.g. the names from model.named_modules()) or use 'logits' only."
        )
    return tuple(points) + (LOGITS,)


def forward_with_taps(
    model: nn.Module, x: Any, paths: Sequence[str] | None = None
) -> tuple[Any, dict[str, torch.Tensor]]:
    """Run `model(x)` and return (output, {path: that module's output}) in the order of `paths`.

    `paths=None` means `default_taps(model)`. "logits" is the model output. Outputs are not
    detached, so gradients flow through taps. A module called several times in one forward
    gives its last output. Hooks are always removed, also when the forward raises.
    """
    if paths is None:
        paths = default_taps(model)
    if isinstance(paths, str):
        paths = (paths,)
    # Resolve everything first so a bad path fails before any hook is registered.
    modules = {p: resolve_module(model, p) for p in paths if p != LOGITS}
    captured: dict[str, Any] = {}
    handles = []

    def make_hook(path: str):
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            captured[path] = output

        return hook

    try:
        for path, module in modules.items():
            handles.append(module.register_forward_hook(make_hook(path)))
        output = model(x)
    finally:
        for handle in handles:
            handle.remove()
    captured[LOGITS] = output
    missing = [p for p in paths if p not in captured]
    if missing:
        raise ValueError(
            f"tap path {missing[0]!r} names a module that the forward pass never called; "
            f"choose a module on the forward path."
        )
    return output, {p: captured[p] for p in paths}
