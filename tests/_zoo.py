"""The package's own model zoo, as tests that sweep over it need it."""

from ensemble_kd.models import list_models, registry


def zoo_models() -> list[str]:
    """Registered names built by ensemble_kd itself: test files register throw-away models in the same
    registry (and plugins add theirs), which a sweep over the zoo must not pick up."""
    return [n for n in list_models() if getattr(registry._MODELS.get(n), "__module__", "").startswith("ensemble_kd.")]
