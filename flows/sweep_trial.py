"""One trial of a sweep: its pretrain run as a child flow run, its validations reported to the study as they
appear, a hold on the run when the pruner says it is behind (flows/hold.py), its end told to the study; and the
promotion of a pruned trial (its run resumed to the end).
"""

from __future__ import annotations

import asyncio
import time
from contextlib import AbstractAsyncContextManager, nullcontext
from typing import Any

from prefect.concurrency.asyncio import concurrency

from cluster.run_records import read_submissions
from common.layout import RunDir
from flows.hold import request_hold
from flows.pretrain import FlowFailure, pretrain
from flows.sweep_study import SweepParams, optuna_lib
from training.metrics import MetricsTail, read_metrics

# ----------------------------------------------------------------------------- one trial


class TrialRunner:
    """One trial: its pretrain run as a child flow run, its val losses reported to the study as they appear,
    a hold when the pruner says so, and its end told to the study."""

    def __init__(self, p: SweepParams, study, trial, log):
        self.p, self.study, self.trial, self.log = p, study, trial, log
        self.number = trial.number
        self.name = p.trial_name(self.number)
        self.run = p.run.store_layout().run(self.name)
        self.pruned_at: int | None = None

    async def run_to_end(self, overrides: list[str], adopted: bool) -> dict[str, Any]:
        optuna = optuna_lib()
        params = self.p.trial_params(self.number, overrides)
        self.log.info(
            "trial %d (%s)%s: %s",
            self.number,
            self.name,
            " adopted from an earlier flow run" if adopted else "",
            " ".join(overrides[len(self.p.space.overrides) :]) or "the base config",
        )
        child = pretrain.with_options(flow_run_name=self.name)
        reporter = asyncio.create_task(self.report_rungs())
        t0 = time.time()
        state, result, message = "failed", None, ""
        try:
            async with trial_slot(self.p):
                result = await child(params)
            state = "pruned" if result.get("held") else "completed"
        except FlowFailure as err:
            message = str(err)
        except Exception as err:  # the trial's own failure; the sweep goes on
            message = f"{type(err).__name__}: {err}"
        finally:
            reporter.cancel()
        record = trial_record(
            self.run, self.number, state, result, message, time.time() - t0, params.world_size()
        )
        self.trial.set_user_attr("result", record)
        if state == "completed" and record["final_val_loss"] is not None:
            self.study.tell(self.trial, record["final_val_loss"])
        elif state == "pruned":
            self.study.tell(self.trial, state=optuna.trial.TrialState.PRUNED)
        else:
            self.study.tell(self.trial, state=optuna.trial.TrialState.FAIL)
        self.log.info(
            "trial %d (%s) %s%s",
            self.number,
            self.name,
            state,
            f": {message}" if message else f", val loss {record['final_val_loss']}",
        )
        return record

    async def report_rungs(self) -> None:
        """Every new validation of the run, reported at its step; a hold on the run once the pruner says so."""
        # what an earlier flow run reported already (the storage API: a Trial has no public reader of it)
        seen = set(self.study._storage.get_trial(self.trial._trial_id).intermediate_values)
        metrics = MetricsTail(self.run.url)  # each poll reads the lines added since the last one
        while True:
            await asyncio.sleep(max(self.p.run.poll_seconds, 1.0))
            rows = await asyncio.to_thread(metrics.read)
            new = [r for r in rows if "val_loss" in r and r["step"] not in seen and r["step"] > 0]
            for r in new:
                seen.add(r["step"])
                self.trial.report(float(r["val_loss"]), int(r["step"]))
            if new and self.trial.should_prune():
                step, val = new[-1]["step"], new[-1]["val_loss"]
                self.pruned_at = step
                reason = (
                    f"pruned at step {step}: val loss {val:.4f} is behind the other trials there"
                )
                await asyncio.to_thread(request_hold, self.run, f"sweep {self.p.name}", reason)
                self.log.info("trial %d (%s) %s", self.number, self.name, reason)
                return


def trial_slot(p: SweepParams) -> AbstractAsyncContextManager[Any]:
    """A slot of the sweep's Prefect global concurrency limit, held while a trial runs (none without one). Its
    lease is renewed while the flow run lives, so a sweep that dies frees its slots when the leases expire."""
    if not p.concurrency_limit:
        return nullcontext()
    return concurrency(p.concurrency_limit, occupy=1, strict=True)


async def check_concurrency_limit(p: SweepParams) -> None:
    """The limit named exists on the server (FlowFailure, one line, before any trial): a slot of one that does
    not would be taken without limiting anything."""
    if not p.concurrency_limit:
        return
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    async with get_client() as client:
        try:
            limit = await client.read_global_concurrency_limit_by_name(p.concurrency_limit)
        except ObjectNotFound:
            raise FlowFailure(
                f"bad parameter: concurrency_limit {p.concurrency_limit!r} is not a global concurrency "
                f"limit of this Prefect server: `prefect gcl create {p.concurrency_limit} --limit N` makes it"
            ) from None
    if not limit.active:
        raise FlowFailure(
            f"bad parameter: the concurrency limit {p.concurrency_limit!r} is inactive, so it limits nothing: "
            f"`prefect gcl update {p.concurrency_limit} --enable`"
        )


def trial_record(
    run: RunDir,
    number: int,
    state: str,
    result: dict[str, Any] | None,
    message: str,
    seconds: float,
    world_size: int,
) -> dict[str, Any]:
    """What the sweep keeps of a trial's run (in the study, beside the trial): its state, losses, progress,
    best evaluation and cost."""
    metrics = read_metrics(run.url)
    vals = [m["val_loss"] for m in metrics if "val_loss" in m]
    busy_s = sum(m.get("step_ms", 0.0) for m in metrics) / 1000
    best = (result or {}).get("best_checkpoint") or {}
    subs = read_submissions(run)
    return {
        "trial": number,
        "run": run.url.rstrip("/").rsplit("/", 1)[-1],
        "state": state,
        "final_val_loss": vals[-1] if vals else None,
        "best_val_loss": min(vals) if vals else None,
        "final_step": metrics[-1]["step"] + 1 if metrics else 0,
        "tokens": metrics[-1].get("tokens_seen", 0) if metrics else 0,
        "eval": {best["metric"]: best["value"]} if best else {},
        # device-hours: the training steps' time on every process of the run
        "device_hours": round(busy_s * world_size / 3600, 4),
        "minutes": round(seconds / 60, 2),
        # the cluster's failures its flow resubmitted (or rolled back past): the trial's, not the search's
        "submissions": len(subs),
        "interruptions": [
            # end_step is the last checkpoint (where it goes on from), not the step it was at
            f"{s.get('state')} ({s.get('reason')}) after its checkpoint at step {s.get('end_step')}: "
            f"{s.get('next')}"
            for s in subs
            if s.get("next") not in ("done", "stop", "held")
        ],
        "message": message[:500],
    }


async def promote(p: SweepParams, study, frozen, log) -> dict[str, Any]:
    """A pruned trial run to its end: its pretrain run again, which clears the hold and resumes from the
    checkpoint it stopped at. Optuna keeps the trial as pruned (a finished trial does not change); the result
    is kept beside it in the study, and the sweep's table shows both."""
    name = p.trial_name(frozen.number)
    params = p.trial_params(frozen.number, frozen.user_attrs["overrides"])
    log.info("promoting trial %d (%s): resuming it from its checkpoint", frozen.number, name)
    t0 = time.time()
    state, result, message = "failed", None, ""
    try:
        async with trial_slot(p):
            result = await pretrain.with_options(flow_run_name=f"{name}-promoted")(params)
        state = "completed"
    except Exception as err:
        message = str(err) if isinstance(err, FlowFailure) else f"{type(err).__name__}: {err}"
    run = p.run.store_layout().run(name)
    record = trial_record(
        run, frozen.number, state, result, message, time.time() - t0, params.world_size()
    )
    study.set_user_attr(f"promoted-{frozen.number}", record)
    log.info("promoted trial %d (%s) %s", frozen.number, name, message or state)
    return record
