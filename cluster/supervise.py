"""`cluster.submit --wait`: a run watched to its end and resubmitted the way the flow resubmits, without Prefect.

Each job is watched by RunHandle.wait (states, progress, hangs); its end becomes an Outcome (cluster/job_outcome.py)
and the policy the flow uses (cluster/resubmission.py) decides: done, resubmit (after its backoff), roll back past
diverging data, or stop. The records are the flow's (cluster/run_records.py: job.json, submissions.jsonl,
rollbacks.jsonl; cluster/cordon.py: cordon.jsonl) and so is the lease, so one supervisor watches a run at a time
and a flow started on the run later reattaches to the job in flight.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cluster import cordon as cordons
from cluster.job_outcome import cancelled, failed, from_result
from cluster.launch import JobHung, RunFailed
from cluster.resubmission import (
    BACKOFF_SECONDS,
    MAX_RESUBMITS,
    MAX_ROLLBACKS,
    Outcome,
    ResubmissionPolicy,
)
from cluster.run_records import (
    SubmissionEnd,
    divergence,
    in_flight,
    latest_step,
    record_end,
    record_start,
    roll_back,
    rollbacks,
    with_skips,
)
from cluster.spec import JobSpec
from cluster.submit import JobNotFound, RunHandle, reattach, submit
from common.layout import RunDir
from common.lease import Lease
from training.config import load_config


@dataclass(frozen=True)
class Retries:
    """The flow's `resubmission` section, as cluster.submit's flags."""

    max_resubmits: int = MAX_RESUBMITS
    max_rollbacks: int = MAX_ROLLBACKS
    backoff_s: float = BACKOFF_SECONDS
    cordon_hours: float = 24.0


class CommandLineSupervisor:
    """One run of `cluster.submit --wait`: `watch(handle)` blocks until a job ends (RunHandle.wait with the
    command's hang rules and progress); `say(line)` tells the person at the terminal; `on_job(job_id)` is
    called with each job submitted."""

    def __init__(
        self,
        spec: JobSpec,
        config: str,
        overrides: list[str],
        retries: Retries,
        watch: Callable[[RunHandle], dict[str, Any]],
        say: Callable[[str], None],
        on_job: Callable[[str], None] = lambda job_id: None,
    ):
        self.spec, self.config, self.overrides = spec, config, overrides
        self.retries, self.watch, self.say, self.on_job = retries, watch, say, on_job
        self.cfg = load_config(config, overrides)
        self.run = RunDir(self.cfg.train.run_dir)
        self.where = {
            "executor": "slurm",
            "folder": spec.folder,
        }  # as the flow's Slurm executor records it
        self.policy = ResubmissionPolicy(
            retries.max_resubmits,
            retries.backoff_s,
            retries.max_rollbacks,
            rollbacks=len(rollbacks(self.run)),
        )
        self.lease = Lease(self.run.lease("flow"), "cluster.submit --wait")

    @classmethod
    def of_job(
        cls, handle: RunHandle, retries: Retries, watch, say, on_job
    ) -> CommandLineSupervisor:
        """The supervisor of a job submitted earlier by cluster.submit (its record says how to resubmit it)."""
        if handle.submitted is None:
            raise RunFailed(
                f"job {handle.job_id}'s record predates resubmission: watch it with --no-resubmit"
            )
        s = handle.submitted
        spec = JobSpec(**s["spec"])
        return cls(spec, s["config"], list(s["overrides"]), retries, watch, say, on_job)

    def run_to_end(self, watching: RunHandle | None = None) -> dict[str, Any]:
        """Submit (or go on watching the job `watching`, or the one an earlier supervisor left in flight) and
        resubmit until the run is done: its result, or RunFailed with the policy's reason to stop."""
        with self.lease:
            job_id, number = in_flight(self.run, self)
            handle = watching
            if handle is None and job_id:
                handle = self._reattach(job_id)
            if handle is None:
                number += 1
                handle = self.submit(number)
            elif handle.job_id != job_id:
                number += 1
                record_start(self.run, self, number, handle)
            while True:
                start = latest_step(self.run.url)
                outcome, result = self.outcome_of(handle)
                if self.decide(handle, outcome, start, number) == "done":
                    return result
                number += 1
                handle = self.submit(number)

    def _reattach(self, job_id: str) -> RunHandle | None:
        try:
            handle = reattach(job_id, self.spec.folder)
        except JobNotFound:
            return None
        self.say(f"reattached to job {job_id}, left in flight by an earlier supervisor of this run")
        return handle

    def describe(self) -> dict:
        return self.where

    def submit(self, number: int) -> RunHandle:
        """Submission `number`, off the cordoned hosts, passing over the batches every rollback skips."""
        if self.lease.lost.is_set():
            raise RunFailed(f"the run's lease went to {self.lease.lost_to}: not resubmitted")
        avoid = tuple(cordons.cordoned(self.run))
        overrides = with_skips(self.overrides, self.cfg, rollbacks(self.run))
        handle = submit(self.spec, self.config, overrides, exclude=avoid)
        record_start(self.run, self, number, handle)
        self.on_job(handle.job_id)
        step = latest_step(self.run.url)
        off = f", off the cordoned {', '.join(avoid)}" if avoid else ""
        self.say(f"submission {number}: job {handle.job_id} from step {step}{off}")
        return handle

    def outcome_of(self, handle: RunHandle) -> tuple[Outcome, dict[str, Any]]:
        """The job watched to its end, and what the end means (with training's result when it returned one)."""
        try:
            result = self.watch(handle)
        except JobHung as err:
            host = cordons.host_to_blame(err.silent)
            return Outcome("hung", str(err), (host,) if host else ()), {}
        except RunFailed as err:
            state = handle.state()
            if state.startswith("CANCELLED"):
                return cancelled(handle, state), {}
            return failed(handle, state, err), {}
        return from_result(handle.job_id, result), result

    def decide(self, handle: RunHandle, outcome: Outcome, start: int, number: int) -> str:
        """The policy's decision, acted on and recorded as the flow records it; raises RunFailed on stop."""
        diverged = divergence(self.run) if outcome.state == "diverged" else None
        end = latest_step(self.run.url)
        decision = self.policy.decide(outcome, start, end, diverged)
        hours = self.retries.cordon_hours
        blamed = list(outcome.hosts) if hours > 0 else []
        for host in blamed:
            cordons.cordon(self.run, host, f"{outcome.state}: {outcome.reason}", hours)
        end_rec = SubmissionEnd(
            number,
            handle.job_id,
            outcome.state,
            outcome.reason,
            start,
            end,
            next=decision.action,
            message=decision.message,
            cordoned=blamed,
            diverged=diverged,
        )
        record_end(self.run, self, outcome, end_rec)
        self.say(
            f"submission {number} ended: {outcome.state} ({outcome.reason}), steps {start} -> {end}"
        )
        if blamed:
            self.say(
                f"cordoned {', '.join(blamed)} for {hours:g} h: the next submissions run elsewhere"
            )
        if decision.action == "rollback":
            rec = roll_back(self.run, diverged, self.policy.rollbacks)
            self.say(
                f"{decision.message}; resuming from step {rec['resume_step']}, checkpoints "
                f"{rec['set_aside']} set aside in {self.run.rolled_back(self.policy.rollbacks)}"
            )
        elif decision.action == "stop":
            raise RunFailed(decision.message)
        elif decision.message:
            self.say(decision.message)
        time.sleep(decision.wait_s)
        return decision.action
