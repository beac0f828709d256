"""One run directory as one TensorBoard log folder: `{run}/tensorboard` unless `--uri` / `tracker_uri` names
another (a local path or an fsspec URL such as s3://bucket/tb/run).

Each step once. TensorBoard event files only grow, but a writer opened with a *purge step* tells TensorBoard to
drop every point at or after that step from the files before it. Every writer this tracker opens purges from the
step after the last one delivered, so points written by a mirror that died before its record said so are dropped
and sent again; a rollback's next generation purges from step 0 and sends the run's history as it stands. What is
written is held back until the mirror saves its record (`flush`), so the record never claims a point that is not
in a file; after a failure the points not flushed are dropped (and no flush succeeds until the mirror has asked
what is held: a second write of them would show them twice), and the next writer purges past the last flushed
step.

A log folder on an object store: the event file is written in a local folder and uploaded whole after every
flush (TensorBoard reads s3:// log folders with boto3, or `aws s3 sync` them down); past ROLL_BYTES a new file
starts, so an upload stays small however long the run.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import store
from common.layout import RunDir

ROLL_BYTES = 8 << 20  # a new event file past this size: each upload rewrites only the current one


class TensorBoardTracker:
    kind = "tensorboard"

    def __init__(self, logdir: str | None = None):
        from torch.utils.tensorboard import (
            SummaryWriter,
        )  # needs the tensorboard package: ImportError otherwise

        self._writer_class = SummaryWriter
        self.requested = logdir
        self.logdir = ""  # set by open()
        self.run_id: str | None = None
        self.writer: Any = None
        self.pending: list[tuple[int, Callable[[Any], None]]] = []  # (step it is about, write it)
        self.durable_step = -1  # the last training step in a flushed file
        self.durable_evals: set[tuple[int, str]] = set()
        self.pending_evals: set[tuple[int, str]] = set()
        self.purge_from: int | None = 0
        self.last_step = (
            0  # where the events table, the config's later versions and the status are shown
        )
        self.current: Path | None = None  # the event file the writer appends to
        self.uploaded: dict[str, int] = {}  # file name -> size uploaded
        self.staging = (
            ""  # where the writer writes: the log folder, or a local copy of a remote one
        )
        self.local = True
        self.failed = (
            False  # a flush failed: nothing more is claimed until the mirror asks what is held
        )

    # ------------------------------------------------------------------ the log folder and its writer

    def open(
        self,
        run_url: str,
        run_name: str,
        generation: int,
        known: str | None,
        delivered_step: int = -1,
    ) -> str:
        self._clean_staging()  # a new generation's writer starts a new file
        self.logdir = (self.requested or known or RunDir(run_url).tensorboard).rstrip("/")
        self.local = store.is_local(self.logdir)
        self.staging = self.logdir if self.local else tempfile.mkdtemp(prefix="tensorboard-")
        self.durable_step = delivered_step
        self.purge_from = (
            delivered_step + 1
        )  # 0 for a new generation: its history replaces the old one
        self.last_step = max(delivered_step, 0)
        self.run_id = self.logdir
        return self.logdir

    def link(self) -> str:
        return f"tensorboard --logdir {self.logdir}"

    def attach_to_sweep(self) -> bool:
        return True  # a trial's log folder is a folder of its sweep's (the sweep gives its uri)

    def _files(self) -> set[Path]:
        return set(Path(self.staging).glob("events.out.tfevents.*"))

    def _writer(self) -> Any:
        if self.writer is None:
            os.makedirs(self.staging, exist_ok=True)
            before = self._files()
            self.writer = self._writer_class(
                log_dir=self.staging, purge_step=self.purge_from, flush_secs=3600
            )
            self.current = next(iter(self._files() - before), None)
            self.purge_from = None
        return self.writer

    def _drop_writer(self) -> None:
        if self.writer is not None:
            try:
                self.writer.close()
            except (
                Exception
            ):  # a writer that failed is given up: the next one purges past what it wrote
                pass
            self.writer = None

    def _upload(self) -> None:
        for path in sorted(self._files()):
            size = path.stat().st_size
            if self.uploaded.get(path.name) != size:
                store.write_bytes(store.join(self.logdir, path.name), path.read_bytes())
                self.uploaded[path.name] = size

    # ------------------------------------------------------------------ what the mirror calls

    def delivered_step(self) -> int | None:
        """Asked at start and after a failure. Whatever was queued since the last flush is dropped (the mirror
        sends it again), and the next writer purges past the last flushed step, in case a file holds part of it."""
        if self.pending or self.failed:
            self.pending.clear()
            self.pending_evals.clear()
            self._drop_writer()
            self.purge_from = self.durable_step + 1
            self.failed = False
        return self.durable_step

    def delivered_evaluations(self, keys: set[str]) -> set[tuple[int, str]] | None:
        return set(self.durable_evals)

    def log_steps(self, rows: list[tuple[int, dict[str, float]]], timestamp_ms: int) -> None:
        for step, values in rows:
            self.pending.append((step, _scalars(values, step, timestamp_ms)))
            self.last_step = max(self.last_step, step)

    def log_evaluation(self, step: int, values: dict[str, float], timestamp_ms: int) -> None:
        self.pending.append((-1, _scalars(values, step, timestamp_ms)))
        self.pending_evals |= {(step, k) for k in values}

    def log_samples(self, new: list[dict[str, Any]], everything: list[dict[str, Any]]) -> None:
        for s in new:
            text = "\n\n".join(f"**{i}.** {t}" for i, t in enumerate(s.get("samples", [])))
            self.pending.append((-1, _text("samples", text, int(s["step"]))))

    def log_events(self, events: list[dict[str, Any]]) -> None:
        rows = ["| time | source | event | step |", "|---|---|---|---|"]
        rows += [f"| {e['time']} | {e['source']} | {e['event']} | {e['step']} |" for e in events]
        text = "\n".join(rows)
        self.pending.append((-1, _text("events", text, self.last_step)))

    def log_config(self, config: dict[str, Any], first: bool) -> None:
        text = "```json\n" + json.dumps(config, indent=1, sort_keys=True, default=str) + "\n```"
        self.pending.append((-1, _text("config", text, 0 if first else self.last_step)))

    def flush(self) -> None:
        """Write what is queued, make it durable (uploaded, for a log folder on an object store), then the mirror
        saves its record."""
        if self.failed:  # written once already: writing it again would show its points twice
            raise RuntimeError(
                "tensorboard: the last write failed; waiting for the mirror to send it again"
            )
        if not self.pending:
            return
        try:
            w = self._writer()
            for _, write in self.pending:
                write(w)
            w.flush()
            if not self.local:
                self._upload()
        except Exception:
            self.failed = True
            raise
        self.durable_step = max([self.durable_step, *(s for s, _ in self.pending)])
        self.durable_evals |= self.pending_evals
        self.pending.clear()
        self.pending_evals.clear()
        if self.current is not None and self.current.stat().st_size > ROLL_BYTES:
            self._drop_writer()  # the next points start a new file; purge_from stays None: nothing to drop

    def supersede(self, old_run_id: str) -> None:
        """The same log folder: the new generation's purge from step 0 has replaced the old history."""

    def retire(self) -> None:
        self.flush()
        self._drop_writer()

    def finish(self, state: str) -> None:
        self.pending.append((-1, _text("status", f"run {state}", self.last_step)))
        self.flush()
        self._drop_writer()

    def _clean_staging(self) -> None:
        """The local copies of an object store's event files, once uploaded."""
        if self.staging and not self.local:
            shutil.rmtree(self.staging, ignore_errors=True)

    def close(self) -> None:
        self._drop_writer()
        self._clean_staging()


def _scalars(values: dict[str, float], step: int, timestamp_ms: int) -> Callable[[Any], None]:
    """A queued write of `values` at `step` (the values and step as they are now, not when it runs)."""

    def write(w: Any) -> None:
        for k, x in values.items():
            w.add_scalar(k, x, step, timestamp_ms / 1000)

    return write


def _text(tag: str, text: str, step: int) -> Callable[[Any], None]:
    return lambda w: w.add_text(tag, text, step)


# ----------------------------------------------------------------------------- a sweep: the HParams table


class TensorBoardSweep:
    """A sweep in TensorBoard: its trials' log folders side by side under one log folder (the sweep gives each
    trial `{root}/{trial}`), and for each finished trial a session of the HParams dashboard in
    `{root}/{trial}/hparams` (its parameters, final and best val loss, evaluation); the trials table as text
    in `{root}/sweep`. Each is one event file of a fixed name, rewritten when its content changes, so nothing
    shows twice."""

    kind = "tensorboard"
    FILE = "events.out.tfevents.0.repro"

    def __init__(self, root: str):
        self.root = root.rstrip("/")
        self.run_id: str | None = None

    def open(self, sweep_url: str, name: str, known: str | None, settings: dict[str, Any]) -> str:
        self.run_id = self.root
        return self.root

    def link(self) -> str:
        return f"tensorboard --logdir {self.root}"

    def _write(self, folder: str, write: Callable[[Any], None]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        with tempfile.TemporaryDirectory() as d:
            w = SummaryWriter(log_dir=d)
            write(w)
            w.close()
            (path,) = Path(d).glob("events.out.tfevents.*")
            store.write_bytes(store.join(self.root, folder, self.FILE), path.read_bytes())

    def show(self, summary: Any, delivered: dict[str, Any], curves: bytes | None) -> None:
        from torch.utils.tensorboard.summary import hparams

        written = delivered.setdefault("trials", {})
        for t in summary.trials:
            if not t.finished():
                continue
            metrics = {
                k: v
                for k, v in {
                    "final_val_loss": t.final_val_loss,
                    "best_val_loss": t.best_val_loss,
                    **t.evals,
                }.items()
                if v is not None
            }
            values = {
                k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v)
                for k, v in t.params.items()
            }
            values["state"] = t.state
            key = json.dumps([values, metrics], sort_keys=True)
            if written.get(t.run) == key:
                continue

            def write(w: Any, values=values, metrics=metrics) -> None:
                for part in hparams(values, metrics):
                    w.file_writer.add_summary(part)
                for k, v in metrics.items():
                    w.add_scalar(k, v, 0)

            self._write(f"{t.run}/hparams", write)
            written[t.run] = key
        rows = ["| trial | run | parameters | state | final val loss |", "|---|---|---|---|---|"]
        rows += [
            f"| {t.trial} | {t.run} | {', '.join(f'{k}={v}' for k, v in t.params.items())} | "
            f"{t.state} | {'' if t.final_val_loss is None else f'{t.final_val_loss:.4f}'} |"
            for t in summary.trials
        ]
        table = "\n".join(rows)
        if delivered.get("table") != table:
            self._write("sweep", lambda w: w.add_text("trials", table, 0))
            delivered["table"] = table

    def finish(self, state: str) -> None:
        pass  # each trial's session says how the trial ended

    def close(self) -> None:
        pass
