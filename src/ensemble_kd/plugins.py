"""Entry points: installed packages add models and methods by name, loaded only when named.

A package registers in its metadata, e.g. in pyproject.toml:

    [project.entry-points."ensemble_kd.models"]
    my_net = "my_package.models:build"        # build(num_classes, in_channels, **kwargs) -> nn.Module
    [project.entry-points."ensemble_kd.methods"]
    my_kd = "my_package.methods:MyKD"         # a Method subclass

Listing reads names from the metadata without importing anything.
"""

from __future__ import annotations

from importlib.metadata import entry_points

MODELS = "ensemble_kd.models"
METHODS = "ensemble_kd.methods"


def names(group: str) -> list[str]:
    """The names installed packages register under an entry-point group."""
    return [ep.name for ep in entry_points(group=group)]


def load(group: str, name: str):
    """The object the entry point `name` of `group` points at, or None when no package names it."""
    for ep in entry_points(group=group):
        if ep.name == name:
            try:
                return ep.load()
            except Exception as err:  # a broken plugin is named in one sentence, not a traceback of ours
                raise ValueError(f"the entry point {name!r} ({ep.value}) of group {group!r} failed to load: "
                                 f"{type(err).__name__}: {err}.") from None
    return None
