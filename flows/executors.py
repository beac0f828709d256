"""Where a training attempt runs. The flow only needs submit / reattach / poll / cancel, so a Slurm executor
(cluster/) and the local one here are interchangeable."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

REQUEUE_EXIT_CODE = 75  # training.train's "stopped with a checkpoint, run me again"


@dataclass
class Outcome:
    state: str  # "completed" | "requeue" | "failed"
    reason: str


class Attempt(Protocol):
    job_id: str

    def poll(self) -> Outcome | None: ...  # None while running

    def cancel(self) -> None: ...


class Executor(Protocol):
    def submit(self, preset: str, overrides: list[str], log_path: str) -> Attempt: ...

    def reattach(self, job_id: str) -> Attempt | None: ...


class LocalAttempt:
    def __init__(self, proc: subprocess.Popen, log):
        self.proc, self._log = proc, log
        self.job_id = f"local-{proc.pid}"

    def poll(self) -> Outcome | None:
        code = self.proc.poll()
        if code is None:
            return None
        self._log.close()
        if code == 0:
            return Outcome("completed", "exit 0")
        if code == REQUEUE_EXIT_CODE:
            return Outcome("requeue", "stopped with a checkpoint (exit 75)")
        if code < 0:
            return Outcome("failed", f"killed by signal {-code}")
        return Outcome("failed", f"exit {code}")

    def cancel(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=120)


class LocalExecutor:
    """Training as a subprocess of the worker (the embedded default: no cluster)."""

    def __init__(self, nproc: int = 1, cwd: str | None = None):
        self.nproc = nproc
        self.cwd = cwd or str(Path(__file__).resolve().parent.parent)

    def submit(self, preset: str, overrides: list[str], log_path: str) -> LocalAttempt:
        sets = [a for kv in overrides for a in ("--set", kv)]
        if self.nproc == 1:
            cmd = [sys.executable, "-m", "training.train", "--config", preset, *sets]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={self.nproc}",
                   "-m", "training.train", "--config", preset, *sets]
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        log = open(log_path, "ab")
        proc = subprocess.Popen(cmd, cwd=self.cwd, stdout=log, stderr=subprocess.STDOUT,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"), start_new_session=True)
        return LocalAttempt(proc, log)

    def reattach(self, job_id: str) -> Attempt | None:
        return None  # a local subprocess dies with its worker: nothing to reattach to
