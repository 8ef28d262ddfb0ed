"""One code path for one process and for torchrun: the process group and its few collectives.

Under torchrun (WORLD_SIZE > 1 in the environment) the process group is set up
once, with nccl on GPUs and gloo on CPUs; everything else asks `world()`.
Single-process runs never touch torch.distributed.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world() -> World:
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return World()


def init_from_env(device: str = "auto") -> World:
    """Join the process group torchrun describes; a no-op when run as one process."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1 or (dist.is_available() and dist.is_initialized()):
        return world()
    use_cuda = torch.cuda.is_available() and device != "cpu"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    global _control_group
    _control_group = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    return world()


# Host-side agreement and waits on rank 0's long work (gathering a cache, evaluating a sweep's run on
# ImageNet with corruptions) over gloo: no GPU sync, no NCCL watchdog, and a timeout of hours, not
# the default group's 30 minutes (which still catches a hung training collective).
CONTROL_TIMEOUT = datetime.timedelta(hours=24)
_control_group = None


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is True on any rank (e.g. a stop signal only some ranks
    received); one small CPU collective over gloo, so no GPU stream is waited on."""
    if not world().distributed:
        return flag
    box = torch.tensor([int(flag)])
    dist.all_reduce(box, op=dist.ReduceOp.MAX, group=control_group())
    return bool(box.item())


def device_for(world_: World, device: torch.device) -> torch.device:
    """Each rank takes its own GPU; CPU ranks share the CPU."""
    if device.type == "cuda" and world_.distributed:
        return torch.device("cuda", world_.local_rank)
    return device


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Average a tensor over ranks in place (a no-op in one process)."""
    w = world()
    if w.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(w.size)
    return tensor


def broadcast_object(value, src: int = 0):
    """Rank src's Python value on every rank (e.g. a teacher index drawn once per step)."""
    if not world().distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src, group=control_group())
    return box[0]


def all_gather_object(value) -> list:
    """Every rank's Python value, indexed by rank, on every rank (one process: [value])."""
    if not world().distributed:
        return [value]
    out = [None] * world().size
    dist.all_gather_object(out, value, group=control_group())
    return out


def barrier() -> None:
    """Every rank waits here for the others. Over the gloo control group: the wait may be rank 0's
    long work alone (gathering a cache, evaluating a sweep's run), which NCCL's watchdog would end."""
    if world().distributed:
        dist.barrier(group=control_group())


def control_group():
    """The process group for host-side agreement and long waits (gloo, timeout CONTROL_TIMEOUT)."""
    return _control_group


@contextlib.contextmanager
def main_rank_first():
    """Rank 0 runs the block first and the other ranks after it, so they find what it wrote (the
    offset indices of tar shards and TFRecords, which every rank would otherwise build at once
    from the same files). Rank 0 lets them go even when its block raises: they then meet the
    same problem on their own rather than wait for ever. One process: just the block."""
    if not world().distributed:
        yield
        return
    main = world().is_main
    if not main:
        dist.barrier(group=control_group())  # gloo: a wait of minutes is no GPU timeout
    try:
        yield
    finally:
        if main:
            dist.barrier(group=control_group())


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
