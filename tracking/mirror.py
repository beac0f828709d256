"""Keep one tracker run in step with one run directory: the run's metrics, evaluations, samples, events and
config, delivered once each, from the last step the tracker holds.

    python -m tracking.mirror --run-dir store/runs/x --tracker mlflow --uri http://mlflow:5000   # catch up once
    python -m tracking.mirror --run-dir s3://bucket/runs/x --tracker wandb --follow              # until Ctrl-C
    python -m tracking.mirror --run-dir store/runs/x --tracker tensorboard   # event files in store/runs/x/tensorboard

The pretrain flow runs this in a process of its own (`tracker` parameter), so a tracker that is down or slow
never slows the flow or the training: the mirror falls behind, says so once, and catches up when the tracker
answers again. Nothing is lost meanwhile, since the run directory holds everything.

Its record, {run}/trackers/{tracker}.json, names the tracker run (the same one across requeues,
resubmissions, reattached and restarted flows) and what was delivered. A rollback redoes steps the tracker
already holds: the mirror then starts the next generation of the tracker run (mlflow_tracker.py and
wandb_tracker.py and tensorboard_tracker.py say how each tracker keeps each step once).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from typing import Any, Protocol

from common import store
from common.cli import entry_point
from common.errors import BadInput
from common.layout import RunDir
from common.lease import Lease, LeaseHeld
from tracking.credentials import redact
from tracking.records import RunRecords, read_records, step_values

log = logging.getLogger("tracking.mirror")

TRACKERS = ("mlflow", "wandb", "tensorboard")
STEPS_PER_SAVE = 2000  # how many steps a long catch-up delivers between two saves of the record


class Tracker(Protocol):
    kind: str
    run_id: str | None

    def open(
        self, run_url: str, run_name: str, generation: int, known: str | None, delivered_step: int
    ) -> str: ...
    def link(self) -> str: ...
    def attach_to_sweep(
        self,
    ) -> bool: ...  # a sweep's trial: its run under the sweep's (False: not yet)
    def delivered_step(self) -> int | None: ...
    def delivered_evaluations(self, keys: set[str]) -> set[tuple[int, str]] | None: ...
    def log_steps(self, rows: list[tuple[int, dict[str, float]]], timestamp_ms: int) -> None: ...
    def log_evaluation(self, step: int, values: dict[str, float], timestamp_ms: int) -> None: ...
    def log_samples(self, new: list[dict[str, Any]], everything: list[dict[str, Any]]) -> None: ...
    def log_events(self, events: list[dict[str, Any]]) -> None: ...
    def log_config(self, config: dict[str, Any], first: bool) -> None: ...
    def retire(self) -> None: ...
    def supersede(self, old_run_id: str) -> None: ...
    def flush(self) -> None: ...  # what was logged is in the tracker, before the record says so
    def finish(self, state: str) -> None: ...
    def close(self) -> None: ...


def make_tracker(
    kind: str,
    uri: str | None,
    project: str,
    entity: str | None = None,
    sweep: str | None = None,
) -> Tracker:
    """The tracker client (of a sweep's trial: `sweep`, the sweep's folder); a missing library or address is
    the user's to fix (BadInput), said in one line."""
    if kind not in TRACKERS:
        raise BadInput(f"unknown tracker {kind!r}: one of {', '.join(TRACKERS)}")
    try:
        if kind == "mlflow":
            uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
            if not uri:
                raise BadInput(
                    "the mlflow tracker needs its address: --uri / tracker_uri or MLFLOW_TRACKING_URI"
                )
            from tracking.mlflow_tracker import MlflowTracker

            return MlflowTracker(uri, project, sweep)
        if kind == "tensorboard":
            from tracking.tensorboard_tracker import TensorBoardTracker

            return TensorBoardTracker(uri)
        from tracking.wandb_tracker import WandbTracker

        return WandbTracker(project, entity, sweep)
    except ImportError as err:
        raise BadInput(
            f"the {kind} tracker needs its library ({err.name}): pip install 'gpt2-repro[trackers]'"
        ) from None


def _fresh() -> dict[str, Any]:
    return {"step": -1, "evals": [], "samples": -1, "events": 0, "config": None, "rollbacks": 0}


class Mirror:
    def __init__(self, run_url: str, tracker: Tracker, run_name: str | None = None):
        self.run, self.tracker = RunDir(run_url), tracker
        self.run_name = run_name or run_url.rstrip("/").rsplit("/", 1)[-1]
        self.record_url = self.run.tracker(tracker.kind)
        try:
            self.record: dict[str, Any] = store.read_json(self.record_url)
        except (FileNotFoundError, ValueError):
            self.record = {
                "tracker": tracker.kind,
                "generation": 1,
                "run_id": None,
                "superseded": [],
                "to_supersede": [],
                "delivered": _fresh(),
                "outages": 0,
            }
        self.opened = False
        self.reconcile = True  # ask the tracker what it holds: at start, and after every failure
        self.latest: RunRecords | None = None

    @property
    def delivered(self) -> dict[str, Any]:
        return self.record["delivered"]

    def behind(self) -> int:
        """Steps of the run directory the tracker does not hold yet (as of the last read)."""
        steps = [int(r["step"]) for r in (self.latest.steps if self.latest else [])]
        return sum(1 for s in steps if s > self.delivered["step"])

    def _save(self) -> None:
        self.tracker.flush()  # the record never claims what the tracker does not hold yet
        self.record["updated"] = time.time()
        store.write_json(self.record_url, self.record)

    def _open(self) -> None:
        gen = self.record["generation"]
        rid = self.tracker.open(
            self.run.url, self.run_name, gen, self.record.get("run_id"), self.delivered["step"]
        )
        link = redact(self.tracker.link())
        if (rid, link) != (self.record.get("run_id"), self.record.get("link")):
            self.record.update(run_id=rid, link=link)
            self._save()
        self.opened = True
        log.info(
            "%s run %s (generation %d) for %s: %s", self.tracker.kind, rid, gen, self.run.url, link
        )

    def _next_generation(self, resume: int) -> None:
        old = self.record["run_id"]
        log.warning(
            "a rollback redoes steps after %d that %s holds already: starting generation %d of the "
            "tracker run, which holds the run's history as it stands (the old run %s is kept, marked "
            "superseded)",
            resume,
            self.tracker.kind,
            self.record["generation"] + 1,
            old,
        )
        self.tracker.retire()
        self.record.update(
            generation=self.record["generation"] + 1,
            run_id=None,
            delivered={**_fresh(), "rollbacks": self.delivered["rollbacks"]},
        )
        self.record["superseded"].append(old)
        self.record["to_supersede"].append(old)
        self._save()
        self.opened = False
        self._open()

    def _reconcile(self, rec: RunRecords) -> None:
        """Trust what the tracker says it holds over the record: an answer lost in an outage may have been
        delivered all the same."""
        held = self.tracker.delivered_step()
        if held is not None and held != self.delivered["step"]:
            log.info(
                "%s holds steps up to %d (the record said %d): going on from there",
                self.tracker.kind,
                held,
                self.delivered["step"],
            )
            self.delivered["step"] = held
        pending = {
            k: v for k, v in rec.evaluations.items() if list(k) not in self.delivered["evals"]
        }
        if pending:
            keys = {key for values in pending.values() for key in values}
            have = self.tracker.delivered_evaluations(keys)
            if have is not None:
                for (step, family), values in pending.items():
                    if all((step, key) in have for key in values):
                        self.delivered["evals"].append([step, family])

    def sync(self) -> RunRecords:
        """One pass: deliver everything the tracker lacks. Raises when the tracker fails (nothing is lost: the
        next pass starts from what the tracker holds)."""
        d = self.delivered
        rec = read_records(self.run.url, skip_evaluations={tuple(e) for e in d["evals"]})
        self.latest = rec
        if not self.opened:
            self._open()
        if self.record.get("attached") != self.record["run_id"] and self.tracker.attach_to_sweep():
            self.record["attached"] = self.record["run_id"]  # under its sweep's run (a trial's)
        if len(rec.rollbacks) > d["rollbacks"]:
            resume = min(int(r.get("resume_step", 0)) for r in rec.rollbacks[d["rollbacks"] :])
            if d["step"] > resume:
                self._next_generation(resume)
                d = self.delivered
                rec = self.latest = read_records(self.run.url)
                self.reconcile = True
            d["rollbacks"] = len(rec.rollbacks)
        for old in list(self.record["to_supersede"]):
            self.tracker.supersede(old)
            self.record["to_supersede"].remove(old)
        if self.reconcile:
            self._reconcile(rec)
            self.reconcile = False
        now_ms = int(time.time() * 1000)
        new = [(int(r["step"]), step_values(r)) for r in rec.steps if int(r["step"]) > d["step"]]
        for i in range(0, len(new), STEPS_PER_SAVE):
            chunk = new[i : i + STEPS_PER_SAVE]
            self.tracker.log_steps(chunk, now_ms)
            d["step"] = chunk[-1][0]
            if len(new) > STEPS_PER_SAVE:
                self._save()
        for (step, family), values in sorted(rec.evaluations.items()):
            if [step, family] not in d["evals"]:
                self.tracker.log_evaluation(step, values, now_ms)
                d["evals"].append([step, family])
        new_samples = [s for s in rec.samples if int(s["step"]) > d["samples"]]
        if new_samples:
            self.tracker.log_samples(new_samples, rec.samples)
            d["samples"] = int(new_samples[-1]["step"])
        if rec.events and len(rec.events) != d["events"]:
            self.tracker.log_events(rec.events)
            d["events"] = len(rec.events)
        if rec.config and rec.config_hash != d["config"]:
            self.tracker.log_config(rec.config, first=d["config"] is None)
            d["config"] = rec.config_hash
        self._save()
        return rec

    def complete(self) -> bool:
        rec = self.latest
        max_steps = rec.max_steps() if rec else None
        if not max_steps:
            return False
        from training import checkpoint as ck  # torch: only at the end

        latest = ck.latest_checkpoint(self.run.url, verify=False)
        return bool(latest and latest.step >= max_steps)

    def finish(self, state: str | None = None) -> str:
        state = state or ("completed" if self.complete() else "stopped")
        self.tracker.finish(state)
        self.record["finished"] = state
        self._save()
        return state

    # ------------------------------------------------------------------ following a live run

    def follow(self, stop: threading.Event, interval_s: float, max_backoff_s: float = 60.0) -> None:
        """Sync every `interval_s` until `stop` is set. A failing tracker is said once, then retried with
        backoff, from what it holds, until it answers."""
        failing, wait = False, interval_s
        while True:
            try:
                self.sync()
                if failing:
                    log.warning(
                        "%s answers again: caught up to step %d",
                        self.tracker.kind,
                        self.delivered["step"],
                    )
                failing, wait = False, interval_s
            except (
                Exception
            ) as err:  # the tracker's failure, whatever its kind: training goes on regardless
                self.reconcile = True
                if not failing:
                    self.record["outages"] = self.record.get("outages", 0) + 1
                    self.record["last_error"] = redact(f"{type(err).__name__}: {err}")[:500]
                    log.warning(
                        "%s does not answer (%s): training goes on; the tracker falls behind (%d steps so "
                        "far) and catches up when it answers",
                        self.tracker.kind,
                        self.record["last_error"],
                        self.behind(),
                    )
                    try:
                        self._save()
                    except Exception:
                        pass
                failing, wait = True, min(max(wait * 2, interval_s), max_backoff_s)
            if stop.wait(wait):
                return

    def catch_up(self, timeout_s: float, state: str | None = None) -> bool:
        """The last syncs before the mirror ends: until everything is delivered or `timeout_s` is over, then
        the tracker run is finished. False when the tracker stayed behind (its record says how far)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.sync()
                state = self.finish(state)
                log.info(
                    "%s run %s finished (%s), every step delivered up to %d",
                    self.tracker.kind,
                    self.record["run_id"],
                    state,
                    self.delivered["step"],
                )
                return True
            except Exception as err:
                self.reconcile = True
                if time.monotonic() >= deadline:
                    log.warning(
                        "%s is %d steps behind and still does not answer (%s); nothing is lost: "
                        "`python -m tracking.mirror --run-dir %s --tracker %s` delivers the rest",
                        self.tracker.kind,
                        self.behind(),
                        redact(str(err))[:300],
                        self.run.url,
                        self.tracker.kind,
                    )
                    return False
                time.sleep(min(5.0, max(0.0, deadline - time.monotonic())))


# ----------------------------------------------------------------------------- CLI


def follow_orders(stdin, stop: threading.Event, outcome: dict[str, str]) -> None:
    """The flow's orders on stdin: `finish STATE`; end of input (the flow is gone) finishes too."""
    for line in stdin:
        parts = line.split()
        if parts[:1] == ["finish"]:
            if len(parts) > 1 and parts[1] in ("completed", "failed", "stopped"):
                outcome["state"] = parts[1]
            break
    stop.set()


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m tracking.mirror", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--run-dir", required=True, help="the run directory (local path or fsspec URL)")
    ap.add_argument("--tracker", required=True, choices=TRACKERS)
    ap.add_argument(
        "--uri",
        default=None,
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI); TensorBoard "
        "log folder (default: {run}/tensorboard)",
    )
    ap.add_argument(
        "--project",
        default="gpt2-repro",
        help="MLflow experiment / W&B project (default: gpt2-repro)",
    )
    ap.add_argument("--entity", default=None, help="W&B entity (default: the API key's)")
    ap.add_argument(
        "--sweep",
        default=None,
        help="the sweep folder of a sweep's trial: its tracker run goes under the sweep's "
        "(tracking/sweep_mirror.py)",
    )
    ap.add_argument(
        "--follow", action="store_true", help="keep syncing until interrupted (Ctrl-C, SIGTERM)"
    )
    ap.add_argument(
        "--interval-s",
        type=float,
        default=15.0,
        help="--follow: seconds between syncs (default: 15)",
    )
    ap.add_argument(
        "--finish-timeout-s",
        type=float,
        default=120.0,
        help="--follow: how long the last catch-up may try a tracker that does not answer (default: 120)",
    )
    ap.add_argument(
        "--control-stdin", action="store_true", help=argparse.SUPPRESS
    )  # the flow's orders
    return ap


@entry_point
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for noisy in ("mlflow", "urllib3", "wandb", "alembic", "botocore", "s3fs"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    run = RunDir(args.run_dir)
    if not args.follow and not (store.exists(run.config) or store.exists(run.metrics)):
        raise BadInput(f"no run at {args.run_dir}: neither config.json nor metrics.jsonl is there")
    tracker = make_tracker(args.tracker, args.uri, args.project, args.entity, args.sweep)
    lease = Lease(run.lease(f"tracker-{args.tracker}"), f"{args.tracker} tracker mirror")
    deadline = time.monotonic() + (90 if args.follow else 0)
    while True:  # a restarted flow's mirror waits for the one it replaces to finish
        try:
            lease.acquire()
            break
        except LeaseHeld:
            if time.monotonic() >= deadline:
                raise
            time.sleep(2)
    mirror = Mirror(args.run_dir, tracker)
    try:
        return _follow(mirror, args) if args.follow else _once(mirror, args.tracker)
    finally:
        tracker.close()
        lease.release()


def _once(mirror: Mirror, kind: str) -> int:
    """Deliver what the run directory holds now (and finish the tracker run of a complete run)."""
    try:
        mirror.sync()
    except BadInput:
        raise
    except Exception as err:
        print(
            f"error: {kind} does not answer ({redact(str(err))[:300]}); nothing is lost: run this again",
            file=sys.stderr,
            flush=True,
        )
        return 1
    if mirror.complete():
        mirror.finish("completed")
    print(
        f"{kind} run {mirror.record['run_id']}: steps up to {mirror.delivered['step']} delivered",
        flush=True,
    )
    return 0


def _follow(mirror: Mirror, args: argparse.Namespace) -> int:
    """Deliver as the run goes, until a signal (or the flow's order on stdin), then catch up."""
    stop, outcome = threading.Event(), dict[str, Any]()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    if args.control_stdin:
        threading.Thread(target=follow_orders, args=(sys.stdin, stop, outcome), daemon=True).start()
    mirror.follow(stop, args.interval_s)
    return 0 if mirror.catch_up(args.finish_timeout_s, outcome.get("state")) else 1


if __name__ == "__main__":
    raise SystemExit(main())
