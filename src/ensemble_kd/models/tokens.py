"""Taps read as (B, C, H, W) maps whatever layout a network keeps them in.

A tap's layout (`tap_layout(model, path)`): None, a map (B, C, H, W) or vector (B, C) as it is;
NHWC, a channels-last map (B, H, W, C), as timm's Swin-family models (output_fmt "NHWC") and
torchvision's Swin `features` keep theirs; or a vision transformer's TokenLayout.

A ViT block outputs N = prefix + h·w tokens: the prefix tokens first (class, distillation,
register tokens), then the patches in row-major order. timm's
`forward_intermediates(output_fmt="NCHW")` makes its maps the same way (drop the prefix, reshape
to (B, h, w, C), permute); it runs the whole model for chosen block indices, whereas a tap reads
any module by its path from a forward hook, so the reshape is repeated here, on the tap.
"""

from __future__ import annotations

import math
import sys

import torch
from torch import nn

from .taps import LOGITS, unwrap

TokenLayout = tuple[int, tuple[int, int]]  # (prefix tokens, (h, w) patch grid)
NHWC = "NHWC"
TapLayout = TokenLayout | str | None


def tap_layout(model: nn.Module, path: str) -> TapLayout:
    """How the output at `path` of `model` is laid out (see the module docstring)."""
    if path == LOGITS:
        return None
    tokens = token_layout(model)
    if tokens is not None:
        return tokens
    inner = unwrap(model)
    if getattr(inner, "output_fmt", None) == NHWC:  # timm: every map inside the model is channels-last
        return NHWC
    swin = sys.modules.get("torchvision.models.swin_transformer")
    if swin is not None and isinstance(inner, swin.SwinTransformer) and (path == "features" or path.startswith("features.")):
        return NHWC  # torchvision's Swin permutes to channels-first only after `features` and `norm`
    return None


def to_map(x: torch.Tensor, layout: TapLayout) -> torch.Tensor:
    """`x` as a channels-first map (B, C, H, W), or the vector (B, C) it is; a 3-D tap without a
    token layout is returned as it is (the caller decides what it means)."""
    if layout == NHWC and x.dim() == 4:
        return x.permute(0, 3, 1, 2)
    if isinstance(layout, tuple) and x.dim() == 3:
        return tokens_to_map(x, layout)
    return x


def token_layout(model: nn.Module) -> TokenLayout | None:
    """(prefix tokens, (h, w) patch grid) of a timm or torchvision VisionTransformer; None for any
    other model."""
    inner = unwrap(model)
    # Only a model built by torchvision can be its ViT, and then the module is loaded: no import here.
    torchvision_vit = sys.modules.get("torchvision.models.vision_transformer")
    if torchvision_vit is not None and isinstance(inner, torchvision_vit.VisionTransformer):
        side = inner.image_size // inner.patch_size  # square; its forward asserts the input is image_size
        return int(inner.class_token.shape[1]), (side, side)
    # timm's ViT family (VisionTransformer, DeiT, EVA, BEiT, ...) shares these two attributes.
    prefix = getattr(inner, "num_prefix_tokens", None)
    grid = getattr(getattr(inner, "patch_embed", None), "grid_size", None)
    if isinstance(prefix, int) and grid is not None and len(grid) == 2:
        if float(getattr(getattr(inner, "patch_drop", None), "prob", 0.0) or 0.0) > 0:
            raise ValueError("this ViT drops patches in training (patch_drop_rate > 0): its block tokens are a "
                             "random subset, no patch grid, so they cannot be read as maps; build it with "
                             "patch_drop_rate=0 to tap its blocks")
        return prefix, (int(grid[0]), int(grid[1]))
    return None


def tokens_to_map(tokens: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """(B, prefix + h·w, C) -> (B, C, h, w): the prefix dropped, the patch tokens in row-major order.

    Another token count (timm's dynamic_img_size at another input size than the grid's) is read as
    a square grid when N - prefix is a square number; any other count is refused."""
    if tokens.dim() != 3:
        raise ValueError(f"tokens must be (B, N, C), got shape {tuple(tokens.shape)}")
    B, N, C = tokens.shape
    prefix, (h, w) = layout
    patches = N - prefix
    if patches != h * w:
        side = math.isqrt(max(patches, 0))
        if patches < 1 or side * side != patches:
            raise ValueError(f"{N} tokens fit neither the model's {prefix} prefix tokens + {h}x{w} patch grid "
                             f"nor a square grid after the prefix")
        h = w = side
    return tokens[:, prefix:].reshape(B, h, w, C).permute(0, 3, 1, 2)
