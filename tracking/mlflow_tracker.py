"""One run directory as one MLflow run (over MLflow's REST API: an `mlflow server`, Databricks, ...).

Identity: the MLflow run carries the tags `repro.run_dir` (the run directory's URL) and `repro.generation`;
a mirror that lost its record finds the run again by them instead of starting a second one.

MLflow keeps every value logged for a step (logging a step again appends to its history), so a step is sent
once. What the tracker holds is read back from MLflow itself (the history of `loss`) whenever the mirror
(re)connects, so a request whose answer was lost in an outage is not sent twice. A rollback changes steps
already sent: the mirror then starts the next generation (a new MLflow run with the same name holding the
run's history as it stands) and deletes the old one (MLflow's soft delete: `mlflow runs restore` brings it
back)."""

from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Any

# Fail fast and let the mirror retry: MLflow's client otherwise retries a dead server for minutes.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus, RunTag, ViewType

MAX_METRICS_PER_REQUEST = 1000  # MLflow's log_batch limit
MAX_PARAMS_PER_REQUEST = 100
STATUS = {
    "completed": RunStatus.to_string(RunStatus.FINISHED),
    "failed": RunStatus.to_string(RunStatus.FAILED),
    "stopped": RunStatus.to_string(RunStatus.KILLED),
}


def flatten(obj: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in obj.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v) if not isinstance(v, str) else v
    return out


class MlflowTracker:
    kind = "mlflow"

    def __init__(self, uri: str, experiment: str, sweep: str | None = None):
        self.uri, self.experiment, self.sweep = uri, experiment, sweep
        self.client = MlflowClient(uri)
        self.run_id: str | None = None

    # ------------------------------------------------------------------ identity

    def _experiment_id(self) -> str:
        exp = self.client.get_experiment_by_name(self.experiment)
        return exp.experiment_id if exp else self.client.create_experiment(self.experiment)

    def _find(self, exp_id: str, run_url: str, generation: int) -> str | None:
        found = self.client.search_runs(
            [exp_id],
            f"tags.`repro.run_dir` = '{run_url}' and tags.`repro.generation` = '{generation}'",
            run_view_type=ViewType.ACTIVE_ONLY,
            max_results=1,
        )
        return found[0].info.run_id if found else None

    def open(
        self,
        run_url: str,
        run_name: str,
        generation: int,
        known: str | None,
        delivered_step: int = -1,
    ) -> str:
        """The MLflow run of this generation of the run directory: `known` (its id from the mirror's record),
        the one tagged with it, or a new one. Returns its id."""
        exp_id = self._experiment_id()
        run_id = known or self._find(exp_id, run_url, generation)
        if run_id is None:
            tags = {"repro.run_dir": run_url, "repro.generation": str(generation)}
            if self.sweep:
                tags.update({"repro.sweep_dir": self.sweep, "repro.role": "trial"})
            run = self.client.create_run(exp_id, run_name=run_name, tags=tags)
            run_id = run.info.run_id
        else:
            self.client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        self.run_id = run_id
        return run_id

    def attach_to_sweep(self) -> bool:
        """Make this run a child of its sweep's run (MLflow nests it there), once the sweep's mirror has made
        that run: until then False, and the mirror asks again at its next delivery."""
        if not self.sweep:
            return True
        parent = find_sweep_run(self.client, self._experiment_id(), self.sweep)
        if parent is None:
            return False
        self.client.set_tag(self._id, "mlflow.parentRunId", parent)
        return True

    @property
    def _id(self) -> str:
        """The open run's id (open() sets it)."""
        if self.run_id is None:
            raise RuntimeError("mlflow: no run is open")
        return self.run_id

    def link(self) -> str:
        return (
            f"{self.uri.rstrip('/')}/#/experiments/{self.client.get_run(self._id).info.experiment_id}/runs/"
            f"{self._id}"
            if self.uri.startswith("http")
            else self._id
        )

    # ------------------------------------------------------------------ what MLflow holds

    def delivered_step(self) -> int:
        """The last training step MLflow holds (-1 for none): steps go in whole, in order."""
        history = self.client.get_metric_history(self._id, "loss")
        return max((m.step for m in history), default=-1)

    def delivered_evaluations(self, keys: set[str]) -> set[tuple[int, str]]:
        """(step, key) pairs of these evaluation metrics that MLflow holds."""
        return {
            (m.step, key) for key in keys for m in self.client.get_metric_history(self._id, key)
        }

    # ------------------------------------------------------------------ logging

    def log_steps(self, rows: list[tuple[int, dict[str, float]]], timestamp_ms: int) -> None:
        """Whole steps per request, so what MLflow holds always ends at a step boundary."""
        batch: list[Metric] = []
        for step, values in rows:
            metrics = [Metric(k, v, timestamp_ms, step) for k, v in values.items()]
            if batch and len(batch) + len(metrics) > MAX_METRICS_PER_REQUEST:
                self.client.log_batch(self._id, metrics=batch, synchronous=True)
                batch = []
            batch += metrics
        if batch:
            self.client.log_batch(self._id, metrics=batch, synchronous=True)

    def log_evaluation(self, step: int, values: dict[str, float], timestamp_ms: int) -> None:
        self.client.log_batch(
            self._id,
            metrics=[Metric(k, v, timestamp_ms, step) for k, v in values.items()],
            synchronous=True,
        )

    def log_samples(self, new: list[dict[str, Any]], everything: list[dict[str, Any]]) -> None:
        """One text file per step (re-sending one rewrites the same file)."""
        for s in new:
            body = "\n\n".join(
                f"--- sample {i} ---\n{t}" for i, t in enumerate(s.get("samples", []))
            )
            self.client.log_text(self._id, body, f"samples/step_{int(s['step']):06d}.txt")

    def log_events(self, events: list[dict[str, Any]]) -> None:
        """The whole event list as one artifact (rewritten as it grows), the latest as tags."""
        self.client.log_text(
            self._id, "".join(json.dumps(e) + "\n" for e in events), "events.jsonl"
        )
        last = events[-1]
        self.client.log_batch(
            self._id,
            tags=[
                RunTag("repro.events", str(len(events))),
                RunTag(
                    "repro.last_event",
                    f"{last['source']}: {last['event']} (step {last['step']})"[:5000],
                ),
            ],
            synchronous=True,
        )

    def log_config(self, config: dict[str, Any], first: bool) -> None:
        """The resolved config as params once (MLflow params cannot change), and as config.json, rewritten when a
        resubmission changes it (skipped data after a rollback, fewer nodes)."""
        if first:
            params = [Param(k, v[:6000]) for k, v in sorted(flatten(config).items())]
            for i in range(0, len(params), MAX_PARAMS_PER_REQUEST):
                self.client.log_batch(
                    self._id, params=params[i : i + MAX_PARAMS_PER_REQUEST], synchronous=True
                )
        self.client.log_text(self._id, json.dumps(config, indent=2, sort_keys=True), "config.json")

    def retire(self) -> None:
        pass  # the next generation's run marks it, once it exists

    def supersede(self, old_run_id: str) -> None:
        """The run of the previous generation, after a rollback: point it at this one and delete it (softly)."""
        self.client.set_tag(old_run_id, "repro.superseded_by", self.run_id)
        self.client.set_terminated(old_run_id, STATUS["stopped"])
        self.client.delete_run(old_run_id)

    def flush(self) -> None:
        """Every call above has returned once the tracker holds its data."""

    def finish(self, state: str) -> None:
        self.client.set_terminated(self._id, STATUS[state])

    def close(self) -> None:
        pass


# ----------------------------------------------------------------------------- a sweep: the parent run


def find_sweep_run(client: MlflowClient, exp_id: str, sweep_url: str) -> str | None:
    found = client.search_runs(
        [exp_id],
        f"tags.`repro.sweep_dir` = '{sweep_url}' and tags.`repro.role` = 'sweep'",
        run_view_type=ViewType.ACTIVE_ONLY,
        max_results=1,
    )
    return found[0].info.run_id if found else None


class MlflowSweep:
    """A sweep as one MLflow run, the parent of its trials' runs: its settings as params, every trial's final
    val loss (at the trial's number) and the best so far as metrics, the winner as tags, the trials table
    (trials.json) and the overlaid curves (curves.png) as artifacts. Only the sweep's mirror creates it (the
    trials' mirrors find it by its tags), so a sweep has one."""

    kind = "mlflow"

    def __init__(self, uri: str, experiment: str):
        self.trials = MlflowTracker(uri, experiment)  # the client, experiment and link
        self.client = self.trials.client
        self.run_id: str | None = None
        self.reconciled = False

    def open(self, sweep_url: str, name: str, known: str | None, settings: dict[str, Any]) -> str:
        exp_id = self.trials._experiment_id()
        rid = known or find_sweep_run(self.client, exp_id, sweep_url)
        if rid is None:
            tags = {"repro.sweep_dir": sweep_url, "repro.role": "sweep"}
            rid = self.client.create_run(exp_id, run_name=name, tags=tags).info.run_id
            params = [Param(k, v[:6000]) for k, v in sorted(flatten(settings).items())]
            for i in range(0, len(params), MAX_PARAMS_PER_REQUEST):
                self.client.log_batch(
                    rid, params=params[i : i + MAX_PARAMS_PER_REQUEST], synchronous=True
                )
        else:
            self.client.update_run(rid, status=RunStatus.to_string(RunStatus.RUNNING))
        self.run_id = self.trials.run_id = rid
        return rid

    def link(self) -> str:
        return self.trials.link()

    def show(self, summary: Any, delivered: dict[str, Any], curves: bytes | None) -> None:
        """Bring the run up to `summary` (common/sweep_summary.py); `delivered` is the mirror's memory of what
        was sent (a metric point is sent once: MLflow appends a value logged again)."""
        rid = self.trials._id
        self._adopt(summary.url)
        now_ms = int(time.time() * 1000)
        sent = set(delivered.setdefault("trials", []))
        if not self.reconciled:  # what a mirror that died before saving its record had sent already
            held = {m.step for m in self.client.get_metric_history(rid, "trial_final_val_loss")}
            delivered["trials"] += sorted(held - sent)
            sent |= held
            self.reconciled = True
        best = delivered.get("best")
        for t in summary.trials:
            if t.trial in sent or not t.finished() or t.final_val_loss is None:
                continue
            metrics = [Metric("trial_final_val_loss", t.final_val_loss, now_ms, t.trial)]
            if t.state == "completed":
                best = t.final_val_loss if best is None else min(best, t.final_val_loss)
                metrics.append(Metric("best_final_val_loss", best, now_ms, t.trial))
            self.client.log_batch(rid, metrics=metrics, synchronous=True)
            delivered["trials"].append(t.trial)
            delivered["best"] = best
        counts: dict[str, int] = {}
        for t in summary.trials:
            counts[t.state] = counts.get(t.state, 0) + 1
        tags = [RunTag(f"trials.{state}", str(n)) for state, n in sorted(counts.items())]
        win = summary.trial(summary.winner) if summary.winner is not None else None
        if win is not None:
            tags += [
                RunTag("winner.trial", str(win.trial)),
                RunTag("winner.run", win.run),
                RunTag("winner.final_val_loss", str(win.final_val_loss)),
                *(RunTag(f"winner.{k}", json.dumps(v)) for k, v in sorted(win.params.items())),
            ]
        self.client.log_batch(rid, tags=tags, synchronous=True)
        rows = [t.model_dump(mode="json") for t in summary.trials]
        self.client.log_text(rid, json.dumps(rows, indent=1), "trials.json")
        if curves:
            with tempfile.TemporaryDirectory() as d:
                path = os.path.join(d, "curves.png")
                with open(path, "wb") as f:
                    f.write(curves)
                self.client.log_artifact(rid, path)

    def _adopt(self, sweep_url: str) -> None:
        """The trials' runs made before this one existed (their mirrors attach them when they can, but a short
        trial may end first): made its children here."""
        rid = self.trials._id
        trials = self.client.search_runs(
            [self.trials._experiment_id()],
            f"tags.`repro.sweep_dir` = '{sweep_url}' and tags.`repro.role` = 'trial'",
            run_view_type=ViewType.ACTIVE_ONLY,
            max_results=10000,
        )
        for t in trials:
            if t.data.tags.get("mlflow.parentRunId") != rid:
                self.client.set_tag(t.info.run_id, "mlflow.parentRunId", rid)

    def finish(self, state: str) -> None:
        self.client.set_terminated(self.trials._id, STATUS[state])

    def close(self) -> None:
        pass
