"""The sweep's summary file, `{sweep}/summary.json`: every trial's parameters, state and results, and the
winner. The sweep flow writes it after every change; the sweep's tracker mirror (tracking/sweep_mirror.py)
reads it and shows it as the parent run of the trials. A typed record, so that what one side writes is what
the other reads, checked when read."""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from common import store
from common.layout import SweepDir


class TrialSummary(BaseModel):
    model_config = ConfigDict(extra="forbid")

    trial: int = Field(ge=0)
    run: str  # its run directory's name, {sweep}-tNNN
    params: dict[str, Any]  # the searched dimensions, as the study holds them
    state: str  # running, completed, pruned, failed, "pruned, promoted: completed", ...
    best_val_loss: float | None = None
    final_val_loss: float | None = None
    evals: dict[str, float] = Field(default_factory=dict)  # the best checkpoint's evaluation
    step: int = 0  # steps trained
    tokens: int = 0
    device_hours: float = 0.0
    submissions: int = (
        0  # jobs its run took: more than one when the cluster failed it and it was resubmitted
    )
    interruptions: list[str] = Field(
        default_factory=list
    )  # each failure its flow resubmitted or rolled back

    def finished(self) -> bool:
        return self.state != "running"


class SweepSummary(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sweep: str
    url: str  # the sweep's folder
    settings: dict[str, Any]  # how it searches: the space, the pruner and their settings
    trials: list[TrialSummary] = Field(default_factory=list)
    winner: int | None = None  # the trial with the lowest final val loss among the completed ones
    finished: bool = False  # the sweep flow run ended (a later flow run of the sweep may go on)
    updated: float = Field(default_factory=time.time)

    def trial(self, number: int) -> TrialSummary | None:
        return next((t for t in self.trials if t.trial == number), None)

    def content_hash(self) -> str:
        """What changed for a reader (everything but the time it was written)."""
        doc = self.model_dump(exclude={"updated"})
        return hashlib.sha1(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def write_summary(summary: SweepSummary) -> None:
    store.write_json(SweepDir(summary.url).summary, summary.model_dump(mode="json"))


def read_summary(folder: SweepDir) -> SweepSummary | None:
    """The sweep's summary, or None before the sweep wrote one (ValueError: a file that is not one)."""
    try:
        doc = store.read_json(folder.summary)
    except FileNotFoundError:
        return None
    return SweepSummary.model_validate(doc)
