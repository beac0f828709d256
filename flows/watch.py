"""Watching a run while a submission of it runs: the submission's state, the training's console and the
launcher's requeue events into the log, a straggling rank (from the telemetry in the metrics lines), and the
new metrics lines to whoever reports them. Every file is
tailed: only its new bytes are read, so polling a long run stays cheap on S3 too. Each submission is watched
as a Prefect task run of its own (`watch_submission`), so the run's graph shows them one after the other and a
failed one as failed, with its reason."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from cluster.cordon import host_to_blame
from cluster.resubmission import Outcome
from common import store
from common.errors import ReproError
from common.heartbeat import HangDetector, HangRules
from common.layout import RunDir
from common.logfiles import LogTail
from common.stall import StallAlarm
from flows.executors import Submission
from training.metrics import MetricsTail
from training.telemetry import Straggler, StragglerWatch


def _parse(lines: list[str]) -> list[dict[str, Any]]:
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # torn by a killed writer
    return out


def straggler_record(found: Straggler) -> dict[str, Any]:
    """A straggler as a line of {run}/stragglers.jsonl."""
    return {
        "time": time.time(),
        "event": "straggler",
        "step": found.step,
        "rank": found.rank,
        "host": found.host,
        "busy_ms": found.busy_ms,
        "median_ms": found.median_ms,
        "windows": found.windows,
        "reason": found.message,
    }


def straggler_row(rec: dict[str, Any]) -> dict[str, Any]:
    """A line of {run}/stragglers.jsonl as a row of the run's events table in the UI."""
    return {
        "time": rec.get("time"),
        "event": "straggler",
        "step": rec.get("step"),
        "data": f"{rec.get('host')}:{rec.get('rank')}",
        "reason": rec.get("reason", ""),
    }


class RunWatcher:
    """The run's metrics (all lines read so far) and its launcher events, across the run's submissions."""

    def __init__(
        self,
        run: RunDir,
        log: logging.Logger | logging.LoggerAdapter,
        poll_seconds: float,
        hang: HangRules | None = None,
        on_lost_nodes: Callable[[Submission, tuple[str, ...]], Awaitable[None]] | None = None,
        stragglers: StragglerWatch | None = None,
        on_straggler: Callable[[Straggler], Awaitable[None]] | None = None,
    ):
        self.run, self.log, self.poll_seconds, self.hang = run, log, poll_seconds, hang
        self.on_lost_nodes = (
            on_lost_nodes  # a node died under a job that Slurm requeued: the job goes on
        )
        self.stragglers, self.on_straggler = (
            stragglers,
            on_straggler,
        )  # a rank the others keep waiting for
        self.events = LogTail(run.attempts)
        self.events.read()  # earlier submissions' events were logged by earlier flow runs
        self.guard_tail = LogTail(run.events)
        self.guard_events: list[dict[str, Any]] = _parse(
            self.guard_tail.read()
        )  # shown whole in the UI
        self.metrics_tail = MetricsTail(run.url)
        self.metrics: list[dict[str, Any]] = []
        # stragglers already recorded: a restarted flow reads the metrics from the start and finds them again
        self.earlier_stragglers = _parse(LogTail(run.stragglers).read())
        self.stragglers_kept = {
            (r.get("rank"), r.get("host"), r.get("step")) for r in self.earlier_stragglers
        }

    async def watch(
        self,
        submission: Submission,
        on_tick: Callable[[list[dict[str, Any]]], Awaitable[None]],
        log=None,
    ) -> Outcome:
        """Poll until the submission ends; after every poll, `on_tick(all metrics so far)`. `log`: where its
        lines go (the submission's task run), the watcher's log by default."""
        self.log = log or self.log
        console = LogTail(submission.log_path)
        detector = HangDetector(self.run, self.hang, owns=submission.owns) if self.hang else None
        # heartbeats are read every few seconds, not every poll: on S3 each read is a request per rank
        check_every, checked = min(10.0, self.hang.floor_s / 4) if self.hang else 0.0, 0.0
        # a store or scheduler that stops answering is said while it lasts (each call has its deadline too)
        alarm = StallAlarm(lambda line: self.log.warning("%s", line))
        the_store = f"the store ({self.run.url})"
        try:
            while True:
                await asyncio.sleep(self.poll_seconds)
                with alarm.waiting_on(f"the executor (the state of job {submission.job_id})"):
                    # sacct/squeue calls: not on the event loop
                    outcome = await asyncio.to_thread(submission.poll)
                if (
                    outcome is None
                    and detector is not None
                    and time.monotonic() - checked >= check_every
                ):
                    checked = time.monotonic()
                    with alarm.waiting_on(the_store):
                        hang = await asyncio.to_thread(self._hung, detector, submission)
                    for note in detector.take_notes():
                        self.log.warning("%s", note)
                    if hang is not None:
                        outcome = await self._cancel_hung(submission, hang)
                if outcome is None and self.on_lost_nodes is not None:
                    lost = await asyncio.to_thread(submission.lost_nodes)
                    if lost:
                        await self.on_lost_nodes(submission, lost)
                with alarm.waiting_on(the_store):
                    console_lines = console.read()[-20:]  # the training's own console, tail only
                    for line in console_lines:
                        self.log.info("[train] %s", line)
                    self._log_events()
                    self._log_guard_events()
                    new = self.metrics_tail.read()
                self.metrics += new
                await self._stragglers(new)
                await on_tick(self.metrics)
                if outcome is not None:
                    return outcome
        finally:
            alarm.close()

    async def _stragglers(self, rows: list[dict[str, Any]]) -> None:
        for found in self.stragglers.feed(rows) if self.stragglers else []:
            if (found.rank, found.host, found.step) in self.stragglers_kept:
                continue  # an earlier flow run said so, and its row is in the events table from the start
            self.log.warning("%s", found.message)
            await asyncio.to_thread(self._keep_straggler, found)
            if self.on_straggler is not None:
                await self.on_straggler(found)

    def _keep_straggler(self, found: Straggler) -> None:
        """{run}/stragglers.jsonl: the tracker mirror and later flow runs read it (the events table is the UI's)."""
        try:
            store.append_text(self.run.stragglers, json.dumps(straggler_record(found)) + "\n")
            self.stragglers_kept.add((found.rank, found.host, found.step))
        except (
            Exception
        ) as err:  # the warning is in the log already; the file is a record, not the alarm
            self.log.warning("could not append to stragglers.jsonl: %s", err)

    @staticmethod
    def _hung(detector: HangDetector, submission: Submission):
        if not submission.running():  # queued, or requeued inside the job (preemption)
            detector.paused()
            return None
        detector.started()
        return detector.check()

    async def _cancel_hung(self, submission: Submission, hang) -> Outcome:
        """Cancel a hung submission and wait for it to end (its own end state, a cancellation, is not the point)."""
        self.log.warning("%s: cancelling job %s", hang.message, submission.job_id)
        await asyncio.to_thread(submission.cancel, True)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and await asyncio.to_thread(submission.poll) is None:
            await asyncio.sleep(self.poll_seconds)
        host = host_to_blame(hang.silent)
        return Outcome("hung", hang.message, (host,) if host else ())

    def _log_guard_events(self) -> None:
        """Skipped updates and divergence, as training's guard records them in events.jsonl."""
        for ev in _parse(self.guard_tail.read()):
            self.guard_events.append(ev)
            if ev.get("event") == "skip":
                self.log.warning(
                    "step %s skipped (%s), data batch %s",
                    ev.get("step"),
                    ev.get("reason"),
                    ev.get("data_batch"),
                )
            else:
                self.log.warning(
                    "%s at step %s: steps %s, data batches %s",
                    ev.get("event"),
                    ev.get("step"),
                    ev.get("steps"),
                    ev.get("batches"),
                )

    def _log_events(self) -> None:
        """Requeues, stops and failures inside a Slurm job, as cluster/launch.py records them."""
        for ev in _parse(self.events.read()):
            self.log.log(
                logging.INFO if ev.get("event") == "completed" else logging.WARNING,
                "job %s: %s%s at step %s (checkpoint %s)",
                ev.get("job_id"),
                ev.get("event"),
                f" ({ev['reason']})" if ev.get("reason") else "",
                ev.get("step", ev.get("final_step")),
                ev.get("checkpoint"),
            )


class SubmissionEnded(ReproError):
    """A submission that failed or was cancelled: its task run fails with the reason; the flow decides next."""

    def __init__(self, outcome: Outcome):
        super().__init__(f"{outcome.state}: {outcome.reason}")
        self.outcome = outcome


@task(name="submission", task_run_name="{label}", cache_policy=NO_CACHE, persist_result=False)
async def watch_submission(
    label: str,
    watcher: RunWatcher,
    submission: Submission,
    on_tick: Callable[[list[dict[str, Any]]], Awaitable[None]],
) -> Outcome:
    """One submission, as a task run named e.g. `submission 2 (job 1234)`, until it ends."""
    outcome = await watcher.watch(submission, on_tick, log=get_run_logger())
    if outcome.state in ("failed", "cancelled", "diverged", "hung"):
        raise SubmissionEnded(outcome)
    return outcome


async def watch_as_task(
    label: str,
    watcher: RunWatcher,
    submission: Submission,
    on_tick: Callable[[list[dict[str, Any]]], Awaitable[None]],
) -> Outcome:
    """The outcome of `watch_submission`, whether its task run completed or failed."""
    state = await watch_submission(label, watcher, submission, on_tick, return_state=True)  # type: ignore[misc]
    if state.is_completed():
        return await state.aresult()
    err = await state.aresult(raise_on_failure=False)
    if isinstance(err, SubmissionEnded):
        return err.outcome
    raise err  # the watcher itself broke (or a lost lease): not an outcome of the submission
