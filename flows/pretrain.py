"""`pretrain-gpt2` (deployed as `pretrain-124m`): validate -> ensure data -> train, resubmitting on failure,
while every new checkpoint is evaluated in its own process -> final report. Orchestration only: the model math
is in training/, the Slurm launch in cluster/.

    python -m flows.pretrain [--preset tiny] [--store store] [--run-name tiny-demo]   # run once, locally
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, create_table_artifact, \
    update_progress_artifact
from prefect.runtime import flow_run as current_run
from prefect.settings import PREFECT_UI_URL

from flows.evaluate_checkpoint import run_evaluation, run_evaluation_on_slurm, summary_row
from flows.executors import Attempt, Executor, LocalExecutor, Outcome
from flows.params import PretrainParams
from flows.report import artifact_key, publish_curves, publish_summary
from training import checkpoint as ck
from training import store
from training.config import RunConfig, load_config
from training.data import ShardError, list_shards
from training.plots import parse_metrics, read_metrics

JOB_FILE = "job.json"  # {run_dir}/job.json: the attempt in flight, so a restarted flow run reattaches to it
SUBMISSIONS_FILE = "submissions.jsonl"  # one line per attempt: job id, outcome, reason, step range


class FlowFailure(RuntimeError):
    """A run that cannot go on; the message is the one line a person reads in the UI."""


def make_executor(p: PretrainParams) -> Executor:
    if p.executor == "slurm":
        from flows.slurm_executor import SlurmExecutor

        return SlurmExecutor(p.slurm)
    return LocalExecutor(nproc=p.nproc)


def resolve_config(p: PretrainParams) -> tuple[RunConfig, list[str]]:
    """The run config the attempts will use, validated here before anything is submitted."""
    preset_data = load_config(p.preset).data.data_url
    # Presets name their data under a relative "store/": it moves with the store parameter.
    data = p.data or (p.store.rstrip("/") + preset_data[len("store"):] if preset_data.startswith("store/") else preset_data)
    overrides = [f"run_dir={p.run_dir()}", f"data_url={data}", *p.overrides]
    cfg = load_config(p.preset, overrides)
    cfg.grad_accum_steps(p.world_size())
    cfg.val_steps_per_rank(p.world_size())
    return cfg, overrides


def validate_job(p: PretrainParams, overrides: list[str]) -> None:
    """A Slurm job that could never start is refused here, before data prep and before sbatch."""
    if p.executor != "slurm":
        return
    from cluster.validate import SpecError, validate

    try:
        validate(p.slurm, p.preset, overrides, check_cluster=True, check_data=False)
    except SpecError as err:
        raise FlowFailure(f"Slurm job rejected: {err}") from None


async def ensure_data(cfg: RunConfig, p: PretrainParams) -> None:
    """Shards present, or built by the prepare-data flow (a subflow in the UI) when the run says from what."""
    from flows.prepare_data import DEMO_SOURCE, prepare_data

    url = cfg.data.data_url
    try:
        list_shards(url, "train")
    except ShardError:
        source = DEMO_SOURCE if url.rstrip("/").endswith("data/demo") else p.prepare_source
        if not source:
            raise FlowFailure(f"no token shards at {url}: run the prepare-data flow first, or set prepare_source") \
                from None
        try:
            await prepare_data(source=source, out=url, shard_tokens=p.shard_tokens, slurm=p.prepare_slurm)
        except Exception as err:
            raise FlowFailure(f"data preparation failed: {err}") from None
    try:
        list_shards(url, "train")
        list_shards(url, "val")
    except ShardError as err:
        raise FlowFailure(f"bad data: {err}") from None


def latest_step(run_dir: str) -> int:
    c = ck.latest_checkpoint(run_dir, verify=False)
    return c.step if c else 0


class LogTail:
    """New whole lines of a growing file (the training's console, metrics.jsonl, the launcher's attempts.jsonl)
    since the last call; only the new bytes are read, so polling a long run's files stays cheap on S3 too."""

    def __init__(self, url: str):
        self.url, self.offset = url, 0

    def read(self) -> list[str]:
        fs, path = store.fs_and_path(self.url)
        try:
            fs.invalidate_cache(path)
            size = fs.size(path)
            if size < self.offset:  # truncated (a requeued Slurm job reopened its log)
                self.offset = 0
            if size == self.offset:
                return []
            with fs.open(path, "rb") as f:
                f.seek(self.offset)
                data = f.read(size - self.offset)
        except (FileNotFoundError, OSError):
            return []
        end = data.rfind(b"\n") + 1  # whole lines only: a torn last line is read next time
        self.offset += end
        return data[:end].decode(errors="replace").splitlines()


class Progress:
    """Step / max steps, tokens seen and ETA, from metrics.jsonl: the progress artifact (a percentage, updated
    in place), a status markdown artifact (a new version per 1% of the run, so at most ~100), and the log."""

    def __init__(self, artifact_id, max_steps: int, log, key: str):
        self.id, self.max_steps, self.log, self.key = artifact_id, max_steps, log, key
        self.first: tuple[float, int] | None = None
        self.last_log, self.last_status = 0.0, -1

    async def update(self, metrics: list[dict[str, Any]], force: bool = False) -> None:
        if not metrics:
            return
        done, now = metrics[-1]["step"] + 1, time.monotonic()
        if self.first is None or done < self.first[1]:
            self.first = (now, done)
        await update_progress_artifact(self.id, 100.0 * min(done, self.max_steps) / self.max_steps)
        t0, s0 = self.first
        rate = (done - s0) / (now - t0) if now > t0 and done > s0 else 0.0
        eta = _duration((self.max_steps - done) / rate) if rate else "-"
        tokens = f"{metrics[-1].get('tokens_seen', 0):,}"
        if force or now - self.last_log >= 30:
            self.last_log = now
            self.log.info("step %d/%d (%.1f%%), %s tokens seen, ETA %s", done, self.max_steps,
                          100.0 * done / self.max_steps, tokens, eta)
        percent = 100 * done // self.max_steps
        if force or percent > self.last_status:
            self.last_status = percent
            last = metrics[-1]
            val = next((m["val_loss"] for m in reversed(metrics) if "val_loss" in m), None)
            await create_markdown_artifact(
                f"| step | tokens seen | train loss | val loss | tokens/s | ETA |\n| --- | --- | --- | --- | --- | --- |\n"
                f"| {done} / {self.max_steps} | {tokens} | {last['loss']:.4f} | "
                f"{f'{val:.4f}' if val is not None else '-'} | {last.get('tokens_per_s', 0):,.0f} | {eta} |\n",
                key=f"{self.key}-status", description="training status: step, tokens seen, losses, ETA")


def _duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def checkpoint_rows(evals: dict[int, dict[str, Any]], metrics: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per evaluated checkpoint: step, the val loss measured last at or before it, its evaluations."""
    val = [(m["step"] + 1, m["val_loss"]) for m in metrics if "val_loss" in m]
    rows = []
    for step in sorted(evals):
        v = next((loss for s, loss in reversed(val) if s <= step), None)
        row = summary_row(evals[step])
        rows.append({"step": step, "val_loss": round(v, 4) if v is not None else None,
                     **{k: x for k, x in row.items() if k != "step"}})
    return rows


def _cancel_job(flow, flow_run, state) -> None:  # Prefect passes these by name
    """Cancelling the flow run in the UI also cancels its Slurm job (a local attempt dies with the flow)."""
    try:
        p = PretrainParams.model_validate(flow_run.parameters.get("params", {}))
        rec = store.read_json(store.join(p.run_dir(), JOB_FILE))
        if rec.get("executor") == "slurm" and not rec.get("ended"):
            import subprocess

            subprocess.run(["scancel", str(rec["job_id"])], capture_output=True, timeout=60)
    except Exception:  # a hook must not mask the cancellation itself
        pass


@flow(name="pretrain-gpt2", log_prints=True, on_cancellation=[_cancel_job])
async def pretrain(params: PretrainParams = PretrainParams()) -> dict[str, Any]:
    """GPT-2 pretraining: data -> training (local or Slurm, resubmitted on failure) -> evaluation per checkpoint."""
    return await run_pretrain(params, make_executor(params))


async def run_pretrain(params: PretrainParams, executor: Executor) -> dict[str, Any]:
    """The flow's body, with the executor injectable (Slurm, local, or a test's). Call inside a flow run."""
    log = get_run_logger()
    p = params
    ui = PREFECT_UI_URL.value()
    if ui and current_run.id:
        log.info("watch this run: %s/runs/flow-run/%s", ui.rstrip("/"), current_run.id)
    if p.credentials_secret:
        from flows.credentials import CredentialsError, apply_secret

        try:
            names = await apply_secret(p.credentials_secret)
        except CredentialsError as err:
            raise FlowFailure(str(err)) from None
        log.info("store credentials from Secret %r: %s", p.credentials_secret, ", ".join(names))
    try:
        cfg, overrides = resolve_config(p)
    except Exception as err:
        raise FlowFailure(f"bad parameter: {err}") from None
    validate_job(p, overrides)
    run_dir = cfg.train.run_dir
    try:
        store.preflight(run_dir, write=True)
    except store.StoreError as err:
        raise FlowFailure(f"store unreachable: {err}") from None
    await ensure_data(cfg, p)

    key = artifact_key(p.run_name)
    progress = Progress(await create_progress_artifact(0.0, description=f"{p.run_name}: training progress"),
                        cfg.train.max_steps, log, key)
    evals: dict[int, dict[str, Any]] = {}
    pending: dict[int, asyncio.Task] = {}
    failures, attempt_no, last_fail_step = 0, 0, None
    events = LogTail(store.join(run_dir, "attempts.jsonl"))  # requeues logged by the Slurm launcher
    events.read()  # earlier attempts' events were logged by earlier flow runs
    metrics_tail, metrics = LogTail(store.join(run_dir, "metrics.jsonl")), []
    t0 = time.monotonic()

    def start_evals() -> None:
        if not p.eval_tasks:
            return
        for c in ck.valid_checkpoints(run_dir):
            if c.step not in evals and c.step not in pending:
                pending[c.step] = asyncio.create_task(
                    run_evaluation_on_slurm(c.url, p.eval_tasks, p.eval_slurm, p.hellaswag_data) if p.eval_slurm
                    else run_evaluation(c.url, p.eval_tasks, p.hellaswag_data))

    async def collect_evals(wait: bool) -> None:
        new = False
        for step, task in list(pending.items()):
            if wait or task.done():
                evals[step] = await task
                del pending[step]
                new = True
                log.info("evaluated step %d: %s", step, json.dumps(summary_row(evals[step])))
        if new:
            await create_table_artifact(checkpoint_rows(evals, metrics), key=f"{key}-checkpoints",
                                        description=f"{p.run_name}: evaluation of every checkpoint")
            await publish_curves(run_dir, p.run_name, key)

    job_url = store.join(run_dir, JOB_FILE)
    attempt: Attempt | None = None
    if store.exists(job_url):
        rec = store.read_json(job_url)
        attempt_no = int(rec.get("attempt", 0))
        if rec.get("executor") == executor.describe()["executor"] and not rec.get("ended"):
            attempt = executor.reattach(str(rec["job_id"]))
            if attempt is not None:
                log.info("reattached to job %s, submitted by an earlier flow run (attempt %d)", attempt.job_id,
                         attempt_no)

    while True:
        start = latest_step(run_dir)
        if attempt is None and start >= cfg.train.max_steps:
            log.info("the run is complete (checkpoint at step %d): nothing to submit", start)
            break
        if attempt is None:
            attempt_no += 1
            log_path = str(store.fs_and_path(store.join(run_dir, "logs"))[1]) + f"/attempt-{attempt_no:03d}.log" \
                if store.is_local(run_dir) else f"logs/{p.run_name}/attempt-{attempt_no:03d}.log"
            try:
                attempt = executor.submit(p.preset, overrides, log_path)
            except Exception as err:
                raise FlowFailure(f"submission refused: {err}") from None
            store.write_json(job_url, {"job_id": attempt.job_id, "attempt": attempt_no, **executor.describe()})
            log.info("attempt %d: job %s from step %d", attempt_no, attempt.job_id, start)
        console = LogTail(attempt.log_path)
        outcome: Outcome | None = None
        while outcome is None:
            await asyncio.sleep(p.poll_seconds)
            outcome = await asyncio.to_thread(attempt.poll)  # sacct/squeue calls: not on the event loop
            for line in console.read()[-20:]:  # the training's own console, tail only
                log.info("[train] %s", line)
            for line in events.read():
                try:
                    ev = json.loads(line)
                except ValueError:
                    continue  # torn by a killed writer
                log.log(logging.INFO if ev.get("event") == "completed" else logging.WARNING,
                        "job %s: %s%s at step %s (checkpoint %s)", ev.get("job_id"), ev.get("event"),
                        f" ({ev['reason']})" if ev.get("reason") else "", ev.get("step", ev.get("final_step")),
                        ev.get("checkpoint"))
            metrics += parse_metrics(metrics_tail.read())
            await progress.update(metrics)
            start_evals()
            await collect_evals(wait=False)
        end = latest_step(run_dir)
        store.write_json(job_url, {"job_id": attempt.job_id, "attempt": attempt_no, "ended": outcome.state,
                                   **executor.describe()})
        store.append_text(store.join(run_dir, SUBMISSIONS_FILE), json.dumps(
            {"attempt": attempt_no, "job_id": attempt.job_id, "state": outcome.state, "reason": outcome.reason,
             "start_step": start, "end_step": end, "time": time.time()}) + "\n")
        log.info("attempt %d ended: %s (%s), steps %d -> %d", attempt_no, outcome.state, outcome.reason, start, end)
        attempt = None
        if outcome.state == "completed":
            break
        if outcome.state == "requeue":
            continue
        if outcome.state == "cancelled":
            raise FlowFailure(f"{outcome.reason} at step {end}; not resubmitted (run the flow again to resume)")
        failures += 1
        if last_fail_step is not None and end == last_fail_step and end == start:
            raise FlowFailure(f"crash loop at step {end}: two attempts in a row made no progress ({outcome.reason})")
        last_fail_step = end
        if failures > p.max_resubmits:
            raise FlowFailure(f"gave up after {failures} failed attempts (last: {outcome.reason}) at step {end}")
        wait = p.backoff_seconds * 2 ** (failures - 1)
        log.warning("resubmitting from step %d in %.0f s (failure %d of at most %d)", end, wait, failures,
                    p.max_resubmits + 1)
        await asyncio.sleep(wait)

    metrics = read_metrics(run_dir)
    await progress.update(metrics, force=True)
    start_evals()
    await collect_evals(wait=True)
    curves = await publish_curves(run_dir, p.run_name, key)
    rows = checkpoint_rows(evals, metrics)
    result = {"run_dir": run_dir, "final_step": latest_step(run_dir), "attempts": attempt_no,
              "final_loss": metrics[-1]["loss"] if metrics else None, "evaluations": rows, "curves": curves,
              "minutes": round((time.monotonic() - t0) / 60, 2)}
    await publish_summary(run_dir, p.run_name, key, cfg.train.max_steps, result)
    return result


def api_problem() -> str | None:
    """One line when PREFECT_API_URL names a server that does not answer (instead of a traceback mid-run)."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        return None  # Prefect starts a temporary local server itself
    import urllib.request

    try:
        urllib.request.urlopen(url.rstrip("/") + "/health", timeout=10)
    except OSError as err:
        return (f"the Prefect server at {url} does not answer ({err}); start it (prefect server start) "
                f"or unset PREFECT_API_URL")
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flows.pretrain", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--store", default="store")
    ap.add_argument("--run-name", default="tiny-demo")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--eval-tasks", default="hellaswag", help="comma-separated; empty = no evaluation")
    ap.add_argument("--hellaswag-data", default=None)
    ap.add_argument("--params", default=None, help="JSON object of PretrainParams fields (overrides the flags)")
    args = ap.parse_args(argv)
    fields = dict(preset=args.preset, store=args.store, run_name=args.run_name, overrides=args.overrides,
                  eval_tasks=[t for t in args.eval_tasks.split(",") if t], hellaswag_data=args.hellaswag_data)
    params = PretrainParams(**{**fields, **json.loads(args.params or "{}")})
    problem = api_problem()
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        result = asyncio.run(pretrain(params))
    except FlowFailure as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
