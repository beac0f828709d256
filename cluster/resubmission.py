"""What a submission's end means for the run: the resubmission policy of the flow and of `cluster.submit --wait`
alike, pure (no Prefect, no Slurm), so every rule is tested on its own.

- completed: the run is done.
- requeue (stopped with a checkpoint: a local SIGTERM, stop_after_steps): submit again at once.
- cancelled (someone ran scancel): stop; a person decided, so nothing is retried.
- failed (a node failure, a rank's error, a requeue cap) or hung (no new step in its window: the watcher
  cancelled it): resubmit from the latest checkpoint after an
  exponential backoff, until `max_resubmits` failures have been resubmitted; two failures in a row that made
  no progress (the same step, not past it) are a crash loop and stop the run.
- diverged (training's guard skipped too many updates): roll back to the last checkpoint before the trouble
  and resubmit with the offending data batches passed over, up to `max_rollbacks` times; then stop, naming
  the steps and batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from training.guard import Divergence

# How a submission ended: completed; requeue (stopped with a checkpoint: resubmit at once); failed (resubmit
# after a backoff); cancelled (a person did: stop); diverged (the guard stopped it: roll back past the data);
# hung (cancelled by the flow: resubmit).
OutcomeState = Literal["completed", "requeue", "failed", "cancelled", "diverged", "hung"]


@dataclass(frozen=True)
class Outcome:
    state: OutcomeState
    reason: str
    hosts: tuple[str, ...] = ()  # the hosts the failure points at (cordoned)


# The defaults of both front ends (the flow's `resubmission` section, cluster.submit's flags).
MAX_RESUBMITS = 3
MAX_ROLLBACKS = 3
BACKOFF_SECONDS = 5.0


@dataclass(frozen=True)
class Decision:
    # held: the run was asked to stop with a checkpoint and stay stopped (flows/hold.py), not a failure
    action: Literal["done", "resubmit", "rollback", "stop", "held"]
    wait_s: float = 0.0
    message: str = ""  # why: the log line for a resubmission, the one-line failure for a stop


@dataclass
class ResubmissionPolicy:
    max_resubmits: int
    backoff_seconds: float
    max_rollbacks: int = 3
    failures: int = 0
    last_failure_step: int | None = None
    rollbacks: int = 0  # of the whole run (a restarted flow counts the ones in rollbacks.jsonl)

    def decide(
        self,
        outcome: Outcome,
        start_step: int,
        end_step: int,
        diverged: Divergence | None = None,
    ) -> Decision:
        """The next move after a submission that ran from checkpoint `start_step` to checkpoint `end_step`;
        `diverged`: the guard's verdict of a diverged one."""
        if outcome.state == "completed":
            return Decision("done")
        if outcome.state == "diverged":
            where = diverged.describe() if diverged else "an unrecorded step"
            self.rollbacks += 1
            if self.rollbacks > self.max_rollbacks:
                return Decision(
                    "stop",
                    message=f"diverged at {where} after {self.max_rollbacks} rollbacks; "
                    "not resubmitted",
                )
            return Decision(
                "rollback",
                message=f"diverged at {where}: rolling back past those batches "
                f"(rollback {self.rollbacks} of at most {self.max_rollbacks})",
            )
        if outcome.state == "requeue":
            return Decision(
                "resubmit", message=f"{outcome.reason}: resubmitting from step {end_step}"
            )
        if outcome.state == "cancelled":
            return Decision(
                "stop",
                message=f"{outcome.reason} at step {end_step}; not resubmitted "
                "(run the flow again to resume)",
            )
        self.failures += 1
        if (
            self.last_failure_step is not None
            and end_step == self.last_failure_step
            and end_step == start_step
        ):
            return Decision(
                "stop",
                message=f"crash loop at step {end_step}: two submissions in a row made no "
                f"progress ({outcome.reason})",
            )
        self.last_failure_step = end_step
        if self.failures > self.max_resubmits:
            return Decision(
                "stop",
                message=f"gave up after {self.failures} failed submissions "
                f"(last: {outcome.reason}) at step {end_step}",
            )
        wait = self.backoff_seconds * 2 ** (self.failures - 1)
        return Decision(
            "resubmit",
            wait_s=wait,
            message=f"resubmitting from step {end_step} in {wait:.0f} s "
            f"(failure {self.failures} of at most {self.max_resubmits + 1})",
        )
