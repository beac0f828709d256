"""Who failed, as data: the record the node check and the launcher write when a job fails, and that the flow
reads to decide which host to cordon. No reader parses the failure's prose for it.

    {exit_root}/{job}_{attempt}/failure_node_N.json   {"cause", "host", "detail", "rank", "exit_code"}

Causes, and whether they point at the host:
- node_check (yes): the node failed its check (GPUs, the run directory, the all-reduce across nodes);
- check_not_run (no): the check could not run there through no fault of the node (its port was taken);
- interrupted (no): the check was stopped from outside (another node failed first, a cancellation);
- device_error (yes): a rank died of a CUDA, NCCL or ECC error;
- rank_error (no): a rank raised (a bug, bad data: nobody's node);
- killed (no): ranks ended without a record (out of memory, a signal).
Standard library only (the launcher and the worker write records before torch is imported).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, get_args

Cause = Literal[
    "node_check", "check_not_run", "interrupted", "device_error", "rank_error", "killed"
]
_BLAMES_HOST = ("node_check", "device_error")
_DEVICE_ERROR = re.compile(
    r"CUDA error|NCCL error|ncclSystemError|ncclUnhandledCudaError|uncorrectable ECC|Xid"
)


@dataclass(frozen=True)
class Failure:
    cause: Cause
    host: str
    detail: str  # one line: what went wrong
    rank: int | None = None
    exit_code: int | None = None

    @property
    def blames_host(self) -> bool:
        """The failure points at its host: the flow keeps the run's next jobs off it."""
        return self.cause in _BLAMES_HOST

    def line(self) -> str:
        """The failure as the one line a person reads."""
        if self.cause == "node_check":
            return f"node check failed on host {self.host}: {self.detail}"
        if self.cause == "check_not_run":
            return f"node check could not run on host {self.host}: {self.detail}"
        if self.cause == "interrupted":
            return f"node check on host {self.host} interrupted by {self.detail}"
        if self.rank is not None:
            return f"rank {self.rank} on {self.host} failed first (exit {self.exit_code}): {self.detail}"
        return f"on host {self.host}: {self.detail}"

    @classmethod
    def parse(cls, obj: Any) -> Failure:
        """The record from its JSON object; ValueError naming the field when it is not one."""
        if not isinstance(obj, dict):
            raise ValueError(f"a failure record is a JSON object, not {type(obj).__name__}")
        if obj.get("cause") not in get_args(Cause):
            raise ValueError(f"field 'cause' of a failure record is {obj.get('cause')!r}")
        for name in ("host", "detail"):
            if not isinstance(obj.get(name), str):
                raise ValueError(f"field {name!r} of a failure record is {obj.get(name)!r}")
        for name in ("rank", "exit_code"):
            value = obj.get(name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"field {name!r} of a failure record is {value!r}")
        return cls(obj["cause"], obj["host"], obj["detail"], obj.get("rank"), obj.get("exit_code"))


def exception_cause(err: BaseException) -> Cause:
    """A rank's cause of death, from the exception that ended it (read in the rank itself): a device error
    points at the host, anything else is the training's own. torch raises AcceleratorError for CUDA errors and
    DistBackendError for NCCL's (matched by class name: no torch import here); older releases raise a plain
    RuntimeError naming the error."""
    names = {c.__name__ for c in type(err).__mro__}
    if names & {"AcceleratorError", "DistBackendError"}:
        return "device_error"
    if isinstance(err, RuntimeError) and _DEVICE_ERROR.search(str(err)):
        return "device_error"
    return "rank_error"


def write(exit_dir: str, node: int, failure: Failure) -> None:
    os.makedirs(exit_dir, exist_ok=True)
    path = os.path.join(exit_dir, f"failure_node_{node}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(asdict(failure), f)
    os.replace(path + ".tmp", path)


def read_job(exit_root: str, job_id: str) -> list[Failure]:
    """The failure records of the job's last attempt (its latest start by Slurm), node by node. A record
    that cannot be read or is not one is left out."""
    attempts = [
        p for p in Path(exit_root).glob(f"{job_id}_*") if p.name.rsplit("_", 1)[1].isdigit()
    ]
    if not attempts:
        return []
    last = max(attempts, key=lambda p: int(p.name.rsplit("_", 1)[1]))
    out = []
    for p in sorted(last.glob("failure_node_*.json")):
        try:
            out.append(Failure.parse(json.loads(p.read_text())))
        except (OSError, ValueError):
            continue
    return out


def culprit(failures: list[Failure]) -> Failure | None:
    """The failure to report and act on: one that points at a host before one that does not."""
    return next((f for f in failures if f.blames_host), failures[0] if failures else None)
