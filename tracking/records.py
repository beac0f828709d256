"""What a tracker shows of a run, read from its run directory, which stays the single source of truth: the
metrics of every step, each checkpoint's evaluations, the samples, the events of its submissions (requeues,
resubmissions, hangs, skipped updates, rollbacks, cordons) and the resolved config."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any

from common import store
from common.layout import RunDir, eval_result
from training.checkpoint import list_steps
from training.metrics import parse_metrics

# the files whose lines are events, and the field that names the step each line is about
EVENT_FILES = {
    "attempts": "end_step",
    "submissions": "end_step",
    "events": "step",
    "rollbacks": "resume_step",
    "cordon": "step",
    "stragglers": "step",
}


@dataclass
class RunRecords:
    steps: list[dict[str, Any]] = field(
        default_factory=list
    )  # metrics.jsonl, one row per step, in step order
    evaluations: dict[tuple[int, str], dict[str, float]] = field(
        default_factory=dict
    )  # (step, family) -> values
    samples: list[dict[str, Any]] = field(default_factory=list)  # {"step", "samples": [...]}
    events: list[dict[str, Any]] = field(
        default_factory=list
    )  # {"time", "source", "event", "step", "detail"}
    config: dict[str, Any] = field(default_factory=dict)
    rollbacks: list[dict[str, Any]] = field(default_factory=list)

    @property
    def config_hash(self) -> str:
        return hashlib.sha1(json.dumps(self.config, sort_keys=True).encode()).hexdigest()[:12]

    def max_steps(self) -> int | None:
        return (self.config.get("train") or {}).get("max_steps")


def step_values(row: dict[str, Any]) -> dict[str, float]:
    """A metrics line's numbers (NaN and inf included: a diverging step is shown as it was), without its step."""
    return {
        k: float(v)
        for k, v in row.items()
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def evaluation_values(family: str, result: dict[str, Any]) -> dict[str, float]:
    """One checkpoint's evaluation file as tracker metrics: eval/hellaswag_acc_norm, eval/{task}_acc, ..."""
    out: dict[str, float] = {}
    if family == "hellaswag":
        for k in ("acc", "acc_norm"):
            if isinstance(result.get(k), (int, float)):
                out[f"eval/hellaswag_{k}"] = float(result[k])
    else:
        for task, metrics in (result.get("tasks") or {}).items():
            for k in ("acc", "acc_norm"):
                v = metrics.get(k)
                if isinstance(v, (int, float)) and math.isfinite(v):
                    out[f"eval/{task}_{k}"] = float(v)
    return out


def read_records(
    run_url: str, skip_evaluations: AbstractSet[tuple[int, str]] = frozenset()
) -> RunRecords:
    """Everything a tracker shows, as the run directory holds it now. Checkpoints a rollback set aside are not
    in checkpoints/ any more, so neither are their evaluations. `skip_evaluations`: (step, family) pairs already
    read, not fetched again (one small file per checkpoint adds up on object storage)."""
    run = RunDir(run_url)
    by_step: dict[int, dict[str, Any]] = {}
    try:
        lines = store.read_bytes(run.metrics).decode(errors="replace").splitlines()
    except FileNotFoundError:
        lines = []
    for row in parse_metrics(lines):
        by_step[int(row["step"])] = row  # the last line of a step is its latest value
    rec = RunRecords(steps=[by_step[s] for s in sorted(by_step)])
    try:
        rec.config = store.read_json(run.config)
    except (FileNotFoundError, ValueError):
        rec.config = {}
    rec.samples = [r for r in store.read_jsonl(run.samples) if "step" in r]
    rec.rollbacks = store.read_jsonl(run.rollbacks)
    rec.events = _events(run)
    rec.evaluations = _evaluations(run, rec.rollbacks, skip_evaluations)
    return rec


def _events(run: RunDir) -> list[dict[str, Any]]:
    """Every line of the run's event files (EVENT_FILES), in time order, as the trackers show them."""
    events = []
    for source, step_field in EVENT_FILES.items():
        for r in store.read_jsonl(getattr(run, source)):
            fallback = {"rollbacks": "rollback", "cordon": "cordon"}.get(source, source)
            events.append(
                {
                    "time": r.get("time"),
                    "source": source,
                    "event": str(r.get("event") or r.get("state") or fallback),
                    "step": r.get(step_field, r.get("step")),
                    "detail": json.dumps(r, sort_keys=True, default=str)[:2000],
                }
            )
    return sorted(events, key=lambda e: (e["time"] or 0, e["source"]))


def _evaluations(
    run: RunDir, rollbacks: list[dict[str, Any]], skip: AbstractSet[tuple[int, str]]
) -> dict[tuple[int, str], dict[str, float]]:
    """Every checkpoint's evaluation values by (step, family): the flow's evaluations.jsonl (it outlives pruned
    checkpoints; a rollback's set-aside steps are dropped from it), then the results kept in the checkpoints of
    a run evaluated without the flow (python -m evaluation.evaluate)."""
    out: dict[tuple[int, str], dict[str, float]] = {}
    undone = [(float(r.get("time", 0)), int(r.get("resume_step", 0))) for r in rollbacks]
    for row in store.read_jsonl(run.evaluations):
        step = row.get("step")
        if not isinstance(step, int) or any(
            row.get("time", 0) < t and step > resume for t, resume in undone
        ):
            continue
        for family in ("hellaswag", "lm_eval"):
            if isinstance(row.get(family), dict) and (step, family) not in skip:
                values = evaluation_values(family, row[family])
                if values:
                    out[(step, family)] = values
    for step in list_steps(run.url):
        for family in ("hellaswag", "lm_eval"):
            if (step, family) in skip or (step, family) in out:
                continue
            try:
                values = evaluation_values(
                    family, store.read_json(eval_result(run.checkpoint(step), family))
                )
            except (FileNotFoundError, ValueError):
                continue
            if values:
                out[(step, family)] = values
    return out
