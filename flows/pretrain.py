"""`pretrain-gpt2` (deployed as `pretrain-124m`): validate -> ensure data -> train, resubmitting on failure,
while every new checkpoint is evaluated in its own process -> final report. Orchestration only: the model math
is in training/, the Slurm launch in cluster/.

    python -m flows.pretrain [--preset tiny] [--store store] [--run-name tiny-demo] [--set key=value ...]

The parts: flows/executors.py (where a submission runs), flows/watch.py (one submission, watched),
flows/resubmission.py (what to do when it ends), flows/evaluations.py (every checkpoint evaluated),
flows/report.py (the UI), flows/tracker.py (the run mirrored into MLflow or W&B).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run as current_run
from prefect.settings import PREFECT_UI_URL

from common import exit_codes, store
from common.cli import add_model_flags, entry_point, model_from_flags, read_json_object
from common.errors import BadInput, ReproError
from common.heartbeat import HangRules
from common.layout import RunDir
from common.lease import Lease, LeaseHeld
from common.shards import ShardError, list_shards
from flows.cordon import cordon, cordon_row, cordoned, usable_nodes
from flows.evaluations import EvaluationScheduler
from flows.executors import LocalTrainingExecutor, Outcome, Submission, TrainingExecutor
from flows.params import PretrainParams
from flows.report import (
    Progress,
    artifact_key,
    best_checkpoint,
    checkpoint_rows,
    publish_checkpoint_table,
    publish_curves,
    publish_events,
    publish_summary,
)
from flows.resubmission import ResubmissionPolicy
from flows.tracker import TrackerMirror
from flows.watch import RunWatcher, straggler_record, straggler_row, watch_as_task
from tracking.credentials import take_credentials
from training import checkpoint as ck
from training.config import ConfigError, RunConfig, load_config
from training.metrics import read_metrics
from training.telemetry import Straggler, StragglerWatch


class FlowFailure(ReproError):
    """A run that cannot go on; the message is the one line a person reads in the UI."""


# ----------------------------------------------------------------------------- before anything is submitted


def make_executor(p: PretrainParams) -> TrainingExecutor:
    if p.executor == "slurm":
        from flows.slurm_executor import SlurmTrainingExecutor

        return SlurmTrainingExecutor(p.slurm)
    return LocalTrainingExecutor(nproc=p.nproc)


def resolve_config(p: PretrainParams) -> tuple[RunConfig, list[str]]:
    """The run config every submission will use (its data and run directory in the flow's store), validated
    here before anything is submitted."""
    preset = load_config(p.preset)
    data = p.data or p.store_layout().dataset(preset.data.dataset)
    overrides = [f"run_dir={p.run_dir().url}", f"data_url={data}", *p.overrides]
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
    """Shards present, or built by the prepare-data flow (a subflow in the UI) from the run's source."""
    from flows.prepare_data import prepare_data

    url = cfg.data.data_url
    try:
        list_shards(url, "train")
    except ShardError:
        source = p.prepare_source or cfg.data.source
        if not source:
            raise FlowFailure(
                f"no token shards at {url}: run the prepare-data flow first, or set prepare_source"
            ) from None
        try:
            await prepare_data(
                source=source, out=url, shard_tokens=p.shard_tokens, slurm=p.prepare_slurm
            )
        except Exception as err:
            raise FlowFailure(f"data preparation failed: {err}") from None
    try:
        list_shards(url, "train")
        list_shards(url, "val")
    except ShardError as err:
        raise FlowFailure(f"bad data: {err}") from None


def check_tracker(p: PretrainParams) -> None:
    """A tracker that could never be fed is refused before anything is submitted."""
    if p.tracker == "none":
        return
    import importlib.util

    if importlib.util.find_spec(p.tracker) is None:  # tensorboard: the package of that name
        raise FlowFailure(
            f"bad parameter: tracker={p.tracker} needs the {p.tracker} library on the worker: "
            "pip install 'gpt2-repro[trackers]'"
        )
    if p.tracker == "mlflow" and not (p.tracker_uri or os.environ.get("MLFLOW_TRACKING_URI")):
        raise FlowFailure(
            "bad parameter: tracker=mlflow needs tracker_uri or MLFLOW_TRACKING_URI on the worker"
        )


def tracker_record(run: RunDir, kind: str) -> dict[str, Any]:
    """The tracker run mirroring this run, from the mirror's record."""
    try:
        rec = store.read_json(run.tracker(kind))
    except (FileNotFoundError, ValueError):
        return {"tracker": kind, "run_id": None}
    return {
        "tracker": kind,
        "run_id": rec.get("run_id"),
        "link": rec.get("link"),
        "generation": rec.get("generation"),
        "delivered_step": rec.get("delivered", {}).get("step"),
        "outages": rec.get("outages", 0),
        "finished": rec.get("finished"),
    }


# ----------------------------------------------------------------------------- the run's records


def latest_step(run_dir: str) -> int:
    c = ck.latest_checkpoint(run_dir, verify=False)
    return c.step if c else 0


def reattach(run: RunDir, executor: TrainingExecutor, log) -> tuple[Submission | None, int]:
    """The submission an earlier flow run left in flight (job.json), if it can be watched, and the number of
    submissions made so far."""
    if not store.exists(run.job):
        return None, 0
    rec = store.read_json(run.job)
    number = int(
        rec.get("submission", rec.get("attempt", 0))
    )  # "attempt": run dirs of earlier versions
    if rec.get("executor") != executor.describe()["executor"] or rec.get("ended"):
        return None, number
    submission = executor.reattach(str(rec["job_id"]))
    if submission is not None:
        log.info(
            "reattached to job %s, submitted by an earlier flow run (submission %d)",
            submission.job_id,
            number,
        )
    return submission, number


def record_submission(
    run: RunDir,
    executor: TrainingExecutor,
    number: int,
    sub: Submission,
    outcome: Outcome | None = None,
    steps: tuple[int, int] | None = None,
    decided: dict[str, Any] | None = None,
) -> None:
    """job.json names the submission in flight (or how it ended); submissions.jsonl keeps every ended one, with
    what the flow decided next (`next`: done, resubmit, rollback, stop, and why), the guard's verdict of a
    diverged one and the steps whose updates were skipped."""
    ended = {"ended": outcome.state} if outcome else {}
    store.write_json(
        run.job, {"job_id": sub.job_id, "submission": number, **ended, **executor.describe()}
    )
    if outcome is not None:
        store.append_text(
            run.submissions,
            json.dumps(
                {
                    "submission": number,
                    "job_id": sub.job_id,
                    "state": outcome.state,
                    "reason": outcome.reason,
                    "start_step": steps[0],
                    "end_step": steps[1],
                    "time": time.time(),
                    **(decided or {}),
                }
            )
            + "\n",
        )


def rollbacks(run: RunDir) -> list[dict[str, Any]]:
    if not store.exists(run.rollbacks):
        return []
    return [
        json.loads(ln) for ln in store.read_bytes(run.rollbacks).decode().splitlines() if ln.strip()
    ]


def roll_back(run: RunDir, diverged: dict[str, Any], number: int) -> dict[str, Any]:
    """Set aside the checkpoints written since the trouble began (into rolled-back/, never deleted) and record
    the data batches the next submissions pass over."""
    first_bad = diverged["steps"][0]
    before = [c.step for c in ck.valid_checkpoints(run.url) if c.step <= first_bad]
    resume = max(before, default=0)
    aside = [s for s in ck.list_steps(run.url) if s > resume]
    for s in aside:
        store.move(run.checkpoint(s), store.join(run.rolled_back(number), f"step_{s:06d}"))
    rec = {
        "rollback": number,
        "time": time.time(),
        "diverged_steps": diverged["steps"],
        "skip": diverged["batches"],
        "reasons": diverged.get("reasons", []),
        "resume_step": resume,
        "set_aside": aside,
    }
    store.append_text(run.rollbacks, json.dumps(rec) + "\n")
    return rec


def with_skips(overrides: list[str], cfg: RunConfig, run: RunDir) -> list[str]:
    """The submission's overrides, with the data batches every rollback so far passes over."""
    skips = [r["skip"] for r in rollbacks(run)]
    if not skips:
        return overrides
    return [
        *overrides,
        f"data.skip_batches={json.dumps(sorted(set(cfg.data.skip_batches) | set(skips)))}",
    ]


def shrink_to(cfg: RunConfig, usable: int, procs_per_node: int) -> int | None:
    """The most nodes, up to `usable`, over which the run's global batch and validation split evenly (7 nodes
    left of 8 usually means 4: a 2^k batch does not split over 7)."""
    for nodes in range(usable, 0, -1):
        try:
            (
                cfg.grad_accum_steps(nodes * procs_per_node),
                cfg.val_steps_per_rank(nodes * procs_per_node),
            )
        except ConfigError:
            continue
        return nodes
    return None


def placement(p: PretrainParams, cfg: RunConfig, run: RunDir) -> tuple[tuple[str, ...], int]:
    """The cordoned hosts the next submission must avoid, and its number of nodes: the spec's, or, with
    `allow_shrink`, the nodes left when cordons leave too few (checkpoints resume on another world size, and
    gradient accumulation keeps the global batch). Too few without it is a failure that says so, instead of a
    job that queues forever."""
    if p.executor != "slurm":
        return (), 0
    hosts, nodes = tuple(sorted(cordoned(run))), p.slurm.nodes
    if hosts:
        usable = usable_nodes(p.slurm.partition, set(hosts))
        if usable is not None and len(usable) < nodes:
            what = (
                f"partition {p.slurm.partition or '(default)'} can no longer give the job its {nodes} nodes: "
                f"{len(usable)} usable ({', '.join(usable) or 'none'}) with {', '.join(hosts)} cordoned in "
                f"{run.cordon}"
            )
            if not p.allow_shrink:
                raise FlowFailure(
                    f"{what}; let a cordon expire (cordon_hours), ask for fewer nodes, or set "
                    "allow_shrink"
                )
            fits = shrink_to(cfg, len(usable), p.slurm.procs_per_node)
            if fits is None:
                raise FlowFailure(
                    f"{what}, and the run's batch splits evenly over none of them "
                    f"(train.total_batch_tokens, eval.val_tokens)"
                )
            nodes = fits
    return hosts, nodes


def _cancel_job(flow, flow_run, state) -> None:  # Prefect passes these by name
    """Cancelling the flow run in the UI also cancels its submission in flight (its Slurm job)."""
    try:
        p = PretrainParams.model_validate(flow_run.parameters.get("params", {}))
        rec = store.read_json(p.run_dir().job)
        if not rec.get("ended"):
            submission = make_executor(p).reattach(str(rec["job_id"]))
            if submission is not None:
                submission.cancel()
    except Exception:  # a hook must not mask the cancellation itself
        pass


# ----------------------------------------------------------------------------- the flow


@flow(name="pretrain-gpt2", log_prints=True, on_cancellation=[_cancel_job])
async def pretrain(params: PretrainParams = PretrainParams()) -> dict[str, Any]:  # noqa: B008 (the UI form's defaults)
    """GPT-2 pretraining: data -> training (local or Slurm, resubmitted on failure) -> evaluation per checkpoint."""
    return await run_pretrain(params, make_executor(params))


async def run_pretrain(p: PretrainParams, executor: TrainingExecutor) -> dict[str, Any]:
    """The flow's body, with the executor injectable (Slurm, local, or a test's). Call inside a flow run."""
    log = get_run_logger()
    ui = PREFECT_UI_URL.value()
    if ui and current_run.id:
        log.info("watch this run: %s/runs/flow-run/%s", ui.rstrip("/"), current_run.id)
    if p.credentials_secret:
        from flows.credentials import apply_secret

        names = await apply_secret(p.credentials_secret)
        log.info("credentials from Secret %r: %s", p.credentials_secret, ", ".join(names))
    # Tracker credentials go to the tracker mirror alone: out of this environment while the jobs inherit it,
    # back when the flow ends (a process serving several flow runs needs them for the next).
    tracker_credentials = take_credentials(os.environ)
    try:
        return await _run_with(p, executor, log, tracker_credentials)
    finally:
        os.environ.update(tracker_credentials)


async def _run_with(
    p: PretrainParams, executor: TrainingExecutor, log, tracker_credentials: dict[str, str]
) -> dict[str, Any]:
    check_tracker(p)
    try:
        cfg, overrides = resolve_config(p)
    except Exception as err:
        raise FlowFailure(f"bad parameter: {err}") from None
    validate_job(p, overrides)
    run = p.run_dir()
    try:
        store.preflight(run.url, write=True)
    except store.StoreError as err:
        raise FlowFailure(f"store unreachable: {err}") from None
    # One flow per run directory: a second one stops here naming the first; a retry of this flow run, or a
    # new one after its process died, takes over.
    lease = Lease(
        run.lease("flow"), f"flow run {current_run.name or '?'}", identity=str(current_run.id or "")
    )
    try:
        await asyncio.to_thread(lease.acquire)
    except LeaseHeld as err:
        raise FlowFailure(str(err)) from None
    mirror, state = None, "failed"
    try:
        if p.tracker != "none":
            mirror = await TrackerMirror.start(
                p.tracker,
                run,
                log,
                tracker_credentials,
                p.tracker_uri,
                p.tracker_project,
                p.tracker_entity,
                p.tracker_interval_s,
                p.tracker_finish_timeout_s,
            )
        result = await _pretrain(p, executor, cfg, overrides, run, lease, log)
        state = "completed"
        if mirror is not None:
            await mirror.finish(state, p.tracker_finish_timeout_s + 60)
            result["tracker"] = tracker_record(run, p.tracker)
        return result
    except asyncio.CancelledError:
        state = "stopped"
        raise
    finally:
        if mirror is not None and state != "completed":
            await mirror.finish(state, p.tracker_finish_timeout_s + 60)
        await asyncio.to_thread(lease.release)


async def _pretrain(
    p: PretrainParams,
    executor: TrainingExecutor,
    cfg: RunConfig,
    overrides: list[str],
    run: RunDir,
    lease: Lease,
    log,
) -> dict[str, Any]:
    await ensure_data(cfg, p)

    t0, key, max_steps = time.monotonic(), artifact_key(p.run_name), cfg.train.max_steps
    progress = await Progress.create(p.run_name, max_steps, log, key)
    evals = EvaluationScheduler(
        run.url,
        p.eval_tasks,
        p.hellaswag_data,
        p.eval_slurm,
        log,
        p.eval_include_path,
        shares_machine=p.executor == "local",
    )
    beat = cfg.train.heartbeat_seconds
    hang = (
        HangRules(
            p.hang_factor,
            p.hang_floor_s,
            p.startup_timeout_s,
            silent_s=3 * beat + 2 * p.poll_seconds,
        )
        if p.hang_detection and beat > 0
        else None
    )

    # the events table: hangs, lost nodes and cordoned hosts (those still cordoned by earlier flow runs first)
    health: list[dict[str, Any]] = [cordon_row(rec, None) for rec in cordoned(run).values()]
    cordoned_now: list[str] = []  # by the submission being watched

    def cordon_hosts(hosts: tuple[str, ...], why: str, step: int) -> list[str]:
        if p.executor != "slurm" or p.cordon_hours <= 0:
            return []
        for host in hosts:
            health.append(cordon_row(cordon(run, host, why[:300], p.cordon_hours), step))
            cordoned_now.append(host)
        return list(hosts)

    async def on_lost_nodes(submission: Submission, hosts: tuple[str, ...]) -> None:
        """A node died under the job and Slurm requeued it (NODE_FAIL): cordon the node and keep the job's
        restart off it, instead of waiting for the job to fail there again."""
        step = latest_step(run.url)
        health.append(
            {
                "time": time.time(),
                "event": "node lost",
                "step": step,
                "data": ", ".join(hosts),
                "reason": f"job {submission.job_id}: NODE_FAIL, requeued by Slurm",
            }
        )
        done = cordon_hosts(hosts, f"node failure under job {submission.job_id} (NODE_FAIL)", step)
        avoided = (
            await asyncio.to_thread(submission.avoid, tuple(sorted(cordoned(run))))
            if done
            else False
        )
        log.warning(
            "node %s failed under job %s (NODE_FAIL) and Slurm requeued the job%s",
            ", ".join(hosts),
            submission.job_id,
            f"; cordoned for {p.cordon_hours:g} h and excluded from its restart"
            if avoided
            else (
                f"; cordoned for {p.cordon_hours:g} h (the job had restarted already: "
                "the next submissions avoid it)"
                if done
                else ""
            ),
        )
        await publish_events(watcher.guard_events, rollbacks(run), p.run_name, key, health)

    async def on_straggler(found: Straggler) -> None:
        """A rank the others keep waiting for (the watcher has logged and recorded it): a row in the events table."""
        health.append(straggler_row(straggler_record(found)))
        await publish_events(watcher.guard_events, rollbacks(run), p.run_name, key, health)

    watcher = RunWatcher(
        run,
        log,
        p.poll_seconds,
        hang,
        on_lost_nodes,
        StragglerWatch(p.straggler_margin, p.straggler_windows),
        on_straggler,
    )
    health += [straggler_row(r) for r in watcher.earlier_stragglers]  # earlier flow runs' finds
    policy = ResubmissionPolicy(
        p.max_resubmits, p.backoff_seconds, p.max_rollbacks, rollbacks=len(rollbacks(run))
    )

    async def report_evaluations(wait: bool = False) -> None:
        if await evals.collect(wait):
            await publish_checkpoint_table(
                checkpoint_rows(evals.results, watcher.metrics), p.run_name, key
            )
            await publish_curves(run.url, p.run_name, key)

    shown_events = len(watcher.guard_events)
    if health:
        await publish_events(watcher.guard_events, rollbacks(run), p.run_name, key, health)

    async def on_tick(metrics: list[dict[str, Any]]) -> None:
        nonlocal shown_events
        if lease.lost.is_set():
            raise FlowFailure(
                f"another flow run took over {run.url} ({lease.lost_to}); this one stops watching"
            )
        await progress.update(metrics)
        if len(watcher.guard_events) > shown_events:  # a skipped update: in the UI as it happens
            shown_events = len(watcher.guard_events)
            await publish_events(watcher.guard_events, rollbacks(run), p.run_name, key, health)
        evals.start_new()
        await report_evaluations()

    submission, number = reattach(run, executor, log)
    label = f"submission {number} (job {submission.job_id}, reattached)" if submission else ""
    nodes = p.slurm.nodes  # of the submission in flight (fewer after a shrink)
    while True:
        start = latest_step(run.url)
        if submission is None:
            if start >= max_steps:
                log.info("the run is complete (checkpoint at step %d): nothing to submit", start)
                break
            number += 1
            exclude, nodes = placement(p, cfg, run)
            if exclude:
                log.warning(
                    "submission %d avoids the cordoned hosts %s", number, ", ".join(exclude)
                )
            target = executor
            if p.executor == "slurm" and nodes != p.slurm.nodes:
                log.warning(
                    "submission %d runs on %d of the job's %d nodes (allow_shrink): the others are cordoned",
                    number,
                    nodes,
                    p.slurm.nodes,
                )
                target = executor.resized(nodes)
            try:
                submission = target.submit(
                    p.preset, with_skips(overrides, cfg, run), run, number, exclude
                )
            except Exception as err:
                raise FlowFailure(f"submission refused: {err}") from None
            record_submission(run, executor, number, submission)
            log.info("submission %d: job %s from step %d", number, submission.job_id, start)
            label = f"submission {number} (job {submission.job_id})"
        seen_events = len(watcher.guard_events)
        outcome = await watch_as_task(label, watcher, submission, on_tick)
        end = latest_step(run.url)
        diverged = (
            store.read_json(run.result).get("diverged") if outcome.state == "diverged" else None
        )
        decision = policy.decide(outcome, start, end, diverged)
        skips = [e for e in watcher.guard_events[seen_events:] if e.get("event") == "skip"]
        if outcome.state == "hung":
            health.append(
                {
                    "time": time.time(),
                    "event": "hang",
                    "step": end,
                    "data": f"job {submission.job_id}",
                    "reason": outcome.reason,
                }
            )
        if cordon_hosts(outcome.hosts, f"{outcome.state}: {outcome.reason}", end):
            log.warning(
                "cordoned %s for %g h (%s): the next submissions run elsewhere",
                ", ".join(outcome.hosts),
                p.cordon_hours,
                outcome.state,
            )
        if health:
            await publish_events(watcher.guard_events, rollbacks(run), p.run_name, key, health)
        record_submission(
            run,
            executor,
            number,
            submission,
            outcome,
            (start, end),
            {
                "next": decision.action,
                **({"message": decision.message} if decision.message else {}),
                **({"cordoned": cordoned_now} if cordoned_now else {}),
                **({"nodes": nodes} if p.executor == "slurm" and nodes != p.slurm.nodes else {}),
                **({"diverged": diverged} if diverged else {}),
                **({"skipped": [[e["step"], e["reason"]] for e in skips]} if skips else {}),
            },
        )
        log.info(
            "submission %d ended: %s (%s), steps %d -> %d",
            number,
            outcome.state,
            outcome.reason,
            start,
            end,
        )
        submission = None
        cordoned_now.clear()
        if decision.action == "done":
            break
        if decision.action == "stop":
            await publish_events(watcher.guard_events, rollbacks(run), p.run_name, key, health)
            raise FlowFailure(decision.message)
        if decision.action == "rollback":
            rec = roll_back(run, diverged, policy.rollbacks)
            log.warning(
                "%s; resuming from step %d, checkpoints %s set aside in %s",
                decision.message,
                rec["resume_step"],
                rec["set_aside"],
                run.rolled_back(policy.rollbacks),
            )
            await publish_events(watcher.guard_events, rollbacks(run), p.run_name, key, health)
            continue
        if decision.wait_s:
            log.warning("%s", decision.message)
            await asyncio.sleep(decision.wait_s)

    metrics = read_metrics(run.url)
    await progress.update(metrics, force=True)
    evals.start_new()
    await report_evaluations(wait=True)
    curves = await publish_curves(run.url, p.run_name, key)
    rows = checkpoint_rows(evals.results, metrics)
    result = {
        "run_dir": run.url,
        "final_step": latest_step(run.url),
        "submissions": number,
        "final_loss": metrics[-1]["loss"] if metrics else None,
        "final_val_loss": next((m["val_loss"] for m in reversed(metrics) if "val_loss" in m), None),
        "evaluations": rows,
        "best_checkpoint": best_checkpoint(rows),
        "curves": curves,
        "minutes": round((time.monotonic() - t0) / 60, 2),
    }
    if p.tracker != "none":
        result["tracker"] = tracker_record(run, p.tracker)
    await publish_summary(run.url, p.run_name, key, max_steps, result)
    return result


# ----------------------------------------------------------------------------- CLI


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
        return (
            f"the Prefect server at {url} does not answer ({err}); start it (prefect server start) "
            f"or unset PREFECT_API_URL"
        )
    return None


@entry_point
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m flows.pretrain", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument(
        "--params",
        default=None,
        help="JSON object (or file) of PretrainParams fields; flags override it",
    )
    add_model_flags(
        ap, PretrainParams, aliases={"overrides": ["--set"]}, comma_lists=["eval_tasks"]
    )
    args = ap.parse_args(argv)
    params = model_from_flags(PretrainParams, args, read_json_object(args.params, "--params"))
    problem = api_problem()
    if problem:
        raise BadInput(problem)
    result = asyncio.run(pretrain(params))
    print(json.dumps(result, indent=2, default=str))
    return exit_codes.OK


if __name__ == "__main__":
    raise SystemExit(main())
