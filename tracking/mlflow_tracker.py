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

    def __init__(self, uri: str, experiment: str):
        self.uri, self.experiment = uri, experiment
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
            run = self.client.create_run(
                exp_id,
                run_name=run_name,
                tags={"repro.run_dir": run_url, "repro.generation": str(generation)},
            )
            run_id = run.info.run_id
        else:
            self.client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        self.run_id = run_id
        return run_id

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
