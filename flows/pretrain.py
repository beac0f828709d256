"""`pretrain-gpt2`: validate -> ensure data -> train (resubmitting on failure) while evaluating every new
checkpoint in its own process -> final report. Orchestration only: the model math is in training/.

    python -m flows.pretrain [--preset tiny] [--store store] [--run-name tiny-demo]   # run once, locally
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from prefect.settings import PREFECT_UI_URL
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, create_table_artifact, \
    update_progress_artifact

from flows.executors import Executor, LocalExecutor, Outcome
from flows.params import PretrainParams
from training import checkpoint as ck
from training import store
from training.config import RunConfig, load_config
from training.data import list_shards
from training.plots import read_metrics, render_png


class FlowFailure(RuntimeError):
    """A run that cannot go on; the message is the one line a person reads in the UI."""


def resolve_config(p: PretrainParams) -> tuple[RunConfig, list[str]]:
    """The run config the attempts will use, validated here before anything is submitted."""
    preset_data = load_config(p.preset).data.data_url
    # Presets name their data under a relative "store/": it moves with the store parameter.
    data = p.data or (p.store.rstrip("/") + preset_data[len("store"):] if preset_data.startswith("store/") else preset_data)
    overrides = [f"run_dir={p.run_dir()}", f"data_url={data}", *p.overrides]
    cfg = load_config(p.preset, overrides)
    cfg.grad_accum_steps(p.nproc)
    cfg.val_steps_per_rank(p.nproc)
    return cfg, overrides


def ensure_data(cfg: RunConfig) -> None:
    """Shards present, or the offline demo corpus built when the run asks for it (the embedded default)."""
    url = cfg.data.data_url
    if not store.exists(store.join(url, "manifest.json")) and url.rstrip("/").endswith("data/demo"):
        from data_prep.demo_corpus import build

        build(url)
    list_shards(url, "train")
    list_shards(url, "val")


def latest_step(run_dir: str) -> int:
    c = ck.latest_checkpoint(run_dir, verify=False)
    return c.step if c else 0


async def evaluate_checkpoint(url: str, p: PretrainParams) -> dict[str, Any]:
    """`python -m training.evaluate` in its own process (never inside the training job)."""
    cmd = [sys.executable, "-m", "training.evaluate", "--checkpoint", url, "--tasks", ",".join(p.eval_tasks)]
    if p.hellaswag_data:
        cmd += ["--hellaswag-data", p.hellaswag_data]
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                                                cwd=str(Path(__file__).resolve().parent.parent))
    out, err = await proc.communicate()
    if proc.returncode != 0:
        return {"checkpoint": url, "error": err.decode()[-500:].strip().splitlines()[-1:] or ["failed"]}
    return json.loads(out)


def _attempt_record(run_dir: str, record: dict[str, Any]) -> None:
    store.append_text(store.join(run_dir, "attempts.jsonl"), json.dumps(record) + "\n")


def _report_table(evals: dict[int, dict[str, Any]], metrics: list[dict[str, Any]]) -> list[dict[str, Any]]:
    val = {m["step"] + 1: m["val_loss"] for m in metrics if "val_loss" in m}
    rows = []
    for step in sorted(evals):
        e = evals[step]
        near = max((s for s in val if s <= step), default=None)
        rows.append({"step": step, "val_loss": round(val[near], 4) if near else None,
                     "hellaswag_acc_norm": e.get("hellaswag", {}).get("acc_norm"),
                     "checkpoint": e.get("checkpoint"), "error": e.get("error")})
    return rows


@flow(name="pretrain-gpt2", log_prints=True)
async def pretrain(params: PretrainParams = PretrainParams()) -> dict[str, Any]:
    """The deployment's entry point; the parameters form is PretrainParams."""
    return await run_pretrain(params, LocalExecutor(nproc=params.nproc))


async def run_pretrain(params: PretrainParams, executor: Executor) -> dict[str, Any]:
    """The flow's body, with the executor injectable (Slurm, local, or a test's). Call inside a flow run."""
    log = get_run_logger()
    p = params
    ui = PREFECT_UI_URL.value()
    if ui and flow_run.id:
        log.info("watch this run: %s/runs/flow-run/%s", ui.rstrip("/"), flow_run.id)
    try:
        cfg, overrides = resolve_config(p)
    except Exception as err:
        raise FlowFailure(f"bad parameter: {err}") from None
    run_dir = cfg.train.run_dir
    ensure_data(cfg)
    progress_id = await create_progress_artifact(0.0, key=None, description=f"{p.run_name}: training progress")
    evals: dict[int, dict[str, Any]] = {}
    pending: dict[int, asyncio.Task] = {}
    failures, attempt_no, last_fail_step = 0, 0, None
    log_dir = Path(store.fs_and_path(run_dir)[1]) / "logs" if store.is_local(run_dir) else Path("logs") / p.run_name
    t0 = time.monotonic()

    def start_evals() -> None:
        if not p.eval_tasks:
            return
        for c in ck.valid_checkpoints(run_dir):
            if c.step not in evals and c.step not in pending:
                pending[c.step] = asyncio.create_task(evaluate_checkpoint(c.url, p))

    async def collect_evals(wait: bool) -> None:
        for step, task in list(pending.items()):
            if wait or task.done():
                evals[step] = await task
                del pending[step]
                log.info("evaluated step %d: %s", step, json.dumps({k: v for k, v in evals[step].items()
                                                                    if k in ("hellaswag", "error")}))

    while True:
        attempt_no += 1
        start = latest_step(run_dir)
        log_path = str(log_dir / f"attempt-{attempt_no:03d}.log")
        attempt = executor.submit(p.preset, overrides, log_path)
        log.info("attempt %d: job %s from step %d", attempt_no, attempt.job_id, start)
        seen_lines = 0
        outcome: Outcome | None = None
        while outcome is None:
            await asyncio.sleep(p.poll_seconds)
            outcome = attempt.poll()
            lines = Path(log_path).read_text(errors="replace").splitlines() if Path(log_path).exists() else []
            for line in lines[seen_lines:][-20:]:  # the training's own console, tail only
                log.info("[train] %s", line)
            seen_lines = len(lines)
            metrics = read_metrics(run_dir)
            if metrics:
                done = metrics[-1]["step"] + 1
                await update_progress_artifact(progress_id, 100.0 * done / cfg.train.max_steps)
            start_evals()
            await collect_evals(wait=False)
        end = latest_step(run_dir)
        _attempt_record(run_dir, {"attempt": attempt_no, "job_id": attempt.job_id, "state": outcome.state,
                                  "reason": outcome.reason, "start_step": start, "end_step": end})
        log.info("attempt %d ended: %s (%s), steps %d -> %d", attempt_no, outcome.state, outcome.reason, start, end)
        if outcome.state == "completed":
            break
        if outcome.state == "requeue":
            continue
        failures += 1
        if last_fail_step is not None and end == last_fail_step and end == start:
            raise FlowFailure(f"crash loop at step {end}: two attempts in a row made no progress ({outcome.reason}); "
                              f"see {log_path}")
        last_fail_step = end
        if failures > p.max_resubmits:
            raise FlowFailure(f"gave up after {failures} failed attempts (last: {outcome.reason}) at step {end}")
        await asyncio.sleep(p.backoff_seconds * 2 ** (failures - 1))

    await update_progress_artifact(progress_id, 100.0)
    start_evals()
    await collect_evals(wait=True)
    metrics = read_metrics(run_dir)
    rows = _report_table(evals, metrics)
    await create_table_artifact(rows, key=f"{p.run_name.lower().replace('_', '-').replace('.', '-')}-checkpoints",
                                description="Checkpoints: val loss and evaluations")
    plot_url = store.join(run_dir, "curves.png")
    store.write_bytes(plot_url, render_png(run_dir, p.run_name))
    result = {"run_dir": run_dir, "final_step": latest_step(run_dir), "attempts": attempt_no,
              "final_loss": metrics[-1]["loss"] if metrics else None, "evaluations": rows,
              "minutes": round((time.monotonic() - t0) / 60, 2)}
    await create_markdown_artifact(
        f"# {p.run_name}\n\n- final step: {result['final_step']} / {cfg.train.max_steps}\n"
        f"- final train loss: {result['final_loss']}\n- attempts: {attempt_no}\n- curves: `{plot_url}`\n",
        description="Run summary")
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flows.pretrain", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--store", default="store")
    ap.add_argument("--run-name", default="tiny-demo")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--eval-tasks", default="hellaswag", help="comma-separated; empty = no evaluation")
    ap.add_argument("--hellaswag-data", default=None)
    args = ap.parse_args(argv)
    params = PretrainParams(preset=args.preset, store=args.store, run_name=args.run_name, overrides=args.overrides,
                            eval_tasks=[t for t in args.eval_tasks.split(",") if t], hellaswag_data=args.hellaswag_data)
    result = asyncio.run(pretrain(params))
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
