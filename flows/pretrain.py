"""`pretrain-gpt2` (deployed as `pretrain-124m`): validate -> ensure data -> train, resubmitting on failure,
while every new checkpoint is evaluated in its own process -> final report. Orchestration only: the model math
is in training/, the Slurm launch in cluster/.

    python -m flows.pretrain [--preset tiny] [--store store] [--run-name tiny-demo] [--set key=value ...]

This file is the flow's entry: its parameters checked, the run directory's lease taken, the tracker mirror
started, then the run handed to flows/supervisor.py (submit -> watch -> decide -> act -> report). The other
parts: flows/executors.py (where a submission runs), flows/watch.py (one submission, watched),
cluster/resubmission.py (what to do when it ends), flows/evaluations.py (every checkpoint evaluated),
flows/report.py and flows/events.py (the UI), flows/tracker.py (the run mirrored into a tracker).
"""

from __future__ import annotations

import argparse
import asyncio
import os
from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run as current_run
from prefect.settings import PREFECT_UI_URL

from common import exit_codes, store
from common.cli import entry_point, read_json_object
from common.errors import BadInput
from common.layout import RunDir
from common.lease import Lease, LeaseHeld
from common.outputs import claim_folder
from common.shards import ShardError, list_shards
from evaluation.evaluate import lm_eval_tasks
from flows.executors import LocalTrainingExecutor, SubmissionRejected, TrainingExecutor
from flows.hold import clear_hold
from flows.params import PretrainParams, add_flags, from_flags
from flows.prefect_server import run_flow_here
from flows.supervisor import FlowFailure, RunSupervisor
from flows.tracker import TrackerMirror, tracker_record
from tracking.credentials import HELD
from training.config import ConfigError, RunConfig, load_config, resolve_key

__all__ = ["FlowFailure", "pretrain", "run_pretrain"]


# ----------------------------------------------------------------------------- before anything is submitted


def make_executor(p: PretrainParams) -> TrainingExecutor:
    if p.executor == "slurm":
        from flows.slurm_executor import SlurmTrainingExecutor

        return SlurmTrainingExecutor(p.slurm)
    return LocalTrainingExecutor(nproc=p.nproc)


def resolve_config(p: PretrainParams) -> tuple[RunConfig, list[str]]:
    """The run config every submission will use (its data and run directory in the flow's store), validated
    here before anything is submitted."""
    for item in (
        p.overrides
    ):  # the flow's own: where the run lives, and what it reads (the `data` parameter)
        key = resolve_key(item.split("=", 1)[0].strip()) if "=" in item else ""
        if key in ("train.run_dir", "data.data_url"):
            raise ConfigError(
                f"override {item.split('=', 1)[0]!r}: the flow sets {key} itself (from store and run_name, "
                "or the data parameter)"
            )
    preset = load_config(p.preset)
    data = p.data or p.store_layout().dataset(preset.data.dataset)
    overrides = [f"run_dir={p.run_dir().url}", f"data_url={data}", *p.overrides]
    cfg = load_config(p.preset, overrides)
    cfg.grad_accum_steps(p.world_size())
    cfg.val_steps_per_rank(p.world_size())
    return cfg, overrides


async def ensure_data(cfg: RunConfig, p: PretrainParams) -> None:
    """Shards present, or built by the prepare-data flow (a subflow in the UI) from the run's source."""
    from flows.prepare_data import prepare_data

    url = cfg.data.url
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


def check_evaluation(p: PretrainParams) -> None:
    """Evaluations that could never run are refused before anything trains (every checkpoint's evaluation would
    fail, one by one, after hours of training): an lm-eval task lm-eval does not know, HellaSwag without its
    file."""
    others = lm_eval_tasks(p.evaluation.tasks)
    if others:
        from evaluation.lm_eval_runner import unknown_tasks

        unknown = unknown_tasks(others, p.evaluation.include_path)
        if unknown:
            where = f" (nor in {p.evaluation.include_path})" if p.evaluation.include_path else ""
            raise FlowFailure(
                f"bad parameter: evaluation.tasks has {', '.join(unknown)}, which lm-eval does not "
                f"know{where}"
            )
    if "hellaswag" not in p.evaluation.tasks:
        return
    url = p.evaluation.hellaswag_data or p.store_layout().hellaswag
    try:
        present = store.exists(url)
    except Exception as err:  # an unreachable store is said where the store is checked
        raise FlowFailure(f"store unreachable: {err}") from None
    if not present:
        raise FlowFailure(
            f"bad parameter: evaluation.tasks has hellaswag but {url} does not exist: stage it with "
            f"`python -m evaluation.hellaswag_data --out {p.store}`, point evaluation.hellaswag_data at "
            "the file, or leave hellaswag out of evaluation.tasks"
        )


def check_tracker(p: PretrainParams) -> None:
    """A tracker that could never be fed is refused before anything is submitted."""
    kind = p.tracker.kind
    if kind == "none":
        return
    import importlib.util

    if importlib.util.find_spec(kind) is None:  # tensorboard: the package of that name
        raise FlowFailure(
            f"bad parameter: tracker={kind} needs the {kind} library on the worker: "
            "pip install 'gpt2-repro[trackers]'"
        )
    if kind == "mlflow" and not (p.tracker.uri or os.environ.get("MLFLOW_TRACKING_URI")):
        raise FlowFailure(
            "bad parameter: tracker=mlflow needs tracker_uri or MLFLOW_TRACKING_URI on the worker"
        )


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
    # back when the last flow run of this process that took them ends (a process serving several flow runs, or a
    # sweep's trials at once, needs them for the others).
    tracker_credentials = HELD.enter(os.environ)
    try:
        return await _run_with(p, executor, log, tracker_credentials)
    finally:
        HELD.leave(os.environ)


async def _run_with(
    p: PretrainParams, executor: TrainingExecutor, log, tracker_credentials: dict[str, str]
) -> dict[str, Any]:
    check_tracker(p)
    await asyncio.to_thread(check_evaluation, p)  # lm-eval's task index takes seconds
    try:
        cfg, overrides = resolve_config(p)
    except Exception as err:
        raise FlowFailure(f"bad parameter: {err}") from None
    try:  # a job that could never start is refused here, before data prep and before sbatch
        executor.validate(p.preset, overrides)
    except SubmissionRejected as err:
        raise FlowFailure(str(err)) from None
    run = p.run_dir()
    try:
        store.preflight(run.url, write=True)
    except store.StoreError as err:
        raise FlowFailure(f"store unreachable: {err}") from None
    try:  # never into a folder holding someone else's files
        remedy = "choose another run_name, or move those files away"
        claim_folder(run.url, ours=RunDir.is_ours, what="a run directory", remedy=remedy)
    except BadInput as err:
        raise FlowFailure(f"bad parameter: run_name {p.run_name!r}: {err}") from None
    # One flow per run directory: a second one stops here naming the first; a retry of this flow run, or a
    # new one after its process died, takes over.
    lease = Lease(
        run.lease("flow"), f"flow run {current_run.name or '?'}", identity=str(current_run.id or "")
    )
    try:
        await asyncio.to_thread(lease.acquire)
    except LeaseHeld as err:
        raise FlowFailure(str(err)) from None
    # checked and ours: from here an outage of the store is waited out (until this flow run ends)
    patience = store.ride_out_outages()
    mirror, state = None, "failed"
    try:
        if p.tracker.kind != "none":
            mirror = await TrackerMirror.start(p.tracker, run, log, tracker_credentials)
        if await asyncio.to_thread(clear_hold, run):  # a new flow run on a held run goes on with it
            log.info("the run was held: this flow run clears the hold and resumes it")
        await ensure_data(cfg, p)
        supervisor = RunSupervisor(p, executor, cfg, overrides, run, lease, log)
        result = await supervisor.run_to_end()
        state = "completed"
        if mirror is not None:
            await mirror.finish(state, p.tracker.finish_timeout_s + 60)
            result["tracker"] = tracker_record(run, p.tracker.kind)
        return result
    except asyncio.CancelledError:
        state = "stopped"
        raise
    finally:
        if mirror is not None and state != "completed":
            await mirror.finish(state, p.tracker.finish_timeout_s + 60)
        await asyncio.to_thread(lease.release)
        patience.stop()


# ----------------------------------------------------------------------------- CLI


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
    add_flags(ap)
    args = ap.parse_args(argv)
    params = from_flags(args, read_json_object(args.params, "--params"))
    run_flow_here(pretrain, params)
    return exit_codes.OK


if __name__ == "__main__":
    raise SystemExit(main())
