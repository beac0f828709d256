"""Training submissions as Slurm jobs (cluster.submit), behind the flow's TrainingExecutor interface.

One submission is one Slurm job. Preemptions and time limits are requeued inside the job (cluster/launch.py),
so the flow only sees the job's end: completed, or failed with its reason (node failure, a rank's error,
requeue cap), which the flow answers by resubmitting from the latest checkpoint.
"""

from __future__ import annotations

from cluster.launch import RunFailed
from cluster.spec import JobSpec
from cluster.submit import FINAL_STATES, JobNotFound, RunHandle, reattach, submit
from common.layout import RunDir
from flows.executors import Outcome


class SlurmSubmission:
    def __init__(self, handle: RunHandle):
        self.handle = handle
        self.job_id = handle.job_id
        # submitit's stdout of the first task (node 0 holds global rank 0); Slurm appends to it across requeues.
        self.log_path = str(handle.job.paths.stdout)

    def poll(self) -> Outcome | None:
        state = self.handle.state()
        if not state.startswith(FINAL_STATES):
            return None
        if state.startswith("CANCELLED"):
            # Someone ran scancel: a decision, not a failure to retry (preemptions end as PREEMPTED/requeued).
            return Outcome("cancelled", f"job {self.job_id} was cancelled ({state})")
        try:
            result = self.handle.result()
        except RunFailed as err:
            lines = [ln for ln in str(err).splitlines() if ln.strip()]
            detail = next((ln for ln in lines[1:] if ln.startswith("node ")), "")
            return Outcome("failed", " | ".join(x for x in (lines[0], detail) if x)[:500])
        if result.get("diverged"):
            return Outcome("diverged", f"job {self.job_id} diverged at step {result.get('final_step')}")
        if result.get("complete", True):
            return Outcome("completed", f"job {self.job_id} completed at step {result.get('final_step')}")
        # stop_after_steps: the job ended cleanly with a checkpoint before max_steps.
        return Outcome("requeue", f"job {self.job_id} stopped at step {result.get('final_step')}")

    def cancel(self) -> None:
        self.handle.cancel()


class SlurmTrainingExecutor:
    def __init__(self, spec: JobSpec):
        self.spec = spec

    def submit(self, preset: str, overrides: list[str], run: RunDir, number: int) -> SlurmSubmission:
        # Slurm writes the job's console into submitit's folder (spec.folder); the run dir is in the overrides.
        return SlurmSubmission(submit(self.spec, preset, overrides))

    def reattach(self, job_id: str) -> SlurmSubmission | None:
        try:
            handle = reattach(job_id, self.spec.folder)
        except JobNotFound:
            return None
        # Also when it has ended meanwhile: its outcome (completed, or failed and to be resubmitted) still counts.
        return SlurmSubmission(handle)

    def describe(self) -> dict:
        return {"executor": "slurm", "folder": self.spec.folder}
