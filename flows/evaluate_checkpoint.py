"""`evaluate-checkpoint`: the evaluation contract (training/evaluate.py) on one checkpoint, in its own process.

pretrain-gpt2 calls `run_evaluation` for every new checkpoint while training goes on, never inside the training
job; results are cached next to the checkpoint (eval/*.json), so evaluating twice costs nothing.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

REPO = Path(__file__).resolve().parent.parent


async def run_evaluation(url: str, tasks: list[str], hellaswag_data: str | None = None,
                         limit: int | None = None) -> dict[str, Any]:
    """`python -m training.evaluate` on `url`; its summary, or {"checkpoint", "error"} with the last error line."""
    cmd = [sys.executable, "-m", "training.evaluate", "--checkpoint", url, "--tasks", ",".join(tasks)]
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


async def run_evaluation_on_slurm(url: str, tasks: list[str], spec, hellaswag_data: str | None = None,
                                  limit: int | None = None, poll_s: float = 2.0) -> dict[str, Any]:
    """The same contract as a one-node Slurm job (spec: cluster.spec.JobSpec), watched without blocking."""
    from cluster.submit import submit_function
    from training.evaluate import evaluate

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


@flow(name="evaluate-checkpoint", log_prints=True)
async def evaluate_checkpoint(checkpoint: str, tasks: list[str] = ["hellaswag"], hellaswag_data: str | None = None,
                              limit: int | None = None) -> dict[str, Any]:
    """Evaluate one checkpoint (or a run dir's latest) on HellaSwag and/or lm-eval tasks."""
    result = await run_evaluation(checkpoint, tasks, hellaswag_data, limit)
    if "error" in result:
        raise RuntimeError(f"evaluation of {checkpoint} failed: {result['error']}")
    get_run_logger().info("%s", json.dumps(summary_row(result)))
    await create_table_artifact([summary_row(result)], description=f"evaluation of {checkpoint}")
    return result
