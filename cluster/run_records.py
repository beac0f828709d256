"""The records a supervisor (the flow, or `cluster.submit --wait`) keeps in the run directory; training never
writes them:

{run}/job.json            the submission in flight (or how it ended): a restarted flow reattaches to it
{run}/submissions.jsonl   every ended submission: how it ended, its steps, what the flow did next
{run}/rollbacks.jsonl     every rollback past diverging data; rolled-back/NNN/ holds what it set aside
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from cluster.resubmission import Outcome
from common import store
from common.layout import RunDir
from training import checkpoint as ck
from training.config import RunConfig
from training.guard import Divergence

log = logging.getLogger(__name__)


class Executor(Protocol):
    def describe(self) -> dict:
        """What job.json records of where the submissions run (so that a restarted supervisor reattaches)."""


class Submitted(Protocol):
    job_id: str


def latest_step(run_dir: str) -> int:
    c = ck.latest_checkpoint(run_dir, verify=False)
    return c.step if c else 0


def in_flight(run: RunDir, executor: Executor) -> tuple[str | None, int]:
    """The job id an earlier flow run left in flight on this executor (job.json), if any, and the number of
    submissions made so far. A job.json that is not a job record is not reattached to (and said); the count
    then comes from submissions.jsonl."""
    if not store.exists(run.job):
        return None, 0
    try:
        rec = store.read_json(run.job)
        number = rec.get("submission", rec.get("attempt", 0))  # "attempt": earlier versions
        job_id = rec["job_id"]
        if (
            isinstance(number, bool)
            or not isinstance(number, int)
            or not isinstance(job_id, (str, int))
        ):
            raise TypeError(f"submission {number!r}, job_id {job_id!r}")
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        log.warning("%s is not a job record (%s): nothing to reattach to", run.job, err)
        ended = (
            store.read_bytes(run.submissions).count(b"\n") if store.exists(run.submissions) else 0
        )
        return None, ended
    if rec.get("executor") != executor.describe()["executor"] or rec.get("ended"):
        return None, number
    return str(job_id), number


def read_submissions(run: RunDir) -> list[dict[str, Any]]:
    """Every ended submission (submissions.jsonl), oldest first; a line torn by a killed writer is left out."""
    return store.read_jsonl(run.submissions)


def record_start(run: RunDir, executor: Executor, number: int, sub: Submitted) -> None:
    store.write_json(run.job, {"job_id": sub.job_id, "submission": number, **executor.describe()})


@dataclass(frozen=True)
class SubmissionEnd:
    """A line of submissions.jsonl: how one submission ended and what the flow did next (`next`: done,
    resubmit, rollback, stop; `message`: why). The optional fields are left out of the line when empty."""

    submission: int
    job_id: str
    state: str
    reason: str
    start_step: int
    end_step: int
    next: str
    message: str = ""
    cordoned: list[str] = field(default_factory=list)  # hosts this submission's failure cordoned
    nodes: int | None = None  # when it ran on fewer nodes than asked for (allow_shrink)
    diverged: Divergence | None = None  # the guard's verdict of a diverged one
    skipped: list[tuple[int, str]] = field(default_factory=list)  # steps whose updates were skipped
    time: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if v not in ("", [], None)}
        if self.diverged is not None:
            out["diverged"] = self.diverged.to_json()
        if self.skipped:
            out["skipped"] = [list(s) for s in self.skipped]
        return out


def record_end(run: RunDir, executor: Executor, outcome: Outcome, end: SubmissionEnd) -> None:
    """job.json says the submission ended; submissions.jsonl keeps it."""
    store.write_json(
        run.job,
        {
            "job_id": end.job_id,
            "submission": end.submission,
            "ended": outcome.state,
            **executor.describe(),
        },
    )
    store.append_text(run.submissions, json.dumps(end.to_json()) + "\n")


def divergence(run: RunDir) -> Divergence | None:
    """The guard's verdict of the diverged submission, from training's result.json (None when it is not
    there or not a verdict: the flow then rolls back to the last checkpoint without skipping data)."""
    try:
        verdict = store.read_json(run.result).get("diverged")
        return Divergence.from_json(verdict) if verdict is not None else None
    except (FileNotFoundError, ValueError, AttributeError):
        return None


def rollbacks(run: RunDir) -> list[dict[str, Any]]:
    if not store.exists(run.rollbacks):
        return []
    text = store.read_bytes(run.rollbacks).decode()
    return [json.loads(ln) for ln in text.splitlines() if ln.strip()]


def roll_back(run: RunDir, diverged: Divergence | None, number: int) -> dict[str, Any]:
    """Set aside the checkpoints written since the trouble began (into rolled-back/, never deleted) and record
    the data batches the next submissions pass over."""
    first_bad = diverged.steps[0] if diverged else latest_step(run.url)
    before = [c.step for c in ck.valid_checkpoints(run.url) if c.step <= first_bad]
    resume = max(before, default=0)
    aside = [s for s in ck.list_steps(run.url) if s > resume]
    for s in aside:
        store.move(run.checkpoint(s), store.join(run.rolled_back(number), f"step_{s:06d}"))
    rec = {
        "rollback": number,
        "time": time.time(),
        "diverged_steps": list(diverged.steps) if diverged else None,
        "skip": str(diverged.batches) if diverged else None,
        "reasons": list(diverged.reasons) if diverged else [],
        "resume_step": resume,
        "set_aside": aside,
    }
    store.append_text(run.rollbacks, json.dumps(rec) + "\n")
    return rec


def with_skips(
    overrides: list[str], cfg: RunConfig, rollback_records: list[dict[str, Any]]
) -> list[str]:
    """The submission's overrides, with the data batches every rollback so far passes over."""
    skips = [r["skip"] for r in rollback_records if r.get("skip")]
    if not skips:
        return overrides
    ranges = sorted(set(cfg.data.skip_batches) | set(skips))
    return [*overrides, f"data.skip_batches={json.dumps(ranges)}"]
