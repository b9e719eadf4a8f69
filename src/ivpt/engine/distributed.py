"""Process-group set-up for ``torchrun`` and the few collectives the engine needs.

Plain ``python`` runs are a world of one: every helper here then does nothing (or the obvious local
thing), so the training and evaluation code is written once for both cases.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ivpt.errors import ConfigError


@dataclass(frozen=True)
class DistributedContext:
    """Where this process sits in the job.

    Attributes:
        rank: global rank, 0..world_size-1.
        world_size: number of processes (1 without ``torchrun``).
        local_rank: rank on this node; picks the GPU.
        device: the device this process computes on.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes files and prints progress."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0, setting: str = "config key 'train.device'") -> torch.device:
    """``"auto"`` -> this rank's GPU when CUDA is available, else the CPU; other names are checked.

    Args:
        name: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        local_rank: the GPU ``cuda`` means.
        setting: where ``name`` came from, for the error message.

    Raises:
        ConfigError: CUDA is asked for but not available, or the name is not a device.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"{setting}: '{name}' is not a device (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{setting}: '{name}' asked for, but CUDA is not available here")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


def init_distributed(device_name: str) -> DistributedContext:
    """Join the process group that ``torchrun`` describes in the environment, if any.

    The backend is NCCL for CUDA devices and Gloo otherwise. Without ``torchrun`` (or with a world of
    one) no process group is created.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world_size)
    return DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def shutdown_distributed(ctx: DistributedContext) -> None:
    """Leave the process group created by :func:`init_distributed`."""
    if ctx.is_distributed and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, ctx: DistributedContext) -> torch.Tensor:
    """Sum ``tensor`` over all ranks (in place, also returned)."""
    if ctx.is_distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_from_main(tensor: torch.Tensor, ctx: DistributedContext) -> torch.Tensor:
    """Overwrite ``tensor`` in place on every rank with rank 0's (a no-op in a single process)."""
    if ctx.is_distributed:
        dist.broadcast(tensor, src=0)
    return tensor


def barrier(ctx: DistributedContext) -> None:
    if ctx.is_distributed:
        dist.barrier()


def gather_objects(value: Any, ctx: DistributedContext) -> list[Any]:
    """Every rank's ``value``, in rank order, on every rank."""
    if not ctx.is_distributed:
        return [value]
    gathered: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(gathered, value)
    return gathered


__all__ = [
    "DistributedContext",
    "all_reduce_sum",
    "barrier",
    "gather_objects",
    "init_distributed",
    "resolve_device",
    "shutdown_distributed",
]
