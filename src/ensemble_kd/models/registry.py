"""Model registry: builders registered by name, `create` builds one and records its spec."""

from __future__ import annotations

import difflib
import fnmatch
import inspect
from typing import Any, Callable

from torch import nn

Builder = Callable[..., nn.Module]

_MODELS: dict[str, Builder] = {}


def register_model(name: str) -> Callable[[Builder], Builder]:
    """Decorator registering `fn(num_classes=10, in_channels=3, **kw) -> nn.Module` as `name`."""

    def decorator(fn: Builder) -> Builder:
        # A silent override would make a checkpoint's spec rebuild a different network.
        if name in _MODELS and _MODELS[name] is not fn:
            raise ValueError(f"model name {name!r} is already registered; choose another name.")
        _MODELS[name] = fn
        return fn

    return decorator


def list_models(pattern: str | None = None) -> list[str]:
    """Sorted registered model names, optionally filtered by a shell pattern like 'wrn*'."""
    names = sorted(_MODELS)
    if pattern is not None:
        names = [n for n in names if fnmatch.fnmatch(n, pattern)]
    return names


def _check_kwargs(name: str, fn: Builder, kwargs: dict[str, Any]) -> None:
    """Raise a ValueError naming a keyword argument the builder does not take."""
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    valid = [n for n in params if n not in ("num_classes", "in_channels")]
    for key in kwargs:
        if key not in params or key in ("num_classes", "in_channels"):
            hint = ", ".join(valid) if valid else "none"
            raise ValueError(
                f"model {name!r} has no argument {key!r}; its arguments are: {hint}."
            )


def create(name: str, num_classes: int = 10, in_channels: int = 3, **kwargs: Any) -> nn.Module:
    """Build the registered model `name`; `model.spec` holds what rebuilds it: `create(**model.spec)`."""
    if name not in _MODELS:
        close = difflib.get_close_matches(name, list(_MODELS), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(
            f"unknown model {name!r}{hint}; available models: {', '.join(list_models())}."
        )
    for key, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key} must be a positive integer, got {value!r}.")
    fn = _MODELS[name]
    _check_kwargs(name, fn, kwargs)
    model = fn(num_classes=num_classes, in_channels=in_channels, **kwargs)
    model.spec = {"name": name, "num_classes": num_classes, "in_channels": in_channels, **kwargs}
    return model
