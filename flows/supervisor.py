"""The run, supervised: submit -> watch -> decide -> act, until the run is done or must stop, then report.

    submit   a submission of the run from its latest checkpoint (or the one an earlier flow run left in flight)
    watch    its console, metrics, heartbeats and stragglers until it ends (flows/watch.py), evaluating every
             new checkpoint meanwhile (flows/evaluations.py)
    decide   what its end means (cluster/resubmission.py): done, resubmit, roll back past diverging data, stop
    act      cordon the hosts a failure points at, record the submission, roll back, back off
    hold     a hold request on the run (flows/hold.py: a sweep pruning a trial) stops the submission with a
             checkpoint and ends the flow run there, as held
    report   the final curves, evaluations and summary in the UI (flows/report.py)

What differs between executors (where a submission runs, cordons, lost nodes, how an end is decoded) is
behind the executor (flows/executors.py); the supervisor asks it, never which one it is.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from cluster.cordon import cordon, cordon_row, cordoned
from cluster.resubmission import Decision, Outcome, ResubmissionPolicy
from cluster.run_records import (
    SubmissionEnd,
    divergence,
    in_flight,
    latest_step,
    record_end,
    record_start,
    roll_back,
    with_skips,
)
from common.errors import ReproError
from common.layout import RunDir
from common.lease import Lease
from flows.evaluations import EvaluationScheduler
from flows.events import EventsTable
from flows.executors import Placement, PlacementError, Submission, TrainingExecutor
from flows.hold import HoldRequest, hold_requested
from flows.params import PretrainParams
from flows.report import (
    Progress,
    artifact_key,
    best_checkpoint,
    checkpoint_rows,
    publish_checkpoint_table,
    publish_curves,
    publish_summary,
)
from flows.tracker import tracker_record
from flows.watch import RunWatcher, straggler_record, straggler_row, watch_as_task
from training.config import RunConfig
from training.guard import Divergence
from training.metrics import read_metrics
from training.telemetry import Straggler, StragglerWatch

# A run whose every node is cordoned waits for the first cordon to expire when it does within this; a longer
# wait (the default cordon lasts 24 h) is a person's decision: the run stops saying so.
CORDON_WAIT_S = 1800.0


class FlowFailure(ReproError):
    """A run that cannot go on; the message is the one line a person reads in the UI."""


class RunSupervisor:
    def __init__(
        self,
        p: PretrainParams,
        executor: TrainingExecutor,
        cfg: RunConfig,
        overrides: list[str],
        run: RunDir,
        lease: Lease,
        log,
    ):
        self.p, self.executor, self.cfg, self.overrides = p, executor, cfg, overrides
        self.run, self.lease, self.log = run, lease, log
        self.key, self.max_steps = artifact_key(p.run_name), cfg.train.max_steps
        self.t0 = time.monotonic()
        self.evals = EvaluationScheduler(
            run.url, p.evaluation, log, shares_machine=executor.shares_machine
        )
        self.watcher = RunWatcher(
            run,
            log,
            p.poll_seconds,
            p.hang.rules(cfg.train.heartbeat_seconds, p.poll_seconds),
            self.on_lost_nodes,
            StragglerWatch(p.stragglers.margin, p.stragglers.windows),
            self.on_straggler,
        )
        self.events = EventsTable(
            run,
            p.run_name,
            self.key,
            lambda: self.watcher.guard_events,
            self.watcher.earlier_stragglers,
        )
        r = p.resubmission
        self.policy = ResubmissionPolicy(
            r.max_resubmits,
            r.backoff_seconds,
            r.max_rollbacks,
            rollbacks=len(self.events.rollbacks),
        )
        self.progress: Progress | None = None
        self.diverged: Divergence | None = None  # the guard's verdict of the submission that ended
        self.number = 0  # submissions made so far (by earlier flow runs too)
        self.cordoned_now: list[str] = []  # by the submission being watched
        self.shrunk_to: int | None = None  # of the submission being watched
        self.current: Submission | None = None  # the submission being watched
        self.held: HoldRequest | None = None  # a hold request seen on the run

    # ------------------------------------------------------------------------------------------ the loop

    async def run_to_end(self) -> dict[str, Any]:
        self.progress = await Progress.create(self.p.run_name, self.max_steps, self.log, self.key)
        await self.events.publish()
        submission, label = self.reattach()
        while True:
            start = latest_step(self.run.url)
            if submission is None:
                self.held = await asyncio.to_thread(hold_requested, self.run)
                if self.held is not None:
                    self.log.warning(
                        "the run is held at step %d by %s: %s",
                        start,
                        self.held.by,
                        self.held.reason,
                    )
                    break
                if start >= self.max_steps:
                    self.log.info(
                        "the run is complete (checkpoint at step %d): nothing to submit", start
                    )
                    break
                submission, label = self.submit(start, await self.placed())
            seen_events = len(self.watcher.guard_events)
            self.current = submission
            outcome = await watch_as_task(label, self.watcher, submission, self.on_tick)
            self.current = None
            decision = self.decide(outcome, start)
            await self.act(submission, outcome, decision, start, seen_events)
            submission = None
            if decision.action in ("done", "held"):
                break
        return await self.report()

    def reattach(self) -> tuple[Submission | None, str]:
        """The submission an earlier flow run left in flight, if it can be watched."""
        job_id, self.number = in_flight(self.run, self.executor)
        submission = self.executor.reattach(job_id) if job_id else None
        if submission is None:
            return None, ""
        self.log.info(
            "reattached to job %s, submitted by an earlier flow run (submission %d)",
            submission.job_id,
            self.number,
        )
        return submission, f"submission {self.number} (job {submission.job_id}, reattached)"

    async def placed(self) -> Placement:
        """Where the next submission runs. When cordons leave it nowhere but the first of them expires within
        CORDON_WAIT_S (short cordons, nodes that failed in a row), that wait is said and waited; else the run
        stops saying what to do."""
        while True:
            try:
                return self.executor.placement(self.cfg, self.run, self.p.resubmission.allow_shrink)
            except PlacementError as err:
                wait = None if err.free_at is None else err.free_at - time.time()
                if wait is None or wait > CORDON_WAIT_S:
                    raise FlowFailure(str(err)) from None
                self.log.warning("%s. Waiting %.0f s for the first cordon to expire", err, wait)
                await asyncio.sleep(max(0.0, wait) + 1)

    def submit(self, start: int, where: Placement) -> tuple[Submission, str]:
        self.number += 1
        if where.exclude:
            self.log.warning(
                "submission %d avoids the cordoned hosts %s", self.number, ", ".join(where.exclude)
            )
        if where.shrunk_to is not None:
            self.log.warning(
                "submission %d runs on %d of the job's %s nodes (allow_shrink): the others are cordoned",
                self.number,
                where.shrunk_to,
                where.asked,
            )
        self.shrunk_to = where.shrunk_to
        overrides = with_skips(self.overrides, self.cfg, self.events.rollbacks)
        try:
            sub = where.executor.submit(
                self.p.preset, overrides, self.run, self.number, where.exclude
            )
        except Exception as err:
            raise FlowFailure(f"submission refused: {err}") from None
        record_start(self.run, self.executor, self.number, sub)
        self.log.info("submission %d: job %s from step %d", self.number, sub.job_id, start)
        return sub, f"submission {self.number} (job {sub.job_id})"

    def decide(self, outcome: Outcome, start: int) -> Decision:
        if self.held is not None and outcome.state != "completed":
            return Decision("held", message=f"held by {self.held.by}: {self.held.reason}")
        self.diverged = divergence(self.run) if outcome.state == "diverged" else None
        return self.policy.decide(outcome, start, latest_step(self.run.url), self.diverged)

    async def act(
        self,
        submission: Submission,
        outcome: Outcome,
        decision: Decision,
        start: int,
        seen_events: int,
    ) -> None:
        """Cordon, record the submission's end, then do what was decided (raises FlowFailure on stop)."""
        end = latest_step(self.run.url)
        self._note_failure(submission, outcome, end)
        skips = [e for e in self.watcher.guard_events[seen_events:] if e.get("event") == "skip"]
        record_end(
            self.run,
            self.executor,
            outcome,
            SubmissionEnd(
                self.number,
                submission.job_id,
                outcome.state,
                outcome.reason,
                start,
                end,
                next=decision.action,
                message=decision.message,
                cordoned=list(self.cordoned_now),
                nodes=self.shrunk_to,
                diverged=self.diverged,
                skipped=[(e["step"], e["reason"]) for e in skips],
            ),
        )
        self.log.info(
            "submission %d ended: %s (%s), steps %d -> %d",
            self.number,
            outcome.state,
            outcome.reason,
            start,
            end,
        )
        self.cordoned_now.clear()
        if decision.action == "rollback":
            rec = roll_back(self.run, self.diverged, self.policy.rollbacks)
            self.events.rolled_back(rec)
            self.log.warning(
                "%s; resuming from step %d, checkpoints %s set aside in %s",
                decision.message,
                rec["resume_step"],
                rec["set_aside"],
                self.run.rolled_back(self.policy.rollbacks),
            )
        await self.events.publish()
        if decision.action == "stop":
            raise FlowFailure(decision.message)
        if decision.wait_s:
            self.log.warning("%s", decision.message)
            await asyncio.sleep(decision.wait_s)

    def _note_failure(self, submission: Submission, outcome: Outcome, step: int) -> None:
        """A hang in the events table; the hosts the outcome points at cordoned."""
        if outcome.state == "hung":
            self.events.add(self._row("hang", step, f"job {submission.job_id}", outcome.reason))
        if self.cordon(outcome.hosts, f"{outcome.state}: {outcome.reason}", step):
            self.log.warning(
                "cordoned %s for %g h (%s): the next submissions run elsewhere",
                ", ".join(outcome.hosts),
                self.p.resubmission.cordon_hours,
                outcome.state,
            )

    async def report(self) -> dict[str, Any]:
        """The run's end in the UI: curves, every checkpoint's evaluations, the summary; and the flow's result."""
        metrics = read_metrics(self.run.url)
        assert self.progress is not None
        await self.progress.update(metrics, force=True)
        self.evals.start_new()
        await self.report_evaluations(wait=True)
        curves = await publish_curves(self.run.url, self.p.run_name, self.key)
        rows = checkpoint_rows(self.evals.results, metrics)
        result = {
            "run_dir": self.run.url,
            "final_step": latest_step(self.run.url),
            "submissions": self.number,
            "final_loss": metrics[-1]["loss"] if metrics else None,
            "final_val_loss": next(
                (m["val_loss"] for m in reversed(metrics) if "val_loss" in m), None
            ),
            "evaluations": rows,
            "best_checkpoint": best_checkpoint(rows),
            "curves": curves,
            "minutes": round((time.monotonic() - self.t0) / 60, 2),
        }
        if self.p.tracker.kind != "none":
            result["tracker"] = tracker_record(self.run, self.p.tracker.kind)
        if self.held is not None:
            result["held"] = self.held.model_dump()
        await publish_summary(self.run.url, self.p.run_name, self.key, self.max_steps, result)
        return result

    # ------------------------------------------------------------------------------------------ while watching

    async def on_tick(self, metrics: list[dict[str, Any]]) -> None:
        """After every poll of the submission: progress, new events, new checkpoints evaluated."""
        if self.lease.lost.is_set():
            raise FlowFailure(
                f"another flow run took over {self.run.url} ({self.lease.lost_to}); "
                "this one stops watching"
            )
        await self.check_hold()
        assert self.progress is not None
        await self.progress.update(metrics)
        await self.events.publish()  # a skipped update: in the UI as it happens
        self.evals.start_new()
        await self.report_evaluations()

    async def check_hold(self) -> None:
        """A hold request stops the submission being watched with a checkpoint (once); the watcher then sees it
        end, and decide() ends the run there."""
        if self.held is not None or self.current is None:
            return
        self.held = await asyncio.to_thread(hold_requested, self.run)
        if self.held is not None:
            self.log.warning(
                "held by %s: %s; stopping job %s with a checkpoint",
                self.held.by,
                self.held.reason,
                self.current.job_id,
            )
            await asyncio.to_thread(self.current.cancel)

    async def report_evaluations(self, wait: bool = False) -> None:
        if await self.evals.collect(wait):
            rows = checkpoint_rows(self.evals.results, self.watcher.metrics)
            await publish_checkpoint_table(rows, self.p.run_name, self.key)
            await publish_curves(self.run.url, self.p.run_name, self.key)

    async def on_lost_nodes(self, submission: Submission, hosts: tuple[str, ...]) -> None:
        """A node died under the job and its executor restarted it elsewhere (Slurm: NODE_FAIL, requeued):
        cordon the node and keep the job's restart off it, instead of waiting for it to fail there again."""
        step = latest_step(self.run.url)
        why = f"job {submission.job_id}: NODE_FAIL, requeued by Slurm"
        self.events.add(self._row("node lost", step, ", ".join(hosts), why))
        why = f"node failure under job {submission.job_id} (NODE_FAIL)"
        done = self.cordon(hosts, why, step)
        cordons = tuple(sorted(cordoned(self.run)))
        avoided = await asyncio.to_thread(submission.avoid, cordons) if done else False
        hours = self.p.resubmission.cordon_hours
        if avoided:
            then = f"; cordoned for {hours:g} h and excluded from its restart"
        elif done:
            then = f"; cordoned for {hours:g} h (the job had restarted already: the next submissions avoid it)"
        else:
            then = ""
        self.log.warning(
            "node %s failed under job %s (NODE_FAIL) and Slurm requeued the job%s",
            ", ".join(hosts),
            submission.job_id,
            then,
        )
        await self.events.publish()

    async def on_straggler(self, found: Straggler) -> None:
        """A rank the others keep waiting for (the watcher has logged and recorded it): a row in the events table."""
        self.events.add(straggler_row(straggler_record(found)))
        await self.events.publish()

    # ------------------------------------------------------------------------------------------ helpers

    def cordon(self, hosts: tuple[str, ...], why: str, step: int) -> list[str]:
        """Keep `hosts` out of the run's next submissions (when the executor can, and cordon_hours > 0)."""
        hours = self.p.resubmission.cordon_hours
        if not self.executor.cordons or hours <= 0:
            return []
        for host in hosts:
            self.events.add(cordon_row(cordon(self.run, host, why[:300], hours), step))
            self.cordoned_now.append(host)
        return list(hosts)

    @staticmethod
    def _row(event: str, step: int, data: str, reason: str) -> dict[str, Any]:
        return {"time": time.time(), "event": event, "step": step, "data": data, "reason": reason}
