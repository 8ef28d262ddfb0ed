"""Which autocast dtype a run uses: one choice for students and teachers.

bf16 only where the GPU computes it natively (compute capability 8.0 and up: Ampere, Hopper);
pre-Ampere cards (V100, T4) emulate it slowly, so `auto` gives them fp16, which training pairs
with a GradScaler (fp16's narrow range underflows small gradients).
"""

from __future__ import annotations

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def native_bf16(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


def resolve(precision: str, device: torch.device) -> str:
    """`auto` made concrete for `device`: bf16 on GPUs with native bf16, fp16 on older GPUs, fp32 elsewhere."""
    if precision == "auto":
        if device.type != "cuda":
            return "fp32"
        return "bf16" if native_bf16(device) else "fp16"
    if precision not in DTYPES:
        raise ValueError(f"precision must be auto, bf16, fp16 or fp32, got '{precision}'")
    return precision


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `precision` on `device`; None: plain fp32."""
    return DTYPES[resolve(precision, device)]
