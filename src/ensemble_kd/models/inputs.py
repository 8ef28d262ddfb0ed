"""Each teacher sees the input it was trained for: batches normalised with the data's statistics are
re-normalised (and resized) into those of a pretrained model's own training.

The data gives x = (raw - mean_d) / std_d; the model wants (raw - mean_t) / std_t, which is
x * a + b with a = std_d / std_t and b = (mean_d - mean_t) / std_t: one fused addcmul per batch,
then a bilinear, antialiased resize when the model's input size differs. The adapter runs as a
forward pre-hook of the model, so the model's module paths (its taps) and every caller (taps,
perturbations, MEAL's lengths) see the adapted input without a wrapper in between.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

ATTRIBUTE = "input_adapter"  # the submodule name: its buffers travel with .to() and state_dict()


class InputAdapter(nn.Module):
    def __init__(self, data_mean: Sequence[float], data_std: Sequence[float], mean: Sequence[float],
                 std: Sequence[float], size: Sequence[int] | None = None):
        super().__init__()
        data_mean, data_std = torch.tensor(data_mean, dtype=torch.float64), torch.tensor(data_std, dtype=torch.float64)
        mean, std = _per_channel(mean, len(data_mean), "mean"), _per_channel(std, len(data_mean), "std")
        if (std <= 0).any() or (data_std <= 0).any():
            raise ValueError(f"input std must be positive, got {std.tolist()} (data: {data_std.tolist()})")
        self.register_buffer("scale", (data_std / std).float().view(-1, 1, 1))
        self.register_buffer("shift", ((data_mean - mean) / std).float().view(-1, 1, 1))
        self.mean, self.std = mean.tolist(), std.tolist()
        self.size = tuple(int(s) for s in size) if size else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.addcmul(self.shift.to(x.dtype), x, self.scale.to(x.dtype))
        if self.size is not None and tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", antialias=True, align_corners=False)
        return x

    def description(self) -> dict:
        """What the adapted input is: named in the teacher cache's fingerprint."""
        return {"mean": self.mean, "std": self.std, "size": list(self.size) if self.size else None}

    def extra_repr(self) -> str:
        return f"mean={self.mean}, std={self.std}, size={self.size}"


def _per_channel(values: Sequence[float], channels: int, what: str) -> torch.Tensor:
    t = torch.tensor(list(values), dtype=torch.float64)
    if t.numel() == channels:
        return t
    if t.numel() == 1:
        return t.expand(channels).clone()
    if channels == 1:  # an RGB model taking grey images (its stem summed over channels): the channels' mean
        return t.mean().view(1)
    raise ValueError(f"the model's input {what} has {t.numel()} values but the data has {channels} channels")


def _adapt(module: nn.Module, args: tuple) -> tuple:
    return (getattr(module, ATTRIBUTE)(args[0]), *args[1:])


def adapt_input(model: nn.Module, adapter: InputAdapter) -> nn.Module:
    """Attach `adapter` so that every forward of `model` first adapts its input; returns the model."""
    if hasattr(model, ATTRIBUTE):
        raise ValueError(f"{type(model).__name__} already has an input adapter")
    setattr(model, ATTRIBUTE, adapter.to(next(model.parameters()).device))
    model.register_forward_pre_hook(_adapt)
    return model


def input_description(model: nn.Module) -> dict | None:
    adapter = getattr(model, ATTRIBUTE, None)
    return adapter.description() if isinstance(adapter, InputAdapter) else None
