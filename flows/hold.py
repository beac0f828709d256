"""A request that a run stop where it is, with a checkpoint, and stay stopped: `{run}/hold.json`.

A sweep writes one to prune a trial that is clearly behind; the run's supervisor (flows/supervisor.py) reads it
while it watches, stops the submission the way a preemption does (a checkpoint, then exit), records the
submission's end as `held` and ends the flow run without resubmitting. Nothing is lost: a later pretrain flow
run on the same run directory clears the request and resumes from that checkpoint (a promoted trial).
"""

from __future__ import annotations

import time

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from common import store
from common.layout import RunDir


class HoldRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    by: str = Field(max_length=200, description="who asked (a sweep, a person)")
    reason: str = Field(max_length=500)
    time: float = Field(default_factory=time.time)


def request_hold(run: RunDir, by: str, reason: str) -> HoldRequest:
    req = HoldRequest(by=by[:200], reason=reason[:500])
    store.write_json(run.hold, req.model_dump())
    return req


def hold_requested(run: RunDir) -> HoldRequest | None:
    """The request on the run, if any. One that cannot be read as a request still holds the run (whoever wrote
    it meant to stop it), with a reason that says so."""
    try:
        if not store.exists(run.hold):
            return None
        return HoldRequest.model_validate(store.read_json(run.hold))
    except (ValidationError, ValueError) as err:
        return HoldRequest(
            by="?", reason=f"{run.hold} is not a hold request ({type(err).__name__})"
        )


def clear_hold(run: RunDir) -> bool:
    """Remove the request (a new flow run on the run directory goes on); whether there was one."""
    if not store.exists(run.hold):
        return False
    store.remove_tree(run.hold)
    return True
