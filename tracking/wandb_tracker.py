"""One run directory as one Weights & Biases run, online or offline (WANDB_MODE=offline writes the run under
WANDB_DIR; `wandb sync` uploads it later).

Identity: the W&B run id is derived from the run directory's URL (`{run name}-{hash}`), so a mirror that
lost its record resumes the same run (`resume="allow"`) instead of starting a second one. Every row carries our
`step` as its x-axis (W&B's own `_step` only counts rows, and must only grow: an evaluation of an earlier
checkpoint arrives after later training steps); evaluations use `eval/step`. A rollback changes steps already
sent: the mirror then starts the next generation (`{id}-g2`, ...) holding the run's history as it stands, and
tags the old run `superseded`. W&B's rewind (`resume_from`) would keep one id, but it needs the server and
offline runs cannot use it."""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from typing import Any

import wandb

EXIT_CODE = {"completed": 0, "failed": 1, "stopped": 1}


def run_id(run_url: str, run_name: str, generation: int) -> str:
    slug = re.sub(r"[^a-z0-9-]+", "-", run_name.lower()).strip("-")[:40] or "run"
    base = f"{slug}-{hashlib.sha1(run_url.encode()).hexdigest()[:8]}"
    return base if generation == 1 else f"{base}-g{generation}"


def _settings() -> Any:
    return wandb.Settings(
        init_timeout=60,
        silent=True,
        console="off",
        x_disable_stats=True,
        x_disable_meta=True,
        disable_git=True,
        save_code=False,
    )


def sweep_name(sweep_url: str) -> str:
    return sweep_url.rstrip("/").rsplit("/", 1)[-1]


class WandbTracker:
    kind = "wandb"

    def __init__(self, project: str, entity: str | None = None, sweep: str | None = None):
        self.project, self.entity, self.sweep = project, entity, sweep
        self.run: Any = None
        self.run_id: str | None = None

    def open(
        self,
        run_url: str,
        run_name: str,
        generation: int,
        known: str | None,
        delivered_step: int = -1,
    ) -> str:
        rid = known or run_id(run_url, run_name, generation)
        self.run = wandb.init(
            project=self.project,
            entity=self.entity,
            id=rid,
            name=run_name,
            resume="allow",
            tags=[f"generation-{generation}"],
            # a sweep's trials are one W&B group, beside the sweep's own run (WandbSweep)
            group=sweep_name(self.sweep) if self.sweep else None,
            job_type="trial" if self.sweep else None,
            reinit="create_new",
            settings=_settings(),
        )
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")
        self.run.define_metric("eval/step")
        self.run.define_metric("eval/*", step_metric="eval/step")
        self.run.config.update(
            {"repro": {"run_dir": run_url, "generation": generation}}, allow_val_change=True
        )
        self.run_id = rid
        return rid

    def attach_to_sweep(self) -> bool:
        return True  # the group was given when the run was opened

    def link(self) -> str:
        return (
            getattr(self.run, "url", None)
            or f"{self.project}/{self.run_id} (offline: `wandb sync` uploads it)"
        )

    def delivered_step(self) -> int | None:
        return None  # wandb's own process buffers and retries; the mirror's record is the truth

    def delivered_evaluations(self, keys: set[str]) -> set[tuple[int, str]] | None:
        return None

    def log_steps(self, rows: list[tuple[int, dict[str, float]]], timestamp_ms: int) -> None:
        for step, values in rows:
            self.run.log({"step": step, **values})

    def log_evaluation(self, step: int, values: dict[str, float], timestamp_ms: int) -> None:
        self.run.log({"eval/step": step, **values})

    def log_samples(self, new: list[dict[str, Any]], everything: list[dict[str, Any]]) -> None:
        """All samples so far as one table (W&B shows a table's latest version)."""
        rows = [[s["step"], i, t] for s in everything for i, t in enumerate(s.get("samples", []))]
        self.run.log({"samples": wandb.Table(columns=["step", "sample", "text"], data=rows)})

    def log_events(self, events: list[dict[str, Any]]) -> None:
        cols = ["time", "source", "event", "step", "detail"]
        data = [[e[c] for c in cols] for e in events]
        self.run.log({"events": wandb.Table(columns=list[str | int](cols), data=data)})
        self.run.summary["events"] = len(events)

    def log_config(self, config: dict[str, Any], first: bool) -> None:
        self.run.config.update(config, allow_val_change=True)

    def supersede(self, old_run_id: str) -> None:
        self.run.config.update({"repro": {"supersedes": old_run_id}}, allow_val_change=True)

    def retire(self) -> None:
        """The current generation's run, before the next one starts: tagged and finished."""
        self.run.tags = (*self.run.tags, "superseded")
        self.finish("stopped")

    def flush(self) -> None:
        """wandb's own process holds what was logged, and retries it until the server has it."""

    def finish(self, state: str) -> None:
        self.run.finish(exit_code=EXIT_CODE[state])
        self.run = None

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


class WandbSweep:
    """A sweep as one W&B run in the group of its trials (job type `sweep`): its settings as config, the trials
    table (its latest version), the winner and the best final val loss in the summary, the overlaid curves."""

    kind = "wandb"

    def __init__(self, project: str, entity: str | None = None):
        self.project, self.entity = project, entity
        self.run: Any = None
        self.run_id: str | None = None

    def open(self, sweep_url: str, name: str, known: str | None, settings: dict[str, Any]) -> str:
        rid = known or run_id(sweep_url, f"sweep-{name}", 1)
        self.run = wandb.init(
            project=self.project,
            entity=self.entity,
            id=rid,
            name=name,
            group=name,
            job_type="sweep",
            resume="allow",
            reinit="create_new",
            settings=_settings(),
        )
        self.run.config.update(
            {"sweep": settings, "repro": {"sweep_dir": sweep_url}}, allow_val_change=True
        )
        self.run_id = rid
        return rid

    def link(self) -> str:
        return (
            getattr(self.run, "url", None)
            or f"{self.project}/{self.run_id} (offline: `wandb sync` uploads it)"
        )

    def show(self, summary: Any, delivered: dict[str, Any], curves: bytes | None) -> None:
        rows = [t.model_dump(mode="json") for t in summary.trials]
        keys = list(dict.fromkeys(k for t in summary.trials for k in t.params))
        cols = ["trial", "run", *keys, "state", "best_val_loss", "final_val_loss", "step", "tokens"]
        data = [
            [r["trial"], r["run"], *(json.dumps(r["params"].get(k)) for k in keys)]
            + [r["state"], r["best_val_loss"], r["final_val_loss"], r["step"], r["tokens"]]
            for r in rows
        ]
        logged: dict[str, Any] = {"trials": wandb.Table(columns=cols, data=data)}
        if curves:
            with tempfile.TemporaryDirectory() as d:
                path = os.path.join(d, "curves.png")
                with open(path, "wb") as f:
                    f.write(curves)
                logged["curves"] = wandb.Image(path)
                self.run.log(logged)
        else:
            self.run.log(logged)
        win = summary.trial(summary.winner) if summary.winner is not None else None
        if win is not None:
            self.run.summary.update(
                {
                    "winner": {"trial": win.trial, "run": win.run, "params": win.params},
                    "best_final_val_loss": win.final_val_loss,
                }
            )

    def finish(self, state: str) -> None:
        self.run.finish(exit_code=EXIT_CODE[state])
        self.run = None

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
