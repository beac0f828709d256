"""Where a training submission runs. The flow only needs submit / reattach / poll / cancel, so the local
executor here and the Slurm one (flows/slurm_executor.py) are interchangeable.

A *submission* is one job the flow starts (a Slurm job, or a local process); a Slurm job may itself be
started several times by Slurm (requeues after preemption: the launcher's *attempts*).
"""

from __future__ import annotations

import os
import posixpath
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cluster import rank_exits
from cluster.resubmission import Outcome
from common import store
from common.errors import ReproError
from common.layout import RunDir
from common.process_tree import kill_tree
from training.config import RunConfig

REPO = Path(__file__).resolve().parent.parent


class Submission(Protocol):
    job_id: str
    log_path: str  # the training's console output, tailed into the flow run's logs

    def poll(self) -> Outcome | None:
        """How it ended; None while it runs."""

    def running(self) -> bool:
        """Started (no longer queued): its start-up clock runs."""

    def owns(self, heartbeat: dict) -> bool:
        """A heartbeat (common/heartbeat.py) that this submission's ranks wrote."""

    def cancel(self, hung: bool = False) -> None:
        """Stop it (with a checkpoint); `hung`: kill it at once, a frozen process cannot checkpoint."""

    def lost_nodes(self) -> tuple[str, ...]:
        """Hosts that died under it since the last call (it goes on, restarted elsewhere)."""

    def avoid(self, hosts: tuple[str, ...]) -> bool:
        """Keep its next start off `hosts`; False if it cannot."""


class SubmissionRejected(ReproError):
    """A submission that could never start (a Slurm job the cluster cannot run); refused before anything."""


class PlacementError(ReproError):
    """The next submission has nowhere to run (cordons left too few nodes); the message says what to do.
    `free_at`: when the first of those cordons expires (None: waiting would not help)."""

    def __init__(self, message: str, free_at: float | None = None):
        super().__init__(message)
        self.free_at = free_at


@dataclass(frozen=True)
class Placement:
    """Where the next submission runs: the executor to submit to (fewer nodes after a shrink), the hosts it
    must avoid, and its node count when that differs from the one asked for."""

    executor: TrainingExecutor
    exclude: tuple[str, ...] = ()
    shrunk_to: int | None = None  # of `asked` nodes
    asked: int | None = None


class TrainingExecutor(Protocol):
    # whether a host a failure points at can be kept out of the next submissions (a cluster: yes)
    cordons: bool
    # whether training runs on the flow's own machine (evaluations then keep out of its way)
    shares_machine: bool

    def submit(
        self,
        preset: str,
        overrides: list[str],
        run: RunDir,
        number: int,
        exclude: tuple[str, ...] = (),
    ) -> Submission:
        """Start a submission of the run; `exclude`: hosts not to run on."""

    def reattach(self, job_id: str) -> Submission | None:
        """The submission of that id, to watch again; None when nothing runs under it."""

    def describe(self) -> dict:
        """What the run dir's job.json records, so that a restarted flow can reattach."""

    def validate(self, preset: str, overrides: list[str]) -> None:
        """SubmissionRejected when a submission of this run could never start here."""

    def placement(self, cfg: RunConfig, run: RunDir, allow_shrink: bool) -> Placement:
        """Where the next submission runs, given the run's cordons (PlacementError when nowhere)."""


class LocalSubmission:
    """A local process: the training itself (one rank), or torchrun and its ranks. How each rank ended comes
    from the records the ranks write (cluster/rank_exits.py), as on Slurm: torchrun's own exit says only
    whether every rank exited 0."""

    def __init__(self, proc: subprocess.Popen, log, log_path: str, exit_dir: str, nproc: int):
        self.proc, self._log, self.log_path = proc, log, log_path
        self.exit_dir, self.nproc = exit_dir, nproc
        self.job_id = f"local-{proc.pid}"

    def poll(self) -> Outcome | None:
        code = self.proc.poll()
        if code is None:
            return None
        self._log.close()
        end = rank_exits.job_end(rank_exits.read(self.exit_dir), range(self.nproc), code)
        if end.state == "completed":
            return Outcome("completed", "exit 0")
        if end.state == "stopped":
            return Outcome("requeue", end.reason(code))
        if end.state == "diverged":
            return Outcome("diverged", end.reason(code))
        if code < 0 and end.first_failure is None:
            return Outcome("failed", f"killed by signal {-code}")
        return Outcome("failed", f"exit {code}: {end.reason(code)}")

    def running(self) -> bool:
        return True

    def owns(self, heartbeat: dict) -> bool:
        # the process leads its own session; torchrun starts each rank in a session of the rank's own
        return self.proc.pid in (heartbeat.get("pgid"), heartbeat.get("ppid"))

    def lost_nodes(self) -> tuple[str, ...]:
        return ()  # one machine: its death ends the flow too

    def avoid(self, hosts: tuple[str, ...]) -> bool:
        return False

    def cancel(self, hung: bool = False) -> None:
        if self.proc.poll() is None:
            if hung:  # SIGTERM would wait, pending, on a stopped process: kill it and every rank it started
                kill_tree(self.proc.pid)
            else:
                self.proc.terminate()
            self.proc.wait(timeout=120)


class LocalTrainingExecutor:
    """Training as a subprocess of the flow (the embedded default: no cluster)."""

    cordons = False  # one machine: there is nowhere else to go
    shares_machine = True

    def __init__(self, nproc: int = 1, cwd: str | None = None):
        self.nproc = nproc
        self.cwd = cwd or str(REPO)

    def submit(
        self,
        preset: str,
        overrides: list[str],
        run: RunDir,
        number: int,
        exclude: tuple[str, ...] = (),
    ) -> LocalSubmission:  # one machine: nothing to exclude
        # cluster.worker: training.train, plus the record of how each rank ended (torchrun's code says nothing)
        train = [
            "-m",
            "cluster.worker",
            "--config",
            preset,
            *[a for kv in overrides for a in ("--set", kv)],
        ]
        if self.nproc > 1:
            train = [
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc_per_node={self.nproc}",
                *train,
            ]
        # the console goes next to the run when the run directory is local, else to ./logs/{run}/
        log_path = (
            store.fs_and_path(run.submission_log(number))[1]
            if store.is_local(run.url)
            else posixpath.join(
                "logs", posixpath.basename(run.url.rstrip("/")), f"submission-{number:03d}.log"
            )
        )
        exit_dir = str(Path(log_path).with_suffix(".exits"))
        shutil.rmtree(
            exit_dir, ignore_errors=True
        )  # records of an earlier flow's submission of that number
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        log = open(log_path, "ab")
        env = dict(os.environ, PYTHONUNBUFFERED="1", **{rank_exits.EXIT_DIR_ENV: exit_dir})
        proc = subprocess.Popen(
            [sys.executable, *train],
            cwd=self.cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        return LocalSubmission(proc, log, log_path, exit_dir, self.nproc)

    def reattach(self, job_id: str) -> Submission | None:
        """A local submission cannot be watched from another process (its exit code is lost), but it may
        outlive a crashed flow (own session): stop it with a checkpoint (SIGTERM -> exit 75) so that the next
        submission resumes from there instead of two processes training into one run dir."""
        pid = int(job_id.removeprefix("local-")) if job_id.startswith("local-") else 0
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if pid else []
        except OSError:
            cmdline = []
        if (
            b"cluster.worker" in cmdline or b"training.train" in cmdline
        ):  # the latter: earlier versions
            os.killpg(pid, signal.SIGTERM)
            for _ in range(1200):  # up to 2 min for the checkpoint
                try:
                    if Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z":
                        break  # exited, not yet reaped by its (dead) parent
                except OSError:
                    break
                time.sleep(0.1)
        return None

    def describe(self) -> dict:
        return {"executor": "local"}

    def validate(self, preset: str, overrides: list[str]) -> None:
        pass  # the run config is checked already; this machine has nothing more to refuse

    def placement(self, cfg: RunConfig, run: RunDir, allow_shrink: bool) -> Placement:
        return Placement(self)
