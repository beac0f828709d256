"""How each rank of a training job ended, and what that makes of the job: one record per rank and one reading
of them, shared by every executor (the Slurm launcher on each node, the local executor of the flow).

torchrun exits 1 whenever a rank exits non-zero, whatever the rank's code was: a rank that stopped with a
checkpoint (75) or diverged (3) is indistinguishable from a crash at torchrun's level. So each rank's wrapper
(cluster/worker.py) writes

    $CLUSTER_EXIT_DIR/rank_NNNNN.json   {"rank", "exit_code", "error", "time", "host"}

and `job_end` decides from those records alone. Standard library only: the worker writes its record from a
process that may not have imported torch yet.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from cluster.failure import Cause, Failure
from common.errors import last_line
from common.exit_codes import DIVERGED, OK, REQUEUE

EXIT_DIR_ENV = "CLUSTER_EXIT_DIR"

Ending = Literal["completed", "stopped", "diverged", "failed"]


@dataclass(frozen=True)
class RankExit:
    rank: int
    exit_code: int
    error: str  # the tail of the rank's stderr (or its traceback) when it failed; "" otherwise
    time: float
    host: str
    cause: Cause | None = None  # of a failure: device_error or rank_error (cluster/failure.py)

    @classmethod
    def parse(cls, obj: Any) -> RankExit:
        """The record from its JSON object; ValueError naming the field when it is not one."""
        if not isinstance(obj, dict):
            raise ValueError(f"a rank exit record is a JSON object, not {type(obj).__name__}")
        types: dict[str, type | tuple[type, ...]] = {
            "rank": int,
            "exit_code": int,
            "error": str,
            "time": (int, float),
            "host": str,
        }
        for name, kind in types.items():
            value = obj.get(name)
            if isinstance(value, bool) or not isinstance(value, kind):
                raise ValueError(f"field {name!r} of a rank exit record is {value!r}")
        cause = obj.get("cause")
        if cause not in (None, "device_error", "rank_error"):
            raise ValueError(f"field 'cause' of a rank exit record is {cause!r}")
        return cls(
            obj["rank"], obj["exit_code"], obj["error"], float(obj["time"]), obj["host"], cause
        )

    @property
    def failed(self) -> bool:
        return self.exit_code not in (OK, REQUEUE)

    def first_line(self) -> str:
        return f"rank {self.rank} on {self.host} failed first (exit {self.exit_code})"

    def failure(self) -> Failure:
        return Failure(
            self.cause or "rank_error",
            self.host,
            last_line(self.error) or "no error text",
            self.rank,
            self.exit_code,
        )


def write(exit_dir: str, rec: RankExit) -> None:
    """The record, complete or not at all (a reader never sees half of it)."""
    os.makedirs(exit_dir, exist_ok=True)
    path = os.path.join(exit_dir, f"rank_{rec.rank:05d}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(asdict(rec), f)
    os.replace(path + ".tmp", path)


def read(exit_dir: str) -> list[RankExit]:
    """The records in `exit_dir`, by rank. A record that cannot be read or is not one is left out: its rank
    counts as one that did not report."""
    out = []
    for p in sorted(Path(exit_dir).glob("rank_*.json")):
        try:
            out.append(RankExit.parse(json.loads(p.read_text())))
        except (OSError, ValueError):
            continue
    return out


@dataclass(frozen=True)
class JobEnd:
    """What the ranks' records make of a job (or of one node's share of it)."""

    state: Ending
    first_failure: RankExit | None = None  # the earliest rank that reported a failure
    silent: tuple[int, ...] = ()  # ranks that left no record (killed by a signal, out of memory)

    def reason(self, launcher_code: int) -> str:
        """One line saying how the job ended."""
        if self.state != "failed":
            return {
                "completed": "completed",
                "stopped": f"stopped with a checkpoint (exit {REQUEUE})",
                "diverged": f"diverged (exit {DIVERGED})",
            }[self.state]
        parts = []
        if self.silent:  # usually the cause: the others fail after it, of its absence
            ranks = ", ".join(str(r) for r in self.silent)
            parts.append(
                f"rank{'s' if len(self.silent) > 1 else ''} {ranks} ended without a record (killed: a "
                "signal, out of memory?)"
            )
        if self.first_failure is not None:
            parts.append(
                f"{self.first_failure.first_line()}: {last_line(self.first_failure.error) or 'no error text'}"
            )
        return "; ".join(parts) or f"exited {launcher_code} with no rank reporting an error"


def job_end(records: list[RankExit], ranks: range, launcher_code: int) -> JobEnd:
    """How a job whose ranks `ranks` wrote `records`, and whose launcher (torchrun, or the single rank)
    exited `launcher_code`, ended:
    - completed: the launcher exited 0 and no rank says otherwise;
    - stopped: every rank reported, each 0 or 75, at least one 75 (a checkpoint was written: resume);
    - diverged: every rank reported 3 (each rank's guard sees the same losses, so all stop together);
    - failed: anything else, naming the ranks that left no record and the rank that failed first."""
    mine = [r for r in records if r.rank in ranks]
    codes = {r.exit_code for r in mine}
    silent = tuple(sorted(set(ranks) - {r.rank for r in mine}))
    if launcher_code == OK and codes <= {OK}:
        return JobEnd("completed")
    if not silent and codes <= {OK, REQUEUE}:
        return JobEnd("stopped")
    if not silent and codes == {DIVERGED}:
        return JobEnd("diverged")
    failed = sorted((r for r in mine if r.failed), key=lambda r: r.time)
    return JobEnd("failed", failed[0] if failed else None, silent)
