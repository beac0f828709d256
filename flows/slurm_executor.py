"""Training submissions as Slurm jobs (cluster.submit), behind the flow's TrainingExecutor interface.

One submission is one Slurm job. Preemptions and time limits are requeued inside the job (cluster/launch.py),
so the flow only sees the job's end: completed, or failed with its reason (node failure, a rank's error,
requeue cap), which the flow answers by resubmitting from the latest checkpoint.
"""

from __future__ import annotations

import re
import subprocess

from cluster import failure
from cluster.launch import RunFailed
from cluster.spec import JobSpec
from cluster.submit import FINAL_STATES, JobNotFound, RunHandle, reattach, submit
from common.layout import RunDir
from flows.cordon import cordoned, usable_nodes
from flows.executors import Outcome, Placement, PlacementError, SubmissionRejected
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

    def poll(self) -> Outcome | None:
        state = self._state = self.handle.state()
        if not state.startswith(FINAL_STATES):
            return None
        if state.startswith("CANCELLED"):
            # Someone ran scancel: a decision, not a failure to retry (preemptions end as PREEMPTED/requeued).
            return Outcome("cancelled", f"job {self.job_id} was cancelled ({state})")
        try:
            result = self.handle.result()
        except RunFailed as err:
            return self._failed(state, err)
        if result.get("diverged"):
            return Outcome(
                "diverged", f"job {self.job_id} diverged at step {result.get('final_step')}"
            )
        if result.get("complete", True):
            return Outcome(
                "completed", f"job {self.job_id} completed at step {result.get('final_step')}"
            )
        # stop_after_steps: the job ended cleanly with a checkpoint before max_steps.
        return Outcome("requeue", f"job {self.job_id} stopped at step {result.get('final_step')}")

    def _failed(self, state: str, err: RunFailed) -> Outcome:
        """A failed job: what its nodes recorded of the failure (cluster/failure.py) says which host to
        blame; a node failure blames the job's node (of a one-node job)."""
        found = failure.culprit(failure.read_job(str(self.handle.exits), self.job_id))
        lines = [ln for ln in str(err).splitlines() if ln.strip()]
        # without a record (a node killed outright): the first node's own error
        detail = (
            found.line() if found else next((ln for ln in lines[1:] if ln.startswith("node ")), "")
        )
        if state.startswith("NODE_FAIL"):
            hosts = failed_node(self.job_id)
        else:
            hosts = (found.host,) if found is not None and found.blames_host else ()
        return Outcome("failed", " | ".join(x for x in (lines[0], detail) if x)[:500], hosts)

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
                hosts = _hosts(nodes)
                lost += hosts if len(hosts) == 1 else _down(hosts)
        return tuple(dict.fromkeys(lost))

    def avoid(self, hosts: tuple[str, ...]) -> bool:
        """Keep the requeued job off `hosts` when Slurm starts it again (merged into its ExcNodeList: only a
        pending job takes it)."""
        show = subprocess.run(
            ["scontrol", "show", "job", "-o", self.job_id],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
        m = re.search(r"\bExcNodeList=(\S+)", show)
        current = _hosts(m.group(1)) if m and m.group(1) != "(null)" else []
        merged = ",".join(dict.fromkeys([*current, *hosts]))
        p = subprocess.run(
            ["scontrol", "update", f"JobId={self.job_id}", f"ExcNodeList={merged}"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        return p.returncode == 0


def with_excluded(spec: JobSpec, hosts: tuple[str, ...]) -> JobSpec:
    """The spec with `hosts` added to its sbatch --exclude (merged with one the spec already has)."""
    if not hosts:
        return spec
    extra, excluded = [], list(hosts)
    for line in spec.sbatch_extra:
        if line.startswith("--exclude="):
            excluded = [*line.removeprefix("--exclude=").split(","), *excluded]
        else:
            extra.append(line)
    return spec.model_copy(
        update={"sbatch_extra": [*extra, f"--exclude={','.join(dict.fromkeys(excluded))}"]}
    )


def _hosts(nodelist: str) -> list[str]:
    """A Slurm host list (`n[1-3],gpu7`) as host names."""
    if not nodelist or nodelist in ("None", "(null)", "None assigned"):
        return []
    if not any(c in nodelist for c in "[,"):
        return [nodelist]
    out = subprocess.run(
        ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=60
    )
    return out.stdout.split()


def _down(hosts: list[str]) -> list[str]:
    """Those of `hosts` that sinfo does not list as usable now (down, drained, not responding)."""
    up = usable_nodes(None, set())
    return [] if up is None else [h for h in hosts if h not in up]


def failed_node(job_id: str) -> tuple[str, ...]:
    """The node of a one-node job (accounting's NodeList): the host a NODE_FAIL points at."""
    out = subprocess.run(
        ["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "NodeList"],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout.splitlines()
    hosts = _hosts(out[-1].strip()) if out else []
    return tuple(hosts) if len(hosts) == 1 else ()


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
        return SlurmSubmission(submit(with_excluded(self.spec, exclude), preset, overrides))

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
        hosts = tuple(sorted(cordoned(run)))
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
                f"{what}; let a cordon expire (cordon_hours), ask for fewer nodes, or set allow_shrink"
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
