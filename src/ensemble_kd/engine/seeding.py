"""Seeds and RNG states: everything `--resume` must restore to continue exactly."""

from __future__ import annotations

import random

import torch

from .. import distributed


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def rng_state(cuda_by_rank: list | None = None) -> dict:
    """This process's RNG states. On CUDA, `cuda_by_rank` holds each rank's state of its own device
    (`cuda_rng_by_rank()`, gathered on every rank); one process saves just its own device's."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda_by_rank"] = cuda_by_rank if cuda_by_rank is not None else [_own_cuda_state()]
    return state


def cuda_rng_by_rank() -> list | None:
    """Every rank's CUDA RNG state of the device it runs on, indexed by rank (None without CUDA).
    A collective under torchrun (over the gloo control group): every rank calls it."""
    if not torch.cuda.is_available():
        return None
    return distributed.all_gather_object(_own_cuda_state())


def set_rng_state(state: dict, rank: int = 0) -> None:
    """Restore `state` in the process of `rank`. Its CUDA state goes to this process's own device, so a
    run saved on 8 GPUs resumes on 4 or on one (CUDA_VISIBLE_DEVICES=0); a rank the saved run did not
    have keeps the seeded state."""
    random.setstate(_as_tuple(state["python"]))
    torch.set_rng_state(state["torch"].cpu())
    if not torch.cuda.is_available():
        return
    if "cuda_by_rank" in state:
        saved = state["cuda_by_rank"]
        own = saved[rank] if rank < len(saved) else None
    else:  # checkpoints before per-rank states: rank 0's view of every device it saw
        saved = state.get("cuda", [])
        own = saved[torch.cuda.current_device()] if torch.cuda.current_device() < len(saved) else None
    if own is not None:
        torch.cuda.set_rng_state(own.cpu(), torch.cuda.current_device())


def _own_cuda_state() -> torch.Tensor:
    return torch.cuda.get_rng_state(torch.cuda.current_device())


def _as_tuple(value):
    # weights_only loading may return lists where tuples were saved
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device '{name}' is not a valid torch device (try 'auto', 'cpu', 'cuda:0')") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device '{name}' was asked for but no CUDA GPU is available; use device=cpu")
    return device
