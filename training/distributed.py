"""torch.distributed set-up under torchrun (NCCL on CUDA, gloo on CPU) and the few collectives training uses.
Without torchrun's environment the same code runs as a single process."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from common import store
from common.errors import ReproError
from common.layout import RunDir


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


class CollectiveTimeout(ReproError):
    """A collective waited `collective_timeout_s` for a rank that never came; the message names the laggards."""


def is_timeout(err: BaseException) -> bool:
    """gloo raises `Timed out waiting ...ms for recv`; NCCL's watchdog takes the process down itself."""
    return (
        isinstance(err, RuntimeError)
        and re.search(r"timed out|timeout", str(err), re.I) is not None
    )


def flight_recorder_env(run_dir: str) -> dict[str, str]:
    """NCCL's flight recorder: every rank keeps its last collectives in a ring buffer and dumps it when one times
    out, so that `torchfrtrace DIR` can say which rank did not arrive and where it was. The dumps are files: in the
    run directory when it is a filesystem, else next to the job's exit records (the Slurm folder), else torch's
    default under /tmp. One folder per job and restart: nothing is written over."""
    env = {"TORCH_FR_BUFFER_SIZE": "2000", "TORCH_NCCL_DUMP_ON_TIMEOUT": "1"}
    slurm_job = os.environ.get("SLURM_JOB_ID")
    job = (
        f"{slurm_job}-{os.environ.get('SLURM_RESTART_COUNT', '0')}"
        if slurm_job
        else os.environ.get("TORCHELASTIC_RUN_ID", "local")
    )
    if store.is_local(run_dir):
        folder = store.fs_and_path(RunDir(run_dir).nccl_traces(job))[1]
    elif os.environ.get("CLUSTER_EXIT_DIR"):
        folder = os.path.join(os.environ["CLUSTER_EXIT_DIR"], "nccl-traces")
    else:
        return env
    return {**env, "TORCH_FR_DUMP_TEMP_FILE": os.path.join(folder, "rank_")}


def init(device_type: str, timeout_s: float | None = None, run_dir: str | None = None) -> DistInfo:
    """torchrun's ranks joined into one process group; `timeout_s`: how long a collective may wait for a rank.
    On CUDA the flight recorder is on (`flight_recorder_env`; a variable the user set wins)."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return DistInfo()  # plain `python -m training.train`, or torchrun with a single process
    info = DistInfo(
        int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    )
    if device_type == "cuda":
        torch.cuda.set_device(info.local_rank)
        if run_dir is not None:
            for key, value in flight_recorder_env(run_dir).items():
                os.environ.setdefault(
                    key, value
                )  # read when the NCCL process group is made, just below
            if "TORCH_FR_DUMP_TEMP_FILE" in os.environ:
                os.makedirs(os.path.dirname(os.environ["TORCH_FR_DUMP_TEMP_FILE"]), exist_ok=True)
    dist.init_process_group(
        backend="nccl" if device_type == "cuda" else "gloo",
        timeout=timedelta(seconds=timeout_s) if timeout_s else None,
    )
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


def all_gather(t: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's `t` (the same shape on each), in rank order, on every rank."""
    if not dist.is_initialized():
        return [t]
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return out


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's picklable `obj`, in rank order, on every rank (set-up only: it pickles)."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
