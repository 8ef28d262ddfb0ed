"""Evaluation as the papers do it: test metrics, temperature fitted on validation, cost.

A row is a plain dict (name, acc, nll, ece, cnll, cece, temperature, temperature_at_bound, brier,
params, params_bn_folded (EnsembleNet's #Params), macs, flops = 2·macs (EnsembleNet's #FLOPs), ...) plus the reliability bins, so `compare` can redraw diagrams
from results.json.
"""

from __future__ import annotations

import torch
from torch import nn

from ..ensemble import TeacherSet, majority_vote
from ..metrics import (classification_metrics, count_macs, count_parameters, eval_mode, measure_latency,
                       measure_throughput, reliability_bins)
from ..metrics.cost import count_parameters_bn_folded
from ..metrics.multilabel import global_average_precision, mean_average_precision
from ..models import unwrap
from ..models.multihead import ensemble_logits
from ..progress import quiet_progress
from .robustness import robustness_fields


@torch.no_grad()
def predict(model: nn.Module, loader, description: str = "predict", progress=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels over a whole split, on the CPU. A TeacherSet gives (M, N, K).
    A long split prints a line every 30 s (rate, time left) unless another `progress` is given."""
    outs, labels = [], []
    progress = progress or quiet_progress()
    task = progress.add_task(description, total=len(loader), status="", images_per_step=getattr(loader, "batch_size", None))
    with eval_mode(model):
        for batch in loader.batches(0):
            out = model.member_logits(batch.x) if isinstance(model, TeacherSet) else model(batch.x)
            outs.append(out.float().cpu())
            labels.append(batch.y.cpu())
            progress.update(task, advance=1)
    return torch.cat(outs, dim=-2), torch.cat(labels)


def metrics_row(name: str, probs: torch.Tensor, labels: torch.Tensor, *, val_logits=None,
                val_labels=None, test_logits=None) -> dict:
    row = {"name": name, **classification_metrics(probs, labels, val_logits=val_logits,
                                                  val_labels=val_labels, test_logits=test_logits)}
    row["reliability"] = reliability_bins(probs, labels)
    return row


def cost_row(model: nn.Module, input_shape, device, eval_cfg) -> dict:
    row = _params(model)
    if eval_cfg.cost:
        row.update(_macs_and_flops(count_macs(model, input_shape)))
    if eval_cfg.latency:
        row["latency_ms"], row["latency_ms_iqr"] = measure_latency(model, input_shape, device)
        row["throughput"] = measure_throughput(model, input_shape, device, eval_cfg.throughput_batch)
    return row


def _log_probs(probs: torch.Tensor) -> torch.Tensor:
    return probs.clamp_min(1e-12).log()


def evaluate_model(name: str, model: nn.Module, test_loader, val_loader, eval_cfg, device) -> dict:
    if getattr(unwrap(model), "multilabel", False):
        return evaluate_multilabel(name, model, test_loader, eval_cfg, device)
    test_logits, labels = predict(model, test_loader, f"evaluate {name} on test")
    val = predict(model, val_loader, f"evaluate {name} on val") if val_loader is not None else (None, None)
    row = metrics_row(name, test_logits.softmax(-1), labels, val_logits=val[0], val_labels=val[1],
                      test_logits=test_logits)
    with eval_mode(model):
        row.update(robustness_fields(model, test_loader, eval_cfg))
    return {**row, **cost_row(model, _input_shape(test_loader), device, eval_cfg)}


def evaluate_multilabel(name: str, model: nn.Module, test_loader, eval_cfg, device) -> dict:
    """Multi-label models (video): GAP@20, mAP and hit@1 (the top class is a positive) on the test set.
    MACs are counted on a real test item (padding frames are skipped, so zeros would cost nothing)."""
    logits, labels = predict(model, test_loader, f"evaluate {name} on test")
    scores = torch.sigmoid(logits)
    row = {"name": name, "gap": global_average_precision(scores, labels, top_k=20),
           "map": mean_average_precision(scores, labels),
           "hit1": labels.gather(1, scores.argmax(1, keepdim=True)).mean().item(),
           **_params(model)}
    if eval_cfg.cost:
        example = next(iter(test_loader.batches(0))).x[:1]
        row.update(_macs_and_flops(count_macs(model, tuple(example.shape[1:]), example=example)))
    return row


def evaluate_teacher_set(teachers: TeacherSet, test_loader, val_loader, eval_cfg, device,
                         prefix: str = "") -> list[dict]:
    """One row per member, the ensemble (mean of probabilities) and the majority vote."""
    member_logits, labels = predict(teachers, test_loader, f"evaluate {prefix}teachers on test")
    val_logits, val_labels = (predict(teachers, val_loader, f"evaluate {prefix}teachers on val")
                              if val_loader is not None else (None, None))
    shape = _input_shape(test_loader)
    rows = []
    for i, (name, member) in enumerate(zip(teachers.names, teachers.members)):
        row = metrics_row(prefix + name, member_logits[i].softmax(-1), labels,
                          val_logits=None if val_logits is None else val_logits[i], val_labels=val_labels,
                          test_logits=member_logits[i])
        rows.append({**row, **cost_row(member, shape, device, eval_cfg)})

    member_probs = member_logits.softmax(-1)
    ens_probs = member_probs.mean(0)
    ens_val = None if val_logits is None else _log_probs(val_logits.softmax(-1).mean(0))
    ensemble = metrics_row(f"{prefix}ensemble (M={len(teachers)})", ens_probs, labels,
                           val_logits=ens_val, val_labels=val_labels, test_logits=_log_probs(ens_probs))
    summed = _sum_costs(rows)
    ensemble.update(robustness_fields(lambda x: ensemble_logits(teachers.member_logits(x)), test_loader, eval_cfg))
    rows.append({**ensemble, **summed})

    vote = majority_vote(member_probs)
    rows.append({"name": f"{prefix}majority vote (M={len(teachers)})",
                 "acc": (vote == labels).float().mean().item(), **summed})
    return rows


def _sum_costs(rows: list[dict]) -> dict:
    """An ensemble costs the sum of its members (latency too: M forward passes; the members'
    interquartile ranges add up to a bound on the ensemble's)."""
    out = {}
    for key in ("params", "params_bn_folded", "macs", "flops", "latency_ms", "latency_ms_iqr"):
        if all(key in r for r in rows):
            out[key] = sum(r[key] for r in rows)
    if all("throughput" in r for r in rows):
        out["throughput"] = 1.0 / sum(1.0 / r["throughput"] for r in rows if r["throughput"] > 0)
    return out


def _params(model: nn.Module) -> dict:
    """Parameters, and with batch norm folded into the layers next to it (EnsembleNet's #Params)."""
    return {"params": count_parameters(model), "params_bn_folded": count_parameters_bn_folded(model)}


def _macs_and_flops(macs: int) -> dict:
    """MACs (what the CIFAR, MEAL and AE-KD papers call FLOPs) and FLOPs, 2 per multiply-accumulate
    (EnsembleNet's #FLOPs: tensorflow.profiler counts the multiply and the add), both named as such."""
    return {"macs": macs, "flops": 2 * macs}


def _input_shape(loader) -> tuple[int, ...]:
    return tuple(loader.input_shape)  # (C, H, W) of the inputs the loader yields, held or streamed
