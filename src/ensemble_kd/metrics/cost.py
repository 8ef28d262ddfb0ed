"""Inference cost of a model: parameters (also with batch norm folded, as EnsembleNet counts them),
MACs (and FLOPs = 2·MACs) per sample, latency (median and spread) and throughput."""

from __future__ import annotations

import contextlib
import copy
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (shared parameters counted once); optionally only trainable ones."""
    return int(sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only))


_WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def count_parameters_bn_folded(model: nn.Module) -> int:
    """Parameters once every batch norm is folded into the layer next to it, as for inference
    (EnsembleNet's #Params: "we fold batch norm operations during inference when possible").

    A BN is an affine map per channel: folded into the convolution or linear layer before it (the
    one with as many outputs as the BN has channels), its scale multiplies that layer's weights
    (no parameters) and its shift becomes that layer's bias: C parameters in place of the BN's 2C,
    none if the layer has a bias already. A BN with no such layer before it (a DBoF's input BN)
    folds forwards into the linear layer after it (as many inputs as channels): its shift, through
    the weights, becomes that layer's bias. A BN that folds nowhere (an activation between it and
    its neighbours) keeps its 2C. "Before" and "after" are the leaf modules' registration order
    (identities and dropouts skipped), which is the order they run in torchvision's, timm's and
    this package's networks.
    """
    modules = [m for m in model.modules()
               if not next(m.children(), None) and not isinstance(m, (nn.Identity, nn.modules.dropout._DropoutNd))]
    biased = {id(m) for m in modules if isinstance(m, _WEIGHTED) and m.bias is not None}
    total = count_parameters(model)
    for i, bn in enumerate(modules):
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or not bn.affine:
            continue
        before = modules[i - 1] if i > 0 else None
        after = modules[i + 1] if i + 1 < len(modules) else None
        if isinstance(before, _WEIGHTED) and _outputs(before) == bn.num_features:
            into, bias = before, bn.num_features
        elif isinstance(after, nn.Linear) and after.in_features == bn.num_features:
            into, bias = after, after.out_features
        else:
            continue
        total -= 2 * bn.num_features
        if id(into) not in biased:
            total += bias
            biased.add(id(into))
    return int(total)


def _outputs(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode; afterwards restore each one's own flag (modes may be mixed)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and floating dtype of the model's first parameter or buffer (CPU float32 if none)."""
    tensors = list(model.parameters()) + list(model.buffers())
    device = tensors[0].device if tensors else torch.device("cpu")
    dtype = next((t.dtype for t in tensors if t.is_floating_point()), torch.float32)
    return device, dtype


def _check_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(int(s) for s in input_shape)
    if not shape or any(s <= 0 for s in shape):
        raise ValueError(
            f"input_shape={tuple(input_shape)} must be the positive per-sample shape without the batch, "
            "e.g. (3, 32, 32)."
        )
    return shape


def _on_device(model: nn.Module, device) -> tuple[nn.Module, torch.device, torch.dtype]:
    """The model itself if it already lives on `device` (or device is None), else a copy moved there."""
    model_device, dtype = _model_device_dtype(model)
    if device is None:
        return model, model_device, dtype
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device == model_device:
        return model, device, dtype
    # A copy leaves the caller's model where it is.
    return copy.deepcopy(model).to(device), device, dtype


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_macs(model: nn.Module, input_shape: Sequence[int], example: torch.Tensor | None = None) -> int:
    """Multiply-accumulates of one forward pass per sample: what the CIFAR papers, MEAL's and AE-KD's
    (and most users) call "FLOPs", e.g. nn.Linear(10, 5) gives 10 * 5 = 50. Half of `count_flops`,
    which is what EnsembleNet's tables call FLOPs (tensorflow.profiler: a multiply and an add are two)."""
    return count_flops(model, input_shape, example) // 2


def count_flops(model: nn.Module, input_shape: Sequence[int], example: torch.Tensor | None = None) -> int:
    """FLOPs of one forward pass per sample (batch 1, eval mode), via FlopCounterMode.

    input_shape excludes the batch, e.g. (3, 32, 32). A multiply-add counts as 2 FLOPs (see
    `count_macs` for 1); only matmul, convolution and attention are counted (not BN, activations,
    pooling), so nn.Linear(10, 5) gives 2 * 10 * 5 = 100. The input is zeros, or `example` (a batch
    of one) for models whose cost depends on the values (a video model skips zero padding frames).
    """
    shape = _check_shape(input_shape)
    device, dtype = _model_device_dtype(model)
    x = torch.zeros((1, *shape), device=device, dtype=dtype) if example is None else example.to(device, dtype)
    with eval_mode(model), torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return int(counter.get_total_flops())


def _time_forward(model: nn.Module, x: torch.Tensor, device: torch.device, repeats: int, warmup: int) -> list[float]:
    """Seconds per forward pass, `repeats` times after `warmup` untimed passes."""
    with eval_mode(model), torch.no_grad():
        return time_calls(model, x, repeats, warmup, sync=lambda: _sync(device))


def time_calls(call: Callable, x, repeats: int = 50, warmup: int = 10,
               sync: Callable[[], None] = lambda: None) -> list[float]:
    """Seconds per `call(x)`, `repeats` times after `warmup` untimed calls: a module, or an exported
    file's runner (ONNX Runtime's session); `sync` waits for asynchronous work before the clock is read."""
    if int(repeats) < 1 or int(warmup) < 0:
        raise ValueError(f"repeats={repeats} must be >= 1 and warmup={warmup} >= 0.")
    for _ in range(int(warmup)):
        call(x)
    sync()
    times = []
    for _ in range(int(repeats)):
        start = time.perf_counter()
        call(x)
        sync()  # CUDA kernels run asynchronously: wait before reading the clock
        times.append(time.perf_counter() - start)
    return times


class Latency(NamedTuple):
    """Milliseconds per forward pass over the timed repeats: the median and the interquartile range."""

    median_ms: float
    iqr_ms: float


def latency_of(seconds: Sequence[float]) -> Latency:
    """Median and interquartile range (q3 - q1, quartiles by linear interpolation) of timings in seconds."""
    ms = [1000.0 * t for t in seconds]
    if not ms:
        raise ValueError("no timings to summarise; time at least one forward pass.")
    q1, _, q3 = statistics.quantiles(ms, n=4, method="inclusive") if len(ms) > 1 else (ms[0],) * 3
    return Latency(statistics.median(ms), q3 - q1)


def measure_latency(
    model: nn.Module, input_shape: Sequence[int], device=None, repeats: int = 50, warmup: int = 10
) -> Latency:
    """Wall-clock milliseconds of one forward pass at batch 1 (eval mode, no grad): the median of
    `repeats` timed passes and their interquartile range, after `warmup` untimed ones.

    device=None measures where the model lives; another device measures a copy there.
    """
    shape = _check_shape(input_shape)
    model, device, dtype = _on_device(model, device)
    x = torch.randn((1, *shape), device=device, dtype=dtype)
    return latency_of(_time_forward(model, x, device, repeats, warmup))


def measure_throughput(
    model: nn.Module,
    input_shape: Sequence[int],
    device=None,
    batch_size: int = 256,
    repeats: int = 10,
    warmup: int = 3,
) -> float:
    """Images per second of inference at `batch_size` (batch_size / median batch time)."""
    shape = _check_shape(input_shape)
    if int(batch_size) < 1:
        raise ValueError(f"batch_size={batch_size} must be a positive integer.")
    model, device, dtype = _on_device(model, device)
    x = torch.randn((int(batch_size), *shape), device=device, dtype=dtype)
    return int(batch_size) / statistics.median(_time_forward(model, x, device, repeats, warmup))
