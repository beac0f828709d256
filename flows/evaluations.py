"""Every new checkpoint evaluated while training goes on, never on the training nodes: each evaluation is
`python -m evaluation.evaluate` in its own process next to the flow, or its own one-node Slurm job
(`eval_slurm`). Results are cached next to the checkpoint (eval/*.json), so evaluating twice costs nothing."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from pathlib import Path
from typing import Any

from cluster.spec import JobSpec
from training import checkpoint as ck

REPO = Path(__file__).resolve().parent.parent


async def run_evaluation(url: str, tasks: list[str], hellaswag_data: str | None = None,
                         limit: int | None = None) -> dict[str, Any]:
    """The evaluate CLI on `url`; its summary, or {"checkpoint", "error"} with the last error line."""
    cmd = [sys.executable, "-m", "evaluation.evaluate", "--checkpoint", url, "--tasks", ",".join(tasks)]
    if hellaswag_data:
        cmd += ["--hellaswag-data", hellaswag_data]
    if limit:
        cmd += ["--limit", str(limit)]
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                                                cwd=str(REPO))
    out, err = await proc.communicate()
    if proc.returncode != 0:
        lines = [ln for ln in err.decode(errors="replace").splitlines() if ln.strip()]
        return {"checkpoint": url, "error": lines[-1] if lines else f"exit {proc.returncode}"}
    return json.loads(out)


async def run_evaluation_on_slurm(url: str, tasks: list[str], spec: JobSpec, hellaswag_data: str | None = None,
                                  limit: int | None = None, poll_s: float = 2.0) -> dict[str, Any]:
    """The same evaluation as a one-node Slurm job of `spec`, watched without blocking."""
    from cluster.submit import submit_function
    from evaluation.evaluate import evaluate

    # sbatch and sacct are subprocess calls: off the event loop, which also watches training
    job = await asyncio.to_thread(submit_function, spec.model_copy(update={"nodes": 1, "job_name": "gpt2-eval"}),
                                  evaluate, url, tasks, hellaswag_data=hellaswag_data, limit=limit)
    while not await asyncio.to_thread(job.done):
        await asyncio.sleep(poll_s)
    try:
        return {**job.result(), "slurm_job": job.job_id}
    except Exception as err:  # submitit re-raises the task's error with its traceback: keep the last line
        lines = [ln for ln in str(err).splitlines() if ln.strip()]
        return {"checkpoint": url, "error": f"Slurm job {job.job_id}: {lines[-1] if lines else err}"}


def summary_row(result: dict[str, Any]) -> dict[str, Any]:
    """One checkpoint's evaluation as a table row: HellaSwag acc_norm (ours) and each lm-eval task's accuracy."""
    row: dict[str, Any] = {"step": result.get("step"), "checkpoint": result.get("checkpoint")}
    if "hellaswag" in result:
        row["hellaswag_acc_norm"] = result["hellaswag"]["acc_norm"]
    for task, metrics in (result.get("lm_eval") or {}).get("tasks", {}).items():
        acc = metrics.get("acc_norm", metrics.get("acc"))
        if acc is not None:
            row[task] = round(float(acc), 4)
    if "error" in result:
        row["error"] = result["error"]
    return row


class EvaluationScheduler:
    """Starts an evaluation for each valid checkpoint of the run not yet evaluated, and collects the results."""

    def __init__(self, run_dir: str, tasks: list[str], hellaswag_data: str | None, slurm: JobSpec | None,
                 log: logging.Logger | logging.LoggerAdapter):
        self.run_dir, self.tasks, self.hellaswag_data, self.slurm, self.log = run_dir, tasks, hellaswag_data, slurm, log
        self.results: dict[int, dict[str, Any]] = {}  # step -> the evaluate CLI's summary
        self._pending: dict[int, asyncio.Task] = {}

    def start_new(self) -> None:
        if not self.tasks:
            return
        for c in ck.valid_checkpoints(self.run_dir):
            if c.step not in self.results and c.step not in self._pending:
                self._pending[c.step] = asyncio.create_task(
                    run_evaluation_on_slurm(c.url, self.tasks, self.slurm, self.hellaswag_data) if self.slurm
                    else run_evaluation(c.url, self.tasks, self.hellaswag_data))

    async def collect(self, wait: bool = False) -> bool:
        """Take in the evaluations that have finished (all of them with `wait`); True when any did."""
        new = False
        for step, task in list(self._pending.items()):
            if wait or task.done():
                self.results[step] = await task
                del self._pending[step]
                new = True
                self.log.info("evaluated step %d: %s", step, json.dumps(summary_row(self.results[step])))
        return new
