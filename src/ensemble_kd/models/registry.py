"""Model registry: builders registered by name, `create` builds one and records its spec."""

from __future__ import annotations

import difflib
import fnmatch
import functools
import importlib
import inspect
from typing import Any, Callable

from torch import nn

from .. import plugins

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
    """Sorted registered model names (ours and the plugins'), optionally filtered by a shell pattern like 'wrn*'."""
    names = sorted(set(_MODELS) | set(plugins.names(plugins.MODELS)))
    if pattern is not None:
        names = [n for n in names if fnmatch.fnmatch(n, pattern)]
    return names


def models_by_source(pattern: str | None = None) -> dict[str, list[str]]:
    """What `arch:` can name, by source: "ensemble-kd" (ours and plugins'), "timm", "torchvision";
    a library that is not installed lists nothing."""
    from .external import BUILDERS, library_models

    found = {"ensemble-kd": list_models(pattern)}
    for source in BUILDERS:
        names = library_models(source)
        if pattern is not None:  # 'resnet1*' matches timm/resnet18 too: the pattern applies to the bare name
            names = [n for n in names if fnmatch.fnmatch(n, pattern) or fnmatch.fnmatch(n.split("/", 1)[1], pattern)]
        found[source] = names
    return found


# ---------------------------------------------------------------------------- lookup

def _import_callable(name: str) -> Builder:
    """`package.module:function` -> the function (a user's own network builder)."""
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"model {name!r}: cannot import module {module_name!r} ({err}); "
                         f"is it installed or on PYTHONPATH?") from None
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
    if not callable(fn):
        raise ValueError(f"model {name!r}: module {module_name!r} has no callable {attr!r}.")
    if not _takes_class_count(fn):  # os:system and the like: never called
        raise ValueError(f"model {name!r} is not a model builder: a builder takes num_classes and in_channels "
                         f"and returns a torch.nn.Module.")
    return fn


def _takes_class_count(fn) -> bool:
    """Whether `fn` accepts num_classes= and in_channels= (by name or **kwargs); unknowable signatures pass."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return True
    keywords = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    named = {p.name for p in params if p.kind in keywords}
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params) or {"num_classes", "in_channels"} <= named


def _builder(name: str) -> Builder:
    """The builder for `name`: ours, a library's (`timm/...`, `torchvision/...`), a user's
    (`package.module:function`) or an installed plugin's."""
    if name in _MODELS:
        return _MODELS[name]
    source, sep, arch = name.partition("/")
    if sep:
        from .external import BUILDERS

        if source in BUILDERS and arch:
            return functools.partial(BUILDERS[source], arch)
    if ":" in name:
        return _import_callable(name)
    fn = plugins.load(plugins.MODELS, name)
    if fn is not None:
        if name not in _MODELS:  # a plugin module may register itself on import instead
            register_model(name)(fn)
        return _MODELS[name]
    close = difflib.get_close_matches(name, list_models(), n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise ValueError(
        f"unknown model {name!r}{hint}; available models: {', '.join(list_models())}, "
        f"timm/<name>, torchvision/<name> (`ensemble-kd models` lists them) or package.module:function."
    )


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


def create(name: str, num_classes: int = 10, in_channels: int = 3, *, pretrained: bool = False,
           **kwargs: Any) -> nn.Module:
    """Build the model `name`; `model.spec` holds what rebuilds it: `create(**model.spec)`.

    `pretrained=True` asks the library (timm, torchvision) for its own weights; it is not part of
    the spec, since a saved model carries its weights.
    """
    fn = _builder(name)
    for key, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key} must be a positive integer, got {value!r}.")
    _check_kwargs(name, fn, kwargs)
    if pretrained and "pretrained" not in inspect.signature(fn).parameters:
        raise ValueError(f"model {name!r} has no pretrained weights of its own; point `weights:` at a file.")
    extra = {"pretrained": True} if pretrained else {}
    model = fn(num_classes=num_classes, in_channels=in_channels, **kwargs, **extra)
    if not isinstance(model, nn.Module):
        raise ValueError(f"model {name!r} built a {type(model).__name__}, not a torch.nn.Module.")
    model.spec = {"name": name, "num_classes": num_classes, "in_channels": in_channels, **kwargs}
    return model
