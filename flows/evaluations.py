"""Every new checkpoint evaluated while training goes on, never on the training nodes: each evaluation is
`python -m evaluation.evaluate` in its own process next to the flow, or its own one-node Slurm job
(`eval_slurm`), shown as a task run of its own (`evaluate step 5000`). Results are cached next to the
checkpoint (eval/*.json), so evaluating twice costs nothing."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from cluster.spec import JobSpec
from common import store
from common.errors import ReproError, last_line
from common.layout import RunDir
from flows.params import EvaluationParams
from training import checkpoint as ck

REPO = Path(__file__).resolve().parent.parent


def _idle_priority() -> None:
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):  # not Linux: the lowest nice level instead
        os.nice(19)


async def run_evaluation(
    url: str,
    tasks: list[str],
    hellaswag_data: str | None = None,
    limit: int | None = None,
    include_path: str | None = None,
    background: bool = False,
) -> dict[str, Any]:
    """The evaluate CLI on `url`; its summary, or {"checkpoint", "error"} with the last error line.
    `background`: training shares this machine, so the evaluation takes one thread and only the CPU time
    training leaves idle (SCHED_IDLE): two processes each running as many OpenMP threads as there are cores slow
    each other several times over."""
    cmd = [
        sys.executable,
        "-m",
        "evaluation.evaluate",
        "--checkpoint",
        url,
        "--tasks",
        ",".join(tasks),
    ]
    if hellaswag_data:
        cmd += ["--hellaswag-data", hellaswag_data]
    if limit:
        cmd += ["--limit", str(limit)]
    if include_path:
        cmd += ["--include-path", include_path]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1") if background else None
    proc = await asyncio.create_subprocess_exec(
        *cmd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=str(REPO),
        env=env,
        preexec_fn=_idle_priority if background else None,
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        return {
            "checkpoint": url,
            "error": last_line(err.decode(errors="replace")) or f"exit {proc.returncode}",
        }
    return json.loads(out)


async def run_evaluation_on_slurm(
    url: str,
    tasks: list[str],
    spec: JobSpec,
    hellaswag_data: str | None = None,
    limit: int | None = None,
    include_path: str | None = None,
    poll_s: float = 2.0,
) -> dict[str, Any]:
    """The same evaluation as a one-node Slurm job of `spec`, watched without blocking."""
    from cluster.submit import submit_function
    from evaluation.evaluate import evaluate

    # sbatch and sacct are subprocess calls: off the event loop, which also watches training
    job = await asyncio.to_thread(
        submit_function,
        spec.model_copy(update={"nodes": 1, "job_name": "gpt2-eval"}),
        evaluate,
        url,
        tasks,
        hellaswag_data=hellaswag_data,
        limit=limit,
        include_path=include_path,
    )
    while not await asyncio.to_thread(job.done):
        await asyncio.sleep(poll_s)
    try:
        return {**job.result(), "slurm_job": job.job_id}
    except (
        Exception
    ) as err:  # submitit re-raises the task's error with its traceback: keep the last line
        return {
            "checkpoint": url,
            "error": f"Slurm job {job.job_id}: {last_line(str(err)) or err!r}",
        }


def summary_row(result: dict[str, Any]) -> dict[str, Any]:
    """One checkpoint's evaluation as a table row: HellaSwag acc_norm (ours) and each lm-eval task's accuracy."""
    row: dict[str, Any] = {"step": result.get("step"), "checkpoint": result.get("checkpoint")}
    if "hellaswag" in result:
        row["hellaswag_acc_norm"] = result["hellaswag"]["acc_norm"]
    for name, metrics in (result.get("lm_eval") or {}).get("tasks", {}).items():
        acc = metrics.get("acc_norm", metrics.get("acc"))
        if acc is not None:
            row[name] = round(float(acc), 4)
    if "error" in result:
        row["error"] = result["error"]
    return row


def _scores(result: dict[str, Any]) -> str:
    """`hellaswag_acc_norm 0.2900, demo_hellaswag 0.2800`: a checkpoint's scores on one line."""
    row = summary_row(result)
    scores = [f"{k} {v:.4f}" for k, v in row.items() if k != "step" and isinstance(v, (int, float))]
    return ", ".join(scores) or "no scores"


class EvaluationFailed(ReproError):
    def __init__(self, result: dict[str, Any]):
        super().__init__(result.get("error", "evaluation failed"))
        self.result = result


@task(
    name="evaluate",
    task_run_name="evaluate step {step}",
    cache_policy=NO_CACHE,
    persist_result=False,
)
async def evaluate_step(
    step: int,
    url: str,
    tasks: list[str],
    hellaswag_data: str | None,
    slurm: JobSpec | None,
    include_path: str | None,
    background: bool = False,
) -> dict[str, Any]:
    """One checkpoint's evaluation as a task run; a failed evaluation fails it with the error. A checkpoint that
    training pruned (checkpoint.keep_last) while it was evaluated failed nothing: the task completes, saying so,
    with {"step", "pruned": True}."""
    result = await (
        run_evaluation_on_slurm(url, tasks, slurm, hellaswag_data, include_path=include_path)
        if slurm
        else run_evaluation(
            url, tasks, hellaswag_data, include_path=include_path, background=background
        )
    )
    if "error" in result:
        if not store.exists(store.join(url, ck.MANIFEST)):
            get_run_logger().info(
                "step %d was pruned before its evaluation finished: not evaluated", step
            )
            return {"step": step, "pruned": True}
        raise EvaluationFailed(result)
    get_run_logger().info("evaluated step %d: %s", step, json.dumps(summary_row(result)))
    return result


class EvaluationScheduler:
    """Starts an evaluation for each valid checkpoint of the run not yet evaluated, and collects the results."""

    def __init__(
        self,
        run_dir: str,
        params: EvaluationParams,
        log: logging.Logger | logging.LoggerAdapter,
        shares_machine: bool = False,
    ):
        """`shares_machine`: training runs on this machine too (the local executor): evaluations run in the
        background (one thread, low priority) instead of competing for its cores."""
        self.run_dir, self.log = run_dir, log
        self.tasks, self.hellaswag_data = params.tasks, params.hellaswag_data
        self.slurm, self.include_path = params.slurm, params.include_path
        self.background = shares_machine and params.slurm is None
        # step -> the evaluate CLI's summary (or its error)
        self.results: dict[int, dict[str, Any]] = {}
        self._pending: dict[int, asyncio.Task] = {}

    def start_new(self) -> None:
        if not self.tasks:
            return
        for c in ck.valid_checkpoints(self.run_dir):
            if c.step not in self.results and c.step not in self._pending:
                self._pending[c.step] = asyncio.create_task(
                    evaluate_step(  # type: ignore[arg-type]  # a task called in a flow: a coroutine
                        c.step,
                        c.url,
                        self.tasks,
                        self.hellaswag_data,
                        self.slurm,
                        self.include_path,
                        self.background,
                        return_state=True,
                    )
                )

    def _keep(self, step: int, result: dict[str, Any]) -> None:
        """The summary outlives its checkpoint (retention prunes it with its eval/ folder): evaluations.jsonl,
        which the tracker mirror reads too."""
        try:
            store.append_text(
                RunDir(self.run_dir).evaluations,
                json.dumps({"step": step, "time": time.time(), **result}, default=str) + "\n",
            )
        except Exception as err:  # the checkpoint's own eval/ files still hold it
            self.log.warning("could not append to evaluations.jsonl: %s", err)

    async def collect(self, wait: bool = False) -> bool:
        """Take in the evaluations that have finished (all of them with `wait`); True when any did."""
        new = False
        for step, pending in sorted(self._pending.items()):
            if wait or pending.done():
                state = await pending
                result = await state.aresult(raise_on_failure=False)
                del self._pending[step]
                new = True
                pruned = isinstance(result, dict) and result.get("pruned")
                if (
                    pruned
                    or (
                        isinstance(result, BaseException)
                        and step not in ck.list_steps(self.run_dir)
                    )
                ):  # training pruned it (checkpoint.keep_last) while it was evaluated: not a failure
                    self.log.info(
                        "step %d was pruned before its evaluation finished: not evaluated", step
                    )
                    continue
                if isinstance(result, BaseException):
                    result = getattr(result, "result", {"step": step, "error": str(result)})
                    self.log.warning("evaluation of step %d failed: %s", step, result.get("error"))
                elif "error" not in result:
                    self._keep(step, result)
                    self.log.info("evaluated step %d: %s", step, _scores(result))
                self.results[step] = result
        return new
