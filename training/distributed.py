"""torch.distributed set-up under torchrun (NCCL on CUDA, gloo on CPU) and the few collectives training uses.
Without torchrun's environment the same code runs as a single process."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_master(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init(device_type: str, timeout_s: float | None = None) -> DistInfo:
    """torchrun's ranks joined into one process group; `timeout_s`: how long a collective may wait for a rank
    (NCCL reports it with the ranks that did not arrive; TORCH_NCCL_* variables control its flight recorder)."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return DistInfo()  # plain `python -m training.train`, or torchrun with a single process
    info = DistInfo(int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"]))
    if device_type == "cuda":
        torch.cuda.set_device(info.local_rank)
    dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo",
                            timeout=timedelta(seconds=timeout_s) if timeout_s else None)
    return info


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def mean(t: torch.Tensor) -> torch.Tensor:
    """In-place mean over ranks (gloo has no AVG op: SUM then divide)."""
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= dist.get_world_size()
    return t


def max_over_ranks(value: int, device: torch.device) -> int:
    """The largest of every rank's `value`, on every rank (e.g. the most urgent reason to stop)."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def any_true(flag: bool, device: torch.device) -> bool:
    """True on every rank when any rank says True (e.g. one rank got the preemption signal)."""
    return max_over_ranks(int(flag), device) > 0


def gather_to_master(obj: Any) -> list[Any] | None:
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out
