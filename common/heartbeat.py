"""Heartbeats: each rank of a training job says, every few seconds, that it is alive and how far it got, so that
a job that stops making progress while it still looks RUNNING is noticed from outside it.

    {run}/heartbeats/rank-00000.json   {"rank", "world", "host", "pid", "pgid", "ppid", "slurm_job", "process",
                                        "beat", "step", "phase", "step_s", "busy_s", "time"}

Training writes them (`HeartbeatWriter`, a thread per rank: a rank frozen by SIGSTOP, a wedged GPU or a dead
host stops beating; a rank blocked in a collective beats on, but its step stands still). The flow and
`cluster.submit --wait` read them (`HangDetector`). The reader never compares clocks across hosts: it notes by
its own clock when each file last *changed*, and when the step last moved.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from common import store
from common.layout import RunDir


def host_name() -> str:
    """The node's name as Slurm knows it (what a job's --exclude takes), else the machine's."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


class HeartbeatWriter:
    """Rewrites this rank's heartbeat file every `interval_s` from a daemon thread (0 disables it). The training
    loop only sets fields (`phase`, `progress`): no store I/O on the step path."""

    def __init__(self, run: RunDir, rank: int, world: int, interval_s: float):
        self.url = run.heartbeat(rank)
        self.interval_s = interval_s
        # pgid, ppid and slurm_job say which submission wrote it (a local process group or torchrun, a Slurm job)
        self.record: dict[str, Any] = {
            "rank": rank,
            "world": world,
            "host": host_name(),
            "pid": os.getpid(),
            "pgid": os.getpgid(0),
            "ppid": os.getppid(),
            "slurm_job": os.environ.get("SLURM_JOB_ID"),
            "process": uuid.uuid4().hex[:12],
            "beat": 0,
            "step": None,
            "phase": "starting",
            "step_s": None,
            "busy_s": None,
        }
        self._step_times: list[float] = []
        self._busy_times: list[float] = []
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="heartbeat", daemon=True)

    def start(self) -> HeartbeatWriter:
        if self.interval_s > 0:
            self._thread.start()
        return self

    def phase(self, name: str) -> None:
        """What the rank is doing now: starting, step, validate, checkpoint, sample."""
        self.record["phase"] = name

    def progress(self, step: int, step_s: float, busy_s: float | None = None) -> None:
        """`step` steps are done, the last in `step_s` seconds, `busy_s` of them this rank's own work
        (training/telemetry.py: under DDP every rank's step lasts as long as the slowest rank's)."""
        first = self.record["step"] is None
        self._step_times = (self._step_times + [step_s])[-50:]
        if busy_s is not None:
            self._busy_times = (self._busy_times + [busy_s])[-50:]
        self.record.update(
            step=step,
            phase="step",
            step_s=statistics.median(self._step_times),
            busy_s=statistics.median(self._busy_times) if self._busy_times else None,
        )
        if (
            first
        ):  # said at once: until then the reader allows for start-up (compilation), not for a step
            self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def _loop(self) -> None:
        while True:
            self.record["beat"] += 1
            try:
                store.write_json(self.url, {**self.record, "time": time.time()})
            except (
                Exception
            ):  # a store hiccup must not stop training: the reader sees a stale beat at worst
                pass
            self._wake.wait(self.interval_s)
            self._wake.clear()
            if self._stop.is_set():
                return


def read_heartbeats(run: RunDir, strict: bool = False) -> dict[int, dict[str, Any]]:
    """Every rank's last heartbeat, by rank; unreadable files (torn by a killed write) are left out. A store that
    does not answer reads as no heartbeats, or with `strict` raises its OSError (none yet is never an error)."""
    out: dict[int, dict[str, Any]] = {}
    try:
        names = store.listdir(run.heartbeats)
    except FileNotFoundError:
        return out
    except OSError:
        if strict:
            raise
        return out
    for name in names:
        if not (name.startswith("rank-") and name.endswith(".json")):
            continue
        try:
            rank = int(name[len("rank-") : -len(".json")])
            rec = json.loads(store.read_bytes(store.join(run.heartbeats, name)))
        except (OSError, ValueError):
            continue
        # a record that names another rank than its file's is no one's heartbeat: it would hide the rank it names
        if is_heartbeat(rec) and rec["rank"] == rank:
            out[rank] = rec
    return out


# the fields readers compute with, and their kinds (a record with any of them of another kind is no heartbeat)
_FIELDS: dict[str, tuple[type, ...]] = {
    "rank": (int,),
    "world": (int,),
    "step": (int, type(None)),
    "step_s": (int, float, type(None)),
    "pid": (int,),
    "ppid": (int,),
    "time": (int, float),
}


def is_heartbeat(rec: Any) -> bool:
    """A heartbeat record: a JSON object with an integer rank and the fields readers use of the right kinds."""
    if not isinstance(rec, dict) or "rank" not in rec:
        return False
    return all(
        not isinstance(rec[k], bool) and isinstance(rec[k], kinds)
        for k, kinds in _FIELDS.items()
        if k in rec
    )


def laggards(
    beats: dict[int, dict[str, Any]],
    world: int,
    step: int | None,
    stale_s: float,
    now: float | None = None,
) -> list[str]:
    """Seen from a rank stuck in a collective after `step` steps: the ranks that had not got as far, or whose
    heartbeat is older than `stale_s` (by this host's clock against theirs: a diagnosis, not a decision),
    as `host:rank (step N, last beat S s ago)`."""
    now = time.time() if now is None else now
    out = []
    for rank in range(world):
        rec = beats.get(rank)
        if rec is None:
            out.append(f"?:{rank} (no heartbeat)")
            continue
        age = now - float(rec.get("time", now))
        behind = step is not None and (rec.get("step") is None or rec["step"] < step)
        if behind or age > stale_s:
            out.append(
                f"{rec.get('host', '?')}:{rank} (step {rec.get('step')}, {rec.get('phase', '?')}, "
                f"last beat {age:.0f} s ago)"
            )
    return out


def slowest_rank(beats: dict[int, dict[str, Any]]) -> str:
    """The end of a progress line naming the rank with the most busy time per step (its own work, without waiting
    on peers: training/telemetry.py) against the median rank's (the lower middle one of an even count), from the
    heartbeats that carry busy times; empty with fewer than two of them."""
    busy = {r: float(rec["busy_s"]) for r, rec in beats.items() if rec.get("busy_s") is not None}
    if len(busy) < 2:
        return ""
    rank = max(busy, key=lambda r: busy[r])
    return (
        f"; slowest rank: {beats[rank].get('host', '?')}:{rank} (busy {busy[rank]:.2f} s/step, median rank "
        f"{statistics.median_low(busy.values()):.2f} s)"
    )


@dataclass(frozen=True)
class HangRules:
    """When a job is hung: no new step for max(factor x its median step time, floor_s) seconds, or no first
    step within startup_s of the job starting. A rank whose heartbeat has not changed for silent_s is silent."""

    factor: float = 20.0
    floor_s: float = 300.0
    startup_s: float = 1800.0
    silent_s: float = 60.0

    def window(self, step_s: float | None) -> float:
        return max(self.factor * (step_s or 0.0), self.floor_s)


@dataclass(frozen=True)
class Hang:
    step: int | None
    silent: list[str]
    message: str


# A read of the heartbeats slower than this is a store that did not answer for that long, not a quiet job
SLOW_READ_S = 10.0


@dataclass
class HangDetector:
    """Watches one submission's heartbeats. `check()` on every poll: None while the job progresses, or the Hang.
    `owns(heartbeat)` says which heartbeats the submission wrote; without it, those present at the start count
    only once they change (a new process rewrote them).

    Time the store does not answer (a read that fails or takes longer than SLOW_READ_S) is not counted against
    the job: an outage of the store stalls the ranks' writes too, and replacing the job would not bring the
    store back. The detector says so in `notes` (taken by `take_notes()`), when it starts and when it ends."""

    run: RunDir
    rules: HangRules
    owns: Callable[[dict[str, Any]], bool] | None = None
    clock: Callable[[], float] = time.monotonic
    _seen: dict[int, tuple[str, float]] = field(
        default_factory=dict
    )  # rank -> (content, when it last changed)
    _old: dict[int, str] = field(default_factory=dict)
    _started: float | None = None
    _max_step: int | None = None
    _moved: float | None = None
    _current: dict[int, dict[str, Any]] = field(
        default_factory=dict
    )  # the last check's heartbeats, by rank
    _blind_since: float | None = None  # when a read of the heartbeats first failed, while they fail
    notes: list[str] = field(default_factory=list)

    def take_notes(self) -> list[str]:
        out, self.notes = self.notes, []
        return out

    def __post_init__(self) -> None:
        if self.owns is None:
            self._history()

    def _history(self) -> None:
        self._old = {
            r: json.dumps(rec, sort_keys=True) for r, rec in read_heartbeats(self.run).items()
        }

    def started(self) -> None:
        """The job is running (not queued): the start-up clock starts now (idempotent)."""
        if self._started is None:
            self._started = self.clock()

    def paused(self) -> None:
        """The job is not running (queued again after a requeue): no clock runs, and what its ranks wrote so
        far is history, so that its restart gets the start-up allowance again."""
        if self._started is not None:
            self._history()
            self._seen.clear()
            self._started = self._max_step = self._moved = None

    def _read(self) -> dict[int, dict[str, Any]] | None:
        """The heartbeats, or None while the store does not answer; time without an answer is taken off every
        clock, so that it never counts as a quiet job."""
        start = self.clock()
        try:
            beats = read_heartbeats(self.run, strict=True)
        except OSError as err:
            if self._blind_since is None:
                self._blind_since = start
                first = (str(err).strip().splitlines() or [type(err).__name__])[0]
                self.notes.append(
                    f"the store did not answer ({first}): the heartbeats of {self.run.url} are unreadable; "
                    "the hang window waits for it"
                )
            return None
        end = self.clock()
        blind_from = self._blind_since
        if blind_from is None and end - start > SLOW_READ_S:
            blind_from = start
        if blind_from is not None:
            self._blind_since = None
            gap = end - blind_from
            self._shift(gap, end)
            self.notes.append(
                f"the store answered again after {gap:.0f} s: that time is not counted against the job"
            )
        return beats

    def _shift(self, gap: float, now: float) -> None:
        if self._started is not None:
            self._started = min(self._started + gap, now)
        if self._moved is not None:
            self._moved = min(self._moved + gap, now)
        self._seen = {r: (text, min(t + gap, now)) for r, (text, t) in self._seen.items()}

    def check(self) -> Hang | None:
        beats = self._read()
        if beats is None:
            return None
        now = self.clock()
        current = {}
        for rank, rec in beats.items():
            if self.owns is not None and not self.owns(rec):
                continue  # another submission's
            text = json.dumps(rec, sort_keys=True)
            if self._old.get(rank) == text:
                continue  # an earlier submission's last word
            self._old.pop(rank, None)
            if self._seen.get(rank, ("", 0.0))[0] != text:
                self._seen[rank] = (text, now)
            current[rank] = rec
        self._current = current
        if current:
            self.started()
        if self._started is None:
            return None
        steps = [rec["step"] for rec in current.values() if rec.get("step") is not None]
        if steps:
            top = max(steps)
            if self._max_step is None or top > self._max_step:
                self._max_step, self._moved = top, now
        silent = self._silent(current, now)
        if self._max_step is None:  # no step done yet in this job: rendezvous, loading, compiling
            if now - self._started > self.rules.startup_s:
                return self._hang(
                    None,
                    silent,
                    f"no first step within {self.rules.startup_s:.0f} s of the job starting",
                    current,
                )
            return None
        step_s = max((rec.get("step_s") or 0.0) for rec in current.values()) if current else None
        window = self.rules.window(step_s)
        quiet = now - (self._moved or now)
        if quiet > window:
            return self._hang(
                self._max_step,
                silent,
                f"no new step for {quiet:.0f} s (window {window:.0f} s: max("
                f"{self.rules.factor:g} x {step_s or 0:.2f} s, {self.rules.floor_s:.0f} s))",
                current,
            )
        return None

    def progress(self) -> str | None:
        """The last check's heartbeats in one line: how far the job got, how fast, its rank furthest behind (ages
        by this reader's clock: when each heartbeat last changed) and its slowest rank."""
        current, now = self._current, self.clock()
        if not current:
            return None
        world = max(int(rec.get("world", 1)) for rec in current.values())
        steps = {r: rec.get("step") or 0 for r, rec in current.items()}
        top = max(steps.values())
        last = min(steps, key=lambda r: (steps[r], -(now - self._seen[r][1])))
        step_s = max((rec.get("step_s") or 0.0) for rec in current.values())
        rec = current[last]
        age = now - self._seen[last][1]
        behind = (
            f"rank furthest behind: {rec.get('host', '?')}:{last} at step {steps[last]}, last beat "
            f"{age:.0f} s ago"
            if steps[last] < top
            else f"all at that step, the oldest beat {age:.0f} s ago"
        )
        return (
            f"step {top} ({'/'.join(sorted({r.get('phase', '?') for r in current.values()}))}), "
            f"{step_s:.2f} s/step, {len(current)}/{world} ranks beating; {behind}{slowest_rank(current)}"
        )

    def _silent(self, current: dict[int, dict[str, Any]], now: float) -> list[str]:
        world = max((int(rec.get("world", 1)) for rec in current.values()), default=0)
        out = []
        for rank in range(world):
            rec = current.get(rank)
            if rec is None:
                out.append(f"?:{rank} (never beat)")
            elif now - self._seen[rank][1] > self.rules.silent_s:
                out.append(f"{rec.get('host', '?')}:{rank}")
        return out

    def _hang(
        self, step: int | None, silent: list[str], why: str, current: dict[int, dict[str, Any]]
    ) -> Hang:
        phases = sorted({rec.get("phase", "?") for rec in current.values()}) or ["no heartbeat"]
        where = f"hang at step {step}" if step is not None else "hang before the first step"
        if not current:
            who = "no rank has written a heartbeat"
        elif silent:
            who = f"silent ranks: {' '.join(silent)}"
        else:
            who = "every rank beating (stuck together, e.g. in a collective)"
        return Hang(step, silent, f"{where} ({'/'.join(phases)}), {who}; {why}")
