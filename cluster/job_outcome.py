"""How a Slurm training job ended, as an Outcome (cluster/resubmission.py), with the hosts a failure points at:
read the same way by the flow's Slurm executor and by `cluster.submit --wait`.
"""

from __future__ import annotations

import subprocess
from typing import Any

from cluster import failure
from cluster.cordon import usable_nodes
from cluster.launch import RunFailed
from cluster.resubmission import Outcome
from cluster.submit import RunHandle


def ended(handle: RunHandle, state: str) -> Outcome:
    """The outcome of a job in the final Slurm `state`: its result, or what its nodes recorded of a failure."""
    if state.startswith("CANCELLED"):
        return cancelled(handle, state)
    try:
        return from_result(handle.job_id, handle.result())
    except RunFailed as err:
        return failed(handle, state, err)


def cancelled(handle: RunHandle, state: str) -> Outcome:
    # Someone ran scancel: a decision, not a failure to retry (preemptions end as PREEMPTED/requeued).
    return Outcome("cancelled", f"job {handle.job_id} was cancelled ({state})")


def from_result(job_id: str, result: dict[str, Any]) -> Outcome:
    """The outcome of a job that returned training's result."""
    if result.get("diverged"):
        return Outcome("diverged", f"job {job_id} diverged at step {result.get('final_step')}")
    if result.get("complete", True):
        return Outcome("completed", f"job {job_id} completed at step {result.get('final_step')}")
    # stop_after_steps: the job ended cleanly with a checkpoint before max_steps.
    return Outcome("requeue", f"job {job_id} stopped at step {result.get('final_step')}")


def failed(handle: RunHandle, state: str, err: RunFailed) -> Outcome:
    """A failed job: what its nodes recorded of the failure (cluster/failure.py) says which host to
    blame; a node failure blames the job's node (of a one-node job)."""
    found = failure.culprit(failure.read_job(str(handle.exits), handle.job_id))
    lines = [ln for ln in str(err).splitlines() if ln.strip()]
    # without a record (a node killed outright): the first node's own error
    detail = found.line() if found else next((ln for ln in lines[1:] if ln.startswith("node ")), "")
    if state.startswith("NODE_FAIL"):
        hosts = failed_node(handle.job_id)
    else:
        hosts = (found.host,) if found is not None and found.blames_host else ()
    return Outcome("failed", " | ".join(x for x in (lines[0], detail) if x)[:500], hosts)


def hostnames(nodelist: str) -> list[str]:
    """A Slurm host list (`n[1-3],gpu7`) as host names."""
    if not nodelist or nodelist in ("None", "(null)", "None assigned"):
        return []
    if not any(c in nodelist for c in "[,"):
        return [nodelist]
    out = subprocess.run(
        ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=60
    )
    return out.stdout.split()


def down(hosts: list[str]) -> list[str]:
    """Those of `hosts` that sinfo does not list as usable now (down, drained, not responding)."""
    up = usable_nodes(None, set())
    return [] if up is None else [h for h in hosts if h not in up]


def failed_node(job_id: str) -> tuple[str, ...]:
    """The node of a one-node job (accounting's NodeList): the host a NODE_FAIL points at."""
    out = subprocess.run(
        ["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "NodeList"],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout.splitlines()
    hosts = hostnames(out[-1].strip()) if out else []
    return tuple(hosts) if len(hosts) == 1 else ()
