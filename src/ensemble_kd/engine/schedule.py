"""Optimizer and a per-step learning-rate schedule (warm-up, then cosine or steps)."""

from __future__ import annotations

import math

import torch

from ..config import OptimConfig


def build_optimizer(params, cfg: OptimConfig, extra_groups=(), no_decay_params=()) -> torch.optim.Optimizer:
    """SGD or AdamW over `params` (the model's) and `extra_groups` (a method's, dicts with "params"
    and optionally their own "lr"). No weight decay on BatchNorm and biases (the usual choice) nor
    on `no_decay_params` (a model's `no_weight_decay()`: parameters that a penalty of their own
    pulls elsewhere)."""
    skip = {id(p) for p in no_decay_params}
    groups = []
    for group in [{"params": params}, *extra_groups]:
        options = {k: v for k, v in group.items() if k != "params"}
        decay, no_decay = [], []
        for p in group["params"]:
            if p.requires_grad:
                (no_decay if p.ndim <= 1 or id(p) in skip else decay).append(p)
        groups += [{"params": ps, "weight_decay": wd, **options}
                   for ps, wd in ((decay, cfg.weight_decay), (no_decay, 0.0)) if ps]
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                               nesterov=cfg.nesterov and cfg.momentum > 0)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def lr_factor(step: int, total_steps: int, cfg: OptimConfig, steps_per_epoch: int) -> float:
    """The multiplier of the base learning rate after `step` optimizer steps."""
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    if cfg.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    if cfg.schedule == "step":
        return cfg.gamma ** sum(progress >= m for m in cfg.milestones)
    return 1.0


def build_scheduler(optimizer, cfg: OptimConfig, total_steps: int, steps_per_epoch: int):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, cfg, steps_per_epoch))

