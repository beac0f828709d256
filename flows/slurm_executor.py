"""Training submissions as Slurm jobs (cluster.submit), behind the flow's TrainingExecutor interface.

One submission is one Slurm job. Preemptions and time limits are requeued inside the job (cluster/launch.py),
so the flow only sees the job's end: completed, or failed with its reason (node failure, a rank's error,
requeue cap), which the flow answers by resubmitting from the latest checkpoint.
"""

from __future__ import annotations

import re
import subprocess
import time

from cluster.cordon import cordoned, usable_nodes
from cluster.job_outcome import down, ended, hostnames
from cluster.resubmission import Outcome
from cluster.spec import JobSpec
from cluster.submit import FINAL_STATES, JobNotFound, RunHandle, reattach, submit
from common.layout import RunDir
from flows.executors import Placement, PlacementError, SubmissionRejected
from training.config import ConfigError, RunConfig


class SlurmSubmission:
    def __init__(self, handle: RunHandle):
        self.handle = handle
        self.job_id = handle.job_id
        # submitit's stdout of the first task (node 0 holds global rank 0); Slurm appends to it across requeues.
        self.log_path = str(handle.job.paths.stdout)
        self._state = ""
        self._node_failures: set[tuple[str, str]] = (
            set()
        )  # (nodes, start) of the attempts already reported
        self._running_checked = (
            False  # lost_nodes asked accounting since the job last started running
        )
        self._exclusions_checked = (
            0.0  # when a pending job's exclusions were last compared to the cordons
        )

    def poll(self) -> Outcome | None:
        state = self._state = self.handle.state()
        if state.startswith("PENDING"):
            self._lift_expired_cordons()
        return ended(self.handle, state) if state.startswith(FINAL_STATES) else None

    def _lift_expired_cordons(self, every_s: float = 15.0) -> None:
        """A pending job keeps the hosts it was kept off (ExcNodeList) after their cordons expire: lift them, or
        a job whose every node was cordoned once would wait forever (Slurm: BadConstraints)."""
        if time.monotonic() - self._exclusions_checked < every_s or self.handle.submitted is None:
            return
        self._exclusions_checked = time.monotonic()
        cordons = set(cordoned(RunDir(self.handle.run_dir)))
        if set(self._excluded()) - cordons - set(self._own_exclusions()):
            self.avoid(tuple(sorted(cordons)))  # with the spec's own exclusions, as always

    def running(self) -> bool:
        return self._state.startswith(("RUNNING", "COMPLETING"))  # as of the last poll

    def owns(self, heartbeat: dict) -> bool:
        return self.handle.owns(heartbeat)

    def cancel(self, hung: bool = False) -> None:
        self.handle.cancel(kill=hung)

    def lost_nodes(self) -> tuple[str, ...]:
        """Hosts of this job's attempts that Slurm ended NODE_FAIL and then requeued by itself (sacct -D lists
        every attempt), each reported once. Of a multi-node attempt, the hosts that are down now. Asked of
        accounting only while the job is not running, and once when it runs again: a node failure requeues it."""
        running = self._state.startswith("RUNNING")
        if running and self._running_checked:
            return ()
        self._running_checked = running
        out = subprocess.run(
            ["sacct", "-j", self.job_id, "-D", "-X", "-n", "-P", "-o", "State,NodeList,Start"],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
        lost: list[str] = []
        for line in out.splitlines():
            state, nodes, start = (line.split("|") + ["", ""])[:3]
            if state.startswith("NODE_FAIL") and (nodes, start) not in self._node_failures:
                self._node_failures.add((nodes, start))
                hosts = hostnames(nodes)
                lost += hosts if len(hosts) == 1 else down(hosts)
        return tuple(dict.fromkeys(lost))

    def avoid(self, hosts: tuple[str, ...]) -> bool:
        """Keep the requeued job off `hosts` (the run's cordons now) when Slurm starts it again, beside the hosts
        its spec excludes: its ExcNodeList becomes exactly those (only a pending job takes it)."""
        merged = ",".join(dict.fromkeys([*self._own_exclusions(), *hosts]))
        p = subprocess.run(
            ["scontrol", "update", f"JobId={self.job_id}", f"ExcNodeList={merged}"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        return p.returncode == 0

    def _excluded(self) -> list[str]:
        show = subprocess.run(
            ["scontrol", "show", "job", "-o", self.job_id],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
        m = re.search(r"\bExcNodeList=(\S+)", show)
        return hostnames(m.group(1)) if m and m.group(1) != "(null)" else []

    def _own_exclusions(self) -> list[str]:
        """The hosts the job's own spec excludes (sbatch --exclude); of a job recorded without its spec, every
        host it excludes now (nothing is lifted that is not known to be a cordon)."""
        if self.handle.submitted is None:
            return self._excluded()
        extra = self.handle.submitted["spec"].get("sbatch_extra", [])
        return [
            h
            for line in extra
            if line.startswith("--exclude=")
            for h in hostnames(line.removeprefix("--exclude="))
        ]


class SlurmTrainingExecutor:
    cordons = True
    shares_machine = False

    def __init__(self, spec: JobSpec):
        self.spec = spec

    def submit(
        self,
        preset: str,
        overrides: list[str],
        run: RunDir,
        number: int,
        exclude: tuple[str, ...] = (),
    ) -> SlurmSubmission:
        # Slurm writes the job's console into submitit's folder (spec.folder); the run dir is in the overrides.
        return SlurmSubmission(submit(self.spec, preset, overrides, exclude=exclude))

    def resized(self, nodes: int) -> SlurmTrainingExecutor:
        """The same jobs on `nodes` nodes (allow_shrink: cordons left the partition too few)."""
        return SlurmTrainingExecutor(self.spec.model_copy(update={"nodes": nodes}))

    def reattach(self, job_id: str) -> SlurmSubmission | None:
        try:
            handle = reattach(job_id, self.spec.folder)
        except JobNotFound:
            return None
        # Also when it has ended meanwhile: its outcome (completed, or failed and to be resubmitted) still counts.
        return SlurmSubmission(handle)

    def describe(self) -> dict:
        return {"executor": "slurm", "folder": self.spec.folder}

    def validate(self, preset: str, overrides: list[str]) -> None:
        """A job the cluster could never run (partition, nodes, GPUs, time) is refused before sbatch."""
        from cluster.validate import SpecError, validate

        try:
            validate(self.spec, preset, overrides, check_cluster=True, check_data=False)
        except SpecError as err:
            raise SubmissionRejected(f"Slurm job rejected: {err}") from None

    def placement(self, cfg: RunConfig, run: RunDir, allow_shrink: bool) -> Placement:
        """The cordoned hosts the next submission must avoid, on the spec's nodes, or, with `allow_shrink`, on
        the nodes left when cordons leave too few (checkpoints resume on another world size, and gradient
        accumulation keeps the global batch). Too few without it is a PlacementError that says so, instead of
        a job that queues forever."""
        spec = self.spec
        cordons = cordoned(run)
        hosts = tuple(sorted(cordons))
        free_at = min((c["expires"] for c in cordons.values()), default=None)
        usable = usable_nodes(spec.partition, set(hosts)) if hosts else None
        if usable is None or len(usable) >= spec.nodes:
            return Placement(self, hosts)
        what = (
            f"partition {spec.partition or '(default)'} can no longer give the job its {spec.nodes} "
            f"nodes: {len(usable)} usable ({', '.join(usable) or 'none'}) with {', '.join(hosts)} "
            f"cordoned in {run.cordon}"
        )
        if not allow_shrink:
            raise PlacementError(
                f"{what}; let a cordon expire (cordon_hours), ask for fewer nodes, or set allow_shrink",
                free_at,
            )
        fits = shrink_to(cfg, len(usable), spec.procs_per_node)
        if fits is None:
            raise PlacementError(
                f"{what}, and the run's batch splits evenly over none of them "
                "(train.total_batch_tokens, eval.val_tokens)"
            )
        return Placement(self.resized(fits), hosts, fits, spec.nodes)


def shrink_to(cfg: RunConfig, usable: int, procs_per_node: int) -> int | None:
    """The most nodes, up to `usable`, over which the run's global batch and validation split evenly (7 nodes
    left of 8 usually means 4: a 2^k batch does not split over 7)."""
    for nodes in range(usable, 0, -1):
        try:
            cfg.grad_accum_steps(nodes * procs_per_node)
            cfg.val_steps_per_rank(nodes * procs_per_node)
        except ConfigError:
            continue
        return nodes
    return None
