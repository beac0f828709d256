"""Keep one tracker run in step with one sweep: the parent of its trials' runs, showing the comparison.

    python -m tracking.sweep_mirror --sweep-dir store/sweeps/lr --tracker mlflow --uri http://mlflow:5000
    python -m tracking.sweep_mirror --sweep-dir store/sweeps/lr --tracker tensorboard --follow

The sweep flow runs this in a process of its own beside the trials' mirrors (tracking/mirror.py, given
`--sweep`), from the sweep's summary file (common/sweep_summary.py), so a tracker that is down slows neither the
sweep nor its trials, and nothing is lost: the summary stays in the sweep's folder. What each tracker shows:
  - MLflow: one run named after the sweep; the trials' runs are its children (nested under it in the UI); its
    params are the sweep's settings, its metrics each trial's final val loss (at the trial's number) and the best
    so far, its tags the winner, its artifacts the trials table (trials.json) and the overlaid curves.
  - W&B: the trials are one group; the sweep's own run in it (job type `sweep`) holds the trials table, the
    curves and the winner.
  - TensorBoard: the trials' log folders side by side under one log folder, each finished trial a row of the
    HParams dashboard, the trials table as text.

Its record, {sweep}/trackers/{tracker}.json, names the parent run and what was delivered.
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
from common.layout import SweepDir
from common.lease import Lease, LeaseHeld
from common.sweep_summary import SweepSummary, read_summary
from tracking.credentials import redact
from tracking.mirror import TRACKERS, follow_orders

log = logging.getLogger("tracking.sweep_mirror")


class SweepTracker(Protocol):
    kind: str
    run_id: str | None

    def open(
        self, sweep_url: str, name: str, known: str | None, settings: dict[str, Any]
    ) -> str: ...
    def link(self) -> str: ...
    def show(self, summary: Any, delivered: dict[str, Any], curves: bytes | None) -> None: ...
    def finish(self, state: str) -> None: ...
    def close(self) -> None: ...


def make_sweep_tracker(
    kind: str, uri: str | None, project: str, entity: str | None, folder: SweepDir
) -> SweepTracker:
    """The parent run's tracker client; a missing library or address is one line (BadInput)."""
    from tracking.mirror import make_tracker

    make_tracker(kind, uri, project, entity)  # the same checks, the same one-line answers
    if kind == "mlflow":
        from tracking.mlflow_tracker import MlflowSweep

        return MlflowSweep(uri or os.environ["MLFLOW_TRACKING_URI"], project)
    if kind == "tensorboard":
        from tracking.tensorboard_tracker import TensorBoardSweep

        return TensorBoardSweep(uri or folder.tensorboard)
    from tracking.wandb_tracker import WandbSweep

    return WandbSweep(project, entity)


class SweepMirror:
    def __init__(self, folder: SweepDir, tracker: SweepTracker):
        self.folder, self.tracker = folder, tracker
        try:
            self.record: dict[str, Any] = store.read_json(folder.tracker(tracker.kind))
        except (FileNotFoundError, ValueError):
            self.record = {"tracker": tracker.kind, "run_id": None, "delivered": {}, "outages": 0}
        self.opened = False
        self.summary: SweepSummary | None = None

    def _save(self) -> None:
        self.record["updated"] = time.time()
        store.write_json(self.folder.tracker(self.tracker.kind), self.record)

    def sync(self) -> bool:
        """One pass: the parent run brought up to the sweep's summary. False before the sweep wrote one. Raises
        when the tracker fails (the next pass sends it again)."""
        summary = read_summary(self.folder)
        if summary is None:
            return False
        self.summary = summary
        if not self.opened:
            rid = self.tracker.open(
                summary.url, summary.sweep, self.record.get("run_id"), summary.settings
            )
            self.record.update(run_id=rid, link=redact(self.tracker.link()))
            self._save()
            self.opened = True
            log.info(
                "%s run %s for sweep %s: %s",
                self.tracker.kind,
                rid,
                summary.sweep,
                self.record["link"],
            )
        if self.record.get("shown") == summary.content_hash():
            return True
        curves = store.read_bytes(self.folder.curves) if store.exists(self.folder.curves) else None
        self.tracker.show(summary, self.record["delivered"], curves)
        self.record["shown"] = summary.content_hash()
        self._save()
        return True

    def finish(self, state: str | None = None) -> str:
        state = state or ("completed" if self.summary and self.summary.finished else "stopped")
        if self.opened:
            self.tracker.finish(state)
        self.record["finished"] = state
        self._save()
        return state

    def follow(self, stop: threading.Event, interval_s: float, max_backoff_s: float = 60.0) -> None:
        """Sync every `interval_s` until `stop`; a failing tracker is said once and retried with backoff."""
        failing, wait = False, interval_s
        while True:
            try:
                self.sync()
                if failing:
                    log.warning(
                        "%s answers again: the sweep's run is up to date", self.tracker.kind
                    )
                failing, wait = False, interval_s
            except BadInput:
                raise
            except (
                Exception
            ) as err:  # the tracker's failure, whatever it is: the sweep goes on regardless
                if not failing:
                    self.record["outages"] = self.record.get("outages", 0) + 1
                    self.record["last_error"] = redact(f"{type(err).__name__}: {err}")[:500]
                    log.warning(
                        "%s does not answer (%s): the sweep goes on; its run catches up when it answers",
                        self.tracker.kind,
                        self.record["last_error"],
                    )
                failing, wait = True, min(max(wait * 2, interval_s), max_backoff_s)
            if stop.wait(wait):
                return

    def catch_up(self, timeout_s: float, state: str | None = None) -> bool:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.sync()
                state = self.finish(state)
                log.info(
                    "%s run %s of the sweep finished (%s)",
                    self.tracker.kind,
                    self.record["run_id"],
                    state,
                )
                return True
            except Exception as err:
                if time.monotonic() >= deadline:
                    log.warning(
                        "%s still does not answer (%s); nothing is lost: `python -m tracking.sweep_mirror "
                        "--sweep-dir %s --tracker %s` brings the sweep's run up to date",
                        self.tracker.kind,
                        redact(str(err))[:300],
                        self.folder.url,
                        self.tracker.kind,
                    )
                    return False
                time.sleep(min(5.0, max(0.0, deadline - time.monotonic())))


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m tracking.sweep_mirror", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--sweep-dir", required=True, help="the sweep's folder ({store}/sweeps/{name})")
    ap.add_argument("--tracker", required=True, choices=TRACKERS)
    ap.add_argument(
        "--uri",
        default=None,
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI); TensorBoard log folder of the "
        "trials (default: {sweep}/tensorboard)",
    )
    ap.add_argument("--project", default="gpt2-repro", help="MLflow experiment / W&B project")
    ap.add_argument("--entity", default=None, help="W&B entity (default: the API key's)")
    ap.add_argument("--follow", action="store_true", help="keep syncing until interrupted")
    ap.add_argument(
        "--interval-s", type=float, default=15.0, help="--follow: seconds between syncs"
    )
    ap.add_argument(
        "--finish-timeout-s",
        type=float,
        default=120.0,
        help="--follow: how long the last catch-up may try a tracker that does not answer",
    )
    ap.add_argument("--control-stdin", action="store_true", help=argparse.SUPPRESS)
    return ap


@entry_point
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for noisy in ("mlflow", "urllib3", "wandb", "alembic", "botocore", "s3fs"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    folder = SweepDir(args.sweep_dir.rstrip("/"))
    if not args.follow and not store.exists(folder.summary):
        raise BadInput(f"no sweep at {args.sweep_dir}: its summary.json is not there")
    try:
        if not args.follow:
            read_summary(folder)
    except ValueError as err:
        raise BadInput(
            f"{folder.summary} is not a sweep summary: {str(err).splitlines()[0]}"
        ) from None
    tracker = make_sweep_tracker(args.tracker, args.uri, args.project, args.entity, folder)
    lease = Lease(folder.lease(f"tracker-{args.tracker}"), f"{args.tracker} sweep tracker mirror")
    deadline = time.monotonic() + (90 if args.follow else 0)
    while True:  # a restarted sweep's mirror waits for the one it replaces to finish
        try:
            lease.acquire()
            break
        except LeaseHeld:
            if time.monotonic() >= deadline:
                raise
            time.sleep(2)
    mirror = SweepMirror(folder, tracker)
    try:
        if not args.follow:
            try:
                mirror.sync()
            except Exception as err:
                print(
                    f"error: {args.tracker} does not answer ({redact(str(err))[:300]}); nothing is "
                    "lost: run this again",
                    file=sys.stderr,
                    flush=True,
                )
                return 1
            if mirror.summary and mirror.summary.finished:
                mirror.finish("completed")
            print(
                f"{args.tracker} run {mirror.record['run_id']}: the sweep's run is up to date",
                flush=True,
            )
            return 0
        stop, outcome = threading.Event(), dict[str, Any]()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        if args.control_stdin:
            threading.Thread(
                target=follow_orders, args=(sys.stdin, stop, outcome), daemon=True
            ).start()
        mirror.follow(stop, args.interval_s)
        return 0 if mirror.catch_up(args.finish_timeout_s, outcome.get("state")) else 1
    finally:
        tracker.close()
        lease.release()


if __name__ == "__main__":
    raise SystemExit(main())
